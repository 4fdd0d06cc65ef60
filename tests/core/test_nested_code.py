"""The optimizer and nested code (issue 16, item 1): closures, nested functions and
generator expressions get new function objects from their parent's constants at each call
of the parent, so an optimized probe on one must reach those, however the probe named it;
and resolution must always give the program's own code, never pykprobes' rewritten copy.

Each test holds under both mechanisms; the wrong results were the optimizer's."""

from __future__ import annotations

from collections.abc import Callable
from types import CodeType
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.core.address import line_addresses
from pykprobes.trace.tracefs import TraceFS
from tests.core import targets
from tests.testenv import OPTIMIZED

TARGETS = targets.__file__


def _nested(func: Any, name: str) -> CodeType:
    code: CodeType = next(c for c in func.__code__.co_consts
                          if isinstance(c, CodeType) and c.co_name == name)
    return code


def _line(code: CodeType, marker: str) -> int:
    """The line of `code`'s source marked with `# marker`."""
    with open(TARGETS) as f:
        for n, text in enumerate(f, 1):
            if n >= code.co_firstlineno and text.rstrip().endswith(f"# {marker}"):
                return n
    raise AssertionError(marker)


def _counting() -> tuple[list[int], Callable[[kp.Kprobe, kp.Regs], None]]:
    hits: list[int] = []

    def pre(p: kp.Kprobe, regs: kp.Regs) -> None:
        hits.append(regs.lineno)

    return hits, pre


ADDER = _nested(targets.make_adder, "adder")


@pytest.mark.parametrize("given", [
    pytest.param(lambda: {"addr": ADDER}, id="code object"),
    pytest.param(lambda: {"addr": kp.resolve_line(f"{TARGETS}:{ADDER.co_firstlineno + 1}")[0]},
                 id="resolve_line address"),
    pytest.param(lambda: {"addr": targets.make_adder(0)}, id="closure function"),
    pytest.param(lambda: {"symbol_name": "tests.core.targets:make_adder.<locals>.adder"},
                 id="symbol"),
])
def test_a_probe_on_a_closure_hits_closures_made_after_it_was_optimized(
    given: Callable[[], dict[str, Any]],
) -> None:
    hits, pre = _counting()
    p = kp.Kprobe(pre_handler=pre, **given())
    kp.register_kprobe(p)
    try:
        assert p.addr.code is ADDER
        before = targets.make_adder(1)
        assert before(1) == 2 and len(hits) == 1
        kp.wait_for_kprobe_optimizer()
        assert p.is_optimized() == OPTIMIZED
        assert before(2) == 3 and len(hits) == 2  # made before: switched to the new code
        assert targets.make_adder(5)(1) == 6 and len(hits) == 3  # made after
        assert [targets.make_adder(k)(k) for k in range(10)] == list(range(0, 20, 2))
        assert len(hits) == 13
        assert p.nhit == 13
    finally:
        kp.unregister_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    assert targets.make_adder(1).__code__ is ADDER


def test_a_line_event_inside_a_closure_records_after_it_was_optimized() -> None:
    fs = TraceFS()
    try:
        event = fs.define(f"p:nested/adder {TARGETS}:{ADDER.co_firstlineno + 1} x k")
        assert event is not None
        event.enable()
        targets.make_adder(1)(2)
        kp.wait_for_kprobe_optimizer()
        assert all(p.is_optimized() == OPTIMIZED for p in event.probes)
        targets.make_adder(3)(4)
        records = [line.rpartition(") ")[2] for line in fs.read("trace").splitlines()
                   if " adder: (" in line]
        assert records == ["x=2 k=1", "x=4 k=3"]
    finally:
        for ev in list(fs.events.values()):
            ev.disable()
        fs.clear()


DOUBLE_ALL = targets.double_all.__code__
GENEXPR = _nested(targets.double_all, "<genexpr>")
CLASSIFY_ALL = targets.classify_all.__code__
CLASSIFY = _nested(targets.classify_all, "classify")


def _body_offset(code: CodeType) -> int:
    """The offset where the first line of `code`'s body starts (past its entry)."""
    return line_addresses(code, code.co_firstlineno + 1)[0]


@pytest.mark.parametrize("nested_first", [True, False], ids=["nested first", "enclosing first"])
@pytest.mark.parametrize(("func", "name", "calls"), [
    (targets.double_all, "<genexpr>", ([1, 2],)),
    (targets.classify_all, "classify", ([True, False],)),
])
def test_nested_and_enclosing_probes_in_one_optimizer_batch_while_the_parent_is_optimized(
    func: Any, name: str, calls: tuple[Any, ...], nested_first: bool,
) -> None:
    """The enclosing function holds rewritten code when probes on it and on its nested code
    are registered in one batch, optimized in one pass: every probe keeps hitting, every
    symbol resolves to the original code, and unregistering the probes one by one gives
    the function its original code back (the conftest fixture checks it)."""
    original = func.__code__
    nested = _nested(func, name)
    symbol = f"tests.core.targets:{original.co_qualname}"
    first = kp.Kprobe(symbol_name=symbol)
    kp.register_kprobe(first)
    kp.wait_for_kprobe_optimizer()
    enclosing = kp.Kprobe(symbol_name=symbol, offset=_body_offset(original))
    inner = kp.Kprobe(symbol_name=f"{symbol}.<locals>.{name}")
    kp.register_kprobes([inner, enclosing] if nested_first else [enclosing, inner])
    probes = [first, enclosing, inner]
    try:
        assert (first.addr.code, enclosing.addr.code, inner.addr.code) == \
            (original, original, nested)
        expected = func(*calls)
        counts = (first.nhit, enclosing.nhit, inner.nhit)
        assert counts[0] == 1 and counts[1] >= 1 and counts[2] >= 1
        kp.wait_for_kprobe_optimizer()  # the two new probes in one pass
        assert func(*calls) == expected
        assert (first.nhit, enclosing.nhit, inner.nhit) == tuple(2 * n for n in counts)
        assert all(p.is_optimized() == OPTIMIZED for p in probes)
        # Resolved again while all of them are optimized: the original code still.
        again = kp.Kprobe(symbol_name=symbol, offset=enclosing.addr.offset)
        kp.register_kprobe(again)
        probes.append(again)
        assert again.addr == enclosing.addr
    finally:
        for p in probes:
            kp.unregister_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    assert func.__code__ is original
    assert _nested(func, name) is nested


def test_a_probe_by_symbol_in_nested_code_lands_on_its_line_while_the_parent_is_optimized(
) -> None:
    """With the enclosing function and the nested one optimized, a new probe by symbol at
    the offset of an `else` line (an offset of the original code) runs when that line
    runs, never when the `if` branch does."""
    outer = kp.Kprobe(symbol_name="tests.core.targets:classify_all")
    kp.register_kprobe(outer)
    kp.wait_for_kprobe_optimizer()
    outer2 = kp.Kprobe(symbol_name="tests.core.targets:classify_all",
                       offset=_body_offset(CLASSIFY_ALL))
    inner = kp.Kprobe(symbol_name="tests.core.targets:classify_all.<locals>.classify")
    kp.register_kprobes([inner, outer2])
    kp.wait_for_kprobe_optimizer()
    else_line = _line(CLASSIFY, "ELSE-BRANCH")
    (offset,) = line_addresses(CLASSIFY, else_line)
    hits, pre = _counting()
    p = kp.Kprobe(symbol_name="tests.core.targets:classify_all.<locals>.classify",
                  offset=offset, pre_handler=pre)
    kp.register_kprobe(p)
    try:
        assert p.addr.code is CLASSIFY and p.addr.offset == offset
        assert targets.classify_all([True, True]) == ["yes", "yes"]
        assert hits == []
        kp.wait_for_kprobe_optimizer()
        assert p.is_optimized() == OPTIMIZED
        assert targets.classify_all([True, False, False]) == ["yes", "no", "no"]
        assert targets.classify_all([True]) == ["yes"]
        assert hits == [else_line, else_line]
    finally:
        kp.unregister_kprobes([outer, outer2, inner, p])
    kp.wait_for_kprobe_optimizer()
    assert _nested(targets.classify_all, "classify") is CLASSIFY


@pytest.mark.parametrize("one_by_one", [True, False], ids=["one by one", "batch"])
def test_unregistering_every_probe_restores_a_parent_rewritten_for_its_child(
    one_by_one: bool,
) -> None:
    outer = kp.Kprobe(symbol_name="tests.core.targets:double_all")
    kp.register_kprobe(outer)
    kp.wait_for_kprobe_optimizer()
    inner = kp.Kprobe(symbol_name="tests.core.targets:double_all.<locals>.<genexpr>")
    kp.register_kprobe(inner)
    kp.wait_for_kprobe_optimizer()
    assert targets.double_all([1]) == 2
    assert (outer.nhit, inner.nhit) == (1, 1)
    if one_by_one:
        kp.unregister_kprobe(outer)
        kp.unregister_kprobe(inner)
    else:
        kp.unregister_kprobes([outer, inner])
    kp.wait_for_kprobe_optimizer()
    assert targets.double_all.__code__ is DOUBLE_ALL
    assert _nested(targets.double_all, "<genexpr>") is GENEXPR


def test_closures_made_by_a_parent_frame_that_runs_across_the_optimization() -> None:
    """A suspended generator goes on making closures from the constants of the code it
    started with: those are probed too, and switched to the probed code once the
    generator is done."""
    p = kp.Kprobe(symbol_name="tests.core.targets:closures_made_while_running.<locals>.made")
    kp.register_kprobe(p)
    try:
        gen = targets.closures_made_while_running(10)
        assert [next(gen), next(gen)] == [0, 10]
        assert p.nhit == 2
        kp.wait_for_kprobe_optimizer()
        assert p.is_optimized() == OPTIMIZED
        assert next(gen) == 20 and p.nhit == 3
        kept = [gen.gi_frame.f_locals["made"]] if gen.gi_frame is not None else []
        assert list(gen) == [30, 40, 50, 60, 70, 80, 90]
        assert p.nhit == 10
        kp.wait_for_kprobe_optimizer()  # the generator is done: its code is forgotten
        assert [f() for f in kept] == [20] and p.nhit == 11
        assert list(targets.closures_made_while_running(2)) == [0, 10]
        assert p.nhit == 13
    finally:
        kp.unregister_kprobe(p)
