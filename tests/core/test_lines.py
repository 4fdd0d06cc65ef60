"""Offsets as `dis` shows them and source lines as debuggers do: every address that
registration is handed by `dis` or by `resolve_line()` can be probed.

Before: the offset `dis` shows for an instruction after EXTENDED_ARG was refused, and on
3.12+ `resolve_line()` returned END_FOR addresses that registration refused (38 in
difflib), so a line event could fail on a line that has code.
"""

from __future__ import annotations

import ast
import difflib
import dis
import errno
from types import CodeType
from typing import Any

import pytest

import pykprobes as kp
from pykprobes import env, insn

BIG = "def f(x):\n" + "".join(f"    v{i} = x\n" for i in range(300)) + "    return v299\n"


def test_the_offset_dis_shows_after_extended_arg_is_the_instruction() -> None:
    namespace: dict[str, Any] = {}
    exec(compile(BIG, "<big>", "exec"), namespace)
    f = namespace["f"]
    # `return v299`: its load has a prefix (3.14: LOAD_FAST_BORROW)
    shown = [i for i in dis.get_instructions(f) if i.opname.startswith("LOAD_FAST")][-1]
    start = next(ins.start for ins in insn.decode(f.__code__) if ins.offset == shown.offset)
    assert start == shown.offset - 2  # the EXTENDED_ARG dis shows on its own line
    by_dis, by_start = kp.Kprobe(addr=f, offset=shown.offset), kp.Kprobe(addr=f, offset=start)
    kp.register_kprobes([by_dis, by_start])
    try:
        assert by_dis.addr == by_start.addr  # one address: an aggregate probe
        assert by_dis.addr is not None and by_dis.addr.offset == start
        kp.wait_for_kprobe_optimizer()
        assert f(7) == 7
    finally:
        kp.unregister_kprobes([by_dis, by_start])
    assert by_dis.nhit == by_start.nhit == 1


def test_inside_an_instruction_is_still_refused() -> None:
    def f(x: int) -> int:
        return x + 1

    with_cache = next(ins for ins in insn.decode(f.__code__) if ins.opname == "BINARY_OP")
    assert with_cache.end - with_cache.offset > 2  # its inline CACHE entries
    with pytest.raises(kp.KprobeError, match="instruction boundary") as info:
        kp.register_kprobe(kp.Kprobe(addr=f, offset=with_cache.offset + 2))
    assert info.value.errno == errno.EINVAL


def test_code_without_resume_is_refused() -> None:
    def f() -> int:
        return 1

    # Keep the opcodes, put a NOP where RESUME was: a code object no compiler of this
    # interpreter makes.
    raw = bytearray(f.__code__.co_code)
    resume = next(ins.offset for ins in insn.decode(f.__code__) if ins.opname == "RESUME")
    raw[resume] = dis.opmap["NOP"]
    strange = f.__code__.replace(co_code=bytes(raw))
    with pytest.raises(kp.KprobeError, match="no RESUME") as info:
        kp.register_kprobe(kp.Kprobe(addr=strange))
    assert info.value.errno == errno.EINVAL


def never_run(code: CodeType) -> set[int]:
    """The instructions an exhausted FOR_ITER jumps over: each run of
    env.FOR_ITER_EXIT_SKIPS's opnames, in order."""
    insns = insn.decode(code)
    skips = list(env.FOR_ITER_EXIT_SKIPS)
    out: set[int] = set()
    for i in range(len(insns)):
        run = insns[i : i + len(skips)]
        if skips and [ins.opname for ins in run] == skips:
            out |= {ins.start for ins in run}
    return out


def loop_line_addresses(module: Any) -> list[kp.ProbeAddress]:
    """Every address of every line of `module` that starts a loop (a `for`, or a
    comprehension's): where the END_FOR runs were."""
    with open(module.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    loops = (ast.For, ast.AsyncFor, ast.comprehension)
    lines = sorted({node.iter.lineno for node in ast.walk(tree) if isinstance(node, loops)})
    addresses: list[kp.ProbeAddress] = []
    for lineno in lines:
        try:
            addresses.extend(kp.resolve_line(f"{module.__file__}:{lineno}"))
        except kp.KprobeError as exc:
            assert exc.errno == errno.ENOENT  # module-level code, run already
    return addresses


def test_every_loop_line_address_of_difflib_registers() -> None:
    addresses = loop_line_addresses(difflib)
    assert len(addresses) > 40
    for a in addresses:
        ins = insn.insn_at(a.code, a.offset)
        assert ins is not None and ins.start == a.offset
        assert a.offset not in never_run(a.code), (a, ins.opname)
    probes = [kp.Kprobe(addr=a) for a in addresses]
    kp.register_kprobes(probes)  # all or nothing: one refusal would raise
    try:
        kp.wait_for_kprobe_optimizer()
        diff = list(difflib.unified_diff(["a\n", "b\n", "c\n"], ["a\n", "c\n", "d\n"]))
        assert diff[-1] == "+d\n"
    finally:
        kp.unregister_kprobes(probes)
    assert sum(p.nhit for p in probes) > 5
    assert all(p.nfault == 0 for p in probes)


def loop(items: list[int]) -> int:
    total = 0
    for item in items:  # FOR-LINE
        total += item
    return total


def test_a_for_line_is_probed_where_its_instructions_run() -> None:
    """The `for` line's runs: the one that starts the loop (loading the iterable) and,
    where the loop's exit runs an instruction of that line (3.14: POP_ITER), the exit;
    never what an exhausted FOR_ITER jumps over (3.12: END_FOR; 3.13: END_FOR, POP_TOP),
    which the breakpoint arch refuses and no event reaches."""
    import inspect

    src, first = inspect.getsourcelines(loop)
    lineno = first + next(i for i, line in enumerate(src) if "FOR-LINE" in line)
    addresses = kp.resolve_line(f"{__file__}:{lineno}")
    assert not {a.offset for a in addresses} & never_run(loop.__code__)
    probes = [kp.Kprobe(addr=a) for a in addresses]
    kp.register_kprobes(probes)
    try:
        kp.wait_for_kprobe_optimizer()
        for _ in range(5):
            assert loop([1, 2, 3]) == 6
    finally:
        kp.unregister_kprobes(probes)
    assert [p.nhit for p in probes] == [5] * len(probes)


def _kinds() -> dict[str, Any]:
    """A function of each kind whose prologue differs (3.15: a generator expression's
    starts with RESUME_AT_GEN_EXPR_START and gets its iterator before RETURN_GENERATOR)."""

    def plain(a: int) -> int:
        return a + 1

    def gen(a: int) -> Any:
        yield a

    def cells(a: int) -> int:
        def inner() -> int:
            return a

        return inner()

    def genexpr(xs: list[int]) -> int:
        return sum(x * 2 for x in xs)

    return {"plain": plain, "gen": gen, "cells": cells, "genexpr": genexpr}


def _codes(code: CodeType) -> list[CodeType]:
    """`code` and the code objects nested in it that run (no __annotate__, PEP 649)."""
    out = [code]
    for const in code.co_consts:
        if isinstance(const, CodeType) and const.co_name != "__annotate__":
            out.extend(_codes(const))
    return out


def _run(func: Any) -> None:
    result = func(1) if func.__name__ != "genexpr" else func([1, 2])
    if hasattr(result, "__next__"):
        list(result)


@pytest.mark.skipif(not env.HAS_SYS_MONITORING, reason="capability: no sys.monitoring")
def test_the_prologue_ends_where_py_start_fires() -> None:
    """insn.entry_offset() is the RESUME that PY_START reports, for every kind of code:
    what both mechanisms serve an entry probe at."""
    import sys

    monitoring = sys.monitoring  # type: ignore[attr-defined]
    tool = next(i for i in range(6) if monitoring.get_tool(i) is None)
    starts: dict[CodeType, int] = {}
    kinds = _kinds()
    monitoring.use_tool_id(tool, "pykprobes-test")
    try:
        monitoring.register_callback(
            tool, monitoring.events.PY_START, lambda code, off: starts.setdefault(code, off)
        )
        codes = [code for func in kinds.values() for code in _codes(func.__code__)]
        for code in codes:
            monitoring.set_local_events(tool, code, monitoring.events.PY_START)
        for func in kinds.values():
            _run(func)
    finally:
        monitoring.free_tool_id(tool)
    assert {c.co_qualname: starts.get(c) for c in codes} == \
        {c.co_qualname: insn.entry_offset(c) for c in codes}


def test_every_prologue_offset_of_a_generator_expression_is_its_entry() -> None:
    """Each offset up to the prologue's RESUME registers as the entry (offset 0) and hits
    once per run of the generator, under either mechanism."""
    genexpr = _kinds()["genexpr"]
    nested = next(c for c in genexpr.__code__.co_consts if isinstance(c, CodeType))
    prologue = [ins.start for ins in insn.decode(nested) if ins.start <= insn.entry_offset(nested)]
    probes = [kp.Kprobe(addr=nested, offset=offset) for offset in prologue]
    kp.register_kprobes(probes)
    try:
        assert {p.addr.offset for p in probes if p.addr is not None} == {0}
        assert genexpr([1, 2]) == 6
        kp.wait_for_kprobe_optimizer()
        assert genexpr([1, 2]) == 6
    finally:
        kp.unregister_kprobes(probes)
    assert [p.nhit for p in probes] == [2] * len(probes)
