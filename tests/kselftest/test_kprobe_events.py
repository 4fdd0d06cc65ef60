"""Ports of the kernel's test.d/kprobe/ tests of defining, naming, listing and removing events:
add_and_remove.tc, busy_check.tc, profile.tc, kprobe_eventname.tc, kretprobe_args.tc,
kretprobe_maxactive.tc, kretprobe_return_suffix.tc, probepoint.tc, kprobe_non_uniq_symbol.tc
and uprobe_syntax_errors.tc (whose FILE:OFFSET is pykprobes' FILE.py:LINE).

Without a Python form:
- probepoint.tc's raw address (`p 0xffff...`): a Python function has no address a definition
  can name; its Python form is a source line (`FILE.py:LINE`), ported.
- probepoint.tc's "offset to the next symbol" (accepted by the kernel: the next function's
  first instruction): a Python function's offsets reach its own code only; such an offset is
  refused, as is a negative one and one past 32 bits (the kernel's two refusals).
- kprobe_eventname.tc's `.isra.` "dot functions" (compiler clones): their Python form is the
  dotted qualname of a nested function, `outer.<locals>.inner`, named as the kernel names a
  dot function (every character outside [A-Za-z0-9_] is `_`).
- uprobe_syntax_errors.tc's reference-counter rows (BAD_REFCNT, REFCNT_OPEN_BRACE,
  BAD_REFCNT_SUFFIX: the SDT semaphores of a binary) and its memory fetch rows (BAD_FILE_OFFS
  `@+ab`, SYM_ON_UPROBE `@symbol`): no semaphores, no memory addresses; the memory fetches
  are refused as bad fetchargs at the same column. The kernel's error_log names
  `trace_uprobe` there; pykprobes' line targets are kprobe events (`trace_kprobe`).
"""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest import targets
from tests.kselftest.conftest import MakeModule, T

FORK = f"{T}:kernel_clone"


def _events(fs: TraceFS) -> list[str]:
    return fs.read("kprobe_events").splitlines()


def _fails(fs: TraceFS, command: str) -> TraceWriteError:
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", command)
    return info.value


def test_add_and_remove(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:myevent {FORK}")
    assert any("myevent" in line for line in _events(fs))
    assert fs.read("events/pykprobes/myevent/enable") == "0\n"
    fs.write("kprobe_events", "")
    assert _events(fs) == []


def test_busy_check(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:myevent {FORK}")
    fs.write("events/pykprobes/myevent/enable", "1")
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", "")  # this must fail
    assert info.value.errno == errno.EBUSY
    fs.write("events/pykprobes/myevent/enable", "0")
    fs.write("kprobe_events", "")  # this must succeed
    assert _events(fs) == []


def test_profile(fs: TraceFS) -> None:
    assert "myevent" not in fs.read("kprobe_profile")
    fs.write("kprobe_events", f"p:myevent {FORK}")
    assert fs.read("kprobe_profile").split() == ["myevent", "0", "0"]
    fs.write("events/pykprobes/myevent/enable", "1")
    targets.kernel_clone(1)
    assert fs.read("kprobe_profile").split() == ["myevent", "1", "0"]
    fs.write("events/pykprobes/myevent/enable", "0")
    fs.write("kprobe_events", "")
    assert "myevent" not in fs.read("kprobe_profile")


def test_kprobe_eventname(fs: TraceFS) -> None:
    func = f"{T}:vfs_read"
    fs.write("kprobe_events", f"p {func}")
    probe_name = func.replace(".", "_").replace(":", "_")
    assert fs.read(f"events/pykprobes/p_{probe_name}_0/enable") == "0\n"
    fs.write("kprobe_events", f"p:event1 {func}")
    assert fs.read("events/pykprobes/event1/enable") == "0\n"
    fs.write("kprobe_events", f"p:kprobes2/event2 {func}")
    assert fs.read("events/kprobes2/event2/enable") == "0\n"
    # "Dot functions": a nested function's qualname.
    func = f"{T}:outer.<locals>.inner"
    fs.write("kprobe_events", f"p {func}")
    event = next(line for line in _events(fs) if func in line).split()[0].split(":", 1)[1]
    assert event == "pykprobes/p_tests_kselftest_targets_outer__locals__inner_0"
    assert fs.read(f"events/{event}/enable") == "0\n"


def test_kretprobe_args(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"r:testprobe2 {FORK} $retval")
    assert _events(fs) == [f"r:pykprobes/testprobe2 {FORK} retval=$retval"]
    fs.write("events/pykprobes/testprobe2/enable", "1")
    targets.kernel_clone(4, 5)
    fs.write("events/pykprobes/testprobe2/enable", "0")
    (line,) = [line for line in fs.read("trace").splitlines() if "testprobe2" in line]
    assert f"testprobe2: ({FORK} <- {__name__}:test_kretprobe_args) retval=9" in line
    fs.write("kprobe_events", "-:testprobe2", append=True)
    with pytest.raises(TraceWriteError):
        fs.read("events/pykprobes/testprobe2/enable")


def test_kretprobe_maxactive(fs: TraceFS) -> None:
    # Rejects unknown commands, too big a maxactive and unparsable numbers.
    for bad in (f"a:myprobeaccept {FORK}", f"r1000000:myprobeaccept {FORK}",
                f"r10fuzz:myprobeaccept {FORK}"):
        assert _fails(fs, bad).errno == errno.EINVAL
    # With an event name, without and with maxactive.
    for head in ("r", "r10"):
        fs.write("kprobe_events", f"{head}:myprobeaccept {FORK}")
        assert _events(fs) == [f"{head}:pykprobes/myprobeaccept {FORK}"]
        fs.write("kprobe_events", "-:myprobeaccept", append=True)
    # Without an event name.
    for head in ("r", "r10"):
        fs.write("kprobe_events", f"{head} {FORK}")
        (line,) = _events(fs)
        assert line.startswith(f"{head}:pykprobes/r_") and line.endswith(FORK)
        fs.write("kprobe_events", "")


def test_kretprobe_return_suffix(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"r:myprobeaccept {T}:vfs_read")
    result1 = fs.read("kprobe_events")
    fs.write("kprobe_events", f"p:myprobeaccept {T}:vfs_read%return")
    result2 = fs.read("kprobe_events")
    assert result1 == result2 == f"r:pykprobes/myprobeaccept {T}:vfs_read\n"


def test_probepoint(fs: TraceFS) -> None:
    target_func = f"{T}:tracefs_create_dir"
    code = targets.tracefs_create_dir.__code__
    last = max(offset for offset, _ in _instructions(code))
    fs.write("kprobe_events", f"p:testprobe {target_func}")
    # A source line is Python's address: the body's first line.
    line = code.co_firstlineno + 1
    fs.write("kprobe_events", f"p:testprobe {code.co_filename}:{line}")
    fs.write("kprobe_events", f"p:testprobe {target_func}+{last}")
    fs.write("events/pykprobes/testprobe/enable", "1")
    assert targets.tracefs_create_dir("d") == "d"
    assert fs.event("pykprobes/testprobe").hits == 1
    fs.write("events/pykprobes/testprobe/enable", "0")
    # Past the function's code, negative, past 32 bits.
    assert _fails(fs, f"p:testprobe {target_func}+{last + 2}").errno == errno.EINVAL
    assert _fails(fs, f"p:testprobe {target_func}-4").errno == errno.EINVAL
    assert _fails(fs, f"p:testprobe {target_func}+0x100000000").errno == errno.EINVAL


def _instructions(code: object) -> list[tuple[int, str]]:
    import dis

    return [(i.offset, i.opname) for i in dis.get_instructions(code)]  # type: ignore[arg-type]


def test_kprobe_non_uniq_symbol(fs: TraceFS) -> None:
    error = _fails(fs, f"p:test_non_unique {T}:<lambda>")
    assert error.errno == errno.EADDRNOTAVAIL
    assert "trace_kprobe: error: The symbol is not unique" in fs.read("error_log")


def test_check_refuses_a_non_unique_symbol_before_the_import(make_module: MakeModule,
                                                             tmp_path: Path) -> None:
    """`pykprobes check` resolves as registration will at the import: in a module that is not
    imported, two lambdas share their qualname; the check fails with registration's message
    and imports nothing."""
    make_module("nonuniq", "a = lambda q: q\nb = lambda q: q + 1\nprint('imported!')\n")
    res = subprocess.run(
        [sys.executable, "-m", "pykprobes", "check", "p:t/a nonuniq:<lambda>", "p:t/b nonuniq:b"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert "imported!" not in res.stdout + res.stderr
    assert "pykprobes: error: The symbol is not unique" in res.stderr
    assert "  p:t/a nonuniq:<lambda>\n        ^" in res.stderr
    # Before the import a function is found by its qualname, as the import will find it
    # (module_code_loaded): `b` is a name bound to a lambda, not a qualname.
    assert "Invalid probed address or symbol" in res.stderr


def test_uprobe_syntax_errors(fs: TraceFS, tmp_path: Path) -> None:
    (tmp_path / "dir.py").mkdir()
    script = tmp_path / "prog.py"
    script.write_text("x = 1\n")
    rows = [
        (f"p ^{tmp_path}/non_exist_file.py:100", "Failed to find the given file"),
        (f"p ^{tmp_path}/dir.py:100", "Not a regular file"),
        (f"p {script}:^10a", "Invalid line number"),
        (f"p {script}:1 ^@+ab", "Invalid fetch argument"),
        (f"p {script}:1 ^@symbol", "Invalid fetch argument"),
    ]
    for command, message in rows:
        text, pos = command.replace("^", ""), command.index("^")
        fs.write("error_log", "")
        # trace_uprobe.c returns kern_path()'s -ENOENT with FILE_NOT_FOUND, else -EINVAL.
        want = errno.ENOENT if message == "Failed to find the given file" else errno.EINVAL
        assert _fails(fs, text).errno == want
        log = fs.read("error_log").splitlines(keepends=True)
        assert log[0].rstrip().endswith(f"trace_kprobe: error: {message}"), log
        assert len(log[-1]) == 13 + pos, log


def test_a_gone_event_can_be_enabled(fs: TraceFS, make_module: MakeModule) -> None:
    """kprobe_module.tc's "Target is gone, but we can prepare for next time", with the
    kprobes GONE flag seen: enabling skips the gone probes (the kernel's enable_trace_kprobe)."""
    make_module("gone_mod", "def f():\n    return 1\n")
    import gone_mod  # type: ignore[import-not-found]

    fs.write("kprobe_events", "p:g/f gone_mod:f")
    del sys.modules["gone_mod"]
    assert "[GONE]" in kp.list_kprobes()
    fs.write("events/g/f/enable", "1")
    assert fs.read("events/g/f/enable") == "1\n"
    assert gone_mod.f() == 1
