"""The compiled event (trace/events.py compile_call, the recorders of both backends): an
entry event whose fetchargs are all arguments is recorded by the injected call when the
probe is optimized, or by the breakpoint hit calling the recorder itself
(core/framecall.py), with the same records as the careful path; anything the careful path
has to do (filter, tracing off, a handler running, a second probe) goes to it; no
reference to the program's objects is kept."""

from __future__ import annotations

import dis
import gc
import re
import threading
import weakref
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS

ARGS = re.compile(r": \(([^)]*)\)(.*)$")


def probed(a: Any, b: Any = 2, *rest: Any, **kw: Any) -> Any:
    return a


def other(x: Any) -> Any:
    local = x
    return local


#: An instruction of `other` after its entry, on every version.
AFTER_ENTRY = next(i.offset for i in dis.get_instructions(other) if i.opname == "STORE_FAST")


def _define(fs: TraceFS, text: str) -> Any:
    event = fs.define(text)
    assert event is not None
    event.enable()
    kp.wait_for_kprobe_optimizer()
    return event


def _args(fs: TraceFS) -> list[str]:
    return [m.group(2).strip() for m in map(ARGS.search, fs.read("trace").splitlines()) if m]


def _recorded(event: Any) -> int:
    return sum(point._recorded() for point in event.points)


class Thing:
    x = 5

    def __init__(self) -> None:
        self.y = "why"


def test_an_optimized_entry_event_is_recorded_by_its_recorder(fs: TraceFS) -> None:
    event = _define(fs, f"p:grp/c {__name__}:probed a=$arg1 b $arg:rest kw")
    for n in range(3):
        probed(n, "s", 1, z=2)
    lines = _args(fs)
    assert len(lines) == 3
    for n, line in enumerate(lines):
        assert line.startswith(f'a={n} b="s" rest=<tuple at 0x') and line.endswith(">")
    assert event.hits == event.nhit == 3
    assert _recorded(event) == 3
    assert fs.read("kprobe_profile").split()[1:3] == ["3", "0"]


@pytest.mark.parametrize(
    ("fetch", "value", "expected"),
    [
        ("a", 12, "a=12"),
        ("a", 1.5, "a=1.5"),
        ("a", None, "a=None"),
        ("a", True, "a=True"),
        ("a", "x" * 300, f'a="{"x" * 256}..."'),
        ("a", b"xy", 'a=b"xy"'),
        ("a:int", 2.7, "a=2"),
        ("a:int", 7, "a=7"),
        ("a:float", 3, "a=3.0"),
        ("a:str", 12, 'a="12"'),
        ("a:str", "short", 'a="short"'),
        ("a:x", 255, "a=0xff"),
        ("a:len", [1, 2], "a=2"),
        ("a.y", Thing(), 'a="why"'),
        ("a.x", Thing(), "a=5"),
        ("a.nope", Thing(), "a=(fault)"),
    ],
)
def test_values_are_recorded_as_the_careful_path_records_them(
    fs: TraceFS, fetch: str, value: Any, expected: str
) -> None:
    event = _define(fs, f"p:grp/v {__name__}:probed {fetch}")
    probed(value)
    assert _recorded(event) == 1
    fs.write("events/grp/v/filter", "common_pid != 0")  # the careful path, for comparison
    probed(value)
    first, second = _args(fs)
    assert first == second
    assert first.startswith(expected) or first == expected


def test_no_reference_to_the_programs_objects_is_kept(fs: TraceFS) -> None:
    _define(fs, f"p:grp/r {__name__}:probed a b")
    obj = Thing()
    ref = weakref.ref(obj)
    probed(obj, [obj])
    del obj
    gc.collect()
    assert ref() is None
    assert "<Thing at 0x" in fs.read("trace")


def test_the_filter_and_tracing_off_go_to_the_careful_path(fs: TraceFS) -> None:
    event = _define(fs, f"p:grp/f {__name__}:probed a")
    fs.write("events/grp/f/filter", "a == 1")
    for n in range(3):
        probed(n)
    assert _args(fs) == ["a=1"] and _recorded(event) == 0 and event.hits == 3
    fs.write("events/grp/f/filter", "none")
    fs.write("tracing_on", "0")
    probed(5)
    assert _args(fs) == ["a=1"] and event.hits == 4
    fs.write("tracing_on", "1")
    probed(6)
    assert _args(fs) == ["a=1", "a=6"]
    assert _recorded(event) == 1


def test_a_handler_running_in_another_thread_sends_hits_to_the_careful_path(
    fs: TraceFS,
) -> None:
    event = _define(fs, f"p:grp/b {__name__}:probed a")
    inside, release = threading.Event(), threading.Event()

    def handler(p: Any, regs: Any) -> None:
        inside.set()
        release.wait(10)

    blocker = kp.Kprobe(symbol_name=f"{__name__}:other", pre_handler=handler)
    kp.register_kprobe(blocker)
    # Optimized now, not by the optimizer's thread while the hits below run: its rewriting
    # is pykprobes' work (kprobe_busy), during which every hit takes the careful path.
    kp.wait_for_kprobe_optimizer()
    try:
        t = threading.Thread(target=other, args=(1,))
        t.start()
        assert inside.wait(10)
        probed(1)  # while the handler runs: the careful path records it all the same
        release.set()
        t.join()
        probed(2)
    finally:
        kp.unregister_kprobe(blocker)
    assert _args(fs) == ["a=1", "a=2"]
    assert _recorded(event) == 1
    assert event.hits == 2 and event.nmissed == 0


def test_a_second_probe_at_the_site_makes_the_site_aggregate(fs: TraceFS) -> None:
    event = _define(fs, f"p:grp/s {__name__}:probed a")
    seen: list[int] = []
    p = kp.Kprobe(symbol_name=f"{__name__}:probed", pre_handler=lambda p, r: seen.append(1))
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    probed(1)
    kp.unregister_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    probed(2)
    event.disable()
    kp.wait_for_kprobe_optimizer()
    probed(3)
    event.enable()
    kp.wait_for_kprobe_optimizer()
    probed(4)
    assert seen == [1]
    assert _args(fs) == ["a=1", "a=2", "a=4"]
    assert event.hits == event.nhit == 3
    assert _recorded(event) == 2


@pytest.mark.parametrize("text", [
    "p:grp/l {m}:other local",            # a local, not an argument
    "p:grp/l {m}:other x $comm",          # $comm needs the thread
    "p:grp/l {m}:other x \\5",            # an immediate
    "p:grp/l {m}:other+{off} x",          # not the entry
    "r:grp/l {m}:other local",            # a return probe reading a local
    "r:grp/l {m}:other x=$retval.real",   # ... or a chain on $retval
])
def test_events_that_are_not_compiled_still_record(fs: TraceFS, text: str) -> None:
    event = _define(fs, text.format(m=__name__, off=AFTER_ENTRY))
    other(1)
    assert event.hits == 1 and _recorded(event) == 0
    assert len(_args(fs)) == 1
