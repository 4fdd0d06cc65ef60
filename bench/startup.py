#!/usr/bin/env python3
"""Interpreter start-up with pykprobes installed: the cost of the start-up hook (issue 5, item
4; the `.start` entry point of PEP 829 on 3.15+: issue 10).

    python3 bench/startup.py                  # every CPython >= 3.11 here, ~1-2 min each
    python3 bench/startup.py --python 3.12    # one version (repeatable)
    python3 bench/startup.py --quick          # a smoke run (its numbers mean nothing)

For each Python it builds the pykprobes wheel from this checkout (in a copy, with the dev
venv's pip), creates three fresh virtual environments without pip: `bare` (nothing
installed), `start` (nothing but a `.start` file whose entry point is `os:getpid`: what any
`.start` file costs `site`, pykprobes or not) and `installed` (the wheel and `bytecode`,
installed by pip, which byte-compiles them; the start-up hook files `_pykprobes.pth` and
`_pykprobes.start` are then in its site-packages), and times whole processes:

    bare         bare venv       python -c pass
    any-start    start venv      python -c pass        (= bare where site has no .start files)
    unset        installed venv  python -c pass                       PYKPROBES_EVENTS unset
    early16      installed venv  python -c pass                       16 early probes set
    bare+imp     bare venv       python -c "import json, textwrap, shlex, fnmatch"
    early16+imp  installed venv  the same program, 16 early probes on those modules
                                 (imported by the program: their code is rewritten at import)

`any-start`, `unset` and `early16` are compared with `bare`, `early16+imp` with `bare+imp`.
The method is that of docs/architecture.md, "Costs": every PYTHON* (and
PYKPROBES_*) variable is removed from the children's environment (PYTHONDONTWRITEBYTECODE
would make a hook module recompile at every start), the site-packages are byte-compiled,
every variant is run a few times to warm up, then ROUNDS rounds run every variant RUNS times
each, in a shuffled order per round. Per variant: the median over all runs, min..max; against
its baseline: the **paired delta**, the median over rounds of (variant round-median -
baseline round-median), and the **ratio**, the median over rounds of (variant round-median /
baseline round-median). Each variant is checked once before timing (unset: no pykprobes
module loaded, or where site runs `.start` files only the entry point's three; early16:
early, 16 events, no warning), and a failed check makes the command exit 1.

The table is printed and written to bench/results/startup.md, the numbers to
bench/results/startup.json (with --quick: a temporary folder unless --out is given).

Standard library only, Python 3.8 syntax: it starts on whatever python3 the machine has
(bench/run.py runs it after its own tables).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

sys.path.insert(0, str(ROOT))
import dev  # noqa: E402 - the venv logic lives in the checkout's dev.py

#: 16 definitions on functions of modules that `python -c pass` does not import.
EARLY16 = [
    "p:s/e0 json:loads s",
    "p:s/e1 json:dumps obj",
    "p:s/e2 json:load fp",
    "p:s/e3 json:dump obj",
    "p:s/e4 json.decoder:JSONDecoder.decode s:len",
    "p:s/e5 json.decoder:JSONDecoder.raw_decode s:len",
    "p:s/e6 json.encoder:JSONEncoder.encode o:type",
    "p:s/e7 json.encoder:JSONEncoder.iterencode o:type",
    "p:s/e8 textwrap:dedent text:len",
    "p:s/e9 textwrap:indent text:len",
    "p:s/e10 textwrap:wrap text:len",
    "p:s/e11 textwrap:fill text:len",
    "p:s/e12 shlex:split s",
    "p:s/e13 shlex:quote s",
    "p:s/e14 shlex:join split_command",
    "p:s/e15 fnmatch:fnmatch name pat",
]
IMPORTS = "import json, textwrap, shlex, fnmatch"

#: (name, venv, program, events, baseline)
VARIANTS = [
    ("bare", "bare", "pass", None, None),
    ("any-start", "start", "pass", None, "bare"),
    ("unset", "installed", "pass", None, "bare"),
    ("early16", "installed", "pass", ";".join(EARLY16), "bare"),
    ("bare+imp", "bare", IMPORTS, None, None),
    ("early16+imp", "installed", IMPORTS, ";".join(EARLY16), "bare+imp"),
]

#: What the `.start` entry point imports when PYKPROBES_EVENTS is unset (boot/pth.py).
START_ENTRY_MODULES = "['pykprobes', 'pykprobes._version', 'pykprobes.boot']"
CHECKS = {
    # "[]" where site runs no `.start` files (make_venvs replaces it otherwise).
    "unset": ("import sys; print(sorted(m for m in sys.modules if m.startswith('pykprobes')))",
              "[]"),
    "early16": ("import pykprobes; from pykprobes.boot import stage; s = stage.status(); "
                "print(pykprobes.kprobes_is_early(), len(s['events']), s['warnings'])",
                "True 16 []"),
}


def say(text: str = "") -> None:
    print(text, flush=True)


def clean_env() -> dict[str, str]:
    """No PYTHON* (PYTHONDONTWRITEBYTECODE would recompile the hook), no PYKPROBES_*, no venv."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "PYKPROBES_")) and k != "VIRTUAL_ENV"}


def check_call(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or clean_env(),
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise dev.DevError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout}{proc.stderr}")
    return proc.stdout


def build_wheel(pip_python: Path, work: Path) -> Path:
    """The wheel of this checkout, built from a copy of it (the checkout stays clean)."""
    src = work / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(str(ROOT / name), str(src / name))
    shutil.copytree(str(ROOT / "src"), str(src / "src"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = work / "dist"
    check_call([str(pip_python), "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-input",
                "--disable-pip-version-check", "-w", str(dist), str(src)], "building the wheel")
    return next(dist.glob("pykprobes-*.whl"))


def make_venvs(interp: Any, pip_python: Path, wheel: Path, work: Path) -> dict[str, Path]:
    pythons = {}
    for name in ("bare", "start", "installed"):
        env_dir = work / f"venv-{name}"
        check_call([interp.executable, "-m", "venv", "--without-pip", str(env_dir)],
                   f"creating {name} venv")
        pythons[name] = dev.venv_python(env_dir)
    check_call([str(pip_python), "-m", "pip", "--python", str(pythons["installed"]),
                "install", "--quiet", "--no-input", "--disable-pip-version-check", "--no-deps",
                str(wheel), "bytecode==0.19.1"], "installing the wheel")
    for python in pythons.values():
        purelib = check_call([str(python), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             "asking for site-packages").strip()
        check_call([str(python), "-m", "compileall", "-q", purelib], "byte-compiling")
        if python == pythons["start"]:
            Path(purelib, "_any.start").write_text("os:getpid\n", encoding="utf-8")
    return pythons


def site_runs_start_files(python: Path) -> bool:
    """Whether this interpreter's `site` calls `.start` entry points (PEP 829), measured:
    the `start` venv's entry point imports `pkgutil` to be resolved."""
    out = check_call([str(python), "-c", "import sys; print('pkgutil' in sys.modules)"],
                     "asking whether site ran a .start file")
    return out.strip() == "True"


def variant_command(pythons: dict[str, Path], name: str) -> tuple[list[str], dict[str, str]]:
    _, venv_name, program, events, _ = next(v for v in VARIANTS if v[0] == name)
    env = clean_env()
    if events:
        env["PYKPROBES_EVENTS"] = events
        env["PYKPROBES_OUTPUT"] = os.devnull
    return [str(pythons[venv_name]), "-c", program], env


def check_variants(pythons: dict[str, Path]) -> list[str]:
    failures = []
    checks = dict(CHECKS)
    if site_runs_start_files(pythons["start"]):
        checks["unset"] = (CHECKS["unset"][0], START_ENTRY_MODULES)
    for name, (program, expected) in checks.items():
        cmd, env = variant_command(pythons, name)
        proc = subprocess.run([*cmd[:-1], program], capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, check=False)
        got = proc.stdout.strip()
        if proc.returncode != 0 or got != expected or proc.stderr.strip():
            failures.append(f"{name}: expected {expected!r}, got {got!r} "
                            f"(exit {proc.returncode}) {proc.stderr.strip()[-300:]}")
    for name, _, _, _, _ in VARIANTS:
        cmd, env = variant_command(pythons, name)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0 or proc.stdout or proc.stderr:
            failures.append(f"{name}: exit {proc.returncode}, output "
                            f"{(proc.stdout + proc.stderr).strip()[-300:]!r}")
    return failures


def time_once(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return (time.perf_counter() - start) * 1000.0


def measure(pythons: dict[str, Path], rounds: int, runs: int, warmup: int,
            seed: int) -> dict[str, Any]:
    names = [v[0] for v in VARIANTS]
    cmds = {name: variant_command(pythons, name) for name in names}
    for name in names:
        for _ in range(warmup):
            time_once(*cmds[name])
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    round_medians: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            times = [time_once(*cmds[name]) for _ in range(runs)]
            samples[name].extend(times)
            round_medians[name].append(statistics.median(times))
    rows = []
    for name, _, program, events, baseline in VARIANTS:
        row: dict[str, Any] = {
            "variant": name, "program": program, "early_probes": len(events.split(";"))
            if events else 0, "baseline": baseline,
            "median_ms": statistics.median(samples[name]),
            "min_ms": min(samples[name]), "max_ms": max(samples[name]),
            "runs": len(samples[name]),
        }
        if baseline:
            pairs = list(zip(round_medians[name], round_medians[baseline]))  # noqa: B905 - 3.8
            row["paired_delta_ms"] = statistics.median(v - b for v, b in pairs)
            row["ratio"] = statistics.median(v / b for v, b in pairs)
        rows.append(row)
    return {"rows": rows, "rounds": rounds, "runs_per_round": runs, "warmup": warmup}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| python | variant | program | early probes | median ms | min..max ms "
        "| paired delta | ratio | baseline |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        for r in res["rows"]:
            delta = f"{r['paired_delta_ms']:+.2f} ms" if "paired_delta_ms" in r else "-"
            ratio = f"{r['ratio']:.3f}x" if "ratio" in r else "-"
            program = "-c pass" if r["program"] == "pass" else f'-c "{r["program"]}"'
            lines.append(
                f"| {res['python']} | {r['variant']} | `{program}` | {r['early_probes']} "
                f"| {r['median_ms']:.2f} | {r['min_ms']:.2f}..{r['max_ms']:.2f} | {delta} "
                f"| {ratio} | {r['baseline'] or '-'} |")
    return "\n".join(lines) + "\n"


def describe_source() -> str:
    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", *cmd], cwd=str(ROOT), capture_output=True, text=True,
                              check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "src", "setup.py", "pyproject.toml")
    return f"commit {commit}" + (" with uncommitted changes to the package" if dirty else "")


def write_results(out_dir: Path, results: list[dict[str, Any]], args: argparse.Namespace,
                  failures: list[str]) -> None:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = {
        "date": when, "source": describe_source(), "machine": platform.platform(),
        "cpus": os.cpu_count(), "rounds": args.rounds, "runs_per_round": args.runs,
        "quick": args.quick, "early_definitions": EARLY16, "imports": IMPORTS,
        "failures": failures,
    }
    (out_dir / "startup.json").write_text(json.dumps({"meta": meta, "results": results},
                                                     indent=1) + "\n")
    text = [
        "# Interpreter start-up with pykprobes installed",
        "",
        f"Run of {when} ({meta['source']}; {meta['machine']}, {meta['cpus']} CPUs), "
        f"by `python3 bench/startup.py`{' --quick' if args.quick else ''}: "
        f"{args.rounds} rounds x {args.runs} runs per variant, shuffled per round, after "
        f"{args.warmup} warm-up runs; PYTHON* and PYKPROBES_* removed, site-packages "
        "byte-compiled. **paired delta** = median over rounds of (variant round-median - "
        "baseline round-median); **ratio** = median over rounds of their quotient. See the "
        "script's docstring for the variants.",
        "",
        table(results),
        "The 16 early probes (`PYKPROBES_EVENTS`, joined by `;`):",
        "",
        *[f"    {d}" for d in EARLY16],
        "",
    ]
    if failures:
        text += ["**Checks that failed:**", "", *[f"- {f}" for f in failures], ""]
    (out_dir / "startup.md").write_text("\n".join(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", metavar="3.N",
                        help="only this Python version (repeatable)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", type=int, default=10, help="runs per variant per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 runs")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.runs, args.warmup = 3, 3, 1
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="pykprobes-startup-")) if args.quick
                           else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        found = dev.find_interpreters()
        if args.python:
            found = [i for i in found if i.tag in args.python]
            if not found:
                raise dev.DevError(f"--python {', '.join(args.python)}: not found here")
        for interp in sorted(found):
            dev_venv = dev.ensure_venv(interp)
            with tempfile.TemporaryDirectory(prefix="pykprobes-startup-") as tmp:
                work = Path(tmp)
                say(f"=== Python {interp.full_version}: building the wheel, three venvs ===")
                wheel = build_wheel(dev.venv_python(dev_venv), work)
                pythons = make_venvs(interp, dev.venv_python(dev_venv), wheel, work)
                bad = check_variants(pythons)
                failures += [f"{interp.tag} {f}" for f in bad]
                for f in bad:
                    say(f"  check failed: {f}")
                say(f"  timing {len(VARIANTS)} variants: {args.rounds} rounds x {args.runs} "
                    "runs")
                res = measure(pythons, args.rounds, args.runs, args.warmup, args.seed)
                res["python"] = interp.full_version
                results.append(res)
                say(table([res]))
    except dev.DevError as exc:
        print(f"startup.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
    write_results(out_dir, results, args, failures)
    say(table(results))
    say(f"written: {out_dir / 'startup.md'}, {out_dir / 'startup.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
