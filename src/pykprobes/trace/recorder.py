"""The compiled record of an event, in pure Python: the fallback of `_speedups.Recorder`,
with the very same behaviour (tests/trace/test_recorder.py runs the same tests on both).

The rewrite arch calls a recorder from the probed function's entry with the values of the
event's argument fetchargs, loaded by the injected code itself (no frame object, no
f_locals): `if rec(v1, v2, ...): hit()` (core/arch.py `CompiledCall`). `rec` returns

- True when it did not record and the site's careful hit path must run instead: the event is
  off or has a filter (`fast` false), tracing is off, or some thread runs a probe handler
  (`busy` non-empty or `held[0]` set: the reentrancy rule of core/site.py is then the
  careful path's to apply, nmissed and all);
- False when it recorded: the values, each converted as the fetcharg's type says, with the
  time (CLOCK_MONOTONIC, the buffer's clock), the thread key (cmdlines.py) and the event,
  into the ring, and counted the hit (`nhit`, added to the event's hits).

The recorder never keeps a reference to an arbitrary object of the program (that would
delay its finalizer, and so change the program): exact int, float, str, bytes, bool and None
are stored as they are (immutable, no finalizer; str and bytes only up to STR_CAP), anything
else goes through the fetcharg's conversion (trace/safe.py, trace/types.py), which never
keeps it either. It never raises.

Per value, `kinds[i]` says which values pass as they are, `converters[i]` converts the rest
(for a fetcharg with a chain, `converters[i]` applies the chain and then the type): see the
KIND_ constants. A return event's recorder (`caller`, called by core/rethook.py) takes the
caller's `module:qualname` (or None) and the return's time after the values: what a return
record carries (the time its $duration ends at).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from pykprobes.trace.cmdlines import py_thread_key
from pykprobes.trace.safe import STR_CAP

__all__ = [
    "KIND_CONVERT",
    "KIND_DESCRIBE",
    "KIND_FLOAT",
    "KIND_INT",
    "KIND_STR",
    "Recorder",
]

#: Every value goes through the converter (a chain, or a type with no shortcut).
KIND_CONVERT: Final = 0
#: The default type (describe): None, bool, int, float as they are; str and bytes up to
#: STR_CAP.
KIND_DESCRIBE: Final = 1
#: `:int`: an exact int as it is.
KIND_INT: Final = 2
#: `:float`: an exact float as it is.
KIND_FLOAT: Final = 3
#: `:str`/`:string`: an exact str up to STR_CAP as it is.
KIND_STR: Final = 4

_time_ns: Final = time.monotonic_ns
# The size estimate of buffer.py: 24 per record, 8 per value, a str or bytes 4 + its length.
_OVERHEAD: Final = 24
# buffer.py RETURN_OVERHEAD: a return record's caller.
_RETURN_EXTRA: Final = 8


class Recorder:
    """`rec(*values) -> bool`: see the module docstring."""

    __slots__ = ("fast", "nhit", "event", "ring", "busy", "held", "kinds", "converters", "size",
                 "caller")

    def __init__(
        self,
        event: Any,
        ring: Any,
        busy: dict[int, Any],
        held: list[Any],
        kinds: tuple[int, ...],
        converters: tuple[Callable[[Any], Any], ...],
        size: int,
        caller: bool = False,
    ) -> None:
        if len(kinds) != len(converters):
            raise ValueError("one kind per converter")
        for kind in kinds:
            if type(kind) is not int or not KIND_CONVERT <= kind <= KIND_STR:
                raise ValueError(f"unknown kind {kind!r}")
        if not all(callable(c) for c in converters):
            raise TypeError("converters must be callable")
        if type(busy) is not dict:
            raise TypeError("busy must be a dict")
        if type(held) is not list or len(held) != 1:
            raise TypeError("held must be a list of one item")
        #: Record here (the event is enabled and has no filter); else the careful path.
        self.fast: bool = False
        #: Hits recorded here.
        self.nhit: int = 0
        self.event = event
        self.ring = ring
        self.busy = busy
        self.held = held
        self.kinds = kinds
        self.converters = converters
        #: The size estimate of every record (buffer.fixed_size), or -1: per record.
        self.size = size
        #: A return event's: the caller follows the values.
        self.caller = caller

    def __call__(self, *values: Any) -> bool:
        if not self.fast or not self.ring.tracing_on or self.busy or self.held[0] is not None:
            return True
        kinds = self.kinds
        caller = None
        ts = 0
        if self.caller:
            if len(values) != len(kinds) + 2:
                return True
            caller, ts = values[-2], values[-1]
            if (caller is not None and type(caller) is not str) or type(ts) is not int:
                return True
            values = values[:-2]
        if len(values) != len(kinds):
            return True  # not what the event was compiled for: let the careful path fetch
        out = []
        size = _OVERHEAD + 8 * len(values)
        for value, kind, convert in zip(values, kinds, self.converters, strict=True):
            tp = type(value)
            if kind == KIND_DESCRIBE:
                if not (
                    tp is int
                    or tp is float
                    or tp is bool
                    or value is None
                    or ((tp is str or tp is bytes) and len(value) <= STR_CAP)
                ):
                    value = convert(value)
            elif kind == KIND_INT:
                if tp is not int:
                    value = convert(value)
            elif kind == KIND_FLOAT:
                if tp is not float:
                    value = convert(value)
            elif kind == KIND_STR:
                if tp is not str or len(value) > STR_CAP:
                    value = convert(value)
            else:
                value = convert(value)
            tp = type(value)
            if tp is str or tp is bytes:
                size += len(value) - 4
            out.append(value)
        if caller is not None:
            size += _RETURN_EXTRA
        if self.size >= 0:
            size = self.size
        self.ring.append(ts if self.caller else _time_ns(), py_thread_key(), self.event,
                         tuple(out), caller, size)
        self.nhit += 1
        return False

    def __repr__(self) -> str:
        return f"<Recorder {self.event!r} fast={self.fast} nhit={self.nhit}>"
