"""Multiprobe events (one Event, several ProbePoints) with what issue 14 gave events: the
event's hist triggers count the hits of every point (compiled per point where it can be),
`$duration` is each point's own call instance, span mode and OpenTelemetry nest calls across
points, the summary counts every point, Perfetto reads a point's expanded fetchargs, and a
module's re-import keeps what the event asked its entry handlers for."""

from __future__ import annotations

import importlib
import json
import re
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS

MS = 1_000_000


def one(n: int, name: str) -> int:
    return n


def two(n: int, name: str) -> int:
    return n + 0


def inner(pause: float) -> float:
    time.sleep(pause)
    return pause


def outer(pause: float) -> float:
    time.sleep(pause)
    inner(pause / 4)
    return pause


def _define(fs: TraceFS, *lines: str) -> Any:
    for line in lines:
        fs.write("kprobe_events", line + "\n", append=True)
    event = fs.event(lines[0].split()[0].partition(":")[2])
    assert len(event.points) == len(lines)
    return event


def _records(fs: TraceFS, event: Any) -> list[Any]:
    return [r for r in fs.buffer.snapshot() if r[3].event is event]


def test_a_trigger_counts_the_hits_of_every_point(fs: TraceFS) -> None:
    event = _define(fs, f"p:t/both {__name__}:one n name:str",
                    f"p:t/both {__name__}:two n name:str")
    fs.write("events/t/both/trigger", "hist:keys=name:vals=n")
    kp.wait_for_kprobe_optimizer()
    for _ in range(5):
        one(1, "a")
        two(2, "a")
        two(3, "b")
    text = fs.read("events/t/both/hist")
    rows = {name: (int(hits), int(n)) for name, hits, n in
            re.findall(r"\{ name: (\w+)\s*\} hitcount:\s+(\d+)\s+n:\s+(\d+)", text)}
    assert rows == {"a": (10, 15), "b": (5, 15)}
    assert "Hits: 15\n" in text
    assert _records(fs, event) == [] and fs.read("events/t/both/enable") == "0\n"
    # One profile line per point, each with its own hits; the event's are their sum.
    profile = [line.split() for line in fs.read("kprobe_profile").splitlines()]
    assert [row[-2] for row in profile if row[-3] == "both"] == ["5", "10"]
    assert event.hits == 15
    # Hist-only: each point's compiled call counts into the one table.
    compiled = [point._recorded() for point in event.points]
    assert compiled == [5, 10]


def test_a_point_appended_to_a_triggered_event_is_armed_and_counted(fs: TraceFS) -> None:
    fs.write("kprobe_events", f"p:t/late {__name__}:one n name:str\n", append=True)
    fs.write("events/t/late/trigger", "hist:keys=n")
    fs.write("kprobe_events", f"p:t/late {__name__}:two n name:str\n", append=True)
    kp.wait_for_kprobe_optimizer()
    one(1, "x")
    two(2, "x")
    assert "Hits: 2\n    Entries: 2\n" in fs.read("events/t/late/hist")
    # The last trigger gone, the event is disarmed with all its points.
    fs.write("events/t/late/trigger", "!hist:keys=n", append=True)
    one(1, "x")
    two(2, "x")
    event = fs.event("t/late")
    assert event._armed is False and event.hits == 2
    assert all(p.flags & kp.KPROBE_FLAG_DISABLED for p in event.probes)


def test_each_point_times_its_own_calls(fs: TraceFS) -> None:
    event = _define(fs, f"r:t/naps {__name__}:outer d=$duration p=$retval",
                    f"r:t/naps {__name__}:inner d=$duration p=$retval")
    event.enable()
    kp.wait_for_kprobe_optimizer()
    outer(0.02)
    records = _records(fs, event)
    # Inner returns first; each record names its own point, both the one event.
    assert [r[3].symbol for r in records] == [f"{__name__}:inner", f"{__name__}:outer"]
    assert {r[3].name for r in records} == {"naps"}
    (d_inner, p_inner), (d_outer, p_outer) = (r[4] for r in records)
    assert (p_inner, p_outer) == (0.005, 0.02)
    assert d_inner >= 5 * MS
    assert d_outer >= 25 * MS and d_outer > d_inner


def test_a_trigger_keys_every_points_duration(fs: TraceFS) -> None:
    _define(fs, f"r:t/lat {__name__}:outer d=$duration",
            f"r:t/lat {__name__}:inner d=$duration")
    fs.write("events/t/lat/trigger", "hist:keys=d.log2")
    outer(0.004)
    text = fs.read("events/t/lat/hist")
    rows = [(int(e), int(n)) for e, n in
            re.findall(r"\{ d: ~ 2\^(\d+)\s*\} hitcount:\s+(\d+)", text)]
    assert "Hits: 2\n" in text and sum(n for _, n in rows) == 2
    # inner sleeps 1 ms (2^20 ns), outer 5 ms in all (2^23 > 2^22): lower bounds only (a
    # slow machine may put both in one bucket).
    assert min(e for e, _ in rows) >= 20 and max(e for e, _ in rows) >= 22


def test_span_mode_nests_calls_across_points(fs: TraceFS) -> None:
    event = _define(fs, f"r:t/calls {__name__}:outer p=$retval",
                    f"r:t/calls {__name__}:inner p=$retval")
    event.set_span_mode()
    event.enable()
    kp.wait_for_kprobe_optimizer()
    outer(0.001)
    records = _records(fs, event)
    assert len(records) == 2
    (_, i_number, i_parent, i_root, _, _), (_, o_number, o_parent, o_root, _, _) = (
        r[4][1:] for r in records)
    assert i_parent == o_number == o_root == i_root and o_parent == 0
    assert i_number != o_number
    # The span values do not show in the text lines.
    lines = [ln for ln in fs.read("trace").splitlines() if " calls: " in ln]
    assert [ln.rsplit(")", 1)[1] for ln in lines] == [" p=0.00025", " p=0.001"]


def test_spans_of_a_multiprobe_event_nest_in_opentelemetry(fs: TraceFS) -> None:
    pytest.importorskip("opentelemetry.sdk.trace",
                        reason="capability: the otel extra (pykprobes[otel]) is not installed")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from pykprobes.trace.otel import OtlpExport

    event = _define(fs, f"r:t/spans {__name__}:outer p=$retval",
                    f"r:t/spans {__name__}:inner p=$retval")
    event.set_span_mode()
    event.enable()
    kp.wait_for_kprobe_optimizer()
    outer(0.001)
    memory = InMemorySpanExporter()
    export = OtlpExport("http://127.0.0.1:9", exporter=memory, schedule_delay_ms=10)
    export.write(_records(fs, event))
    export.close()
    spans = {s.attributes["code.function"]: s for s in memory.get_finished_spans()}
    assert set(spans) == {f"{__name__}:outer", f"{__name__}:inner"}
    child, parent = spans[f"{__name__}:inner"], spans[f"{__name__}:outer"]
    assert child.parent is not None and child.parent.span_id == parent.context.span_id
    assert child.context.trace_id == parent.context.trace_id
    assert {s.name for s in spans.values()} == {"t/spans"}


def test_the_summary_counts_every_point(fs: TraceFS) -> None:
    from pykprobes.trace.summary import format_summary

    event = _define(fs, f"r:t/sum {__name__}:outer", f"r:t/sum {__name__}:inner")
    event.summarize()
    for _ in range(3):
        outer(0.001)
    assert event.latency is not None and sum(event.latency) == 6
    assert event.hits == 6 and _records(fs, event) == []
    assert format_summary([event]).startswith("t/sum: 6 calls, 0 missed\n  latency (ns)\n")


def test_perfetto_reads_a_points_expanded_fetchargs(fs: TraceFS) -> None:
    event = _define(fs, f"r:t/star {__name__}:two $arg* d=$duration")
    assert event.fields == ("n", "name", "d")
    event.enable()
    two(7, "seven")
    doc = json.loads(fs.read("trace.json"))
    (call,) = [e for e in doc["traceEvents"] if e.get("name") == "star"]
    assert call["ph"] == "X" and call["args"]["n"] == 7 and call["args"]["name"] == "seven"
    assert round(call["dur"] * 1000) == call["args"]["d"] > 0


MOD = "multiprobe_hist_mod"
SOURCE = """
import time

def work(n):
    time.sleep(0.001)
    return n
"""


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MOD, on sys.path and not imported yet; forgotten afterwards."""
    (tmp_path / f"{MOD}.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MOD
    sys.modules.pop(MOD, None)


def test_a_reimported_module_keeps_the_entry_stamps(fs: TraceFS, module: str) -> None:
    importlib.import_module(MOD)
    event = _define(fs, f"r:t/mod {MOD}:work")
    event.summarize()  # stamps every call's entry: no $duration in the definition
    event.set_span_mode()
    sys.modules[MOD].work(1)
    del sys.modules[MOD]
    module = importlib.import_module(MOD)  # the point registers new probes on the new code
    module.work(2)
    module.work(3)
    assert event.latency is not None and sum(event.latency) == 3
    assert all(rp.entry_handler is not None for rp in event.probes)
    assert event.latency.index(max(event.latency)) >= 20  # ~1 ms each: from real stamps
