"""Early probes reach the standard library modules the boot stage itself imports or runs
(issue 16, item 12): re, functools, collections, contextlib, enum, typing, textwrap, os.path.
The early machinery's own calls into them are not recorded (kprobe_busy: they count
nmissed); only the program's are. What stays out of reach while early is the import
machinery and pykprobes' own dependencies (core/blacklist.py, core/early_kprobes.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.boot.conftest import run, trace_lines, warnings_of, write

PROGRAM = """
    import target_mod                       # the first target import: the rewrite arch loads
    target_mod.f(1)
    import collections, contextlib, functools, os, re, textwrap
    re.compile("a+b")
    functools.wraps(len)
    textwrap.dedent("  x")
    collections.namedtuple("P", "x y")
    contextlib.contextmanager(lambda: iter([1]))
    os.path.realpath("r1")
"""

EVENTS = ";".join([
    "p:e/f target_mod:f x",
    "p:e/re re:compile pattern",
    "p:e/wraps functools:wraps",
    "p:e/dedent textwrap:dedent text",
    "p:e/nt collections:namedtuple typename",
    "p:e/cm contextlib:contextmanager",
    # the boot stage and the module notifier call these themselves
    "p:e/rp posixpath:realpath path=$arg1",
    "p:e/enum enum:EnumType.__call__",
])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write(tmp_path / "target_mod.py", "def f(x):\n    return x\n")
    write(tmp_path / "main.py", PROGRAM)
    return tmp_path


def test_early_probes_reach_what_the_boot_stage_imports(project: Path) -> None:
    # A line target resolved after the realpath probe is armed: its resolution calls
    # realpath (the machinery's), as the module notifier does at the import.
    events = EVENTS + f";p:e/line {project / 'target_mod.py'}:2 x"
    res = run(["main.py"], events=events, cwd=project)
    assert res.returncode == 0, res.stderr
    assert warnings_of(res.stderr) == [], res.stderr
    lines = trace_lines(res.stderr)
    by_event: dict[str, list[str]] = {}
    for m in lines:
        by_event.setdefault(m["event"], []).append(m["args"])
    assert by_event["f"] == [" x=1"] and by_event["line"] == [" x=1"]
    assert by_event["re"][-1] == ' pattern="a+b"'
    assert by_event["wraps"] == ["", ""]  # the program's, and contextmanager's own
    assert by_event["cm"] == [""]
    assert by_event["dedent"] == [' text="  x"']
    assert by_event["nt"] == [' typename="P"']
    assert by_event["rp"] == [' path="r1"'], "the machinery's own realpath calls recorded"
    # enum: the rewrite arch (bytecode) calls it while loading and rewriting, at the import
    # of target_mod, before f(1): none of those calls is the program's.
    first_f = next(i for i, m in enumerate(lines) if m["event"] == "f")
    import_time = [m for m in lines[:first_f] if m["event"] == "enum"]
    assert import_time == [], "the rewrite arch's enum calls recorded"


def test_a_probe_on_a_module_the_optimizer_imports_waits_no_more(project: Path) -> None:
    """re (3.13+), inspect, dataclasses...: imported by the rewrite arch itself; an early
    probe on one of them loads the arch at registration, then probes the module in place."""
    events = "p:e/re re:compile pattern;p:e/sig inspect:signature"
    write(project / "main.py", """
        import inspect, re
        re.compile("zz")
        inspect.signature(len)
    """)
    res = run(["main.py"], events=events, cwd=project)
    assert res.returncode == 0 and warnings_of(res.stderr) == [], res.stderr
    lines = trace_lines(res.stderr)
    assert ' pattern="zz"' in [m["args"] for m in lines if m["event"] == "re"]
    assert [m["event"] for m in lines].count("sig") == 1


def test_the_import_machinery_stays_out_of_reach_while_early(project: Path) -> None:
    res = run(["main.py"], events="p:e/z zipimport:zipimporter.get_code;"
                                   "p:e/i importlib:import_module", cwd=project)
    assert res.returncode == 0
    warned = warnings_of(res.stderr)
    assert len(warned) == 2 and all("cannot probe" in w for w in warned), res.stderr


def test_the_lazy_path_reaches_import_time_code_without_a_heap_walk(tmp_path: Path) -> None:
    """Early probes only on modules not imported at start-up (boot/lazy.py): the stage runs
    at the first import of the target, before its body, so the call its body makes is
    hit; its code is rewritten before any function holds it, so no heap walk is needed."""
    write(tmp_path / "lazy_pkg" / "__init__.py", "")
    write(tmp_path / "lazy_pkg" / "mod.py", """
        def f(x):
            return x

        def make(k):
            def add(x):
                return x + k
            return add

        AT_IMPORT = f(7)
    """)
    write(tmp_path / "main.py", """
        import gc, sys
        walks = []
        real = gc.get_referrers
        gc.get_referrers = lambda *objs: walks.append(1) or real(*objs)
        assert "pykprobes.core" not in sys.modules
        from lazy_pkg import mod
        assert mod.make(1)(2) == 3
        print("walks", len(walks))
    """)
    events = "p:e/f lazy_pkg.mod:f x;p:e/add lazy_pkg.mod:make.<locals>.add x"
    res = run(["main.py"], events=events, cwd=tmp_path)
    assert res.returncode == 0 and warnings_of(res.stderr) == [], res.stderr
    assert res.stdout.split() == ["walks", "0"]
    assert [(m["event"], m["args"]) for m in trace_lines(res.stderr)] == [
        ("f", " x=7"), ("add", " x=2")]
