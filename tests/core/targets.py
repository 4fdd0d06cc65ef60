"""Functions the core tests probe. Kept in their own module so that the tests can name
them by symbol (`tests.core.targets:...`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

DIV_FACTOR = 3


def kprobe_target(value: int) -> int:
    return value // DIV_FACTOR


def kprobe_target2(value: int) -> int:
    return (value // DIV_FACTOR) + 9


def kprobe_recursed_target(value: int) -> int:
    return value // DIV_FACTOR


def add(a: int, b: int) -> int:
    c = a + b
    return c


def loop_sum(n: int) -> int:
    total = 0
    for i in range(n):
        total += i  # LOOP-BODY
    return total


def make_adder(k: int) -> Callable[[int], int]:
    def adder(x: int) -> int:
        return x + k

    return adder


def outer(x: int) -> int:
    def inner(y: int) -> int:
        return y * 2

    return inner(x) + 1


def logged(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    return wrapper


@logged
def decorated(x: int) -> int:
    return x - 1


square = lambda x: x * x  # noqa: E731 - a module-level lambda is a resolution case


class Widget:
    def __init__(self, size: int) -> None:
        self._size = size

    def grow(self, by: int) -> int:
        self._size += by
        return self._size

    @classmethod
    def make(cls, size: int) -> Widget:
        return cls(size)

    @staticmethod
    def unit() -> int:
        return 1

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value


def counter(n: int) -> Iterator[int]:
    for i in range(n):  # noqa: UP028 - tests probe the loop's own instructions
        yield i


def recurse(n: int) -> int:
    return 0 if n == 0 else 1 + recurse(n - 1)


def raises(x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return x


def double_all(xs: list[int]) -> int:
    return sum(x * 2 for x in xs)


def classify_all(flags: list[bool]) -> list[str]:
    def classify(flag: bool) -> str:
        if flag:  # noqa: SIM108 - the test probes the else branch's own line
            kind = "yes"
        else:
            kind = "no"  # ELSE-BRANCH
        return kind

    return [classify(f) for f in flags]


def closures_made_while_running(n: int) -> Iterator[int]:
    for i in range(n):

        def made(i: int = i) -> int:
            return i * 10

        yield made()
