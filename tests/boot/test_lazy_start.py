"""Early probes and lazy imports (PEP 810, 3.15): an early probe on a module the program
imports lazily waits for its first use, then arms before its body runs; the boot stage
loads nothing the program imports lazily."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.boot.conftest import run, trace_lines, warnings_of, write
from tests.core.test_lazy_imports import LAZY_MOD, _has_lazy_imports

pytestmark = pytest.mark.skipif(
    not _has_lazy_imports(), reason="capability: no lazy imports (PEP 810) in this Python"
)


@pytest.mark.parametrize(
    "imports", ["lazy import lazymod", "__lazy_modules__ = ['lazymod']\nimport lazymod"]
)
def test_an_early_probe_on_a_lazily_imported_module(tmp_path: Path, imports: str) -> None:
    write(tmp_path / "lazymod.py", LAZY_MOD)
    write(tmp_path / "app.py", imports + "\n"
          "import sys\n"
          "print('loaded before use:', 'lazymod' in sys.modules)\n"
          "print(lazymod.f(5))\n")
    res = run(["app.py"], events="p:boot/f lazymod:f x", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert warnings_of(res.stderr) == []
    assert res.stdout == "loaded before use: False\n6\n"
    # The import-time call f(1), then the program's f(5).
    assert [m["args"] for m in trace_lines(res.stderr)] == [" x=1", " x=5"]
