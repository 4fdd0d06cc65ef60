"""`pykprobes check` on a module that is not imported yet (issue 16, item 11): the target,
the offset and the fetchargs are checked as the import will check them, from the
module's compiled source, without importing the module or running any of its code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SOURCE = textwrap.dedent("""
    import pathlib
    pathlib.Path(__file__).with_name("IMPORTED").write_text("yes")

    def work(a, b):
        c = a + b
        return c

    class Thing:
        def method(self):
            return 1
""")


@pytest.fixture
def package(tmp_path: Path) -> Path:
    pkg = tmp_path / "waitpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('yes')\n")
    (pkg / "mod.py").write_text(SOURCE)
    return tmp_path


def _check(root: Path, definition: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-m", "pykprobes", "check", definition],
                          capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize(("definition", "message"), [
    ("p:t/a waitpkg.mod:nothere", "no code for symbol 'waitpkg.mod:nothere'"),
    ("p:t/a waitpkg.mod:Thing", "is a class: probe one of its methods"),
    ("p:t/a waitpkg.mod:work+1000", "offset past the end of the code"),
    ("p:t/a waitpkg.mod:work zz", "This variable is not found at this probe point"),
    ("p:t/a waitpkg.mod:work $arg3", "This variable is not found at this probe point"),
    ("p:t/a waitpkg.mod:Thing.method nope", "This variable is not found at this probe point"),
])
def test_check_finds_what_the_import_would_refuse(
    package: Path, definition: str, message: str
) -> None:
    proc = _check(package, definition)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert proc.stderr.startswith("pykprobes: error: ") and "Traceback" not in proc.stderr
    assert proc.stderr.rstrip().endswith("^")  # the caret under the bad column
    assert not (package / "waitpkg" / "IMPORTED").exists()


@pytest.mark.parametrize("definition", [
    "p:t/a waitpkg.mod:work a b",
    "p:t/a waitpkg.mod:work $arg1 $arg2",
    "p:t/a waitpkg.mod:Thing.method self",
    "r:t/a waitpkg.mod:work $retval",
    "p:t/a waitpkg.mod:<module>",
])
def test_check_says_ok_for_what_the_import_would_accept(package: Path, definition: str) -> None:
    proc = _check(package, definition)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: t/a: ")
    assert not (package / "waitpkg" / "IMPORTED").exists()
