#!/usr/bin/env python3
"""Set up and check pykprobes on every CPython >= 3.11 this machine has.

    python3 dev.py demo [ARGS...]     venv for the default python3, then run examples/demo.py
    python3 dev.py test [--python 3.12] [--arch optimized] [PYTEST ARGS...]

`test` lints once, then runs the whole suite three times per Python version: once per mechanism
(PYKPROBES_ARCH=breakpoint, then optimized), then once more optimized with the trace hot path's
pure-Python fallback forced (PYKPROBES_ACCELERATOR=off, arch "optimized-pycore": the C accelerator
and its fallback must behave the same). On a Python built with the JIT (sys._jit, 3.14+) it
runs both mechanisms once more with PYTHON_JIT=1 ("breakpoint-jit", "optimized-jit"); the
other runs there get PYTHON_JIT=0, so that each row says what it tested whatever the build's
default. It ends with a table and a `summary:` line.

Standard library only, and it must run on whatever python3 a fresh machine has, which may be
older than the interpreters it finds: no syntax or library newer than Python 3.8 here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent
VENVS = ROOT / ".venv"
DEMO = ROOT / "examples" / "demo.py"
MIN_VERSION = (3, 11)
# python3.N names looked up on PATH; 20 leaves room for releases to come.
MINORS = range(MIN_VERSION[1], 21)
ARCHES = ("breakpoint", "optimized", "optimized-pycore", "breakpoint-jit", "optimized-jit")
# A run name -> (PYKPROBES_ARCH, PYKPROBES_ACCELERATOR or None: the backend's own choice,
# PYTHON_JIT).
# The JIT runs are both mechanisms and not the pycore one: the JIT changes how the probed code
# runs (Tier 2 traces over rewritten code objects; traces and sys.monitoring, which the
# breakpoint arch and the frames still running old code use: cpython#156319, PR #142842), not
# how the trace layer records, which is what "pycore" varies.
RUN_ENV = {
    "breakpoint": ("breakpoint", None, False),
    "optimized": ("optimized", None, False),
    "optimized-pycore": ("optimized", "off", False),
    "breakpoint-jit": ("breakpoint", None, True),
    "optimized-jit": ("optimized", None, True),
}
# The files that decide what `pip install -e .[test]` installs: a change to any means the
# venv must be reinstalled (the version is read from _version.py into the metadata; setup.py
# writes the start-up hook files `_pykprobes.pth` and `_pykprobes.start` from boot/pth.py, and
# the editable install copies them into site-packages rather than linking them).
INSTALL_INPUTS = (
    ROOT / "pyproject.toml",
    ROOT / "setup.py",
    ROOT / "src" / "pykprobes" / "_version.py",
    ROOT / "src" / "pykprobes" / "boot" / "pth.py",
    # The C accelerators: the editable install compiles them into the source tree.
    *sorted((ROOT / "src" / "pykprobes").rglob("*.c")),
)
STAMP = "pykprobes-dev.json"
# The type checker of the lint step (pyproject.toml [tool.mypy]: strict, on src/pykprobes),
# installed into the lint venv only: the suite does not need it, and one pinned release keeps
# the verdict from changing under an unchanged tree.
MYPY = ("mypy", "2.4.1")
QUERY_TIMEOUT = 30.0

# Variables removed from every child's environment, because each one would make the child
# something other than "this venv's interpreter running our code":
STRIPPED_ENV = (
    "PYTHONPATH",  # mixes another interpreter's or checkout's modules into the venv
    "PYTHONHOME",  # points the venv's interpreter at another standard library
    "PYTHONINSPECT",  # goes interactive after the script, which replaces its exit code
    "PYTHONOPTIMIZE",  # -O strips assert: pytest's assertions and the debug checks need it
    "PYTHON_LAZY_IMPORTS",  # =all makes every import lazy (PEP 810), pytest's own included
    "PYTHONSTARTUP",  # only ever meant for an interactive session
    "PYTHONEXECUTABLE",  # macOS: makes sys.executable name another interpreter
    "__PYVENV_LAUNCHER__",  # macOS framework builds: same
    "VIRTUAL_ENV",  # an outer venv; we set our own
    "PIP_USER",  # pip must install into the venv, not the user site ...
    "PIP_TARGET",  # ... nor a target folder ...
    "PIP_PREFIX",  # ... nor another prefix
    "PYKPROBES_EVENTS",  # would arm early probes in every interpreter the suite starts
    "PYKPROBES_ARCH",  # set per run by `test`
    "PYKPROBES_ACCELERATOR",  # likewise
    "PYTHON_JIT",  # likewise: set per run on a Python that has a JIT
    "PYKPROBES_CONTROL",  # would serve a control socket from every interpreter the suite starts
)
# Deliberately kept: PYTHONDONTWRITEBYTECODE (set on some machines) only stops .pyc files
# being written next to the sources, which keeps the checkout clean; pip byte-compiles what it
# installs regardless, and nothing in the suite depends on .pyc files existing.
# PYTHONUNBUFFERED, PYTHONIOENCODING, PYTHONFAULTHANDLER and PYTHONWARNINGS are the user's
# choice of how to see output and are kept too.

# Asked of each candidate. It has to run on any Python, 2.7 included, to be able to say
# why that one is skipped. The last item: the build has a JIT that PYTHON_JIT=1 turns on
# (sys._jit, 3.14+; a build without one, or a platform it does not support, says False).
QUERY = (
    "import json, platform, sys, sysconfig; print(json.dumps(["
    "platform.python_implementation(), list(sys.version_info[:3]), platform.python_version(),"
    " sys.executable, bool(sysconfig.get_config_var('Py_GIL_DISABLED')),"
    " bool(getattr(getattr(sys, '_jit', None), 'is_available', lambda: False)())]))"
)


class DevError(Exception):
    """A failure explained by its message; main() prints it without a traceback."""


class Interpreter(NamedTuple):
    version: tuple[int, int]
    full_version: str  # "3.12.1"
    executable: str  # the real interpreter, as it reports sys.executable (never a shim)
    found_as: str  # how it was found, for the report: "python3 on PATH", "pyenv 3.12.1"
    default: bool  # it is the `python3` on PATH
    jit: bool = False  # built with a JIT that PYTHON_JIT=1 turns on

    @property
    def tag(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"


class Skipped(NamedTuple):
    candidate: str
    reason: str


class RunResult(NamedTuple):
    tag: str
    arch: str
    passed: int
    failed: int  # failures + errors + 1 when the run itself failed without a failing test
    skipped: int
    seconds: float
    result: str  # "ok", or why the run failed


# --- environment -----------------------------------------------------------------------


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in STRIPPED_ENV}


def venv_bin(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin")


def venv_python(venv: Path) -> Path:
    return venv_bin(venv) / ("python.exe" if os.name == "nt" else "python")


def venv_env(venv: Path) -> dict[str, str]:
    """The environment of an activated venv, so that the suite's own subprocesses (and the
    `pykprobes` console script) find the venv's interpreter first on PATH."""
    env = base_env()
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv_bin(venv)), env.get("PATH", os.defpath)])
    return env


def say(text: str = "") -> None:
    # Flushed, because children write to the same stdout and their output must not overtake
    # ours when stdout is a pipe (CI).
    print(text, flush=True)


# --- interpreter discovery -------------------------------------------------------------


def _version_key(name: str) -> list[object]:
    # "3.12.10" after "3.12.9": compare the digit runs as numbers. re.split with a group
    # alternates text and digits, so items at one position always have the same type.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _candidates(skipped: list[Skipped]) -> Iterator[tuple[str, str, bool]]:
    """(path, how it was found, is the default python3), the default python3 first."""
    for name in ["python3"] + [f"python3.{minor}" for minor in MINORS]:
        path = shutil.which(name)
        if path:
            yield path, f"{name} on PATH", name == "python3"
    pyenv = shutil.which("pyenv")
    if not pyenv:
        return
    try:
        proc = subprocess.run(
            [pyenv, "root"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=QUERY_TIMEOUT,
            env=base_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        skipped.append(Skipped(f"{pyenv} root", f"failed: {exc}"))
        return
    if proc.returncode != 0 or not proc.stdout.strip():
        skipped.append(Skipped(f"{pyenv} root", f"failed: {_first_line(proc.stderr)}"))
        return
    versions = Path(proc.stdout.strip()) / "versions"
    # Newest patch release first, so that it is the one kept for its minor version: early
    # patch releases of a minor are the ones with known bugs.
    for python in sorted(
        versions.glob("*/bin/python3"),
        key=lambda p: _version_key(p.parent.parent.name),
        reverse=True,
    ):
        yield str(python), f"pyenv {python.parent.parent.name}", False


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "(no output)"


def _query(path: str) -> tuple[list[Any] | None, str]:
    """What the candidate says about itself, or why it could not say."""
    try:
        proc = subprocess.run(
            [path, "-c", QUERY],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=QUERY_TIMEOUT,
            env=base_env(),
        )
    except subprocess.TimeoutExpired:
        return None, f"did not answer within {QUERY_TIMEOUT:.0f} s"
    except OSError as exc:
        return None, f"cannot run: {exc}"
    if proc.returncode != 0:
        # A pyenv shim for a version that is installed but not selected lands here.
        return None, f"exited {proc.returncode}: {_first_line(proc.stderr)}"
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None, f"unexpected answer: {_first_line(proc.stdout)}"
    return answer, ""


def discover_interpreters() -> tuple[list[Interpreter], list[Skipped]]:
    """Every CPython >= 3.11 here, one per minor version, in the order found (the default
    python3 first), and every other candidate with the reason it was skipped."""
    found: dict[tuple[int, int], Interpreter] = {}
    skipped: list[Skipped] = []
    for path, found_as, default in _candidates(skipped):
        label = f"{path} ({found_as})"
        answer, error = _query(path)
        if answer is None:
            skipped.append(Skipped(label, error))
            continue
        impl, version_info, full_version, executable, free_threaded, jit = answer
        version = (int(version_info[0]), int(version_info[1]))
        tag = f"{version[0]}.{version[1]}"
        if impl != "CPython":
            skipped.append(Skipped(label, f"{impl} {full_version}, not CPython"))
        elif version < MIN_VERSION:
            skipped.append(Skipped(label, f"Python {full_version} is older than 3.11"))
        elif free_threaded:
            # The matrix is the default (GIL) builds; a free-threaded one would otherwise
            # shadow or be shadowed by the default build of its minor version at random.
            skipped.append(Skipped(label, f"free-threaded build of {full_version}"))
        elif version in found:
            kept = found[version]
            same = os.path.realpath(str(executable)) == os.path.realpath(kept.executable)
            why = "the same interpreter as" if same else f"{tag} already taken from"
            skipped.append(Skipped(label, f"{why} {kept.found_as}"))
        else:
            found[version] = Interpreter(
                version, str(full_version), str(executable) or path, found_as, default, bool(jit)
            )
    return list(found.values()), skipped


def report_discovery(found: Sequence[Interpreter], skipped: Sequence[Skipped]) -> None:
    say("interpreters (one per minor version, first found wins):")
    if not found:
        say("  (none)")
    for interp in sorted(found):
        jit = ", JIT" if interp.jit else ""
        say(
            f"  {interp.tag:<5} {interp.executable}  "
            f"({interp.full_version}, {interp.found_as}{jit})"
        )
    if skipped:
        say("skipped:")
        for item in skipped:
            say(f"  {item.candidate}: {item.reason}")
    say()


def find_interpreters() -> list[Interpreter]:
    found, skipped = discover_interpreters()
    report_discovery(found, skipped)
    if not found:
        raise DevError(
            "no CPython >= 3.11 found: looked for python3 and python3.11 .. python3.20 on "
            "PATH and in pyenv's versions; install one (python.org, your distribution, or "
            "`pyenv install 3.12`) and run this again"
        )
    return found


# --- virtual environments --------------------------------------------------------------


def _extensions_missing(interp: Interpreter) -> list[str]:
    """The C accelerators with no build for this interpreter in the source tree (where the
    editable install puts them): deleted by hand or by `git clean`, or never built. A
    reinstall tries again; on a machine that cannot build them it leaves the fallback."""
    abi = f"cpython-{interp.version[0]}{interp.version[1]}"
    return [
        str(src.relative_to(ROOT))
        for src in sorted((ROOT / "src" / "pykprobes").rglob("*.c"))
        if not any(src.parent.glob(f"{src.stem}.{abi}*"))
    ]


def _inputs_digest() -> str:
    digest = hashlib.sha256()
    for path in INSTALL_INPUTS:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _run_quiet(cmd: Sequence[str], what: str, env: dict[str, str]) -> None:
    """Run a set-up step, showing its output only if it fails."""
    proc = subprocess.run(
        list(cmd),
        cwd=str(ROOT),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        sys.stdout.write(proc.stdout)
        raise DevError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")


def ensure_mypy(venv: Path) -> None:
    """MYPY in `venv`, installed if another release (or none) is there."""
    python = str(venv_python(venv))
    name, version = MYPY
    proc = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
        cwd=str(ROOT),
        env=venv_env(venv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode == 0 and proc.stdout.strip() == version:
        return
    say(f"{venv.relative_to(ROOT)}: installing {name}=={version} (the lint step's)")
    _run_quiet(
        [python, "-m", "pip", "install", "--quiet", "--no-input",
         "--disable-pip-version-check", f"{name}=={version}"],
        f"installing {name}",
        venv_env(venv),
    )


def ensure_venv(interp: Interpreter) -> Path:
    """The venv .venv/py3.N for this interpreter, with `.[test]` installed in editable mode;
    reused as it is while the interpreter and the install inputs have not changed."""
    venv = VENVS / f"py{interp.tag}"
    python = venv_python(venv)
    stamp_path = venv / STAMP
    wanted = {
        # The checkout's own path too: a venv made for a checkout that has since moved has
        # its editable install and its scripts' #! lines pointing at the old place.
        "root": str(ROOT),
        "base": interp.executable,
        "base_version": interp.full_version,
        "inputs": _inputs_digest(),
    }
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamp = {}
    rel = venv.relative_to(ROOT)
    # "built": whether the last install left the C accelerators built; if it did and they are
    # gone now, install again (a machine that cannot build them is not asked every time).
    current = {k: stamp.get(k) for k in wanted} == wanted and python.exists()
    if current and not (stamp.get("built") and _extensions_missing(interp)):
        say(f"py{interp.tag}: {rel} is up to date")
        return venv

    same_base = all(stamp.get(k) == wanted[k] for k in ("root", "base", "base_version"))
    if not (same_base and python.exists()):
        # A new or upgraded base interpreter leaves a venv pointing at the old one, and a
        # moved checkout leaves one pointing at the old checkout: rebuild.
        say(f"py{interp.tag}: creating {rel} with {interp.executable}")
        _run_quiet(
            [interp.executable, "-m", "venv", "--clear", str(venv)],
            f"creating {rel} (on Debian/Ubuntu, `apt-get install python{interp.tag}-venv`)",
            base_env(),
        )
    else:
        names = " or ".join(path.name for path in INSTALL_INPUTS)
        say(f"py{interp.tag}: {names} changed since the last install")
    # Removed first, so that an interrupted install is redone next time.
    if stamp_path.exists():
        stamp_path.unlink()
    say(f"py{interp.tag}: installing -e .[test] into {rel}")
    _run_quiet(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-input",
            "--disable-pip-version-check",
            "-e",
            ".[test]",
        ],
        f"installing into {rel}",
        venv_env(venv),
    )
    missing = _extensions_missing(interp)
    if missing:
        say(f"py{interp.tag}: not built, the pure-Python fallback will run: {', '.join(missing)}")
    stamp_path.write_text(json.dumps({**wanted, "built": not missing}, indent=1) + "\n")
    return venv


# --- test ------------------------------------------------------------------------------


def read_junit(path: Path) -> tuple[int, int, int, int] | None:
    """(tests, failures, errors, skipped) summed over the report's test suites, or None
    when the run left no readable report (it crashed, or stopped before writing one)."""
    try:
        root = ElementTree.parse(str(path)).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = [0, 0, 0, 0]
    for suite in suites:
        for i, key in enumerate(("tests", "failures", "errors", "skipped")):
            totals[i] += int(suite.get(key, "0"))
    return totals[0], totals[1], totals[2], totals[3]


# What pytest's exit codes mean, for the table (pytest.ExitCode).
PYTEST_EXIT = {
    1: "tests failed",
    2: "interrupted",
    3: "internal error",
    4: "usage error",
    5: "no tests ran",
}


def run_suite(
    interp: Interpreter, venv: Path, arch: str, pytest_args: Sequence[str], junit_dir: Path
) -> RunResult:
    junit = junit_dir / f"py{interp.tag}-{arch}.xml"
    cmd = [str(venv_python(venv)), "-m", "pytest", f"--junitxml={junit}", *pytest_args]
    env = venv_env(venv)
    env["PYKPROBES_ARCH"], core, jit = RUN_ENV[arch]
    if core is not None:
        env["PYKPROBES_ACCELERATOR"] = core
    if interp.jit:
        env["PYTHON_JIT"] = "1" if jit else "0"
    shown = ("PYKPROBES_ARCH", "PYKPROBES_ACCELERATOR", "PYTHON_JIT")
    how = " ".join(f"{k}={env[k]}" for k in shown if k in env)
    say(f"=== Python {interp.tag} ({interp.full_version}), {arch}: {how} ===")
    start = time.monotonic()
    # No stdin: a test that waits for input (or a stray breakpoint()) fails instead of
    # hanging, the same here as in CI, which has none.
    returncode = subprocess.call(cmd, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    say()

    counts = read_junit(junit)
    tests, failures, errors, skipped = counts if counts else (0, 0, 0, 0)
    failed = failures + errors
    if returncode == 0 and counts is not None:
        result = "ok"
    else:
        if returncode < 0:
            try:
                result = f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                result = f"killed by signal {-returncode}"
        else:
            result = f"exit {returncode}: {PYTEST_EXIT.get(returncode, 'failed')}"
        if counts is None:
            result += ", no report"
        if failed == 0:
            # The run failed without a failing test to show for it (no tests, a crash, a
            # usage error): count the run itself, so that "0 failed" only ever means success.
            failed = 1
    passed = tests - failures - errors - skipped
    return RunResult(interp.tag, arch, passed, failed, skipped, seconds, result)


def print_table(results: Sequence[RunResult]) -> None:
    header = ("python", "arch", "passed", "failed", "skipped", "seconds", "result")
    rows = [
        (r.tag, r.arch, str(r.passed), str(r.failed), str(r.skipped), f"{r.seconds:.1f}", r.result)
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = {2, 3, 4, 5}
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        say("  ".join(cells).rstrip())


def plan_runs(
    chosen: Sequence[Interpreter], arches: Sequence[str]
) -> list[tuple[Interpreter, str]]:
    """(interpreter, configuration) pairs to run, in order: the JIT configurations only on the
    interpreters built with a JIT (said once, not failed: the JIT is a build option)."""
    runs = [(i, a) for i in chosen for a in arches if i.jit or not RUN_ENV[a][2]]
    if not runs:
        raise DevError(
            f"--arch {', '.join(arches)}: no JIT in "
            f"{', '.join(i.tag for i in chosen)} (the JIT runs need sys._jit, 3.14+)"
        )
    jit_arches = [a for a in arches if RUN_ENV[a][2]]
    no_jit = [i.tag for i in chosen if not i.jit]
    if jit_arches and no_jit:
        say(f"no JIT in {', '.join(no_jit)}: {', '.join(jit_arches)} not run there")
        say()
    return runs


def cmd_test(args: argparse.Namespace, pytest_args: list[str]) -> int:
    found = find_interpreters()
    if args.python:
        by_tag = {interp.tag: interp for interp in found}
        missing = [tag for tag in args.python if tag not in by_tag]
        if missing:
            raise DevError(
                f"--python {', '.join(missing)}: not found here "
                f"(found: {', '.join(sorted(by_tag)) or 'none'})"
            )
        chosen = [by_tag[tag] for tag in dict.fromkeys(args.python)]
    else:
        chosen = sorted(found)
    arches = list(dict.fromkeys(args.arch)) if args.arch else list(ARCHES)
    runs = plan_runs(chosen, arches)
    chosen = list(dict.fromkeys(i for i, _ in runs))

    # Every venv first: a failed install stops here, before any long run.
    venvs = [(interp, ensure_venv(interp)) for interp in chosen]
    say()

    first_interp, first_venv = venvs[0]
    say(f"=== ruff check src tests bench dev.py (Python {first_interp.tag}) ===")
    lint_code = subprocess.call(
        [str(venv_python(first_venv)), "-m", "ruff", "check", "src", "tests", "bench", "dev.py"],
        cwd=str(ROOT),
        env=venv_env(first_venv),
        stdin=subprocess.DEVNULL,
    )
    say()
    # The import contracts are a test of the suite (tests/test_house_rules.py).
    ensure_mypy(first_venv)
    say(f"=== mypy (pyproject.toml [tool.mypy], Python {first_interp.tag}) ===")
    mypy_code = subprocess.call(
        [str(venv_python(first_venv)), "-m", "mypy"],
        cwd=str(ROOT),
        env=venv_env(first_venv),
        stdin=subprocess.DEVNULL,
    )
    say()

    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="pykprobes-junit-") as junit_dir:
        for interp, venv in venvs:
            for arch in arches:
                if (interp, arch) in runs:
                    results.append(run_suite(interp, venv, arch, pytest_args, Path(junit_dir)))

    passed = sum(r.passed for r in results)
    failed = sum(r.failed for r in results)
    skipped = sum(r.skipped for r in results)
    # Each lint step that failed counts, for the same reason as a run that failed on its own.
    failed += (lint_code != 0) + (mypy_code != 0)
    print_table(results)
    say(f"ruff check: {'ok' if lint_code == 0 else f'failed (exit {lint_code})'}")
    say(f"mypy: {'ok' if mypy_code == 0 else f'failed (exit {mypy_code})'}")
    say(f"summary: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 else 1


# --- demo ------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, demo_args: list[str]) -> int:
    if not DEMO.is_file():
        raise DevError(
            f"{DEMO.relative_to(ROOT)} does not exist yet: the demo comes with the engine work"
        )
    found = find_interpreters()
    # The python3 a user would type, when it is new enough; else the newest there is.
    interp = next((i for i in found if i.default), None) or max(found)
    venv = ensure_venv(interp)
    say(f"=== {DEMO.relative_to(ROOT)} on Python {interp.full_version} ===")
    return subprocess.call(
        [str(venv_python(venv)), str(DEMO), *demo_args], cwd=str(ROOT), env=venv_env(venv)
    )


# --- command line ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dev.py", description="Set up and check pykprobes on every CPython >= 3.11 here."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="set up .venv for the default python3 and run examples/demo.py",
        description="Set up the venv of the default python3 (or the newest CPython >= 3.11) "
        "and run examples/demo.py in it; further arguments go to the demo.",
    )
    demo.set_defaults(func=cmd_demo)
    test = commands.add_parser(
        "test",
        help="lint, then run the suite on every CPython >= 3.11, once per mechanism",
        description="Run ruff and mypy once, then the whole pytest suite on every CPython >= 3.11 "
        "found, once with PYKPROBES_ARCH=breakpoint, once with PYKPROBES_ARCH=optimized, once "
        "optimized with PYKPROBES_ACCELERATOR=off, and on a Python with a JIT both mechanisms "
        "again with PYTHON_JIT=1. Other arguments (or everything after --) go to pytest.",
        allow_abbrev=False,  # a pytest option must never be taken for an abbreviation of ours
    )
    test.add_argument(
        "--python",
        action="append",
        metavar="3.N",
        type=_minor_version,
        help="only this Python version (repeatable)",
    )
    test.add_argument(
        "--arch",
        action="append",
        choices=ARCHES,
        help="only this configuration (repeatable; the -jit ones run on Pythons with a JIT)",
    )
    test.set_defaults(func=cmd_test)
    return parser


def _minor_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d+", text):
        raise argparse.ArgumentTypeError(f"expected a version such as 3.12, not {text!r}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" goes to pytest (or the demo) untouched, even what looks like ours.
    passthrough: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1 :]
    args, extra = build_parser().parse_known_args(argv)
    try:
        return int(args.func(args, extra + passthrough))
    except DevError as exc:
        print(f"dev.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("dev.py: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
