"""A probe site and the hit path (the kernel's aggregate probe and `aggr_pre_handler`).

Every registered address has one `Site`; with more than one probe there it is the
*aggregate probe*: each probe keeps its own handlers and counters. The mechanisms call
`Site.pre`/`Site.post` (breakpoint) or `Site.opt_hit` (from rewritten code).

The hot path never raises into the program, never imports, never logs, and allocates only
the `Regs` record: a handler's exception is counted on its probe and reported once; a hit
while any handler runs on the same thread (a probe in code a handler calls) skips the
handlers and counts `nmissed`, as the kernel's per-CPU `current_kprobe` does.
"""

from __future__ import annotations

import sys
import time
import warnings
from _thread import get_ident
from types import FrameType
from typing import TYPE_CHECKING, Final

from pykprobes.core.regs import Regs

if TYPE_CHECKING:
    from pykprobes.core.address import ProbeAddress
    from pykprobes.core.probe import Kprobe

#: Threads now running a handler (the per-CPU `current_kprobe`), each with the Regs of the
#: hit it runs: a dict keyed by thread ident is cheaper than a threading.local attribute on
#: every hit, and the Regs object tells one hit from the next (see synchronize_hits).
_busy: Final[dict[int, Regs]] = {}

_getframe = sys._getframe


class KprobeHandlerWarning(RuntimeWarning):
    """A probe handler raised; the program did not see it. Reported once per probe."""


def _report_fault(p: Kprobe, where: str, exc: BaseException) -> None:
    p.nfault += 1
    if p.nfault != 1:
        return
    try:
        warnings.warn(
            KprobeHandlerWarning(
                f"pykprobes: the {where} of probe {p.symbol} raised "
                f"{type(exc).__name__}: {exc}; counted in .nfault, reported once"
            ),
            stacklevel=1,
        )
    except Exception:  # noqa: BLE001 - warnings set to 'error' must not reach the program
        pass


def in_handler() -> bool:
    """True while this thread runs a probe handler."""
    return get_ident() in _busy


def synchronize_hits(timeout: float = 10.0) -> None:
    """Wait until every hit in flight in another thread has finished (the kernel waits with
    synchronize_rcu() after unregistering). Hits that start later read the new tables. Call
    it without holding the registry lock: a handler may register probes."""
    me = get_ident()
    inflight = {tid: regs for tid, regs in list(_busy.items()) if tid != me}
    deadline = time.monotonic() + timeout
    while inflight and time.monotonic() < deadline:
        time.sleep(0.0002)
        inflight = {tid: r for tid, r in inflight.items() if _busy.get(tid) is r}


class Site:
    """One probe address and the probes registered there."""

    __slots__ = (
        "__weakref__",
        "active",
        "addr",
        "entry_event",
        "optimized",
        "posts",
        "probes",
        "symbol",
    )

    def __init__(self, addr: ProbeAddress, symbol: str) -> None:
        self.addr = addr
        #: `module:Qual.name` (without the offset).
        self.symbol = symbol
        self.probes: list[Kprobe] = []
        #: The enabled, armed probes, in registration order: what a hit runs. Replaced
        #: (never mutated) under the registry lock, so a hit reads a consistent tuple.
        self.active: tuple[Kprobe, ...] = ()
        #: The active probes that have a post_handler.
        self.posts: tuple[Kprobe, ...] = ()
        self.optimized = False
        self.entry_event = False

    @property
    def is_aggregate(self) -> bool:
        return len(self.probes) > 1

    def pre(self, frame: FrameType, offset: int = 0) -> None:
        """Before the instruction runs: the aggregate pre-handler."""
        active = self.active
        if not active:
            return
        tid = get_ident()
        if tid in _busy:
            for p in active:
                p.nmissed += 1
            return
        regs = _busy[tid] = Regs(frame, self.addr.offset)
        try:
            # Read again now that synchronize_hits() can see this hit: an unregister that
            # did not see it has already published the new tuple.
            for p in self.active:
                p.nhit += 1
                handler = p.pre_handler
                if handler is not None:
                    try:
                        handler(p, regs)
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - never reaches the program
                        _report_fault(p, "pre_handler", exc)
        finally:
            del _busy[tid]

    def post(self, frame: FrameType, offset: int = 0) -> None:
        """After the instruction ran: the aggregate post-handler."""
        posts = self.posts
        if not posts:
            return
        tid = get_ident()
        if tid in _busy:
            return  # the pre-hit was counted missed already
        regs = _busy[tid] = Regs(frame, self.addr.offset)
        try:
            for p in self.posts:
                handler = p.post_handler
                if handler is not None:
                    try:
                        handler(p, regs)
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - never reaches the program
                        _report_fault(p, "post_handler", exc)
        finally:
            del _busy[tid]

    def opt_hit(self) -> None:
        """Called by the call sequence in rewritten code; the probed frame is our caller."""
        if self.active:
            self.pre(_getframe(1))

    def __repr__(self) -> str:
        return f"<Site {self.symbol}+{self.addr.offset} probes={len(self.probes)}>"
