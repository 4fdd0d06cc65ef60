"""The differential test of the two mechanisms (issue 16): a probe on every line address of
textwrap, fractions and difflib, their CPython tests as the workload, and per address the
same hit count under the breakpoint as under the optimizer; afterwards every function of
those modules holds its original code object. tests/core/every_line.py does one run, in a
subprocess per mechanism (both at once), so that each starts from freshly imported modules.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("textwrap", "fractions", "difflib")


def _start(mode: str) -> subprocess.Popen[str]:
    # The same hash seed for both: set and dict orders, hence the workload, are the same.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "tests.core.every_line", mode, *MODULES],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_every_line_address_counts_the_same_under_both_mechanisms() -> None:
    missing = [m for m in MODULES if importlib.util.find_spec(f"test.test_{m}") is None]
    if missing:
        pytest.skip(f"capability: this interpreter does not ship the tests of {missing}")
    procs = {mode: _start(mode) for mode in ("breakpoint", "optimized")}
    bp, opt = (_result(proc) for proc in procs.values())
    for run in (bp, opt):
        assert run["wrong"] == [] and run["rewritten"] == [] and run["left"] == ""
        assert run["faults"] == 0 and run["missed"] == 0
    assert bp["optimized"] == 0
    # Nearly every address is optimizable; the few left are served by the breakpoint.
    assert opt["optimized"] >= 0.9 * opt["probes"]
    assert bp["probes"] > 1000
    assert opt["results"] == bp["results"]
    assert all(not failed for _, _, failed in bp["results"])
    assert opt["refused"] == bp["refused"]
    assert opt["hits"].keys() == bp["hits"].keys()
    differ = {key: (n, opt["hits"][key]) for key, n in bp["hits"].items()
              if opt["hits"][key] != n}
    assert not differ, f"{len(differ)} addresses differ (breakpoint, optimized): " + \
        ", ".join(f"{key} {pair}" for key, pair in list(differ.items())[:20])
    # Most addresses run: the comparison is not one of zeros.
    assert sum(1 for n in bp["hits"].values() if n) > 0.6 * len(bp["hits"])
