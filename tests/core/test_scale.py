"""Many probes: functions switch code with one heap walk per batch at most, none when their
holders are known for sure, every holder still switches, and nothing is left behind
(bench/results/ANALYSIS.md, "Scale" and "Memory")."""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator
from types import CodeType, FunctionType, ModuleType
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.core import registry
from tests.testenv import BREAKPOINT_REWRITES, OPTIMIZED

needs_optimizer = pytest.mark.skipif(
    not OPTIMIZED, reason="capability: this run keeps optimization off for the whole suite"
)

_modules = [0]


def generated(count: int) -> tuple[ModuleType, list[FunctionType]]:
    """A fresh module of `count` functions (fresh code objects for every test), each with a
    nested function, as a module imported from source would have."""
    _modules[0] += 1
    name = f"_pykprobes_scale_{_modules[0]}"
    src = "".join(
        f"def h{i}(a, b):\n    return a + b + {i}\n\n\n"
        f"def make{i}(k):\n    def adder(x):\n        return x + k + {i}\n\n    return adder\n\n\n"
        for i in range(count)
    )
    mod = ModuleType(name)
    mod.__file__ = f"<{name}>"
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod, [getattr(mod, f"h{i}") for i in range(count)]


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the heap walks (gc.get_referrers calls; the targets here make no generators,
    whose retirement check walks too)."""
    count = [0]
    real = gc.get_referrers

    def counting(*objs: Any) -> list[Any]:
        count[0] += 1
        return real(*objs)

    monkeypatch.setattr(gc, "get_referrers", counting)
    yield count


def _probes(fns: list[FunctionType], handler: Callable[..., None] | None = None) -> list[Any]:
    return [kp.Kprobe(addr=f, pre_handler=handler) for f in fns]


def _codes(fns: list[FunctionType]) -> list[CodeType]:
    return [f.__code__ for f in fns]


@needs_optimizer
def test_an_optimizer_pass_walks_the_heap_once(walks: list[int]) -> None:
    _, fns = generated(20)
    originals = _codes(fns)
    probes = _probes(fns)
    kp.register_kprobes(probes)  # one hold of the lock: the pass sees all 20
    try:
        kp.wait_for_kprobe_optimizer()
        assert all(p.is_optimized() for p in probes)
        assert walks[0] == 1
        assert all(f.__code__ is not c for f, c in zip(fns, originals, strict=True))
        for f in fns:
            f(1, 2)
        assert [p.nhit for p in probes] == [1] * 20
    finally:
        kp.unregister_kprobes(probes)
    assert _codes(fns) == originals
    assert all(f.__code__ is c for f, c in zip(fns, originals, strict=True))


@needs_optimizer
def test_unregistering_one_by_one_needs_no_heap_walk_when_the_holders_are_known(
    walks: list[int],
) -> None:
    _, fns = generated(10)
    originals = _codes(fns)
    probes = _probes(fns)
    kp.register_kprobes(probes)
    kp.wait_for_kprobe_optimizer()
    assert all(p.is_optimized() for p in probes)
    walks[0] = 0
    for f, code, p in zip(fns, originals, probes, strict=True):
        kp.unregister_kprobe(p)
        assert f.__code__ is code
    assert walks[0] == 0


@needs_optimizer
def test_a_copy_made_after_optimization_is_switched_back(walks: list[int]) -> None:
    """A holder nobody told us about (here FunctionType(f.__code__, ...)) is still found:
    the references to the rewritten code do not add up, so the heap is walked."""
    mod, (f,) = generated(1)
    original = f.__code__
    p = kp.Kprobe(addr=f)
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    assert p.is_optimized()
    copy = FunctionType(f.__code__, mod.__dict__, "copy")
    copy(1, 2)
    assert p.nhit == 1
    walks[0] = 0
    kp.unregister_kprobe(p)
    assert walks[0] == 1
    assert f.__code__ is original
    assert copy.__code__ is original


@needs_optimizer
def test_closures_made_before_and_after_optimization_are_switched_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mod, _ = generated(1)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    make = mod.make0
    before = make(1)
    original = before.__code__
    p = kp.Kprobe(symbol_name=f"{mod.__name__}:make0.<locals>.adder")
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    assert p.is_optimized()
    after = make(2)
    assert after.__code__ is not original  # made from the parent's rewritten constants
    assert before(0) + after(0) == 3
    assert p.nhit == 2
    again = make(3)
    kp.unregister_kprobe(p)
    assert [c.__code__ for c in (before, after, again)] == [original] * 3
    assert all(c.__code__ is original for c in (before, after, again))
    assert make(4).__code__ is original
    assert make.__code__ is mod.make0.__code__


@needs_optimizer
def test_batches_walk_the_heap_once(walks: list[int]) -> None:
    """With a holder to find for every probe, set_optimization and unregister_kprobes walk
    once for all of them; disarm_all_kprobes needs no walk for holders found before."""
    mod, fns = generated(10)
    originals = _codes(fns)
    probes = _probes(fns)
    kp.register_kprobes(probes)
    try:
        kp.wait_for_kprobe_optimizer()
        copies = [FunctionType(f.__code__, mod.__dict__) for f in fns]
        walks[0] = 0
        kp.set_optimization(False)
        if BREAKPOINT_REWRITES:
            # The breakpoints are armed by the very same rewrite: nothing switches.
            assert walks[0] == 0
            assert all(c.__code__ is not o for c, o in zip(copies, originals, strict=True))
        else:
            assert walks[0] == 1
            assert all(c.__code__ is o for c, o in zip(copies, originals, strict=True))
            assert all(f.__code__ is o for f, o in zip(fns, originals, strict=True))
        kp.set_optimization(True)
        kp.wait_for_kprobe_optimizer()
        assert all(p.is_optimized() for p in probes)
        assert all(c.__code__ is not o for c, o in zip(copies, originals, strict=True))
        # The optimizer pass's walk found the copies: now they are known holders.
        walks[0] = 0
        kp.disarm_all_kprobes()
        assert walks[0] == 0
        assert all(c.__code__ is o for c, o in zip(copies, originals, strict=True))
        kp.arm_all_kprobes()
        kp.wait_for_kprobe_optimizer()
        assert all(c.__code__ is not o for c, o in zip(copies, originals, strict=True))
        copies += [FunctionType(f.__code__, mod.__dict__) for f in fns]
        walks[0] = 0
    finally:
        kp.set_optimization(True)
        kp.arm_all_kprobes()
        kp.unregister_kprobes(probes)
    assert walks[0] == 1
    assert all(c.__code__ is o for c, o in zip(copies, originals * 2, strict=True))
    assert all(f.__code__ is o for f, o in zip(fns, originals, strict=True))


def test_register_kprobes_is_all_or_nothing_and_leaves_the_probes_as_given() -> None:
    _, fns = generated(3)
    probes = _probes(fns)
    bad = kp.Kprobe(addr=fns[0], offset=1)  # not an instruction boundary
    with pytest.raises(kp.KprobeError):
        kp.register_kprobes([*probes, bad])
    assert not any(p.registered for p in [*probes, bad])
    assert [p.addr for p in probes] == fns
    assert bad.addr is fns[0] and bad.offset == 1
    assert registry.all_probes() == []


def test_register_unregister_cycles_leave_no_table_entry_behind() -> None:
    view = registry.table_view()
    m = view.mechanisms

    def sizes() -> tuple[int, ...]:
        return (len(view.versions), len(view.opt_reasons), len(view.states),
                len(view.retiring), len(view.sites),
                len(m.breakpoint.armed_addresses()))  # type: ignore[attr-defined]

    before = sizes()
    for _ in range(3):
        mod, fns = generated(20)
        probes = _probes(fns)
        probes += [kp.Kprobe(addr=mod.make0(1)), kp.Kprobe(addr=mod.make1(1).__code__)]
        kp.register_kprobes(probes[:10])
        for p in probes[10:]:
            kp.register_kprobe(p)
        kp.wait_for_kprobe_optimizer()
        for f in fns:
            f(1, 2)
        kp.unregister_kprobes(probes[::2])
        for p in probes[1::2]:
            kp.unregister_kprobe(p)
        kp.wait_for_kprobe_optimizer()
    assert sizes() == before
    # An emptied table gives back the size it grew to (a dict keeps it until cleared).
    view = registry.table_view()
    allocated = {name: view.allocated[name]
                 for name in ("sites", "states", "opt_reasons", "versions")
                 if not getattr(view, name)}
    if not m.breakpoint._codes:  # type: ignore[attr-defined]
        allocated["breakpoint"] = sys.getsizeof(m.breakpoint._codes)  # type: ignore[attr-defined]
    empty = sys.getsizeof({})
    assert {name: size for name, size in allocated.items() if size > empty} == {}


@needs_optimizer
def test_no_cached_optimization_check_outlives_its_site(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is cached per address (id of the code, offset): once the site is gone the
    optimizer is asked again, so a code object reusing a freed id gets its own answer."""
    view = registry.table_view()
    m = view.mechanisms
    assert m.optimizer is not None
    asked: list[int] = []
    real = m.optimizer.check_optimizable

    def check(code: CodeType, offset: int) -> str | None:
        asked.append(offset)
        return real(code, offset)

    monkeypatch.setattr(m.optimizer, "check_optimizable", check)
    _, (f,) = generated(1)
    for expected in (1, 2):
        p = kp.Kprobe(addr=f)
        kp.register_kprobe(p)
        kp.wait_for_kprobe_optimizer()
        assert p.is_optimized()
        key = p.addr.key
        assert key in view.opt_reasons
        kp.unregister_kprobe(p)
        assert key not in view.opt_reasons
        assert len(asked) == expected


@needs_optimizer
def test_a_frame_keeps_its_version_while_the_function_switches(walks: list[int]) -> None:
    """A running frame holds the version it started with (a reference we cannot account
    for: the heap is walked), and finishes running it."""
    mod, _ = generated(0)
    exec("def slow(cb):\n    cb()\n    return 7\n", mod.__dict__)
    slow = mod.slow
    original = slow.__code__
    p = kp.Kprobe(addr=slow)
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    assert p.is_optimized()
    seen: list[object] = []

    def inside() -> None:
        seen.append(sys._getframe(1).f_code)
        walks[0] = 0
        kp.unregister_kprobe(p)
        seen.append(walks[0])
        seen.append(slow.__code__)

    assert slow(inside) == 7
    assert seen[0] is not original  # the frame ran the rewritten version
    assert seen[1:] == [1, original]
    assert slow.__code__ is original


@needs_optimizer
def test_the_optimizer_thread_runs_untraced() -> None:
    """A trace function set for new threads is not paid for by the optimizer's own thread
    (it ran the rewrites 2.6x slower under the 3.11 breakpoint arch's)."""
    import threading
    import time

    if registry.table_view().mechanisms.breakpoint.name == "settrace":
        pytest.skip("capability: the breakpoint arch owns the trace function of new threads")
    _, (f,) = generated(1)
    called: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> None:
        called.append(frame.f_code.co_name)

    threading.settrace(tracer)
    p = kp.Kprobe(addr=f)
    try:
        kp.register_kprobe(p)
        deadline = time.monotonic() + 10
        while not p.is_optimized() and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        kp.unregister_kprobe(p)
    assert "_work" in called  # the timer thread was traced up to there
    assert "run_pass" not in called


def test_register_kprobes_with_a_probe_listed_twice_registers_none() -> None:
    _, fns = generated(2)
    probes = _probes(fns)
    with pytest.raises(kp.KprobeError, match="already registered"):
        kp.register_kprobes([probes[0], probes[1], probes[0]])
    assert not any(p.registered for p in probes)
    assert registry.all_probes() == []
    assert [p.addr for p in probes] == fns
