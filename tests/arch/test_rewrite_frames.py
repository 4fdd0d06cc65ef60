"""RewriteArch.frames_running: stacks of all threads and suspended generators/coroutines."""

from __future__ import annotations

import threading
import types
from typing import Any

from pykprobes.arch.rewrite import RewriteArch

ARCH = RewriteArch()


def counting_gen(n: int) -> Any:
    yield from range(n)


def test_generator_suspended_mid_body() -> None:
    code = counting_gen.__code__
    assert not ARCH.frames_running(code)
    gen = counting_gen(3)
    # Created, not started: it will run this code when first resumed.
    assert ARCH.frames_running(code)
    assert next(gen) == 0
    assert ARCH.frames_running(code)
    assert list(gen) == [1, 2]
    # Finished: the generator object is still alive, but its frame is gone.
    assert gen.gi_frame is None
    assert not ARCH.frames_running(code)


def test_closed_generator() -> None:
    gen = counting_gen(3)
    next(gen)
    gen.close()
    assert not ARCH.frames_running(counting_gen.__code__)


def test_a_local_holding_the_code_is_not_a_frame_running_it() -> None:
    def holder(code: types.CodeType) -> Any:
        yield code

    gen = holder(counting_gen.__code__)
    next(gen)
    assert not ARCH.frames_running(counting_gen.__code__)
    assert ARCH.frames_running(holder.__code__)
    gen.close()


class Step:
    """An awaitable that suspends a coroutine once."""

    def __await__(self) -> Any:
        yield "suspended"


async def waiting() -> str:
    await Step()
    return "done"


async def async_gen() -> Any:
    await Step()
    yield 1


def test_coroutine_suspended() -> None:
    coro = waiting()
    assert ARCH.frames_running(waiting.__code__)
    assert coro.send(None) == "suspended"
    assert ARCH.frames_running(waiting.__code__)
    try:
        coro.send(None)
    except StopIteration as stop:
        assert stop.value == "done"
    assert not ARCH.frames_running(waiting.__code__)


def test_async_generator_suspended() -> None:
    agen = async_gen()
    step = agen.__anext__()
    assert step.send(None) == "suspended"
    assert ARCH.frames_running(async_gen.__code__)
    try:
        step.send(None)
    except StopIteration as stop:
        assert stop.value == 1
    closing = agen.aclose()
    try:
        closing.send(None)
    except StopIteration:
        pass
    assert not ARCH.frames_running(async_gen.__code__)


def spin(started: threading.Event, stop: threading.Event) -> int:
    started.set()
    n = 0
    while not stop.is_set():
        n += 1
    return n


def test_thread_looping_in_the_function() -> None:
    code = spin.__code__
    started, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=spin, args=(started, stop))
    thread.start()
    try:
        assert started.wait(10)
        assert ARCH.frames_running(code)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert not ARCH.frames_running(code)


def deep(n: int, seen: list[bool]) -> None:
    if n:
        deep(n - 1, seen)
    else:
        seen.append(ARCH.frames_running(deep.__code__))


def test_own_stack_deep_in_recursion() -> None:
    seen: list[bool] = []
    deep(30, seen)
    assert seen == [True]
    assert not ARCH.frames_running(deep.__code__)


def test_rewritten_copy_is_a_different_code_object() -> None:
    new = ARCH.build(counting_gen.__code__, {0: lambda: None}, {}).code
    fn = types.FunctionType(new, globals())
    gen = fn(2)
    next(gen)
    assert ARCH.frames_running(new)
    assert not ARCH.frames_running(counting_gen.__code__)
    gen.close()
    assert not ARCH.frames_running(new)
