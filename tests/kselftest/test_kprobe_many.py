"""Ports of the kernel's test.d/kprobe/ tests of many probes and of the probes' mechanisms:
kprobe_insn_boundary.tc (a probe at every offset 0..255 of one function), multiple_kprobes.tc
(256 events on 256 functions), kprobe_opt_types.tc (`[OPTIMIZED]` in kprobes/list) and
kprobe_ftrace.tc (a kprobe event and the function tracer on one function, each switched on
and off on its own: the Python form of the function tracer is `sys.setprofile`, another
tool watching calls).

Every case has a Python form. The kernel's "Waiting for unoptimizing & freeing" is
`wait_for_kprobe_optimizer()`, after which no probe is listed and every function probed holds
its own code object again.
"""

from __future__ import annotations

import dis
import sys
from collections.abc import Iterator
from types import FrameType, FunctionType, ModuleType
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest import targets
from tests.kselftest.conftest import T
from tests.testenv import OPTIMIZED

FUNCTION_FORK = f"{T}:kernel_clone"


def _events(fs: TraceFS) -> list[str]:
    return fs.read("kprobe_events").splitlines()


def test_kprobe_insn_boundary(fs: TraceFS) -> None:
    code = targets.kernel_clone.__code__
    accepted: list[int] = []
    for i in range(256):
        try:
            fs.write("kprobe_events", f"p {FUNCTION_FORK}+{i}", append=True)
        except TraceWriteError:
            continue
        accepted.append(i)
    starts = {i.offset for i in dis.get_instructions(code)}
    assert accepted and set(accepted) <= starts
    assert len(_events(fs)) == len(accepted)
    fs.write("events/pykprobes/enable", "1")
    targets.kernel_clone(1, 2)
    fs.write("events/pykprobes/enable", "0")
    # A function without branches runs each of its instructions once.
    assert [e.hits for e in fs.events.values()] == [1] * len(accepted)
    fs.write("kprobe_events", "")
    kp.wait_for_kprobe_optimizer()
    assert kp.list_kprobes() == ""
    assert targets.kernel_clone.__code__ is code


def _functions(modules: list[ModuleType]) -> Iterator[tuple[FunctionType, str]]:
    """Functions defined in `modules` (module-level and methods), with their symbol."""
    for mod in modules:
        for value in vars(mod).values():
            found: list[Any] = [value]
            if isinstance(value, type) and value.__module__ == mod.__name__:
                found = list(vars(value).values())
            for item in found:
                item = getattr(item, "__func__", item)
                if isinstance(item, FunctionType) and item.__module__ == mod.__name__ \
                        and "<" not in item.__qualname__:
                    yield item, f"{mod.__name__}:{item.__qualname__}"


def test_multiple_kprobes(fs: TraceFS) -> None:
    import calendar
    import colorsys
    import difflib
    import fractions
    import ipaddress
    import shlex
    import statistics

    chosen: dict[str, FunctionType] = {}
    modules = [difflib, fractions, statistics, calendar, colorsys, ipaddress, shlex]
    for func, symbol in _functions(modules):
        chosen.setdefault(symbol, func)
    codes = {symbol: func.__code__ for symbol, func in chosen.items()}
    n = 0
    for symbol in chosen:
        try:
            fs.write("kprobe_events", f"p {symbol}+0", append=True)
        except TraceWriteError:
            continue
        n += 1
        if n == 256:
            break
    assert len(_events(fs)) == 256
    fs.write("events/pykprobes/enable", "1")
    fs.write("events/pykprobes/enable", "0")
    fs.write("kprobe_events", "")
    kp.wait_for_kprobe_optimizer()
    assert kp.list_kprobes() == ""
    assert all(func.__code__ is codes[symbol] for symbol, func in chosen.items())


@pytest.mark.skipif(not OPTIMIZED, reason="capability: this run keeps optimization off for "
                                          "the whole suite")
def test_kprobe_opt_types(fs: TraceFS) -> None:
    kp.set_optimization(True)
    for i in range(256):
        try:
            fs.write("kprobe_events", f"p:testprobe {FUNCTION_FORK}+{i}")
        except TraceWriteError:
            continue
        fs.write("events/pykprobes/enable", "1")
        targets.kernel_clone(1)
        kp.wait_for_kprobe_optimizer()
        probe = [line for line in kp.list_kprobes().splitlines() if FUNCTION_FORK in line]
        fs.write("events/pykprobes/enable", "0")
        fs.write("kprobe_events", "")
        if any("[OPTIMIZED]" in line for line in probe):
            return
    pytest.fail("no offset of kernel_clone was optimized")


class _FunctionTracer:
    """The function tracer with set_ftrace_filter = kernel_clone: `kernel_clone <- caller`."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is targets.kernel_clone.__code__:
            back = frame.f_back
            self.lines.append(f"kernel_clone <- {back.f_code.co_name if back else '?'}")

    def on(self) -> None:
        sys.setprofile(self)

    def off(self) -> None:
        sys.setprofile(None)


def test_kprobe_ftrace(fs: TraceFS) -> None:
    tracer = _FunctionTracer()
    fs.write("kprobe_events", f"p:testprobe {FUNCTION_FORK}")

    def forked() -> tuple[bool, bool]:
        fs.write("trace", "")
        tracer.lines.clear()
        targets.kernel_clone(1)
        return "testprobe" in fs.read("trace"), bool(tracer.lines)

    try:
        fs.write("events/pykprobes/testprobe/enable", "1")  # kprobe on / ftrace off
        assert forked() == (True, False)
        tracer.on()  # kprobe on / ftrace on
        assert forked() == (True, True)
        fs.write("events/pykprobes/testprobe/enable", "0")  # kprobe off / ftrace on
        assert forked() == (False, True)
        fs.write("events/pykprobes/testprobe/enable", "1")  # kprobe on / ftrace on
        assert forked() == (True, True)
        tracer.off()  # kprobe on / ftrace off
        assert forked() == (True, False)
    finally:
        tracer.off()
