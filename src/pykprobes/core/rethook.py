"""The kretprobe fast path of rewritten code (the kernel's `rethook`): entry and return of
a kretprobed function in a few C calls, with no frame object and no Python-level instance
unless a handler needs one.

Where a function's code is rewritten for a kretprobe and its entry probe is optimized (the
entry site is at offset 0 of a plain function: not a generator or coroutine), the rewritten
code calls, instead of the entry site's trampoline and ReturnSite's hooks,

* `entry(*values)` right after the first RESUME (a core/arch.py CompiledCall: when it
  returns True, the injected code calls the site's trampoline, the careful path);
* `ret(value)` before each return, and `unwind(exc)` when an exception leaves the frame.

Every frame of such a version passes `entry` once, before any return, and ends through
`ret` or `unwind` (inject.py covers everything after the entry with the unwind handler).
So the calls of one thread nest: `entry` pushes a *node* on the thread's stack, and `ret`
or `unwind` pops the node of its frame (the node's key: the frame's interpreter frame in
C, the frame object here). A node is

* *careful* when `entry` handed the hit to the trampoline (no plan, a handler running in
  some thread, or values not as planned): the return goes to `ReturnSite._end`, which
  finds the call's instance under its frame, as for any other version;
* else it holds, per planned kretprobe, what its return needs: a KretprobeInstance (its
  handlers are Python), or the values a compiled return event keeps from the entry.

The *plan* (`publish`) is the entry site's active probes, in order, each a `(kprobe,
pre_handler)` pair or a kretprobe's `RetProbe`. `entry` runs them as the careful path
would (every probe's nhit, each pre-handler, each kretprobe's maxactive check and entry
handler), and stamps the entry time when a compiled return needs it. Handlers run with the
thread marked in `core.guard.busy` (as careful hits are), so that a probe hit inside them
is counted missed and other threads take the careful path meanwhile.

The kernel's rules hold as on the careful path: beyond maxactive a call is missed; an entry
handler's truthy result means no return handler; a return inside a handler runs no handler
(nmissed): while any thread runs a handler, a return hands its calls to the careful return
(`_hand_over`), which tells a return inside a handler from one beside it and gives the
latter Regs of its own; unregistering or disarming forgets the calls in flight, counted
missed (`drop`); disabling leaves them to finish. A handler's exception is counted and
reported once, and KeyboardInterrupt goes on into the program.

`_rethook.c` is the C twin (the accelerator, chosen with the trace layer's, accelerator.py),
with the very same behaviour; it keys nodes by interpreter frame, so a frame object is made
only when a handler reads `regs.frame` or `ri.frame` (`hit_frame`). This pure-Python twin
keys them by frame object. The C twin also makes no KretprobeInstance for a kretprobe
without an entry handler until its return handler runs, and reuses the last one when
nothing else holds it (none of which a handler can tell).
"""

from __future__ import annotations

import sys
import time
from _thread import get_ident
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from pykprobes import accelerator

if TYPE_CHECKING:
    from pykprobes.core.regs import Regs

__all__ = ["DURATION", "RETVAL", "CompiledReturn", "RetProbe", "Rethook", "ReturnKit",
           "hit_frame"]

_getframe = sys._getframe
_time_ns = time.monotonic_ns

#: A compiled return's sources (`CompiledReturn.sources`): the value returned ($retval),
#: and the time since the entry ($duration); any other source is the index of a value kept
#: from the entry.
RETVAL: Final = -1
DURATION: Final = -2


class CompiledReturn:
    """What a return event offers for its kretprobe on one code object (events.py): the
    entry keeps the parameters at `indices` (of the code's parameters, which the rewritten
    entry passes, all of them, in order), and the return calls `record(*fields)` (+ the
    caller's `module:qualname` and the return's time, in ns, when `caller`: what a return
    record carries), each field taken from `sources`: RETVAL
    (FAULT when an exception left), DURATION (`convert(ns)`, or the int itself), or the
    index of a kept value. `record` returns True when it did not act (the event changed,
    tracing is off): then the kretprobe's own handler serves the return, from an instance
    whose `data` is `data(kept, entry_ns)` (what its entry handler would have kept; entry_ns
    0 when not stamped). While `on` is false, entries take the plain way (the entry handler
    runs): the event needs more of the entry than this keeps."""

    __slots__ = ("record", "data", "indices", "sources", "convert", "stamp", "caller",
                 "fault", "on")

    def __init__(
        self,
        record: Callable[..., bool],
        data: Callable[[tuple[Any, ...], int], dict[str, Any]],
        indices: tuple[int, ...],
        sources: tuple[int, ...],
        convert: Callable[[int], Any] | None,
        caller: bool,
        fault: object,
    ) -> None:
        self.record = record
        self.data = data
        self.on = True
        self.indices = indices
        self.sources = sources
        #: $duration's conversion (None: the int as it is).
        self.convert = convert
        #: Whether the entry time is kept.
        self.stamp = DURATION in sources
        self.caller = caller
        #: What an unfetchable value records (trace/safe.py FAULT).
        self.fault = fault


class RetProbe:
    """What the fast path needs of one kretprobe (core/kretprobe.py keeps one per
    Kretprobe): its entry probe, handlers, maxactive, the calls it holds in flight, and
    the hits and misses it counted (the Kretprobe adds them to its own)."""

    __slots__ = ("compiled", "entries", "entry_handler", "handler", "inflight", "kp",
                 "maxactive", "nhit", "nmissed", "rp", "table")

    def __init__(self, rp: Any) -> None:
        self.rp = rp
        self.kp: Any = None
        #: The kretprobe's table of careful calls in flight (they count for maxactive too).
        self.table: dict[Any, Any] = {}
        self.entry_handler: Callable[..., Any] | None = None
        self.handler: Callable[..., Any] | None = None
        self.maxactive = 0
        #: Calls entered here whose return is still to come.
        self.inflight = 0
        #: Return handlers run (or careful returns handed over) here.
        self.nhit = 0
        #: Calls missed here (maxactive, a return inside a handler).
        self.nmissed = 0
        #: Hits of the kretprobe's entry probe here (its `nhit` adds them: no int object
        #: per hit on the probe).
        self.entries = 0
        #: The compiled return of the current plan, or None.
        self.compiled: CompiledReturn | None = None


class _Plan:
    __slots__ = ("items", "nvalues", "stamp")

    def __init__(self, items: tuple[Any, ...], nparams: int) -> None:
        self.items = items
        compiled = [c for c in (getattr(i, "compiled", None) for i in items) if c is not None]
        #: The values `entry` needs (the code's parameters), or -1: any (none is kept).
        self.nvalues = nparams if compiled else -1
        self.stamp = any(c.stamp for c in compiled)


class Rethook:
    """`entry(*values) -> bool`, `ret(value)`, `unwind(exc)`: see the module docstring.

    `busy`, `held`: core.site's marks; `entry_regs`/`return_regs`: the SiteRegs handed to
    the handlers (the entry site's, the ReturnSite's); `careful(frame, value, exc)`: the
    return of a careful node (ReturnSite._end); `instance`: the KretprobeInstance class;
    `fault(probe, where, exc)`: core.site's fault report."""

    __slots__ = ("_busy", "_held", "_plan", "_stacks", "careful", "entry_regs", "fault",
                 "instance", "return_regs")

    def __init__(
        self,
        busy: dict[int, Any],
        held: list[Any],
        entry_regs: Regs,
        return_regs: Regs,
        careful: Callable[[FrameType, object, BaseException | None], None],
        instance: type,
        fault: Callable[[Any, str, BaseException], None],
    ) -> None:
        self._busy = busy
        self._held = held
        self.entry_regs = entry_regs
        self.return_regs = return_regs
        self.careful = careful
        self.instance = instance
        self.fault = fault
        self._plan: _Plan | None = None
        #: thread ident -> its nodes: [key frame, plan items or None, payloads, entry ns].
        self._stacks: dict[int, list[list[Any]]] = {}

    def publish(self, items: tuple[Any, ...] | None, nparams: int) -> None:
        """What `entry` runs from now on: the entry site's active probes, in order (each a
        `(kprobe, pre_handler)` pair or a RetProbe); None: nothing (every call goes to the
        careful path). `nparams`: how many parameters the code has (what an entry that
        passes values passes: a compiled return keeps some)."""
        self._plan = None if items is None else _Plan(items, nparams)

    def set_entry_regs(self, regs: Regs) -> None:
        self.entry_regs = regs

    # ------------------------------------------------------------------ entry

    def entry(self, *values: Any) -> bool:
        frame = _getframe(1)
        tid = get_ident()
        stack = self._stacks.get(tid)
        if stack is None:
            stack = self._stacks[tid] = []
        plan = self._plan
        busy = self._busy
        if plan is None or busy or self._held[0] is not None or (
                plan.nvalues >= 0 and len(values) != plan.nvalues):
            stack.append([frame, None, None, 0])
            return True
        items = plan.items
        payloads: list[Any] = [None] * len(items)
        # Pushed first: if a KeyboardInterrupt leaves a handler, the frame's unwind pops it.
        node = [frame, items, payloads, 0]
        stack.append(node)
        regs = self.entry_regs
        marked = False
        try:
            for i, item in enumerate(items):
                if type(item) is tuple:
                    p, handler = item
                    p.nhit += 1
                    if handler is None:
                        continue
                    if not marked:
                        busy[tid] = regs
                        regs._frame = frame
                        marked = True
                    try:
                        handler(p, regs)
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - never reaches the program
                        self.fault(p, "pre_handler", exc)
                    continue
                item.entries += 1
                if len(item.table) + item.inflight >= item.maxactive:
                    item.nmissed += 1
                    continue
                compiled = item.compiled
                if compiled is not None and compiled.on:
                    payloads[i] = (compiled, tuple(values[j] for j in compiled.indices))
                    item.inflight += 1
                    continue
                ri = self.instance(item.rp, frame)
                entry = item.entry_handler
                if entry is not None:
                    if not marked:
                        busy[tid] = regs
                        regs._frame = frame
                        marked = True
                    try:
                        if entry(ri, regs):
                            continue
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - never reaches the program
                        self.fault(item.rp, "entry_handler", exc)
                        continue
                payloads[i] = ri
                item.inflight += 1
        finally:
            if marked:
                del busy[tid]
                regs._frame = None
        if plan.stamp:
            # Last, so that the duration leaves out what the entry cost.
            node[3] = _time_ns()
        return False

    # ------------------------------------------------------------------ return

    def ret(self, value: object) -> None:
        self._leave(_getframe(1), value, None)

    def unwind(self, exc: BaseException) -> None:
        self._leave(_getframe(1), None, exc)

    def _leave(self, frame: FrameType, value: object, exc: BaseException | None) -> None:
        tid = get_ident()
        stack = self._stacks.get(tid)
        # The frame's node is on top, unless frames above it ended unseen (none should):
        # those are forgotten, their calls counted missed. A frame without a node (its entry
        # could not push one, or a debugger's jump skipped it) is the careful path's.
        depth = len(stack) - 1 if stack else -1
        while depth >= 0 and stack[depth][0] is not frame:  # type: ignore[index]
            depth -= 1
        if depth < 0:
            self.careful(frame, value, exc)
            return
        assert stack is not None
        while len(stack) > depth + 1:
            self._miss(stack.pop(), 0)
        node = stack.pop()
        if not stack:
            self._stacks.pop(tid, None)
        items = node[1]
        if items is None:
            self.careful(frame, value, exc)
            return
        busy = self._busy
        if busy or self._held[0] is not None:
            # A handler runs in some thread: the careful return sorts out whether it is this
            # one (a return inside a handler runs none: nmissed) and gives this return Regs
            # of its own; it finds the node's instances where it looks for them.
            self._hand_over(node, frame)
            self.careful(frame, value, exc)
            return
        payloads = node[2]
        regs = self.return_regs
        marked = False
        caller: Any = None
        i = 0
        try:
            while i < len(payloads):
                payload = payloads[i]
                item = items[i]
                i += 1
                if payload is None:
                    continue
                payloads[i - 1] = None
                item.inflight -= 1
                if type(payload) is tuple:
                    compiled, kept = payload
                    # One clock reading: the duration's end is the record's time.
                    now = _time_ns()
                    fields = _fields(compiled, kept, value, exc, node[3], now)
                    if compiled.caller:
                        if caller is None:
                            caller = _caller(frame)
                        fields.append(caller)
                        fields.append(now)
                    if compiled.record(*fields) is False:
                        continue
                    # Refused: the kretprobe's own handler serves it, from an instance.
                    payload = self._to_instance(item, payload, frame, node[3])
                payload.retval = value
                payload.exception = exc
                payload._frame = frame
                item.nhit += 1
                handler = item.handler
                if handler is None:
                    continue
                if not marked:
                    busy[tid] = regs
                    regs._frame = frame
                    regs.retval = value
                    regs.exception = exc
                    marked = True
                try:
                    handler(payload, regs)
                except KeyboardInterrupt:
                    raise
                except BaseException as err:  # noqa: BLE001 - never reaches the program
                    self.fault(item.rp, "handler", err)
        finally:
            if marked:
                del busy[tid]
                regs._frame = None
                regs.retval = regs.exception = None
            # A KeyboardInterrupt left a handler: the calls not served yet are missed.
            self._miss(node, i)

    def _to_instance(self, item: RetProbe, payload: tuple[Any, Any], frame: FrameType,
                     entry_ns: int) -> Any:
        """The instance a compiled return's call becomes when its record refused it."""
        compiled, kept = payload
        ri = self.instance(item.rp, frame)
        ri._data = compiled.data(kept, entry_ns)
        return ri

    def _hand_over(self, node: list[Any], frame: FrameType) -> None:
        """File the node's instances in their kretprobes' tables under `frame`, for the
        careful return (a compiled return's call made one)."""
        items, payloads = node[1], node[2]
        for i, payload in enumerate(payloads):
            if payload is None:
                continue
            payloads[i] = None
            item = items[i]
            item.inflight -= 1
            if type(payload) is tuple:
                payload = self._to_instance(item, payload, frame, node[3])
            item.table[frame] = payload

    @staticmethod
    def _miss(node: list[Any], start: int) -> None:
        """Count the node's calls from `start` on as missed (their returns run nothing)."""
        items, payloads = node[1], node[2]
        if items is None:
            return
        for i in range(start, len(payloads)):
            if payloads[i] is not None:
                payloads[i] = None
                item = items[i]
                item.inflight -= 1
                item.nmissed += 1

    def drop(self, item: RetProbe) -> None:
        """Forget `item`'s calls in flight (its kretprobe is unregistered or disarmed; the
        caller counts them missed): their returns run nothing."""
        for stack in list(self._stacks.values()):
            for node in stack:
                items = node[1]
                if items is None:
                    continue
                for i, other in enumerate(items):
                    if other is item:
                        node[2][i] = None
        item.inflight = 0


def _fields(compiled: CompiledReturn, kept: tuple[Any, ...], value: object,
            exc: BaseException | None, entry_ns: int, now: int) -> list[Any]:
    out: list[Any] = []
    for source in compiled.sources:
        if source == RETVAL:
            out.append(compiled.fault if exc is not None else value)
        elif source == DURATION:
            if not entry_ns:
                out.append(compiled.fault)
                continue
            ns = now - entry_ns
            convert = compiled.convert
            out.append(ns if convert is None else convert(ns))
        else:
            out.append(kept[source])
    return out


def _caller(frame: FrameType) -> str | None:
    """`module:qualname` of the frame's caller (a return record names it)."""
    back = frame.f_back
    if back is None:
        return None
    return f"{back.f_globals.get('__name__', '?')}:{back.f_code.co_qualname}"


def _c_module() -> Any:
    """The C twin (`_rethook`) when the accelerator runs C and it was built; else None."""
    if accelerator.NAME != "c":
        return None
    try:
        from pykprobes.core import _rethook  # type: ignore[attr-defined]
    except ImportError:
        return None
    # It finds frame objects by a field of theirs that CPython may move: checked here.
    return _rethook if _rethook.frames_ok() else None


_C: Final = _c_module()
#: The C twin's module (core/framecall.py uses it too), or None.
C_MODULE: Final = _C

#: The implementation chosen (C, or this module's).
RethookImpl: Any = Rethook if _C is None else _C.Rethook
RetProbeImpl: Any = RetProbe if _C is None else _C.RetProbe
CompiledReturnImpl: Any = CompiledReturn if _C is None else _C.CompiledReturn

class ReturnKit:
    """What the core hands a kretprobe's `compile_return(code, kit)` (trace/events.py), so
    that the trace layer makes a compiled return without importing the core's internals:
    `make(record, data, indices, sources, convert, caller, fault)` (the CompiledReturn of the
    implementation chosen), the two sources that are not kept values, and the
    current_kprobe marks the recorders test (core/guard.py), as compile_call's `current`."""

    __slots__ = ("make", "RETVAL", "DURATION", "busy", "held")

    def __init__(self, make: Callable[..., Any], busy: Any, held: Any) -> None:
        self.make = make
        self.RETVAL = RETVAL
        self.DURATION = DURATION
        self.busy = busy
        self.held = held



#: `hit_frame(obj)`: the probed frame of the C hit in flight whose Regs or instance `obj`
#: is (found when asked), or None. Pure Python twin: frames are given eagerly.
hit_frame: Callable[[Any], FrameType | None] | None = None if _C is None else _C.hit_frame
