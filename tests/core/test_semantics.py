"""The kernel's semantics: aggregation, reentrancy, faults, enable/disable, arm/disarm-all,
the kprobes/list view, threads."""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable

import pytest

import pykprobes as kp
from tests.core import targets
from tests.testenv import NESTED_MISS_SEEN, OPTIMIZED


def _count(log: list[str], tag: str) -> Callable[[kp.Kprobe, kp.Regs], None]:
    return lambda p, regs: log.append(tag)


def test_aggregate_probe_keeps_each_probes_handlers_and_counters() -> None:
    log: list[str] = []
    a = kp.Kprobe(addr=targets.add, pre_handler=_count(log, "a"))
    b = kp.Kprobe(addr=targets.add, pre_handler=_count(log, "b"))
    c = kp.Kprobe(symbol_name="tests.core.targets:add", pre_handler=_count(log, "c"))
    kp.register_kprobes([a, b, c])
    try:
        assert a.addr == b.addr == c.addr
        kp.wait_for_kprobe_optimizer()
        assert targets.add(2, 3) == 5
        assert log == ["a", "b", "c"]
        kp.unregister_kprobe(b)
        log.clear()
        assert targets.add(2, 3) == 5
        assert log == ["a", "c"]
        assert (a.nhit, b.nhit, c.nhit) == (2, 1, 2)
        kp.disable_kprobe(a)
        log.clear()
        targets.add(1, 1)
        assert log == ["c"]
        assert a.flags & kp.KPROBE_FLAG_DISABLED
    finally:
        kp.unregister_kprobes([a, c])


def test_post_handler_in_aggregate_unoptimizes() -> None:
    pre = kp.Kprobe(addr=targets.add, pre_handler=lambda p, r: None)
    kp.register_kprobe(pre)
    kp.wait_for_kprobe_optimizer()
    assert bool(pre.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
    post_seen: list[int] = []
    post = kp.Kprobe(addr=targets.add, post_handler=lambda p, r: post_seen.append(1))
    kp.register_kprobe(post)
    try:
        assert not pre.flags & kp.KPROBE_FLAG_OPTIMIZED
        targets.add(1, 2)
        assert pre.nhit == 1 and post_seen == [1]
    finally:
        kp.unregister_kprobe(post)
    kp.wait_for_kprobe_optimizer()
    assert bool(pre.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
    kp.unregister_kprobe(pre)


def test_reentrancy_counts_missed() -> None:
    inner_log: list[int] = []

    def outer_handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        targets.kprobe_target2(7)  # probed: must not run its handler

    outer = kp.Kprobe(addr=targets.kprobe_target, pre_handler=outer_handler)
    inner = kp.Kprobe(addr=targets.kprobe_target2,
                      pre_handler=lambda p, r: inner_log.append(1))
    kp.register_kprobes([outer, inner])
    try:
        kp.wait_for_kprobe_optimizer()
        targets.kprobe_target(9)
        assert outer.nhit == 1
        assert inner.nhit == 0 and inner_log == []
        assert inner.nmissed == NESTED_MISS_SEEN
        targets.kprobe_target2(1)
        assert inner.nhit == 1 and inner_log == [1]
    finally:
        kp.unregister_kprobes([outer, inner])


def test_recursive_handler_hitting_its_own_probe() -> None:
    def handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        targets.add(0, 0)

    p = kp.Kprobe(addr=targets.add, pre_handler=handler)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert targets.add(1, 1) == 2
        assert (p.nhit, p.nmissed) == (1, NESTED_MISS_SEEN)
    finally:
        kp.unregister_kprobe(p)


@pytest.mark.parametrize("exc", [ValueError("boom"), SystemExit(3), GeneratorExit()])
def test_handler_exception_never_reaches_the_program(exc: BaseException) -> None:
    def bad(p: kp.Kprobe, regs: kp.Regs) -> None:
        raise exc

    p = kp.Kprobe(addr=targets.add, pre_handler=bad, post_handler=bad)
    q = kp.Kprobe(symbol_name="tests.core.targets:loop_sum", pre_handler=bad)
    kp.register_kprobes([p, q])
    try:
        kp.wait_for_kprobe_optimizer()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                assert targets.add(2, 2) == 4
                assert targets.loop_sum(4) == 6
        assert p.nfault == 6 and q.nfault == 3
        assert p.nhit == 3 and q.nhit == 3
        reports = [w for w in caught if issubclass(w.category, kp.KprobeFaultWarning)]
        assert len(reports) == 2, [str(w.message) for w in reports]  # once per probe
    finally:
        kp.unregister_kprobes([p, q])


def test_handler_exception_with_warnings_as_errors() -> None:
    p = kp.Kprobe(addr=targets.add, pre_handler=lambda p, r: 1 / 0)
    kp.register_kprobe(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert targets.add(1, 2) == 3
        assert p.nfault == 1
    finally:
        kp.unregister_kprobe(p)


def test_disarm_all_keeps_disabled_state() -> None:
    a = kp.Kprobe(addr=targets.add)
    b = kp.Kprobe(addr=targets.kprobe_target)
    kp.register_kprobes([a, b])
    try:
        kp.disable_kprobe(b)
        kp.disarm_all_kprobes()
        targets.add(1, 1)
        targets.kprobe_target(1)
        assert a.nhit == 0 and b.nhit == 0
        assert targets.add.__code__ is a.addr.code  # disarmed: the original code runs
        kp.arm_all_kprobes()
        kp.wait_for_kprobe_optimizer()
        targets.add(1, 1)
        targets.kprobe_target(1)
        assert a.nhit == 1 and b.nhit == 0
        assert b.flags & kp.KPROBE_FLAG_DISABLED
        kp.enable_kprobe(b)
        targets.kprobe_target(1)
        assert b.nhit == 1
    finally:
        kp.arm_all_kprobes()
        kp.unregister_kprobes([a, b])


LIST_LINE = re.compile(
    r"^(?P<addr>[0-9a-f]{16})  k  (?P<sym>\S+)\+(?P<off>\d+)"
    r"(?:  (?P<flags>(\[GONE\]|\[DISABLED\]|\[OPTIMIZED\]|\[FTRACE\])+))?$"
)


def test_list_kprobes_format() -> None:
    a = kp.Kprobe(addr=targets.add, pre_handler=lambda p, r: None)
    b = kp.Kprobe(symbol_name="tests.core.targets:Widget.grow", offset=0,
                  flags=kp.KPROBE_FLAG_DISABLED)
    kp.register_kprobes([a, b])
    try:
        kp.wait_for_kprobe_optimizer()
        lines = kp.list_kprobes().splitlines()
        assert len(lines) == 2
        parsed = [LIST_LINE.match(line) for line in lines]
        assert all(parsed), lines
        by_sym = {m["sym"]: m for m in parsed if m}
        assert by_sym["tests.core.targets:add"]["addr"] == a.addr.hexid
        assert by_sym["tests.core.targets:Widget.grow"]["flags"] == "[DISABLED]"
        flags = by_sym["tests.core.targets:add"]["flags"] or ""
        assert ("[OPTIMIZED]" in flags) == OPTIMIZED
        # The id is stable: the same text again.
        assert kp.list_kprobes().splitlines() == lines
    finally:
        kp.unregister_kprobes([a, b])


def test_get_kprobe() -> None:
    p = kp.Kprobe(addr=targets.add)
    kp.register_kprobe(p)
    try:
        assert kp.get_kprobe(targets.add) is p
        assert kp.get_kprobe(p.addr) is p
        assert kp.get_kprobe(targets.kprobe_target) is None
    finally:
        kp.unregister_kprobe(p)
    assert kp.get_kprobe(targets.add) is None


def test_handlers_run_concurrently_in_threads() -> None:
    inside = threading.Barrier(4, timeout=10)
    seen: set[int] = set()

    def handler(p: kp.Kprobe, regs: kp.Regs) -> None:
        seen.add(threading.get_ident())
        inside.wait()  # all four threads are in a handler at once

    p = kp.Kprobe(addr=targets.kprobe_target, pre_handler=handler)
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        threads = [threading.Thread(target=targets.kprobe_target, args=(i,))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(seen) == 4 and p.nhit == 4 and p.nmissed == 0
    finally:
        kp.unregister_kprobe(p)


def test_registration_from_many_threads() -> None:
    probes = [kp.Kprobe(addr=f) for f in (targets.add, targets.kprobe_target,
                                            targets.kprobe_target2, targets.loop_sum) * 5]
    errors: list[BaseException] = []

    def work(chunk: list[kp.Kprobe]) -> None:
        try:
            for p in chunk:
                kp.register_kprobe(p)
            for _ in range(50):
                targets.add(1, 2)
                targets.loop_sum(3)
            for p in chunk:
                kp.unregister_kprobe(p)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(probes[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert all(not p.registered for p in probes)
