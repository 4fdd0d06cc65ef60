"""Probes on code the JIT compiled (CPython 3.13+ built with it, run with PYTHON_JIT=1).

The JIT attaches executors to a code object's hot loops, and traces through the functions
they call. A probe must see every hit whatever runs the code: the interpreter, an executor
compiled before the probe was registered (sys.monitoring invalidates the executors of the
code it instruments), or an executor compiled from the rewritten code; and a function
whose code the optimizer replaced must not keep running its old code from an executor
that traced through it. Each test counts hits exactly. Without a JIT they test the same
things in the interpreter; with one, each also checks that executors really ran.
(tests/arch/test_rewrite_jit.py: rewritten code compiled by the JIT.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from types import CodeType
from typing import Any

import pytest

import pykprobes as kp
from tests.core.test_mechanisms import _line_of
from tests.testenv import BREAKPOINT_CAPS, OPTIMIZED, REWRITTEN

#: Enough iterations for a loop to become hot and be compiled (the JIT_BACKWARD counter).
HOT = 300_000


def jit_enabled() -> bool:
    jit = getattr(sys, "_jit", None)
    return bool(jit is not None and jit.is_enabled())


def executors(code: CodeType) -> int:
    """How many executors the JIT attached to `code` (0 without a JIT)."""
    try:
        import _opcode
    except ImportError:
        return 0
    get = getattr(_opcode, "get_executor", None)
    if get is None:
        return 0
    found = 0
    for offset in range(0, len(code.co_code), 2):
        try:
            get(code, offset)
        except ValueError:
            continue
        found += 1
    return found


def compiled_by_the_jit(code: CodeType) -> None:
    if jit_enabled():
        assert executors(code), f"the JIT compiled nothing in {code.co_qualname}: {_why()}"


def _why() -> str:
    """What keeps the JIT away, for the failure message: tools and events, tracers."""
    mon = sys.monitoring
    tools = {t: (mon.get_tool(t), mon.get_events(t)) for t in range(6) if mon.get_tool(t)}
    return (f"tools {tools}, trace {sys.gettrace()}, profile {sys.getprofile()}, "
            f"threads {[t.name for t in threading.enumerate()]}")


def in_a_fresh_interpreter(case: Any) -> bool:
    """With the JIT on, run `case` in a new interpreter and say so (True): late in a long
    suite, CPython 3.14.10's JIT was seen to compile nothing more in the process (no
    executor for `drive` after five hot runs, no tool or tracer active: the cause is
    CPython's, not found), and these tests must see executors run to mean anything."""
    if not jit_enabled() or os.environ.get("PYKPROBES_TEST_FRESH"):
        return False
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run(
        [sys.executable, "-c", "import pykprobes; from tests.core import test_jit as t; "
         f"pykprobes.set_optimization(t.OPTIMIZED); t.{case.__name__}()"],
        cwd=root, env={**os.environ, "PYKPROBES_TEST_FRESH": "1"}, capture_output=True,
        text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stdout + res.stderr
    return True


def warm_drive() -> None:
    """Run `drive` until the JIT has compiled its loop (a few tries): any change of
    sys.monitoring's events anywhere, such as the delayed optimizer of an earlier test
    finishing, invalidates every executor (3.13+), and a run may end before a new one."""
    kp.wait_for_kprobe_optimizer()
    for _ in range(5):
        drive(HOT)
        if not jit_enabled() or executors(drive.__code__):
            return
    compiled_by_the_jit(drive.__code__)


def add_one(x: int) -> int:
    return x + 1


def drive(n: int) -> int:
    total = 0
    for i in range(n):
        total += add_one(i)
    return total


def test_a_hot_loop_sees_a_function_probed_and_unprobed() -> None:
    if not in_a_fresh_interpreter(hot_loop_sees_a_function_probed_and_unprobed):
        hot_loop_sees_a_function_probed_and_unprobed()


def hot_loop_sees_a_function_probed_and_unprobed() -> None:
    """`drive`'s loop is compiled, tracing through `add_one`, before the probe exists:
    every call after registration hits (as a breakpoint, then optimized), none after
    unregistration, and `add_one` runs its own code again."""
    original = add_one.__code__
    warm_drive()
    p = kp.Kprobe(addr=add_one)
    kp.register_kprobe(p)
    try:
        assert drive(HOT) == HOT * (HOT + 1) // 2
        assert p.nhit == HOT
        kp.wait_for_kprobe_optimizer()
        assert bool(p.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
        assert (add_one.__code__ is not original) == REWRITTEN
        assert drive(HOT) == HOT * (HOT + 1) // 2
        assert p.nhit == 2 * HOT
        compiled_by_the_jit(drive.__code__)
    finally:
        kp.unregister_kprobe(p)
    assert drive(HOT) == HOT * (HOT + 1) // 2
    assert p.nhit == 2 * HOT
    assert add_one.__code__ is original


def test_return_probe_on_a_function_called_from_a_hot_loop() -> None:
    if not in_a_fresh_interpreter(return_probe_on_a_function_called_from_a_hot_loop):
        return_probe_on_a_function_called_from_a_hot_loop()


def return_probe_on_a_function_called_from_a_hot_loop() -> None:
    entries: list[int] = []
    returns: list[Any] = []

    def entry(ri: kp.KretprobeInstance, regs: kp.Regs) -> int:
        entries.append(1)
        return 0

    def done(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        returns.append(regs.retval)

    warm_drive()
    rp = kp.Kretprobe(addr=add_one, entry_handler=entry, handler=done)
    kp.register_kretprobe(rp)
    try:
        kp.wait_for_kprobe_optimizer()
        assert drive(HOT) == HOT * (HOT + 1) // 2
        compiled_by_the_jit(drive.__code__)
    finally:
        kp.unregister_kretprobe(rp)
    assert len(entries) == len(returns) == HOT
    assert returns[:3] == [1, 2, 3] and returns[-1] == HOT
    assert rp.nmissed == 0


def spin(state: list[Any]) -> None:
    """Loops (hot, compiled) until state[1]; counts in state[2] while state[0]."""
    count = 0
    while not state[1]:
        if state[0]:
            count += 1  # JIT-BODY
    state[2] = count


@pytest.mark.skipif(not BREAKPOINT_CAPS.running_frames_other_threads,
                    reason="capability: the breakpoint arch (settrace) cannot reach frames "
                           "already running in other threads")
def test_a_compiled_loop_already_running_misses_no_hit() -> None:
    """A thread runs `spin`'s compiled loop when a probe is put inside it and optimized:
    the thread's frame runs the old code, from an executor until the probe's breakpoint
    invalidates it, and every increment it then makes is a hit."""
    original = spin.__code__
    state: list[Any] = [False, False, 0]
    t = threading.Thread(target=spin, args=(state,), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while jit_enabled() and not executors(original) and time.monotonic() < deadline:
            time.sleep(0.01)
        compiled_by_the_jit(original)
        (addr,) = kp.resolve_line(f"{__file__}:{_line_of(spin, 'JIT-BODY')}")
        p = kp.Kprobe(addr=addr)
        kp.register_kprobe(p)
        try:
            kp.wait_for_kprobe_optimizer()
            assert (spin.__code__ is not original) == REWRITTEN
            state[0] = True
            while p.nhit < 10_000 and time.monotonic() < deadline:
                time.sleep(0.01)
            state[1] = True
            t.join(10)
            assert not t.is_alive()
        finally:
            kp.unregister_kprobe(p)
        assert state[2] > 0 and p.nhit == state[2] and p.nmissed == 0
    finally:
        state[1] = True
        t.join(10)
    assert spin.__code__ is original
