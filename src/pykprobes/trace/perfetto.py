"""Trace records as the Trace Event Format JSON that ui.perfetto.dev and chrome://tracing
open (the "JSON Array Format": `[event, event, ...`, whose closing `]` is optional).

    entry event                         ph "i" (instant, thread scope), fields as args
    return event with $duration, or     ph "X" (complete slice): ts = return - duration,
      one whose entry event (same         dur = duration, fields (and the caller) as args;
      symbol) was seen on its thread      slices of one thread nest as the calls did
    return event of generator or        ph "b"/"e" pair with an id (an async slice: a
      coroutine code                      suspended body overlaps other calls)
    other return events                 ph "i"
    each thread, at its first record    ph "M" thread_name (and the process_name once)

`ts`/`dur` are microseconds with the nanoseconds as decimals, written exactly from the
trace clock's integers. An event's group is its `cat`.

`PerfettoWriter` streams: each batch of records becomes text written at once, so memory
stays bounded by the batch (and by the entries waiting for their return: at most
PENDING_MAX per thread), and the file is a valid trace at every batch boundary: a reader
adds the optional `]` when the program was killed; `close()` writes it on exit.
`format_trace_json(records)` gives a whole snapshot as one JSON object (TraceFS's
`trace.json` view).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any, Final, Protocol

from pykprobes.trace.format import format_value

__all__ = ["PENDING_MAX", "PerfettoWriter", "TraceEvents", "format_trace_json"]

#: Entries remembered per thread while waiting for their return event.
PENDING_MAX: Final = 256
# CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR (Include/cpython/code.h).
_GENERATOR_LIKE: Final = 0x20 | 0x80 | 0x200


def _us(ns: int) -> str:
    """Nanoseconds as a JSON number of microseconds, exact."""
    sign = "-" if ns < 0 else ""
    whole, frac = divmod(abs(ns), 1000)
    return f"{sign}{whole}.{frac:03d}"


def _arg(value: Any) -> Any:
    tp = type(value)
    if tp is int or tp is bool or tp is str or value is None:
        return value
    if tp is float:
        return value if math.isfinite(value) else float.__repr__(value)
    return format_value(value)


def _is_generator_like(event: Any) -> bool:
    for probe in getattr(event, "probes", ()):
        # A kretprobe's address is its entry kprobe's, known once its module is imported.
        probe = getattr(probe, "kp", None) or probe
        code = getattr(getattr(probe, "addr", None), "code", None)
        if code is not None:
            return bool(code.co_flags & _GENERATOR_LIKE)
    return False


class TraceEvents:
    """Records -> Trace Event Format events (dicts), keeping per thread the entries that
    wait for their return, and the threads already named."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = os.getpid() if pid is None else pid
        self._named: set[int] = set()
        self._pending: dict[int, list[tuple[str, int]]] = {}
        self._next_id = 0
        #: id(event) -> whether its code is a generator's or a coroutine's.
        self._kinds: dict[int, bool] = {}

    def header(self) -> list[str]:
        return [json.dumps({"name": "process_name", "ph": "M", "pid": self.pid, "tid": 0,
                            "args": {"name": f"pykprobes {self.pid}"}})]

    def convert(self, record: Any) -> list[str]:
        """The JSON texts of one record's events."""
        ts, tid, comm, event, values, caller = record
        out: list[str] = []
        if tid not in self._named:
            self._named.add(tid)
            out.append(json.dumps({"name": "thread_name", "ph": "M", "pid": self.pid,
                                   "tid": tid, "args": {"name": comm}}))
        args = {name: _arg(v) for name, v in zip(event.fields, values, strict=False)}
        head = (f'{{"name":{json.dumps(event.name)},"cat":{json.dumps(event.group)},'
                f'"pid":{self.pid},"tid":{tid},')
        if not event.is_return:
            stack = self._pending.setdefault(tid, [])
            stack.append((event.symbol, ts))
            if len(stack) > PENDING_MAX:
                del stack[0]
            out.append(f'{head}"ph":"i","s":"t","ts":{_us(ts)},"args":{json.dumps(args)}}}')
            return out
        args["caller"] = caller
        start = self._start(event, ts, values, tid)
        if start is None:
            out.append(f'{head}"ph":"i","s":"t","ts":{_us(ts)},"args":{json.dumps(args)}}}')
        elif self._kind(event):
            self._next_id += 1
            ident = self._next_id
            out.append(f'{head}"ph":"b","id":{ident},"ts":{_us(start)},'
                       f'"args":{json.dumps(args)}}}')
            out.append(f'{head}"ph":"e","id":{ident},"ts":{_us(ts)}}}')
        else:
            out.append(f'{head}"ph":"X","ts":{_us(start)},"dur":{_us(ts - start)},'
                       f'"args":{json.dumps(args)}}}')
        return out

    def _kind(self, event: Any) -> bool:
        found = self._kinds.get(id(event))
        if found is None:
            found = self._kinds[id(event)] = _is_generator_like(event)
        return found

    def _start(self, event: Any, ts: int, values: Any, tid: int) -> int | None:
        """When the call began: ts - its $duration, or its entry event's time."""
        # The point's fetchargs as recorded ($arg* expanded), not as written.
        for arg, value in zip(event.args, values, strict=False):
            if getattr(arg, "kind", None) == "duration" and type(value) is int:
                self._drop_entry(event.symbol, tid)
                return ts - value
        return self._drop_entry(event.symbol, tid)

    def _drop_entry(self, symbol: str, tid: int) -> int | None:
        stack = self._pending.get(tid)
        if stack:
            for i in range(len(stack) - 1, -1, -1):
                if stack[i][0] == symbol:
                    start = stack[i][1]
                    del stack[i]
                    return start
        return None


class TextOut(Protocol):
    """Where a PerfettoWriter writes: a text stream, or `pykprobes run`'s output."""

    def write(self, text: str, /) -> Any: ...

    def flush(self) -> Any: ...


class PerfettoWriter:
    """Streams records into `out` (see the module docstring)."""

    def __init__(self, out: TextOut) -> None:
        self.out = out
        self.events = TraceEvents()
        self._first = True
        self._closed = False

    def _emit(self, texts: list[str]) -> None:
        if not texts:
            return
        lead = "[\n" if self._first else ",\n"
        self._first = False
        self.out.write(lead + ",\n".join(texts))
        self.out.flush()

    def start(self) -> None:
        self._emit(self.events.header())

    def write(self, records: Iterable[Any]) -> None:
        texts: list[str] = []
        for record in records:
            texts.extend(self.events.convert(record))
        self._emit(texts)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._first:
                self.out.write("[")
            self.out.write("\n]\n")
            self.out.flush()


def format_trace_json(records: Iterable[Any]) -> str:
    """A snapshot of records as one Trace Event Format JSON object."""
    events = TraceEvents()
    texts = events.header()
    for record in records:
        texts.extend(events.convert(record))
    return '{"displayTimeUnit":"ns","traceEvents":[\n' + ",\n".join(texts) + "\n]}\n"
