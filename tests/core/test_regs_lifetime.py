"""Regs are valid only while their handler runs (the kernel's pt_regs), and say so when
read afterwards (issue 16, item 12): a kept Regs never gives another hit's frame."""

from __future__ import annotations

import pytest

import pykprobes as kp
from tests.core import targets


@pytest.mark.parametrize("aggregate", [False, True], ids=["alone", "aggregate"])
def test_a_kept_regs_raises_when_read_later_or_inside_another_handler(
    aggregate: bool,
) -> None:
    kept: list[kp.Regs] = []
    seen: list[object] = []

    def keep(p: kp.Kprobe, regs: kp.Regs) -> None:
        assert regs.frame.f_code is targets.add.__code__  # valid while it runs
        kept.append(regs)

    def read_kept(p: kp.Kprobe, regs: kp.Regs) -> None:
        try:
            seen.append(kept[-1].frame)
        except RuntimeError as exc:
            seen.append(str(exc))

    probes = [kp.Kprobe(symbol_name="tests.core.targets:add", pre_handler=keep),
              kp.Kprobe(symbol_name="tests.core.targets:kprobe_target", pre_handler=read_kept)]
    if aggregate:  # a second probe at the address: the careful path, a Regs per hit
        probes.append(kp.Kprobe(symbol_name="tests.core.targets:add",
                                pre_handler=lambda p, r: None))
    kp.register_kprobes(probes)
    try:
        for optimized in (False, True):
            if optimized:
                kp.wait_for_kprobe_optimizer()
            kept.clear()
            seen.clear()
            assert targets.add(1, 2) == 3
            assert targets.kprobe_target(6) == 2
            assert seen == ["pykprobes: these regs are valid only while their handler runs "
                            "(as pt_regs)"], optimized
            with pytest.raises(RuntimeError, match="valid only while"):
                kept[-1].frame  # noqa: B018 - reading it is the test
            assert "hit over" in repr(kept[-1]) or "SiteRegs" in repr(kept[-1])
    finally:
        kp.unregister_kprobes(probes)

