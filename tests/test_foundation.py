"""The project's own tooling: dev.py's interpreter discovery and the `pykprobes` entry point."""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests import testenv

ROOT = Path(__file__).resolve().parents[1]


def _load_dev() -> ModuleType:
    # dev.py is a script at the repo root, not an installed module: load it by path, under a
    # name that cannot collide with a user's `dev` module.
    spec = importlib.util.spec_from_file_location("pykprobes_dev_script", ROOT / "dev.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_discovery_finds_this_python_and_only_supported_ones() -> None:
    dev = _load_dev()
    found, skipped = dev.discover_interpreters()
    versions = [interp.version for interp in found]
    assert sys.version_info[:2] in versions, (found, skipped)
    assert all(version >= (3, 11) for version in versions), found
    # One interpreter per minor version.
    assert len(versions) == len(set(versions)), found


def test_discovery_says_which_python_has_a_jit() -> None:
    dev = _load_dev()
    found, _ = dev.discover_interpreters()
    this = next(i for i in found if i.version == sys.version_info[:2])
    jit = getattr(sys, "_jit", None)
    assert this.jit is bool(jit is not None and jit.is_available())


def test_jit_runs_only_where_the_build_has_a_jit() -> None:
    dev = _load_dev()
    plain = dev.Interpreter((3, 11), "3.11.7", "/x/python3.11", "test", False, False)
    jitted = dev.Interpreter((3, 15), "3.15.2", "/x/python3.15", "test", False, True)
    runs = dev.plan_runs([plain, jitted], list(dev.ARCHES))
    assert [(i.tag, a) for i, a in runs] == [
        ("3.11", "breakpoint"),
        ("3.11", "optimized"),
        ("3.11", "optimized-pycore"),
        ("3.15", "breakpoint"),
        ("3.15", "optimized"),
        ("3.15", "optimized-pycore"),
        ("3.15", "breakpoint-jit"),
        ("3.15", "optimized-jit"),
    ]
    # Asking for a JIT run where no Python has a JIT is an error, not an empty success.
    with pytest.raises(dev.DevError, match=r"no JIT in 3\.11"):
        dev.plan_runs([plain], ["optimized-jit"])


@pytest.mark.parametrize("argv", [["--help"], ["info"]])
def test_python_m_pykprobes_runs(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pykprobes", *argv],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    if argv == ["info"]:
        assert f"python: {platform.python_version()}" in proc.stdout
        assert "breakpoint: " in proc.stdout
        assert "optimizer: " in proc.stdout
    else:
        assert "usage: pykprobes" in proc.stdout


def test_info_says_whether_the_jit_is_on() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pykprobes", "info"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    jit = getattr(sys, "_jit", None)
    if jit is not None and jit.is_enabled():
        expected = "jit: on"
    elif jit is not None and jit.is_available():
        expected = "jit: off (built in: PYTHON_JIT=1 turns it on)"
    else:
        expected = "jit: not built in"
    assert expected in proc.stdout.splitlines(), proc.stdout


#: A free-threaded build, as env.py recognizes one ("t" in sys.abiflags), without having one.
_AS_FREE_THREADED = "import sys; sys.abiflags += 't'; "


def test_a_free_threaded_build_is_refused_in_one_line(run_python: testenv.RunPython) -> None:
    from pykprobes.env import FREE_THREADED_REFUSAL

    info = run_python(
        _AS_FREE_THREADED + "from pykprobes.cli.main import main; sys.exit(main(['info']))"
    )
    assert info.returncode == 1 and info.stdout == ""
    assert info.stderr == f"pykprobes: {FREE_THREADED_REFUSAL}\n"
    # The core, whoever imports it: the message is the exception's one line.
    core = run_python(
        _AS_FREE_THREADED + "import pykprobes\n"
        "try:\n    pykprobes.register_kprobe\nexcept ImportError as e:\n    print(e)"
    )
    assert core.returncode == 0 and core.stdout == f"{FREE_THREADED_REFUSAL}\n", core.stderr
    # The boot stage warns once and the program runs.
    boot = run_python(
        _AS_FREE_THREADED + "import os; os.environ['PYKPROBES_EVENTS'] = 'p:a/b json:loads'\n"
        "import pykprobes.boot; pykprobes.boot.start_from_environ(); print('ran')"
    )
    assert boot.stdout == "ran\n"
    assert boot.stderr.count("\n") == 1 and FREE_THREADED_REFUSAL in boot.stderr


def test_run_python_fixture_reports_output_and_exit(run_python: testenv.RunPython) -> None:
    proc = run_python(
        """
        import faulthandler, os, sys
        print(faulthandler.is_enabled(), os.environ["EXTRA"], os.environ.get("PYKPROBES_ARCH"))
        sys.exit(int(sys.argv[1]))
        """,
        "7",
        env={"EXTRA": "x"},
    )
    assert proc.returncode == 7
    # The child inherits this environment (PYKPROBES_ARCH included) plus `env`.
    assert proc.stdout.split() == ["True", "x", str(os.environ.get("PYKPROBES_ARCH"))]
