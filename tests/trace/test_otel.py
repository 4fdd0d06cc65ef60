"""`pykprobes run --otlp URL`: spans sent by OTLP/HTTP to a real receiver on loopback,
started here as a collector's receiver would be, decoding the protobuf with
opentelemetry-proto: names, durations, parent/child nesting of nested probed calls across
threads, attributes, span events, exception exits. And with the receiver down: the spans are
counted as dropped and the program does not wait.

The "no stall" check is timed by nature: the program times its own work (so that start-up
and the bounded exit flush are not counted), three runs each way, medians compared with a
10% margin plus 30 ms of slack for a loaded 2-core machine. Structurally, the exports are
made from the trace writer's thread and sent by the SDK's: a hit only writes its record."""

from __future__ import annotations

import gzip
import socket
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_run import run

pytest.importorskip("opentelemetry.sdk.trace",
                    reason="capability: the pykprobes[otel] extra is not installed")
trace_service = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2",
    reason="capability: opentelemetry-proto is not installed")

PROGRAM = textwrap.dedent("""
    import sys, threading, time

    def inner(n):
        time.sleep(0.002)
        return n

    def middle(n):
        return inner(n) + inner(n + 1)

    def mark(n):
        return n

    def outer(n):
        mark(n)
        return middle(n)

    def boom():
        raise ValueError("bad input")

    outer(1)
    side = threading.Thread(target=outer, args=(5,), name="side")
    side.start()
    side.join()
    try:
        boom()
    except ValueError:
        pass
""")

EVENTS = [
    "-e", "r:app/outer __main__:outer n=$arg1",
    "-e", "r:app/middle __main__:middle",
    "-e", "r:app/inner __main__:inner n=$arg1 r=$retval",
    "-e", "p:app/mark __main__:mark n",
    "-e", "r:app/boom __main__:boom",
]


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: decodes every request's spans."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.resources: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service.ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    receiver.resources.append(resource_spans.resource)
                    for scope in resource_spans.scope_spans:
                        receiver.spans.extend(scope.spans)
                reply = trace_service.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def test_nested_calls_become_nested_spans(tmp_path: Path) -> None:
    prog = tmp_path / "prog.py"
    prog.write_text(PROGRAM)
    receiver = Receiver()
    try:
        result = run(*EVENTS, "--otlp", receiver.url, "-o", str(tmp_path / "trace.txt"),
                     "--", str(prog), cwd=tmp_path)
    finally:
        receiver.close()
    assert result.returncode == 0, result.stderr
    assert "pykprobes: otlp: 9 spans, 9 exported, 0 dropped" in result.stderr
    spans = receiver.spans
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert {n: len(s) for n, s in by_name.items()} == {
        "app/outer": 2, "app/middle": 2, "app/inner": 4, "app/boom": 1}
    by_id = {span.span_id: span for span in spans}
    for inner in by_name["app/inner"]:
        middle = by_id[inner.parent_span_id]
        assert middle.name == "app/middle"
        outer = by_id[middle.parent_span_id]
        assert outer.name == "app/outer" and outer.parent_span_id == b""
        assert inner.trace_id == middle.trace_id == outer.trace_id
        assert inner.end_time_unix_nano - inner.start_time_unix_nano >= 2_000_000
        assert middle.start_time_unix_nano <= inner.start_time_unix_nano
        assert inner.end_time_unix_nano <= middle.end_time_unix_nano
        attrs = _attrs(inner)
        assert attrs["r"] == attrs["n"] and attrs["code.function"] == "__main__:inner"
        assert attrs["thread.name"] == _attrs(outer)["thread.name"]
    outers = {_attrs(o)["n"]: o for o in by_name["app/outer"]}
    assert _attrs(outers[5])["thread.name"] == "side"
    assert _attrs(outers[1])["thread.name"] == "MainThread"
    assert outers[1].trace_id != outers[5].trace_id
    for n, outer in outers.items():
        (event,) = outer.events
        assert event.name == "app/mark" and _attrs(event)["n"] == n
    (boom,) = by_name["app/boom"]
    assert boom.status.code == boom.status.STATUS_CODE_ERROR
    (exc,) = boom.events
    assert exc.name == "exception"
    assert _attrs(exc)["exception.type"] == "ValueError"
    assert _attrs(exc)["exception.message"] == "bad input"
    (resource,) = {r.SerializeToString() for r in receiver.resources}
    assert b"pykprobes" in resource


TIMED = textwrap.dedent("""
    import time

    def step(i):
        time.sleep(0.0005)
        return i

    t0 = time.perf_counter()
    for i in range(300):
        step(i)
    print(f"{time.perf_counter() - t0:.6f}")
""")


def _dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # closed: connections are refused


def test_a_dead_collector_drops_spans_and_never_stalls(tmp_path: Path) -> None:
    """A collector that refuses connections costs dropped spans, counted; one that accepts
    and never answers (where any send the program waited for would block for the exporter's
    2 s timeout) never holds the program's thread: its loop takes no longer than without
    export plus a margin far below one such wait. The cost ratio is bench's to measure."""
    prog = tmp_path / "timed.py"
    prog.write_text(TIMED)
    plain = []
    for _ in range(3):
        without = run("-e", "r:app/step __main__:step i=$arg1", "-o", str(tmp_path / "a.txt"),
                      "--", str(prog), cwd=tmp_path)
        assert without.returncode == 0, without.stderr
        plain.append(float(without.stdout))
    exported = run("-e", "r:app/step __main__:step i=$arg1", "-o", str(tmp_path / "b.txt"),
                   "--otlp", _dead_url(), "--", str(prog), cwd=tmp_path, timeout=60)
    assert exported.returncode == 0, exported.stderr
    assert "pykprobes: otlp: 300 spans, 0 exported, 300 dropped" in exported.stderr
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # accepts (the kernel completes the handshake), never answers
        url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        for _ in range(2):
            stalled = run("-e", "r:app/step __main__:step i=$arg1",
                          "-o", str(tmp_path / "c.txt"), "--otlp", url, "--", str(prog),
                          cwd=tmp_path, timeout=60)
            assert stalled.returncode == 0, stalled.stderr
            assert ", 0 exported, " in stalled.stderr
            assert float(stalled.stdout) < max(plain) + 1.0, (plain, stalled.stdout)
