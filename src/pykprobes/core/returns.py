"""The return side of kretprobes: per-call instances and the return hit path.

The kernel's kretprobe puts a kprobe at function entry whose handler takes a free
`kretprobe_instance`, runs `entry_handler`, and hijacks the return address so that the
trampoline runs `handler` when the call returns. Here the entry kprobe takes the instance
and files it under the probed *frame* (a frame is one call: recursion, threads, suspended
generators and coroutines each have their own); the mechanism's return hooks (breakpoint:
`arm_return`; optimized: built into the rewritten code) call `ReturnSite`, which pops the
frame's instance from every kretprobe on that code and runs its handler.
"""

from __future__ import annotations

import sys
from _thread import get_ident
from types import FrameType
from typing import TYPE_CHECKING, Any

from pykprobes.core.guard import HIT_CODES, report_fault, thread_busy
from pykprobes.core.guard import busy as _busy
from pykprobes.core.guard import held as _held
from pykprobes.core.probe import Kprobe
from pykprobes.core.regs import Regs, SiteRegs
from pykprobes.core.site import HIT_CODE

if TYPE_CHECKING:
    from pykprobes.core.codestate import CodeState
    from pykprobes.core.kretprobe import Kretprobe

_getframe = sys._getframe


class KretprobeInstance:
    """One call of a kretprobed function (`struct kretprobe_instance`)."""

    __slots__ = ("data", "exception", "frame", "retval", "rp", "thread")

    def __init__(self, rp: Kretprobe, frame: FrameType) -> None:
        #: The kretprobe this call belongs to.
        self.rp = rp
        #: Private to this call, shared by its entry and return handlers.
        self.data: dict[str, Any] = {}
        #: The ident of the thread that made the call.
        self.thread = get_ident()
        self.frame = frame
        #: How the call ended: the value it returned, or the exception that left it.
        self.retval: Any = None
        self.exception: BaseException | None = None

    def __repr__(self) -> str:
        return f"<KretprobeInstance {self.rp.symbol} thread={self.thread}>"


class ReturnSite:
    """The kretprobes on one code object and its return hooks."""

    __slots__ = ("armed", "regs", "rps")

    def __init__(self) -> None:
        #: The kretprobes whose returns are watched (registered, not gone), in order.
        self.rps: tuple[Kretprobe, ...] = ()
        #: Whether the mechanism must report returns (False while all are disarmed).
        self.armed = False
        #: The fast path's Regs (frame given), as a Site's.
        self.regs = SiteRegs(0, HIT_CODE, HIT_CODES, _held, _busy)

    def bp_return(self, frame: FrameType, value: object) -> None:
        self._end(frame, value, None)

    def bp_unwind(self, frame: FrameType, exc: BaseException) -> None:
        self._end(frame, None, exc)

    def opt_return(self, value: object) -> None:
        self._end(_getframe(1), value, None)

    def opt_unwind(self, exc: BaseException) -> None:
        self._end(_getframe(1), None, exc)

    def _end(self, frame: FrameType, value: object, exc: BaseException | None) -> None:
        rps = self.rps
        if not rps:
            return
        fast = not _busy and _held[0] is None
        if not fast:
            tid = get_ident()
            if thread_busy(tid, _getframe(1)):
                # A return inside a handler: the handler does not run (kernel: nmissed).
                for rp in rps:
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


# A frame of `_end` on a thread's stack means a return handler runs there.
HIT_CODES.add(ReturnSite._end.__code__)


class EntryProbe(Kprobe):
    """The kprobe a kretprobe puts at its function's entry; listed as `r`."""

    __slots__ = ("rp",)
    kind = "r"

    def __init__(self, rp: Kretprobe, **kwargs: Any) -> None:
        super().__init__(pre_handler=rp._entry, **kwargs)
        self.rp = rp


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
            rp._drop_inflight()
    returns.armed = armed


def detach(p: Kprobe, state: CodeState) -> None:
    if not isinstance(p, EntryProbe) or state.returns is None:
        return
    state.returns.rps = tuple(rp for rp in state.returns.rps if rp is not p.rp)
    if not state.returns.rps:
        state.returns = None
    p.rp._drop_inflight()
