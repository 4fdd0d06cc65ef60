#!/usr/bin/env python3
"""Run pykprobes' benchmark suite on every CPython >= 3.11 this machine has.

    python3 bench/run.py              the whole suite (about 1-2 minutes per Python)
    python3 bench/run.py --quick      a short smoke run (numbers are not meaningful)
    python3 bench/run.py --python 3.12 [--python 3.13]
    python3 bench/run.py --here       only the interpreter running this script, as it is
                                      (no venv set-up: wrapt is n/a unless installed)
    python3 bench/run.py --only scale only the scale steps (1, 100, 10,000 probes, both
                                      mechanisms) and the memory per probe; written to a
                                      temporary folder unless --out is given

For each Python it creates or reuses `.venv/py3.N` (dev.py's logic: the project installed in
editable mode with its test extras), installs `wrapt` there if it is missing (a peer of the
benchmark), and runs bench/suite.py in it. The tables are printed and written, with the raw
numbers, to bench/results/RESULTS.md and bench/results/results.json (a --quick run writes to
a temporary folder unless --out is given). Exit status 1 if any row is an error (a probe
that did not fire exactly as expected, a case that was not in the mode it is labelled) or a
worker failed; rows that do not exist on a Python (sys.monitoring on 3.11) are "n/a".

Start-up (issue 5) is bench/startup.py's, not this suite's: it is run after the tables when
it exists, and its absence is reported.

Standard library only, Python 3.8 syntax: it starts on whatever python3 the machine has.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
SUITE = BENCH / "suite.py"
STARTUP = BENCH / "startup.py"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import report  # noqa: E402

import dev  # noqa: E402 - the venv logic lives in the checkout's dev.py

#: The peers that the bench needs on top of the project's test extras.
BENCH_PACKAGES = ("wrapt",)


def say(text: str = "") -> None:
    print(text, flush=True)


def ensure_bench_packages(venv: Path) -> None:
    python = str(dev.venv_python(venv))
    missing = [
        name
        for name in BENCH_PACKAGES
        if subprocess.call(
            [python, "-c", f"import {name}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dev.venv_env(venv),
        )
        != 0
    ]
    if missing:
        say(f"{venv.name}: installing {', '.join(missing)} (benchmark peers)")
        dev._run_quiet(
            [python, "-m", "pip", "install", "--quiet", "--no-input",
             "--disable-pip-version-check", *missing],
            f"installing {', '.join(missing)} into {venv}",
            dev.venv_env(venv),
        )


def run_worker(tag: str, python: str, env: dict[str, str], quick: bool,
               out: Path, only: str | None = None) -> tuple[dict[str, Any] | None, float, str]:
    cmd = [python, str(SUITE), "--json", str(out)]
    if quick:
        cmd.append("--quick")
    if only:
        cmd += ["--part", only]
    say(f"=== Python {tag}: {' '.join(cmd)} ===")
    start = time.monotonic()
    # Progress goes to stderr, straight through to ours.
    code = subprocess.call(cmd, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - start
    if code != 0 or not out.exists():
        return None, wall, f"the worker exited {code}"
    data = json.loads(out.read_text())
    data["wall_s"] = wall
    return data, wall, ""


def count_errors(data: dict[str, Any]) -> list[str]:
    errors = []
    for section in ("rows", "ladder", "elsewhere"):
        for r in data.get(section, []):
            if r.get("status") == "error":
                errors.append(f"{r['key']}: {'; '.join(r.get('errors', []))}")
    for s in data.get("scale", []):
        if s.get("errors"):
            errors.append(f"scale {s['count']} {s['mode']}: {'; '.join(s['errors'])}")
    early = data.get("early") or {}
    if early.get("status") == "error":
        errors.append(f"early: {early.get('reason')}")
    errors += data.get("failures", [])
    return errors


def run_startup(quick: bool) -> tuple[str, bool]:
    """bench/startup.py belongs to the early-probes work (issue 5)."""
    if not STARTUP.exists():
        return ("bench/startup.py is missing: the start-up benchmark of issue 6 (boot hook "
                "installed and unset, 16 early probes) comes with issue 5 and was not run."), True
    if quick:
        return "bench/startup.py exists; not run in a --quick run.", True
    say("=== bench/startup.py (issue 5's start-up benchmark) ===")
    code = subprocess.call([sys.executable, str(STARTUP)], cwd=str(ROOT),
                           env=dev.base_env(), stdin=subprocess.DEVNULL)
    ok = code == 0
    return (f"bench/startup.py ran and exited {code}; its results are its own "
            "(see bench/results/ for what it writes)."), ok


def describe_source(src: Path) -> str:
    """Which code is measured: the commit, and whether the sources differ from it."""
    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", *cmd], cwd=str(src), capture_output=True, text=True,
                              check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout (e.g. a `git archive` of a commit)"
    dirty = git("status", "--porcelain", "--", ".")
    return f"commit {commit}" + (" with uncommitted changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pykprobes' benchmark suite")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--python", action="append", metavar="3.N",
                        help="only this Python version (repeatable)")
    parser.add_argument("--here", action="store_true",
                        help="only the interpreter running this script, without venv set-up")
    parser.add_argument("--src", type=Path, metavar="DIR",
                        help="measure the pykprobes package in DIR (a `src` folder of another "
                        "checkout or of `git archive`) instead of the venv's editable install")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results, "
                        "a temporary folder for --quick and --only)")
    parser.add_argument("--only", choices=["scale"],
                        help="only this part of the suite (scale: the scale steps and the "
                        "memory per probe)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    partial = args.quick or args.only
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="pykprobes-bench-")) if partial
                           else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)

    targets: list[tuple[str, str, dict[str, str]]] = []
    try:
        if args.here:
            tag = "{}.{}".format(*sys.version_info[:2])
            env = dev.base_env()
            targets.append((tag, sys.executable, env))
        else:
            found = dev.find_interpreters()
            chosen = sorted(found)
            if args.python:
                chosen = [i for i in chosen if i.tag in args.python]
                missing = set(args.python) - {i.tag for i in chosen}
                if missing:
                    raise dev.DevError(f"--python {', '.join(sorted(missing))}: not found here")
            for interp in chosen:
                venv = dev.ensure_venv(interp)
                ensure_bench_packages(venv)
                targets.append((interp.tag, str(dev.venv_python(venv)), dev.venv_env(venv)))
            say()
    except dev.DevError as exc:
        print(f"bench/run.py: error: {exc}", file=sys.stderr)
        return 1

    src = (args.src or ROOT / "src").resolve()
    if args.src:
        if not (src / "pykprobes" / "__init__.py").exists():
            print(f"bench/run.py: error: no pykprobes package in {src}", file=sys.stderr)
            return 1
        for _, _, env in targets:
            env["PYTHONPATH"] = str(src)
    measured = describe_source(src)
    say(f"measuring pykprobes from {src}: {measured}")

    versions: dict[str, dict[str, Any]] = {}
    walls: dict[str, float] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pykprobes-bench-json-") as tmp:
        for tag, python, env in targets:
            data, wall, failure = run_worker(tag, python, env, args.quick,
                                             Path(tmp) / f"py{tag}.json", args.only)
            walls[tag] = wall
            if data is None:
                problems.append(f"Python {tag}: {failure}")
                continue
            versions[tag] = data
            problems += [f"Python {tag}: {e}" for e in count_errors(data)]
            say(f"=== Python {tag}: {wall:.0f} s ===")

    if args.only:
        startup_text, startup_ok = f"bench/startup.py: not run (--only {args.only}).", True
    else:
        startup_text, startup_ok = run_startup(args.quick)
    if not startup_ok:
        problems.append(startup_text)
    total = time.monotonic() - start
    results = {
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "command": "python3 bench/run.py" + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else ""),
        "wall_s": {**walls, "total": total},
        "measured": f"{src}: {measured}",
        "versions": versions,
        "startup": startup_text,
        "problems": problems,
    }
    results["preamble"] = (
        f"Generated {results['generated']} by `{results['command']}` on {results['machine']}; "
        "wall time per Python: "
        + ", ".join(f"{t} {s:.0f} s" for t, s in walls.items())
        + f", total {total:.0f} s (set-up included). pykprobes measured: {measured}. "
        "Method: docs/architecture.md, \"Costs\" "
        "(fresh code objects for every timed run, gc off, each run preceded by an unprobed "
        "run: ratio = median of T / A_adjacent, +ns = median of T - A_adjacent; rows "
        "shuffled every round). Every handler counts its calls and every probe's counters "
        "are checked after every run: `hits ok` means exact in every run. Absolute ns "
        "drift by +-30% on this shared 2-core VM; quote the ratios. Analysis and proposals: "
        "ANALYSIS.md."
    )
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = report.render(results)
    (out_dir / "RESULTS.md").write_text(markdown)
    say()
    say(markdown)
    say(f"results: {out_dir / 'RESULTS.md'} and {out_dir / 'results.json'}")
    if problems:
        say("problems:")
        for p in problems:
            say(f"  {p}")
    say(f"summary: {len(versions)} Python version(s), {len(problems)} problem(s), "
        f"{total:.0f} s")
    return 1 if problems or not versions else 0


if __name__ == "__main__":
    sys.exit(main())
