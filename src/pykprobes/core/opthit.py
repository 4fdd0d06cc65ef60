"""The optimized kprobe's inline hit: the kernel's optprobe detour, with the bookkeeping in
one call and the handler called by the rewritten code itself.

Rewritten code does, before the probed instruction (arch/rewrite/assembly.py
INLINE_SEQUENCES):

    fast = enter()                      # the site's Gate, bound: a call of no argument
    if fast is not None:
        handler, p, regs, held = fast
        try:
            handler(p, regs)            # a Python-to-Python call the eval loop inlines
        except BaseException as exc:
            fault(exc)                  # counts the fault (nfault), unmarks; KeyboardInterrupt
        else:                           # goes on into the program, anything else never
            held[0] = None              # the unmark

`enter` is the trampoline's fast path (core/site.py) without its call of the handler: when
the site has one active probe with a pre-handler (`publish`ed), no thread runs a handler
(`held[0]` None, `busy` empty), it counts the hit in the probe's `Counter`, marks
`held[0]` with the site's regs and returns the site's (handler, probe, regs, held); else it calls
the site's careful path (with the probed frame as its caller's caller: `CALLER_DEPTH`) and
returns None. A probe's `nhit` is its Python count plus its Counter (core/probe.py).

While the handler runs (or the fault is reported), no frame of the hit's own is on the
stack: the probed frame itself, paused at the injected handler call, is the hit frame.
The rewrite registers the offsets of those calls per code object (core/regs.py
`INLINE_CALLS`), which is how the guard (`fast_hit_on_stack`, `synchronize_hits`) and
SiteRegs find the hit; `serial` tells synchronize_hits that a frame seen there has moved
on to a later hit.

`_opthit.c` is the C twin (the accelerator, chosen with the trace layer's,
accelerator.py): a builtin, which the eval loop calls without a frame, counting in a C
integer (no int allocated per hit). This pure-Python twin counts the same, in a Python int,
and costs about what the trampoline does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from pykprobes import accelerator

__all__ = ["CALLER_DEPTH", "Counter", "Gate"]


class PyCounter:
    """A probe's inline hits (core/probe.py: its nhit adds them to the Python count)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class PyGate:
    """A site's inline hit (see the module docstring)."""

    __slots__ = ("busy", "careful", "counter", "fast", "held", "probe", "serial")

    def __init__(self, held: list[Any], busy: dict[int, Any], careful: Callable[[], None]) -> None:
        if len(held) != 1:
            raise ValueError("Gate: held must be a list of one item")
        self.held = held
        self.busy = busy
        self.careful = careful
        #: (handler, probe, regs, held), or None.
        self.fast: tuple[Any, Any, Any, Any] | None = None
        #: The fast probe's Counter.
        self.counter: PyCounter | None = None
        #: The probe of the last fast hit: its fault is counted there.
        self.probe: Any = None
        #: Fast hits through this gate.
        self.serial = 0

    def publish(
        self, fast: tuple[Any, Any, Any, Any] | None, counter: PyCounter | None
    ) -> None:
        """What the next hit runs: (handler, probe, regs, held) and the probe's Counter, or
        None and None."""
        if (fast is None) != (counter is None) or (
                fast is not None and (len(fast) != 4 or fast[3] is not self.held)):
            raise TypeError(
                "publish((handler, probe, regs, held), Counter) or publish(None, None)")
        self.counter = counter
        self.fast = fast

    def bound(self) -> Callable[[], tuple[Any, Any, Any, Any] | None]:
        """`enter`, bound to this gate."""
        gate = self
        held = self.held
        busy = self.busy

        def enter() -> tuple[Any, Any, Any, Any] | None:
            fast = gate.fast
            if fast is None or held[0] is not None or busy:
                gate.careful()
                return None
            # No call and no backward jump from the tests to the mark: no thread switch
            # between them on 3.11-3.13 (as in the trampoline).
            gate.counter.n += 1  # type: ignore[union-attr]
            gate.serial += 1
            gate.probe = fast[1]
            held[0] = fast[2]
            return fast

        return enter


def _select() -> tuple[Any, Any, int]:
    if accelerator.NAME == "c":
        try:
            from pykprobes.core import _opthit  # type: ignore[attr-defined]
        except ImportError:
            pass
        else:
            return _opthit.Counter, _opthit.Gate, 1
    return PyCounter, PyGate, 2


_counter, _gate, _depth = _select()
#: The Counter and Gate classes of the twin in use.
Counter: Final[type[PyCounter]] = _counter
Gate: Final[type[PyGate]] = _gate
#: How far up from the careful path's frame the probed frame is (`sys._getframe`'s depth):
#: the C enter has no frame, the Python one has.
CALLER_DEPTH: Final[int] = _depth
