"""Probe events: a definition, its compiled fetchargs and the probes that record it
(kernel/trace/trace_kprobe.c).

An event is a client of the core's public API: defining one registers its probes
*disabled* (so that a bad target fails at definition, and a probe on a module that is not
imported yet waits for it), enabling it enables them. A hit fetches the arguments (never
raising), applies the filter, and writes one record into the trace buffer.

The compiled event: when every fetcharg of an entry event is rooted at an argument, its
probes offer the optimizer a compiled call (`Kprobe.compile_call`, core/arch.py
CompiledCall): the rewritten code loads the arguments itself and calls the event's
recorder (backend.Recorder: C, or its Python fallback) with them, which records without a
frame object, a Regs or f_locals. The recorder hands the hit back to the careful path
(the probe's handler, `_hit`) whenever that path has something to do: a filter, tracing
off, a probe handler running in some thread (the reentrancy rule: `core.site._busy` and
`_held`).

Triggers (trace/hist.py): every hit of an event runs its hist triggers, whether or not the
event is enabled; its probes are armed while it is enabled *or* has a trigger (the kernel's
soft-enabled event), and a hit writes a trace record only while it is enabled. A hist-only
event whose one trigger counts plain fields is compiled too: its recorder is a
hist.HistRecorder, which counts into the trigger's table instead of writing a record.

`$duration` (return events): the kretprobe's entry handler stamps the call's instance with
the trace clock; the return hit puts `now - stamp` at the field's place, converted by its
type. A call has a stamp exactly when it has an instance (entered while the event's probes
were armed, within maxactive); a return without a stamp records FAULT. The value is
supplied by the hit path, not fetched from the frame, so that a compiled return event
(rewritten code keeping the entry time in the frame) can pass it the same way.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pykprobes as kp
from pykprobes import grammar
from pykprobes.core.site import _busy, _held
from pykprobes.errors import KprobeError, ParseError
from pykprobes.trace import backend, fetchargs
from pykprobes.trace.buffer import TraceBuffer, fixed_size, values_size
from pykprobes.trace.cmdlines import resolve
from pykprobes.trace.recorder import KIND_CONVERT, KIND_DESCRIBE, KIND_FLOAT, KIND_INT, KIND_STR
from pykprobes.trace.safe import FAULT, describe
from pykprobes.trace.types import TYPES

# ftrace's clock counts from boot: CLOCK_MONOTONIC is the same on Linux.
if TYPE_CHECKING:
    # trace/hist.py is imported when a trigger is written: the boot stage's early events
    # load this module and must not pay for hists (tests/boot/test_import_weight.py).
    from pykprobes.trace import hist

_time_ns = time.monotonic_ns
_thread_key = backend.thread_key
#: The key of a call's entry time in its KretprobeInstance.data.
ENTRY_NS = "pykprobes.entry_ns"
#: The key of a call's span ids (trace/otel.py) in its KretprobeInstance.data.
SPAN = "pykprobes.span"
#: The calls of span-mode events in flight: id(frame) -> (span number, root span number,
#: the frame's code): a call's parent is the nearest frame above it found here (any event,
#: any thread: a frame is one call). Filled at entry, emptied at return. Keyed by id, not
#: by frame, so that a call that never returns (unregistered in flight) keeps no frame
#: alive; its code is checked so that a later frame at the same address is not taken for
#: it. Bounded: past SPAN_OPEN_MAX the older half is forgotten.
_open_spans: dict[int, tuple[int, int, Any]] = {}
SPAN_OPEN_MAX = 1 << 16
_span_numbers = itertools.count(1)  # next() is atomic under the GIL
#: Frames walked up to find a parent span.
SPAN_WALK_MAX = 64

#: The fetch types whose exact builtin values the recorder stores as they are.
_KINDS: dict[str | None, int] = {
    None: KIND_DESCRIBE, "int": KIND_INT, "float": KIND_FLOAT, "str": KIND_STR,
    "string": KIND_STR,
}


class Event:
    """One probe event: `GRP/EVENT`."""

    def __init__(self, definition: grammar.ProbeDef, buffer: TraceBuffer, event_id: int) -> None:
        self.definition = definition
        self.group: str = definition.group
        self.name: str = definition.event
        self.id = event_id
        self.is_return: bool = definition.kind == "r"
        self.buffer = buffer
        self.fields: tuple[str, ...] = tuple(a.name for a in definition.args)
        self.enabled = False
        self.filter_text = "none"
        self.filter: Callable[[dict[str, Any]], bool] | None = None
        #: The event's hist triggers (trace/hist.py), in the order written.
        self.triggers: list[Any] = []
        #: Whether the probes are enabled (the event is enabled or has a trigger).
        self._armed = False
        #: (field index, converter) of each $duration field.
        self._duration_at: tuple[tuple[int, Callable[[Any], Any]], ...] = tuple(
            (i, describe if a.type is None else TYPES[a.type])
            for i, a in enumerate(definition.args) if a.kind == "duration")
        #: Counted for the summary (trace/summary.py): the event is armed, its hits counted.
        self.summarized = False
        #: Span mode (trace/otel.py): each record carries SPAN_VALUES more values after
        #: its fields, which the text formats do not show.
        self.span_mode = False
        #: A log2 histogram of the calls' durations (return events), counted at every
        #: return while set (the summary).
        self.latency: list[int] | None = None
        self.probes: list[Any] = []
        self.symbol: str = definition.target.partition("+")[0]
        self.offset: int = definition.offset
        #: Records written by the careful path (`nhit` adds the recorders').
        self._nwritten = 0
        #: id(code) -> (code, recorder, variables): the compiled call offered for a code
        #: (a backend.Recorder, or a hist.HistRecorder whose `call` is offered).
        self._compiled: dict[int, tuple[Any, Any, tuple[str, ...]]] = {}
        #: The size estimate of every record (buffer.fixed_size), or None: per record.
        self.size: int | None = fixed_size((a.type for a in definition.args), self.is_return)
        self._fetch: Callable[[Any], tuple[Any, ...]] = lambda regs: ()

    # ------------------------------------------------------------------ setup

    def prepare(self) -> None:
        """Resolve the target, compile the fetchargs and register the probes, disabled.
        Raises ParseError (a bad fetcharg) or KprobeError (a bad target)."""
        d = self.definition
        if d.target_kind == "line":
            spec = f"{d.path}:{d.line}"
            self.symbol = spec
            try:
                addrs = kp.resolve_line(spec)
            except KprobeError:
                # Not imported yet: wait for the import, one symbol probe per address.
                found = kp.line_symbols(spec)
                code = None
                self.offset = found[0][2]
                specs: list[dict[str, Any]] = [
                    {"symbol_name": f"{module}:{qualname}", "offset": off}
                    for module, qualname, off in found]
            else:
                code = addrs[0].code
                self.offset = addrs[0].offset
                specs = [{"addr": a} for a in addrs]
        else:
            code = None
            specs = [{"symbol_name": f"{d.module}:{d.qualname}", "offset": d.offset}]
        # Compiled before registering (a bad fetcharg must not leave probes behind), and
        # again with the resolved code once it is known, to check names and $argN against it.
        self._fetch = fetchargs.compile_fetchargs(d.args, is_return=self.is_return,
                                                  text=d.text, code=code)
        probes: list[Any] = []
        for spec in specs:
            if self.is_return:
                probes.append(kp.Kretprobe(
                    handler=self._ret_hit, maxactive=d.maxactive,
                    entry_handler=self._ret_entry if self._duration_at else None, **spec))
            else:
                probe = kp.Kprobe(pre_handler=self._hit, flags=kp.KPROBE_FLAG_DISABLED, **spec)
                probe.compile_call = self.compile_call
                probes.append(probe)
        if self.is_return:
            kp.register_kretprobes(probes)
            for rp in probes:
                kp.disable_kretprobe(rp)
        else:
            kp.register_kprobes(probes)
        self.probes = probes
        resolved = getattr(probes[0], "addr", None)
        if code is None and isinstance(resolved, kp.ProbeAddress):
            try:
                self._fetch = fetchargs.compile_fetchargs(
                    d.args, is_return=self.is_return, text=d.text, code=resolved.code)
            except ParseError:
                self.release()
                raise

    def release(self) -> None:
        if self.is_return:
            kp.unregister_kretprobes(self.probes)
        else:
            kp.unregister_kprobes(self.probes)
        self.probes = []
        self.enabled = False
        self.triggers = []
        self._armed = False
        self._refresh()

    def enable(self) -> None:
        if not self.enabled:
            self.enabled = True
            self._update()

    def disable(self) -> None:
        if self.enabled:
            self.enabled = False
            self._update()

    def _update(self) -> None:
        """Arm the probes while the event is enabled or has a trigger, and tell the
        recorders what they may do now."""
        armed = self.enabled or bool(self.triggers) or self.summarized
        if armed and not self._armed:
            for p in self.probes:
                if self.is_return:
                    kp.enable_kretprobe(p)
                else:
                    kp.enable_kprobe(p)
        elif not armed and self._armed:
            # The recorders first: a frame still running a rewritten version hands its
            # hits to the careful path, which sees the probe disabled.
            self._armed = False
            self._refresh()
            for p in self.probes:
                if self.is_return:
                    kp.disable_kretprobe(p)
                else:
                    kp.disable_kprobe(p)
        self._armed = armed
        self._refresh()

    def stamp_entries(self) -> None:
        """Stamp every call's entry time, as $duration does (for a duration without the
        field: the latency summary, Perfetto slices, OpenTelemetry spans)."""
        for p in self.probes:
            if self.is_return:
                p.entry_handler = self._ret_entry

    def summarize(self) -> None:
        """Count the event's hits and, for a return event, a log2 histogram of the calls'
        durations into `latency`, without writing records unless the event is enabled."""
        self.summarized = True
        if self.is_return:
            self.latency = [0] * 65
            self.stamp_entries()
        self._update()

    def set_span_mode(self) -> None:
        """Make every record carry what a span needs (trace/otel.py): a return event's
        records end with (entry ns, span number, parent span number, root span number,
        exception type name, exception message), an entry event's with (parent span
        number, root span number); 0 for none. The parent is the nearest enclosing call of
        a span-mode return event: found at entry by walking up the frames, so that a
        suspended generator or coroutine is no one's parent."""
        self.span_mode = True
        for p in self.probes:
            if self.is_return:
                p.entry_handler = self._span_entry
        self._refresh()

    def _span_entry(self, ri: Any, regs: Any) -> None:
        frame = regs.frame
        ri.data[ENTRY_NS] = _time_ns()
        parent, root = _enclosing_span(frame.f_back)
        number = next(_span_numbers)
        span = (number, parent, root or number)
        ri.data[SPAN] = span
        if len(_open_spans) >= SPAN_OPEN_MAX:
            for key in list(_open_spans)[: SPAN_OPEN_MAX // 2]:
                _open_spans.pop(key, None)
        _open_spans[id(frame)] = (number, span[2], frame.f_code)

    def write_trigger(self, text: str, named: hist.NamedTables, append: bool = True) -> None:
        """A command written to the event's trigger file (trace/hist.py); writing without
        `append` first removes every trigger (the kernel's O_TRUNC). Raises
        hist.TriggerError."""
        from pykprobes.trace import hist
        from pykprobes.trace.filter import compile_filter

        if not append:
            self.clear_triggers(named)
        types = {a.name: a.type for a in self.definition.args}
        # A new list, swapped in whole: a hit iterating the old one is not disturbed.
        triggers = list(self.triggers)
        hist.write_trigger(triggers, text, types, named, compile_filter)
        self.triggers = triggers
        self._update()

    def clear_triggers(self, named: hist.NamedTables) -> None:
        for trigger in self.triggers:
            named.detach(trigger)
        self.triggers = []
        self._update()

    def set_filter(self, text: str) -> None:
        from pykprobes.trace.filter import compile_filter

        text = text.strip()
        if text in ("", "0", "none"):
            self.filter, self.filter_text = None, "none"
            self._refresh()
            return
        types = {a.name: a.type for a in self.definition.args}
        flt = compile_filter(text, types)
        # The recorders stop recording before the filter applies: the careful path filters.
        self.filter = flt
        self._refresh()
        self.filter_text = text

    # ------------------------------------------------------------------ compiled event

    def compile_call(self, code: Any, offset: int) -> tuple[Any, tuple[str, ...]] | None:
        """The probes' `compile_call` (core/arch.py CompiledCall): `(recorder, argument
        names)` when every fetcharg is rooted at an argument of `code` and the event writes
        into a trace buffer; else None. One recorder per code object, kept while the event
        lives, so that the registry sees the same call each time it rebuilds. Called under
        the registry lock: takes no lock."""
        cached = self._compiled.get(id(code))
        if cached is not None and cached[0] is code:
            counter = cached[1]
            return getattr(counter, "call", counter), cached[2]
        ring = getattr(self.buffer, "ring", None)
        if self.is_return or not self.definition.args:
            return None
        trigger = self._hist_only()
        if ring is None and trigger is None:
            return None
        names: list[str] = []
        kinds: list[int] = []
        converters: list[Any] = []
        for d in self.definition.args:
            found = fetchargs.argument_fetch(d, code)
            if found is None:
                return None
            name, convert, chained = found
            names.append(name)
            kinds.append(KIND_CONVERT if chained else _KINDS.get(d.type, KIND_CONVERT))
            converters.append(convert)
        variables = tuple(names)
        if trigger is not None:
            from pykprobes.trace.hist import HistRecorder

            counter = HistRecorder(trigger, converters, _busy, _held)
            self._compiled[id(code)] = (code, counter, variables)
            self._refresh()
            return counter.call, variables
        size = -1 if self.size is None else self.size
        recorder = backend.Recorder(self, ring, _busy, _held, tuple(kinds), tuple(converters), size)
        self._compiled[id(code)] = (code, recorder, variables)
        self._refresh()
        return recorder, variables

    def _hist_only(self) -> Any:
        """The trigger of a hist-only event that the rewritten code may count itself: the
        event is not enabled and has that one compilable trigger."""
        triggers = self.triggers
        if self.enabled or len(triggers) != 1 or not triggers[0].compilable:
            return None
        return triggers[0]

    def _refresh(self) -> None:
        """Which recorders may act alone: a ring recorder while the event is enabled with
        no filter and no trigger; a hist recorder while its trigger is the event's only
        one and the event is not enabled."""
        record = (self._armed and self.enabled and self.filter is None and not self.triggers
                  and not self.span_mode)
        count = self._hist_only() if self._armed else None
        for _, recorder, _ in list(self._compiled.values()):
            trigger = getattr(recorder, "trigger", None)  # a hist.HistRecorder's
            if trigger is not None:
                recorder.fast = trigger is count
            else:
                recorder.fast = record

    # ------------------------------------------------------------------ counters

    @property
    def nmissed(self) -> int:
        return sum(p.nmissed for p in self.probes)

    @property
    def hits(self) -> int:
        """Hits of the careful path (the probes' nhit) and of the recorders."""
        return sum(p.nhit for p in self.probes) + self._recorded()

    @property
    def nhit(self) -> int:
        """Records written (hits that passed the filter)."""
        return self._nwritten + self._recorded()

    def _recorded(self) -> int:
        return sum(int(r.nhit) for _, r, _ in list(self._compiled.values()))

    # ------------------------------------------------------------------ hit path

    def _record(self, regs: Any, caller: str | None, ts: int, ri: Any = None) -> None:
        values = self._fetch(regs)
        if self._duration_at:
            values = self._with_duration(values, ts, ri)
        # The thread's key: its id and name are looked up when the buffer is read.
        key = _thread_key()
        triggers = self.triggers
        if triggers:
            for trigger in triggers:
                trigger.hit(values, key, ts, regs)
        if not self.enabled and (triggers or self.summarized):
            return
        flt = self.filter
        if flt is not None:
            tid, comm = resolve(key)
            fields = dict(zip(self.fields, values, strict=False))
            fields["common_pid"] = tid  # the kernel's pid column is the thread's id
            fields["common_comm"] = comm
            if not flt(fields):
                return
        self._nwritten += 1
        size = self.size
        if size is None:
            size = values_size(values, caller)
        if self.span_mode:
            values = values + _span_values(self.is_return, regs, ri)
        self.buffer.append(ts, key, self, values, caller, size)

    def _with_duration(self, values: tuple[Any, ...], ts: int, ri: Any) -> tuple[Any, ...]:
        """`values` with each $duration field set from the call's entry time."""
        start = ri.data.get(ENTRY_NS) if ri is not None else None
        out = list(values)
        for index, convert in self._duration_at:
            try:
                out[index] = FAULT if start is None else convert(ts - start)
            except Exception:  # noqa: BLE001 - a converter never raises; if one did: FAULT
                out[index] = FAULT
        return tuple(out)

    def _hit(self, p: Any, regs: Any) -> None:
        if self.enabled or self.triggers:  # else only counted (the summary): nothing to fetch
            self._record(regs, None, _time_ns())

    def _ret_entry(self, ri: Any, regs: Any) -> None:
        """The kretprobes' entry handler of an event with $duration: the call's entry time
        (the trace clock), in its instance."""
        ri.data[ENTRY_NS] = _time_ns()

    def _ret_hit(self, ri: Any, regs: Any) -> None:
        ts = _time_ns()
        if self.span_mode:
            _open_spans.pop(id(regs.frame), None)
        latency = self.latency
        if latency is not None:
            start = ri.data.get(ENTRY_NS)
            if start is not None and ts >= start:
                # bpftrace's hist(): bucket N holds [2^(N-1), 2^N) ns (bucket 0: 0 ns).
                latency[min((ts - start).bit_length(), 64)] += 1
            if not self.enabled and not self.triggers:
                return
        caller = None
        if self.enabled:  # a record names its caller; a hist-only hit does not need it
            back = regs.frame.f_back
            if back is not None:
                code = back.f_code
                caller = f"{back.f_globals.get('__name__', '?')}:{code.co_qualname}"
        self._record(regs, caller, ts, ri)

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<Event {self.group}/{self.name} {state} {self.definition.text!r}>"


__all__ = ["Event", "KprobeError", "ParseError"]


def _enclosing_span(frame: Any) -> tuple[int, int]:
    """(span number, root) of the nearest call in flight at or above `frame`, or (0, 0)."""
    depth = 0
    while frame is not None and depth < SPAN_WALK_MAX:
        found = _open_spans.get(id(frame))
        if found is not None and found[2] is frame.f_code:
            return found[0], found[1]
        frame = frame.f_back
        depth += 1
    return 0, 0


def _exception_text(exc: BaseException | None) -> tuple[str, str]:
    """The exception's type `module.qualname` and its first argument when that is a str,
    read without running the program's code (BaseException.args is a C slot)."""
    if exc is None:
        return "", ""
    tp = type(exc)
    module = tp.__module__ if type(tp.__module__) is str else "?"
    name = tp.__qualname__ if module == "builtins" else f"{module}.{tp.__qualname__}"
    try:
        args = BaseException.args.__get__(exc)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        args = ()
    message = args[0] if args and type(args[0]) is str else ""
    return name, message[:1024]


def _span_values(is_return: bool, regs: Any, ri: Any) -> tuple[Any, ...]:
    """The values a span-mode record carries after its fields (Event.set_span_mode)."""
    try:
        if not is_return:
            return _enclosing_span(regs.frame)
        data = ri.data if ri is not None else {}
        number, parent, root = data.get(SPAN, (0, 0, 0))
        kind, message = _exception_text(regs.exception)
        return (data.get(ENTRY_NS, 0), number, parent, root, kind, message)
    except Exception:  # noqa: BLE001 - the hot path never raises
        return (0, 0) if not is_return else (0, 0, 0, 0, "", "")
