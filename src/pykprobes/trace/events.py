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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pykprobes as kp
from pykprobes import grammar
from pykprobes.core.site import _busy, _held
from pykprobes.errors import KprobeError, ParseError
from pykprobes.trace import backend, fetchargs
from pykprobes.trace.buffer import TraceBuffer, fixed_size, values_size
from pykprobes.trace.cmdlines import resolve
from pykprobes.trace.recorder import KIND_CONVERT, KIND_DESCRIBE, KIND_FLOAT, KIND_INT, KIND_STR

# ftrace's clock counts from boot: CLOCK_MONOTONIC is the same on Linux.
_time_ns = time.monotonic_ns
_thread_key = backend.thread_key

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
        self.probes: list[Any] = []
        self.symbol: str = definition.target.partition("+")[0]
        self.offset: int = definition.offset
        #: Records written by the careful path (`nhit` adds the recorders').
        self._nwritten = 0
        #: id(code) -> (code, recorder, variables): the compiled call offered for a code.
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
                probes.append(kp.Kretprobe(handler=self._ret_hit, maxactive=d.maxactive,
                                           **spec))
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
        self._set_fast(False)

    def enable(self) -> None:
        if self.enabled:
            return
        for p in self.probes:
            if self.is_return:
                kp.enable_kretprobe(p)
            else:
                kp.enable_kprobe(p)
        self.enabled = True
        self._set_fast(self.filter is None)

    def disable(self) -> None:
        if not self.enabled:
            return
        # The recorders first: a frame still running a rewritten version hands its hits
        # to the careful path, which sees the probe disabled.
        self._set_fast(False)
        for p in self.probes:
            if self.is_return:
                kp.disable_kretprobe(p)
            else:
                kp.disable_kprobe(p)
        self.enabled = False

    def set_filter(self, text: str) -> None:
        from pykprobes.trace.filter import compile_filter

        text = text.strip()
        if text in ("", "0", "none"):
            self.filter, self.filter_text = None, "none"
            self._set_fast(self.enabled)
            return
        types = {a.name: a.type for a in self.definition.args}
        flt = compile_filter(text, types)
        # The recorders stop recording before the filter applies: the careful path filters.
        self._set_fast(False)
        self.filter = flt
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
            return cached[1], cached[2]
        ring = getattr(self.buffer, "ring", None)
        if self.is_return or ring is None or not self.definition.args:
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
        size = -1 if self.size is None else self.size
        recorder = backend.Recorder(self, ring, _busy, _held, tuple(kinds), tuple(converters), size)
        recorder.fast = self.enabled and self.filter is None
        variables = tuple(names)
        self._compiled[id(code)] = (code, recorder, variables)
        return recorder, variables

    def _set_fast(self, fast: bool) -> None:
        for _, recorder, _ in list(self._compiled.values()):
            recorder.fast = fast

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

    def _record(self, regs: Any, caller: str | None) -> None:
        values = self._fetch(regs)
        # The thread's key: its id and name are looked up when the buffer is read.
        key = _thread_key()
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
        self.buffer.append(_time_ns(), key, self, values, caller, size)

    def _hit(self, p: Any, regs: Any) -> None:
        self._record(regs, None)

    def _ret_hit(self, ri: Any, regs: Any) -> None:
        back = regs.frame.f_back
        caller = None
        if back is not None:
            code = back.f_code
            caller = f"{back.f_globals.get('__name__', '?')}:{code.co_qualname}"
        self._record(regs, caller)

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<Event {self.group}/{self.name} {state} {self.definition.text!r}>"


__all__ = ["Event", "KprobeError", "ParseError"]
