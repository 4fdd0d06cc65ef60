"""Decode a code object's instructions as probe addresses see them.

A probe address is the offset of an instruction's *start*: its first EXTENDED_ARG prefix if
it has one, else the opcode itself. The inline CACHE entries that follow an instruction (3.11+)
belong to it and are never a start. Only `co_code` is read, which every supported version
returns de-specialized and (3.12+) de-instrumented, so what sys.monitoring or the adaptive
interpreter did to the live code never shows here.
"""

from __future__ import annotations

import opcode
from types import CodeType
from typing import Final, NamedTuple


def _cache_table() -> tuple[int, ...]:
    # The number of inline CACHE code units after each opcode. 3.11 and 3.12 keep it in a
    # list indexed by opcode, 3.13 in a dict keyed by name (`opcode._inline_cache_entries`).
    entries = opcode._inline_cache_entries  # type: ignore[attr-defined]
    if isinstance(entries, dict):
        return tuple(entries.get(name, 0) for name in opcode.opname)
    return tuple(entries) + (0,) * (256 - len(entries))


_CACHES: Final = _cache_table()
_OPNAME: Final = tuple(opcode.opname)
_EXTENDED_ARG: Final = opcode.EXTENDED_ARG


class Instruction(NamedTuple):
    """One instruction of `co_code`."""

    #: Offset of its first EXTENDED_ARG prefix, or of the opcode when it has none.
    start: int
    #: Offset of the opcode itself.
    offset: int
    opname: str
    #: The full argument (prefixes included); 0 for opcodes that take none.
    arg: int
    #: Offset just past it and its CACHE entries: the next instruction's start.
    end: int


def instructions(code: CodeType) -> list[Instruction]:
    """Every instruction of `code`, in order."""
    raw = code.co_code
    out: list[Instruction] = []
    append = out.append
    n = len(raw)
    i = 0
    start = 0
    ext = 0
    while i < n:
        op = raw[i]
        arg = raw[i + 1] | ext
        if op == _EXTENDED_ARG:
            ext = arg << 8
            i += 2
            continue
        end = i + 2 + 2 * _CACHES[op]
        append(Instruction(start, i, _OPNAME[op], arg, end))
        i = start = end
        ext = 0
    return out


def entry_index(instrs: list[Instruction]) -> int | None:
    """Index of the first RESUME: the end of the prologue (MAKE_CELL, COPY_FREE_VARS,
    RETURN_GENERATOR, POP_TOP), after which the frame really starts to run. Every 3.11+
    code object has one; None would mean a code object we do not understand."""
    for index, ins in enumerate(instrs):
        if ins.opname == "RESUME":
            return index
    return None
