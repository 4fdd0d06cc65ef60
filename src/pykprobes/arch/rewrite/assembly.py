"""The call sequence injected before a probed instruction, per CPython version (data).

Each sequence calls one constant callable with no argument and drops its result, so the
stack is the same before and after it. They are the cheapest measured way to run a handler
at an offset (ANCHOR-COSTS.md, rows H and H1). `tests/arch/test_rewrite_assembly.py`
assembles and runs the one for the running interpreter.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from pykprobes import env


class _Hit:
    """Placeholder, in a sequence, for the callable the call sequence calls."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "HIT"


#: Where the hit callable goes in a sequence (as the argument of its LOAD_CONST).
HIT: Final = _Hit()

#: One instruction: (opname, argument); the argument is None for opcodes that take none,
#: HIT for the callable.
Op = tuple[str, object]


class CallSequence(NamedTuple):
    ops: tuple[Op, ...]
    #: How many stack slots the sequence needs above the depth where it is inserted.
    depth: int


CALL_SEQUENCES: Final[dict[tuple[int, int], CallSequence]] = {
    # 3.11: a call is PRECALL + CALL ("PRECALL: prefixes CALL", dis docs), with the
    # callable above a NULL (or below a bound method's self).
    (3, 11): CallSequence(
        (("PUSH_NULL", None), ("LOAD_CONST", HIT), ("PRECALL", 0), ("CALL", 0), ("POP_TOP", None)),
        depth=2,
    ),
    # 3.12: PRECALL is gone; CALL takes NULL, callable, args (dis docs).
    (3, 12): CallSequence(
        (("PUSH_NULL", None), ("LOAD_CONST", HIT), ("CALL", 0), ("POP_TOP", None)),
        depth=2,
    ),
    # 3.13: CALL takes callable, self-or-NULL, args: the NULL moved above the callable.
    (3, 13): CallSequence(
        (("LOAD_CONST", HIT), ("PUSH_NULL", None), ("CALL", 0), ("POP_TOP", None)),
        depth=2,
    ),
}


def call_sequence() -> CallSequence | None:
    """The sequence for the running interpreter; None if none was written and tested for it."""
    return CALL_SEQUENCES.get(env.PYVERSION)
