"""What each mechanism promises: breakpoints act at once, optimized probes cover frames
still running the old code, unregistering restores the very same code objects."""

from __future__ import annotations

import dis
import threading
import time

import pytest

import pykprobes as kp
from pykprobes.core import registry
from tests.core import targets
from tests.testenv import (
    BREAKPOINT_CAPS,
    BREAKPOINT_REWRITES,
    HAS_SYS_MONITORING,
    OPTIMIZED,
    RunPython,
)

SPIN_STOP = threading.Event()
SPIN_COUNT = [0]


def spin() -> int:
    n = 0
    while not SPIN_STOP.is_set():
        n += 1  # SPIN-BODY
        SPIN_COUNT[0] = n
    return n


def _line_of(func: object, marker: str) -> int:
    import inspect

    src, first = inspect.getsourcelines(func)  # type: ignore[arg-type]
    return first + next(i for i, line in enumerate(src) if marker in line)


@pytest.mark.skipif(not BREAKPOINT_CAPS.running_frames_other_threads,
                    reason="capability: the breakpoint arch (settrace) cannot reach frames "
                           "already running in other threads")
def test_probe_on_a_loop_already_running_in_another_thread() -> None:
    SPIN_STOP.clear()
    t = threading.Thread(target=spin, daemon=True)
    t.start()
    try:
        while SPIN_COUNT[0] < 1000:
            time.sleep(0.001)
        addrs = kp.resolve_line(f"{__file__}:{_line_of(spin, 'SPIN-BODY')}")
        probes = [kp.Kprobe(addr=a) for a in addrs]
        kp.register_kprobes(probes)
        try:
            kp.wait_for_kprobe_optimizer()
            deadline = time.monotonic() + 10
            while sum(p.nhit for p in probes) < 100 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert sum(p.nhit for p in probes) >= 100
        finally:
            kp.unregister_kprobes(probes)
        hits = sum(p.nhit for p in probes)
        time.sleep(0.05)
        assert sum(p.nhit for p in probes) == hits, "the probe kept firing after unregister"
    finally:
        SPIN_STOP.set()
        t.join(10)


def test_optimized_probe_covers_frames_still_running_old_code() -> None:
    """A generator suspended inside `counter` before the probe is optimized keeps running
    the original code; the breakpoint stays armed there until it finishes."""
    code = targets.counter.__code__
    yield_off = next(i.offset for i in dis.get_instructions(code) if i.opname == "YIELD_VALUE")
    body = [i.offset for i in dis.get_instructions(code) if i.offset < yield_off
            # 3.14 loads it with LOAD_FAST_BORROW
            and i.opname in ("LOAD_FAST", "LOAD_FAST_BORROW") and i.argval == "i"][-1]
    gen = targets.counter(10)
    assert next(gen) == 0  # suspended in the original code
    p = kp.Kprobe(addr=targets.counter, offset=body)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert bool(p.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
        if OPTIMIZED:
            assert targets.counter.__code__ is not code
            state = registry.table_view().states[id(code)]
            assert any(v.code is code for v in state.retired), "old code still covered"
        assert next(gen) == 1 and next(gen) == 2
        assert p.nhit == 2, "frames running the old code still hit the probe"
        assert list(targets.counter(3)) == [0, 1, 2]
        assert p.nhit == 5
        gen.close()
        kp.wait_for_kprobe_optimizer()
        if OPTIMIZED:
            state = registry.table_view().states[id(code)]
            assert not state.retired, "old code forgotten once unused"
    finally:
        kp.unregister_kprobe(p)
    assert targets.counter.__code__ is code


def test_entry_probe_of_a_generator_fires_at_first_resumption() -> None:
    p = kp.Kprobe(addr=targets.counter)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        gen = targets.counter(2)
        assert p.nhit == 0
        assert list(gen) == [0, 1]
        assert p.nhit == 1
    finally:
        kp.unregister_kprobe(p)


def test_entry_probe_flags() -> None:
    p = kp.Kprobe(addr=targets.add)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        if OPTIMIZED:
            assert p.flags & kp.KPROBE_FLAG_OPTIMIZED
            assert not p.flags & kp.KPROBE_FLAG_FTRACE
        elif HAS_SYS_MONITORING:
            assert p.flags & kp.KPROBE_FLAG_FTRACE  # served by PY_START
    finally:
        kp.unregister_kprobe(p)


def test_recursion_and_many_offsets() -> None:
    offsets = [i.offset for i in dis.get_instructions(targets.recurse)
               if i.opname not in ("CACHE", "RESUME", "EXTENDED_ARG")]
    probes = [kp.Kprobe(addr=targets.recurse, offset=o) for o in offsets]
    kp.register_kprobes(probes)
    try:
        kp.wait_for_kprobe_optimizer()
        if OPTIMIZED:
            # Every probe the rewrite accepts is optimized, the entry and the first body
            # instruction included (two call sequences in a row).
            opt = registry.table_view().mechanisms.optimizer
            assert opt is not None
            accepted = [p for p in probes if opt.check_optimizable(p.addr.code, p.addr.offset)
                        is None]
            assert len(accepted) > 3
            assert all(p.flags & kp.KPROBE_FLAG_OPTIMIZED for p in accepted)
        assert targets.recurse(20) == 20
        assert probes[0].nhit == 21
        assert sum(p.nhit for p in probes) > 21 * 3
    finally:
        kp.unregister_kprobes(probes)


def test_unregister_restores_the_very_same_code_objects() -> None:
    funcs = [targets.add, targets.loop_sum, targets.recurse, targets.counter, targets.outer]
    before = [f.__code__ for f in funcs]
    probes = [kp.Kprobe(addr=f) for f in funcs]
    probes.append(kp.Kprobe(symbol_name="tests.core.targets:outer.<locals>.inner"))
    kp.register_kprobes(probes)
    kp.wait_for_kprobe_optimizer()
    targets.add(1, 2)
    targets.loop_sum(3)
    targets.recurse(3)
    list(targets.counter(3))
    targets.outer(3)
    kp.unregister_kprobes(probes)
    kp.wait_for_kprobe_optimizer()
    assert [f.__code__ for f in funcs] == before
    assert all(a is b for a, b in zip((f.__code__ for f in funcs), before, strict=True))
    assert not registry.table_view().states, "every code state is dropped"


def test_set_optimization_off_and_on() -> None:
    if not OPTIMIZED:
        pytest.skip("capability: this run keeps optimization off for the whole suite")
    p = kp.Kprobe(addr=targets.add)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert p.flags & kp.KPROBE_FLAG_OPTIMIZED
        kp.set_optimization(False)
        assert not p.flags & kp.KPROBE_FLAG_OPTIMIZED
        # Unless the breakpoint itself is armed by a rewrite (the same one).
        assert (targets.add.__code__ is p.addr.code) != BREAKPOINT_REWRITES
        targets.add(1, 1)
        assert p.nhit == 1
        kp.set_optimization(True)
        kp.wait_for_kprobe_optimizer()
        assert p.flags & kp.KPROBE_FLAG_OPTIMIZED
        targets.add(1, 1)
        assert p.nhit == 2
    finally:
        kp.set_optimization(True)
        kp.unregister_kprobe(p)


@pytest.mark.skipif(not HAS_SYS_MONITORING, reason="capability: sys.monitoring needs 3.12+")
def test_both_monitoring_tool_ids_taken_is_ebusy(run_python: RunPython) -> None:
    proc = run_python("""
        import errno, sys
        sys.monitoring.use_tool_id(4, "other-debugger")
        sys.monitoring.use_tool_id(3, "other-profiler")
        import pykprobes as kp
        def f():
            return 1
        try:
            kp.register_kprobe(kp.Kprobe(addr=f))
        except kp.KprobeError as exc:
            print(errno.errorcode[exc.errno], exc)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("EBUSY"), proc.stdout
    assert "other-debugger" in proc.stdout and "other-profiler" in proc.stdout


def test_unregistering_leaves_no_table_entry_behind() -> None:
    """Every version and cached check of a code object goes with its last probe: nothing
    grows with register/unregister cycles, and a later code object reusing the id of a
    freed one gets no stale answer."""
    view = registry.table_view()
    before = (len(view.versions), len(view.opt_reasons), len(view.states))
    for _ in range(3):
        probes = [kp.Kprobe(addr=f) for f in (targets.add, targets.loop_sum, targets.outer)]
        probes.append(kp.Kprobe(symbol_name="tests.core.targets:outer.<locals>.inner"))
        kp.register_kprobes(probes)
        kp.wait_for_kprobe_optimizer()
        targets.outer(2)
        kp.unregister_kprobes(probes)
        kp.wait_for_kprobe_optimizer()
    assert (len(view.versions), len(view.opt_reasons), len(view.states)) == before


def test_no_hit_lost_while_unoptimizing_under_a_running_thread() -> None:
    """set_optimization(False) switches the function back to its original code while another
    thread keeps calling it: the breakpoint is armed before the switch, so every call hits."""
    import sys

    if not OPTIMIZED:
        pytest.skip("capability: this run keeps optimization off for the whole suite")
    if not BREAKPOINT_CAPS.running_frames_other_threads:
        pytest.skip("capability: the breakpoint arch (settrace) cannot reach a thread that is "
                    "already running")
    p = kp.Kprobe(addr=targets.kprobe_target2)
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    stop = threading.Event()
    calls = [0]

    def caller() -> None:
        while not stop.is_set():
            targets.kprobe_target2(1)
            calls[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=caller)
    try:
        t.start()
        while calls[0] < 200:
            time.sleep(0.001)
        for _ in range(5):
            kp.set_optimization(False)
            kp.set_optimization(True)
            kp.wait_for_kprobe_optimizer()
        stop.set()
        t.join(10)
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        kp.set_optimization(True)
        kp.unregister_kprobe(p)
    assert p.nhit == calls[0]
