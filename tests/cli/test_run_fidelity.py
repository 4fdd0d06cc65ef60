"""`pykprobes run` runs the program as `python` does, where a program can tell (issue 16,
item 6), and its writer runs none of the program's probes (item 5): each test runs the same
program under a real `python` and under `pykprobes run`, in subprocesses, and compares."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.cli.test_run import ENV, LINE, run, trace_lines

#: What the program prints of its own `__main__` and start-up state.
INTROSPECT = textwrap.dedent('''
    import os, sys
    import helper_sibling
    ns = globals()
    print(list(ns)[:12])
    print(type(__builtins__).__name__, __builtins__ is __import__("builtins"))
    print(__file__, __name__, __package__, __spec__ and __spec__.name, ns.get("__cached__"))
    print(type(__loader__).__name__, getattr(__loader__, "name", None),
          getattr(__loader__, "path", None) or getattr(__loader__, "archive", None))
    print(__loader__.get_source(getattr(__loader__, "name", "__main__")).splitlines()[1])
    print("annotations" if "__annotations__" in ns else "no annotations")
    print(sys.argv, sys.path[0], helper_sibling.__file__)
    print(sys.modules["__main__"] is sys.modules[__name__])
''')


def _python(args: list[str], cwd: Path, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=120, input=stdin)


def _same(plain: subprocess.CompletedProcess[str],
          traced: subprocess.CompletedProcess[str]) -> None:
    assert traced.returncode == plain.returncode, traced.stderr
    assert traced.stdout == plain.stdout
    assert "pykprobes" not in traced.stdout


def test_main_module_argv_and_path_as_python(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "prog.py").write_text(INTROSPECT)
    (real / "helper_sibling.py").write_text("")
    links = tmp_path / "links"
    links.mkdir()
    (links / "prog.py").symlink_to(real / "prog.py")  # python resolves it for sys.path[0]
    for cwd, script in ((real, "prog.py"), (tmp_path, "links/prog.py"),
                        (links, "../links/prog.py"), (tmp_path, str(links / "prog.py"))):
        plain = _python([script, "a", "b"], cwd)
        assert plain.returncode == 0, plain.stderr
        traced = run("-e", "p:t/f textwrap:dedent", "--", script, "a", "b", cwd=cwd)
        _same(plain, traced)


def test_a_directory_and_a_zip_run_their_main(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "__main__.py").write_text(INTROSPECT)
    (app / "helper_sibling.py").write_text("")
    with zipfile.ZipFile(tmp_path / "app.zip", "w") as z:
        z.write(app / "__main__.py", "__main__.py")
        z.write(app / "helper_sibling.py", "helper_sibling.py")
    for target in ("app", "app.zip"):
        plain = _python([target, "x"], tmp_path)
        assert plain.returncode == 0, plain.stderr
        _same(plain, run("-e", "p:t/m __main__:<module>", "--", target, "x", cwd=tmp_path))
    (tmp_path / "empty").mkdir()
    plain = _python(["empty"], tmp_path)
    traced = run("--", "empty", cwd=tmp_path)
    assert traced.returncode == plain.returncode == 1
    assert traced.stderr.split(": ", 1)[1] == plain.stderr.split(": ", 1)[1]


def test_m_module_namespace_as_python(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg_fid"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(INTROSPECT.replace("import helper_sibling\n",
                                                        "from pkg_fid import helper_sibling\n"))
    (pkg / "helper_sibling.py").write_text("")
    plain = _python(["-m", "pkg_fid", "y"], tmp_path)
    assert plain.returncode == 0, plain.stderr
    _same(plain, run("-e", "p:t/m pkg_fid.__main__:<module>", "--", "-m", "pkg_fid", "y",
                     cwd=tmp_path))


@pytest.mark.parametrize("source", ["def f(:\n    pass\n", "x = 1\n  y = 2\n",
                                    "s = '\\N{nope}'\n"])
def test_a_syntax_error_is_printed_as_python_prints_it(tmp_path: Path, source: str) -> None:
    (tmp_path / "bad.py").write_text(source)
    plain = _python(["bad.py"], tmp_path)
    traced = run("-e", "p:t/f __main__:f", "--", "bad.py", cwd=tmp_path)
    assert traced.returncode == plain.returncode == 1
    assert traced.stderr == plain.stderr
    assert traced.stdout == ""


def test_a_syntax_error_under_m_shows_no_frame_of_ours(tmp_path: Path) -> None:
    (tmp_path / "badmod_fid.py").write_text("def f(:\n")
    plain = _python(["-m", "badmod_fid"], tmp_path)
    traced = run("--", "-m", "badmod_fid", cwd=tmp_path)
    assert traced.returncode == plain.returncode == 1
    assert "pykprobes" not in traced.stderr
    # python's frames are runpy's and the import system's; the error itself is the same
    assert traced.stderr.splitlines()[-4:] == plain.stderr.splitlines()[-4:]


SIGINT_PROGRAM = textwrap.dedent('''
    import atexit, os, signal, sys, time
    def work(n):
        return n + 1
    atexit.register(lambda: print("atexit ran", flush=True))
    print(work(41), flush=True)
    os.kill(os.getpid(), signal.SIGINT)   # as a Ctrl-C would
    time.sleep(30)
''')


def test_a_program_killed_by_sigint_ends_as_pythons(tmp_path: Path) -> None:
    (tmp_path / "intr.py").write_text(SIGINT_PROGRAM)
    plain = _python(["intr.py"], tmp_path)
    traced = run("-e", "p:t/work __main__:work n", "--", "intr.py", cwd=tmp_path)
    assert plain.returncode == -signal.SIGINT
    assert traced.returncode == plain.returncode
    assert traced.stdout == plain.stdout == "42\natexit ran\n"
    tb_plain = plain.stderr[plain.stderr.index("Traceback"):]
    rest = "\n".join(ln for ln in traced.stderr.splitlines() if not LINE.match(ln)
                     and not ln.startswith("  work "))
    assert rest.strip() == tb_plain.strip()
    assert [m["args"] for m in trace_lines(traced.stderr)] == [" n=41"]
    assert "  work " in traced.stderr  # the profile, written before the process ended


def test_json_format_does_not_trace_its_own_writer(tmp_path: Path) -> None:
    """An event on json:dumps recorded the writer's own calls (it formatted each record
    with json.dumps): one call of the program, one record."""
    (tmp_path / "j.py").write_text("import json\nfor i in range(3):\n"
                                   "    print(json.dumps({'a': i}))\n")
    out = tmp_path / "trace.jsonl"
    traced = run("--format", "json", "-o", str(out), "-e", "p:t/d json:dumps obj:len",
                 "-e", "r:t/r json.encoder:JSONEncoder.encode $retval", "--", "j.py",
                 cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == "".join(f'{{"a": {i}}}\n' for i in range(3))
    lines = out.read_text().splitlines()
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]
    expected = [rec for i in range(3)
                for rec in (("d", {"obj": 1}), ("r", {"retval": f'{{"a": {i}}}'}))]
    assert [(r["event"], r["fields"]) for r in records] == expected
    profile = [ln.split() for ln in lines if not ln.startswith("{")]
    assert profile == [["d", "3", "0"], ["r", "3", "0"]]


def test_the_optimizers_own_work_is_not_recorded(tmp_path: Path) -> None:
    """The optimizer's thread runs enum code under `bytecode`: a probe there counts it
    missed (kprobe_busy), and records only the program's own calls."""
    (tmp_path / "e.py").write_text(textwrap.dedent('''
        import enum, time
        class F(enum.Flag):
            A = 1
            B = 2
        def f(x):
            return x
        for _ in range(3):
            f(F.A & F.B)
            time.sleep(0.05)   # the optimizer runs meanwhile
    '''))
    traced = run("-e", "p:t/and enum:Flag.__and__", "-e", "p:t/f __main__:f", "--", "e.py",
                 cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    lines = trace_lines(traced.stderr)
    main_tid = {m["tid"] for m in lines if m["event"] == "f"}
    assert len(main_tid) == 1
    assert {m["tid"] for m in lines} == main_tid, "a record from another thread"
    assert len([m for m in lines if m["event"] == "and"]) >= 3


def test_unwritable_output_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "p.py").write_text("print('never')\n")
    for target in (tmp_path / "no" / "such" / "dir" / "t.txt", tmp_path):
        res = run("-o", str(target), "-e", "p:t/d json:dumps", "--", str(tmp_path / "p.py"))
        assert res.returncode == 1 and res.stdout == ""
        assert res.stderr.startswith("pykprobes: error: cannot write the trace to ")
        assert len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--buffer-size-kb", "1e30"], "not a size"),
    (["--buffer-size-kb", "-5"], "not a size"),
    (["--filter", "d=obj > " + "9" * 5000], "Illegal integer value"),
])
def test_bad_run_options_are_one_error(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "p.py").write_text("print('never')\n")
    res = run("-e", "p:t/d json:dumps obj:len", *args, "--", str(tmp_path / "p.py"))
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.startswith("pykprobes: error: ") and message in res.stderr
    assert "Traceback" not in res.stderr


def test_probe_L_with_an_empty_target(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pykprobes", "probe", "-L", ""],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("pykprobes: error: ") and len(res.stderr.splitlines()) == 1


@pytest.mark.parametrize("command", [["info"], ["probe", "-L", "textwrap:TextWrapper._wrap_chunks"],
                                     ["probe", "-V", "textwrap:dedent"]])
def test_a_closed_pipe_ends_quietly(command: list[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that has gone already: every write fails with EPIPE
    try:
        res = subprocess.run([sys.executable, "-m", "pykprobes", *command], stdout=write_end,
                             stderr=subprocess.PIPE, text=True, env=ENV, timeout=60)
    finally:
        os.close(write_end)
    assert res.returncode == 1
    assert res.stderr == ""


def test_m_imports_its_parent_packages_with_the_events_enabled(tmp_path: Path) -> None:
    """`python -m pkg.sub` imports pkg (the program's code) to find pkg.sub: under run, with
    the events enabled, as the rest of the program."""
    pkg = tmp_path / "pkg_par"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def init_work(x):\n    return x\n\ninit_work(7)\n")
    (pkg / "sub.py").write_text("import pkg_par\nprint(pkg_par.init_work(8))\n")
    plain = _python(["-m", "pkg_par.sub"], tmp_path)
    traced = run("-e", "p:t/i pkg_par:init_work x", "--", "-m", "pkg_par.sub", cwd=tmp_path)
    _same(plain, traced)
    assert [m["args"] for m in trace_lines(traced.stderr)] == [" x=7", " x=8"]
    (pkg / "boom.py").write_text("")
    (pkg / "__init__.py").write_text("raise RuntimeError('in the package')\n")
    plain = _python(["-m", "pkg_par.boom"], tmp_path)
    traced = run("--", "-m", "pkg_par.boom", cwd=tmp_path)
    assert traced.returncode == plain.returncode == 1
    assert "pykprobes" not in traced.stderr
    assert traced.stderr.splitlines()[-3:] == plain.stderr.splitlines()[-3:]
