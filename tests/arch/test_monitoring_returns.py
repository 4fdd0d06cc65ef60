"""Return hooks of the sys.monitoring breakpoint arch (CPython 3.12+).

The contract (tests/arch/test_settrace_returns.py `ReturnHookContract`) runs here for the
monitoring arch; the tests after it are about the events it uses.
"""

from __future__ import annotations

import dis
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.arch.test_settrace_returns import GEN_SRC, RECURSIVE_SRC, Rec, ReturnHookContract, fresh

pytestmark = pytest.mark.skipif(not hasattr(sys, "monitoring"), reason="sys.monitoring needs 3.12+")

if hasattr(sys, "monitoring"):
    from pykprobes.arch.monitoring import MonitoringArch

    M: Any = sys.monitoring
    E: Any = M.events


@pytest.fixture
def monitoring_arch() -> Iterator[MonitoringArch]:
    a = MonitoringArch()
    yield a
    a.close()


class TestMonitoringReturns(ReturnHookContract):
    @pytest.fixture
    def arch(self, monitoring_arch: MonitoringArch) -> MonitoringArch:
        return monitoring_arch


def free_tool() -> int:
    return [t for t in range(6) if M.get_tool(t) is None][-1]


def assert_unwind_on(arch: MonitoringArch, *codes: Any, off: tuple[Any, ...] = ()) -> None:
    """PY_UNWIND is on for `codes` and not for `off`: a local event of each where it can be
    one (`local_unwind`, 3.15), else the one global event, on while some code needs it."""
    tool = arch.tool
    if arch.capabilities.local_unwind:
        assert M.get_events(tool) == 0
        for code in codes:
            assert M.get_local_events(tool, code) & E.PY_UNWIND
    else:
        assert M.get_events(tool) == (E.PY_UNWIND if codes else 0)
        for code in codes:
            assert not M.get_local_events(tool, code) & E.PY_UNWIND
    for code in off:
        assert not M.get_local_events(tool, code) & E.PY_UNWIND


# ---------------------------------------------------------------- events used


def test_local_py_return_and_py_unwind_only_while_armed(
    monitoring_arch: MonitoringArch,
) -> None:
    gen, other = fresh(GEN_SRC, "gen"), fresh(GEN_SRC, "gen", "<other>")
    tool = monitoring_arch.tool
    assert M.get_events(tool) == 0
    monitoring_arch.arm_return(gen.__code__, lambda fr, v: None, lambda fr, e: None)
    # PY_YIELD is not needed: PY_RETURN does not fire at a yield, and instrumenting yields
    # would not make 3.13's close() shortcut run the frame.
    assert M.get_local_events(tool, gen.__code__) & ~E.PY_UNWIND == E.PY_RETURN
    assert M.get_local_events(tool, other.__code__) == 0  # other code pays nothing local
    assert_unwind_on(monitoring_arch, gen.__code__, off=(other.__code__,))
    monitoring_arch.disarm_return(gen.__code__)
    assert M.get_local_events(tool, gen.__code__) == 0
    assert M.get_events(tool) == 0


def test_an_exception_elsewhere_costs_no_callback_where_unwind_is_local(
    monitoring_arch: MonitoringArch,
) -> None:
    """With `local_unwind` (3.15), an exception leaving a frame of code that has no return
    hook runs no callback of ours; before, the one global PY_UNWIND runs one for it."""
    src = "def boom():\n    raise KeyError(1)\n"
    probed, elsewhere = fresh(src, "boom"), fresh(src, "boom", "<elsewhere>")
    rec = Rec()
    monitoring_arch.arm_return(probed.__code__, rec.on_return, rec.on_unwind)
    calls: list[str] = []
    hook = M.register_callback(monitoring_arch.tool, E.PY_UNWIND, None)
    M.register_callback(
        monitoring_arch.tool,
        E.PY_UNWIND,
        lambda code, off, exc: calls.append(code.co_filename) or hook(code, off, exc),
    )
    try:
        for fn in (elsewhere, probed):
            with pytest.raises(KeyError):
                fn()
    finally:
        M.register_callback(monitoring_arch.tool, E.PY_UNWIND, hook)
    assert [k for k, _ in rec.kinds()] == ["unwind"]
    if monitoring_arch.capabilities.local_unwind:
        assert calls == ["<returns>"]
    else:
        assert calls == ["<elsewhere>", "<returns>"]


def test_py_unwind_is_shared_with_raise_posts(monitoring_arch: MonitoringArch) -> None:
    """PY_UNWIND serves both users: it stays while either needs it (global before 3.15)."""
    src = "def unwinding():\n    raise KeyError(2)\n"
    unwinding, down = fresh(src, "unwinding"), fresh(RECURSIVE_SRC, "down")
    raise_off = next(
        i.offset for i in dis.get_instructions(unwinding) if i.opname == "RAISE_VARARGS"
    )
    tool = monitoring_arch.tool
    posts: list[str] = []
    rec = Rec()
    monitoring_arch.arm(
        unwinding.__code__, raise_off, lambda fr, o: None, lambda fr, o: posts.append("post")
    )
    monitoring_arch.arm_return(unwinding.__code__, rec.on_return, rec.on_unwind)
    monitoring_arch.arm_return(down.__code__, rec.on_return, rec.on_unwind)
    with pytest.raises(KeyError) as info:
        unwinding()
    assert posts == ["post"] and rec.kinds() == [("unwind", info.value)]  # post first
    monitoring_arch.disarm(unwinding.__code__, raise_off)
    assert_unwind_on(monitoring_arch, unwinding.__code__, down.__code__)
    monitoring_arch.disarm_return(unwinding.__code__)
    # down still has return hooks
    assert_unwind_on(monitoring_arch, down.__code__, off=(unwinding.__code__,))
    with pytest.raises(KeyError):
        unwinding()
    assert len(rec.events) == 1
    monitoring_arch.disarm_return(down.__code__)
    assert_unwind_on(monitoring_arch, off=(unwinding.__code__, down.__code__))
    assert M.get_events(tool) == 0


def test_a_code_without_return_instruction(monitoring_arch: MonitoringArch) -> None:
    src = "def always():\n    raise KeyError(1)\n"
    always, rec = fresh(src, "always"), Rec()
    assert not [i for i in dis.get_instructions(always) if i.opname.startswith("RETURN")]
    monitoring_arch.arm_return(always.__code__, rec.on_return, rec.on_unwind)
    assert M.get_local_events(monitoring_arch.tool, always.__code__) & ~E.PY_UNWIND == 0
    assert_unwind_on(monitoring_arch, always.__code__)
    assert monitoring_arch.armed_returns() == [always.__code__]
    with pytest.raises(KeyError) as info:
        always()
    assert rec.kinds() == [("unwind", info.value)]
    monitoring_arch.disarm_return(always.__code__)
    assert monitoring_arch.armed_returns() == [] and M.get_events(monitoring_arch.tool) == 0
    assert M.get_local_events(monitoring_arch.tool, always.__code__) == 0


def test_returns_of_a_code_whose_other_return_was_disabled(
    monitoring_arch: MonitoringArch,
) -> None:
    """A return offset that answered DISABLE (no post there) fires again once return
    hooks are armed on its code."""
    src = "def two(x):\n    if x:\n        return 'a'\n    return 'b'\n"
    two = fresh(src, "two")
    first_ret = next(  # RETURN_CONST (3.12, 3.13), RETURN_VALUE (3.14+)
        i.offset for i in dis.get_instructions(two) if i.opname.startswith("RETURN_")
    )
    monitoring_arch.arm(two.__code__, first_ret, lambda fr, o: None, lambda fr, o: None)
    two(0)  # PY_RETURN at the second return: no site there, DISABLE
    two(0)
    rec = Rec()
    monitoring_arch.arm_return(two.__code__, rec.on_return, rec.on_unwind)
    two(0)
    two(1)
    assert rec.kinds() == [("return", "b"), ("return", "a")]


def test_threads_started_before_arming_report_their_calls(
    monitoring_arch: MonitoringArch,
) -> None:
    f, rec = fresh(RECURSIVE_SRC, "fact"), Rec()
    go = threading.Event()
    counts: list[int] = []

    def worker() -> None:
        go.wait(5)
        counts.append(f(4))

    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.01)
    monitoring_arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
    go.set()
    t.join()
    assert counts == [24]
    assert rec.kinds() == [("return", v) for v in (1, 2, 6, 24)]
    assert {e[3] for e in rec.events} == {t.ident}
    assert monitoring_arch.capabilities.threads_started_earlier


# ---------------------------------------------------------------- CPython behaviour relied on


@pytest.fixture
def other_tool() -> Iterator[int]:
    tool = free_tool()
    M.use_tool_id(tool, "test-other")
    yield tool
    M.set_events(tool, 0)
    for ev in (E.PY_UNWIND, E.PY_RETURN, E.PY_YIELD, E.PY_THROW, E.INSTRUCTION):
        M.register_callback(tool, ev, None)
    M.free_tool_id(tool)


def test_cpython_disable_from_a_global_py_unwind(
    monitoring_arch: MonitoringArch, other_tool: int
) -> None:
    """Why our PY_UNWIND callback never returns DISABLE: before 3.15 (3.12.1 to 3.14.10) it
    replaces the program's exception and unregisters the callback; 3.15.2, where PY_UNWIND
    can be local (gh-142186), ignores it for the global event (and would turn the local one
    off for the whole code)."""
    src = "def boom():\n    raise KeyError(1)\n"
    boom = fresh(src, "boom")
    cb = lambda code, off, exc: M.DISABLE  # noqa: E731
    M.register_callback(other_tool, E.PY_UNWIND, cb)
    M.set_events(other_tool, E.PY_UNWIND)
    if monitoring_arch.capabilities.local_unwind:
        with pytest.raises(KeyError):
            boom()
        assert M.register_callback(other_tool, E.PY_UNWIND, None) is cb
    else:
        with pytest.raises(ValueError, match="Cannot disable PY_UNWIND events"):
            boom()
        # ... and the callback is gone.
        assert M.register_callback(other_tool, E.PY_UNWIND, None) is None


def test_cpython_py_return_at_a_close_caught_by_the_generator(other_tool: int) -> None:
    """A generator that catches GeneratorExit in close() and returns: PY_RETURN fires with
    the value (3.12.1 and 3.13.0), so on_return reports it."""
    src = "def polite():\n    try:\n        yield 1\n    except GeneratorExit:\n        return 7\n"
    polite = fresh(src, "polite")
    seen: list[object] = []
    M.register_callback(other_tool, E.PY_RETURN, lambda code, off, v: seen.append(v))
    M.set_local_events(other_tool, polite.__code__, E.PY_RETURN)
    try:
        g = polite()
        next(g)
        g.close()
    finally:
        M.set_local_events(other_tool, polite.__code__, 0)
    assert seen == [7]


@pytest.mark.parametrize("with_yield_events", [False, True])
def test_cpython_close_at_a_plain_yield(other_tool: int, with_yield_events: bool) -> None:
    """What the capability return_at_generator_close measures: 3.12.1 throws
    GeneratorExit into the frame (PY_THROW, PY_UNWIND); 3.13.0 ends it without any event,
    PY_YIELD instrumentation or not."""
    gen = fresh(GEN_SRC, "gen")
    seen: list[str] = []
    for name in ("PY_THROW", "PY_UNWIND", "PY_RETURN"):
        M.register_callback(
            other_tool, getattr(E, name), lambda *a, _n=name: seen.append(_n) and None
        )
    M.register_callback(other_tool, E.PY_YIELD, lambda *a: None)
    local = E.PY_RETURN | (E.PY_YIELD if with_yield_events else 0)
    M.set_local_events(other_tool, gen.__code__, local)
    M.set_events(other_tool, E.PY_THROW | E.PY_UNWIND)
    try:
        g = gen(3)
        next(g)
        g.close()
    finally:
        M.set_local_events(other_tool, gen.__code__, 0)
        M.set_events(other_tool, 0)
    a = MonitoringArch()
    try:
        runs = a.capabilities.return_at_generator_close
    finally:
        a.close()
    assert seen == (["PY_THROW", "PY_UNWIND"] if runs else [])
