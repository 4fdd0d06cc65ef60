"""Hist triggers beyond the kernel's selftests: the Python modifiers and special fields, the
bounded table, pause/cont/clear/remove, the trigger's filter, threads, and every error with
its caret."""

from __future__ import annotations

import errno
import re
import threading
import time

import pytest

import pykprobes as kp
from pykprobes.errors import ERRORS
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.trace.test_hist_selftests import SYNTAX_ERRORS


def work(n: int, name: str) -> int:
    return n


def outer_caller(n: int) -> int:
    return work(n, "outer")


def inner_caller(n: int) -> int:
    return work(n, "inner")


TRIGGER = "events/t/work/trigger"
HIST = "events/t/work/hist"


@pytest.fixture
def wfs(fs: TraceFS) -> TraceFS:
    fs.write("kprobe_events", f"p:t/work {__name__}:work n name:str\n", append=True)
    return fs


def _entries(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


def test_buckets_and_usecs_modifiers(wfs: TraceFS) -> None:
    wfs.write(TRIGGER, "hist:keys=n.buckets=100:sort=n")
    for n in (5, 99, 100, 250, 1234):
        work(n, "x")
    assert _entries(wfs.read(HIST)) == [
        "{ n: ~ 0-99 } hitcount:          2",
        "{ n: ~ 100-199 } hitcount:          1",
        "{ n: ~ 200-299 } hitcount:          1",
        "{ n: ~ 1200-1299 } hitcount:          1",
    ]
    assert "keys=n.buckets=100:" in wfs.read(TRIGGER)
    wfs.write(TRIGGER, "hist:keys=n.usecs:sort=n")
    for n in (999, 1000, 2500):
        work(n, "x")
    assert [int(x) for x in re.findall(r"n:\s+(\d+)", wfs.read(HIST))] == [0, 1, 2]


def test_stacktrace_key_names_the_python_callers(wfs: TraceFS) -> None:
    wfs.write(TRIGGER, "hist:keys=stacktrace")
    for _ in range(3):
        outer_caller(1)
    inner_caller(2)
    text = wfs.read(HIST)
    blocks = re.findall(r"\{ stacktrace:\n((?: {9}\S+\n)+)\} hitcount:\s+(\d+)", text)
    stacks = {tuple(s.split()): int(n) for s, n in blocks}
    heads = {frames[:2]: n for frames, n in stacks.items()}
    assert heads == {(f"{__name__}:work", f"{__name__}:outer_caller"): 3,
                     (f"{__name__}:work", f"{__name__}:inner_caller"): 1}
    assert all(len(frames) <= 16 for frames in stacks)


def test_common_fields_as_keys(wfs: TraceFS) -> None:
    wfs.write(TRIGGER, "hist:keys=common_comm,common_pid")
    work(1, "a")
    thread = threading.Thread(target=work, args=(2, "b"), name="other-thread")
    thread.start()
    thread.join()
    text = wfs.read(HIST)
    tid = threading.get_native_id()
    assert re.search(rf"common_comm: MainThread\s+, common_pid:\s+{tid} }}", text)
    assert "common_comm: other-thread" in text
    wfs.write(TRIGGER, "hist:keys=common_timestamp.usecs:vals=n")
    before = time.monotonic_ns() // 1000
    work(3, "x")
    after = time.monotonic_ns() // 1000
    (stamp,) = [int(x) for x in re.findall(r"common_timestamp:\s+(\d+)", wfs.read(HIST))]
    assert before <= stamp <= after


def test_the_table_is_bounded_and_counts_drops(wfs: TraceFS) -> None:
    wfs.write(TRIGGER, "hist:keys=n:size=100")  # rounded up to 128
    assert ":size=128 [active]" in wfs.read(TRIGGER)
    for n in range(200):
        work(n, "x")
    for n in range(10):
        work(n, "again")  # known keys still count when the table is full
    assert wfs.read(HIST).endswith("Totals:\n    Hits: 138\n    Entries: 128\n"
                                   "    Dropped: 72\n")


def test_pause_cont_clear_and_remove(wfs: TraceFS) -> None:
    wfs.write(TRIGGER, "hist:keys=n")
    work(1, "x")
    wfs.write(TRIGGER, "hist:keys=n:pause", append=True)
    work(1, "x")
    assert wfs.read(TRIGGER).endswith("[paused]\n")
    assert "Hits: 1\n" in wfs.read(HIST)
    wfs.write(TRIGGER, "hist:keys=n:cont", append=True)
    work(1, "x")
    assert "Hits: 2\n" in wfs.read(HIST) and wfs.read(TRIGGER).endswith("[active]\n")
    wfs.write(TRIGGER, "hist:keys=n:clear", append=True)
    assert "Hits: 0\n    Entries: 0\n" in wfs.read(HIST)
    with pytest.raises(TraceWriteError) as info:
        wfs.write(TRIGGER, "hist:keys=n", append=True)
    assert info.value.errno == errno.EEXIST
    wfs.write(TRIGGER, "!hist:keys=n", append=True)
    assert wfs.read(TRIGGER) == "# Available triggers:\n# hist\n"
    assert wfs.read(HIST) == ""
    with pytest.raises(TraceWriteError) as info:
        wfs.write(TRIGGER, "hist:keys=n:cont", append=True)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(TraceWriteError) as info:
        wfs.write(TRIGGER, "!hist:keys=n", append=True)
    assert info.value.errno == errno.ENOENT
    # Without a trigger or enable, the probe is disarmed again.
    assert wfs.event("t/work")._armed is False
    wfs.write(TRIGGER, "hist:keys=n:pause", append=True)  # pause of a new one: made paused
    work(1, "x")
    assert wfs.read(TRIGGER).endswith("[paused]\n") and "Hits: 0\n" in wfs.read(HIST)


def test_a_trigger_filter_and_truncation(wfs: TraceFS) -> None:
    wfs.write(TRIGGER, 'hist:keys=name:vals=n if n > 10 && name ~ "k*"')
    for n, name in ((5, "keep"), (50, "keep"), (60, "kind"), (70, "drop")):
        work(n, name)
    text = wfs.read(HIST)
    assert re.search(r"name: keep\s+} hitcount:\s+1  n:\s+50", text)
    assert re.search(r"name: kind\s+} hitcount:\s+1  n:\s+60", text)
    assert "drop" not in text
    assert wfs.read(TRIGGER).endswith(' if n > 10 && name ~ "k*" [active]\n')
    wfs.write(TRIGGER, "hist:keys=n")  # `>` removes the others first (O_TRUNC)
    assert len(wfs.read(TRIGGER).splitlines()) == 1


def test_threads_lose_no_hit(wfs: TraceFS) -> None:
    wfs.write(TRIGGER, "hist:keys=n:vals=n")
    kp.wait_for_kprobe_optimizer()

    def loop() -> None:
        for i in range(2000):
            work(i % 7, "t")

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "Hits: 8000\n    Entries: 7\n" in wfs.read(HIST)
    total = sum(int(x) for x in re.findall(r"  n:\s+(\d+)", wfs.read(HIST)))
    assert total == 4 * sum(i % 7 for i in range(2000))


def test_named_tables_must_match(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:t/a {__name__}:work n\n", append=True)
    fs.write("kprobe_events", f"p:t/b {__name__}:outer_caller n\n", append=True)
    fs.write("events/t/a/trigger", "hist:name=shared:keys=n")
    command = "hist:name=shared:keys=common_pid"
    with pytest.raises(TraceWriteError) as info:
        fs.write("events/t/b/trigger", command, append=True)
    assert info.value.errno == errno.EINVAL
    assert "Named hist trigger doesn't match existing named trigger" in str(info.value)
    assert fs.read("error_log").splitlines()[-1].index("^") == len("  Command: hist:name=")


ERRORS_TABLE = [
    ("hist:keys=^nosuch", "Couldn't find field"),
    ("hist:keys=n,^", "Couldn't find field"),
    ("hist:keys=n.^sym", "Invalid field modifier"),
    ("hist:keys=n.^buckets=0", "Invalid field modifier"),
    ("hist:keys=n.^execname", "Invalid field modifier"),
    ("hist:keys=name.^log2", "Invalid field modifier"),
    ("hist:keys=n:vals=n.^log2", "Invalid field modifier"),
    ("hist:keys=n:vals=^name", "String field can not be a value"),
    ("hist:keys=n:vals=^common_comm", "String field can not be a value"),
    ("hist:keys=n:vals=^stacktrace", "String field can not be a value"),
    ("^hist:vals=n", "Hist trigger must have keys"),
    ("^hist", "Hist trigger must have keys"),
    ("hist:keys=n:size=^64", "Invalid map size (128..131072)"),
    ("hist:keys=n:size=^x", "Invalid map size (128..131072)"),
    ("hist:keys=n,name,common_pid,^common_comm", "Too many keys (Max = 3)"),
    ("hist:keys=n:vals=n,common_pid,common_timestamp,^n", "Too many values (Max = 3)"),
    ("hist:keys=n:name=^a-b", "Hist name must follow the same rules as C identifiers"),
    ("hist:keys=n:^ts0=common_timestamp", "Variables are not supported"),
    ("hist:keys=n:^onmax($n).save(n)", "Actions are not supported"),
    ("hist:keys=n:^bogus", "Invalid hist trigger attribute"),
    ("hist:keys=n:clock=^tai", "Couldn't set trace_clock"),
    ("^traceon", "Only the hist trigger is supported"),
    ("hist:keys=n ^when n > 1", "Trigger filter must follow 'if'"),
    ("hist:keys=n if n ^=~ 1", "Invalid operator"),
    ("hist:keys=n if ^zz == 1", "Field not found"),
    ("hist:keys=n:^=n", "Malformed assignment"),
]


@pytest.mark.parametrize(("vector", "message"), ERRORS_TABLE)
def test_errors_have_the_kernel_message_and_a_caret(wfs: TraceFS, vector: str,
                                                     message: str) -> None:
    pos = vector.index("^")
    command = vector.replace("^", "", 1)
    with pytest.raises(TraceWriteError) as info:
        wfs.write(TRIGGER, command, append=True)
    assert info.value.errno == errno.EINVAL
    assert str(info.value).splitlines()[0].endswith(message)
    log = wfs.read("error_log").splitlines()
    assert log[-3].endswith(f"hist:t:work: error: {message}")
    assert log[-1] == " " * (len("  Command: ") + pos) + "^"
    assert wfs.event("t/work").triggers == []


def test_the_tables_cover_every_trigger_error() -> None:
    tested = {message for _, message in (*ERRORS_TABLE, *SYNTAX_ERRORS)} | {
        ERRORS["HIST_NAMED_MISMATCH"], ERRORS["HIST_TRIGGER_EEXIST"],
        ERRORS["HIST_TRIGGER_ENOENT_CLEAR"], ERRORS["HIST_NOT_FOUND"]}
    codes = {code for code in ERRORS if code.startswith(("HIST_", "TRIGGER_"))}
    assert {ERRORS[code] for code in codes} <= tested
