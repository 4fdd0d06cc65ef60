"""Return hooks (`arm_return`/`disarm_return`) of the breakpoint arches.

`ReturnHookContract` is the contract of core/arch.py `BreakpointArch.arm_return`, written
once for every breakpoint arch: a subclass provides the `arch` fixture. It runs here for the
settrace arch (every Python) and in test_monitoring_returns.py for the monitoring arch.
What a mechanism cannot reach is asked of `arch.capabilities`, never of the Python version.
The tests after the contract are the settrace arch's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dis
import gc
import itertools
import sys
import threading
import time
from collections.abc import Iterator
from types import CodeType, FrameType
from typing import Any

import pytest

from pykprobes.arch.settrace import RETURN_HOOKS, SettraceArch
from pykprobes.arch.successors import exits
from pykprobes.core.regs import probed_frame


def fresh(src: str, name: str, filename: str = "<returns>") -> Any:
    """A function compiled from `src`: a code object no other test shares."""
    ns: dict[str, Any] = {}
    exec(compile(src, filename, "exec"), ns)
    return ns[name]


def code_of(fn: Any) -> CodeType:
    return fn if isinstance(fn, CodeType) else fn.__code__


class Rec:
    """Return hooks that record (kind, frame, value or exception, thread)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, FrameType, Any, int]] = []

    def on_return(self, frame: FrameType, value: object) -> None:
        self.events.append(("return", frame, value, threading.get_ident()))

    def on_unwind(self, frame: FrameType, exc: BaseException) -> None:
        self.events.append(("unwind", frame, exc, threading.get_ident()))

    def kinds(self) -> list[tuple[str, Any]]:
        return [(kind, value) for kind, _, value, _ in self.events]

    def names(self) -> list[str]:
        return [kind for kind, _, _, _ in self.events]


FUNC_SRC = """
import sys
frames = []
def f(x):
    frames.append(sys._getframe())
    if isinstance(x, BaseException):
        raise x
    return x
"""

RECURSIVE_SRC = """
def fact(n):
    if n < 0:
        raise ValueError(n)
    if n <= 1:
        return 1
    return n * fact(n - 1)

def down(n):
    if n == 0:
        raise KeyError("bottom")
    return down(n - 1)
"""

GEN_SRC = """
def gen(n):
    total = 0
    for i in range(n):
        got = yield i
        if got is not None:
            total += got
    return total
"""

GEN_TRY_SRC = """
def gen_try():
    try:
        yield 1
        yield 2
    finally:
        pass
"""


class ReturnHookContract:
    """core/arch.py BreakpointArch.arm_return, for any breakpoint arch."""

    # ------------------------------------------------------------ plain functions

    def test_return_reports_the_value_the_caller_gets_and_the_probed_frame(self, arch: Any) -> None:
        ns: dict[str, Any] = {}
        exec(compile(FUNC_SRC, "<returns>", "exec"), ns)
        f, rec = ns["f"], Rec()
        arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
        value = object()
        assert f(value) is value
        assert rec.kinds() == [("return", value)]
        frame = rec.events[0][1]
        assert frame is ns["frames"][-1]  # the probed frame itself
        assert frame.f_code is f.__code__ and frame.f_locals["x"] is value

    def test_an_exception_leaving_is_reported_and_reaches_the_caller_unchanged(
        self, arch: Any
    ) -> None:
        ns: dict[str, Any] = {}
        exec(compile(FUNC_SRC, "<returns>", "exec"), ns)
        f, rec = ns["f"], Rec()

        def traceback_of(exc: BaseException) -> list[tuple[str, int]]:
            out, tb = [], exc.__traceback__
            while tb is not None:
                out.append((tb.tb_frame.f_code.co_name, tb.tb_lineno))
                tb = tb.tb_next
            return out

        with pytest.raises(KeyError) as unprobed:
            f(KeyError("before"))
        arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
        error = KeyError("probed")
        with pytest.raises(KeyError) as info:
            f(error)
        assert info.value is error
        assert rec.kinds() == [("unwind", error)]
        assert rec.events[0][1] is ns["frames"][-1]
        # The same entries below this test's own frame (whose line differs).
        assert traceback_of(info.value)[1:] == traceback_of(unprobed.value)[1:]
        assert error.__context__ is None and error.__cause__ is None

    def test_handled_inside_is_no_unwind_and_finally_may_swallow(self, arch: Any) -> None:
        src = """
def handled():
    try:
        raise KeyError(1)
    except KeyError:
        pass
    return None

def swallowed():
    try:
        raise KeyError(2)
    finally:
        return "swallowed"
"""
        handled, swallowed = fresh(src, "handled"), fresh(src, "swallowed")
        rec = Rec()
        for fn in (handled, swallowed):
            arch.arm_return(fn.__code__, rec.on_return, rec.on_unwind)
        assert handled() is None
        assert swallowed() == "swallowed"
        assert rec.kinds() == [("return", None), ("return", "swallowed")]

    def test_recursion_reports_each_level_once_inner_first(self, arch: Any) -> None:
        fact, down = fresh(RECURSIVE_SRC, "fact"), fresh(RECURSIVE_SRC, "down")
        rec = Rec()
        arch.arm_return(fact.__code__, rec.on_return, rec.on_unwind)
        arch.arm_return(down.__code__, rec.on_return, rec.on_unwind)
        assert fact(5) == 120
        assert rec.kinds() == [("return", v) for v in (1, 2, 6, 24, 120)]
        assert len({id(e[1]) for e in rec.events}) == 5  # five distinct frames
        rec.events.clear()
        with pytest.raises(KeyError) as info:
            down(3)
        assert rec.kinds() == [("unwind", info.value)] * 4
        assert [e[1].f_locals["n"] for e in rec.events] == [0, 1, 2, 3]

    # ------------------------------------------------------------ generators

    def test_generator_ends_once_with_its_return_value(self, arch: Any) -> None:
        gen, rec = fresh(GEN_SRC, "gen"), Rec()
        arch.arm_return(gen.__code__, rec.on_return, rec.on_unwind)
        assert list(gen(3)) == [0, 1, 2]
        assert rec.kinds() == [("return", 0)]  # never at a yield
        g = gen(3)
        assert next(g) == 0
        assert g.send(10) == 1
        assert g.send(20) == 2
        assert rec.kinds() == [("return", 0)]
        with pytest.raises(StopIteration) as info:
            g.send(5)
        assert info.value.value == 35
        assert rec.kinds() == [("return", 0), ("return", 35)]

    def test_generator_throw_uncaught_caught_and_through_a_with_block(self, arch: Any) -> None:
        src = """
def plain():
    yield 1

def loop():
    while True:
        try:
            yield
        except KeyError:
            pass

def within(cm):
    with cm:
        yield 1
"""
        plain, loop, within = (fresh(src, n) for n in ("plain", "loop", "within"))
        rec = Rec()
        for fn in (plain, loop, within):
            arch.arm_return(fn.__code__, rec.on_return, rec.on_unwind)
        g = plain()
        next(g)
        error = IndexError(1)
        with pytest.raises(IndexError) as info:
            g.throw(error)
        assert info.value is error and rec.kinds() == [("unwind", error)]
        rec.events.clear()
        # Caught, and the frame yields again at the same yield: not an end.
        g = loop()
        next(g)
        g.throw(KeyError(1))
        g.throw(KeyError(2))
        assert rec.kinds() == []
        error = IndexError(2)
        with pytest.raises(IndexError):
            g.throw(error)
        assert rec.kinds() == [("unwind", error)]
        rec.events.clear()
        # The with block's exit re-raises it (the frame runs code, then leaves).
        g = within(contextlib.nullcontext())
        next(g)
        error = IndexError(3)
        with pytest.raises(IndexError):
            g.throw(error)
        assert rec.kinds() == [("unwind", error)]

    def test_generator_close_inside_try(self, arch: Any) -> None:
        gen_try, rec = fresh(GEN_TRY_SRC, "gen_try"), Rec()
        arch.arm_return(gen_try.__code__, rec.on_return, rec.on_unwind)
        g = gen_try()
        next(g)
        g.close()
        assert [(k, type(v)) for k, v in rec.kinds()] == [("unwind", GeneratorExit)]
        g.close()  # closing a finished generator is no second end
        assert len(rec.events) == 1

    def test_generator_closed_at_a_plain_yield(self, arch: Any) -> None:
        """A plain yield (no try/with around it): 3.13.0 closes such a generator without
        running its frame, and no mechanism sees that end (capability)."""
        gen, rec = fresh(GEN_SRC, "gen"), Rec()
        arch.arm_return(gen.__code__, rec.on_return, rec.on_unwind)
        g = gen(3)
        next(g)
        g.close()
        if arch.capabilities.return_at_generator_close:
            assert [(k, type(v)) for k, v in rec.kinds()] == [("unwind", GeneratorExit)]
        else:
            assert rec.kinds() == []
            assert exits(gen.__code__).close_skips  # the static analysis agrees

    def test_generator_catching_generator_exit_and_returning(self, arch: Any) -> None:
        src = """
def polite():
    try:
        yield 1
    except GeneratorExit:
        return 7
"""
        polite, rec = fresh(src, "polite"), Rec()
        arch.arm_return(polite.__code__, rec.on_return, rec.on_unwind)
        g = polite()
        next(g)
        assert g.close() in (None, 7)  # 3.13 returns the value, 3.12 drops it
        assert rec.kinds() == [("return", 7)]

    def test_unfinished_generator_garbage_collected(self, arch: Any) -> None:
        gen_try, gen = fresh(GEN_TRY_SRC, "gen_try"), fresh(GEN_SRC, "gen")
        rec = Rec()
        for fn in (gen_try, gen):
            arch.arm_return(fn.__code__, rec.on_return, rec.on_unwind)
        g = gen_try()
        next(g)
        del g  # refcount: finalized at once
        gc.collect()
        assert [(k, type(v)) for k, v in rec.kinds()] == [("unwind", GeneratorExit)]
        rec.events.clear()
        for _ in gen(5):  # break out: the generator is dropped unfinished
            break
        gc.collect()
        if arch.capabilities.return_at_generator_close:
            assert [(k, type(v)) for k, v in rec.kinds()] == [("unwind", GeneratorExit)]
        else:
            assert rec.kinds() == []

    def test_a_generator_closed_before_it_started(self, arch: Any) -> None:
        """It ends if and only if the mechanism saw it start: 3.12+ close it without
        running its frame (no PY_START, no end); 3.11 starts the frame with GeneratorExit
        (a 'call' event: the entry probe hits, and the end is reported)."""
        gen_try, rec = fresh(GEN_TRY_SRC, "gen_try"), Rec()
        starts: list[int] = []
        arch.arm(gen_try.__code__, 0, lambda fr, o: starts.append(o), None)
        arch.arm_return(gen_try.__code__, rec.on_return, rec.on_unwind)
        g = gen_try()
        g.close()
        h = gen_try()
        del h
        gc.collect()
        assert len(rec.events) == len(starts) in (0, 2)
        assert all(k == "unwind" and type(v) is GeneratorExit for k, v in rec.kinds())

    def test_generator_raising_stop_iteration(self, arch: Any) -> None:
        """PEP 479: the caller sees RuntimeError. Where that conversion happens in C after
        the frame left (3.11), the exception that left the frame is the StopIteration."""
        src = "def stopping():\n    yield 1\n    raise StopIteration(5)\n"
        stopping, rec = fresh(src, "stopping"), Rec()
        arch.arm_return(stopping.__code__, rec.on_return, rec.on_unwind)
        with pytest.raises(RuntimeError) as info:
            list(stopping())
        [(kind, exc)] = rec.kinds()
        assert kind == "unwind"
        assert exc is info.value or exc is info.value.__cause__
        if arch.capabilities.unwind_exception_exact:
            assert exc is info.value

    def test_yield_from_delegation(self, arch: Any) -> None:
        src = """
def inner():
    try:
        x = yield 1
        yield x
    finally:
        pass
    return "inner-done"

def outer():
    r = yield from inner()
    return r + "/outer-done"
"""
        ns: dict[str, Any] = {}
        exec(compile(src, "<returns>", "exec"), ns)
        inner, outer = ns["inner"], ns["outer"]
        rec = Rec()
        for fn in (inner, outer):
            arch.arm_return(fn.__code__, rec.on_return, rec.on_unwind)
        g = outer()
        next(g)
        g.send("x")
        with pytest.raises(StopIteration) as info:
            next(g)
        assert info.value.value == "inner-done/outer-done"
        assert rec.kinds() == [("return", "inner-done"), ("return", "inner-done/outer-done")]
        assert [e[1].f_code.co_name for e in rec.events] == ["inner", "outer"]

    # ------------------------------------------------------------ coroutines

    def test_coroutines_under_asyncio_await_is_not_a_return(self, arch: Any) -> None:
        src = """
import asyncio

async def work(x):
    for _ in range(3):
        await asyncio.sleep(0)
    return x * 2

async def failing():
    await asyncio.sleep(0)
    raise KeyError("async")

async def sleeper():
    await asyncio.sleep(10)
"""
        work, failing, sleeper = (fresh(src, n) for n in ("work", "failing", "sleeper"))
        rec = Rec()
        for fn in (work, failing, sleeper):
            arch.arm_return(fn.__code__, rec.on_return, rec.on_unwind)
        seen: dict[str, BaseException] = {}

        async def main() -> int:
            result: int = await work(21)
            try:
                await failing()
            except KeyError as exc:
                seen["failing"] = exc
            task = asyncio.ensure_future(sleeper())
            await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError as exc:
                seen["cancelled"] = exc
            return result

        assert asyncio.run(main()) == 42
        by_code = [(e[1].f_code.co_name, e[0]) for e in rec.events]
        assert by_code == [("work", "return"), ("failing", "unwind"), ("sleeper", "unwind")]
        assert rec.events[0][2] == 42
        assert rec.events[1][2] is seen["failing"]
        assert isinstance(rec.events[2][2], asyncio.CancelledError)

    def test_async_generators(self, arch: Any) -> None:
        src = """
import asyncio

async def agen(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i

async def agen_failing():
    yield 1
    raise KeyError("agen")
"""
        agen, agen_failing = fresh(src, "agen"), fresh(src, "agen_failing")
        rec = Rec()
        for fn in (agen, agen_failing):
            arch.arm_return(fn.__code__, rec.on_return, rec.on_unwind)
        seen: dict[str, BaseException] = {}

        async def main() -> list[int]:
            out = [x async for x in agen(3)]
            it = agen(5)
            await it.__anext__()
            await it.aclose()  # unfinished: GeneratorExit is thrown in
            try:
                async for _ in agen_failing():
                    pass
            except KeyError as exc:
                seen["failing"] = exc
            return out

        assert asyncio.run(main()) == [0, 1, 2]
        assert [(k, v if k == "return" else type(v)) for k, v in rec.kinds()] == [
            ("return", None),
            ("unwind", GeneratorExit),
            ("unwind", KeyError),
        ]
        assert rec.events[2][2] is seen["failing"]

    # ------------------------------------------------------------ threads and running frames

    def test_each_threads_frames_are_reported_in_that_thread(self, arch: Any) -> None:
        ns: dict[str, Any] = {}
        exec(compile(FUNC_SRC, "<returns>", "exec"), ns)
        f, rec = ns["f"], Rec()
        arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
        nthreads, calls = 4, 50
        idents: dict[int, int] = {}

        def work(k: int) -> None:
            idents[k] = threading.get_ident()
            for i in range(calls):
                f((k, i))
                with contextlib.suppress(KeyError):
                    f(KeyError(k))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(rec.events) == nthreads * calls * 2
        for kind, _frame, value, ident in rec.events:
            k = value[0] if kind == "return" else value.args[0]
            assert ident == idents[k]  # reported in the thread whose frame ended
        assert sorted(v for k, v in rec.kinds() if k == "return") == sorted(
            (k, i) for k in range(nthreads) for i in range(calls)
        )

    def test_a_frame_already_running_in_this_thread(self, arch: Any) -> None:
        src = """
def walk(arm, n):
    total = 0
    for i in range(n):
        if i == 2:
            arm()
        total += i
    return total
"""
        walk, rec = fresh(src, "walk"), Rec()
        assert walk(lambda: arch.arm_return(walk.__code__, rec.on_return, rec.on_unwind), 5) == 10
        if arch.capabilities.return_of_running_frames_this_thread:
            assert rec.kinds() == [("return", 10)]
        else:
            assert rec.kinds() == []

    def test_a_frame_already_running_in_another_thread(self, arch: Any) -> None:
        src = """
def spin(state):
    i = 0
    while not state["stop"]:
        i = i + 1
        state["count"] = i
    return "spun"
"""
        spin, rec = fresh(src, "spin"), Rec()
        state = {"stop": False, "count": 0}
        t = threading.Thread(target=spin, args=(state,))
        t.start()
        try:
            while state["count"] < 1000:
                time.sleep(0.001)
            arch.arm_return(spin.__code__, rec.on_return, rec.on_unwind)
        finally:
            state["stop"] = True
            t.join()
        if arch.capabilities.return_of_running_frames_other_threads:
            assert rec.kinds() == [("return", "spun")]
            assert rec.events[0][3] == t.ident
        else:
            assert rec.kinds() == []

    def test_a_generator_suspended_when_armed(self, arch: Any) -> None:
        gen, gen_try = fresh(GEN_SRC, "gen"), fresh(GEN_TRY_SRC, "gen_try")
        g, h = gen(3), gen_try()
        next(g)
        next(h)
        rec = Rec()
        arch.arm_return(gen.__code__, rec.on_return, rec.on_unwind)
        arch.arm_return(gen_try.__code__, rec.on_return, rec.on_unwind)
        assert list(g) == [1, 2]
        h.close()
        if arch.capabilities.return_of_suspended_generators:
            assert [(k, v if k == "return" else type(v)) for k, v in rec.kinds()] == [
                ("return", 0),
                ("unwind", GeneratorExit),
            ]
        else:
            assert rec.kinds() == []

    # ------------------------------------------------------------ with other probes

    def test_combined_with_entry_and_offset_probes_on_the_same_code(self, arch: Any) -> None:
        src = """
def f(x):
    y = x + 1
    if y < 0:
        raise ValueError(y)
    return y
"""
        f = fresh(src, "f")
        code = f.__code__
        add = next(i.offset for i in dis.get_instructions(code) if i.opname == "BINARY_OP")
        ret = next(i.offset for i in dis.get_instructions(code) if i.opname == "RETURN_VALUE")
        order: list[tuple[str, object]] = []
        # Without a post-handler a mechanism may pass no frame (core/arch.py PreHit).
        arch.arm(code, 0, lambda fr, o: order.append(
            ("entry", (fr or probed_frame(sys._getframe(0))).f_locals["x"])), None)
        arch.arm(
            code,
            add,
            lambda fr, o: order.append(("pre-add", None)),
            lambda fr, o: order.append(("post-add", fr.f_locals.get("y"))),
        )
        arch.arm(
            code,
            ret,
            lambda fr, o: order.append(("pre-ret", None)),
            lambda fr, o: order.append(("post-ret", None)),
        )
        arch.arm_return(
            code,
            lambda fr, v: order.append(("return", v)),
            lambda fr, e: order.append(("unwind", type(e).__name__)),
        )
        assert f(1) == 2
        assert order == [
            ("entry", 1),
            ("pre-add", None),
            ("post-add", None),  # the STORE_FAST has not run yet
            ("pre-ret", None),
            ("post-ret", None),
            ("return", 2),
        ]
        order.clear()
        with pytest.raises(ValueError):
            f(-5)
        assert order == [
            ("entry", -5),
            ("pre-add", None),
            ("post-add", None),
            ("unwind", "ValueError"),
        ]
        # Disarming the return hooks leaves the other probes; disarming those leaves the
        # return hooks.
        arch.disarm_return(code)
        order.clear()
        f(1)
        assert ("return", 2) not in order and ("entry", 1) in order
        arch.arm_return(code, lambda fr, v: order.append(("return", v)), lambda fr, e: None)
        for off in (0, add, ret):
            arch.disarm(code, off)
        order.clear()
        f(3)
        assert order == [("return", 4)]

    # ------------------------------------------------------------ arm / disarm

    def test_disarm_return_stops_reporting(self, arch: Any) -> None:
        gen, rec = fresh(GEN_SRC, "gen"), Rec()
        code = gen.__code__
        for cycle in range(3):
            arch.arm_return(code, rec.on_return, rec.on_unwind)
            list(gen(2))
            assert len(rec.events) == cycle + 1
            arch.disarm_return(code)
            list(gen(2))
            assert len(rec.events) == cycle + 1
        arch.disarm_return(code)  # not armed: a no-op
        assert arch.armed_returns() == []

    def test_disarm_return_while_a_frame_runs(self, arch: Any) -> None:
        gen_try, rec = fresh(GEN_TRY_SRC, "gen_try"), Rec()
        arch.arm_return(gen_try.__code__, rec.on_return, rec.on_unwind)
        g = gen_try()
        next(g)
        arch.disarm_return(gen_try.__code__)
        assert list(g) == [2]
        assert rec.kinds() == []

    def test_arming_again_replaces_the_hooks(self, arch: Any) -> None:
        gen, first, second = fresh(GEN_SRC, "gen"), Rec(), Rec()
        arch.arm_return(gen.__code__, first.on_return, first.on_unwind)
        list(gen(1))
        arch.arm_return(gen.__code__, second.on_return, second.on_unwind)
        list(gen(1))
        assert len(first.events) == len(second.events) == 1

    def test_equal_but_distinct_code_objects_are_independent(self, arch: Any) -> None:
        f1, f2 = fresh(RECURSIVE_SRC, "fact"), fresh(RECURSIVE_SRC, "fact")
        c1, c2 = f1.__code__, f2.__code__
        assert c1 == c2 and c1 is not c2 and hash(c1) == hash(c2)
        r1, r2 = Rec(), Rec()
        arch.arm_return(c1, r1.on_return, r1.on_unwind)
        f2(1)
        assert r1.events == []
        f1(1)
        assert r1.kinds() == [("return", 1)]
        arch.arm_return(c2, r2.on_return, r2.on_unwind)
        arch.disarm_return(c1)
        f1(1)
        f2(1)
        assert (len(r1.events), len(r2.events)) == (1, 1)
        assert r2.events[0][1].f_code is c2

    def test_hooks_run_without_the_arch_lock(self, arch: Any) -> None:
        """A hook may arm and disarm (it would deadlock if called under the lock)."""
        f, g = fresh(RECURSIVE_SRC, "fact"), fresh(RECURSIVE_SRC, "fact", "<g>")
        rec = Rec()

        def on_return(frame: FrameType, value: object) -> None:
            arch.arm_return(g.__code__, rec.on_return, rec.on_unwind)
            arch.disarm_return(f.__code__)

        arch.arm_return(f.__code__, on_return, rec.on_unwind)
        t = threading.Thread(target=f, args=(1,), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "deadlock: a hook was called under the arch's lock"
        assert arch.armed_returns() == [g.__code__]
        g(1)
        assert rec.kinds() == [("return", 1)]

    def test_concurrent_arm_and_disarm_while_threads_run(self, arch: Any) -> None:
        fs = [fresh(RECURSIVE_SRC, "fact", f"<f{i}>") for i in range(4)]
        stop = threading.Event()
        errors: list[BaseException] = []

        def call(fn: Any) -> None:
            try:
                while not stop.is_set():
                    fn(3)
                    time.sleep(0)  # let the arming threads have the GIL
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def churn(fn: Any) -> None:
            try:
                rec = Rec()
                for _ in range(30):
                    arch.arm_return(fn.__code__, rec.on_return, rec.on_unwind)
                    fn(2)
                    arch.disarm_return(fn.__code__)
                assert all(k == "return" for k in rec.names())
                assert len(rec.events) >= 30 * 2
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        callers = [threading.Thread(target=call, args=(fn,)) for fn in fs]
        churners = [threading.Thread(target=churn, args=(fn,)) for fn in fs]
        for t in callers + churners:
            t.start()
        for t in churners:
            t.join()
        stop.set()
        for t in callers:
            t.join()
        assert not errors
        assert arch.armed_returns() == []

    # ------------------------------------------------------------ failures

    def test_a_failing_return_hook_never_reaches_the_program(self, arch: Any) -> None:
        f, rec = fresh(RECURSIVE_SRC, "fact"), Rec()
        reported: list[tuple[CodeType, int, BaseException]] = []
        calls: list[int] = []

        def on_return(frame: FrameType, value: object) -> None:
            calls.append(1)
            raise RuntimeError("hook boom")

        arch.on_failure = lambda c, o, e: reported.append((c, o, e))
        arch.arm_return(f.__code__, on_return, rec.on_unwind)
        assert f(3) == 6
        assert f(3) == 6
        assert calls == [1]  # disarmed after its failure
        assert arch.nfailures == 1
        assert reported[0][:2] == (f.__code__, RETURN_HOOKS)
        assert isinstance(reported[0][2], RuntimeError)
        arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)  # can be armed again
        f(1)
        assert rec.kinds() == [("return", 1)]

    def test_a_failing_unwind_hook_leaves_the_exception_unchanged(self, arch: Any) -> None:
        down = fresh(RECURSIVE_SRC, "down")

        def on_unwind(frame: FrameType, exc: BaseException) -> None:
            raise RuntimeError("unwind boom")

        arch.arm_return(down.__code__, lambda fr, v: None, on_unwind)
        with pytest.raises(KeyError) as info:
            down(2)
        assert info.value.__context__ is None
        assert arch.nfailures == 1

    def test_keyboard_interrupt_in_a_hook_is_the_programs(self, arch: Any) -> None:
        f = fresh(RECURSIVE_SRC, "fact")

        def on_return(frame: FrameType, value: object) -> None:
            raise KeyboardInterrupt

        arch.arm_return(f.__code__, on_return, lambda fr, e: None)
        with pytest.raises(KeyboardInterrupt):
            f(1)
        assert arch.nfailures == 0
        # (sys.settrace: CPython drops a thread's trace function that raised.)

    def test_ends_inside_a_hook_are_not_seen(self, arch: Any) -> None:
        f, g = fresh(RECURSIVE_SRC, "fact"), fresh(RECURSIVE_SRC, "fact", "<g>")
        inner = Rec()
        arch.arm_return(g.__code__, inner.on_return, inner.on_unwind)
        arch.arm_return(f.__code__, lambda fr, v: g(2), lambda fr, e: None)
        f(1)
        assert not arch.capabilities.returns_inside_handlers
        assert inner.events == []
        g(1)
        assert inner.kinds() == [("return", 1)]

    def test_close_disarms_return_hooks(self, arch: Any) -> None:
        f, rec = fresh(RECURSIVE_SRC, "fact"), Rec()
        arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
        arch.close()
        f(2)
        assert rec.events == []


# ---------------------------------------------------------------- the settrace arch


@pytest.fixture
def settrace_arch() -> Iterator[SettraceArch]:
    assert sys.gettrace() is None, "a trace function (coverage? a debugger?) is installed"
    a = SettraceArch()
    yield a
    a.close()
    assert sys.gettrace() is None and threading.gettrace() is None


class TestSettraceReturns(ReturnHookContract):
    @pytest.fixture
    def arch(self, settrace_arch: SettraceArch) -> SettraceArch:
        return settrace_arch


def test_return_only_frames_get_no_opcode_events(settrace_arch: SettraceArch) -> None:
    f = fresh(RECURSIVE_SRC, "fact")
    flags: list[bool] = []
    settrace_arch.arm_return(
        f.__code__, lambda fr, v: flags.append(fr.f_trace_opcodes), lambda fr, e: None
    )
    f(3)
    assert flags == [False, False, False]


def test_trace_function_goes_with_the_last_return_hook(settrace_arch: SettraceArch) -> None:
    f, rec = fresh(RECURSIVE_SRC, "fact"), Rec()
    settrace_arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
    assert settrace_arch.installed() and threading.gettrace() is not None
    settrace_arch.disarm_return(f.__code__)
    assert sys.gettrace() is None and threading.gettrace() is None


def test_threads_started_earlier_are_not_reached(settrace_arch: SettraceArch) -> None:
    f, rec = fresh(RECURSIVE_SRC, "fact"), Rec()
    go, done = threading.Event(), threading.Event()

    def worker() -> None:
        go.wait(5)
        f(3)
        done.set()

    t = threading.Thread(target=worker)
    t.start()
    settrace_arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
    go.set()
    t.join()
    assert done.is_set() and rec.events == []
    assert not settrace_arch.capabilities.threads_started_earlier


def test_unwind_reports_the_last_exception_raised_in_the_frame(
    settrace_arch: SettraceArch,
) -> None:
    """Measured limit: an implicit re-raise (here: `finally`) of an earlier exception, after
    another one was raised and handled inside the finally block, reports the later one."""
    src = """
def f():
    try:
        raise KeyError("leaves")
    finally:
        try:
            int("x")
        except ValueError:
            pass
"""
    f, rec = fresh(src, "f"), Rec()
    settrace_arch.arm_return(f.__code__, rec.on_return, rec.on_unwind)
    with pytest.raises(KeyError):
        f()
    [(kind, exc)] = rec.kinds()
    assert kind == "unwind" and isinstance(exc, ValueError)
    assert not settrace_arch.capabilities.unwind_exception_exact


def test_an_exception_raised_before_the_frame_was_traced_is_counted(
    settrace_arch: SettraceArch,
) -> None:
    src = """
def f(arm):
    try:
        raise KeyError("early")
    finally:
        arm()
"""
    f, rec = fresh(src, "f"), Rec()
    with pytest.raises(KeyError):
        f(lambda: settrace_arch.arm_return(f.__code__, rec.on_return, rec.on_unwind))
    assert rec.events == []
    assert settrace_arch.unwinds_unknown == 1


def test_yield_positions_match_what_the_return_event_reports(
    settrace_arch: SettraceArch,
) -> None:
    """The f_lasti of a 'return' event at a yield is in `exits().yield_lasti` (the
    YIELD_VALUE on 3.11/3.12, the RESUME after it on 3.13)."""
    gen = fresh(GEN_SRC, "gen")
    seen: list[int] = []

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code is gen.__code__:
            if event == "return":
                seen.append(frame.f_lasti)
            return tracer
        return None

    sys.settrace(tracer)
    try:
        list(gen(2))
    finally:
        sys.settrace(None)
    ex = exits(gen.__code__)
    assert len(seen) == 3
    assert seen[0] in ex.yield_lasti and seen[1] in ex.yield_lasti
    assert seen[2] in ex.returns


def test_close_skips_agree_with_the_313_resume_flag() -> None:
    """successors.exits' close_skips (a yield covered only by the wrapper handler) is what
    3.13 encodes in RESUME's oparg (RESUME_OPARG_DEPTH1_MASK = 4) where it does."""
    src = """
def g(cm, it):
    yield 1
    for x in it:
        yield x
    try:
        yield 2
    except KeyError:
        pass
    with cm:
        yield 3
    yield from it
"""
    code = fresh(src, "g").__code__
    ins = list(dis.get_instructions(code))
    ex = exits(code)
    resumes = [
        (b.offset, b.arg)
        for a, b in itertools.pairwise(ins)
        if a.opname == "YIELD_VALUE" and b.opname == "RESUME"
    ]
    assert len(resumes) == 5
    if any((arg or 0) & 4 for _, arg in resumes):
        assert {off for off, arg in resumes if (arg or 0) & 4} == {
            off for off, _ in resumes if off in ex.close_skips
        }
    skipped = sorted(off for off, _ in resumes if off in ex.close_skips)
    has_wrapper = any(i.argrepr == "INTRINSIC_STOPITERATION_ERROR" for i in ins)
    assert len(skipped) == (2 if has_wrapper else 0)  # `yield 1` and the for loop's


LAZY_OPCODE_FLAG = """
import pykprobes.arch.settrace as st

def f():
    return 1

def loop():
    while True:
        try:
            yield
        except KeyError:
            pass

ends = []
a = st.SettraceArch()
a.arm_return(f.__code__, lambda fr, v: ends.append(v), lambda fr, e: ends.append(e))
f()
print(st._opcode_trace_flag_set)
a.arm_return(loop.__code__, lambda fr, v: ends.append(v), lambda fr, e: ends.append(e))
g = loop()
next(g)
g.throw(KeyError(1))  # caught: the frame yields again (told apart by opcode events)
try:
    g.throw(IndexError(2))
except IndexError:
    pass
a.close()
print(st._opcode_trace_flag_set == st._PY312, ends)
"""


def test_opcode_events_only_when_needed(run_python: Any) -> None:
    """3.12's process-wide opcode flag (module docstring) is not set for return hooks on
    plain functions, and is set (on 3.12 only) for code that can yield, whose
    exception-at-a-yield window needs opcode events: checked in a fresh interpreter."""
    proc = run_python(LAZY_OPCODE_FLAG)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["False", "True [1, IndexError(2)]"]
