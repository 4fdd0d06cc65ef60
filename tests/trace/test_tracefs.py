"""The virtual tracefs end to end: definitions, enable, filters, trace, trace_pipe read from
another thread, kprobe_profile, error_log, buffer overflow, and fetching that runs none of
the program's code."""

from __future__ import annotations

import errno
import re
import threading
from typing import ClassVar

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.core import targets

LINE = re.compile(r"^\s*(?P<comm>.+)-(?P<tid>\d+)\s+\[000\]\s+(?P<ts>[\d.]+): "
                  r"(?P<event>\w+): \((?P<probe>[^)]*)\)(?P<args>.*)$")


def _lines(text: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_define_enable_trace_profile(fs: TraceFS) -> None:
    fs.write("kprobe_events", "p:grp/add tests.core.targets:add a b\n", append=True)
    fs.write("kprobe_events", "r:grp/add_ret tests.core.targets:add $retval\n", append=True)
    assert fs.read("kprobe_events") == (
        "p:grp/add tests.core.targets:add a=a b=b\n"
        "r:grp/add_ret tests.core.targets:add retval=$retval\n")
    targets.add(1, 2)  # disabled after definition: nothing recorded
    assert _lines(fs.read("trace")) == []
    assert fs.read("events/grp/add/enable") == "0\n"
    fs.write("events/grp/add/enable", "1")
    fs.write("events/grp/add_ret/enable", "1")
    kp.wait_for_kprobe_optimizer()
    targets.add(3, 4)
    lines = _lines(fs.read("trace"))
    assert [(m["event"], m["probe"], m["args"]) for m in lines] == [
        ("add", "tests.core.targets:add+0", " a=3 b=4"),
        ("add_ret", "tests.core.targets:add <- tests.trace.test_tracefs:"
                    "test_define_enable_trace_profile", " retval=7"),
    ]
    assert int(lines[0]["tid"]) == threading.get_native_id()
    assert lines[0]["comm"].strip() == threading.current_thread().name
    profile = [line.split() for line in fs.read("kprobe_profile").splitlines()]
    assert ["add", "1", "0"] in profile and ["add_ret", "1", "0"] in profile
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", "-:grp/add", append=True)
    assert info.value.errno == errno.EBUSY  # enabled events cannot be removed
    fs.write("events/grp/add/enable", "0")
    fs.write("kprobe_events", "-:grp/add", append=True)
    assert fs.find("add") is None
    assert "format:" in fs.read("events/grp/add_ret/format")


def test_error_log_has_the_caret(fs: TraceFS) -> None:
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", "p:grp/bad tests.core.targets:add x:nosuchtype", append=True)
    assert info.value.errno == errno.EINVAL
    log = fs.read("error_log").splitlines()
    assert re.match(r"^\[\s*\d+\.\d+\] trace_kprobe: error: Unknown type is specified$", log[0])
    assert log[1] == "  Command: p:grp/bad tests.core.targets:add x:nosuchtype"
    column = log[1].index("nosuchtype")
    assert log[2] == " " * column + "^"
    fs.write("kprobe_events", "p:grp/one tests.core.targets:add", append=True)
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", "p:grp/one tests.core.targets:add", append=True)
    assert info.value.errno == errno.EEXIST  # SAME_PROBE
    with pytest.raises(TraceWriteError):
        fs.write("events/grp/one/filter", "a == ")
    assert "pykprobes: error: Field not found" in fs.read("error_log")  # grp/one has no `a`
    fs.write("error_log", "")
    assert fs.read("error_log") == ""


def test_filter(fs: TraceFS) -> None:
    event = fs.define("p:grp/f tests.core.targets:add a b")
    assert event is not None
    fs.write("events/grp/f/filter", "a > 2 && b != 0")
    assert fs.read("events/grp/f/filter") == "a > 2 && b != 0\n"
    event.enable()
    for a, b in [(1, 1), (3, 0), (3, 1), (5, 5)]:
        targets.add(a, b)
    assert [m["args"] for m in _lines(fs.read("trace"))] == [" a=3 b=1", " a=5 b=5"]
    fs.write("events/grp/f/filter", "0")
    targets.add(0, 0)
    assert len(_lines(fs.read("trace"))) == 3


def test_trace_pipe_from_another_thread_while_the_program_runs(fs: TraceFS) -> None:
    event = fs.define("p:grp/loop tests.core.targets:kprobe_target value")
    assert event is not None
    event.enable()
    got: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set() or fs.buffer.entries:
            got.extend(m["args"] for m in _lines(fs.read_pipe(timeout=0.05)))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(2000):
        targets.kprobe_target(i)
    done.set()
    t.join(30)
    assert got == [f" value={i}" for i in range(2000)]  # each once, in order
    assert _lines(fs.read("trace")) == []  # consumed


def test_overflow_counts_lost_events(fs: TraceFS) -> None:
    fs.write("buffer_size_kb", "1")
    event = fs.define("p:grp/over tests.core.targets:kprobe_target value")
    assert event is not None
    event.enable()
    for i in range(500):
        targets.kprobe_target(i)
    kept = _lines(fs.read("trace"))
    lost = fs.buffer.lost
    assert kept and lost and len(kept) + lost == 500
    assert kept[-1]["args"] == " value=499"  # overwrite mode keeps the newest
    text = fs.read_pipe(timeout=0)
    assert f"[LOST {lost} EVENTS]" in text
    assert event.nhit == 500


class Sneaky:
    calls: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.plain = 1

    @property
    def prop(self) -> int:
        Sneaky.calls.append("property")
        return 2

    def __getattr__(self, name: str) -> int:
        Sneaky.calls.append("__getattr__")
        return 3

    def __repr__(self) -> str:
        Sneaky.calls.append("__repr__")
        return "Sneaky()" * 100


def takes(obj: object) -> object:
    return obj


def test_fetching_runs_none_of_the_programs_code(fs: TraceFS) -> None:
    event = fs.define("p:grp/sneaky tests.trace.test_tracefs:takes plain=obj.plain "
                      "prop=obj.prop missing=obj.missing obj r=obj:repr")
    assert event is not None
    event.enable()
    Sneaky.calls.clear()
    takes(Sneaky())
    assert Sneaky.calls == ["__repr__"], "only the explicit :repr ran program code"
    args = _lines(fs.read("trace"))[0]["args"]
    assert " plain=1 prop=(fault) missing=(fault) " in args
    assert "obj=<" in args and "Sneaky at 0x" in args
    r = args.split(" r=", 1)[1]
    assert len(r) < 300 and r.startswith("Sneaky()")


def test_tracing_on_and_buffer_size(fs: TraceFS) -> None:
    event = fs.define("p:grp/t tests.core.targets:add")
    assert event is not None
    event.enable()
    fs.write("tracing_on", "0")
    targets.add(1, 1)
    assert fs.read("tracing_on") == "0\n" and _lines(fs.read("trace")) == []
    fs.write("tracing_on", "1")
    targets.add(1, 1)
    assert len(_lines(fs.read("trace"))) == 1
    fs.write("buffer_size_kb", "64")
    assert fs.read("buffer_size_kb") == "64\n"
    with pytest.raises(TraceWriteError):
        fs.write("buffer_size_kb", "lots")
    fs.write("trace", "")
    assert _lines(fs.read("trace")) == []


def test_clear_all(fs: TraceFS) -> None:
    fs.write("kprobe_events", "p:grp/a tests.core.targets:add\np:grp/b tests.core.targets:"
                              "loop_sum n\n")
    assert len(fs.events) == 2
    fs.write("kprobe_events", "")
    assert fs.events == {} and fs.read("kprobe_events") == ""
    assert kp.list_kprobes() == ""


def test_full_buffer_drops_the_newest_when_overwrite_is_off(fs: TraceFS) -> None:
    fs.write("buffer_size_kb", "1")
    fs.write("options/overwrite", "0")
    assert fs.read("options/overwrite") == "0\n"
    event = fs.define("p:grp/drop tests.core.targets:kprobe_target value")
    assert event is not None
    event.enable()
    for i in range(500):
        targets.kprobe_target(i)
    kept = _lines(fs.read("trace"))
    assert kept[0]["args"] == " value=0"  # the oldest stay
    assert len(kept) + fs.buffer.lost == 500


# -- what a hit writes: the thread as a key, the size estimate ------------------------


def test_fixed_size_types_give_a_constant_size(fs: TraceFS) -> None:
    event = fs.define("p:grp/fixed tests.core.targets:add a:int b:x")
    assert event is not None and event.size == 24 + 2 * 8
    free = fs.define("p:grp/free tests.core.targets:add a b:str")
    assert free is not None and free.size is None
    event.enable()
    kp.wait_for_kprobe_optimizer()
    for n in range(5):
        targets.add(n, 1)
    assert fs.buffer.bytes_used == 5 * 40


def test_variable_size_per_record(fs: TraceFS) -> None:
    event = fs.define("p:grp/var tests.core.targets:add a b")
    assert event is not None
    event.enable()
    kp.wait_for_kprobe_optimizer()
    targets.add("xyz", "ab")
    targets.add(1, 2)
    # 24 + (4 + 3) + (4 + 2), then 24 + 8 + 8
    assert fs.buffer.bytes_used == 37 + 40


def test_records_of_threads_that_ended_keep_their_id_and_name(fs: TraceFS) -> None:
    event = fs.define("p:grp/t tests.core.targets:add a")
    assert event is not None
    event.enable()
    kp.wait_for_kprobe_optimizer()
    tids = []
    for n in range(3):
        def work(n: int = n) -> None:
            tids.append(threading.get_native_id())
            targets.add(n, 0)

        t = threading.Thread(target=work, name=f"ended-{n}")
        t.start()
        t.join()
    got = [(m["comm"].strip(), int(m["tid"]), m["args"]) for m in _lines(fs.read("trace"))]
    assert got == [(f"ended-{n}", tids[n], f" a={n}") for n in range(3)]


def test_the_filter_sees_the_thread(fs: TraceFS) -> None:
    event = fs.define("p:grp/f tests.core.targets:add a")
    assert event is not None
    fs.write("events/grp/f/filter", f'common_comm == "{threading.current_thread().name}"')
    event.enable()
    kp.wait_for_kprobe_optimizer()
    targets.add(1, 1)
    t = threading.Thread(target=targets.add, args=(2, 2), name="not-me")
    t.start()
    t.join()
    assert [m["args"] for m in _lines(fs.read("trace"))] == [" a=1"]
