"""A breakpoint arch that would tax every call (a global trace function: settrace, 3.11) has
its breakpoints armed by a rewrite (core/optimizer.py `rewrites_breakpoint`): the trace
function is there only while a frame runs the code the rewrite replaced, or for a probe
the rewrite cannot serve (a post-handler). The probes stay breakpoints (not OPTIMIZED)."""

from __future__ import annotations

import dis
import sys
from collections.abc import Iterator
from types import CodeType
from typing import Any

import pytest

import pykprobes as kp
from tests.core import targets
from tests.testenv import BREAKPOINT_REWRITES, OPTIMIZED

pytestmark = pytest.mark.skipif(
    not BREAKPOINT_REWRITES,
    reason="capability: the breakpoint arch leaves unprobed code untaxed (or no optimizer)")


@pytest.fixture(autouse=True)
def breakpoints_only() -> Iterator[None]:
    kp.set_optimization(False)
    yield
    kp.set_optimization(OPTIMIZED)


def _offset(code: CodeType, opname: str) -> int:
    return [i.offset for i in dis.get_instructions(code) if i.opname == opname][-1]


def test_no_trace_function_while_no_frame_runs_the_probed_code() -> None:
    code = targets.add.__code__
    p = kp.Kprobe(addr=targets.add)
    kp.register_kprobe(p)
    try:
        assert sys.gettrace() is None
        assert targets.add.__code__ is not code, "armed by a rewrite"
        assert not p.is_optimized()
        assert p.flags & kp.KPROBE_FLAG_FTRACE  # still the breakpoint's entry probe
        assert [targets.add(i, 1) for i in range(3)] == [1, 2, 3]
        assert p.nhit == 3
    finally:
        kp.unregister_kprobe(p)
    assert targets.add.__code__ is code
    assert sys.gettrace() is None


def _loop(n: int, arm: Any, traced: list[bool]) -> int:
    total = 0
    for i in range(n):
        if i == 2:
            arm()
        traced.append(sys.gettrace() is not None)
        total += i
    return total


def test_a_loop_in_progress_hits_at_once_and_the_trace_function_leaves_after() -> None:
    code = _loop.__code__
    p = kp.Kprobe(addr=_loop, offset=_offset(code, "BINARY_OP"))
    traced: list[bool] = []
    try:
        assert _loop(10, lambda: kp.register_kprobe(p), traced) == 45
        assert p.nhit == 8, "the running frame hit from the very next pass (i = 2 .. 9)"
        assert traced[2:] == [True] * 8, "a trace function while the old code ran"
        kp.wait_for_kprobe_optimizer()  # a pass finds no frame running the old code
        assert sys.gettrace() is None
        traced.clear()
        assert _loop(4, lambda: None, traced) == 6
        assert p.nhit == 12 and traced == [False] * 4
    finally:
        kp.unregister_kprobe(p)
    assert _loop.__code__ is code
    assert sys.gettrace() is None


def test_a_post_handler_stays_with_the_trace_function() -> None:
    code = targets.add.__code__
    posts: list[int] = []
    p = kp.Kprobe(addr=targets.add, post_handler=lambda p, regs: posts.append(regs.offset))
    kp.register_kprobe(p)
    try:
        assert targets.add.__code__ is code
        assert sys.gettrace() is not None
        assert targets.add(1, 2) == 3
        assert p.nhit == 1 and posts == [0]
    finally:
        kp.unregister_kprobe(p)
    assert sys.gettrace() is None
