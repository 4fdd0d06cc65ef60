"""Ports of the kernel's test.d/kprobe/ tests of fetch arguments: kprobe_args.tc,
kprobe_args_comm.tc, kprobe_args_string.tc, kprobe_args_syntax.tc, kprobe_args_type.tc and
kprobe_args_user.tc (its `(fault)` half).

Without a Python form:
- registers (`%ax`, `%di`) and memory (`@sym`, `@addr`, `+OFFS(...)`, `+u0(...)`, `:ustring`):
  a probe reads the probed frame's variables by name ($argN, NAME), and Python values by
  `.attr` and `[KEY]` steps; there is no address to read from, and no user/kernel split
  (kprobe_args_user.tc's first half, kprobe_args_symbol.tc whole: `@linux_proc_banner` is a
  global read by address; a module's globals are the locals of a probe on its `<module>`).
- kprobe_args_char.tc (`:char`, `:char[4]`): no char or array types; a str is recorded whole.
- kprobe_args_type.tc's widths and bitfield (`:s8`..`:u64`, `:b4@4/32`): a Python int has no
  width (`:int` never truncates); the port checks what it means here, that the `int` and `x`
  renderings of one value agree, for values of each width and negative ones.
- kprobe_args_syntax.tc's `$stack:string` and `%ax:string`, which the kernel refuses (a string
  needs memory): Python's `str` type renders any value (`$stack` is a depth), so they are
  accepted; `+0($stack)` (the kernel's stack slot) has none.
pykprobes names `$stack`, `$stack0` and a bare NAME after themselves where the kernel says
arg1, arg2 (docs/events.md); the kernel's own names still come from `NAME=`.
"""

from __future__ import annotations

import pytest

from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest import targets
from tests.kselftest.conftest import T, trace_args

FORK = f"{T}:kernel_clone"
PROBEFUNC = f"{T}:vfs_read"



def test_kprobe_args(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:testprobe {FORK} $stack $stack0 $stack1")
    (line,) = fs.read("kprobe_events").splitlines()
    assert line.endswith(" stack=$stack stack0=$stack0 stack1=$stack1")
    fs.write("events/pykprobes/testprobe/enable", "1")
    targets.kernel_clone(1)
    fs.write("events/pykprobes/testprobe/enable", "0")
    (args,) = trace_args(fs, "testprobe")
    depth, frame0, frame1 = (part.split("=", 1)[1] for part in args.split(" "))
    assert int(depth) > 2
    assert frame0 == FORK and frame1 == f"{__name__}:test_kprobe_args"
    fs.write("kprobe_events", "-:testprobe", append=True)
    assert fs.read("kprobe_events") == ""


def test_kprobe_args_comm(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:testprobe {FORK} comm=$comm ")
    assert "comm=$comm" in fs.read("kprobe_events")
    fs.write("events/pykprobes/testprobe/enable", "1")
    targets.kernel_clone(1)
    (args,) = trace_args(fs, "testprobe")
    assert args.startswith('comm="') and args.endswith('"')


def test_kprobe_args_string(fs: TraceFS) -> None:
    target = f"{T}:tracefs_create_dir"
    fs.write("kprobe_events", f"p:testprobe {target} arg1=name:string")
    fs.write("events/pykprobes/testprobe/enable", "1")
    targets.tracefs_create_dir("test")
    assert trace_args(fs, "testprobe") == ['arg1="test"']
    fs.write("events/pykprobes/testprobe/enable", "0")
    fs.write("kprobe_events", f"p:testprobe {target} arg1=name:string arg2=$arg1:string")
    fs.write("events/pykprobes/testprobe/enable", "1")
    targets.tracefs_create_dir("test")
    assert trace_args(fs, "testprobe")[-1] == 'arg1="test" arg2="test"'


GOOD_ARGS = [
    "$stack", "$stack0", "$stack1",  # stack access
    "$comm",  # comm access
    "file.name", "file.name[0]", 'file.__dict__["pos"]',  # indirect access, Python's
    "varname=file",  # name assignment
    "count:x",  # type syntax
    "$comm:string", "$stack:string", "count:string",  # combinations
]
BAD_ARGS = [
    "$stackp", "$stack0+10", "$stack1-10",
    "$retval",  # on a `p` event
    "file.", ".name", "file..name", "file.name(", "$comm.x",
    "varname=varname2=file",
    "count::x", "count:y16", "x16:count",
    "$comm:x",
]


@pytest.mark.parametrize("arg", GOOD_ARGS)
def test_kprobe_args_syntax_good(fs: TraceFS, arg: str) -> None:
    fs.write("kprobe_events", f"p {PROBEFUNC} {arg}")


@pytest.mark.parametrize("arg", BAD_ARGS)
def test_kprobe_args_syntax_bad(fs: TraceFS, arg: str) -> None:
    with pytest.raises(TraceWriteError):
        fs.write("kprobe_events", f"p {PROBEFUNC} {arg}")


def test_kprobe_args_syntax_retval(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"r {PROBEFUNC} $retval")
    with pytest.raises(TraceWriteError):
        fs.write("kprobe_events", f"p {PROBEFUNC} $retval")


@pytest.mark.parametrize("value", [2**63 - 1, 2**32 - 1, 2**31, 2**16 - 1, 2**8 - 1, 0x15,
                                   -1, -(2**63), 2**100])
def test_kprobe_args_type(fs: TraceFS, value: int) -> None:
    fs.write("kprobe_events", f"p:testprobe {FORK} d=$arg1:int h=$arg1:x n=flags:int flags")
    fs.write("events/pykprobes/testprobe/enable", "1")
    targets.kernel_clone(value)
    fs.write("events/pykprobes/testprobe/enable", "0")
    (args,) = trace_args(fs, "testprobe")
    decimal, hexadecimal, named, plain = (part.split("=", 1)[1] for part in args.split(" "))
    assert int(decimal) == int(hexadecimal, 16) == int(named) == int(plain) == value
    assert hexadecimal == (f"-0x{-value:x}" if value < 0 else f"0x{value:x}")


def test_kprobe_args_user_fault(fs: TraceFS) -> None:
    """What cannot be read is recorded as `(fault)`, never raised."""
    fs.write("kprobe_events", f"p:myevent {PROBEFUNC} path=file.nope path2=buf[99]")
    fs.write("events/pykprobes/myevent/enable", "1")
    targets.vfs_read(targets.File("f"), bytearray(2), 1, 0)
    assert trace_args(fs, "myevent") == ["path=(fault) path2=(fault)"]
