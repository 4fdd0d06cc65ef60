"""init_kprobes() converting early probes (the seed's convert_early_kprobes()): a thread hitting
an early probe while the conversion runs loses no event (an exact count), an unsafe early
probe is removed and reported, or aborts the process when asked, and the conversion is
idempotent and thread-safe."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.boot.conftest import run, trace_lines, warnings_of, write
from tests.testenv import ARCH, BREAKPOINT_CAPS

TARGET = """
def work(i):
    return i + 1
"""

RACE = """
import json, sys, threading, time
import pykprobes as kp
from pykprobes.core.registry import early_status as early
import racemod

before, after = int(sys.argv[1]), int(sys.argv[2])
unoptimize = sys.argv[3] == "breakpoint"
assert kp.kprobes_is_early()
calls = 0
stop = False
pause = threading.Event()
paused = threading.Event()

def loop():
    global calls
    while not stop:
        if pause.is_set():
            paused.set()
            while pause.is_set():
                time.sleep(0.0001)
            paused.clear()
        racemod.work(calls)
        calls += 1

def hits_during_conversion():
    # Runs inside init_kprobes(), once the probes are normal ones and before the early
    # events move into the trace: the thread must hit the probe there too.
    start = calls
    while calls < start + 200:
        time.sleep(0.0001)

from pykprobes.core.table import TABLE
TABLE.early.notifiers.insert(0, hits_during_conversion)
sys.setswitchinterval(1e-5)  # the GIL changes hands often: hits land in every phase
thread = threading.Thread(target=loop)
thread.start()
while calls < before:
    time.sleep(0.0002)
before_init = calls
kp.init_kprobes()  # while the thread hits the probe
at_conversion = calls
if unoptimize:
    # Then the breakpoint arch serves it, still hit. The thread waits meanwhile: what
    # is tested here is the conversion; set_optimization(False) has a window of its own
    # in which a call of the probed function from another thread is not hit (the function
    # runs the original code before the breakpoint is armed on it), a core matter.
    pause.set()
    paused.wait()
    kp.set_optimization(False)
    pause.clear()
while calls < at_conversion + after:
    time.sleep(0.0002)
stop = True
thread.join()

from pykprobes.trace.tracefs import tracefs
fs = tracefs()
event = fs.event("boot/hit")
batch = fs.buffer.read(block=False)  # trace_pipe: the records and where events were lost
values = [r[4][0] for r in batch if r[3].event is event]
print(json.dumps({
    "calls": calls, "at_conversion": at_conversion, "early": kp.kprobes_is_early(),
    "during": at_conversion - before_init,
    "values": values, "lost_at": batch.lost_at, "buffer_lost": fs.buffer.lost,
    # The event's hits: its probe's careful hits and its recorder's (a compiled hit, optimized
    # or served by a breakpoint, is counted by the recorder: kprobe_profile's column).
    "nhit": event.hits, "flags": event.probes[0].flags,
    "free": early.nr_free_slots(), "slots": early.nr_slots(),
    "kprobe_events": fs.read("kprobe_events"), "enable": fs.read("events/boot/hit/enable"),
}))
"""


def _race(tmp_path: Path, early_buffer: int, unoptimize: bool) -> dict[str, object]:
    write(tmp_path / "racemod.py", TARGET)
    write(tmp_path / "race.py", RACE)
    mode = "breakpoint" if unoptimize else "optimized"
    traced = run(["race.py", "3000", "3000", mode], events="p:boot/hit racemod:work i",
                 cwd=tmp_path, env={"PYKPROBES_EARLY_BUFFER": str(early_buffer),
                                    "PYKPROBES_OUTPUT": str(tmp_path / "unused")})
    assert traced.returncode == 0, traced.stderr
    assert warnings_of(traced.stderr) == []
    assert not (tmp_path / "unused").exists(), "converted: nothing is written at exit"
    out: dict[str, object] = json.loads(traced.stdout)
    return out


def _check_exact(out: dict[str, object], early_buffer: int) -> None:
    calls = out["calls"]
    values = out["values"]
    assert isinstance(calls, int) and isinstance(values, list)
    assert out["early"] is False
    assert out["nhit"] == calls, "every call of work() hit the probe"
    lost = sum(n for _, n in out["lost_at"])  # type: ignore[attr-defined]
    assert lost == out["buffer_lost"]
    # Every hit is in the trace or counted lost: the count is exact.
    assert len(values) + lost == calls
    # In order, each once; the only hole is the early buffer's overflow, reported right
    # where it happened (after the early buffer's last event).
    assert values == sorted(set(values))
    if lost:
        assert out["lost_at"] == [[early_buffer, lost]]
        assert values[:early_buffer] == list(range(early_buffer))
        assert values[early_buffer] == early_buffer + lost
    assert values == [v for v in range(calls) if not early_buffer <= v < early_buffer + lost]
    assert out["free"] == out["slots"] == 16
    assert out["kprobe_events"] == "p:boot/hit racemod:work i=i\n"
    assert out["enable"] == "1\n"


def test_a_thread_hitting_during_conversion_loses_no_event(tmp_path: Path) -> None:
    out = _race(tmp_path, early_buffer=1 << 20, unoptimize=False)
    _check_exact(out, 1 << 20)
    assert out["buffer_lost"] == 0
    assert isinstance(out["during"], int) and out["during"] >= 200, \
        "the thread hit the probe while init_kprobes() ran"
    assert out["flags"] == 16 | 4, "still armed and optimized after the conversion"


def test_an_overflowing_early_buffer_is_counted_exactly(tmp_path: Path) -> None:
    out = _race(tmp_path, early_buffer=500, unoptimize=False)
    _check_exact(out, 500)
    assert isinstance(out["buffer_lost"], int) and out["buffer_lost"] > 0


@pytest.mark.skipif(not BREAKPOINT_CAPS.running_frames_other_threads,
                    reason="capability: the breakpoint arch cannot reach a thread that is "
                           "already running (settrace)")
def test_unoptimized_after_conversion_still_exact(tmp_path: Path) -> None:
    out = _race(tmp_path, early_buffer=1 << 20, unoptimize=True)
    _check_exact(out, 1 << 20)
    assert out["flags"] in (16, 16 | 8), "a breakpoint now (maybe the entry event)"


UNSAFE = """
import sys
import pykprobes as kp
import target
target.work(1)
kp.nokprobe(target.work)  # the blacklist grew: the address is no longer safe
kp.init_kprobes()
print("after", kp.kprobes_is_early(), repr(kp.list_kprobes()),
      target.work.__code__ is target.work.__code__.replace(), flush=True)
from pykprobes.trace.tracefs import tracefs
print(sorted(tracefs().events), [p for p in __import__("pykprobes.core.registry",
      fromlist=["x"]).early_status.slot_probes()])
target.work(2)
"""


def test_unsafe_early_probe_is_removed_and_reported(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "main.py", UNSAFE)
    traced = run(["main.py"], events="p:boot/hit target:work i;p:boot/other target:work",
                 cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout.splitlines()[0].startswith("after False ''")
    assert traced.stdout.splitlines()[1] == "[] []"
    assert warnings_of(traced.stderr) == [
        "pykprobes: Insert kprobe at target:work+0 is not safe! (marked @nokprobe): "
        "the early probe is removed"]


def test_unsafe_early_probe_panics_when_asked(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "main.py", UNSAFE)
    traced = run(["main.py"], events="p:boot/hit target:work i", cwd=tmp_path,
                 env={"PYKPROBES_PANIC_ON_UNSAFE": "1"})
    assert traced.returncode == -signal.SIGABRT
    assert traced.stdout == ""
    assert warnings_of(traced.stderr) == [
        "pykprobes: Kernel panic - not syncing: Insert kprobe at target:work+0 is not safe! "
        "(marked @nokprobe)"]


def test_concurrent_init_converts_once(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "main.py", """
        import json, threading
        import pykprobes as kp
        from pykprobes.core import registry
        import target
        target.work(0)
        barrier = threading.Barrier(8)
        def init():
            barrier.wait()
            kp.init_kprobes()
        threads = [threading.Thread(target=init) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        target.work(1)
        from pykprobes.trace.tracefs import tracefs
        fs = tracefs()
        print(json.dumps({
            "early": kp.kprobes_is_early(),
            "records": [r[4] for r in fs.buffer.snapshot()],
            "events": sorted("/".join(k) for k in fs.events),
            "table": len(registry.table_view().sites),
            "early_table": len(registry.table_view().early_sites),
        }))
    """)
    traced = run(["main.py"], events="p:boot/w target:work i", cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert json.loads(traced.stdout) == {"early": False, "records": [[0], [1]],
                                         "events": ["boot/w"], "table": 1, "early_table": 0}


def test_pykprobes_run_converts_at_start(tmp_path: Path) -> None:
    """`pykprobes run` calls init_kprobes() before the program: the early events (here, the
    program's module imported by it) and the run's own events share one trace."""
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "prog.py", """
        import target
        print(target.work(41))
    """)
    args = ["-m", "pykprobes", "run", "-e", "p:run/w target:work i"]
    if ARCH != "optimized":
        args.append("--no-optimize")
    traced = run([*args, "--", "prog.py"], events="p:boot/early target:work i",
                 cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == "42\n"
    assert sorted((m["event"], m["args"]) for m in trace_lines(traced.stderr)) == \
        [("early", " i=41"), ("w", " i=41")]
