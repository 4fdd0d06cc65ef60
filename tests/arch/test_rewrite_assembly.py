"""Every call sequence of assembly.py assembles and runs on the Python it is for.

A sequence is written for one CPython version: on this interpreter the one for this version
is assembled (with the `bytecode` library directly, not through inject.py, so that this tests
the data) and run; the others are skipped, naming the version they need.
"""

from __future__ import annotations

import dis
import sys
import types

import pytest
from bytecode import Bytecode, Instr

from pykprobes.arch.rewrite.assembly import CALL_SEQUENCES, HIT, CallSequence, call_sequence

VERSIONS = sorted(CALL_SEQUENCES)


def test_this_python_has_a_sequence() -> None:
    assert call_sequence() is CALL_SEQUENCES[sys.version_info[:2]]


def _assemble(seq: CallSequence, hit: object) -> list[Instr]:
    return [
        Instr(op) if arg is None else Instr(op, hit if arg is HIT else arg) for op, arg in seq.ops
    ]


def _for_this_python(version: tuple[int, int]) -> CallSequence:
    if version != sys.version_info[:2]:
        pytest.skip(f"this sequence runs only on CPython {version[0]}.{version[1]}")
    return CALL_SEQUENCES[version]


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{a}.{b}" for a, b in VERSIONS])
def test_sequence_opcodes_exist(version: tuple[int, int]) -> None:
    seq = _for_this_python(version)
    for opname, _ in seq.ops:
        assert opname in dis.opmap, opname


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{a}.{b}" for a, b in VERSIONS])
def test_sequence_is_stack_neutral(version: tuple[int, int]) -> None:
    seq = _for_this_python(version)
    depth = deepest = 0
    for instr in _assemble(seq, len):
        depth += instr.stack_effect(jump=False)
        deepest = max(deepest, depth)
    assert depth == 0
    assert deepest == seq.depth


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{a}.{b}" for a, b in VERSIONS])
def test_sequence_runs(version: tuple[int, int]) -> None:
    seq = _for_this_python(version)
    calls: list[int] = []

    def hit() -> str:
        calls.append(sys._getframe(1).f_lineno)
        return "dropped"

    def target(a: int, b: int) -> int:
        c = a + b
        return c * 2

    code = Bytecode.from_code(target.__code__)
    # Before `return c * 2`, and again before `c = a + b`: inside an expression's stack
    # (with a and b pushed) the sequence must leave it as it found it.
    body = [i for i, ins in enumerate(code) if isinstance(ins, Instr) and ins.name == "BINARY_OP"]
    for index in reversed(body):
        code[index:index] = _assemble(seq, hit)
    new = code.to_code()
    fn = types.FunctionType(new, target.__globals__)
    for _ in range(20):  # until specialized
        assert fn(2, 3) == 10
    first = target.__code__.co_firstlineno
    assert calls == [first + 1, first + 2] * 20
