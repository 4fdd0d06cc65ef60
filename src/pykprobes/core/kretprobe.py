"""Return probes (kretprobes): `Kretprobe` and its registration API.

A kretprobe is a kprobe at the function's entry (shared with other probes there, as an
aggregate probe) plus the return hooks of its code object (`core/returns.py`). Its
semantics are the kernel's (Documentation/trace/kprobes.rst, "Return Probes"):

* `entry_handler(ri, regs)` runs at entry; a truthy result means "no return handler for
  this call" (the kernel's non-zero).
* `handler(ri, regs)` runs when the call ends, with `regs.retval` (and `ri.retval`) the
  returned value, or `regs.exception` (and `ri.exception`) the exception leaving the frame;
  the exception still reaches the caller unchanged.
* `maxactive` calls may be in flight at once; beyond it a call is not probed (neither
  handler runs) and `nmissed` counts it. 0 means the kernel's default,
  `max(10, 2 * os.cpu_count())`.
* Generators, coroutines and async generators: the entry handler runs at the first
  resumption (where the body starts, as for every entry probe), the return handler once,
  when the body ends (returns, raises, or is closed), never at a yield or await.
* `data_size` is checked as the kernel checks it (negative is EINVAL, above
  KRETPROBE_MAX_DATA_SIZE is E2BIG) and otherwise unused: `ri.data` is a dict private to
  the call, which grows as the handlers need.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from pykprobes.core import registry
from pykprobes.core.address import ProbeAddress
from pykprobes.core.guard import report_fault
from pykprobes.core.probe import Kprobe
from pykprobes.core.rethook import RetProbeImpl
from pykprobes.core.returns import EntryProbe, KretprobeInstance, ReturnSite
from pykprobes.errors import KprobeError, einval

if TYPE_CHECKING:
    from pykprobes.core.regs import Regs

KRETPROBE_MAX_DATA_SIZE: Final = 4096
#: The kernel's default maxactive: max(10, 2 * NR_CPUS).
DEFAULT_MAXACTIVE: Final = max(10, 2 * (os.cpu_count() or 1))

RetHandler = Callable[[KretprobeInstance, "Regs"], Any]

# CO_GENERATOR | CO_COROUTINE | CO_ASYNC_GENERATOR (Include/cpython/code.h).
_GENERATOR_LIKE: Final = 0x20 | 0x80 | 0x200


def _close_reports_end() -> bool:
    """Whether the breakpoint arch measured that closing a suspended generator runs its
    frame, so that its end is reported (capability `return_at_generator_close`)."""
    return registry.mechanisms_capabilities().return_at_generator_close


class Kretprobe:
    """A return probe. Give `symbol_name` or `addr` as for a Kprobe; `offset` must be the
    function's entry (0)."""

    def __init__(
        self,
        symbol_name: str | None = None,
        offset: int = 0,
        addr: Any = None,
        handler: RetHandler | None = None,
        entry_handler: RetHandler | None = None,
        data_size: int = 0,
        maxactive: int = 0,
    ) -> None:
        #: What the fast path of rewritten code (core/rethook.py) needs of this kretprobe,
        #: and what it counted.
        self.fast: Any = RetProbeImpl(self)
        self.symbol_name = symbol_name
        self.offset = offset
        self.addr = addr
        self.handler = handler
        self.entry_handler = entry_handler
        self.data_size = data_size
        self.maxactive = maxactive
        self._nhit = 0
        #: Faults: handler exceptions caught and counted.
        self.nfault = 0
        self._missed = 0
        self._inflight: dict[FrameType, KretprobeInstance] = {}
        #: Run the return handler, with an instance that has no data, for a call whose
        #: entry this kretprobe did not see (entered before it was armed) where a
        #: breakpoint sees the return: a return event's `$duration` records (fault) for it
        #: (trace/events.py). The kernel's kretprobes have no such calls; off by default.
        self.returns_unentered = False
        #: id() of the frames whose entry was seen and whose return was not yet, while
        #: `returns_unentered` (a missed or skipped call is no unentered one).
        self._entered: set[int] = set()
        self.kp: EntryProbe | None = None
        #: Optional: `compile_return(code, kit)` -> a core/rethook.py CompiledReturn made with
        #: `kit.make` (a ReturnKit), or None: what a return event offers the fast path
        #: (trace/events.py).
        self.compile_return: Callable[[Any, Any], Any] | None = None

    @property
    def handler(self) -> RetHandler | None:
        return self.fast.handler  # type: ignore[no-any-return]

    @handler.setter
    def handler(self, handler: RetHandler | None) -> None:
        self.fast.handler = handler

    @property
    def entry_handler(self) -> RetHandler | None:
        return self.fast.entry_handler  # type: ignore[no-any-return]

    @entry_handler.setter
    def entry_handler(self, handler: RetHandler | None) -> None:
        self.fast.entry_handler = handler

    @property
    def nhit(self) -> int:
        """Return handlers run."""
        return self._nhit + self.fast.nhit  # type: ignore[no-any-return]

    @nhit.setter
    def nhit(self, value: int) -> None:
        self._nhit = value - self.fast.nhit

    @property
    def nmissed(self) -> int:
        """Calls not probed: beyond maxactive, entered or ended while a handler ran on the
        same thread, or in flight when the probe was unregistered or disarmed."""
        kp_missed = self.kp.nmissed if self.kp is not None else 0
        return self._missed + self.fast.nmissed + kp_missed  # type: ignore[no-any-return]

    @property
    def flags(self) -> int:
        return self.kp.flags if self.kp is not None else 0

    @property
    def registered(self) -> bool:
        return self.kp is not None and self.kp.registered

    @property
    def symbol(self) -> str:
        return self.kp.symbol if self.kp is not None else f"{self.symbol_name}+{self.offset}"

    def _entry(self, p: Kprobe, regs: Regs) -> None:
        """The entry kprobe's pre_handler (the kernel's pre_handler_kretprobe)."""
        frame = regs.frame  # found on demand (SiteRegs): read it once
        if self.returns_unentered:
            self._entered.add(id(frame))
        if len(self._inflight) + self.fast.inflight >= self.maxactive and \
                not self._evict_silent_end(frame):
            self._missed += 1
            return
        ri = KretprobeInstance(self, frame)
        entry = self.entry_handler
        if entry is not None:
            try:
                if entry(ri, regs):
                    return
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - never reaches the program
                report_fault(self, "entry_handler", exc)
                return
        self._inflight[frame] = ri

    def _evict_silent_end(self, frame: FrameType) -> bool:
        """Make room by forgetting the oldest call (counted missed), for generator code on an
        interpreter whose `close()` can end a generator without any event (CPython 3.13.0
        finishes one closed at a plain `yield` without running its frame): such calls never
        leave the table, and would otherwise stop the probe for good once maxactive of them
        pile up. Elsewhere the kernel's rule holds: the new call is the one missed."""
        if not frame.f_code.co_flags & _GENERATOR_LIKE or _close_reports_end():
            return False
        oldest = next(iter(self._inflight))
        del self._inflight[oldest]
        self._missed += 1
        return True

    def _drop_inflight(self, returns: ReturnSite | None) -> None:
        self._missed += len(self._inflight) + self.fast.inflight
        self._inflight.clear()
        if returns is not None:
            returns.drop(self)

    def __repr__(self) -> str:
        state = "registered" if self.registered else "unregistered"
        return f"<Kretprobe {self.symbol} {state} nhit={self.nhit} nmissed={self.nmissed}>"


def register_kretprobe(rp: Kretprobe) -> None:
    """Register a return probe. Raises KprobeError (EINVAL for an offset that is not the
    function's entry, E2BIG for a data_size above KRETPROBE_MAX_DATA_SIZE, and the errors of
    register_kprobe)."""
    if rp.registered:
        raise einval(f"kretprobe {rp.symbol} is already registered")
    if rp.data_size < 0 or rp.maxactive < 0:
        raise einval("data_size and maxactive must not be negative")
    if rp.data_size > KRETPROBE_MAX_DATA_SIZE:
        raise KprobeError(errno.E2BIG, f"data_size {rp.data_size} is above "
                          f"KRETPROBE_MAX_DATA_SIZE ({KRETPROBE_MAX_DATA_SIZE})")
    if rp.maxactive == 0:
        rp.maxactive = DEFAULT_MAXACTIVE
    rp._missed = 0
    rp.fast.nmissed = 0
    rp._inflight.clear()
    rp._entered.clear()
    kp = EntryProbe(rp, symbol_name=rp.symbol_name, offset=rp.offset, addr=rp.addr)
    if rp.offset != 0 and kp.symbol_name is not None and \
            registry.module_object(kp.symbol_name.partition(":")[0]) is None:
        # Not imported yet: only offset 0 is known to be the entry before the import.
        raise einval("Retprobe address must be an function entry")
    rp.kp = kp
    try:
        registry.register_kprobe(kp)
    except BaseException:
        rp.kp = None
        raise
    if isinstance(kp.addr, ProbeAddress):
        if kp.addr.offset != 0:  # the table folds any prologue offset into 0
            registry.unregister_kprobe(kp)
            rp.kp = None
            raise einval("Retprobe address must be an function entry")
        rp.addr = kp.addr


def unregister_kretprobe(rp: Kretprobe) -> None:
    """Unregister: calls in flight finish normally; their return handlers do not run and
    are counted in nmissed."""
    if rp.kp is None or not rp.kp.registered:
        raise einval(f"kretprobe {rp.symbol} is not registered")
    registry.unregister_kprobe(rp.kp)


def register_kretprobes(rps: Iterable[Kretprobe]) -> None:
    """All or nothing, as register_kprobes."""
    done: list[Kretprobe] = []
    try:
        for rp in rps:
            register_kretprobe(rp)
            done.append(rp)
    except BaseException:
        for rp in reversed(done):
            unregister_kretprobe(rp)
        raise


def unregister_kretprobes(rps: Iterable[Kretprobe]) -> None:
    probes = [rp.kp for rp in rps if rp.kp is not None and rp.kp.registered]
    registry.unregister_kprobes(probes)


def enable_kretprobe(rp: Kretprobe) -> None:
    if rp.kp is None:
        raise einval(f"kretprobe {rp.symbol} is not registered")
    registry.enable_kprobe(rp.kp)


def disable_kretprobe(rp: Kretprobe) -> None:
    """No new call is probed; calls in flight still run their return handler."""
    if rp.kp is None:
        raise einval(f"kretprobe {rp.symbol} is not registered")
    registry.disable_kprobe(rp.kp)
