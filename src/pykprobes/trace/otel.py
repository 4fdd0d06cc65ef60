"""OpenTelemetry export: trace records -> spans, sent by OTLP/HTTP (`pykprobes run --otlp
URL`, or this API). Needs the optional extra `pip install pykprobes[otel]`
(opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http), imported only here, only
when an export is made.

    return event    a span: name = the event, start = the call's entry, end = its return
                    (the trace clock, moved to the epoch), attributes = the fetched fields,
                    `thread.id`, `thread.name`, `code.function`; an exception exit adds the
                    `exception` event (`exception.type`, `exception.message`: what
                    `record_exception` records, without keeping the program's exception
                    object) and the ERROR status
    entry event     a span event on the span of the call it happened in (the nearest
                    enclosing call of a return event in span mode), or, outside any, a
                    zero-length span of its own
    nesting         a call's span is the child of the nearest enclosing call's span, found
                    at the call's entry by walking up its frames (events.py
                    `set_span_mode`), so nested probed calls nest, across events and in
                    each thread, and a suspended generator parents nothing

The probed program never waits for the network, and pays no span's cost: a hit only writes
its record (with a few more values) into the trace buffer, as any event's. The spans are made
by `OtlpExport.write(records)`, called by the thread that drains the buffer (cli/run.py's
writer), and sent by the SDK's BatchSpanProcessor from its own thread. A collector that is
down costs the spans it would have received: counted (`dropped`), never a stall; `close()`
waits at most CLOSE_WAIT seconds for the last batch.

The span ids: each call gets a span number at entry; its span id and its trace id (that of
its root call) are derived from the numbers (and a random per-export base), so that a child,
which returns before its parent, names a parent span not made yet.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import time
from collections.abc import Iterable
from typing import Any, Final

from pykprobes.trace.format import format_value

__all__ = ["CLOSE_WAIT", "OtlpExport", "available"]

#: Seconds `close()` waits for the last export.
CLOSE_WAIT: Final = 3.0
#: Entry events kept while waiting for their enclosing span's return.
PENDING_EVENTS_MAX: Final = 4096
_MASK64: Final = (1 << 64) - 1


def available() -> str | None:
    """None when the OTLP export can be made, else why not (the extra is missing)."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        return f"{exc}: install the extra, pip install 'pykprobes[otel]'"
    return None


def _attribute(value: Any) -> Any:
    tp = type(value)
    if tp is int or tp is bool or tp is str:
        return value
    if tp is float:
        return value if math.isfinite(value) else float.__repr__(value)
    return format_value(value)


class OtlpExport:
    """Records -> spans -> OTLP/HTTP at `endpoint` (the collector's base URL, e.g.
    `http://localhost:4318`, or its full `/v1/traces` URL). `exporter` replaces the OTLP
    exporter (any SDK SpanExporter)."""

    def __init__(self, endpoint: str, service_name: str = "pykprobes",
                 exporter: Any = None, schedule_delay_ms: int = 500,
                 export_timeout_s: float = 2.0) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.id_generator import IdGenerator
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            set_span_in_context,
        )

        from pykprobes._version import __version__

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = endpoint.rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            exporter = OTLPSpanExporter(endpoint=url, timeout=export_timeout_s)

        counts = self

        class Counting(SpanExporter):
            """The exporter, counting what it sent and what it could not."""

            def export(self, spans: Any) -> Any:
                counts.export_threads.add(threading.current_thread().name)
                try:
                    result = exporter.export(spans)
                except Exception:  # noqa: BLE001 - a failed export is dropped spans
                    result = SpanExportResult.FAILURE
                if result == SpanExportResult.SUCCESS:
                    counts.exported += len(spans)
                else:
                    counts.failed += len(spans)
                return result

            def shutdown(self) -> None:
                exporter.shutdown()

        class Ids(IdGenerator):
            """Hands out the ids `write` chose for the span being started."""

            def __init__(self) -> None:
                self.span_id = 1
                self.trace_id = 1

            def generate_span_id(self) -> int:
                return self.span_id

            def generate_trace_id(self) -> int:
                return self.trace_id

        self._ids = Ids()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name,
                                      "process.pid": os.getpid()}),
            id_generator=self._ids,
            # Ours to close, with a bounded wait (the SDK's atexit shutdown would wait for a
            # dead collector's retries).
            shutdown_on_exit=False)
        self.processor = BatchSpanProcessor(Counting(), schedule_delay_millis=schedule_delay_ms)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("pykprobes", __version__)
        self._api = (NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
                     set_span_in_context)
        #: Spans made, sent, not sent (the collector failed); names of the exporting threads.
        self.created = 0
        self.exported = 0
        self.failed = 0
        self.export_threads: set[str] = set()
        #: Entry events waiting for their span: span number -> [(name, ns, attributes)].
        self._pending: dict[int, list[tuple[str, int, dict[str, Any]]]] = {}
        self._npending = 0
        # The trace clock (CLOCK_MONOTONIC) to the epoch, as OTLP wants its times.
        self._epoch = time.time_ns() - time.monotonic_ns()
        self._span_base = secrets.randbits(64) | 1
        self._trace_base = secrets.randbits(128)
        self._closed = False

    @property
    def dropped(self) -> int:
        """Spans made but not received by the collector (so far: not yet sent counts)."""
        return self.created - self.exported

    def _span_id(self, number: int) -> int:
        return ((number * 0x9E3779B97F4A7C15) ^ self._span_base) & _MASK64 or 1

    def _trace_id(self, root: int) -> int:
        return (self._trace_base ^ (root * 0x9E3779B97F4A7C15)) or 1

    def write(self, records: Iterable[Any]) -> None:
        """Make the spans of these records (from events in span mode; others are
        skipped). Never raises."""
        for record in records:
            try:
                self._write(record)
            except Exception:  # noqa: BLE001 - one bad record costs its span only
                continue

    def _write(self, record: Any) -> None:
        ts, tid, comm, event, values, caller = record
        if not getattr(event, "span_mode", False):
            return
        nfields = len(event.fields)
        fields, extra = values[:nfields], values[nfields:]
        attributes = {name: _attribute(v) for name, v in zip(event.fields, fields,
                                                             strict=False)}
        attributes["thread.id"] = tid
        attributes["thread.name"] = comm
        attributes["code.function"] = event.symbol
        name = f"{event.group}/{event.name}"
        if not event.is_return:
            parent, root = extra[0], extra[1]
            if parent:
                waiting = self._pending.setdefault(parent, [])
                if self._npending < PENDING_EVENTS_MAX:
                    waiting.append((name, ts, attributes))
                    self._npending += 1
                return
            self._span(name, ts, ts, attributes, 0, 0, 0, "", "", [])
            return
        start, number, parent, root, exc_type, exc_message = extra[:6]
        if caller is not None:
            attributes["code.caller"] = caller
        events = self._pending.pop(number, [])
        self._npending -= len(events)
        self._span(name, start or ts, ts, attributes, number, parent, root, exc_type,
                   exc_message, events)

    def _span(self, name: str, start: int, end: int, attributes: dict[str, Any], number: int,
              parent: int, root: int, exc_type: str, exc_message: str,
              events: list[tuple[str, int, dict[str, Any]]]) -> None:
        (NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags,
         set_span_in_context) = self._api
        ids = self._ids
        ids.span_id = self._span_id(number) if number else self._span_id(
            (1 << 62) + self.created)
        ids.trace_id = self._trace_id(root) if root else self._trace_id(
            (1 << 62) + self.created)
        context = None
        if parent:
            context = set_span_in_context(NonRecordingSpan(SpanContext(
                trace_id=ids.trace_id, span_id=self._span_id(parent), is_remote=False,
                trace_flags=TraceFlags(TraceFlags.SAMPLED))))
        span = self.tracer.start_span(name, context=context, kind=SpanKind.INTERNAL,
                                      attributes=attributes, start_time=start + self._epoch)
        for ev_name, ev_ts, ev_attributes in events:
            span.add_event(ev_name, ev_attributes, timestamp=ev_ts + self._epoch)
        if exc_type:
            span.add_event("exception", {"exception.type": exc_type,
                                         "exception.message": exc_message,
                                         "exception.escaped": True},
                           timestamp=end + self._epoch)
            span.set_status(Status(StatusCode.ERROR, f"{exc_type}: {exc_message}"))
        span.end(end_time=end + self._epoch)
        self.created += 1

    def close(self) -> None:
        """Send what is left, waiting at most CLOSE_WAIT seconds: the SDK's worker is a
        daemon thread, so that a collector that does not answer cannot hold the process
        (and no thread can be started at exit, where this runs)."""
        if self._closed:
            return
        self._closed = True
        self.processor.force_flush(timeout_millis=int(CLOSE_WAIT * 1000))

    def report(self) -> str:
        threads = ", ".join(sorted(self.export_threads)) or "none"
        return (f"pykprobes: otlp: {self.created} spans, {self.exported} exported, "
                f"{self.dropped} dropped (exported from: {threads})\n")
