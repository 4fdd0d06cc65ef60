"""The compiled return event (trace/events.py compile_return, core/rethook.py): a return
event whose fetchargs are `$retval`, `$duration` and arguments is recorded, where the entry
is optimized, by the rewritten code's return hook with the values the entry kept, and writes
the very records the careful path writes (values, arguments as they were at entry, caller);
every call counted once, whatever path served it (recursion, threads, exceptions, a handler
running, tracing off, the event switched while calls are in flight)."""

from __future__ import annotations

import re
import threading
import types
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.core.rethook import C_MODULE
from pykprobes.trace.tracefs import TraceFS
from tests.testenv import REWRITTEN
from tests.trace.test_compiled_event import _define, _recorded

RECORD = re.compile(r": \(([^)]*)\)(.*)$")


def rebinds(a: Any, b: Any) -> Any:
    a = a * 10
    return a + b


def recurse(n: int) -> int:
    if n:
        recurse(n - 1)
    return n


def fails(x: int) -> int:
    raise ValueError(x)


def waits(entered: threading.Event, gate: threading.Event, x: int) -> int:
    entered.set()
    gate.wait(10)
    return x


def caller_of_rebinds() -> Any:
    return rebinds(1, 2)


def calls_through_map() -> list[Any]:
    return list(map(rebinds, [1], [2]))


def generator_caller() -> Any:
    yield rebinds(2, 2)


def _records(fs: TraceFS) -> list[tuple[str, str]]:
    """(where, fields) of each record: the `(return from <- caller)` part and the rest."""
    out = []
    for line in fs.read("trace").splitlines():
        m = RECORD.search(line)
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return out


def test_a_return_event_is_recorded_by_the_return_hook(fs: TraceFS) -> None:
    event = _define(fs, f"r:grp/r {__name__}:rebinds a b=$arg2 r=$retval")
    for n in range(3):
        rebinds(n, 1)
    caller_of_rebinds()
    records = _records(fs)
    # The argument as it was at entry, though the function rebinds it.
    assert [r[1] for r in records] == ["a=0 b=1 r=1", "a=1 b=1 r=11", "a=2 b=1 r=21",
                                       "a=1 b=2 r=12"]
    assert records[3][0].endswith(f"<- {__name__}:caller_of_rebinds")
    assert records[0][0].endswith(f"<- {__name__}:test_a_return_event_is_recorded_by_the_"
                                  "return_hook")
    assert event.hits == event.nhit == 4
    assert _recorded(event) == (4 if REWRITTEN else 0)


def test_the_caller_is_named_whichever_calls_after_which(fs: TraceFS) -> None:
    """The caller as the frame objects name it, whoever called before: through a C function
    (map: the Python frame that called it), from a generator, and one code object run with
    the globals of another module and with none named."""
    _define(fs, f"r:grp/c {__name__}:rebinds a r=$retval")
    caller_of_rebinds()
    calls_through_map()
    list(generator_caller())
    code = caller_of_rebinds.__code__
    types.FunctionType(code, {"rebinds": rebinds, "__name__": "elsewhere"})()
    types.FunctionType(code, {"rebinds": rebinds})()
    caller_of_rebinds()
    callers = [r[0].split(" <- ")[1] for r in _records(fs)]
    assert callers == [f"{__name__}:caller_of_rebinds", f"{__name__}:calls_through_map",
                       f"{__name__}:generator_caller", "elsewhere:caller_of_rebinds",
                       "?:caller_of_rebinds", f"{__name__}:caller_of_rebinds"]
    if REWRITTEN and C_MODULE is not None:
        # The C twin read them from the interpreter frames, which agreed with the frame
        # objects at every new caller (else it would have gone back to the frame objects).
        assert C_MODULE.callers_by_head()


def test_recursion_records_each_call_once(fs: TraceFS) -> None:
    event = _define(fs, f"r:grp/n {__name__}:recurse n r=$retval")
    recurse(4)
    assert [r[1] for r in _records(fs)] == [f"n={n} r={n}" for n in range(5)]
    assert event.hits == event.nhit == 5 and event.nmissed == 0
    assert _recorded(event) == (5 if REWRITTEN else 0)


def test_an_exception_records_retval_as_a_fault(fs: TraceFS) -> None:
    event = _define(fs, f"r:grp/f {__name__}:fails x r=$retval")
    for n in range(2):
        with pytest.raises(ValueError):
            fails(n)
    assert [r[1] for r in _records(fs)] == ["x=0 r=(fault)", "x=1 r=(fault)"]
    assert event.hits == event.nhit == 2


def test_tracing_off_hands_the_return_to_the_careful_path(fs: TraceFS) -> None:
    event = _define(fs, f"r:grp/o {__name__}:rebinds a r=$retval")
    rebinds(1, 1)
    fs.write("tracing_on", "0")
    rebinds(2, 1)
    fs.write("tracing_on", "1")
    rebinds(3, 1)
    assert [r[1] for r in _records(fs)] == ["a=1 r=11", "a=3 r=31"]
    assert event.hits == 3


def test_a_call_in_flight_when_the_event_gets_a_filter(fs: TraceFS) -> None:
    """Entered while compiled, returned after a filter came: the filter applies, to the
    arguments the entry kept."""
    event = _define(fs, f"r:grp/w {__name__}:waits x r=$retval")
    entered, gate = threading.Event(), threading.Event()
    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(waits(entered, gate, 7)))
    thread.start()
    assert entered.wait(10)
    fs.write("events/grp/w/filter", "x == 8")
    gate.set()
    thread.join(10)
    assert results == [7]
    assert _records(fs) == []
    fs.write("events/grp/w/filter", "x == 7")
    gate.clear()
    gate.set()
    waits(entered, gate, 7)
    assert [r[1] for r in _records(fs)] == ["x=7 r=7"]
    assert event.hits == 2 and event.nmissed == 0


def _return_while_another_thread_runs_a_handler(x: int) -> None:
    """`waits(.., x)` returns in thread B while thread A runs a kprobe's pre-handler."""
    entered, release = threading.Event(), threading.Event()

    def pre(p: kp.Kprobe, regs: kp.Regs) -> None:
        entered.set()
        release.wait(10)

    p = kp.Kprobe(addr=rebinds, pre_handler=pre)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        b_entered, gate = threading.Event(), threading.Event()
        thread_b = threading.Thread(target=waits, args=(b_entered, gate, x))
        thread_b.start()
        assert b_entered.wait(10)
        thread_a = threading.Thread(target=rebinds, args=(1, 1))
        thread_a.start()
        assert entered.wait(10)
        gate.set()
        thread_b.join(10)
        release.set()
        thread_a.join(10)
    finally:
        kp.unregister_kprobe(p)


def test_a_return_while_another_thread_runs_a_handler(fs: TraceFS) -> None:
    """The recorder refuses while any handler runs (the reentrancy rule is the careful
    path's): the call is still recorded, once, by the careful return."""
    event = _define(fs, f"r:grp/h {__name__}:waits x r=$retval")
    _return_while_another_thread_runs_a_handler(5)
    assert [r[1] for r in _records(fs)] == ["x=5 r=5"]
    assert event.hits == 1 and event.nmissed == 0


def test_a_latency_histogram_counts_every_call(fs: TraceFS) -> None:
    event = fs.define(f"r:grp/d {__name__}:recurse d=$duration")
    assert event is not None
    fs.write("events/grp/d/trigger", "hist:keys=d.log2")
    kp.wait_for_kprobe_optimizer()
    for _ in range(10):
        recurse(2)
    table = fs.read("events/grp/d/hist")
    assert "Hits: 30" in table and "Dropped: 0" in table
    assert event.hits == 30
    assert _recorded(event) == (30 if REWRITTEN else 0)
    keys = [int(k) for k in re.findall(r"d: ~ 2\^(\d+)", table)]
    assert keys and all(0 < k < 40 for k in keys)


def test_a_latency_histogram_while_another_thread_runs_a_handler(fs: TraceFS) -> None:
    """The rethook counts a latency histogram itself (no int, no call of the counter); it
    refuses while any handler runs, and the careful return counts the call, once."""
    event = fs.define(f"r:grp/dw {__name__}:waits d=$duration")
    assert event is not None
    fs.write("events/grp/dw/trigger", "hist:keys=d.log2")
    kp.wait_for_kprobe_optimizer()
    opened = threading.Event()
    opened.set()
    waits(threading.Event(), opened, 1)  # no handler running: counted by the rethook
    _return_while_another_thread_runs_a_handler(5)
    table = fs.read("events/grp/dw/hist")
    assert "Hits: 2" in table and "Dropped: 0" in table
    assert event.hits == 2 and event.nmissed == 0
    assert _recorded(event) == (1 if REWRITTEN else 0)


def test_a_latency_histogram_paused_and_continued(fs: TraceFS) -> None:
    """A paused trigger counts nothing (the careful path's rule), and counts again once
    continued: every call is an event hit either way."""
    event = fs.define(f"r:grp/dp {__name__}:recurse d=$duration")
    assert event is not None
    fs.write("events/grp/dp/trigger", "hist:keys=d.log2")
    kp.wait_for_kprobe_optimizer()
    recurse(3)
    fs.write("events/grp/dp/trigger", "hist:keys=d.log2:pause", append=True)
    recurse(3)
    assert "Hits: 4" in fs.read("events/grp/dp/hist")
    fs.write("events/grp/dp/trigger", "hist:keys=d.log2:cont", append=True)
    recurse(3)
    assert "Hits: 8" in fs.read("events/grp/dp/hist")
    assert event.hits == 12 and event.nmissed == 0


def test_a_latency_histogram_read_between_hits_and_cleared(fs: TraceFS) -> None:
    """A latency histogram's counts are exact at every read, and a `:clear` forgets all of
    them, however they were counted (the C counter keeps a known bucket's hits apart until
    the table is read)."""
    event = fs.define(f"r:grp/dc {__name__}:recurse d=$duration")
    assert event is not None
    fs.write("events/grp/dc/trigger", "hist:keys=d.log2")
    kp.wait_for_kprobe_optimizer()
    for expected in (3, 6, 9):
        recurse(2)
        table = fs.read("events/grp/dc/hist")
        counts = [int(n) for n in re.findall(r"hitcount:\s+(\d+)", table)]
        assert sum(counts) == expected and f"Hits: {expected}\n" in table
    fs.write("events/grp/dc/trigger", "hist:keys=d.log2:clear", append=True)
    assert "Hits: 0\n    Entries: 0\n" in fs.read("events/grp/dc/hist")
    for _ in range(5):
        recurse(1)
    table = fs.read("events/grp/dc/hist")
    assert sum(int(n) for n in re.findall(r"hitcount:\s+(\d+)", table)) == 10
    assert "Hits: 10\n" in table and event.hits == 19 and event.nmissed == 0


def test_span_mode_while_compiled_takes_the_entry_handler(fs: TraceFS) -> None:
    """An event switched to something the compiled entry does not keep (a summary's
    stamps, spans) goes back to the entry handler for the calls that follow."""
    event = _define(fs, f"r:grp/s {__name__}:recurse n")
    recurse(1)
    event.summarize()
    recurse(1)
    assert event.hits == 4
    assert sum(event.latency) == 2  # the calls entered after summarize() were timed
