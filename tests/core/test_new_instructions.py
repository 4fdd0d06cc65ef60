"""Probes at the instructions CPython 3.14 and 3.15 brought, through the API.

For each new instruction, a small function that runs it: a kprobe at every offset where it
is, and a kretprobe on the function, on both mechanisms. Every probe must fire exactly as
often as its instruction runs (counted independently with sys.monitoring INSTRUCTION
events on the original), every call must end once in the return handler, and the function
must compute what it computes unprobed. The rewrite arch's corpus
(tests/arch/test_rewrite_corpus.py) runs the same instructions at every offset.
"""

from __future__ import annotations

import collections
import dis
import sys
from types import CodeType, FunctionType
from typing import Any

import pytest

import pykprobes as kp
from pykprobes import insn
from tests.testenv import OPTIMIZED

WITH = """
class Resource:
    def __enter__(self):
        return 1
    def __exit__(self, *exc):
        return False
"""

#: opname -> (source defining f, a call of f that runs the instruction).
CASES: dict[str, tuple[str, str]] = {
    "LOAD_FAST_BORROW": ("def f(a):\n    return a + 1\n", "f(2)"),
    "LOAD_FAST_BORROW_LOAD_FAST_BORROW": ("def f(a, b):\n    return a + b\n", "f(2, 3)"),
    "LOAD_SMALL_INT": ("def f(a):\n    return a * 7\n", "f(3)"),
    "LOAD_SPECIAL": (WITH + "def f(a):\n    with Resource() as r:\n        return a + r\n", "f(1)"),
    "LOAD_COMMON_CONSTANT": (
        "def f(a):\n    try:\n        assert a, 'no'\n    except AssertionError as e:\n"
        "        return str(e)\n    return any([a])\n",
        "f(0)",
    ),
    "CALL_KW": ("def f(a):\n    return dict(x=a, y=2)\n", "f(1)"),
    "NOT_TAKEN": ("def f(a):\n    if a:\n        a = a * 2\n    return a\n", "f(4)"),
    "POP_ITER": (
        "def f(a):\n    t = 0\n    for i in a:\n        t += i\n    return t\n",
        "f([1, 2])",
    ),
    "BUILD_TEMPLATE": (
        "def f(a):\n    t = t'x={a!r:>{4}} y={a + 1}'\n"
        "    return t.strings, [i.value for i in t.interpolations]\n",
        "f(5)",
    ),
    "BUILD_INTERPOLATION": (
        "def f(a):\n    t = t'{a:>3}'\n    return t.interpolations[0].format_spec\n",
        "f(5)",
    ),
    "END_ASYNC_FOR": (
        "class Items:\n    def __init__(self):\n        self.n = 0\n"
        "    def __aiter__(self):\n        return self\n"
        "    async def __anext__(self):\n        self.n += 1\n"
        "        if self.n > 2:\n            raise StopAsyncIteration\n        return self.n\n"
        "async def g():\n    t = 0\n    async for i in Items():\n        t += i\n    return t\n"
        "def f():\n    try:\n        g().send(None)\n    except StopIteration as stop:\n"
        "        return stop.value\n",
        "f()",
    ),
}

#: How many calls: enough for the adaptive interpreter to specialize the rewritten code.
CALLS = 40


def compile_case(opname: str) -> tuple[dict[str, Any], CodeType]:
    if opname not in dis.opmap:
        pytest.skip(f"capability: this CPython has no {opname} instruction")
    if not hasattr(sys, "monitoring"):
        pytest.skip("capability: the counts to compare with come from sys.monitoring (3.12+)")
    source, _ = CASES[opname]
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<{opname}>", "exec"), namespace)
    # The code that holds the instruction: f, or the coroutine it drives.
    for name in ("f", "g"):
        fn = namespace.get(name)
        if isinstance(fn, FunctionType) and any(
            ins.opname == opname for ins in insn.decode(fn.__code__)
        ):
            return namespace, fn.__code__
    raise AssertionError(f"the {opname} case does not compile to {opname}")


def instruction_counts(namespace: dict[str, Any], code: CodeType, call: str) -> dict[int, int]:
    """How often each instruction of `code` runs in one `call`: sys.monitoring's
    INSTRUCTION events on the original, with a tool of our own (each fires at an
    instruction's first EXTENDED_ARG prefix, then again at its opcode)."""
    monitoring = sys.monitoring
    starts = set(insn.starts(code))
    counts: collections.Counter[int] = collections.Counter()
    tool = next(i for i in range(6) if monitoring.get_tool(i) is None)
    monitoring.use_tool_id(tool, "pykprobes-test-counter")

    def count(c: CodeType, offset: int) -> None:
        if offset in starts:
            counts[offset] += 1

    monitoring.register_callback(tool, monitoring.events.INSTRUCTION, count)
    monitoring.set_local_events(tool, code, monitoring.events.INSTRUCTION)
    try:
        eval(call, namespace)
    finally:
        monitoring.set_local_events(tool, code, 0)
        monitoring.register_callback(tool, monitoring.events.INSTRUCTION, None)
        monitoring.free_tool_id(tool)
    return dict(counts)


@pytest.mark.parametrize("opname", sorted(CASES))
def test_probes_at_a_new_instruction(opname: str) -> None:
    namespace, code = compile_case(opname)
    _, call = CASES[opname]
    expected = eval(call, namespace)
    counts = instruction_counts(namespace, code, call)
    offsets = [ins.start for ins in insn.decode(code) if ins.opname == opname]
    assert any(counts.get(off) for off in offsets), f"the case does not run {opname}"
    probes = {off: kp.Kprobe(addr=code, offset=off) for off in offsets}
    ends: list[Any] = []
    rp = kp.Kretprobe(addr=code, handler=lambda ri, regs: ends.append(regs.retval), maxactive=4)
    kp.register_kprobes(list(probes.values()))
    kp.register_kretprobe(rp)
    try:
        kp.wait_for_kprobe_optimizer()
        results = [eval(call, namespace) for _ in range(CALLS)]
        if OPTIMIZED:
            assert rp.flags & kp.KPROBE_FLAG_OPTIMIZED
    finally:
        kp.unregister_kretprobe(rp)
        kp.unregister_kprobes(list(probes.values()))
    assert results == [expected] * CALLS
    assert {off: p.nhit for off, p in probes.items()} == {
        off: counts.get(off, 0) * CALLS for off in offsets
    }
    assert all(p.nmissed == 0 and p.nfault == 0 for p in probes.values())
    # Each call ends once, in the return handler (the coroutine of END_ASYNC_FOR returns
    # its total, which f hands on).
    assert len(ends) == CALLS and rp.nmissed == 0


class Box:
    def __init__(self, n: int, log: list[Any]) -> None:
        self.n = n
        self.log = log

    def get(self) -> int:
        self.log.append(("get", self.n))
        return self.n


def borrowing(box: Box) -> int:
    return box.get() + 1  # 3.14+: LOAD_FAST_BORROW box, then LOAD_ATTR


def test_a_handler_rebinding_a_borrowed_local() -> None:
    """3.14 pushes a local with LOAD_FAST_BORROW, a reference it does not own, where the
    compiler proves nothing rebinds the local before it is used. A handler between the two
    (at LOAD_ATTR) that rebinds it through frame.f_locals (PEP 667, 3.13+) takes the only
    other reference away: the object must live on until the borrowed reference is used
    (it does on 3.14.10 and 3.15.2, with either mechanism). Before 3.13 the write does
    not reach the local; the order is the same."""
    import weakref

    log: list[Any] = []
    instrs = insn.decode(borrowing.__code__)
    # The instruction after the load of `box` (LOAD_ATTR; 3.11: LOAD_METHOD).
    offset = next(instrs[i + 1].start for i, ins in enumerate(instrs)
                  if ins.opname.startswith("LOAD_FAST"))

    def rebind(p: kp.Kprobe, regs: kp.Regs) -> None:
        regs.frame.f_locals["box"] = Box(100, log)
        log.append("rebound")

    def make() -> Box:
        box = Box(7, log)
        weakref.finalize(box, log.append, "freed")
        return box

    p = kp.Kprobe(addr=borrowing, offset=offset, pre_handler=rebind)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert bool(p.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
        results = [borrowing(make()) for _ in range(CALLS)]
    finally:
        kp.unregister_kprobe(p)
    assert results == [8] * CALLS and p.nfault == 0
    assert log[:3] == ["rebound", ("get", 7), "freed"]
