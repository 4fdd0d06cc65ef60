"""The `Kprobe` record and its flags (include/linux/kprobes.h)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, overload

from pykprobes.core.opthit import Counter

if TYPE_CHECKING:
    from types import CodeType, FunctionType

    from pykprobes.core.address import ProbeAddress
    from pykprobes.core.regs import Regs

KPROBE_FLAG_GONE: Final = 1  # the probed code is gone (module removed or reloaded)
KPROBE_FLAG_DISABLED: Final = 2  # the user disabled the probe
KPROBE_FLAG_OPTIMIZED: Final = 4  # served by rewritten code (an optprobe)
KPROBE_FLAG_FTRACE: Final = 8  # served by a function-entry event (PY_START)
KPROBE_FLAG_EARLY: Final = 16  # registered before init_kprobes() (the seed)

Handler = Callable[["Kprobe", "Regs"], Any]


class _Hits:
    """`Kprobe.nhit`: the hits counted in Python (`_nhit`: the careful path's, the
    breakpoints', the kretprobe fast path's) plus those the inline hit counted in the
    probe's Counter (core/opthit.py). Read on the class, it is the slot of the Python count:
    core/_rethook.c finds where to count a kprobe's hit by the class attribute `nhit`, which
    must be an object slot (its slot_offset)."""

    __slots__ = ()

    @overload
    def __get__(self, obj: None, cls: type | None = None) -> Any: ...
    @overload
    def __get__(self, obj: Kprobe, cls: type | None = None) -> int: ...
    def __get__(self, obj: Kprobe | None, cls: type | None = None) -> Any:
        if obj is None:
            return _PYTHON_COUNT
        return obj._nhit + obj._count.n

    def __set__(self, obj: Kprobe, value: int) -> None:
        obj._nhit = value - obj._count.n


class Kprobe:
    """One probe: where it sits, what it runs, and its counters.

    Give either `symbol_name` (`"pkg.mod:Qual.name"`) or `addr` (a function, a code object,
    or a `ProbeAddress`), plus `offset` (a bytecode offset). After `register_kprobe()`,
    `addr` is the resolved `ProbeAddress`; to register the same object again, clear
    `addr` and `flags` first, as the kernel's own tests do.
    """

    __slots__ = (
        "__weakref__",
        "_count",
        "_nhit",
        "_site",
        "addr",
        "compile_call",
        "flags",
        "nfault",
        "nmissed",
        "offset",
        "post_handler",
        "pre_handler",
        "symbol_name",
    )

    def __init__(
        self,
        symbol_name: str | None = None,
        offset: int = 0,
        addr: ProbeAddress | CodeType | FunctionType | Callable[..., Any] | None = None,
        pre_handler: Handler | None = None,
        post_handler: Handler | None = None,
        flags: int = 0,
    ) -> None:
        self.symbol_name = symbol_name
        self.offset = offset
        self.addr: Any = addr
        self.pre_handler = pre_handler
        self.post_handler = post_handler
        self.flags = flags
        #: The Python count and the inline hit's Counter: `nhit` is their sum (_Hits).
        self._count = Counter()
        self._nhit = 0
        self.nmissed = 0
        #: Faults: handler exceptions caught and counted (the program never sees them).
        self.nfault = 0
        #: Optional: `compile_call(code, offset, current)` -> `(record, variable names)` or
        #: None, a compiled call the optimizer may use while this probe is alone at its
        #: site (core/arch.py CompiledCall, opt_call: `current` is guard.CURRENT_KPROBE).
        #: Probe events offer one (trace/events.py).
        self.compile_call: Callable[[CodeType, int, Any], Any] | None = None
        self._site: Any = None

    nhit = _Hits()

    @property
    def registered(self) -> bool:
        return self._site is not None

    def is_disabled(self) -> bool:
        """The kernel's kprobe_disabled(): disabled by the user, or gone."""
        return bool(self.flags & (KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE))

    def is_gone(self) -> bool:
        return bool(self.flags & KPROBE_FLAG_GONE)

    def is_optimized(self) -> bool:
        return bool(self.flags & KPROBE_FLAG_OPTIMIZED)

    @property
    def symbol(self) -> str:
        """`module:Qual.name+OFFS` of the resolved address (or what was asked for)."""
        site = self._site
        if site is not None:
            return f"{site.symbol}+{site.addr.offset}"
        return f"{self.symbol_name}+{self.offset}"

    def __repr__(self) -> str:
        state = "registered" if self.registered else "unregistered"
        return f"<Kprobe {self.symbol} {state} nhit={self.nhit} nmissed={self.nmissed}>"


#: The slot of a Kprobe's Python count (what `Kprobe.nhit` is on the class).
_PYTHON_COUNT: Final[Any] = Kprobe.__dict__["_nhit"]
