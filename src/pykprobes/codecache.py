"""What was computed from a code object, kept as long as the code object lives.

Decoding a code object (dis) is what registering and arming cost most; the results are
kept per code object, by identity, without keeping the code alive: pykprobes' rewritten
copies must die once nothing runs them (their call names go with them,
arch/rewrite/callees.py), and code a program makes on the fly must not pile up here.
A leaf: the standard library only.
"""

from __future__ import annotations

import weakref
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
