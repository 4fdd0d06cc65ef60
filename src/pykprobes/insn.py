"""The one instruction decoder (the kernel's arch/x86/lib/insn.c): a code object's
instructions as probe addresses see them.

A probe address is the offset of an instruction's *start*: its first EXTENDED_ARG prefix
if it has one, else the opcode itself. The inline CACHE entries that follow an instruction
(3.11+) belong to it and are never a start. Only `co_code` is read, which every supported
version returns de-specialized and (3.12+) de-instrumented, with the JIT's ENTER_EXECUTOR
put back to the instruction it replaced: what sys.monitoring, the adaptive interpreter or
the JIT did to the live code never shows here.

A leaf: the standard library (`opcode`) and the per-code cache (codecache.py, itself a
leaf), no version test; the opcode tables of the running interpreter say everything that
differs between versions.
"""

from __future__ import annotations

import opcode
from collections.abc import Mapping
from types import CodeType
from typing import Final

from pykprobes.codecache import cached


def _cache_table() -> tuple[int, ...]:
    # The number of inline CACHE code units after each opcode: 3.11 and 3.12 keep it in a
    # list indexed by opcode, 3.13 and 3.14 in a dict keyed by name, 3.15 in a frozendict.
    entries = opcode._inline_cache_entries  # type: ignore[attr-defined]
    if isinstance(entries, Mapping):
        return tuple(entries.get(name, 0) for name in opcode.opname[:256])
    return tuple(entries) + (0,) * (256 - len(entries))


_CACHES: Final = _cache_table()
_OPNAME: Final = tuple(opcode.opname[:256])
_EXTENDED_ARG: Final = opcode.EXTENDED_ARG
_JUMPS: Final = frozenset(opcode.opname[op] for op in (*opcode.hasjrel, *opcode.hasjabs))


class Insn:
    """One instruction of `co_code`. A plain class, not a typing.NamedTuple: making a
    NamedTuple class imports annotationlib, ast and enum on 3.14+ (typing's NamedTupleMeta
    reads the class's annotations through annotationlib), and the boot stage imports this
    module."""

    __slots__ = ("start", "offset", "opname", "arg", "end")

    def __init__(self, start: int, offset: int, opname: str, arg: int, end: int) -> None:
        #: Offset of its first EXTENDED_ARG prefix, or of the opcode when it has none.
        self.start = start
        #: Offset of the opcode itself (what `dis` shows for it).
        self.offset = offset
        self.opname = opname
        #: The full argument (prefixes included); 0 for opcodes that take none.
        self.arg = arg
        #: Offset just past it and its CACHE entries: the next instruction's start.
        self.end = end

    def __repr__(self) -> str:
        return (f"Insn(start={self.start}, offset={self.offset}, opname={self.opname!r}, "
                f"arg={self.arg}, end={self.end})")

    @property
    def jump_target(self) -> int | None:
        """The offset a jump instruction names (as `dis` shows it), None for the others.
        Relative to the end of its caches, backwards for the *BACKWARD* opcodes (3.11:
        also POP_JUMP_BACKWARD_IF_*) and 3.14's END_ASYNC_FOR. What the interpreter does
        there is the arch's business: 3.12+'s exhausted FOR_ITER skips instructions after
        it, and END_ASYNC_FOR names its loop's END_SEND for sys.monitoring's BRANCH
        events without jumping there."""
        if self.opname not in _JUMPS:
            return None
        if "BACKWARD" in self.opname or self.opname == "END_ASYNC_FOR":
            return self.end - 2 * self.arg
        return self.end + 2 * self.arg


@cached
def decode(code: CodeType) -> tuple[Insn, ...]:
    """Every instruction of `code`, in order."""
    raw = code.co_code
    out: list[Insn] = []
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
        append(Insn(start, i, _OPNAME[op], arg, end))
        i = start = end
        ext = 0
    return tuple(out)


def entry_index(insns: tuple[Insn, ...] | list[Insn]) -> int:
    """Index of the RESUME that ends the prologue (MAKE_CELL, COPY_FREE_VARS,
    RETURN_GENERATOR, POP_TOP), after which the frame really starts to run: the first
    whose argument is 0 (RESUME_AT_FUNC_START), where PY_START fires. It is the first
    RESUME, except in a 3.15 generator expression, which starts with a RESUME 4
    (RESUME_AT_GEN_EXPR_START) and gets the iterator of its argument (LOAD_FAST .0,
    GET_ITER) before RETURN_GENERATOR (measured: PY_START at the RESUME 0 after it). Every
    code object 3.11+ compiles has one; ValueError for one that has not (made by hand, or
    for another interpreter): nothing about it can be trusted."""
    for index, ins in enumerate(insns):
        if ins.opname == "RESUME" and ins.arg == 0:
            return index
    raise ValueError("no RESUME instruction: not bytecode this interpreter compiled")


def entry_offset(code: CodeType) -> int:
    """Offset of the RESUME that ends the prologue (`entry_index`): every offset up to it
    is the function's entry. ValueError as `entry_index`."""
    insns = decode(code)
    return insns[entry_index(insns)].offset


def insn_at(code: CodeType, offset: int) -> Insn | None:
    """The instruction that starts at `offset`, or whose opcode is at `offset` (the offset
    `dis` shows for an instruction after EXTENDED_ARG prefixes); None for any other
    offset (inside an instruction, a CACHE entry, past the end)."""
    for ins in decode(code):
        if ins.start == offset or ins.offset == offset:
            return ins
        if ins.start > offset:
            break
    return None


def starts(code: CodeType) -> tuple[int, ...]:
    """The offset of every instruction start."""
    return tuple(ins.start for ins in decode(code))
