"""A Ctrl-C the program catches leaves every probe working (issue 16, item 3).

A SIGINT (or a handler raising KeyboardInterrupt) can be delivered while a breakpoint's
callback runs: the program gets its KeyboardInterrupt, and its probes go on hitting. With
the `sys.settrace` arch (3.11) an exception leaving the trace function made CPython remove
it from the thread (sysmodule.c trace_trampoline), every breakpoint of the thread dead
while still listed."""

from __future__ import annotations

import _thread
from collections.abc import Callable

import pytest

import pykprobes as kp
from tests.core import targets


def _post(p: kp.Kprobe, regs: kp.Regs) -> None:
    pass  # a post-handler keeps the probe a breakpoint, whatever the arch run


def _interrupt(p: kp.Kprobe, regs: kp.Regs) -> None:
    # The SIGINT handler runs at the next check of the eval loop: inside this handler.
    _thread.interrupt_main()


def _raise(p: kp.Kprobe, regs: kp.Regs) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt", [_interrupt, _raise], ids=["SIGINT", "raised"])
def test_a_caught_keyboard_interrupt_leaves_the_breakpoints_armed(
    interrupt: Callable[[kp.Kprobe, kp.Regs], None],
) -> None:
    hits: list[int] = []

    def pre(p: kp.Kprobe, regs: kp.Regs) -> None:
        hits.append(regs.offset)
        if len(hits) == 1:
            interrupt(p, regs)

    p = kp.Kprobe(symbol_name="tests.core.targets:add", pre_handler=pre, post_handler=_post)
    other = kp.Kprobe(symbol_name="tests.core.targets:kprobe_target", post_handler=_post)
    kp.register_kprobes([p, other])
    try:
        with pytest.raises(KeyboardInterrupt):
            targets.add(1, 2)
        assert len(hits) == 1
        assert targets.add(2, 3) == 5
        assert targets.kprobe_target(9) == 3
        assert len(hits) == 2 and p.nhit == 2 and other.nhit == 1
        # Deeper: the interrupt leaves a frame further down, caught further up.
        assert [targets.add(i, i) for i in range(3)] == [0, 2, 4]
        assert p.nhit == 5
    finally:
        kp.unregister_kprobes([p, other])
