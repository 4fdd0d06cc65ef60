"""RewriteArch.build: several hits at once, the entry, constant replacement, and what a rebuilt
code object keeps from its original."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pykprobes.arch.rewrite import RewriteArch, callees
from pykprobes.core.arch import ArchUnavailable
from pykprobes.env import HAS_SYS_MONITORING
from pykprobes.insn import decode

ARCH = RewriteArch()
SRC = str(Path(__file__).resolve().parents[2] / "src")


def rebuilt(fn: Any, code: types.CodeType) -> Any:
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def counter() -> tuple[list[int], Callable[[], None]]:
    box = [0]

    def hit() -> None:
        box[0] += 1

    return box, hit


def offsets_of(fn: Any, opname: str) -> list[int]:
    return [ins.start for ins in decode(fn.__code__) if ins.opname == opname]


# --------------------------------------------------------------------------- several hits


def summing(values: list[int]) -> int:
    total = 0
    for v in values:
        if v < 0:
            continue
        total += v
    return total


def loop_body(fn: Any) -> int:
    """The instruction after `fn`'s FOR_ITER (before which 3.13+ refuse a sequence)."""
    instrs = decode(fn.__code__)
    return next(instrs[i + 1].start for i, ins in enumerate(instrs) if ins.opname == "FOR_ITER")


def test_several_offsets_at_once() -> None:
    code = summing.__code__
    instrs = decode(code)
    body = loop_body(summing)
    ret = [ins.start for ins in instrs if ins.opname.startswith("RETURN")][-1]
    counts: dict[int, list[int]] = {}
    hits = {}
    for off in (0, body, ret):
        counts[off], hits[off] = counter()
    fn = rebuilt(summing, ARCH.build(code, hits, {}).code)
    assert fn([1, -2, 3]) == 4
    assert counts[0] == [1]  # once per call
    assert counts[body] == [3]  # once per item
    assert counts[ret] == [1]


def test_two_hits_on_one_instruction_keep_order() -> None:
    order: list[str] = []
    target = offsets_of(summing, "GET_ITER")[0]
    code = summing.__code__
    # The same callable at two offsets is one name; different ones are kept apart; none
    # is a constant (arch/rewrite/callees.py).
    first = lambda: order.append("entry")  # noqa: E731
    second = lambda: order.append("loop")  # noqa: E731
    following = decode(code)[1].start  # 3.15's RESUME has a CACHE entry: 4, else 2
    new = ARCH.build(code, {0: first, following: first, target: second}, {}).code
    assert rebuilt(summing, new)([]) == 0
    # The first two instructions: the RESUME of the prologue, then the first of the body.
    assert order[-1] == "loop"
    assert order.count("entry") in (1, 2)
    assert all(c is not first and c is not second for c in new.co_consts)
    called = [c.func for c in callees.names_of(new).values()]
    assert called.count(first) == called.count(second) == 1


def test_entry_runs_once_per_call_even_when_the_body_starts_with_a_loop() -> None:
    def spin(n: int) -> int:
        while n > 0:
            n -= 1
        return n

    box, hit = counter()
    fn = rebuilt(spin, ARCH.build(spin.__code__, {0: hit}, {}).code)
    assert fn(10) == 0
    assert box == [1]


def test_entry_of_a_generator_runs_at_its_first_resumption() -> None:
    def gen() -> Any:
        yield 1
        yield 2

    box, hit = counter()
    fn = rebuilt(gen, ARCH.build(gen.__code__, {0: hit}, {}).code)
    it = fn()
    assert box == [0]  # creating it runs nothing of the body
    assert next(it) == 1
    assert box == [1]
    assert list(it) == [2]
    assert box == [1]


def test_hit_frame_and_traceback_lines() -> None:
    def failing(x: int) -> int:
        y = x + 1
        return 10 // (y - y)

    seen: list[tuple[str, int]] = []

    def hit() -> None:
        frame = sys._getframe(1)
        seen.append((frame.f_code.co_name, frame.f_lineno))

    div = [ins.start for ins in decode(failing.__code__) if ins.opname == "BINARY_OP"][-1]
    fn = rebuilt(failing, ARCH.build(failing.__code__, {div: hit}, {}).code)
    with pytest.raises(ZeroDivisionError) as info:
        fn(1)
    line = failing.__code__.co_firstlineno + 2
    assert seen == [("failing", line)]
    assert info.traceback[-1].lineno + 1 == line  # pytest's lineno is 0-based


# --------------------------------------------------------------------------- constants


def outer(k: int) -> Any:
    """The outer docstring."""
    scale = k * 2

    def closure(x: int) -> int:
        """The closure's docstring."""
        return x * scale

    def plain(x: int) -> int:
        return x + 1

    return closure, plain, (lambda: scale)


def test_consts_replacement_nested_function_and_closure() -> None:
    code = outer.__code__
    index = {c.co_name: i for i, c in enumerate(code.co_consts) if isinstance(c, types.CodeType)}
    boxes = {}
    replaced = {}
    for name in ("closure", "plain"):
        inner = code.co_consts[index[name]]
        boxes[name], hit = counter()
        replaced[index[name]] = ARCH.build(inner, {0: hit}, {}).code
    outer_box, outer_hit = counter()
    # With a hit in the outer function too, and without (the constant-only path).
    for hits in ({0: outer_hit}, {}):
        new_outer = ARCH.build(code, hits, replaced).code
        for i, c in enumerate(code.co_consts):
            assert new_outer.co_consts[i] is replaced.get(i, c)
        closure, plain, lam = rebuilt(outer, new_outer)(3)
        assert closure.__code__ is replaced[index["closure"]]
        assert plain.__code__ is replaced[index["plain"]]
        assert lam.__code__ is code.co_consts[index["<lambda>"]]
        assert closure(5) == 30 and plain(5) == 6 and lam() == 6
        assert closure.__doc__ == "The closure's docstring."
    assert boxes == {"closure": [2], "plain": [2]}
    assert outer_box == [1]


def test_equal_code_constants_stay_distinct() -> None:
    def holder() -> Any:
        return lambda: 1

    code = holder.__code__
    i = next(i for i, c in enumerate(code.co_consts) if isinstance(c, types.CodeType))
    twin = code.co_consts[i].replace()  # equal, hash-equal, not identical
    assert twin == code.co_consts[i] and twin is not code.co_consts[i]
    consts = [*list(code.co_consts), twin]
    doubled = code.replace(co_consts=tuple(consts))
    new = ARCH.build(doubled, {0: lambda: None}, {}).code
    assert new.co_consts[i] is code.co_consts[i]
    assert new.co_consts[len(consts) - 1] is twin


def test_code_object_keeps_its_identity_fields() -> None:
    _box, hit = counter()
    code = outer.__code__
    new = ARCH.build(code, {ins.start: hit for ins in decode(code)[::3]}, {}).code
    for attr in (
        "co_argcount",
        "co_posonlyargcount",
        "co_kwonlyargcount",
        "co_nlocals",
        "co_flags",
        "co_varnames",
        "co_cellvars",
        "co_freevars",
        "co_name",
        "co_qualname",
        "co_filename",
        "co_firstlineno",
    ):
        assert getattr(new, attr) == getattr(code, attr), attr
    # The names the hits are loaded by come after the code's own names.
    assert new.co_names[: len(code.co_names)] == code.co_names
    assert new.co_consts[: len(code.co_consts)] == code.co_consts
    assert all(a is b for a, b in zip(new.co_consts, code.co_consts, strict=False))
    assert types.FunctionType(new, {}).__doc__ == "The outer docstring."


# --------------------------------------------------------------------------- errors


def test_unavailable_without_bytecode() -> None:
    program = (
        f"import sys; sys.path.insert(0, {SRC!r}); sys.modules['bytecode'] = None\n"
        "from pykprobes.arch.rewrite import RewriteArch\n"
        "from pykprobes.core.arch import ArchUnavailable\n"
        "try:\n    RewriteArch()\nexcept ArchUnavailable as exc:\n    print('UNAVAILABLE', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.startswith("UNAVAILABLE the bytecode library is not importable"), proc.stderr


def test_name() -> None:
    assert ARCH.name == "rewrite"
    assert issubclass(ArchUnavailable, Exception)


@pytest.mark.skipif(not HAS_SYS_MONITORING, reason="needs sys.monitoring (PEP 669, CPython 3.12+)")
def test_build_from_code_that_sys_monitoring_instruments() -> None:
    """The breakpoint arch may have armed the original while the optimizer rebuilds it: the
    rewrite reads the de-instrumented bytecode and the new code carries no instrumentation."""
    monitoring = sys.monitoring  # type: ignore[attr-defined]
    tool = next(i for i in range(6) if monitoring.get_tool(i) is None)
    events = monitoring.events
    seen: list[int] = []
    monitoring.use_tool_id(tool, "pykprobes-test")
    try:
        monitoring.register_callback(tool, events.INSTRUCTION, lambda code, off: seen.append(off))
        monitoring.set_local_events(tool, summing.__code__, events.INSTRUCTION)
        assert summing([1, 2]) == 3 and seen
        box, hit = counter()
        new = ARCH.build(summing.__code__, {loop_body(summing): hit}, {}).code
        assert not any(ins.opname.startswith("INSTRUMENTED") for ins in decode(new))
        seen.clear()
        assert rebuilt(summing, new)([1, 2]) == 3
        assert box == [2] and seen == []
    finally:
        monitoring.set_local_events(tool, summing.__code__, 0)
        monitoring.register_callback(tool, events.INSTRUCTION, None)
        monitoring.free_tool_id(tool)


def test_unavailable_with_an_untested_bytecode_release() -> None:
    program = (
        f"import sys; sys.path.insert(0, {SRC!r})\n"
        "import bytecode; bytecode.__version__ = '9.0.0'\n"
        "from pykprobes.arch.rewrite import RewriteArch\n"
        "from pykprobes.core.arch import ArchUnavailable\n"
        "try:\n    RewriteArch()\nexcept ArchUnavailable as exc:\n    print('UNAVAILABLE', exc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    expected = "UNAVAILABLE bytecode 9.0.0 is not the tested release"
    assert proc.stdout.startswith(expected), proc.stderr
