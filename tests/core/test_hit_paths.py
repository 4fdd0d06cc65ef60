"""The two hit paths of core/site.py: the fast path (no handler running anywhere, one probe
at the site: a per-site Regs, the mark `_held[0]`) and the careful path (keyed by thread), and
how each tells a nested hit in its own thread from a hit in another thread."""

from __future__ import annotations

import threading

import pytest

import pykprobes as kp
from pykprobes.core import guard
from tests.core import targets
from tests.testenv import NESTED_MISS_SEEN


def test_regs_frame_is_the_probed_frame_and_valid_only_in_the_handler() -> None:
    seen: list[tuple[str, dict[str, object]]] = []
    kept: list[kp.Regs] = []

    def handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        seen.append((regs.frame.f_code.co_name, dict(regs.args)))
        kept.append(regs)

    p = kp.Kprobe(addr=targets.add, pre_handler=handler)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert targets.add(2, 3) == 5
        assert targets.add(4, 5) == 9
    finally:
        kp.unregister_kprobe(p)
    assert seen == [("add", {"a": 2, "b": 3}), ("add", {"a": 4, "b": 5})]
    # The fast path hands the site's own Regs; after its handler it holds no frame.
    assert kept[0] is kept[1]
    with pytest.raises(RuntimeError, match="only while their handler runs"):
        _ = kept[0].frame
    assert not guard.busy and guard.held[0] is None


def test_fast_path_handler_in_one_thread_does_not_make_other_threads_miss() -> None:
    """Thread 1 sits in a fast-path handler; thread 2 hits a probe meanwhile: it finds the
    mark set, takes the careful path, finds no hit on its own stack, runs its handler;
    a hit nested in thread 2's handler is missed; thread 1 is not disturbed."""
    inside1 = threading.Event()
    release1 = threading.Event()
    log: list[str] = []

    def slow_handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        log.append(f"slow:{regs.frame.f_code.co_name}")
        inside1.set()
        release1.wait(10)

    def nesting_handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        log.append(f"outer:{regs.frame.f_code.co_name}")
        targets.add(1, 2)  # probed by `inner`: nested in this thread, so missed

    slow = kp.Kprobe(addr=targets.kprobe_target, pre_handler=slow_handler)
    outer = kp.Kprobe(addr=targets.kprobe_target2, pre_handler=nesting_handler)
    inner = kp.Kprobe(addr=targets.add, pre_handler=lambda p, r: log.append("inner"))
    kp.register_kprobes([slow, outer, inner])
    try:
        kp.wait_for_kprobe_optimizer()
        t1 = threading.Thread(target=targets.kprobe_target, args=(1,))
        t1.start()
        assert inside1.wait(10)
        assert guard.held[0] is not None  # thread 1 is in its fast-path handler
        t2 = threading.Thread(target=targets.kprobe_target2, args=(2,))
        t2.start()
        t2.join(10)
        assert log == ["slow:kprobe_target", "outer:kprobe_target2"]
        release1.set()
        t1.join(10)
        assert (slow.nhit, outer.nhit, inner.nhit) == (1, 1, 0)
        assert (slow.nmissed, outer.nmissed, inner.nmissed) == (0, 0, NESTED_MISS_SEEN)
        # Not nested any more: the next hit of `inner` runs its handler.
        assert targets.add(1, 1) == 2
        assert inner.nhit == 1 and log[-1] == "inner"
    finally:
        release1.set()
        kp.unregister_kprobes([slow, outer, inner])
    assert not guard.busy and guard.held[0] is None


def test_nested_hit_in_a_fast_path_handler_is_missed_in_the_same_thread() -> None:
    def outer_handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        assert guard.in_handler()
        targets.add(3, 4)

    outer = kp.Kprobe(addr=targets.kprobe_target, pre_handler=outer_handler)
    inner = kp.Kprobe(addr=targets.add, pre_handler=lambda p, r: None)
    kp.register_kprobes([outer, inner])
    try:
        kp.wait_for_kprobe_optimizer()
        assert not guard.in_handler()
        targets.kprobe_target(5)
        assert (outer.nhit, outer.nfault) == (1, 0)
        assert (inner.nhit, inner.nmissed) == (0, NESTED_MISS_SEEN)
    finally:
        kp.unregister_kprobes([outer, inner])


def test_unregister_waits_for_a_fast_path_handler_in_another_thread() -> None:
    """synchronize_hits(): a fast-path hit names no thread; unregister finds its trampoline
    frame on the other thread's stack and waits for that very frame to leave."""
    inside = threading.Event()
    release = threading.Event()
    done: list[str] = []

    def handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        inside.set()
        release.wait(10)
        done.append("handler")

    p = kp.Kprobe(addr=targets.kprobe_target, pre_handler=handler)
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    hitter = threading.Thread(target=targets.kprobe_target, args=(1,))
    hitter.start()
    assert inside.wait(10)

    def unregister() -> None:
        kp.unregister_kprobe(p)
        done.append("unregistered")

    remover = threading.Thread(target=unregister)
    remover.start()
    remover.join(0.3)
    assert remover.is_alive() and done == []
    release.set()
    remover.join(10)
    hitter.join(10)
    assert done == ["handler", "unregistered"]


def test_return_fast_path_keeps_nothing_of_the_call_alive() -> None:
    """The return side reuses one Regs per code object on its fast path: after the handler
    it must hold neither the frame nor the value returned (the program decides when that
    object dies, not the probe)."""
    import gc
    import weakref

    class Value:
        pass

    def make() -> Value:
        return Value()

    kept: list[kp.Regs] = []
    seen: list[bool] = []

    def handler(ri: kp.KretprobeInstance, regs: kp.Regs) -> None:
        seen.append(isinstance(regs.retval, Value) and regs.frame.f_code is ri.frame.f_code)
        kept.append(regs)

    rp = kp.Kretprobe(addr=make, handler=handler)
    kp.register_kretprobe(rp)
    try:
        kp.wait_for_kprobe_optimizer()
        value = make()
        ref = weakref.ref(value)
        del value
        gc.collect()
        assert ref() is None
        assert seen == [True] and rp.nhit == 1
        assert kept[0].retval is None and kept[0].exception is None
    finally:
        kp.unregister_kretprobe(rp)
