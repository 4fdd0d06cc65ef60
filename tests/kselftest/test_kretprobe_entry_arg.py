"""Port of the kernel's test.d/kprobe/kretprobe_entry_arg.tc and dynevent/fprobe_entry_arg.tc:
a return event's `$arg1` is the value the entry event's `$arg1` saw, though the function
rebinds its parameter before it returns (targets.vfs_open does). fprobe_entry_arg.tc is the
same test on `f`/`f%return` events: pykprobes' function exit probe is `r` (or `p ...%return`),
which this port runs too. Every parameter reached by name (`$arg:NAME`, NAME, `$arg*`) is read
at entry as well; a local variable that is not a parameter is read at the exit."""

from __future__ import annotations

import threading

from pykprobes.trace.tracefs import TraceFS
from tests.kselftest import targets
from tests.kselftest.conftest import MakeModule, T, trace_args


def test_kretprobe_entry_arg(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:myevent1 {T}:vfs_open arg=$arg1", append=True)
    fs.write("kprobe_events", f"r:myevent2 {T}:vfs_open arg=$arg1", append=True)
    fs.write("events/pykprobes/enable", "1")
    targets.vfs_open("/dev/null", targets.File("f"))
    assert trace_args(fs, "myevent1") == trace_args(fs, "myevent2") == ['arg="/dev/null"']


def test_fprobe_entry_arg_as_a_return_suffix(fs: TraceFS) -> None:
    fs.write("dynamic_events", f"p:tests/myevent1 {T}:vfs_open arg=$arg1", append=True)
    fs.write("dynamic_events", f"p:tests/myevent2 {T}:vfs_open%return arg=$arg1", append=True)
    fs.write("events/tests/enable", "1")
    targets.vfs_open("/etc/hosts", targets.File("f"))
    assert trace_args(fs, "myevent1") == trace_args(fs, "myevent2") == ['arg="/etc/hosts"']


def test_every_way_to_name_a_parameter_reads_it_at_entry(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"r:ret/all {T}:vfs_open a=$arg:path b=path $arg* "
                              "name=file.name $retval")
    fs.write("events/ret/all/enable", "1")
    targets.vfs_open("/x", targets.File("ab"))
    (line,) = trace_args(fs, "all")
    assert line.startswith('a="/x" b="/x" path="/x" file=<File at 0x')
    assert line.endswith(' name="ab" retval=9')


def test_a_local_that_is_no_parameter_is_read_at_the_exit(fs: TraceFS,
                                                        make_module: MakeModule) -> None:
    make_module("entry_locals", """
        def f(n):
            total = n * 2
            n = -1
            return total
    """)
    fs.write("kprobe_events", "r:ret/loc entry_locals:f n total")
    fs.write("events/ret/loc/enable", "1")
    import entry_locals  # type: ignore[import-not-found]

    entry_locals.f(21)
    assert trace_args(fs, "loc") == ["n=21 total=42"]


def test_each_call_keeps_its_own_arguments(fs: TraceFS, make_module: MakeModule) -> None:
    make_module("entry_calls", """
        import threading
        def rec(n, barrier=None):
            if barrier is not None:
                barrier.wait(10)
            if n > 0:
                rec(n - 1)
            n = n + 100
            return n
    """)
    fs.write("kprobe_events", "r32:ret/rec entry_calls:rec $arg1 $retval")
    fs.write("events/ret/rec/enable", "1")
    import entry_calls  # type: ignore[import-not-found]

    barrier = threading.Barrier(2)
    thread = threading.Thread(target=entry_calls.rec, args=(10, barrier))
    thread.start()
    entry_calls.rec(2, barrier)
    thread.join(10)
    got = sorted(trace_args(fs, "rec"))
    want = sorted([f"arg1={n} retval={n + 100}" for n in range(3)] +
                  [f"arg1={n} retval={n + 100}" for n in range(11)])
    assert got == want
