"""The sys.monitoring breakpoint arch over code the JIT has compiled (PYTHON_JIT=1, 3.14+).

Each test first shows that the loop runs as JIT code (sys._jit.is_active() in a function
the loop calls, which the JIT traces into the loop's trace), then arms a probe from inside
that running loop: the hits must be exact from the next instruction on, as without the JIT.
`dev.py test` runs the suite with PYTHON_JIT=1 on a Python built with a JIT
("breakpoint-jit", "optimized-jit")."""

from __future__ import annotations

import dis
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

_jit = getattr(sys, "_jit", None)
pytestmark = pytest.mark.skipif(
    not hasattr(sys, "monitoring") or _jit is None or not _jit.is_enabled(),
    reason="capability: the JIT is not on in this interpreter (PYTHON_JIT=1 where built in)",
)

if hasattr(sys, "monitoring"):
    from pykprobes.arch.monitoring import MonitoringArch

N = 20_000  # iterations: far above the JIT's warm-up of a loop

SRC = """
def active():
    return is_active()

def add(a, b):
    return a + b

def spin(n, at, arm):
    t = 0
    jitted = 0
    for i in range(n):
        jitted += active()
        if i == at:
            arm()
        t = add(t, i)
    return t, jitted
"""


def fresh() -> tuple[Any, Any]:
    """New `spin` and `add` functions (code objects no test has probed)."""
    namespace: dict[str, Any] = {"is_active": _jit.is_active if _jit else None}
    exec(compile(SRC, "<jit>", "exec"), namespace)
    return namespace["spin"], namespace["add"]


@pytest.fixture
def arch() -> Iterator[MonitoringArch]:
    a = MonitoringArch()
    yield a
    a.close()


def _plus(fn: Any) -> int:
    return next(
        i.offset for i in dis.get_instructions(fn) if i.opname == "BINARY_OP" and i.argrepr == "+"
    )


def _nothing() -> None:
    pass


@pytest.fixture
def loop() -> tuple[Any, Any, int]:
    """(spin, add, what spin(N, ...) returns), once spin's loop is shown to run as JIT code."""
    spin, add = fresh()
    total, jitted = spin(N, -1, _nothing)
    assert jitted > N // 2, "the JIT did not compile the loop: the test shows nothing"
    return spin, add, total


def test_a_probe_armed_inside_a_jitted_loop_hits_every_later_iteration(
    arch: MonitoringArch, loop: tuple[Any, Any, int]
) -> None:
    spin, add, total = loop
    hits: list[int] = []
    off = _plus(add)
    arm: Callable[[], None] = lambda: arch.arm(  # noqa: E731
        add.__code__, off, lambda fr, o: hits.append(o), None
    )
    assert spin(N, N // 2, arm)[0] == total
    # The iteration that armed it calls add after the arm: N - N // 2 hits.
    assert len(hits) == N - N // 2 and set(hits) == {off}
    arch.disarm(add.__code__, off)
    spin(N, -1, _nothing)
    assert len(hits) == N - N // 2


def test_return_hooks_armed_inside_a_jitted_loop_see_every_later_return(
    arch: MonitoringArch, loop: tuple[Any, Any, int]
) -> None:
    spin, add, total = loop
    returns: list[object] = []
    arm: Callable[[], None] = lambda: arch.arm_return(  # noqa: E731
        add.__code__, lambda fr, v: returns.append(v), lambda fr, e: None
    )
    assert spin(N, N // 2, arm)[0] == total
    assert len(returns) == N - N // 2
    assert returns[-1] == total
