"""Port of the kernel's test.d/kprobe/kprobe_multiprobe.tc: one event with two probe points.
Every case of it has a Python form; beyond it, what the kernel's append_trace_kprobe() and
trace_kprobe_match_command_head() say that the .tc does not check (the records of each point,
one kprobe_profile line per point, removing one point of an enabled event, `-:EVENT TARGET
ARGS`). The error rows (DIFF_PROBE_TYPE, DIFF_ARG_TYPE, SAME_PROBE) and their carets are in
test_kprobe_syntax_errors.py, rows 43-47."""

from __future__ import annotations

import errno

import pytest

from pykprobes import insn
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest import targets
from tests.kselftest.conftest import T

SYM1 = f"{T}:kernel_clone"
SYM2 = f"{T}:do_exit"
EVENT_NAME = "kprobes/testevent"
DEF1 = f"p:{EVENT_NAME} {SYM1}"
DEF2 = f"p:{EVENT_NAME} {SYM2}"


def _first_body_offset() -> int:
    """kernel_clone's instruction after RESUME: 2, but 4 on 3.15 (its RESUME has a CACHE
    entry)."""
    insns = insn.decode(targets.kernel_clone.__code__)
    return insns[insn.entry_index(insns) + 1].start


#: The second point's target: inside kernel_clone.
SYM1_BODY = f"{SYM1}+{_first_body_offset()}"


def _lines(fs: TraceFS) -> list[str]:
    return fs.read("kprobe_events").splitlines()


def test_create_and_delete_multiprobe(fs: TraceFS) -> None:
    # Define an event which has 2 probes.
    fs.write("kprobe_events", DEF1, append=True)
    fs.write("kprobe_events", DEF2, append=True)
    assert _lines(fs) == [DEF1, DEF2]
    assert list(fs.events) == [("kprobes", "testevent")]

    # Remove the event by name (should remove both).
    fs.write("kprobe_events", f"-:{EVENT_NAME}", append=True)
    assert _lines(fs) == []

    # Remove just 1 event.
    fs.write("kprobe_events", DEF1, append=True)
    fs.write("kprobe_events", DEF2, append=True)
    fs.write("kprobe_events", f"-:{EVENT_NAME} {SYM1}", append=True)
    assert _lines(fs) == [DEF2]

    # Appending different type must fail.
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", f"{DEF1} $stack", append=True)
    assert info.value.errno == errno.EEXIST
    assert _lines(fs) == [DEF2]


def test_both_points_record_under_one_event(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"{DEF1} v=$arg1", append=True)
    fs.write("kprobe_events", f"{DEF2} v=$arg1", append=True)
    fs.write(f"events/{EVENT_NAME}/enable", "1")
    targets.kernel_clone(11)
    targets.do_exit(22)
    fs.write(f"events/{EVENT_NAME}/enable", "0")
    trace = [line.split(": ", 1)[1] for line in fs.read("trace").splitlines()
             if not line.startswith("#")]
    assert trace == [f"testevent: ({SYM1}+0) v=11", f"testevent: ({SYM2}+0) v=22"]
    # kprobe_profile: one line per probe point, each with its own hits (the kernel's).
    profile = [line.split() for line in fs.read("kprobe_profile").splitlines()]
    assert profile == [["testevent", "1", "0"], ["testevent", "1", "0"]]
    assert fs.event(EVENT_NAME).hits == 2


def test_a_point_of_an_enabled_event_can_go_the_last_cannot(fs: TraceFS) -> None:
    """Kernel unregister_trace_kprobe(): a probe with siblings is removed even while the
    event is enabled; the event's last one is busy."""
    fs.write("kprobe_events", DEF1, append=True)
    fs.write("kprobe_events", DEF2, append=True)
    fs.write(f"events/{EVENT_NAME}/enable", "1")
    fs.write("kprobe_events", f"-:{EVENT_NAME} {SYM1}", append=True)
    assert _lines(fs) == [DEF2]
    targets.kernel_clone(1)
    targets.do_exit(2)
    assert fs.event(EVENT_NAME).hits == 1
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", f"-:{EVENT_NAME}", append=True)
    assert info.value.errno == errno.EBUSY
    fs.write(f"events/{EVENT_NAME}/enable", "0")
    fs.write("kprobe_events", f"-:{EVENT_NAME}", append=True)
    assert _lines(fs) == []


def test_a_point_appended_to_an_enabled_event_is_enabled(fs: TraceFS) -> None:
    fs.write("kprobe_events", DEF1, append=True)
    fs.write(f"events/{EVENT_NAME}/enable", "1")
    fs.write("kprobe_events", DEF2, append=True)
    targets.do_exit(3)
    assert fs.event(EVENT_NAME).hits == 1


def test_remove_by_target_and_arguments(fs: TraceFS) -> None:
    """`-:EVENT TARGET ARGS...`: the points whose target, then arguments as listed, match."""
    fs.write("kprobe_events", f"{DEF1} a=$arg1 b=$arg2", append=True)
    fs.write("kprobe_events", f"p:{EVENT_NAME} {SYM1_BODY} a=$arg1 b=$arg2", append=True)
    fs.write("kprobe_events", f"{DEF1} a=$arg2 b=$arg1", append=True)
    assert len(_lines(fs)) == 3
    with pytest.raises(TraceWriteError) as info:  # no point of it has this target
        fs.write("kprobe_events", f"-:{EVENT_NAME} {SYM2}", append=True)
    assert info.value.errno == errno.ENOENT
    fs.write("kprobe_events", f"-:{EVENT_NAME} {SYM1} a=$arg2", append=True)
    assert _lines(fs) == [f"{DEF1} a=$arg1 b=$arg2", f"p:{EVENT_NAME} {SYM1_BODY} a=$arg1 b=$arg2"]
    fs.write("kprobe_events", f"-:{EVENT_NAME} {SYM1_BODY}", append=True)
    assert _lines(fs) == [f"{DEF1} a=$arg1 b=$arg2"]


def test_the_same_target_with_other_arguments_is_another_point(fs: TraceFS) -> None:
    """trace_kprobe_has_same_kprobe(): only the very same target and arguments are the same
    probe; the same names and types over other values make a second point."""
    fs.write("kprobe_events", f"{DEF1} x=\\1", append=True)
    fs.write("kprobe_events", f"{DEF1} x=\\2", append=True)
    fs.write(f"events/{EVENT_NAME}/enable", "1")
    targets.kernel_clone(0)
    fs.write(f"events/{EVENT_NAME}/enable", "0")
    values = sorted(line.rsplit(" ", 1)[1] for line in fs.read("trace").splitlines()
                    if not line.startswith("#"))
    assert values == ["x=1", "x=2"]


def test_str_and_string_are_one_type(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"{DEF1} s=$comm", append=True)
    fs.write("kprobe_events", f"{DEF2} s=$comm:string", append=True)
    fs.write("kprobe_events", f"p:{EVENT_NAME} {T}:kfree s=$arg1:str", append=True)
    assert len(_lines(fs)) == 3
