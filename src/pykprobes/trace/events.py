"""Probe events: `GRP/EVENT` and its probe points (kernel/trace/trace_kprobe.c).

An `Event` is the kernel's trace_probe_event: a name, fields, an enable switch, a filter, its
hist triggers, and one or more `ProbePoint`s (the kernel's trace_kprobes: a definition
appended to an existing `GRP/EVENT` adds a point, kprobe_multiprobe.tc), each with its target,
its fetchargs and the probes that record it. Every point of an event records the same fields
(same names, same types: tracefs.py refuses another, DIFF_ARG_TYPE) and the same kind of
probe (DIFF_PROBE_TYPE). A record names the point that wrote it (its location in the trace
line), whose `event` is the Event.

An event is a client of the core's public API: defining one registers its probes
*disabled* (so that a bad target fails at definition, and a probe on a module that is not
imported yet waits for it), enabling it enables them. A hit fetches the arguments (never
raising), applies the filter, and writes one record into the trace buffer.

Module targets come back: a point on a module keeps its definition when the module is
unloaded (removed from sys.modules, or reloaded), and is armed again on the new code when the
module is imported again, before its body runs (the kernel's trace_kprobe_module_callback();
`pykprobes.register_module_notifier`). The raw `Kprobe` API keeps the kernel's GONE rule.

A return event reads its function's arguments (`$argN`, `$arg:NAME`, a parameter's NAME, and
`$arg*`) as they were at entry, even if the function rebinds them (kretprobe_entry_arg.tc):
its kretprobes' entry handler keeps them in the call's instance.

The compiled event: when every fetcharg of an entry event is rooted at an argument, its
probes offer the optimizer a compiled call (`Kprobe.compile_call`, core/arch.py
CompiledCall): the rewritten code loads the arguments itself and calls the point's
recorder (backend.Recorder: C, or its Python fallback) with them, which records without a
frame object, a Regs or f_locals. The recorder hands the hit back to the careful path
(the probe's handler, `_hit`) whenever that path has something to do: a filter, tracing
off, a probe handler running in some thread (the reentrancy rule: the marks of core/guard.py,
handed to the recorders with the offer).

Triggers (trace/hist.py) belong to the event: every hit of any of its points runs them,
whether or not the event is enabled; its probes are armed while it is enabled *or* has a
trigger *or* is summarized (the kernel's soft-enabled event), and a hit writes a trace record
only while it is enabled. A hist-only event whose one trigger counts plain fields is compiled
too: each point's recorder is then a hist.HistRecorder, which counts into the trigger's table
instead of writing a record.

`$duration` (return events): the kretprobe's entry handler stamps the call's instance with
the trace clock; the return hit puts `now - stamp` at the field's place, converted by its
type. A call has a stamp exactly when it has an instance (entered while the point's probes
were armed, within maxactive); a return without a stamp records FAULT. The value is
supplied by the hit path, not fetched from the frame, so that a compiled return event
(rewritten code keeping the entry time in the frame) can pass it the same way.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import pykprobes as kp
from pykprobes import grammar
from pykprobes.errors import ERRORS, KprobeError, ParseError
from pykprobes.trace import backend, fetchargs
from pykprobes.trace.buffer import TraceBuffer, fixed_size, values_size
from pykprobes.trace.cmdlines import resolve
from pykprobes.trace.recorder import KIND_CONVERT, KIND_DESCRIBE, KIND_FLOAT, KIND_INT, KIND_STR
from pykprobes.trace.safe import FAULT, describe
from pykprobes.trace.types import TYPES

if TYPE_CHECKING:
    # trace/hist.py is imported when a trigger is written: the boot stage's early events
    # load this module and must not pay for hists (tests/boot/test_import_weight.py).
    from pykprobes.trace import hist

# ftrace's clock counts from boot: CLOCK_MONOTONIC is the same on Linux.
_time_ns = time.monotonic_ns
_thread_key = backend.thread_key

#: The fetch types whose exact builtin values the recorder stores as they are.
_KINDS: dict[str | None, int] = {
    None: KIND_DESCRIBE, "int": KIND_INT, "float": KIND_FLOAT, "str": KIND_STR,
    "string": KIND_STR,
}

#: Where a return event's entry handler keeps the call's arguments (KretprobeInstance.data).
_ENTRY: Final = "pykprobes.trace.entry_arguments"
#: The key of a call's entry time in its KretprobeInstance.data.
ENTRY_NS: Final = "pykprobes.entry_ns"
#: The key of a call's span ids (trace/otel.py) in its KretprobeInstance.data.
SPAN: Final = "pykprobes.span"

#: The fetchargs that read the probed frame's variables.
_VARIABLE_KINDS: Final = frozenset(("arg", "argname", "local"))

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


def expand(definition: grammar.ProbeDef, code: Any) -> list[grammar.FetchArgDef]:
    """The definition's fetchargs with `$arg*` expanded to the parameters of `code` (the
    probed code object, or the code its import will create), grammar.expand_args. A `$arg*`
    whose function's code cannot be known before the import is NO_BTF_ENTRY (the kernel's
    word when it has no BTF for the function)."""
    star = next((a for a in definition.args if a.kind == "args"), None)
    if star is None:
        return definition.args
    if code is None:
        raise ParseError("NO_BTF_ENTRY", star.pos, definition.text)
    return grammar.expand_args(definition, fetchargs.parameters(code))


def field_type(arg: grammar.FetchArgDef) -> str | None:
    """The type a fetcharg records: as written (`string` is `str`), or, untyped, `str` for
    `$comm` and an immediate string (the only type they take: NEED_STRING_TYPE), else None
    (the default, safe.describe())."""
    if arg.type is not None:
        return "str" if arg.type == "string" else arg.type
    if arg.kind == "comm" or (arg.kind == "imm" and isinstance(arg.root, str)):
        return "str"
    return None


class Event:
    """One probe event, `GRP/EVENT` (the kernel's trace_probe_event)."""

    def __init__(self, group: str, name: str, args: list[grammar.FetchArgDef], is_return: bool,
                 buffer: TraceBuffer, event_id: int) -> None:
        self.group = group
        self.name = name
        self.id = event_id
        self.is_return = is_return
        self.buffer = buffer
        #: The fetchargs every point records (expanded), their field names and types.
        self.args = args
        self.fields: tuple[str, ...] = tuple(a.name for a in args)
        self.types: tuple[str | None, ...] = tuple(a.type for a in args)
        self.points: list[ProbePoint] = []
        self.enabled = False
        self.filter_text = "none"
        self.filter: Callable[[dict[str, Any]], bool] | None = None
        #: The event's hist triggers (trace/hist.py), in the order written: every point's
        #: hits count into them.
        self.triggers: list[Any] = []
        #: Whether the probes are enabled (the event is enabled, has a trigger, or is
        #: summarized).
        self._armed = False
        #: Counted for the summary (trace/summary.py): the event is armed, its hits counted.
        self.summarized = False
        #: Span mode (trace/otel.py): each record carries more values after its fields,
        #: which the text formats do not show.
        self.span_mode = False
        #: Every call's entry time is stamped (stamp_entries), as $duration stamps it.
        self.stamped = False
        #: A log2 histogram of the calls' durations (return events), counted at every
        #: return while set (the summary).
        self.latency: list[int] | None = None
        #: Records written by the careful path (`nhit` adds the recorders').
        self._nwritten = 0
        #: The size estimate of every record (buffer.fixed_size), or None: per record.
        self.size: int | None = fixed_size(self.types, is_return)

    @classmethod
    def of(cls, point: ProbePoint, buffer: TraceBuffer, event_id: int) -> Event:
        """A new event whose first point is `point` (registered)."""
        d = point.definition
        event = cls(d.group, d.event, point.args, point.is_return, buffer, event_id)
        event.add(point)
        return event

    def add(self, point: ProbePoint) -> None:
        point.event = self
        self.points.append(point)
        point._set_entry_handlers()
        if self._armed:
            point.enable()

    def armed_early(self) -> None:
        """The boot stage's event: its probes are early probes, registered enabled (an early
        probe cannot be registered DISABLED: the seed), so the event is enabled and armed
        as it stands."""
        self.enabled = True
        self._armed = True
        self._refresh()

    def refusal(self, point: ProbePoint) -> tuple[str, int] | None:
        """Why `point` (registered) cannot join this event (kernel append_trace_kprobe()), as
        (error code, column), or None. The kind of probe must be the event's (caret at 0);
        the arguments must be the event's, name for name and type for type
        (trace_probe_compare_arg_type(): the caret at the first that differs, past the end
        when the new one has fewer); the same target with the same arguments is the same
        probe (column 0)."""
        if point.is_return != self.is_return:
            return "DIFF_PROBE_TYPE", 0
        ours, theirs = point.args, self.args
        for a, b in zip(ours, theirs, strict=False):
            if a.name != b.name or field_type(a) != field_type(b):
                return "DIFF_ARG_TYPE", a.pos
        if len(ours) > len(theirs):
            return "DIFF_ARG_TYPE", ours[len(theirs)].pos
        if len(ours) < len(theirs):
            return "DIFF_ARG_TYPE", len(point.definition.text.rstrip()) + 1
        for other in self.points:
            if other.target == point.target and \
                    [a.body for a in other.args] == [a.body for a in ours]:
                return "SAME_PROBE", 0
        return None

    @property
    def definition(self) -> grammar.ProbeDef:
        """The first point's definition."""
        return self.points[0].definition

    @property
    def symbol(self) -> str:
        return self.points[0].symbol if self.points else ""

    @property
    def offset(self) -> int:
        return self.points[0].offset if self.points else 0

    @property
    def probes(self) -> list[Any]:
        """Every probe of every point."""
        return [p for point in self.points for p in point.probes]

    # ------------------------------------------------------------------ switches

    def unregister(self) -> None:
        for point in self.points:
            point.unregister()
        self.enabled = False
        self.triggers = []
        self._armed = False

    def enable(self) -> None:
        if not self.enabled:
            self.enabled = True
            self._update()

    def disable(self) -> None:
        if self.enabled:
            self.enabled = False
            self._update()

    def _update(self) -> None:
        """Arm the probes of every point while the event is enabled, has a trigger or is
        summarized, and tell the recorders what they may do now."""
        armed = self.enabled or bool(self.triggers) or self.summarized
        if armed and not self._armed:
            self._armed = True
            for point in self.points:
                point.enable()
        elif not armed and self._armed:
            self._armed = False
            for point in self.points:
                point.disable()
        self._refresh()

    def stamp_entries(self) -> None:
        """Stamp every call's entry time, as $duration does (for a duration without the
        field: the latency summary, Perfetto slices, OpenTelemetry spans)."""
        self.stamped = True
        for point in self.points:
            point._set_entry_handlers()

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
        for point in self.points:
            point._set_entry_handlers()
        self._refresh()

    def write_trigger(self, text: str, named: hist.NamedTables, append: bool = True) -> None:
        """A command written to the event's trigger file (trace/hist.py); writing without
        `append` first removes every trigger (the kernel's O_TRUNC). Raises
        hist.TriggerError."""
        from pykprobes.trace import hist
        from pykprobes.trace.filter import compile_filter

        if not append:
            self.clear_triggers(named)
        types = dict(zip(self.fields, self.types, strict=True))
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
        flt = compile_filter(text, dict(zip(self.fields, self.types, strict=True)))
        # The recorders stop recording before the filter applies: the careful path filters.
        self.filter = flt
        self._refresh()
        self.filter_text = text

    # ------------------------------------------------------------------ compiled event

    def _hist_only(self) -> Any:
        """The trigger of a hist-only event that the rewritten code may count itself: the
        event is not enabled and has that one compilable trigger."""
        triggers = self.triggers
        if self.enabled or len(triggers) != 1 or not triggers[0].compilable:
            return None
        return triggers[0]

    def _fast(self) -> tuple[bool, Any]:
        """What the recorders may do alone: (a ring recorder records: the event is enabled
        with no filter, no trigger, no span mode; the trigger a hist recorder counts into:
        the event's only one, while it is not enabled), both only while armed."""
        if not self._armed:
            return False, None
        record = (self.enabled and self.filter is None and not self.triggers
                  and not self.span_mode)
        return record, self._hist_only()

    def _refresh(self) -> None:
        record, count = self._fast()
        for point in self.points:
            point._refresh(record, count)

    # ------------------------------------------------------------------ counters

    @property
    def nmissed(self) -> int:
        return sum(point.nmissed for point in self.points)

    @property
    def hits(self) -> int:
        """Hits of the careful path (the probes' nhit) and of the recorders."""
        return sum(point.hits for point in self.points)

    @property
    def nhit(self) -> int:
        """Records written (hits that passed the filter)."""
        return self._nwritten + sum(point._recorded() for point in self.points)

    # ------------------------------------------------------------------ hit path

    def _record(self, point: ProbePoint, values: tuple[Any, ...], caller: str | None, ts: int,
                regs: Any, ri: Any = None) -> None:
        """One hit of `point`: the event's triggers count it, and, while the event is
        enabled, it writes a record (if it passes the filter) naming the point."""
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
        self.buffer.append(ts, key, point, values, caller, size)

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<Event {self.group}/{self.name} {state} points={len(self.points)}>"


class ProbePoint:
    """One probe point of an event (the kernel's trace_kprobe): a definition, its fetchargs
    and the probes that record it. It stands for its event in the records it writes: it has
    the event's `name`, `group`, `id`, `fields`, `types` and `span_mode`, and its own
    `symbol`, `offset`, `args` (`$arg*` expanded) and `probes`."""

    def __init__(self, definition: grammar.ProbeDef) -> None:
        self.definition = definition
        self.is_return: bool = definition.kind == "r"
        self.event: Event | None = None
        #: The fetchargs, `$arg*` expanded (register()), their field names and types.
        self.args: list[grammar.FetchArgDef] = definition.args
        self.fields: tuple[str, ...] = ()
        self.types: tuple[str | None, ...] = ()
        self.probes: list[Any] = []
        self.symbol: str = definition.target.partition("+")[0]
        self.offset: int = definition.offset
        #: The modules its probes are on (to come back with them).
        self.modules: set[str] = set()
        #: id(code) -> (code, recorder, variables): the compiled call offered for a code
        #: (a backend.Recorder, or a hist.HistRecorder whose `call` is offered).
        #: A return event's third item is its core/rethook.py CompiledReturn.
        self._compiled: dict[int, tuple[Any, Any, Any]] = {}
        self._fetch: fetchargs.FetchAll = lambda regs, f_locals=None: ()
        #: A return event that reads arguments: they are taken at entry.
        self._entry = False
        #: (field index, converter) of each $duration field (in the expanded args).
        self._duration_at: tuple[tuple[int, Callable[[Any], Any]], ...] = ()

    # The event's, for the records this point writes (trace/format.py, filters, JSON).
    @property
    def name(self) -> str:
        return self.event.name if self.event is not None else self.definition.event

    @property
    def group(self) -> str:
        return self.event.group if self.event is not None else self.definition.group

    @property
    def id(self) -> int:
        return self.event.id if self.event is not None else 0

    @property
    def buffer(self) -> Any:
        return self.event.buffer if self.event is not None else None

    @property
    def span_mode(self) -> bool:
        return self.event is not None and self.event.span_mode

    @property
    def target(self) -> str:
        """The probe point as kprobe_events lists it: `SYMBOL`, `SYMBOL+OFFS` (never `+0`),
        or `path.py:LINE`."""
        d = self.definition
        if d.target_kind == "line":
            return d.target
        return f"{d.module}:{d.qualname}" + (f"+{d.offset}" if d.offset else "")

    # ------------------------------------------------------------------ setup

    def _specs(self, line_symbols: Callable[[str], list[tuple[str, str, int]]]
               ) -> tuple[list[dict[str, Any]], Any]:
        """Where the probes go (register_kprobe arguments), and the probed code when a line
        target's module is imported."""
        d = self.definition
        if d.target_kind != "line":
            return [{"symbol_name": f"{d.module}:{d.qualname}", "offset": d.offset}], None
        spec = f"{d.path}:{d.line}"
        self.symbol = spec
        # The kernel's uprobe errors for its FILE:OFFSET (trace_uprobe.c), at the path.
        if not os.path.exists(d.path):  # type: ignore[arg-type]
            raise ParseError("FILE_NOT_FOUND", d.target_pos, d.text)
        if not os.path.isfile(d.path):  # type: ignore[arg-type]
            raise ParseError("NO_REGULAR_FILE", d.target_pos, d.text)
        try:
            addrs = kp.resolve_line(spec)
        except KprobeError:
            # Not imported yet: wait for the import, one symbol probe per address.
            found = line_symbols(spec)
            self.offset = found[0][2]
            return [{"symbol_name": f"{module}:{qualname}", "offset": off}
                    for module, qualname, off in found], None
        self.offset = addrs[0].offset
        return [{"addr": a} for a in addrs], addrs[0].code

    def register(self, *, early: bool = False,
                line_symbols: Callable[[str], list[tuple[str, str, int]]] | None = None,
                code_before_import: Callable[[str], Any] | None = None) -> None:
        """Resolve the target, register the probes (disabled, or `early`: enabled early
        probes, as the boot stage wants them), and expand and compile the fetchargs
        against the probed code. Raises ParseError (a bad fetcharg) or KprobeError (a bad
        target), with nothing left registered. `line_symbols` and `code_before_import` stand
        for kp's (the boot stage's know the program's sys.path[0] before Python sets it)."""
        d = self.definition
        specs, code = self._specs(line_symbols or kp.line_symbols)
        # Whether a return event reads arguments (taken at entry): known from the text.
        self._entry = self.is_return and any(a.kind in _VARIABLE_KINDS or a.kind == "args"
                                             for a in d.args)
        self.probes = self._register_probes(specs, early)
        try:
            resolved = getattr(self.probes[0], "addr", None)
            if isinstance(resolved, kp.ProbeAddress):
                code = resolved.code
            elif d.target_kind != "line" and (not early or any(a.kind == "args"
                                                                for a in d.args)):
                # Not imported yet: its code as the import will create it, so that names,
                # $argN and $arg* are checked and expanded now, as registration will find
                # them (None: it cannot be read before the import). At start-up only for
                # $arg*: reading sources costs start-up time.
                code = (code_before_import or kp.code_before_import)(
                    f"{d.module}:{d.qualname}")
            self.args = expand(d, code)
            self.fields = tuple(a.name for a in self.args)
            self.types = tuple(a.type for a in self.args)
            self._duration_at = tuple(
                (i, describe if a.type is None else TYPES[a.type])
                for i, a in enumerate(self.args) if a.kind == "duration")
            self._fetch = fetchargs.compile_fetchargs(self.args, is_return=self.is_return,
                                                      text=d.text, code=code)
        except (ParseError, KprobeError):
            self.unregister()
            raise
        self._watch()

    def _register_probes(self, specs: list[dict[str, Any]], early: bool = False
                         ) -> list[Any]:
        """New probes at `specs`, registered (all or none) disabled, or enabled when
        `early` (an early probe cannot be registered DISABLED: the seed)."""
        d = self.definition
        probes: list[Any] = []
        flags = 0 if early else kp.KPROBE_FLAG_DISABLED
        for spec in specs:
            if self.is_return:
                rp = kp.Kretprobe(
                    handler=self._ret_hit, entry_handler=self._entry_handler(),
                    maxactive=d.maxactive, **spec)
                rp.compile_return = self.compile_return
                # A call entered before arming records (fault) for $duration, where a
                # breakpoint sees its return.
                rp.returns_unentered = any(a.kind == "duration" for a in d.args)
                probes.append(rp)
            else:
                probe = kp.Kprobe(pre_handler=self._hit, flags=flags, **spec)
                probe.compile_call = self.compile_call
                probes.append(probe)
        if self.is_return:
            kp.register_kretprobes(probes)
            if not early:
                for rp in probes:
                    kp.disable_kretprobe(rp)
        else:
            kp.register_kprobes(probes)
        return probes

    def _entry_handler(self) -> Callable[[Any, Any], int] | None:
        """A return point's entry handler when a call's entry has something to keep: its
        arguments, its time ($duration, or the event's stamp_entries), its span; else none
        (a kretprobe without one costs less)."""
        event = self.event
        if self._entry or any(a.kind == "duration" for a in self.args) or (
                event is not None and (event.stamped or event.span_mode)):
            return self._ret_entry
        return None

    def _set_entry_handlers(self) -> None:
        if self.is_return:
            handler = self._entry_handler()
            for rp in self.probes:
                rp.entry_handler = handler
            # A compiled return keeps the arguments and the entry time only: an entry that
            # must do more (a span, a stamp for the summary) takes the entry handler.
            on = self._compiles_entry()
            for _, _, offer in list(self._compiled.values()):
                offer.on = on

    def _compiles_entry(self) -> bool:
        event = self.event
        return event is not None and not (event.stamped or event.span_mode)

    def unregister(self) -> None:
        _forget(self)
        if self.is_return:
            kp.unregister_kretprobes(self.probes)
        else:
            kp.unregister_kprobes(self.probes)
        self.probes = []
        self._refresh(False, None)
        self._compiled.clear()

    def enable(self) -> None:
        """Arm the probes (the event is armed), then let the recorders act as it allows."""
        for p in self.probes:
            if p.flags & kp.KPROBE_FLAG_GONE:
                continue  # its module went away: enabled when it comes back (rearm)
            if self.is_return:
                kp.enable_kretprobe(p)
            else:
                kp.enable_kprobe(p)
        event = self.event
        if event is not None:
            self._refresh(*event._fast())

    def disable(self) -> None:
        # The recorders first: a frame still running a rewritten version hands its hits
        # to the careful path, which sees the probe disabled.
        self._refresh(False, None)
        for p in self.probes:
            if self.is_return:
                kp.disable_kretprobe(p)
            else:
                kp.disable_kprobe(p)

    # ------------------------------------------------------------------ modules

    def _watch(self) -> None:
        self.modules = {p.symbol.partition(":")[0] for p in self.probes}
        _remember(self)

    def rearm(self) -> None:
        """The module notifier: a module of this point is being imported (again). Its probes
        are replaced by probes that wait for the new code (armed on it before its body runs),
        enabled if the event is armed: those armed on the old code are gone with it, and
        those waiting for this import wait for it as well as before."""
        d = self.definition
        if d.target_kind == "line":
            specs = [{"symbol_name": f"{module}:{qualname}", "offset": off}
                     for module, qualname, off in kp.line_symbols(f"{d.path}:{d.line}")]
        else:
            specs = [{"symbol_name": f"{d.module}:{d.qualname}", "offset": d.offset}]
        old, self.probes = self.probes, []
        self._refresh(False, None)
        self._compiled.clear()
        if self.is_return:
            kp.unregister_kretprobes(old)
        else:
            kp.unregister_kprobes(old)
        # While early (the boot stage's events), probes are registered enabled (the seed).
        early = kp.kprobes_is_early()
        self.probes = self._register_probes(specs, early)
        event = self.event
        if event is not None and event._armed and not early:
            self.enable()

    # ------------------------------------------------------------------ compiled event

    def compile_call(self, code: Any, offset: int, current: Any
                     ) -> tuple[Any, tuple[str, ...]] | None:
        """The probes' `compile_call` (core/arch.py CompiledCall; `current`, the core's
        current_kprobe marks, is what the recorders test): `(recorder, argument
        names)` when every fetcharg is rooted at an argument of `code` and the event writes
        into a trace buffer or is hist-only with one compilable trigger; else None. One
        recorder per code object, kept while the point lives, so that the registry sees the
        same call each time it rebuilds. Called under the table lock: takes no lock."""
        cached = self._compiled.get(id(code))
        if cached is not None and cached[0] is code:
            recorder = cached[1]
            return getattr(recorder, "call", recorder), cached[2]
        event = self.event
        if event is None or self.is_return or not self.args:
            return None
        ring = getattr(event.buffer, "ring", None)
        trigger = event._hist_only()
        if ring is None and trigger is None:
            return None
        names: list[str] = []
        kinds: list[int] = []
        converters: list[Any] = []
        for d in self.args:
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

            counter = HistRecorder(trigger, converters, current.busy, current.held)
            self._compiled[id(code)] = (code, counter, variables)
            self._refresh(*event._fast())
            return counter.call, variables
        size = -1 if event.size is None else event.size
        recorder = backend.Recorder(self, ring, current.busy, current.held, tuple(kinds),
                                    tuple(converters), size)
        self._compiled[id(code)] = (code, recorder, variables)
        self._refresh(*event._fast())
        return recorder, variables

    def compile_return(self, code: Any, kit: Any) -> Any:
        """The kretprobes' `compile_return` (core/rethook.py CompiledReturn, made with the
        core's `kit`: its `make`, RETVAL and DURATION): the return
        side compiled as compile_call compiles an entry event, when every fetcharg is
        `$retval` (no chain), `$duration`, or rooted at an argument of `code` (kept at the
        entry, as the entry handler keeps them), and the event writes into a trace buffer
        or is hist-only with one compilable trigger; else None. A recorder that refuses
        (tracing off, a filter, a handler running) hands the return to `_ret_hit`. One per
        code object, kept while the point lives. Called under the registry lock."""
        cached = self._compiled.get(id(code))
        if cached is not None and cached[0] is code:
            return cached[2]
        event = self.event
        if event is None or not self.is_return or not self.args:
            return None
        ring = getattr(event.buffer, "ring", None)
        trigger = event._hist_only()
        if ring is None and trigger is None:
            return None
        params = fetchargs.parameters(code)
        indices: list[int] = []
        sources: list[int] = []
        kinds: list[int] = []
        converters: list[Any] = []
        for d in self.args:
            convert = describe if d.type is None else TYPES[d.type]
            kind = _KINDS.get(d.type, KIND_CONVERT)
            if d.kind == "retval" and not d.chain:
                sources.append(kit.RETVAL)
            elif d.kind == "duration":
                sources.append(kit.DURATION)
            else:
                found = fetchargs.argument_fetch(d, code)
                if found is None:
                    return None
                name, convert, chained = found
                if chained:
                    kind = KIND_CONVERT
                at = params.index(name)
                if at not in indices:
                    indices.append(at)
                sources.append(indices.index(at))
            kinds.append(kind)
            converters.append(convert)
        recorder: Any
        if trigger is not None:
            from pykprobes.trace.hist import HistRecorder

            recorder = HistRecorder(trigger, converters, kit.busy, kit.held)
            record, caller = recorder.call, False
        else:
            size = -1 if event.size is None else event.size
            recorder = backend.Recorder(self, ring, kit.busy, kit.held, tuple(kinds),
                                        tuple(converters), size, True)
            record, caller = recorder, True
        names = tuple(params[i] for i in indices)

        def data(kept: tuple[Any, ...], entry_ns: int) -> dict[str, Any]:
            """What _ret_entry would have kept of the call (the return is `_ret_hit`'s)."""
            out: dict[str, Any] = {}
            if self._entry:
                out[_ENTRY] = dict(zip(names, kept, strict=True))
            if entry_ns:
                out[ENTRY_NS] = entry_ns
            return out

        offer = kit.make(record, data, tuple(indices), tuple(sources), None, caller, FAULT)
        offer.on = self._compiles_entry()
        self._compiled[id(code)] = (code, recorder, offer)
        self._refresh(*event._fast())
        return offer

    def _refresh(self, record: bool, count: Any) -> None:
        """Which recorders may act alone: the ring recorders when `record`; a hist recorder
        when its trigger is `count` (Event._fast). A return event's while no latency is
        summarized either (the careful return counts it)."""
        event = self.event
        if self.is_return and event is not None and event.latency is not None:
            record, count = False, None
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
        careful: int = sum(p.nhit for p in self.probes)
        return careful + self._recorded()

    def _recorded(self) -> int:
        return sum(int(r.nhit) for _, r, _ in list(self._compiled.values()))

    # ------------------------------------------------------------------ hit path

    def _hit(self, p: Any, regs: Any) -> None:
        event = self.event
        # Else only counted (the summary): nothing to fetch.
        if event is not None and (event.enabled or event.triggers):
            ts = _time_ns()
            event._record(self, self._fetch(regs), None, ts, regs)

    def _ret_entry(self, ri: Any, regs: Any) -> int:
        """The kretprobes' entry handler: the call's arguments (for a return event that
        reads them), its span (span mode), and its entry time (the trace clock), taken last
        so that the duration leaves out what this handler costs."""
        data = ri.data
        if self._entry:
            data[_ENTRY] = fetchargs.entry_arguments(regs.frame)
        event = self.event
        if event is not None and event.span_mode:
            _open_span(data, regs.frame)
        data[ENTRY_NS] = _time_ns()
        return 0

    def _ret_hit(self, ri: Any, regs: Any) -> None:
        event = self.event
        if event is None:
            return
        ts = _time_ns()
        frame = regs.frame
        if event.span_mode:
            _open_spans.pop(id(frame), None)
        latency = event.latency
        if latency is not None:
            start = ri.data.get(ENTRY_NS)
            if start is not None and ts >= start:
                # bpftrace's hist(): bucket N holds [2^(N-1), 2^N) ns (bucket 0: 0 ns).
                latency[min((ts - start).bit_length(), 64)] += 1
            if not event.enabled and not event.triggers:
                return
        caller = None
        if event.enabled:  # a record names its caller; a hist-only hit does not need it
            back = frame.f_back
            if back is not None:
                code = back.f_code
                caller = f"{back.f_globals.get('__name__', '?')}:{code.co_qualname}"
        entry = ri.data.get(_ENTRY) if self._entry else None
        if entry:
            # The arguments as they were at entry, over the variables as they are now.
            try:
                variables = dict(frame.f_locals)
            except Exception:  # noqa: BLE001 - the hot path never raises (docs/architecture.md, rule 7)
                variables = {}
            variables.update(entry)
            values = self._fetch(regs, variables)
        else:
            values = self._fetch(regs)
        if self._duration_at:
            values = self._with_duration(values, ts, ri)
        event._record(self, values, caller, ts, regs, ri)

    def _with_duration(self, values: tuple[Any, ...], ts: int, ri: Any) -> tuple[Any, ...]:
        """`values` with each $duration field set from the call's entry time (its instance
        of this point's kretprobe)."""
        start = ri.data.get(ENTRY_NS) if ri is not None else None
        out = list(values)
        for index, convert in self._duration_at:
            try:
                out[index] = FAULT if start is None else convert(ts - start)
            except Exception:  # noqa: BLE001 - a converter never raises; if one did: FAULT
                out[index] = FAULT
        return tuple(out)

    def __repr__(self) -> str:
        return f"<ProbePoint {self.group}/{self.name} {self.definition.text!r}>"


# --------------------------------------------------------------------------- the entry


class DefinitionError(KprobeError):
    """A definition that cannot be registered: `.errno` is what the kernel's write returns,
    `.code` names the message (errors.ERRORS), `.pos` is the column of the caret, and
    `.target_error` the core's own error for a bad target (None otherwise)."""

    def __init__(self, err: int, code: str, pos: int,
                 target_error: KprobeError | None = None) -> None:
        super().__init__(err, ERRORS.get(code, code))
        self.code = code
        self.pos = pos
        self.target_error = target_error


def register_trace_kprobe(
        events: dict[tuple[str, str], Event], d: grammar.ProbeDef, buffer: TraceBuffer,
        new_id: Callable[[], int], *, early: bool = False,
        line_symbols: Callable[[str], list[tuple[str, str, int]]] | None = None,
        code_before_import: Callable[[str], Any] | None = None) -> Event:
    """The one way from a definition to a registered event, for the tracefs file and the
    boot stage alike, as the kernel's kprobe_events writes and its `kprobe_event=` boot
    parameter both go through trace_kprobe_create(): a new event `d.group/d.event` put into
    `events` (numbered `new_id()`), or a point appended to the event of that name
    (append_trace_kprobe()). `early`: the boot stage's, whose probes are early probes,
    registered enabled (an early probe cannot be registered DISABLED: the seed), so that a
    new event is enabled and armed as it stands; `line_symbols` and `code_before_import` as
    for ProbePoint.register. Raises DefinitionError, with nothing left registered."""
    key = (d.group, d.event)
    event = events.get(key)
    if event is not None and event.is_return != (d.kind == "r"):
        # Before the probes are registered, as the kernel's register_trace_kprobe().
        raise DefinitionError(errno.EEXIST, "DIFF_PROBE_TYPE", 0)
    point = ProbePoint(d)
    try:
        point.register(early=early, line_symbols=line_symbols,
                       code_before_import=code_before_import)
    except ParseError as exc:
        # trace_uprobe.c returns kern_path()'s -ENOENT with FILE_NOT_FOUND.
        err = errno.ENOENT if exc.code == "FILE_NOT_FOUND" else errno.EINVAL
        raise DefinitionError(err, exc.code, exc.pos) from exc
    except KprobeError as exc:
        code = "NON_UNIQ_SYMBOL" if exc.errno == errno.EADDRNOTAVAIL else "BAD_PROBE_ADDR"
        raise DefinitionError(exc.errno, code, _target_pos(d.text), exc) from exc
    if event is None:
        event = Event.of(point, buffer, new_id())
        if early:
            event.armed_early()
        events[key] = event
        return event
    refusal = event.refusal(point)
    if refusal is not None:
        point.unregister()
        raise DefinitionError(errno.EEXIST, *refusal)
    if early:
        point.event = event  # its probes are enabled already
        event.points.append(point)
    else:
        event.add(point)
    return event


def _target_pos(text: str) -> int:
    """The column of a definition's target (the caret under a bad one)."""
    space = text.find(" ")
    return space + 1 if space >= 0 else 0


# --------------------------------------------------------------------------- modules

#: module name -> the points with probes on it (the kernel walks its trace_kprobes).
_by_module: dict[str, weakref.WeakSet[ProbePoint]] = {}
#: Guards the table, and serializes a point's rearm() with its unregister().
_modules_lock = threading.RLock()
_notifier_registered = False


def _remember(point: ProbePoint) -> None:
    global _notifier_registered
    with _modules_lock:
        for module in point.modules:
            _by_module.setdefault(module, weakref.WeakSet()).add(point)
        if not _notifier_registered:
            kp.register_module_notifier(_module_coming)
            _notifier_registered = True


def _forget(point: ProbePoint) -> None:
    with _modules_lock:
        for module in point.modules:
            points = _by_module.get(module)
            if points is not None:
                points.discard(point)


def _module_coming(name: str) -> None:
    """The module notifier (MODULE_STATE_COMING): arm the events of `name` again. A point
    released meanwhile has left the table (release() takes the lock first)."""
    with _modules_lock:
        for point in list(_by_module.get(name, ())):
            point.rearm()


# --------------------------------------------------------------------------- spans


def _open_span(data: dict[str, Any], frame: Any) -> None:
    """At a span-mode call's entry: its span (number, parent, root) into its instance's
    `data`, and the call into `_open_spans` for the calls it makes."""
    parent, root = _enclosing_span(frame.f_back)
    number = next(_span_numbers)
    span = (number, parent, root or number)
    data[SPAN] = span
    if len(_open_spans) >= SPAN_OPEN_MAX:
        for key in list(_open_spans)[: SPAN_OPEN_MAX // 2]:
            _open_spans.pop(key, None)
    _open_spans[id(frame)] = (number, span[2], frame.f_code)


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


__all__ = ["ENTRY_NS", "SPAN", "Event", "KprobeError", "ParseError", "ProbePoint", "expand",
           "field_type"]
