"""The optimized kprobe's inline hit (core/opthit.py): rewritten code calls the site's
`enter`, then the pre-handler itself. What the trampoline guaranteed must hold as well when
the only frame of the hit is the probed frame itself, at an offset where the instruction's
operands are on the stack: a fault is counted and never raised, KeyboardInterrupt goes on,
the counts are exact, regs and the reentrancy rule find the hit, and unregister waits for a
handler in flight in a frame that goes on running. Under the breakpoint arch the same
behaviour is asserted of the breakpoint hits (on 3.11 those of a rewrite: testenv.REWRITTEN)."""

from __future__ import annotations

import dis
import inspect
import threading
import warnings

import pytest

import pykprobes as kp
from pykprobes.core import guard
from pykprobes.core.regs import INLINE_CALLS
from tests.core import targets
from tests.testenv import NESTED_MISS_SEEN, REWRITTEN


def _binary_op(func: object) -> int:
    """The offset of the first BINARY_OP of `func`: its operands are on the stack there."""
    return next(i.offset for i in dis.get_instructions(func) if i.opname == "BINARY_OP")


def _loop_body(func: object) -> int:
    """The first offset of the line marked `# LOOP-BODY` in `func`."""
    lines, first = inspect.getsourcelines(func)  # type: ignore[arg-type]
    line = first + next(n for n, text in enumerate(lines) if "# LOOP-BODY" in text)
    return min(off for off, ln in dis.findlinestarts(func.__code__)  # type: ignore[attr-defined]
               if ln == line)


def _served_inline(func: object) -> bool:
    return id(func.__code__) in INLINE_CALLS  # type: ignore[attr-defined]


def test_a_fault_at_an_offset_is_counted_and_leaves_the_operands_alone() -> None:
    def bad(p: kp.Kprobe, regs: kp.Regs) -> None:
        raise ValueError("boom")

    p = kp.Kprobe(addr=targets.add, offset=_binary_op(targets.add), pre_handler=bad)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert _served_inline(targets.add) == REWRITTEN
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert [targets.add(i, 10) for i in range(3)] == [10, 11, 12]
        assert (p.nhit, p.nfault, p.nmissed) == (3, 3, 0)
        assert len([w for w in caught if issubclass(w.category, kp.KprobeFaultWarning)]) == 1
        assert guard.held[0] is None and not guard.busy
    finally:
        kp.unregister_kprobe(p)


def test_a_fault_at_a_generator_expressions_entry_keeps_its_iterator() -> None:
    """3.15 puts a generator expression's iterator on the stack before its first RESUME:
    the entry hit's exception-table entry must not cut it off."""
    genexpr = next(c for c in targets.double_all.__code__.co_consts
                   if isinstance(c, type(targets.double_all.__code__)))

    def bad(p: kp.Kprobe, regs: kp.Regs) -> None:
        raise ValueError("boom")

    p = kp.Kprobe(addr=genexpr, pre_handler=bad)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert targets.double_all([1, 2, 3]) == 12
            assert targets.double_all([]) == 0
        assert (p.nhit, p.nfault) == (2, 2)
    finally:
        kp.unregister_kprobe(p)


def test_keyboard_interrupt_from_a_handler_reaches_the_program_and_the_probe_goes_on() -> None:
    calls: list[int] = []

    def pre(p: kp.Kprobe, regs: kp.Regs) -> None:
        calls.append(regs.offset)
        if len(calls) == 1:
            raise KeyboardInterrupt

    p = kp.Kprobe(addr=targets.add, offset=_binary_op(targets.add), pre_handler=pre)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        with pytest.raises(KeyboardInterrupt):
            targets.add(1, 2)
        assert guard.held[0] is None and not guard.busy
        assert targets.add(2, 3) == 5
        assert (p.nhit, p.nfault, len(calls)) == (2, 0, 2)
    finally:
        kp.unregister_kprobe(p)


def test_regs_and_the_reentrancy_rule_find_a_hit_at_an_offset() -> None:
    seen: list[object] = []

    def outer_handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        seen.append((regs.frame.f_code.co_name, dict(regs.args), guard.in_handler()))
        targets.kprobe_target(1)  # probed by `inner`: nested in this thread, so missed

    outer = kp.Kprobe(addr=targets.add, offset=_binary_op(targets.add),
                      pre_handler=outer_handler)
    inner = kp.Kprobe(addr=targets.kprobe_target, pre_handler=lambda p, r: seen.append("x"))
    kp.register_kprobes([outer, inner])
    try:
        kp.wait_for_kprobe_optimizer()
        assert targets.add(4, 5) == 9
        assert seen == [("add", {"a": 4, "b": 5}, True)]
        assert (outer.nhit, inner.nhit, inner.nmissed) == (1, 0, NESTED_MISS_SEEN)
        assert not guard.in_handler()
        targets.kprobe_target(2)
        assert (inner.nhit, seen[-1]) == (1, "x")
    finally:
        kp.unregister_kprobes([outer, inner])


def test_counts_are_exact_through_resets_disable_and_disarm() -> None:
    p = kp.Kprobe(addr=targets.loop_sum, offset=_loop_body(targets.loop_sum),
                  pre_handler=lambda p, r: None)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert _served_inline(targets.loop_sum) == REWRITTEN
        assert targets.loop_sum(300) == sum(range(300))
        assert p.nhit == 300
        p.nhit = 0
        targets.loop_sum(7)
        assert p.nhit == 7
        kp.disable_kprobe(p)
        targets.loop_sum(5)
        assert p.nhit == 7
        kp.enable_kprobe(p)
        targets.loop_sum(5)
        assert p.nhit == 12
        kp.disarm_all_kprobes()
        try:
            targets.loop_sum(5)
            assert p.nhit == 12
        finally:
            kp.arm_all_kprobes()
        targets.loop_sum(2)
        assert (p.nhit, p.nmissed, p.nfault) == (14, 0, 0)
    finally:
        kp.unregister_kprobe(p)
    targets.loop_sum(2)
    assert p.nhit == 14


_stop = threading.Event()


def _spin() -> int:
    n = 0
    while not _stop.is_set():
        n += 1  # LOOP-BODY
    return n


def test_unregister_waits_for_a_handler_in_a_frame_that_goes_on_running() -> None:
    """The inline hit leaves no frame of its own: the probed frame, still looping once its
    handler returned, is what synchronize_hits() sees; it must stop waiting when that
    handler call is over, not when the frame ends."""
    inside = threading.Event()
    release = threading.Event()
    done: list[str] = []

    def handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        if not inside.is_set():
            inside.set()
            release.wait(10)
            done.append("handler")

    p = kp.Kprobe(addr=_spin, offset=_loop_body(_spin), pre_handler=handler)
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    _stop.clear()
    hitter = threading.Thread(target=_spin)
    hitter.start()
    try:
        assert inside.wait(10)

        def unregister() -> None:
            kp.unregister_kprobe(p)
            done.append("unregistered")

        remover = threading.Thread(target=unregister)
        remover.start()
        remover.join(0.3)
        assert remover.is_alive() and done == []
        release.set()
        remover.join(5)
        # The spinning frame is still on its stack: the wait ended with the handler call.
        assert hitter.is_alive() and done == ["handler", "unregistered"]
    finally:
        release.set()
        _stop.set()
        hitter.join(10)
    assert guard.held[0] is None
