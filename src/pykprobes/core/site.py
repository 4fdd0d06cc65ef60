"""A probe site and the hit path (the kernel's aggregate probe and `aggr_pre_handler`).

Every registered address has one `Site`; with more than one probe there it is the
*aggregate probe*: each probe keeps its own handlers and counters. Rewritten code runs the
site's inline hit (`Site.inline_hit`, core/opthit.py: the fast path below split between a C call
and the rewritten code, which calls the handler itself), or, for a compiled call and where
the inline sequence cannot go, calls `Site.hit`, the trampoline (no argument: the probed
frame is the caller's); the breakpoint mechanisms call `Site.pre`/`Site.post` with the
frame they were given (or None for a pre-handler: see core/arch.py PreHit).

The hot path never raises into the program, never imports, never logs: a handler's
exception is counted on its probe and reported once; a hit while any handler runs on the
same thread (a probe in code a handler calls) skips the handlers and counts `nmissed`, as
the kernel's per-CPU `current_kprobe` does.

Two paths serve a hit:

* the **fast path**, when no thread is running a handler and the site has one active probe
  with a pre-handler: mark `_held[0]`, count the hit, call the handler with the site's own
  `Regs`, unmark. No thread ident, no allocation, no frame object unless the handler asks
  for `regs.frame`. Only one thread can be on it at a time (any other finds the mark),
  which is what lets it use a per-site Regs and a mark that names no thread. The mark is a
  list slot, not a dict key: storing into a list costs a few ns where a dict insert and
  delete cost ~50 (bench ladder).
* the **careful path** otherwise: `_busy` is keyed by thread ident, and a thread that finds
  `_held[0]` set tells whether it is itself inside that fast-path handler by looking for a
  hit frame on its own stack (guard.fast_hit_on_stack) — the only per-thread fact the fast
  path leaves behind. That walk is paid only when hits meet a handler in flight.

The two marks are core/guard.py's (the kernel's current_kprobe), read here as globals.
"""

from __future__ import annotations

import sys
from _thread import get_ident
from collections.abc import Callable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Final

from pykprobes.core.arch import CompiledCall, InlineHit, OptHit, opt_call
from pykprobes.core.framecall import frame_call
from pykprobes.core.guard import HIT_CODES, report_fault, thread_busy
from pykprobes.core.guard import busy as _busy
from pykprobes.core.guard import held as _held
from pykprobes.core.opthit import CALLER_DEPTH, Gate
from pykprobes.core.regs import CAREFUL_CODES, Regs, SiteRegs, probed_frame

if TYPE_CHECKING:
    from pykprobes.core.address import ProbeAddress
    from pykprobes.core.probe import Kprobe

_getframe = sys._getframe


def _call(p: Kprobe, handler: Any, regs: Regs, where: str) -> None:
    """The careful path's handler call (the fast paths inline the same lines: a call more
    would cost them as much as the handler's own)."""
    try:
        handler(p, regs)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - never reaches the program
        report_fault(p, where, exc)


def _make_trampoline(site: Site) -> Callable[[], None]:
    """The site's hit: what rewritten code calls. A closure, so that the call is a plain
    Python-to-Python call (inlined by the 3.11+ eval loop) and every name it reads is a
    cell or a global-free constant; `fast` is rebound by `Site.set_active`."""
    fast: tuple[Kprobe, Any, SiteRegs] | None = None
    busy = _busy
    held = _held
    fault = report_fault

    def hit() -> None:
        if fast is None or held[0] is not None or busy:
            site.careful()
            return
        # From the tests to the mark there is no call and no backward jump, the only places
        # where 3.11-3.13 switch threads: an unregister that published a new `fast` either
        # came before the test or finds the mark (synchronize_hits).
        p, handler, regs = fast
        held[0] = regs
        try:
            p._nhit += 1
            handler(p, regs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - never reaches the program
            fault(p, "pre_handler", exc)
        finally:
            held[0] = None

    return hit


#: The code of every site's trampoline (they are closures of one function): a frame running
#: it is a hit in progress.
HIT_CODE: Final[CodeType] = _make_trampoline(None).__code__  # type: ignore[arg-type]
_FAST_CELL: Final = HIT_CODE.co_freevars.index("fast")


class Site:
    """One probe address and the probes registered there."""

    __slots__ = (
        "__weakref__",
        "active",
        "addr",
        "entry_event",
        "fast",
        "compiled",
        "gate",
        "hit",
        "inline",
        "inline_hit",
        "optimized",
        "posts",
        "probes",
        "regs",
        "symbol",
    )

    def __init__(self, addr: ProbeAddress, symbol: str) -> None:
        self.addr = addr
        #: `module:Qual.name` (without the offset).
        self.symbol = symbol
        self.probes: list[Kprobe] = []
        #: The enabled, armed probes, in registration order: what a hit runs. Replaced
        #: (never mutated) under the table lock by `set_active`, so that a hit reads a
        #: consistent tuple.
        self.active: tuple[Kprobe, ...] = ()
        #: The active probes that have a post_handler.
        self.posts: tuple[Kprobe, ...] = ()
        self.optimized = False
        #: Served by a call sequence in rewritten code: optimized, or armed by a rewrite
        #: where the breakpoint arch would tax unprobed code (core/optimizer.py
        #: `rewrites_breakpoint`). Kept by the table with `optimized`.
        self.inline = False
        self.entry_event = False
        #: The fast path's Regs: one per site, valid while its handler runs (the kernel's
        #: pt_regs live on the stack of the hit, too).
        self.regs = SiteRegs(addr.offset, HIT_CODE, HIT_CODES, _held, _busy)
        #: (probe, pre_handler, regs) when a hit can take the fast path (one active probe
        #: with a pre-handler and no post-handler), else None; the trampoline's cell holds
        #: the same.
        self.fast: tuple[Kprobe, Any, SiteRegs] | None = None
        #: (record, variable names) of the compiled call the fast path's probe offers at a
        #: function's entry (an event's recorder: core/framecall.py), or None: what a
        #: breakpoint hit calls instead of the probe's handler.
        self.compiled: tuple[Callable[..., bool], tuple[str, ...]] | None = None
        #: The trampoline: the no-argument hit that rewritten code calls where it does not
        #: run the inline hit (a compiled call's careful path, an offset of unknown depth).
        self.hit: Callable[[], None] = _make_trampoline(self)
        #: The inline hit (core/opthit.py): what rewritten code runs at a plain hit.
        self.gate = Gate(_held, _busy, self.careful_inline)
        self.inline_hit = InlineHit(self.gate.bound(), self.fault, self.gate, self.hit)

    @property
    def is_aggregate(self) -> bool:
        return len(self.probes) > 1

    def set_active(self, active: tuple[Kprobe, ...]) -> None:
        """Publish what a hit runs (under the table lock)."""
        self.active = active
        self.posts = tuple(p for p in active if p.post_handler is not None)
        fast = None
        compiled = None
        if len(active) == 1 and not self.posts and active[0].pre_handler is not None:
            fast = (active[0], active[0].pre_handler, self.regs)
            if self.addr.offset == 0:
                call = opt_call(active, self.hit, self.addr.code, 0)
                if isinstance(call, CompiledCall):
                    compiled = (call.record, call.variables)
        self.compiled = compiled
        self.fast = fast
        cell = self.hit.__closure__[_FAST_CELL]  # type: ignore[index]
        cell.cell_contents = fast
        if fast is None:
            self.gate.publish(None, None)
        else:
            self.gate.publish((fast[1], fast[0], fast[2], _held), fast[0]._count)

    def opt_hit(self, code: CodeType) -> OptHit | CompiledCall | InlineHit:
        """What the optimizer builds in at this site: the compiled call its probe offers,
        else the inline hit."""
        call = opt_call(self.active, self.hit, code, self.addr.offset)
        return self.inline_hit if call is self.hit else call

    def careful(self) -> None:
        """The trampoline's slow path: a handler runs somewhere, or the site is an aggregate
        (or has no pre-handler). The probed frame is above our caller, the trampoline."""
        if self.active:
            hit_frame = _getframe(1)
            self._run(probed_frame(hit_frame), hit_frame.f_back)

    def careful_inline(self) -> None:
        """The inline hit's slow path (core/opthit.py): its `enter` calls it, and the
        probed frame is `enter`'s caller."""
        if self.active:
            frame = _getframe(CALLER_DEPTH)
            self._run(frame, frame)

    def fault(self, exc: BaseException) -> None:
        """The inline hit's handler raised `exc`: counted on the probe of that hit (once
        reported), then the mark cleared; KeyboardInterrupt goes on into the program, as the
        trampoline lets it."""
        try:
            if not isinstance(exc, KeyboardInterrupt):
                report_fault(self.gate.probe, "pre_handler", exc)
        finally:
            _held[0] = None
        if isinstance(exc, KeyboardInterrupt):
            raise exc

    def pre(self, frame: FrameType | None, offset: int = 0) -> None:
        """Before the instruction runs: the aggregate pre-handler (breakpoint mechanisms).
        The same two paths as the trampoline's. `frame` None: the caller is a mechanism's
        callback called for the probed frame (regs.CALLBACK_CODES), and the frame is found
        when needed."""
        if _busy or _held[0] is not None:
            if self.active:
                self._run(frame or probed_frame(_getframe(0)), _getframe(1))
            return
        fast = self.fast
        if fast is None:
            if self.active:
                self._run(frame or probed_frame(_getframe(0)), None)
            return
        p, handler, regs = fast
        compiled = self.compiled
        if compiled is not None:
            # An event's recorder reads the arguments itself (core/framecall.py); when it
            # refuses, the handler runs as for any hit.
            if frame is None:
                # A mechanism's callback called us for the probed frame: most often directly
                # (sys._getframe makes the frame object of the depth asked for only).
                frame = _getframe(2)
                if frame.f_code is not self.addr.code:
                    frame = probed_frame(_getframe(0))
            if not frame_call(compiled[0], frame, compiled[1]):
                return
        _held[0] = regs
        regs._frame = frame
        try:
            p._nhit += 1
            handler(p, regs)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - never reaches the program
            report_fault(p, "pre_handler", exc)
        finally:
            regs._frame = None
            _held[0] = None

    def _run(self, frame: FrameType, stack: FrameType | None) -> None:
        active = self.active
        tid = get_ident()
        if (_busy or _held[0] is not None) and thread_busy(tid, stack):
            for p in active:
                p.nmissed += 1
            return
        regs = _busy[tid] = Regs(frame, self.addr.offset)
        try:
            # Read again now that synchronize_hits() can see this hit: an unregister that
            # did not see it has already published the new tuple.
            for p in self.active:
                p._nhit += 1
                if p.pre_handler is not None:
                    _call(p, p.pre_handler, regs, "pre_handler")
        finally:
            del _busy[tid]
            regs.invalidate()

    def post(self, frame: FrameType, offset: int = 0) -> None:
        """After the instruction ran: the aggregate post-handler."""
        posts = self.posts
        if not posts:
            return
        tid = get_ident()
        if (_busy or _held[0] is not None) and thread_busy(tid, _getframe(1)):
            return  # the pre-hit was counted missed already
        regs = _busy[tid] = Regs(frame, self.addr.offset)
        try:
            for p in self.posts:
                if p.post_handler is not None:
                    _call(p, p.post_handler, regs, "post_handler")
        finally:
            del _busy[tid]
            regs.invalidate()

    def __repr__(self) -> str:
        return f"<Site {self.symbol}+{self.addr.offset} probes={len(self.probes)}>"


# The code of the frames that run a hit's handlers (guard.fast_hit_on_stack, SiteRegs).
HIT_CODES.add(HIT_CODE)
HIT_CODES.add(Site.pre.__code__)
CAREFUL_CODES.add(Site._run.__code__)
CAREFUL_CODES.add(Site.careful.__code__)
CAREFUL_CODES.add(Site.careful_inline.__code__)
