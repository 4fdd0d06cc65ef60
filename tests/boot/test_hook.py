"""Which start-up hook runs the boot stage, and that it runs once: `_pykprobes.pth`'s import
line where `site` knows no `.start` files, the `_pykprobes.start` entry point where it does
(PEP 829, 3.15+), which then suppresses the `.pth` line (boot/pth.py). Seen through `site`'s
own trace (`python -v`), in real child interpreters of this venv."""

from __future__ import annotations

from pathlib import Path

from pykprobes.boot.pth import PTH_NAME, START_ENTRY, START_NAME
from tests.boot.conftest import SITE_RUNS_START_FILES, run, warnings_of

#: Two definitions the boot stage refuses, each with one warning: seen twice if it ran twice.
BAD = "p:boot/a no.such.module:f +;p:boot/b json:loads $nosuchvar"


def _site_trace(stderr: str, name: str) -> list[str]:
    """The lines of `site`'s -v trace that name the hook file `name`."""
    return [ln for ln in stderr.splitlines() if name in ln and "code object" not in ln]


def test_the_boot_stage_runs_once_through_the_hook_of_this_python(tmp_path: Path) -> None:
    res = run(["-v", "-c", "pass"], events=BAD, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    warned = warnings_of(res.stderr)
    assert len(warned) == 2 and len(set(warned)) == 2, warned
    assert "p:boot/a" in warned[0] and "p:boot/b" in warned[1]
    start_lines = _site_trace(res.stderr, START_NAME)
    pth_lines = _site_trace(res.stderr, PTH_NAME)
    if SITE_RUNS_START_FILES:
        # 3.15.2's site.py: "Executing entry point: ENTRY from FILE" and "import lines in
        # FILE.pth are suppressed due to matching FILE.start file."
        assert any("entry point" in ln and START_ENTRY in ln for ln in start_lines), start_lines
        assert any("suppressed" in ln for ln in pth_lines), pth_lines
    else:
        assert start_lines == []  # the .start file is not even read
        assert pth_lines, res.stderr[-2000:]


def test_unset_the_hook_is_silent(tmp_path: Path) -> None:
    res = run(["-c", "print('ok')"], cwd=tmp_path)
    assert (res.returncode, res.stdout, res.stderr) == (0, "ok\n", "")


def test_early_probe_at_start_up_through_the_hook_of_this_python(tmp_path: Path) -> None:
    """An early probe on a module imported by the program fires from start-up on, whichever
    file is the hook here (the route is the one shown by the test above)."""
    res = run(["-v", "-c", "import json; json.loads('[7]')"],
              events="p:boot/loads json:loads s", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert warnings_of(res.stderr) == []
    assert 'loads: (json:loads+0) s="[7]"' in res.stderr
    hook = START_NAME if SITE_RUNS_START_FILES else PTH_NAME
    assert _site_trace(res.stderr, hook)
