"""Return probes: ports of the kernel's kretprobe tests, and the semantics Python adds
(generators, coroutines, exceptions, threads, maxactive, unregistering in flight)."""

from __future__ import annotations

import asyncio
import errno
import gc
import random
import threading
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import pykprobes as kp
from tests.core import targets
from tests.testenv import OPTIMIZED


class State:
    rand1 = 0
    krph_val = 0


@pytest.fixture(autouse=True)
def rand() -> None:
    State.rand1 = random.randint(4, 2**31)
    State.krph_val = 0


def _entry(ri: kp.KretprobeInstance, regs: kp.Regs) -> int:
    State.krph_val = State.rand1 // targets.DIV_FACTOR
    return 0


def _return(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
    assert regs.retval == State.rand1 // targets.DIV_FACTOR, "incorrect value in kretprobe"
    assert State.krph_val != 0, "call to kretprobe entry handler failed"
    State.krph_val = State.rand1


def _return2(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
    assert regs.retval == State.rand1 // targets.DIV_FACTOR + 9
    State.krph_val = State.rand1 + 1


def _settle() -> None:
    kp.wait_for_kprobe_optimizer()


def test_kretprobe() -> None:
    rp = kp.Kretprobe(symbol_name="tests.core.targets:kprobe_target",
                      handler=_return, entry_handler=_entry)
    kp.register_kretprobe(rp)
    try:
        _settle()
        assert targets.kprobe_target(State.rand1) == State.rand1 // targets.DIV_FACTOR
        assert State.krph_val == State.rand1, "kretprobe handler not called"
        assert rp.nhit == 1 and rp.nmissed == 0 and rp.nfault == 0
        assert "  r  tests.core.targets:kprobe_target+0" in kp.list_kprobes()
    finally:
        kp.unregister_kretprobe(rp)


def test_kretprobes() -> None:
    rp1 = kp.Kretprobe(symbol_name="tests.core.targets:kprobe_target",
                       handler=_return, entry_handler=_entry)
    rp2 = kp.Kretprobe(addr=targets.kprobe_target2, handler=_return2, entry_handler=_entry)
    kp.register_kretprobes([rp1, rp2])
    try:
        _settle()
        targets.kprobe_target(State.rand1)
        assert State.krph_val == State.rand1
        State.krph_val = 0
        targets.kprobe_target2(State.rand1)
        assert State.krph_val == State.rand1 + 1
    finally:
        kp.unregister_kretprobes([rp1, rp2])
    assert not rp1.registered and not rp2.registered


def _caller_of_probed() -> tuple[int, list[str]]:
    return targets.kprobe_target(12), [f.name for f in traceback.extract_stack()]


def test_stacktrace_on_kretprobe() -> None:
    """Inside the return handler the stack shows the real caller of the probed function
    (the kernel checks that the trampoline's address is replaced by the real one)."""
    seen: dict[str, Any] = {}

    def handler(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        seen["stack"] = [f.name for f in traceback.extract_stack()]
        seen["caller"] = regs.frame.f_back.f_code.co_name if regs.frame.f_back else None
        seen["frame"] = regs.frame.f_code.co_name

    rp = kp.Kretprobe(addr=targets.kprobe_target, handler=handler)
    kp.register_kretprobe(rp)
    try:
        _settle()
        _, caller_stack = _caller_of_probed()
        assert seen["frame"] == "kprobe_target"
        assert seen["caller"] == "_caller_of_probed"
        stack = seen["stack"]
        i = stack.index("kprobe_target")
        assert stack[:i] == caller_stack, "the frames below the probed one are its callers"
    finally:
        kp.unregister_kretprobe(rp)


def _nested_caller() -> list[str]:
    return [f.name for f in traceback.extract_stack()] if targets.outer(3) else []


def test_stacktrace_on_nested_kretprobe() -> None:
    stacks: list[list[str]] = []

    def handler(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        stacks.append([f.name for f in traceback.extract_stack()])

    outer = kp.Kretprobe(symbol_name="tests.core.targets:outer", handler=handler)
    inner = kp.Kretprobe(symbol_name="tests.core.targets:outer.<locals>.inner", handler=handler)
    kp.register_kretprobes([outer, inner])
    try:
        _settle()
        caller_stack = _nested_caller()
        assert len(stacks) == 2, "inner returns first, then outer"
        inner_stack, outer_stack = stacks
        base = caller_stack
        i = inner_stack.index("inner")
        assert inner_stack[i - 1] == "outer" and inner_stack[: i - 1] == base
        j = outer_stack.index("outer")
        assert outer_stack[:j] == base and "inner" not in outer_stack
    finally:
        kp.unregister_kretprobes([outer, inner])


def test_offset_that_is_not_the_entry() -> None:
    import dis

    off = [i.offset for i in dis.get_instructions(targets.add)][3]
    rp = kp.Kretprobe(addr=targets.add, offset=off)
    with pytest.raises(kp.KprobeError) as info:
        kp.register_kretprobe(rp)
    assert info.value.errno == errno.EINVAL
    assert "Retprobe address must be an function entry" in str(info.value)
    assert not rp.registered
    with pytest.raises(kp.KprobeError) as info:
        kp.register_kretprobe(kp.Kretprobe(addr=targets.add, data_size=1 << 20))
    assert info.value.errno == errno.E2BIG


def test_entry_handler_nonzero_skips_the_return_handler() -> None:
    returned: list[int] = []
    rp = kp.Kretprobe(addr=targets.raises,
                      entry_handler=lambda ri, regs: regs.args["x"] % 2,
                      handler=lambda ri, regs: returned.append(regs.retval))
    kp.register_kretprobe(rp)
    try:
        _settle()
        for x in range(6):
            targets.raises(x)
        assert returned == [0, 2, 4]
    finally:
        kp.unregister_kretprobe(rp)


def test_data_is_private_to_each_call_and_recursion_nests() -> None:
    order: list[tuple[str, int]] = []

    def entry(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        ri.data["n"] = regs.args["n"]
        order.append(("in", regs.args["n"]))

    def ret(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        assert regs.retval == ri.data["n"]
        order.append(("out", ri.data["n"]))

    rp = kp.Kretprobe(addr=targets.recurse, entry_handler=entry, handler=ret, maxactive=50)
    kp.register_kretprobe(rp)
    try:
        _settle()
        assert targets.recurse(4) == 4
        assert order == [("in", n) for n in (4, 3, 2, 1, 0)] + \
            [("out", n) for n in (0, 1, 2, 3, 4)]
    finally:
        kp.unregister_kretprobe(rp)


def test_recursion_beyond_maxactive_counts_exactly() -> None:
    rets: list[int] = []
    rp = kp.Kretprobe(addr=targets.recurse, handler=lambda ri, r: rets.append(r.retval),
                      maxactive=5)
    kp.register_kretprobe(rp)
    try:
        _settle()
        assert targets.recurse(9) == 9  # 10 calls in flight at the deepest point
        assert rp.nmissed == 5 and rp.nhit == 5
        assert rets == [5, 6, 7, 8, 9]  # the outermost five calls were probed
        targets.recurse(2)
        assert rp.nhit == 8 and rp.nmissed == 5
    finally:
        kp.unregister_kretprobe(rp)


def test_default_maxactive_is_the_kernels() -> None:
    import os

    rp = kp.Kretprobe(addr=targets.add)
    kp.register_kretprobe(rp)
    try:
        assert rp.maxactive == max(10, 2 * (os.cpu_count() or 1))
    finally:
        kp.unregister_kretprobe(rp)


def test_exception_exit_runs_the_handler_and_reaches_the_caller_unchanged() -> None:
    seen: list[Any] = []
    rp = kp.Kretprobe(addr=targets.raises,
                      handler=lambda ri, regs: seen.append((regs.retval, regs.exception,
                                                            ri.exception)))
    kp.register_kretprobe(rp)
    try:
        _settle()
        with pytest.raises(ValueError, match="negative") as info:
            targets.raises(-1)
        tb = traceback.extract_tb(info.value.__traceback__)
        assert [f.name for f in tb][-1] == "raises"
        assert tb[-1].line == 'raise ValueError("negative")'
        assert targets.raises(3) == 3
        assert len(seen) == 2
        assert seen[0][0] is None and seen[0][1] is info.value and seen[0][2] is info.value
        assert seen[1] == (3, None, None)
    finally:
        kp.unregister_kretprobe(rp)


def _events(rp_target: Any, **kw: Any) -> tuple[kp.Kretprobe, list[str]]:
    log: list[str] = []

    def entry(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        log.append("entry")

    def ret(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        log.append(f"exc:{type(regs.exception).__name__}" if regs.exception is not None
                   else f"ret:{regs.retval!r}")

    rp = kp.Kretprobe(addr=rp_target, entry_handler=entry, handler=ret, **kw)
    kp.register_kretprobe(rp)
    _settle()
    return rp, log


def gen_returning(n: int) -> Iterator[int]:
    yield from range(n)
    return n * 10


def test_generator_return_handler_runs_once_at_the_end() -> None:
    rp, log = _events(gen_returning)
    try:
        g = gen_returning(3)
        assert log == [], "entry runs at the first resumption, not at creation"
        assert next(g) == 0
        assert log == ["entry"]
        assert list(g) == [1, 2]
        assert log == ["entry", "ret:30"], "once, with StopIteration's value"
        g2 = gen_returning(3)
        next(g2)
        g2.close()
        assert log[-2:] == ["entry", "exc:GeneratorExit"]
        g3 = gen_returning(3)
        next(g3)
        with pytest.raises(KeyError):
            g3.throw(KeyError("k"))
        assert log[-2:] == ["entry", "exc:KeyError"]
        g4 = gen_returning(5)
        next(g4)
        del g4
        gc.collect()
        assert log[-2:] == ["entry", "exc:GeneratorExit"]
        assert rp.nhit == 4
    finally:
        kp.unregister_kretprobe(rp)


async def coro(x: int) -> int:
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    if x < 0:
        raise ValueError(x)
    return x + 1


def test_coroutine_under_asyncio() -> None:
    rp, log = _events(coro)
    try:
        async def main() -> list[int | BaseException]:
            return await asyncio.gather(coro(1), coro(2), coro(-1), return_exceptions=True)

        results = asyncio.run(main())
        assert results[:2] == [2, 3] and isinstance(results[2], ValueError)
        assert log.count("entry") == 3
        assert sorted(e for e in log if e != "entry") == ["exc:ValueError", "ret:2", "ret:3"]
    finally:
        kp.unregister_kretprobe(rp)


async def agen(n: int) -> AsyncIterator[int]:
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def test_async_generator() -> None:
    rp, log = _events(agen)
    try:
        async def main() -> list[int]:
            return [i async for i in agen(3)]

        assert asyncio.run(main()) == [0, 1, 2]
        assert log == ["entry", "ret:None"]
    finally:
        kp.unregister_kretprobe(rp)


def test_threads_each_get_their_instances() -> None:
    barrier = threading.Barrier(4, timeout=10)
    results: dict[int, Any] = {}

    def entry(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        ri.data["x"] = regs.args["x"]

    def ret(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        results[ri.thread] = (ri.data["x"], regs.retval)

    def work(x: int) -> None:
        barrier.wait()
        targets.raises(x)

    rp = kp.Kretprobe(addr=targets.raises, entry_handler=entry, handler=ret)
    kp.register_kretprobe(rp)
    try:
        _settle()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(results.values()) == [(i, i) for i in range(4)]
        assert set(results) == {t.ident for t in threads}
    finally:
        kp.unregister_kretprobe(rp)


def test_unregister_with_calls_in_flight() -> None:
    rp, log = _events(gen_returning)
    g = gen_returning(3)
    next(g)
    kp.unregister_kretprobe(rp)
    assert list(g) == [1, 2]  # the call finishes normally
    assert log == ["entry"]  # its return handler did not run ...
    assert rp.nmissed == 1  # ... and is counted as missed


def test_kprobe_and_kretprobe_on_the_same_function() -> None:
    p = kp.Kprobe(addr=targets.add)
    rp, log = _events(targets.add)
    kp.register_kprobe(p)
    try:
        _settle()
        assert targets.add(1, 2) == 3
        assert p.nhit == 1 and log == ["entry", "ret:3"]
        assert kp.get_kprobe(targets.add) is not None
        assert bool(p.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
        assert bool(rp.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
    finally:
        kp.unregister_kprobe(p)
        kp.unregister_kretprobe(rp)


def test_return_inside_a_handler_is_missed() -> None:
    def handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        targets.kprobe_target2(1)

    p = kp.Kprobe(addr=targets.kprobe_target, pre_handler=handler)
    rp, log = _events(targets.kprobe_target2)
    kp.register_kprobe(p)
    try:
        _settle()
        targets.kprobe_target(3)
        assert log == []  # the nested call ran no kretprobe handler
        targets.kprobe_target2(3)
        assert log == ["entry", "ret:10"]
    finally:
        kp.unregister_kprobe(p)
        kp.unregister_kretprobe(rp)


def test_disable_and_disarm() -> None:
    rp, log = _events(targets.add)
    try:
        kp.disable_kretprobe(rp)
        targets.add(1, 1)
        assert log == []
        kp.enable_kretprobe(rp)
        _settle()
        targets.add(1, 1)
        assert log == ["entry", "ret:2"]
        kp.disarm_all_kprobes()
        targets.add(1, 1)
        assert len(log) == 2
        kp.arm_all_kprobes()
        _settle()
        targets.add(2, 2)
        assert log[-1] == "ret:4"
    finally:
        kp.arm_all_kprobes()
        kp.unregister_kretprobe(rp)


def test_handler_fault_is_counted() -> None:
    rp = kp.Kretprobe(addr=targets.add, handler=lambda ri, regs: 1 / 0,
                      entry_handler=lambda ri, regs: [][1])
    kp.register_kretprobe(rp)
    try:
        _settle()
        with pytest.warns(kp.KprobeFaultWarning):
            assert targets.add(1, 2) == 3
        assert rp.nfault == 1  # the entry handler failed: no return handler for that call
    finally:
        kp.unregister_kretprobe(rp)


def plain_yields(n: int) -> Iterator[int]:
    i = 0
    while i < n:
        yield i  # a plain yield: not inside try/with/yield from
        i += 1
    return i


def test_generators_abandoned_at_a_plain_yield_do_not_exhaust_maxactive() -> None:
    """`for x in gen(): break` many times over: each generator is closed at a plain yield.
    Where the interpreter reports that end (GeneratorExit) the handler runs; where it does
    not (CPython 3.13.0 finishes such a generator without running its frame), the call is
    counted missed once no one holds its frame. Either way new calls are still probed."""
    rp, log = _events(plain_yields, maxactive=3)
    try:
        for _ in range(10):
            for _x in plain_yields(5):
                break
        gc.collect()
        assert list(plain_yields(2)) == [0, 1]
        assert log[-2:] == ["entry", "ret:2"], "a new call is still probed"
        assert log.count("entry") == 11
        ended = sum(1 for e in log if e != "entry")
        # Every call ended with its handler, was counted missed, or is still in flight.
        assert ended + rp.nmissed + len(rp._inflight) == 11
        assert len(rp._inflight) <= 3
    finally:
        kp.unregister_kretprobe(rp)


def _blocking(entered: threading.Event, wait: threading.Event, x: int) -> int:
    entered.set()
    wait.wait(10)
    return x * 2


@pytest.mark.parametrize("careful", [False, True], ids=["fast-handler", "careful-handler"])
def test_a_return_while_another_thread_runs_a_handler_runs_its_handler(careful: bool) -> None:
    """Thread B enters a kretprobed call, thread A then sits in a probe's handler, and B's
    call returns meanwhile: B's return handler runs (it is not inside a handler) with its own
    Regs, counted once. `careful`: A's handler is on the careful path (its probe shares the
    site with a second one) rather than the fast path."""
    in_handler = threading.Event()
    b_returned = threading.Event()
    b_may_return = threading.Event()
    b_entered = threading.Event()
    seen: list[tuple[int, Any, bool]] = []

    def pre(p: kp.Kprobe, regs: kp.Regs) -> None:
        in_handler.set()
        b_returned.wait(10)

    def ret(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        seen.append((ri.thread, regs.retval, regs.frame.f_code is _blocking.__code__))

    probes = [kp.Kprobe(addr=targets.kprobe_target, pre_handler=pre)]
    if careful:
        probes.append(kp.Kprobe(addr=targets.kprobe_target, pre_handler=lambda p, r: None))
    rp = kp.Kretprobe(addr=_blocking, handler=ret)
    kp.register_kretprobe(rp)
    kp.register_kprobes(probes)
    try:
        _settle()
        results: list[int] = []

        def b() -> None:
            results.append(_blocking(b_entered, b_may_return, 21))
            b_returned.set()

        thread_b = threading.Thread(target=b)
        thread_b.start()
        assert b_entered.wait(10)
        thread_a = threading.Thread(target=targets.kprobe_target, args=(5,))
        thread_a.start()
        assert in_handler.wait(10)
        b_may_return.set()
        thread_b.join(10)
        thread_a.join(10)
        assert results == [42]
        assert seen == [(thread_b.ident, 42, True)]
        assert rp.nhit == 1 and rp.nmissed == 0 and rp.nfault == 0
        assert probes[0].nhit == 1 and probes[0].nmissed == 0
    finally:
        kp.unregister_kprobes(probes)
        kp.unregister_kretprobe(rp)


def test_keyboard_interrupt_from_a_handler_reaches_the_program() -> None:
    """Ctrl-C inside a kretprobe handler goes on into the program (never counted as a
    fault), and the kretprobe keeps serving the calls that follow."""
    interrupt = {"entry": False, "ret": True}
    log: list[str] = []

    def entry(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        log.append("entry")
        if interrupt["entry"]:
            interrupt["entry"] = False
            raise KeyboardInterrupt

    def ret(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        log.append(f"ret:{regs.retval}")
        if interrupt["ret"]:
            interrupt["ret"] = False
            raise KeyboardInterrupt

    rp = kp.Kretprobe(addr=targets.add, entry_handler=entry, handler=ret)
    kp.register_kretprobe(rp)
    try:
        _settle()
        with pytest.raises(KeyboardInterrupt):
            targets.add(1, 2)
        assert targets.add(2, 2) == 4
        interrupt["entry"] = True
        with pytest.raises(KeyboardInterrupt):
            targets.add(3, 2)
        assert targets.add(4, 2) == 6
        # The interrupted entry handler's call has no return handler.
        assert log == ["entry", "ret:3", "entry", "ret:4", "entry", "entry", "ret:6"]
        assert rp.nhit == 3
        assert rp.nfault == 0
    finally:
        kp.unregister_kretprobe(rp)
