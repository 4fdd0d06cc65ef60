"""Early probes on `__main__` (boot/mainhook.py): the program's code is rewritten before its
first line runs, for a script, -c, -m and a directory; and it behaves as the program does
without probes: output, exit status, tracebacks, sys.argv, sys.path[0], __file__."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.boot.conftest import run, trace_lines, warnings_of, write

PROGRAM = """
import os, sys

def work(n):
    return n * 2

print(work(int(sys.argv[1])), sys.argv[1:], __name__,
      sys.path[0] == os.path.dirname(os.path.abspath(__file__)) or sys.path[0],
      sys.modules["__main__"].__dict__ is globals())
sys.exit(int(sys.argv[2]))
"""

EVENTS = "p:boot/top __main__:<module>;p:boot/work __main__:work n"


def _same_run(args: list[str], cwd: Path, expect_rc: int) -> tuple[str, str]:
    plain = run(args, cwd=cwd)
    traced = run(args, events=EVENTS, cwd=cwd)
    assert traced.returncode == plain.returncode == expect_rc, traced.stderr
    assert traced.stdout == plain.stdout
    assert warnings_of(traced.stderr) == []
    return traced.stdout, traced.stderr


def test_script(tmp_path: Path) -> None:
    write(tmp_path / "prog.py", PROGRAM)
    out, err = _same_run(["prog.py", "21", "4"], tmp_path, 4)
    assert out == "42 ['21', '4'] __main__ True True\n"
    assert [(m["event"], m["args"]) for m in trace_lines(err)] == \
        [("top", ""), ("work", " n=21")]


def test_module_and_directory(tmp_path: Path) -> None:
    write(tmp_path / "app" / "__init__.py", "")
    write(tmp_path / "app" / "__main__.py", PROGRAM)
    out, err = _same_run(["-m", "app", "5", "0"], tmp_path, 0)
    assert out.startswith("10 ['5', '0'] __main__ ")
    assert [m["event"] for m in trace_lines(err)] == ["top", "work"]
    # A directory with __main__.py runs through runpy as -m does.
    out, err = _same_run([str(tmp_path / "app"), "6", "1"], tmp_path, 1)
    assert out.startswith("12 ['6', '1'] __main__ ")
    assert [m["event"] for m in trace_lines(err)] == ["top", "work"]


def test_command(tmp_path: Path) -> None:
    code = "def work(n):\n    return n * 2\nprint(work(3))"
    plain = run(["-c", code], cwd=tmp_path)
    traced = run(["-c", code], events=EVENTS, cwd=tmp_path)
    assert traced.stdout == plain.stdout == "6\n" and traced.returncode == 0
    assert [(m["event"], m["probe"]) for m in trace_lines(traced.stderr)] == \
        [("top", "__main__:<module>+0"), ("work", "__main__:work+0")]


BOOM = """
import sys

def fail(kind):
    if kind == "value":
        raise ValueError("boom")
    if kind == "exit-text":
        sys.exit("bye")
    raise KeyboardInterrupt

fail(sys.argv[1])
"""


@pytest.mark.parametrize(("kind", "rc"), [
    ("value", 1), ("exit-text", 1), ("interrupt", -signal.SIGINT)])
@pytest.mark.parametrize("how", ["script", "module"])
def test_uncaught_exceptions_end_as_python_ends(tmp_path: Path, kind: str, rc: int,
                                                 how: str) -> None:
    if how == "script":
        write(tmp_path / "boom.py", BOOM)
        args = ["boom.py", kind]
    else:
        write(tmp_path / "boompkg" / "__init__.py", "")
        write(tmp_path / "boompkg" / "__main__.py", BOOM)
        args = ["-m", "boompkg", kind]
    plain = run(args, cwd=tmp_path)
    traced = run(args, events="p:boot/fail __main__:fail kind", cwd=tmp_path)
    assert traced.returncode == plain.returncode == rc
    assert traced.stdout == plain.stdout == ""
    # The same text, runpy's frames included for -m, then the early event at exit.
    lines = traced.stderr.splitlines()
    assert [m["args"] for m in trace_lines(traced.stderr)] == [f' kind="{kind}"']
    assert "\n".join(ln for ln in lines if not trace_lines(ln)) == plain.stderr.rstrip("\n")


def test_interactive_and_stdin_are_left_alone(tmp_path: Path) -> None:
    traced = run(["-"], events=EVENTS, cwd=tmp_path, stdin="def work(n):\n    return n\n"
                 "print(work(7))\n")
    assert traced.returncode == 0 and traced.stdout == "7\n"
    assert trace_lines(traced.stderr) == []  # not covered: the probes stay pending


def test_pykprobes_own_command_line_is_not_taken_over(tmp_path: Path) -> None:
    write(tmp_path / "prog.py", "def work(n):\n    return n\nprint(work(9))\n")
    traced = run(["-m", "pykprobes", "run", "--", "prog.py"], events=EVENTS, cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == "9\n"
    # `pykprobes run` hands its program to the core, which arms the early __main__ probes
    # (converted by run's init_kprobes()) on the program, not on pykprobes' __main__.
    assert [(m["event"], m["args"]) for m in trace_lines(traced.stderr)] == \
        [("top", ""), ("work", " n=9")]


@pytest.mark.skipif(sys.flags.inspect, reason="not under -i")
def test_program_converting_itself_is_traced_by_the_breakpoint_arch(tmp_path: Path) -> None:
    """The program runs inside the audit hook's call: tracing must reach it (the hook is
    __cantrace__), so that after init_kprobes() and set_optimization(False) the breakpoint
    arch still serves its probes."""
    write(tmp_path / "prog.py", """
        import pykprobes as kp

        def work(n):
            return n

        kp.init_kprobes()
        kp.set_optimization(False)
        for i in range(5):
            work(i)
        from pykprobes.trace.tracefs import tracefs
        fs = tracefs()
        print([r[4] for r in fs.buffer.snapshot() if r[3].name == "work"],
              fs.event("boot/work").probes[0].flags & 4)
    """)
    traced = run(["prog.py"], events=EVENTS, cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == "[(0,), (1,), (2,), (3,), (4,)] 0\n"


def test_a_boot_event_switches_off_and_on_after_the_conversion(tmp_path: Path) -> None:
    """A boot event is enabled with its probes armed (early probes are registered enabled):
    disabling it after the conversion disarms them, enabling it arms them again."""
    write(tmp_path / "prog.py", """
        import pykprobes as kp

        def work(n):
            return n

        kp.init_kprobes()
        from pykprobes.trace.tracefs import tracefs
        fs = tracefs()
        event = fs.event("boot/work")
        probe = event.probes[0]
        work(1)
        fs.write("events/boot/work/enable", "0")
        work(2)
        off = bool(probe.flags & kp.KPROBE_FLAG_DISABLED)
        fs.write("events/boot/work/enable", "1")
        work(3)
        print([r[4] for r in fs.buffer.snapshot() if r[3].name == "work"], off,
              bool(probe.flags & kp.KPROBE_FLAG_DISABLED), event.hits)
    """)
    traced = run(["prog.py"], events=EVENTS, cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == "[(1,), (3,)] True False 2\n"
