"""`pykprobes run --trigger` and `--summary` on real programs in subprocesses: the hists and
the latency summary printed at exit, no trace line from a hist-only event, the bad trigger's
message and caret."""

from __future__ import annotations

import itertools
import re
import textwrap
from pathlib import Path

from tests.cli.test_run import run, trace_lines

PROGRAM = textwrap.dedent("""
    import json, time

    def handle(size):
        time.sleep(size / 10000)
        return size

    docs = [json.dumps({"id": i, "body": "x" * (i * 97 % 3000)}) for i in range(300)]
    for d in docs:
        json.loads(d)
    for size in (1, 1, 2, 30):
        handle(size)
    print("done")
""")


def _program(tmp_path: Path) -> Path:
    path = tmp_path / "prog.py"
    path.write_text(PROGRAM)
    return path


def test_a_latency_histogram_in_two_lines(tmp_path: Path) -> None:
    prog = _program(tmp_path)
    result = run("-e", "r:json/loads json:loads d=$duration",
                 "--trigger", "loads=hist:keys=d.log2:sort=d", "--", str(prog), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert trace_lines(result.stderr) == []  # hist-only
    err = result.stderr
    assert "# events/json/loads/hist\n# event histogram\n" in err
    assert "# trigger info: hist:keys=d.log2:vals=hitcount:sort=d.log2:size=2048 [active]" in err
    rows = re.findall(r"(?m)^\{ d: ~ 2\^(\d+)\s*\} hitcount:\s+(\d+)$", err)
    exponents = [int(e) for e, _ in rows]
    assert exponents == sorted(exponents) and exponents[0] >= 8  # at least 256 ns a call
    assert sum(int(n) for _, n in rows) == 300
    assert f"Totals:\n    Hits: 300\n    Entries: {len(rows)}\n    Dropped: 0\n" in err


def test_triggers_with_keys_and_values_and_an_enabled_event(tmp_path: Path) -> None:
    prog = _program(tmp_path)
    result = run("-e", f"p:app/handle {prog.stem}:handle size",
                 "-e", "r:app/handle_ret __main__:handle d=$duration size=$retval",
                 "--trigger", "handle_ret=hist:keys=size:vals=d:sort=size",
                 "--", str(prog), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # `prog` is __main__ here: the first definition names a module never imported.
    assert [m["event"] for m in trace_lines(result.stderr)] == []
    rows = re.findall(r"(?m)^\{ size:\s+(\d+) \} hitcount:\s+(\d+)  d:\s+(\d+)$", result.stderr)
    assert [(int(s), int(n)) for s, n, _ in rows] == [(1, 2), (2, 1), (30, 1)]
    assert int(rows[-1][2]) >= 3_000_000  # handle(30) sleeps 3 ms


def test_summary_counts_and_latency_without_a_trigger(tmp_path: Path) -> None:
    prog = _program(tmp_path)
    result = run("-e", "r:app/handle __main__:handle", "-e", "p:json/dec json.decoder:"
                 "JSONDecoder.decode s:len", "--summary", "--", str(prog), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    err = result.stderr
    assert trace_lines(err) == []
    assert "app/handle: 4 calls, 0 missed\n  latency (ns)\n" in err
    assert "json/dec: 300 hits, 0 missed\n" in err
    rows = re.findall(r"(?m)^  \[(\S+), (\S+)\)\s+(\d+) \|@*\s*\|$", err)
    assert sum(int(n) for *_, n in rows) == 4
    # handle(1) sleeps 100 us, handle(30) 3 ms: from a row at 64K ns or more to one at 2M
    # or more, each bucket [2^(N-1), 2^N), consecutive.
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    lows = [int(lo[:-1]) * units[lo[-1]] if lo[-1] in units else int(lo) for lo, _, _ in rows]
    assert lows[0] >= 64 << 10 and int(rows[0][2]) >= 1
    assert lows[-1] >= 2 << 20 and int(rows[-1][2]) >= 1
    assert all(b == 2 * a for a, b in itertools.pairwise(lows))


def test_a_bad_trigger_is_one_line_and_a_caret(tmp_path: Path) -> None:
    prog = _program(tmp_path)
    result = run("-e", "r:json/loads json:loads d=$duration",
                 "--trigger", "loads=hist:keys=d.log3", "--", str(prog), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "pykprobes: error: Invalid field modifier",
        "  hist:keys=d.log3",
        "              ^",
    ]
