"""Ports of the kernel's test.d/dynevent/ tests of kprobe events through `dynamic_events`:
add_remove_kprobe.tc (with its group cases, `p:mygroup/` and `-:mygroup/`),
generic_clear_event.tc (`!p:EVENT PLACE`), clear_select_events.tc, test_duplicates.tc and
dynevent_limitations.tc. add_remove_btfarg.tc and fprobe_entry_arg.tc are ported in
test_add_remove_btfarg.py and test_kretprobe_entry_arg.py.

pykprobes has one kind of dynamic event, the kprobe event (`p`, `r`): `dynamic_events` lists
the same events as `kprobe_events`. Without a Python form, because they test other kinds:
add_remove_eprobe.tc, eprobes_syntax_errors.tc (`e:` events on events), add_remove_synth.tc and
the synthetic halves of generic_clear_event.tc and clear_select_events.tc (`s:`, from hist
triggers), add_remove_tprobe.tc, add_remove_tprobe_module.tc, enable_disable_tprobe.tc,
tprobe_syntax_errors.tc (`t:` tracepoint probes: CPython has no tracepoints to attach to),
add_remove_uprobe.tc (`p /bin/sh:10`: the Python form of a probe on a file is `p FILE.py:LINE`,
in test_kprobe_events.py's uprobe_syntax_errors port), btf_probe_event.tc and
btf_typecast_accepted.tc (BTF types and casts: a Python value carries its type), and the
fprobe files add_remove_fprobe.tc, add_remove_fprobe_module.tc, fprobe_args_vfs.tc and
fprobe_syntax_errors.tc (`f:` function entry/exit probes: pykprobes' function probes are
`p` at the entry and `r`/`%return` at the exit, whose tests these files repeat: their error
rows are kprobe_syntax_errors.tc's, and `f vfs_read+10` is `p`'s BAD_RETPROBE/BAD_PROBE_ADDR).
The `f:`, `t:` and `e:` commands are refused as what they are here: an unknown probe type.
"""

from __future__ import annotations

import errno

import pytest

from pykprobes.grammar import MAX_TRACE_ARGS
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest.conftest import T

PLACE = f"{T}:kernel_clone"


def _names(fs: TraceFS, path: str = "dynamic_events") -> list[str]:
    return [line.split()[0].split(":", 1)[1] for line in fs.read(path).splitlines()]


def test_add_remove_kprobe(fs: TraceFS) -> None:
    fs.write("dynamic_events", f"p:myevent1 {PLACE}", append=True)
    fs.write("dynamic_events", f"r:myevent2 {PLACE}", append=True)
    assert _names(fs) == ["pykprobes/myevent1", "pykprobes/myevent2"]
    assert fs.read("events/pykprobes/myevent1/enable") == "0\n"
    assert fs.read("events/pykprobes/myevent2/enable") == "0\n"
    fs.write("dynamic_events", "-:myevent2", append=True)
    assert _names(fs) == ["pykprobes/myevent1"]
    with pytest.raises(TraceWriteError):
        fs.read("events/pykprobes/myevent2/enable")
    fs.write("dynamic_events", "")
    assert fs.read("dynamic_events") == ""


def test_add_remove_kprobe_in_a_group(fs: TraceFS) -> None:
    """`p:mygroup/ PLACE` makes an auto-named event in a new group; `-:mygroup/` removes every
    event of the group, and only those."""
    fs.write("dynamic_events", f"p:mygroup/ {PLACE}", append=True)
    fs.write("dynamic_events", f"r:mygroup/ {PLACE}", append=True)
    fs.write("dynamic_events", f"p:other/keep {PLACE}", append=True)
    assert _names(fs) == ["mygroup/p_tests_kselftest_targets_kernel_clone_0",
                          "mygroup/r_tests_kselftest_targets_kernel_clone_0", "other/keep"]
    fs.write("dynamic_events", "-:mygroup/", append=True)
    assert _names(fs) == ["other/keep"]
    with pytest.raises(TraceWriteError) as info:
        fs.write("dynamic_events", "-:mygroup/", append=True)
    assert info.value.errno == errno.ENOENT


def test_removing_a_group_with_an_enabled_event_is_busy(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:grp/a {PLACE}", append=True)
    fs.write("events/grp/a/enable", "1")
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", "-:grp/", append=True)
    assert info.value.errno == errno.EBUSY
    fs.write("events/grp/enable", "0")
    fs.write("kprobe_events", "-:grp/", append=True)
    assert fs.read("kprobe_events") == ""


def test_generic_clear_event(fs: TraceFS) -> None:
    fs.write("dynamic_events", f"p:myevent1 {PLACE}", append=True)
    fs.write("dynamic_events", f"r:myevent2 {PLACE}", append=True)
    fs.write("dynamic_events", f"!p:myevent1 {PLACE}", append=True)
    assert _names(fs) == ["pykprobes/myevent2"]
    fs.write("dynamic_events", f"!r:myevent2 {PLACE}", append=True)
    assert fs.read("dynamic_events") == ""
    # `!` removes what matches the whole definition: another place matches nothing.
    fs.write("dynamic_events", f"p:myevent1 {PLACE}", append=True)
    with pytest.raises(TraceWriteError) as info:
        fs.write("dynamic_events", f"!p:myevent1 {T}:do_exit", append=True)
    assert info.value.errno == errno.ENOENT
    # kprobe_events takes no `!`.
    with pytest.raises(TraceWriteError):
        fs.write("kprobe_events", f"!p:myevent1 {PLACE}", append=True)


def test_clear_select_events(fs: TraceFS) -> None:
    """Clearing kprobe_events clears the kprobe events of dynamic_events: here, all."""
    fs.write("dynamic_events", f"p:myevent1 {PLACE}", append=True)
    fs.write("dynamic_events", f"r:myevent2 {PLACE}", append=True)
    assert fs.read("kprobe_events") == fs.read("dynamic_events") != ""
    fs.write("kprobe_events", "")
    assert fs.read("dynamic_events") == ""


def test_duplicates(fs: TraceFS) -> None:
    """A kprobe event defined twice is the same probe (-EEXIST); the eprobe and static-event
    cases have no Python form (see the module docstring)."""
    fs.write("dynamic_events", f"p:kgroup/kevent {T}:vfs_open file=$arg2", append=True)
    with pytest.raises(TraceWriteError) as info:
        fs.write("dynamic_events", f"p:kgroup/kevent {T}:vfs_open file=$arg2", append=True)
    assert info.value.errno == errno.EEXIST
    fs.write("dynamic_events", "-:kgroup/kevent", append=True)
    assert fs.read("dynamic_events") == ""


@pytest.mark.parametrize("path", ["kprobe_events", "dynamic_events"])
def test_dynevent_limitations(fs: TraceFS, path: str) -> None:
    header = f"p {T}:vfs_read"
    test_string = header + "".join(f" \\{i}" for i in range(1, MAX_TRACE_ARGS + 1))
    fs.write(path, test_string, append=True)
    fs.write(path, "")
    with pytest.raises(TraceWriteError) as info:
        fs.write(path, f"{test_string} \\{MAX_TRACE_ARGS + 1}", append=True)
    assert info.value.errno == errno.EINVAL
    assert "Too many arguments are specified" in fs.read("error_log")


@pytest.mark.parametrize("command", [f"f:fpevent {PLACE}", f"f {PLACE}%return",
                                     "t:tpevent kfree ptr", "t kfree $arg*",
                                     "e:egroup/eevent syscalls/sys_enter_openat"])
def test_other_kinds_of_dynamic_event_are_unknown(fs: TraceFS, command: str) -> None:
    with pytest.raises(TraceWriteError) as info:
        fs.write("dynamic_events", command, append=True)
    assert info.value.errno == errno.EINVAL
    log = fs.read("error_log").splitlines()
    assert log[0].endswith("Probe definition must be started with 'p', 'r' or '-'")
    assert log[2] == " " * 11 + "^"
