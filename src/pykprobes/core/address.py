"""Probe addresses: (code object, bytecode offset), the analogue of an instruction address.

A code object is compared by identity, never by value: two functions compiled from the
same text have equal code objects, and a probe on one must not fire in the other.
"""

from __future__ import annotations

import dis
from types import CodeType
from typing import Final

from pykprobes.codecache import CodeCache

# Opcodes that make up a function's prologue (3.11+): they run before RESUME, at frame
# creation. A probe anywhere in the prologue is a probe at the function's entry.
_PROLOGUE_OPS: Final = frozenset({"MAKE_CELL", "COPY_FREE_VARS", "RETURN_GENERATOR", "POP_TOP"})


class ProbeAddress:
    """Where a probe sits: an instruction of one code object.

    `code` is the *original* code object (as compiled), even while the optimizer runs a
    rewritten copy of it; `offset` is the start of an instruction in it.
    """

    __slots__ = ("code", "offset")

    def __init__(self, code: CodeType, offset: int) -> None:
        self.code = code
        self.offset = offset

    @property
    def key(self) -> tuple[int, int]:
        return (id(self.code), self.offset)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ProbeAddress)
            and other.code is self.code
            and other.offset == self.offset
        )

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def hexid(self) -> str:
        """The stable hex id `list_kprobes()` prints in the ADDR column (the kernel's %px)."""
        return f"{id(self.code):016x}"

    def __repr__(self) -> str:
        return f"<ProbeAddress {self.code.co_qualname}+{self.offset} @ 0x{self.hexid}>"


#: code -> (code, instruction starts, entry offset, lines with code): decoded once.
_decoded: CodeCache[tuple[CodeType, tuple[int, ...], int, frozenset[int | None]]] = CodeCache()


def _decode(code: CodeType) -> tuple[CodeType, tuple[int, ...], int, frozenset[int | None]]:
    hit = _decoded.get(code)
    if hit is not None:
        return hit
    starts: list[int] = []
    prefixed = False
    entry: int | None = None
    # One pass: dis.get_instructions() scans the whole code for jump targets before its
    # first instruction, so the entry offset is found here rather than by a second call.
    for ins in dis.get_instructions(code):
        if not prefixed:
            starts.append(ins.offset)
        prefixed = ins.opname == "EXTENDED_ARG"
        if entry is None:
            if ins.opname == "RESUME":
                entry = ins.offset
            elif ins.opname not in _PROLOGUE_OPS:
                entry = 0
    lines = frozenset(line for _, _, line in code.co_lines())
    return _decoded.put(code, (code, tuple(starts), entry or 0, lines))


def instruction_starts(code: CodeType) -> tuple[int, ...]:
    """The offsets where an instruction starts: CACHE entries are part of the instruction
    before them, and an instruction's EXTENDED_ARG prefixes are its start."""
    return _decode(code)[1]


def entry_offset(code: CodeType) -> int:
    """Offset of the first RESUME, the end of the prologue (0 if there is none)."""
    return _decode(code)[2]


def is_entry(code: CodeType, offset: int) -> bool:
    """True when `offset` lies in the prologue: such a probe is a function-entry probe."""
    return offset <= entry_offset(code)


def line_of(code: CodeType, offset: int) -> int | None:
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return None


def line_addresses(code: CodeType, lineno: int) -> list[int]:
    """Offsets where a run of instructions of source line `lineno` starts in `code` (not its
    nested code objects): the places a debugger would stop at for that line."""
    _, starts_list, entry, lines = _decode(code)
    if lineno not in lines:
        return []  # most code objects of a module, for a line lookup
    offsets: list[int] = []
    prev_end = -1
    starts = set(starts_list)
    for start, end, line in code.co_lines():
        if line == lineno and start != prev_end:
            # Skip the prologue: a line probe there is the entry probe (offset 0).
            first = 0 if start <= entry else start
            while first not in starts and first < end:
                first += 2
            if first < end and first not in offsets:
                offsets.append(first)
        if line == lineno:
            prev_end = end
        elif start != end:
            prev_end = -1
    return offsets
