"""PYKPROBES_EVENTS at interpreter start-up: events from top-level and import-time code,
recorded before the program's first line, in order; bad definitions warn and change
nothing else; where the early events go."""

from __future__ import annotations

import dis
from pathlib import Path

import pytest

from pykprobes import insn
from tests.boot.conftest import run, trace_lines, warnings_of, write

MOD = """
VALUE = 41
VALUE += 1

def f(x):
    return x + 1

RESULT = f(VALUE)
"""


def _line_offset(path: Path, line: int) -> int:
    """The offset of the first instruction of `line` in the module's code (this interpreter
    is the child's, so its bytecode is the child's)."""
    code = compile(path.read_text(), str(path), "exec")
    return next(i.offset for i in dis.get_instructions(code)
                if i.positions is not None and i.positions.lineno == line)


def _body_offset(path: Path, name: str) -> int:
    """The offset of the instruction after RESUME in the module's function `name`: 2, but 4
    on 3.15 (its RESUME has a CACHE entry)."""
    module = compile(path.read_text(), str(path), "exec")
    code = next(c for c in module.co_consts if getattr(c, "co_name", None) == name)
    insns = insn.decode(code)
    return insns[insn.entry_index(insns) + 1].start


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """pkg/ whose __init__ imports a standard-library module that is not imported at
    start-up (email.policy, which calls EmailPolicy.__init__ once, at its import) and
    pkg.mod; pkg/__main__.py is the program of `python -m pkg`."""
    write(tmp_path / "pkg" / "__init__.py", """
        import email.policy
        from pkg import mod
    """)
    write(tmp_path / "pkg" / "mod.py", MOD)
    write(tmp_path / "pkg" / "__main__.py", """
        import sys
        from pkg import mod
        print("first line of __main__ ran after", len(sys.argv) - 1, "arguments")
        print(mod.f(1), mod.RESULT)
        sys.exit(mod.f(2))
    """)
    return tmp_path


def test_module_top_level_and_stdlib_import_time_code_before_main(project: Path) -> None:
    top = _line_offset(project / "pkg" / "mod.py", 2)
    events = ";".join([
        f"p:boot/top pkg.mod:<module>+{top} value=VALUE",
        "p:boot/policy email.policy:EmailPolicy.__init__ kw:len",
        "p:boot/main __main__:<module>",
        "p:boot/f pkg.mod:f x",
    ])
    plain = run(["-m", "pkg", "a", "b"], cwd=project)
    traced = run(["-m", "pkg", "a", "b"], events=events, cwd=project)
    assert traced.returncode == plain.returncode == 3, traced.stderr
    assert traced.stdout == plain.stdout == "first line of __main__ ran after 2 arguments\n2 43\n"
    assert warnings_of(traced.stderr) == []
    lines = trace_lines(traced.stderr)
    seen = [(m["event"], m["probe"], m["args"]) for m in lines]
    assert seen == [
        # pkg/__init__.py: `import email.policy`, whose body calls EmailPolicy.__init__ once
        ("policy", "email.policy:EmailPolicy.__init__+0", " kw=0"),
        # then `from pkg import mod`: its second line, and the call its last line makes
        ("top", f"pkg.mod:<module>+{top}", " value=41"),
        ("f", "pkg.mod:f+0", " x=42"),
        # only then the first line of __main__ (pkg/__main__.py)
        ("main", "__main__:<module>+0", ""),
        ("f", "pkg.mod:f+0", " x=1"),
        ("f", "pkg.mod:f+0", " x=2"),
    ]
    stamps = [float(m["ts"]) for m in lines]
    assert stamps == sorted(stamps)
    assert len({m["tid"] for m in lines}) == 1


def test_script_and_command(project: Path) -> None:
    write(project / "main.py", """
        import email.policy
        import pkg.mod
        print(pkg.mod.f(5))
    """)
    events = "p:boot/main __main__:<module>;p:boot/policy email.policy:EmailPolicy.__init__"
    for args in (["main.py"], ["-c", "import email.policy, pkg.mod; print(pkg.mod.f(5))"]):
        traced = run(args, events=events, cwd=project)
        assert traced.returncode == 0, traced.stderr
        assert traced.stdout == "6\n"
        assert [m["event"] for m in trace_lines(traced.stderr)] == ["main", "policy"]


def test_bad_definitions_warn_once_each_and_change_nothing_else(project: Path) -> None:
    events = ";".join([
        "p:boot/ok pkg.mod:f x",
        "q:boot/bad pkg.mod:f",  # not p, r or -
        "p:boot/nomod no_such_module_zz:f",
        "p:boot/offs pkg.mod:f+1",  # inside an instruction
        "p:boot/type pkg.mod:f x:wat",
        "p:boot/ok pkg.mod:f",  # appended to boot/ok, without its argument
        "p:boot/black pykprobes.core.registry:register_kprobe",
        "",  # empty definitions are skipped, as the kernel skips them
        "-:boot/never_defined",
    ])
    plain = run(["-m", "pkg"], cwd=project)
    traced = run(["-m", "pkg"], events=events, cwd=project)
    assert traced.returncode == plain.returncode == 3
    assert traced.stdout == plain.stdout
    assert "Traceback" not in traced.stderr
    warnings = warnings_of(traced.stderr)
    assert len(warnings) == 7, traced.stderr
    assert all(w.startswith("pykprobes: Failed to add event(-") for w in warnings)
    reasons = "\n".join(warnings)
    assert "Failed to add event(-22): q:boot/bad pkg.mod:f (Probe definition must be " \
           "started with 'p', 'r' or '-'" in reasons
    assert "Failed to add event(-2): p:boot/nomod no_such_module_zz:f" in reasons
    assert "(-17): p:boot/ok pkg.mod:f (Argument type or name is different from " \
           "existing probe" in reasons
    assert "Unknown type is specified" in reasons
    assert "pykprobes itself" in reasons
    assert "(-2): -:boot/never_defined" in reasons
    # The offset is checked when pkg.mod is imported (the probe waited for it): GONE, and a
    # warning of the module notifier then, not at start-up.
    assert [m["args"] for m in trace_lines(traced.stderr)] == [" x=42", " x=1", " x=2"]


def test_removal_and_commas_as_in_the_kernel(project: Path) -> None:
    events = "p:boot/a,pkg.mod:f,x;p:boot/b,pkg.mod:f;-:boot/b"
    traced = run(["-m", "pkg"], events=events, cwd=project)
    assert traced.returncode == 3 and warnings_of(traced.stderr) == []
    assert {m["event"] for m in trace_lines(traced.stderr)} == {"a"}


def test_multiprobe_and_arg_star_at_boot(project: Path) -> None:
    """As kprobe_event= does: a second definition of a name appends a probe point, a group
    removal removes the group, and `$arg*` expands from the module's source before Python
    has put the program's directory on sys.path."""
    inside = _body_offset(project / "pkg" / "mod.py", "f")
    events = (f"p:boot/m,pkg.mod:f,$arg*;p:boot/m,pkg.mod:f+{inside},x;"
              "r:other/r,pkg.mod:f,$arg*;-:other/")
    traced = run(["-m", "pkg"], events=events, cwd=project)
    assert traced.returncode == 3 and warnings_of(traced.stderr) == [], traced.stderr
    lines = trace_lines(traced.stderr)
    assert {m["event"] for m in lines} == {"m"}
    assert {m["probe"] for m in lines} == {"pkg.mod:f+0", f"pkg.mod:f+{inside}"}
    assert all(m["args"].startswith(" x=") for m in lines)


def test_output_file_is_appended_by_each_process(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "early.trace"
    env = {"PYKPROBES_OUTPUT": str(out)}
    for _ in range(2):
        traced = run(["-m", "pkg"], events="p:boot/f pkg.mod:f x", cwd=project, env=env)
        assert traced.returncode == 3
        assert trace_lines(traced.stderr) == [] and traced.stderr == ""
    lines = trace_lines(out.read_text())
    assert [m["args"] for m in lines] == [" x=42", " x=1", " x=2"] * 2
    assert len({m["tid"] for m in lines}) == 2


def test_early_buffer_overflow_is_counted_and_reported(project: Path) -> None:
    write(project / "loop.py", """
        from pkg import mod
        for i in range(100):
            mod.f(i)
    """)
    traced = run(["loop.py"], events="p:boot/f pkg.mod:f x", cwd=project,
                 env={"PYKPROBES_EARLY_BUFFER": "10"})
    assert traced.returncode == 0
    lines = traced.stderr.splitlines()
    assert [m["args"] for m in trace_lines(traced.stderr)] == \
        [" x=42", *(f" x={i}" for i in range(9))]
    # 101 hits, 10 kept: the other 91 are reported where they were lost, at the end.
    assert lines[-1] == "CPU:0 [LOST 91 EVENTS]"


@pytest.mark.parametrize(("name", "value"), [
    ("PYKPROBES_EARLY_SLOTS", "0"),
    ("PYKPROBES_EARLY_SLOTS", "65"),
    ("PYKPROBES_EARLY_SLOTS", "many"),
    ("PYKPROBES_EARLY_BUFFER", "-1"),
])
def test_out_of_range_settings_warn_and_use_the_default(project: Path, name: str,
                                                        value: str) -> None:
    code = ("from pykprobes.boot import stage; s = stage.status(); "
            "print(s['slots'], s['buffer_capacity'])")
    traced = run(["-c", code], events="p:boot/f pkg.mod:f x", cwd=project,
                 env={name: value})
    assert traced.returncode == 0
    assert traced.stdout == "16 16384\n"
    assert warnings_of(traced.stderr) == [
        f"pykprobes: {name}={value!r} is not a number in "
        f"{'1..64' if 'SLOTS' in name else '1..1048576'}: using "
        f"{16 if 'SLOTS' in name else 16384}"]


def test_in_range_settings_are_taken(project: Path) -> None:
    code = ("from pykprobes.boot import stage; s = stage.status(); "
            "print(s['slots'], s['free_slots'], s['buffer_capacity'], s['early'])")
    traced = run(["-c", code], events="p:boot/f pkg.mod:f x", cwd=project,
                 env={"PYKPROBES_EARLY_SLOTS": "64", "PYKPROBES_EARLY_BUFFER": "7"})
    assert traced.stdout == "64 63 7 True\n" and traced.stderr == ""


def test_line_targets_in_the_script_and_beside_it(tmp_path: Path) -> None:
    """`FILE:LINE` at start-up: the script's own top-level loop (a line of `__main__`) and a
    line of a module beside it, both not imported yet (the boot stage resolves them against
    the sys.path the program will have)."""
    write(tmp_path / "main.py", """
        total = 0
        for i in range(3):
            total += i
        import lib.helper
        print(total, lib.helper.h(5))
    """)
    write(tmp_path / "lib" / "__init__.py", "")
    write(tmp_path / "lib" / "helper.py", """
        def h(a):
            b = a * 2
            return b
        X = h(1)
    """)
    events = "p:boot/loop main.py:3 i total;p:boot/h lib/helper.py:3 b"
    for args in (["main.py"], ["-m", "main"]):
        traced = run(args, events=events, cwd=tmp_path)
        assert traced.returncode == 0, traced.stderr
        assert traced.stdout == "3 10\n" and warnings_of(traced.stderr) == []
        assert [(m["event"], m["args"]) for m in trace_lines(traced.stderr)] == [
            ("loop", " i=0 total=0"), ("loop", " i=1 total=0"), ("loop", " i=2 total=1"),
            ("h", " b=2"), ("h", " b=10")]


def test_boot_refuses_a_definition_as_the_tracefs_file_does(tmp_path: Path) -> None:
    """The boot stage registers through the tracefs file's entry (the kernel's kprobe_event=
    and kprobe_events both go through trace_kprobe_create()): the same bad definitions fail
    with the same errno and message at start-up as written to kprobe_events."""
    import errno

    from pykprobes.trace.tracefs import TraceFS, TraceWriteError

    missing = tmp_path / "missing.py"
    bad = [
        "p:boot/same json:dumps",
        "r:boot/same json:loads",  # another kind of probe for an existing event
        f"p:boot/nofile {missing}:3",
    ]
    write(tmp_path / "main.py", "print('ran')\n")
    traced = run(["main.py"], events=";".join(bad), cwd=tmp_path)
    assert traced.returncode == 0 and traced.stdout == "ran\n", traced.stderr
    fs = TraceFS()
    expected = []
    try:
        fs.define(bad[0])
        for text in bad[1:]:
            with pytest.raises(TraceWriteError) as caught:
                fs.define(text)
            assert caught.value.code is not None and caught.value.pos is not None
            message = str(caught.value.args[0]).splitlines()[0]
            expected.append(f"pykprobes: Failed to add event(-{caught.value.errno}): {text} "
                            f"({message} (column {caught.value.pos}))")
    finally:
        fs.clear()
    assert [e.split("(")[1].split(")")[0] for e in expected] == \
        [f"-{errno.EEXIST}", f"-{errno.ENOENT}"]
    assert warnings_of(traced.stderr) == expected
