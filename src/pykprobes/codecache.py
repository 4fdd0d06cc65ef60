"""What was computed from a code object, kept as long as the code object lives.

Decoding a code object (insn.py) and what is made of it (instruction flows, line tables,
the optimizer's checks) is what registering and arming cost most; the results are
kept per code object, by identity, without keeping the code alive: pykprobes' rewritten
copies must die once nothing runs them (their call names go with them,
arch/rewrite/callees.py), and code a program makes on the fly must not pile up here.
A leaf: the standard library only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import CodeType
from typing import Generic, TypeVar

V = TypeVar("V")


class CodeCache(Generic[V]):
    """id(code) -> value, each entry dropped when its code object dies."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref[CodeType], V]] = {}

    def get(self, code: CodeType) -> V | None:
        entry = self._entries.get(id(code))
        if entry is not None and entry[0]() is code:
            return entry[1]
        return None

    def put(self, code: CodeType, value: V) -> V:
        key = id(code)
        entries = self._entries

        def gone(ref: weakref.ref[CodeType]) -> None:
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:
                del entries[key]

        entries[key] = (weakref.ref(code, gone), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)


def cached(compute: Callable[[CodeType], V]) -> Callable[[CodeType], V]:
    """`compute`, a function of a code object alone, remembered per code object: the
    registry, the optimizer and the arches ask about the same few again and again."""
    cache: CodeCache[V] = CodeCache()

    def lookup(code: CodeType) -> V:
        hit = cache.get(code)
        return hit if hit is not None else cache.put(code, compute(code))

    lookup.__doc__ = compute.__doc__
    lookup.__name__ = compute.__name__
    lookup.__qualname__ = compute.__qualname__
    return lookup
