"""The start-up hook ships: the wheel has `_pykprobes.pth` and `_pykprobes.start` at its root
(site-packages), with boot/pth.py's text, and a wheel installed in a fresh venv boots early
probes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from pykprobes.boot.pth import HOOK_FILES
from tests.boot.conftest import SITE_RUNS_START_FILES, child_env, trace_lines

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-input",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600, env=child_env(), check=False)
    if proc.returncode != 0 and "setuptools" in proc.stdout + proc.stderr and \
            ("No matching distribution" in proc.stdout + proc.stderr
             or "Could not find a version" in proc.stdout + proc.stderr):
        pytest.skip("capability: no package index to get setuptools from for the isolated build")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = out.glob("pykprobes-*.whl")
    return built


def test_wheel_has_the_hook_files_at_its_root(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        record = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD")))
        for name, text in HOOK_FILES.items():
            assert zf.read(name).decode() == text
            assert f"{name},".encode() in record


def test_a_fresh_venv_with_the_wheel_boots(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    # The venv sees this venv's site-packages for `bytecode`, but pykprobes comes from the
    # wheel, unpacked into the new venv's own site-packages (no network, no pip run).
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=child_env()).stdout.strip()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)
    import bytecode

    deps = Path(bytecode.__file__).parent.parent
    (Path(purelib) / "deps.pth").write_text(f"{deps}\n")
    (tmp_path / "t.py").write_text("import json\nprint(json.loads('[1, 2]'))\n")
    env = child_env("p:boot/loads json:loads s")
    proc = subprocess.run([str(python), "t.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[1, 2]\n"
    assert [m["args"] for m in trace_lines(proc.stderr)] == [' s="[1, 2]"']
    loaded = "import sys; print(sorted(m for m in sys.modules if 'pykprobes' in m))"
    unset = subprocess.run(
        [str(python), "-c", loaded],
        env=child_env(), capture_output=True, text=True, check=True)
    # Unset, nothing of pykprobes but, where site runs `.start` files (PEP 829, 3.15+), the
    # entry point's modules (tests/boot/test_import_weight.py).
    entry = ["pykprobes", "pykprobes._version", "pykprobes.boot"]
    assert unset.stdout == f"{entry if SITE_RUNS_START_FILES else []}\n"
    assert all(os.path.isfile(os.path.join(purelib, name)) for name in HOOK_FILES)
