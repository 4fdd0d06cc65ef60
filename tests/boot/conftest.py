"""Helpers for the boot stage's tests: every test runs real child interpreters of this venv,
whose site-packages holds the start-up hook files `_pykprobes.pth` and `_pykprobes.start`,
with PYKPROBES_EVENTS set."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from pykprobes.boot.pth import HOOK_FILES
from tests.testenv import ARCH

#: A trace line (trace/format.py format_line).
LINE = re.compile(r"^\s*(?P<comm>.+)-(?P<tid>\d+)\s+\[000\]\s+(?P<ts>[\d.]+): "
                  r"(?P<event>\w+): \((?P<probe>[^)]*)\)(?P<args>.*)$")

#: Variables that would make a child something other than "this venv's python at start-up".
_STRIPPED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONSAFEPATH",
             "PYTHONNOUSERSITE", "PYTHONUSERBASE")


def child_env(events: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without the PYKPROBES_* and start-up variables, plus
    PYKPROBES_ARCH (the children that convert use it) and `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYKPROBES_") and k not in _STRIPPED}
    env["PYKPROBES_ARCH"] = ARCH
    if events is not None:
        env["PYKPROBES_EVENTS"] = events
    env.update(extra)
    return env


def run(args: Sequence[str], events: str | None = None, cwd: Path | None = None,
        env: Mapping[str, str] | None = None, stdin: str | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python ARGS` with this venv's interpreter (no -X, -I or -S: start-up as a user has it)."""
    full = child_env(events, **dict(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def trace_lines(text: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def warnings_of(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("pykprobes: ")]


def _site_runs_start_files() -> bool:
    """Whether this Python's `site` calls the entry points of `NAME.start` files (PEP 829),
    measured: `site.addsitedir()` in a child on a directory holding one."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="pykprobes-start-") as tmp:
        Path(tmp, "startprobe_mod.py").write_text("def hit():\n    print('ran')\n")
        Path(tmp, "startprobe.start").write_text("startprobe_mod:hit\n")
        proc = subprocess.run(
            [sys.executable, "-S", "-c", f"import site; site.addsitedir({tmp!r})"],
            capture_output=True, text=True, timeout=60, check=False)
    return proc.stdout == "ran\n"


#: `site` runs `.start` entry points here (3.15+): the hook is `_pykprobes.start` and the
#: import line of `_pykprobes.pth` is suppressed by it; otherwise the `.pth` line is the hook.
SITE_RUNS_START_FILES = _site_runs_start_files()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture(scope="session", autouse=True)
def _hook_installed() -> None:
    """The boot tests need the start-up hook in this interpreter's site-packages: the
    project's editable install (dev.py) and its wheel put it there."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    for name, text in HOOK_FILES.items():
        path = purelib / name
        if not path.is_file():
            pytest.fail(f"{path} is missing: install the project (`python3 dev.py test` does, "
                        "`pip install -e .` too) so that the start-up hook is in site-packages")
        assert path.read_text() == text, f"{path} is out of date: reinstall the project"
