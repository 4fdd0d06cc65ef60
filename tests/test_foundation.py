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
