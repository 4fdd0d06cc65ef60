"""The return side of kretprobes: per-call instances and the return hit path.

The kernel's kretprobe puts a kprobe at function entry whose handler takes a free
`kretprobe_instance`, runs `entry_handler`, and hijacks the return address so that the
trampoline runs `handler` when the call returns. Here the entry kprobe takes the instance
and files it under the probed *frame* (a frame is one call: recursion, threads, suspended
generators and coroutines each have their own); the mechanism's return hooks (breakpoint:
`arm_return`; optimized: built into the rewritten code) call `ReturnSite`, which pops the
frame's instance from every kretprobe on that code and runs its handler.

Where the entry of a plain function is optimized too, rewritten code takes the fast path
instead (core/rethook.py, the kernel's rethook): entry and return are paired there, and
the calls it serves never reach `_inflight`; its careful returns come back here.
"""

from __future__ import annotations

import sys
from _thread import get_ident
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from pykprobes.core import rethook
from pykprobes.core.guard import HIT_CODES, report_fault, thread_busy
from pykprobes.core.guard import busy as _busy
from pykprobes.core.guard import held as _held
from pykprobes.core.probe import Kprobe
from pykprobes.core.regs import Regs, SiteRegs
from pykprobes.core.site import HIT_CODE

if TYPE_CHECKING:
    from pykprobes.core.codestate import CodeState
    from pykprobes.core.kretprobe import Kretprobe
    from pykprobes.core.site import Site

_getframe = sys._getframe
_hit_frame = rethook.hit_frame

# CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR (Include/cpython/code.h): their frames
# are suspended and resumed, so their calls do not nest.
_GENERATOR_LIKE = 0x20 | 0x80 | 0x200
_CO_OPTIMIZED = 0x01
_CO_VARARGS = 0x04
_CO_VARKEYWORDS = 0x08


class KretprobeInstance:
    """One call of a kretprobed function (`struct kretprobe_instance`).

    The fast path (core/rethook.py) makes these in C without `__init__`: `data` is made
    when first read, and `frame` is found when first read while one of the call's handlers
    runs (None if it never was)."""

    __slots__ = ("_data", "_frame", "exception", "retval", "rp", "thread")
    _data: dict[str, Any]  # made when first asked for (`data`)

    def __init__(self, rp: Kretprobe, frame: FrameType) -> None:
        #: The kretprobe this call belongs to.
        self.rp = rp
        #: The ident of the thread that made the call.
        self.thread = get_ident()
        self._frame: FrameType | None = frame
        #: How the call ended: the value it returned, or the exception that left it.
        self.retval: Any = None
        self.exception: BaseException | None = None

    @property
    def data(self) -> dict[str, Any]:
        """Private to this call, shared by its entry and return handlers."""
        try:
            return self._data
        except AttributeError:
            data: dict[str, Any] = {}
            self._data = data
            return data

    @property
    def frame(self) -> FrameType | None:
        """The call's frame."""
        try:
            return self._frame
        except AttributeError:
            frame = _hit_frame(self) if _hit_frame is not None else None
            if frame is not None:
                self._frame = frame
            return frame

    @frame.setter
    def frame(self, frame: FrameType | None) -> None:
        self._frame = frame

    def __repr__(self) -> str:
        return f"<KretprobeInstance {self.rp.symbol} thread={self.thread}>"


def parameters(code: Any) -> tuple[str, ...]:
    """The parameter names of a function's code, in order (positional, keyword-only,
    `*args`, `**kwargs`): what a rewritten entry passes to a compiled return."""
    flags = code.co_flags
    if not flags & _CO_OPTIMIZED:
        return ()
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(flags & _CO_VARARGS) + bool(flags & _CO_VARKEYWORDS)
    return tuple(code.co_varnames[:count])


class ReturnSite:
    """The kretprobes on one code object and its return hooks."""

    __slots__ = ("armed", "entry_hook", "fast", "regs", "ret_hook", "rethook", "rps",
                 "unwind_hook", "variables")

    def __init__(self) -> None:
        #: The kretprobes whose returns are watched (registered, not gone), in order.
        self.rps: tuple[Kretprobe, ...] = ()
        #: Whether the mechanism must report returns (False while all are disarmed).
        self.armed = False
        #: The fast path's Regs (frame given), as a Site's.
        self.regs = SiteRegs(0, HIT_CODE, HIT_CODES, _held, _busy)
        #: The fast path of rewritten code (core/rethook.py), its three calls (kept: the
        #: registry compares what a version calls by identity), and what its entry passes.
        self.rethook: Any = rethook.RethookImpl(
            _busy, _held, self.regs, self.regs, self._end, KretprobeInstance, report_fault)
        self.entry_hook = self.rethook.entry
        self.ret_hook = self.rethook.ret
        self.unwind_hook = self.rethook.unwind
        self.variables: tuple[str, ...] = ()
        #: Whether the fast path may serve this code (a published plan: see `publish`).
        self.fast = False

    def publish(self, site: Site | None, code: Any) -> None:
        """Give the fast path its plan: the entry site's active probes (under the registry
        lock, whenever they or the kretprobes change). None for generator-like code, whose
        calls do not nest, or while returns are not armed."""
        hook = self.rethook
        if site is None or not self.armed or not site.active or \
                code.co_flags & _GENERATOR_LIKE or not code.co_flags & _CO_OPTIMIZED:
            hook.publish(None, 0)
            self.fast = False
            self.variables = ()
            return
        items: list[Any] = []
        compiled = False
        for p in site.active:
            rp = getattr(p, "rp", None)
            if rp is not None:
                if rp not in self.rps:  # being detached: the registry publishes again
                    hook.publish(None, 0)
                    self.fast = False
                    self.variables = ()
                    return
                item = rp.fast
                item.kp = p
                item.table = rp._inflight
                item.maxactive = rp.maxactive
                item.compiled = _offer(rp, code)
                compiled = compiled or item.compiled is not None
                items.append(item)
            else:
                items.append((p, p.pre_handler))
        names = parameters(code)
        hook.set_entry_regs(site.regs)
        hook.publish(tuple(items), len(names))
        self.fast = True
        self.variables = names if compiled else ()

    def drop(self, rp: Kretprobe) -> None:
        """Forget the fast path's calls of `rp` in flight (counted missed by the caller)."""
        self.rethook.drop(rp.fast)

    def bp_return(self, frame: FrameType, value: object) -> None:
        self._end(frame, value, None, True)

    def bp_unwind(self, frame: FrameType, exc: BaseException) -> None:
        self._end(frame, None, exc, True)

    def opt_return(self, value: object) -> None:
        self._end(_getframe(1), value, None)

    def opt_unwind(self, exc: BaseException) -> None:
        self._end(_getframe(1), None, exc)

    def _end(self, frame: FrameType, value: object, exc: BaseException | None,
             every: bool = False) -> None:
        """The return of `frame`: each kretprobe's instance of it, and its handler. `every`:
        a breakpoint's return hook, which sees calls entered before the kretprobes were
        armed too (their `returns_unentered`)."""
        rps = self.rps
        if not rps:
            return
        fast = not _busy and _held[0] is None
        if not fast:
            tid = get_ident()
            if thread_busy(tid, _getframe(1)):
                # A return inside a handler: the handler does not run (kernel: nmissed).
                for rp in rps:
                    rp._entered.discard(id(frame))
                    if rp._inflight.pop(frame, None) is not None:
                        rp._missed += 1
                return
            regs: Regs = Regs(frame, 0)
            _busy[tid] = regs
        else:
            # No handler runs anywhere: the fast path's mark and the code's own Regs (see
            # core/site.py), emptied after the handlers so that it keeps nothing alive.
            regs = self.regs
            regs._frame = frame
            _held[0] = regs
        regs.retval = value
        regs.exception = exc
        try:
            for rp in rps:
                ri = rp._inflight.pop(frame, None)
                if rp.returns_unentered:
                    entered = id(frame) in rp._entered
                    rp._entered.discard(id(frame))
                    if ri is None and every and not entered:
                        ri = KretprobeInstance(rp, frame)
                if ri is None:
                    continue
                ri.retval = value
                ri.exception = exc
                ri.frame = frame
                rp.nhit += 1
                handler = rp.handler
                if handler is not None:
                    try:
                        handler(ri, regs)
                    except KeyboardInterrupt:
                        raise
                    except BaseException as err:  # noqa: BLE001 - never reaches the program
                        report_fault(rp, "handler", err)
        finally:
            regs.retval = regs.exception = None
            if fast:
                self.regs._frame = None
                _held[0] = None
            else:
                del _busy[tid]
                regs.invalidate()


#: The kit a kretprobe's `compile_return` gets (core/rethook.py ReturnKit).
RETURN_KIT: Final = rethook.ReturnKit(rethook.CompiledReturnImpl, _busy, _held)


def _offer(rp: Kretprobe, code: Any) -> Any:
    """The compiled return `rp` offers for `code` (a return event's), or None. An offer that
    raises is no offer."""
    offer = rp.compile_return
    if offer is None:
        return None
    try:
        return offer(code, RETURN_KIT)
    except Exception:  # noqa: BLE001 - a bad offer leaves the kretprobe a plain one
        return None


# A frame of `_end` on a thread's stack means a return handler runs there.
HIT_CODES.add(ReturnSite._end.__code__)


class EntryProbe(Kprobe):
    """The kprobe a kretprobe puts at its function's entry; listed as `r`."""

    __slots__ = ("rp",)
    kind = "r"

    def __init__(self, rp: Kretprobe, **kwargs: Any) -> None:
        self.rp = rp  # first: Kprobe's __init__ sets nhit, which reads it
        super().__init__(pre_handler=rp._entry, **kwargs)

    @property
    def nhit(self) -> int:
        """Hits: the careful path's, and the fast path's (core/rethook.py counts them)."""
        return _NHIT.__get__(self) + self.rp.fast.entries  # type: ignore[no-any-return]

    @nhit.setter
    def nhit(self, value: int) -> None:
        _NHIT.__set__(self, value - self.rp.fast.entries)


# Kprobe's own `nhit` slot, which EntryProbe's property stands in front of.
_NHIT: Final[Any] = Kprobe.__dict__["nhit"]


# The table's side (core/table.py), with its lock held.


def attach(p: Kprobe, state: CodeState, all_disarmed: bool) -> None:
    """A kretprobe's entry probe has a site (at once, or when its module is imported):
    watch the code's returns."""
    if not isinstance(p, EntryProbe):
        return
    if state.returns is None:
        state.returns = ReturnSite()
    if p.rp not in state.returns.rps:
        state.returns.rps = (*state.returns.rps, p.rp)
    refresh(state, all_disarmed)


def refresh(state: CodeState, all_disarmed: bool) -> None:
    """Whether the code's returns must be reported: not while everything is disarmed or its
    kretprobes are gone. Calls in flight when reporting stops are counted as missed."""
    returns = state.returns
    if returns is None:
        return
    armed = not all_disarmed and any(
        rp.kp is not None and not rp.kp.is_gone() for rp in returns.rps
    )
    if returns.armed and not armed:
        for rp in returns.rps:
            rp._drop_inflight(returns)
    returns.armed = armed
    returns.publish(state.sites.get(0), state.original)


def detach(p: Kprobe, state: CodeState) -> None:
    if not isinstance(p, EntryProbe) or state.returns is None:
        return
    returns = state.returns
    returns.rps = tuple(rp for rp in returns.rps if rp is not p.rp)
    p.rp._drop_inflight(returns)
    # The entry site still lists p until the table refreshes it (which publishes again).
    returns.publish(None, state.original)
    if not returns.rps:
        state.returns = None
