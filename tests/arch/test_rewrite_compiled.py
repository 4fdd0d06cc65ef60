"""Compiled calls (core/arch.py CompiledCall) in the rewrite arch: the per-version sequence
of assembly.py is stack-neutral and made of real opcodes; built at a function's entry it
passes the arguments (cells, *args, **kwargs included) and runs the site's hit only when
the record returns True; anywhere else, or for a name that is no argument, it is the plain
hit."""

from __future__ import annotations

import dis
import sys
import types
from typing import Any

import pytest

from pykprobes.arch.rewrite import RewriteArch
from pykprobes.arch.rewrite.assembly import (
    COMPILED_CALL_SEQUENCES,
    DONE,
    HIT,
    NARGS,
    RECORD,
    compiled_call_sequence,
)
from pykprobes.core.arch import CompiledCall, opt_call
from pykprobes.core.guard import CURRENT_KPROBE

VERSIONS = sorted(COMPILED_CALL_SEQUENCES)


def test_this_python_has_a_compiled_sequence() -> None:
    assert compiled_call_sequence() is COMPILED_CALL_SEQUENCES[sys.version_info[:2]]


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{a}.{b}" for a, b in VERSIONS])
def test_the_sequence_is_real_and_stack_neutral(version: tuple[int, int]) -> None:
    if version != sys.version_info[:2]:
        pytest.skip(f"this sequence runs only on CPython {version[0]}.{version[1]}")
    seq = COMPILED_CALL_SEQUENCES[version]
    depth = deepest = 0
    nargs = 2
    for opname, arg in seq.ops:
        if opname == "LABEL":
            assert arg is DONE
            continue
        if opname == "VARS":
            depth += nargs
            deepest = max(deepest, depth)
            continue
        assert opname in dis.opmap, opname
        oparg = nargs if arg is NARGS else 0 if arg in (None, RECORD, HIT, DONE) else arg
        depth += dis.stack_effect(dis.opmap[opname], oparg if dis.opmap[opname] >=
                                  dis.HAVE_ARGUMENT else None, jump=False)
        deepest = max(deepest, depth)
    assert depth == 0
    assert deepest == seq.depth + nargs


def _rebuilt(fn: Any, hits: dict[int, Any]) -> Any:
    built = RewriteArch().build(fn.__code__, hits, {})
    new = types.FunctionType(built.code, fn.__globals__, fn.__name__, fn.__defaults__,
                             fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def target(a: int, b: int, *rest: int, k: int = 3, **more: int) -> Any:
    def uses_a_cell() -> int:
        return a

    b = b * 10  # rebinding later does not change what the entry saw
    return uses_a_cell() + b + sum(rest) + k + sum(more.values())


def test_a_compiled_call_passes_the_arguments_at_entry() -> None:
    records: list[tuple[Any, ...]] = []
    hits: list[str] = []

    def record(*values: Any) -> bool:
        records.append(values)
        return values[0] == 2  # True: the careful path must run

    def hit() -> None:
        hits.append(sys._getframe(1).f_code.co_name)

    call = CompiledCall(record, ("a", "b", "rest", "k", "more"), hit)
    fn = _rebuilt(target, {0: call})
    assert fn(1, 2) == target(1, 2)
    assert fn(2, 3, 4, k=5, z=6) == target(2, 3, 4, k=5, z=6)
    assert records == [(1, 2, (), 3, {}), (2, 3, (4,), 5, {"z": 6})]
    assert hits == ["target"]  # only for the record that returned True


def test_a_compiled_call_elsewhere_is_the_plain_hit() -> None:
    hits: list[int] = []
    call = CompiledCall(lambda *v: pytest.fail("record called"), ("a",),
                        lambda: hits.append(1))
    offset = next(i.offset for i in dis.get_instructions(target) if i.opname == "BINARY_OP")
    assert _rebuilt(target, {offset: call})(1, 2) == target(1, 2)
    assert hits == [1]


@pytest.mark.parametrize("variables", [("a", "uses_a_cell"), ("nope",), (1,)])
def test_a_variable_that_is_no_argument_makes_the_plain_hit(variables: tuple[Any, ...]) -> None:
    hits: list[int] = []
    call = CompiledCall(lambda *v: pytest.fail("record called"), variables,
                        lambda: hits.append(1))
    assert _rebuilt(target, {0: call})(1, 2) == target(1, 2)
    assert hits == [1]


class _Probe:
    def __init__(self, offer: Any) -> None:
        self.compile_call = offer


def test_opt_call_takes_the_offer_of_a_lone_probe_only() -> None:
    def hit() -> None:
        pass

    def rec(*v: Any) -> bool:
        return False

    given: list[Any] = []

    def offer(code: Any, offset: int, current: Any) -> Any:
        given.append(current)
        return rec, ["a"]

    def bad(code: Any, offset: int, current: Any) -> Any:
        raise RuntimeError("no")

    code = target.__code__
    assert opt_call((_Probe(offer),), hit, code, 0) == CompiledCall(rec, ("a",), hit)
    # The offer is handed the core's current_kprobe marks, which its record must test.
    assert given == [CURRENT_KPROBE]
    assert opt_call((_Probe(offer), _Probe(offer)), hit, code, 0) is hit
    assert opt_call((_Probe(None),), hit, code, 0) is hit
    assert opt_call((_Probe(bad),), hit, code, 0) is hit
    assert opt_call((_Probe(lambda c, o, current: None),), hit, code, 0) is hit
    assert CompiledCall(rec, ("a",), hit) != CompiledCall(rec, ("b",), hit)
