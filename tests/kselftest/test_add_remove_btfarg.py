"""Port of the kernel's test.d/dynevent/add_remove_btfarg.tc (and the `$arg*` rows of
kprobe_syntax_errors.tc, in test_kprobe_syntax_errors.py): arguments named by the function's
own parameters, and `$arg*`, every parameter. What BTF tells the kernel of a C function's
parameters, a Python code object tells of its own: positional (positional-only first),
keyword-only, `*args`, `**kwargs`, in that order (co_varnames), each field named after its
parameter.

Without a Python form: the `f:` (fprobe) and `t:` (tracepoint probe) halves: pykprobes has one
kind of function probe, `p` at the entry and `r` at the exit, which this port uses; and the
BTF field access (`$retval->name`, `p->se.group_node.next->prev`), which is Python's
`.attr` (test_kprobe_args.py). One difference of naming: with BTF the kernel names `$arg1`
after its parameter (`object=object`); pykprobes names it `arg1` (docs/events.md), and a
bare parameter name or `$arg*` gives the parameter's name.
"""

from __future__ import annotations

import errno
import importlib
import sys
import zipfile
from pathlib import Path

import pytest

from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest import targets
from tests.kselftest.conftest import MakeModule, T, trace_args

TP = f"{T}:kfree"



def test_add_remove_btfarg(fs: TraceFS) -> None:
    fs.write("dynamic_events", f"p:kpevent {TP} objp", append=True)
    assert f"kpevent {TP} objp=objp" in fs.read("dynamic_events")
    fs.write("dynamic_events", "")
    fs.write("dynamic_events", f"p:kpevent {TP} $arg*", append=True)
    assert f"kpevent {TP} objp=objp" in fs.read("dynamic_events")
    fs.write("dynamic_events", "")
    fs.write("dynamic_events", f"p:kpevent {TP} $arg1", append=True)
    assert f"kpevent {TP} arg1=$arg1" in fs.read("dynamic_events")


def test_every_kind_of_parameter(fs: TraceFS) -> None:
    target = f"{T}:with_every_kind"
    fs.write("kprobe_events", f"p:btf/entry {target} $arg*")
    fs.write("kprobe_events", f"r:btf/exit {target} $arg* $retval", append=True)
    listed = fs.read("kprobe_events").splitlines()
    assert listed == [f"p:btf/entry {target} a=a b=b c=c k=k args=args kw=kw",
                      f"r:btf/exit {target} a=a b=b c=c k=k args=args kw=kw retval=$retval"]
    assert fs.event("btf/entry").fields == ("a", "b", "c", "k", "args", "kw")
    fs.write("events/btf/enable", "1")
    assert targets.with_every_kind(1, 2, 3, 4, k=5, z=6) == 21
    entry, = trace_args(fs, "entry")
    assert entry.startswith("a=1 b=2 c=3 k=5 args=<tuple at 0x")
    exit_, = trace_args(fs, "exit")
    assert exit_.startswith("a=1 b=2 c=3 k=5 args=<tuple at 0x") and exit_.endswith(" retval=21")
    assert "kw=<dict at 0x" in exit_
    fmt = fs.read("events/btf/entry/format")
    assert all(f" {name};" in fmt for name in ("a", "b", "c", "k", "args", "kw"))


def test_the_other_arguments_are_named_among_the_expanded_ones(fs: TraceFS) -> None:
    target = f"{T}:vfs_read"
    fs.write("kprobe_events", f"p:btf/mixed {target} $arg* file.name \\7 count:x")
    assert fs.event("btf/mixed").fields == ("file", "buf", "count", "pos", "arg5", "arg6",
                                            "arg7")
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", f"p:btf/dup {target} count=\\1 $arg*", append=True)
    assert info.value.errno == errno.EINVAL
    assert fs.read("error_log").splitlines()[-2:] == [
        f"  Command: p:btf/dup {target} count=\\1 $arg*",
        " " * (11 + len(f"p:btf/dup {target} count=\\1 ")) + "^"]


def test_a_function_without_parameters_expands_to_nothing(fs: TraceFS,
                                                          make_module: MakeModule) -> None:
    make_module("btf_noargs", "def f():\n    return 1\n")
    fs.write("kprobe_events", "p:btf/none btf_noargs:f $arg* \\1")
    assert fs.event("btf/none").fields == ("arg1",)


def test_a_module_not_imported_yet_is_read_from_its_source(fs: TraceFS,
                                                            make_module: MakeModule) -> None:
    make_module("btf_later", "def f(alpha, *, beta=2):\n    return alpha + beta\n")
    fs.write("kprobe_events", "p:btf/later btf_later:f $arg*")
    assert "btf_later" not in sys.modules
    assert fs.read("kprobe_events") == "p:btf/later btf_later:f alpha=alpha beta=beta\n"
    fs.write("events/btf/later/enable", "1")
    mod = importlib.import_module("btf_later")
    mod.f(1, beta=5)
    assert trace_args(fs, "later") == ["alpha=1 beta=5"]


def test_a_module_whose_code_cannot_be_read_before_its_import(fs: TraceFS,
                                                              tmp_path: Path) -> None:
    """A module in a zip archive (zipimport: not a source or bytecode file loader) cannot
    be read before its import: `$arg*` there is the kernel's NO_BTF_ENTRY, while the rest of
    the definition waits for the import as before."""
    archive = tmp_path / "btfzip.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("btf_zipped.py", "def f(a):\n    return a\n")
    sys.path.insert(0, str(archive))
    try:
        with pytest.raises(TraceWriteError):
            fs.write("kprobe_events", "p:btf/zipped btf_zipped:f $arg*")
        assert "No BTF entry for this probe point" in fs.read("error_log")
        fs.write("kprobe_events", "p:btf/zipped btf_zipped:f a")
        fs.write("events/btf/zipped/enable", "1")
        importlib.import_module("btf_zipped").f(3)
        assert trace_args(fs, "zipped") == ["a=3"]
    finally:
        sys.path.remove(str(archive))
        sys.modules.pop("btf_zipped", None)


def test_too_many_parameters(fs: TraceFS, make_module: MakeModule) -> None:
    names = ", ".join(f"p{i}" for i in range(130))
    make_module("btf_wide", f"def f({names}):\n    return 0\n")
    with pytest.raises(TraceWriteError):
        fs.write("kprobe_events", "p:btf/wide btf_wide:f $arg*")
    assert "$arg* failed because the argument list is too long" in fs.read("error_log")
    fs.write("kprobe_events", "p:btf/wide btf_wide:f $arg128 p129")  # one by one: fine
