"""The stack depth before each instruction of a code object (what an exception-table entry
of an inline hit needs: inject.py).

The compiler's own rule, replayed: from the prologue's RESUME (insn.entry_index) at the
depth the prologue leaves (`entry_depth`), each instruction
moves the depth by `dis.stack_effect` (with `jump=True` towards its jump target, `jump=False`
to the next instruction, which the unconditional jumps, returns and raises never reach), and
each exception-table entry starts its handler at the entry's depth plus the offset of the
raising instruction (`lasti`) and the exception. The compiler computed the same depths from
the same effects (Python/flowgraph.c stackdepth), so where it reaches an instruction this
walk does; an instruction it does not reach (dead code) has no depth.
"""

from __future__ import annotations

import dis
from types import CodeType
from typing import Final

from pykprobes import insn

#: Instructions after which the next one is not reached from them.
_NO_FALL_THROUGH: Final = frozenset({
    "RETURN_VALUE", "RETURN_CONST", "RAISE_VARARGS", "RERAISE", "JUMP_FORWARD",
    "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "JUMP",
})


def _effect(opcode: int, arg: int, jump: bool) -> int:
    try:
        return dis.stack_effect(opcode, arg, jump=jump)
    except ValueError:  # an opcode that takes no argument
        return dis.stack_effect(opcode, jump=jump)


def entry_depth(code: CodeType) -> int:
    """The stack depth the prologue leaves at its RESUME: 0, but for a 3.15 generator
    expression, whose iterator (GET_ITER's two slots) is on the stack from before its
    RETURN_GENERATOR. RETURN_GENERATOR counts as the None it pushes when the frame is
    resumed (which its POP_TOP drops): 3.11 and 3.12 give it no effect, the compiler
    counting depths before it put the prologue in front."""
    instrs = insn.decode(code)
    depth = 0
    for ins in instrs[: insn.entry_index(instrs)]:
        if ins.opname == "RETURN_GENERATOR":
            depth += 1
        else:
            depth += _effect(dis.opmap[ins.opname], ins.arg, False)
    if depth < 0:
        raise ValueError(f"{code.co_name}: the prologue leaves a negative stack depth")
    return depth


def depths(code: CodeType) -> dict[int, int]:
    """Instruction start -> the stack depth before it, for every reachable instruction.
    ValueError where the walk meets two depths for one instruction (code it does not
    understand: nothing is built on it)."""
    instrs = insn.decode(code)
    index_of = {ins.start: i for i, ins in enumerate(instrs)}
    table = dis._parse_exception_table(code)  # type: ignore[attr-defined]
    entry = insn.entry_index(instrs)
    start = entry_depth(code)
    found: dict[int, int] = {instrs[entry].start: start}
    work: list[tuple[int, int]] = [(entry, start)]

    def reach(index: int | None, depth: int) -> None:
        if index is None or index >= len(instrs):
            return
        start = instrs[index].start
        seen = found.get(start)
        if depth < 0:
            raise ValueError(f"{code.co_name}: a negative stack depth at offset {start}")
        if seen is None:
            found[start] = depth
            work.append((index, depth))
        elif seen != depth:
            raise ValueError(f"{code.co_name}: two stack depths at offset {start}")

    while work:
        i, depth = work.pop()
        ins = instrs[i]
        opcode = dis.opmap[ins.opname]
        for entry in table:
            if entry.start <= ins.offset < entry.end:
                reach(index_of.get(entry.target), entry.depth + entry.lasti + 1)
        # 3.14's END_ASYNC_FOR names its loop's END_SEND without jumping there (insn.py).
        target = ins.jump_target if ins.opname != "END_ASYNC_FOR" else None
        if target is not None:
            reach(index_of.get(target), depth + _effect(opcode, ins.arg, True))
        if ins.opname not in _NO_FALL_THROUGH:
            reach(i + 1, depth + _effect(opcode, ins.arg, False))
    return found
