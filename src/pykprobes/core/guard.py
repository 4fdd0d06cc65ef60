"""The guard around handlers: the kernel's per-CPU `current_kprobe`, `kprobe_busy` and fault
reporting, for threads.

While a handler runs on a thread, a probe hit on that same thread runs no handler and counts
`nmissed` (the kernel's kprobe_running() test in its handlers' entry). Two marks say which
threads run one, read by every hit path (core/site.py, core/returns.py) and by the trace
layer's compiled recorders (handed `CURRENT_KPROBE` through the compiled-call offer,
core/arch.py `opt_call`):

* `busy`: thread ident -> the Regs of the careful-path hit whose handlers that thread runs
  (or KPROBE_BUSY: pykprobes' own work, `kprobe_busy`). A dict keyed by thread ident is
  cheaper than a threading.local attribute, and the Regs object tells one careful hit from
  the next (synchronize_hits);
* `held[0]`: the Regs of the one fast-path hit in flight, or None. It names no thread: a
  thread that finds it set tells whether it is inside that hit by looking for a hit frame
  on its own stack (`fast_hit_on_stack`), paid only when hits meet a handler in flight.

A handler's exception is a *fault*: counted in the probe's `nfault`, reported once as a
KprobeFaultWarning, never raised into the program (the kernel's kprobe_fault_handler).
Reporting never raises either: a warning from inside an import, a handler or the
interpreter's exit must not become the program's exception.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from _thread import get_ident
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from pykprobes.core.regs import INLINE_CALLS, CodeIds, Regs, inline_gate

if TYPE_CHECKING:
    from pykprobes.core.probe import Kprobe


class CurrentKprobe:
    """The two marks (see the module docstring), as handed to a compiled recorder."""

    __slots__ = ("busy", "held")

    def __init__(self) -> None:
        self.busy: Final[dict[int, Regs]] = {}
        #: Never resized (the C recorders of trace/ read item 0 unchecked).
        self.held: Final[list[Regs | None]] = [None]


#: The process's marks (the kernel's per-CPU current_kprobe).
CURRENT_KPROBE: Final = CurrentKprobe()
# The hit paths read them as globals of their own modules: a global is cheaper to read than
# an attribute.
busy: Final = CURRENT_KPROBE.busy
held: Final = CURRENT_KPROBE.held

#: The code of the frames that run a hit's handlers (`fast_hit_on_stack`, SiteRegs): the
#: trampoline and `Site.pre` (core/site.py adds them), and the return side's
#: (core/returns.py).
HIT_CODES: Final = CodeIds()

_getframe = sys._getframe


# --------------------------------------------------------------------------- faults


class KprobeFaultWarning(RuntimeWarning):
    """A probe handler raised (a fault); the program did not see it. Reported once per
    probe, counted in its `nfault`."""


def report_fault(p: Kprobe | Any, where: str, exc: BaseException) -> None:
    """Count a handler's exception on its probe (`nfault`), and warn the first time."""
    p.nfault += 1
    if p.nfault != 1:
        return
    try:
        warnings.warn(
            KprobeFaultWarning(
                f"pykprobes: the {where} of probe {p.symbol} raised "
                f"{type(exc).__name__}: {exc}; counted in .nfault, reported once"
            ),
            stacklevel=1,
        )
    except Exception:  # noqa: BLE001 - warnings set to 'error' must not reach the program
        pass


def warn(message: str, stacklevel: int = 2) -> None:
    """A RuntimeWarning that cannot raise (warnings as errors must not break an import)."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    except Exception:  # noqa: BLE001 - warnings as errors must not break an import
        pass


def write_stderr(text: str) -> None:
    """Write to stderr whatever its state (None under pythonw, closed at exit)."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(text)
            sys.stderr.flush()
    except Exception:  # noqa: BLE001 - nowhere left to report it
        pass


# --------------------------------------------------------------------------- in a handler


def _stack(frame: FrameType | None) -> Iterator[FrameType]:
    """`frame` and its callers, innermost first."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def _is_hit(f: FrameType, hits: set[int]) -> bool:
    """`f` runs a hit: a trampoline, `Site.pre`..., or a probed frame calling its handler
    inline (core/opthit.py)."""
    key = id(f.f_code)
    if key in hits:
        return True
    calls = INLINE_CALLS.get(key)
    return calls is not None and f.f_lasti in calls


def fast_hit_on_stack(frame: FrameType | None) -> bool:
    """True if `frame` or a caller of it runs a hit (a trampoline, `Site.pre`, an inline
    handler call): this thread is inside a handler (a fast-path one, or a careful one,
    which also marks its ident)."""
    hits = HIT_CODES.ids
    return any(_is_hit(f, hits) for f in _stack(frame))


def thread_busy(tid: int, frame: FrameType | None) -> bool:
    """Is this thread (`tid`, whose stack `frame` is in) running a handler?"""
    if tid in busy:
        return True
    return held[0] is not None and fast_hit_on_stack(frame)


def in_handler() -> bool:
    """True while this thread runs a probe handler."""
    return thread_busy(get_ident(), _getframe(1))


class _InFlight:
    """A hit seen in another thread: its outermost hit frame, and for an inline hit (whose
    frame goes on running the program afterwards) the place and the gate's serial."""

    __slots__ = ("frame", "gate", "lasti", "serial")

    def __init__(self, frame: FrameType) -> None:
        self.frame = frame
        self.gate = inline_gate(frame)
        self.lasti = frame.f_lasti
        self.serial = self.gate.serial if self.gate is not None else 0

    def running(self, stack: FrameType | None) -> bool:
        """Still in flight: the frame on that thread's stack and, inline, still in the same
        handler call."""
        if not _on_stack(self.frame, stack):
            return False
        gate = self.gate
        return gate is None or (self.frame.f_lasti == self.lasti and gate.serial == self.serial)


def _fast_frames() -> dict[int, _InFlight]:
    """Threads now inside a hit, with the outermost frame running one."""
    hits = HIT_CODES.ids
    found: dict[int, FrameType] = {}
    for tid, frame in sys._current_frames().items():
        for f in _stack(frame):
            if _is_hit(f, hits):
                found[tid] = f
    return {tid: _InFlight(f) for tid, f in found.items()}


def synchronize_hits(timeout: float = 10.0) -> None:
    """Wait until every hit in flight in another thread has finished (the kernel waits with
    synchronize_rcu() after unregistering). Hits that start later read the new tables. Call
    it without holding the table lock: a handler may register probes."""
    me = get_ident()
    # A thread in kprobe_busy runs no handler: nothing of it to wait for.
    inflight = {tid: regs for tid, regs in list(busy.items())
                if tid != me and regs is not KPROBE_BUSY}
    # A fast-path hit names no thread: find the trampoline frames on the other threads'
    # stacks, and wait for those very frames to leave them. Holding the frame objects keeps
    # their identity from being reused meanwhile.
    fast = {t: f for t, f in _fast_frames().items() if t != me} if held[0] is not None else {}
    deadline = time.monotonic() + timeout
    while (inflight or fast) and time.monotonic() < deadline:
        time.sleep(0.0002)
        inflight = {tid: r for tid, r in inflight.items() if busy.get(tid) is r}
        if fast:
            now = sys._current_frames()
            fast = {t: f for t, f in fast.items() if f.running(now.get(t))}


def _on_stack(target: FrameType, frame: FrameType | None) -> bool:
    return any(f is target for f in _stack(frame))


# --------------------------------------------------------------------------- kprobe_busy

#: What `busy` holds for a thread doing pykprobes' own work (the kernel's `kprobe_busy`, the
#: dummy probe that `kprobe_busy_begin()` makes current): see `kprobe_busy`.
KPROBE_BUSY: Final = Regs(None, 0)  # type: ignore[arg-type]


class kprobe_busy:
    """`with kprobe_busy():` runs pykprobes' own work on this thread (a trace writer, a
    command's set-up) as the kernel's kprobe_busy_begin()/kprobe_busy_end() bracket theirs:
    a probe hit meanwhile on this thread runs no handler and is counted in `nmissed`, as
    any hit inside a handler is (`thread_busy`). Nothing of the program is recorded on
    behalf of pykprobes, and the hit paths pay nothing for it: other threads' hits take the
    careful path while the bracket is open, as while a handler runs. Nests; restores what
    the thread had (a handler's Regs) on exit."""

    __slots__ = ("_prev", "_tid")

    def __enter__(self) -> None:
        tid = self._tid = get_ident()
        self._prev = busy.get(tid)
        busy[tid] = KPROBE_BUSY

    def __exit__(self, *exc_info: object) -> None:
        if self._prev is None:
            busy.pop(self._tid, None)
        else:
            busy[self._tid] = self._prev


def _after_fork_in_child() -> None:
    # Only the thread that forked goes on in the child: the hits and kprobe_busy brackets
    # other threads had open are not the child's, and left in `busy` / `held` they would
    # send every hit of the child down the careful path for good.
    me = get_ident()
    for tid in [t for t in busy if t != me]:
        del busy[tid]
    if held[0] is not None and not fast_hit_on_stack(_getframe(0)):
        held[0] = None


os.register_at_fork(after_in_child=_after_fork_in_child)
