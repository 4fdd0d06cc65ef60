from __future__ import annotations

from collections.abc import Iterator
from types import CodeType, FunctionType

import pytest

import pykprobes as kp
from pykprobes.core import registry
from tests.core import targets


def _codes() -> dict[str, CodeType]:
    out: dict[str, CodeType] = {}
    for name, obj in vars(targets).items():
        obj = getattr(obj, "__func__", obj)
        if isinstance(obj, FunctionType):
            out[name] = obj.__code__
    for name, obj in vars(targets.Widget).items():
        obj = getattr(obj, "__func__", obj)
        if isinstance(obj, property):
            obj = obj.fget
        if isinstance(obj, FunctionType):
            out["Widget." + name] = obj.__code__
    return out


@pytest.fixture(autouse=True)
def clean_probes() -> Iterator[None]:
    """Every test starts and ends with no probe, every target running its original code."""
    before = _codes()
    yield
    leftover = registry.all_probes()
    for p in leftover:
        kp.unregister_kprobe(p)
    kp.arm_all_kprobes()
    kp.wait_for_kprobe_optimizer()
    after = _codes()
    changed = [name for name, code in before.items() if after.get(name) is not code]
    assert not leftover, f"test left probes registered: {leftover}"
    assert not changed, f"code not restored after unregistering: {changed}"
