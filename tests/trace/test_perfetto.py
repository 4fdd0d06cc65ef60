"""The Perfetto / Chrome Trace Event Format export, tested by structure on real program runs
(`pykprobes run --format perfetto -o trace.json` in a subprocess, and TraceFS's
`trace.json`): every slice of a thread nests, every async begin has its end, threads are
named, fields round-trip as args, and a program killed mid-run leaves a file that the
format's missing-bracket tolerance reads."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS
from tests.cli.test_run import run

PROGRAM = textwrap.dedent("""
    import json, os, signal, sys, threading, time

    def leaf(n):
        time.sleep(0.001)
        return n * 2

    def mid(n):
        return leaf(n) + leaf(n + 1)

    def top(n):
        return mid(n) + leaf(100)

    def numbers(k):
        for i in range(k):
            yield i

    def worker(base):
        for i in range(3):
            top(base + i)

    threads = [threading.Thread(target=worker, args=(b,), name=f"worker-{b}")
               for b in (10, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = numbers(3), numbers(2)
    next(first); next(second)
    assert list(second) == [1] and list(first) == [1, 2]
    json.loads('{"a": [1, 2, 3]}')
    if sys.argv[1:] == ["kill"]:
        time.sleep(0.5)  # the trace writer drains what was recorded
        os.kill(os.getpid(), signal.SIGKILL)
""")

EVENTS = [
    "-e", "r:app/top __main__:top d=$duration n=$arg1",
    "-e", "r:app/mid __main__:mid d=$duration",
    "-e", "p:app/leaf __main__:leaf n",
    "-e", "r:app/leaf_ret __main__:leaf r=$retval",
    "-e", "r:app/numbers __main__:numbers d=$duration k",
    "-e", "p:json/loads json:loads s:len",
]


def _load(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.startswith("[\n")
    if not text.rstrip().endswith("]"):
        text = text.rstrip().rstrip(",") + "]"  # the format's tolerance of a missing ]
    events = json.loads(text)
    assert isinstance(events, list)
    return events


def _check_structure(events: list[dict[str, Any]]) -> None:
    """Slices of each thread nest; async begins and ends pair; every thread is named."""
    named = {e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {e["tid"] for e in events if e["ph"] != "M"} <= named
    by_tid: dict[int, list[tuple[int, int]]] = {}
    for e in events:
        if e["ph"] == "X":
            start = round(float(e["ts"]) * 1000)
            by_tid.setdefault(e["tid"], []).append((start, start + round(float(e["dur"]) * 1000)))
    for slices in by_tid.values():
        for a_start, a_end in slices:
            for b_start, b_end in slices:
                disjoint = a_end <= b_start or b_end <= a_start
                nested = (a_start <= b_start and b_end <= a_end) or (
                    b_start <= a_start and a_end <= b_end)
                assert disjoint or nested, ((a_start, a_end), (b_start, b_end))
    begins = {e["id"] for e in events if e["ph"] == "b"}
    ends = {e["id"] for e in events if e["ph"] == "e"}
    assert begins == ends


def test_a_real_program_as_a_perfetto_trace(tmp_path: Path) -> None:
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    out = tmp_path / "trace.json"
    result = run(*EVENTS, "--format", "perfetto", "-o", str(out), "--", str(prog),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "top" in result.stderr  # the profile goes to stderr, not into the JSON
    events = _load(out)
    assert out.read_text().rstrip().endswith("]")
    _check_structure(events)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"worker-10", "worker-20", "MainThread"} <= names
    tops = [e for e in events if e["name"] == "top" and e["ph"] == "X"]
    assert sorted(e["args"]["n"] for e in tops) == [10, 11, 12, 20, 21, 22]
    assert all(e["dur"] == e["args"]["d"] / 1000 for e in tops)
    # The entry/return pair of leaf (no $duration) is a slice too, nested in its mid.
    leaf_slices = [e for e in events if e["name"] == "leaf_ret" and e["ph"] == "X"]
    assert len(leaf_slices) == 18 and all(e["dur"] >= 1000 for e in leaf_slices)
    leaf_marks = [e for e in events if e["name"] == "leaf" and e["ph"] == "i"]
    assert sorted(e["args"]["n"] for e in leaf_marks)[:2] == [10, 11]
    mids = [e for e in events if e["name"] == "mid" and e["ph"] == "X"]
    for m in mids:
        inside = [s for s in leaf_slices if s["tid"] == m["tid"]
                  and m["ts"] <= s["ts"] and s["ts"] + s["dur"] <= m["ts"] + m["dur"]]
        assert len(inside) == 2
    gens = [e for e in events if e["name"] == "numbers"]
    assert sorted(e["ph"] for e in gens) == ["b", "b", "e", "e"]
    (loads,) = [e for e in events if e["name"] == "loads"]
    assert loads["cat"] == "json" and loads["args"] == {"s": 16}


def test_a_killed_program_leaves_a_readable_trace(tmp_path: Path) -> None:
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    out = tmp_path / "trace.json"
    result = run(*EVENTS, "--format", "perfetto", "-o", str(out), "--", str(prog), "kill",
                 cwd=tmp_path)
    assert result.returncode == -signal.SIGKILL
    assert not out.read_text().rstrip().endswith("]")
    events = _load(out)
    _check_structure(events)
    assert len([e for e in events if e["name"] == "top"]) == 6


def nested(n: int) -> int:
    return nested(n - 1) + 1 if n else 0


def test_tracefs_trace_json_view(fs: TraceFS) -> None:
    fs.define(f"r:t/nested {__name__}:nested d=$duration n=$arg1")
    fs.write("events/t/nested/enable", "1")
    kp.wait_for_kprobe_optimizer()
    nested(3)
    doc = json.loads(fs.read("trace.json"))
    assert doc["displayTimeUnit"] == "ns"
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [e["args"]["n"] for e in slices] == [0, 1, 2, 3]
    _check_structure(doc["traceEvents"])
    assert os.getpid() in {e["pid"] for e in doc["traceEvents"]}


def test_perfetto_trace_processor_reads_it(tmp_path: Path, fs: TraceFS) -> None:
    binary = os.environ.get("PERFETTO_TRACE_PROCESSOR") or shutil.which("trace_processor_shell")
    if importlib.util.find_spec("perfetto") is None or binary is None:
        pytest.skip("capability: the perfetto package with a local trace_processor_shell "
                    "(its TraceProcessor downloads the binary at run time; no download here)")
    from perfetto.trace_processor import TraceProcessor, TraceProcessorConfig

    fs.define(f"r:t/nested {__name__}:nested d=$duration n=$arg1")
    fs.write("events/t/nested/enable", "1")
    nested(3)
    path = tmp_path / "trace.json"
    path.write_text(fs.read("trace.json"))
    tp = TraceProcessor(trace=str(path), config=TraceProcessorConfig(bin_path=binary))
    rows = list(tp.query("select name, depth from slice order by depth"))
    assert [r.depth for r in rows] == [0, 1, 2, 3]
