"""The benchmark suite's quick mode runs on this Python and every hit count is exact.

It asserts behaviour, not speed: bench/run.py --quick --here in a subprocess must exit 0,
and its results must have no row in error (a probe that did not fire exactly as expected,
a case not in the mode it is labelled) and an exact hit count on every measured row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "bench" / "run.py"


def test_quick_bench_runs_and_every_hit_count_is_exact(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYKPROBES_") and k not in ("PYTHONPATH", "PYTHONOPTIMIZE")}
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--here", "--out", str(tmp_path)],
        cwd=str(ROOT),
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["problems"] == []
    tag = f"{sys.version_info[0]}.{sys.version_info[1]}"
    data = results["versions"][tag]
    rows = data["rows"] + data["ladder"] + data["elsewhere"]
    measured = [r for r in rows if r["status"] != "n/a"]
    assert all(r["status"] == "ok" for r in measured), [r for r in measured if r["status"] != "ok"]
    assert all(r["hits"].startswith("ok") for r in measured)
    # The pykprobes rows exist on every Python: none of them may be n/a.
    keys = {r["key"] for r in measured}
    assert {"K1o", "K1b", "K2o", "K2b", "K3o", "K3b", "R1o", "R1b", "R2o", "R2b", "E1o",
            "E1b", "J1o", "J1b", "A", "H"} <= keys
    assert all(s["hits"].startswith("ok") and not s["errors"] for s in data["scale"])
    assert (tmp_path / "RESULTS.md").read_text().startswith("# pykprobes benchmark results")
