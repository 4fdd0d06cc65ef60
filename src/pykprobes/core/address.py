"""Probe addresses: (code object, bytecode offset), the analogue of an instruction address.

A code object is compared by identity, never by value: two functions compiled from the
same text have equal code objects, and a probe on one must not fire in the other.
"""

from __future__ import annotations

from types import CodeType

from pykprobes import env, insn
from pykprobes.codecache import cached


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


def is_entry(code: CodeType, offset: int) -> bool:
    """True when `offset` lies in the prologue: such a probe is a function-entry probe.
    ValueError for code without a RESUME (insn.entry_offset)."""
    return offset <= insn.entry_offset(code)


def line_of(code: CodeType, offset: int) -> int | None:
    for start, end, line in code.co_lines():
        if start <= offset < end:
            return line
    return None


def line_addresses(code: CodeType, lineno: int) -> list[int]:
    """Offsets where a run of instructions of source line `lineno` starts in `code` (not its
    nested code objects): the places a debugger would stop at for that line. A run in the
    prologue gives the entry (0). A run is entered at its first instruction that runs as
    itself: an exhausted FOR_ITER jumps over the END_FOR it names (env.FOR_ITER_EXIT_SKIPS),
    which no probe can be at, so a `for` line's exit run starts after it, or gives no
    address when nothing of the line runs there (3.13: END_FOR, POP_TOP)."""
    table = _line_table(code)
    if lineno not in table.lines:
        return []  # most code objects of a module, for a line lookup
    insns = insn.decode(code)
    entry = insn.entry_offset(code)
    lines, never = table.by_unit, table.never
    offsets: list[int] = []
    in_run = False
    found = True  # the current run has its address
    for ins in insns:
        if lines.get(ins.start) != lineno:
            in_run = False
            continue
        if not in_run:
            in_run, found = True, False
        if found or ins.start in never:
            continue
        found = True
        address = 0 if ins.start <= entry else ins.start
        if address not in offsets:
            offsets.append(address)
    return offsets


class _LineTable:
    """(A plain class: a typing.NamedTuple imports annotationlib on 3.14+, see insn.Insn.)"""

    __slots__ = ("lines", "by_unit", "never")

    def __init__(self, by_unit: dict[int, int | None], never: frozenset[int]) -> None:
        #: Every line some instruction of the code has.
        self.lines = frozenset(by_unit.values())
        #: The line of each code unit.
        self.by_unit = by_unit
        #: The starts of the instructions that never run as themselves (`_never_run`).
        self.never = never


@cached
def _line_table(code: CodeType) -> _LineTable:
    """What line_addresses() reads of `code`, computed once: resolving a line looks at
    every code object of the module, once per line asked for."""
    by_unit: dict[int, int | None] = {}
    for start, end, line in code.co_lines():
        for unit in range(start, end, 2):
            by_unit[unit] = line
    return _LineTable(by_unit, _never_run(insn.decode(code)))


def _never_run(insns: tuple[insn.Insn, ...]) -> frozenset[int]:
    """The starts of the instructions that never run as themselves: those an exhausted
    FOR_ITER jumps over."""
    skips = env.FOR_ITER_EXIT_SKIPS
    out: set[int] = set()
    for index, ins in enumerate(insns):
        if skips and ins.opname == skips[0]:
            for following, name in zip(insns[index:], skips, strict=False):
                if following.opname != name:
                    break
                out.add(following.start)
    return frozenset(out)
