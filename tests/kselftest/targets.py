"""The functions the kernel's selftests probe, under their kernel names, for the ports in this
package (`tests.kselftest.targets:vfs_read` stands for the kernel's `vfs_read`). Kept in their
own module so that the definitions can name them."""

from __future__ import annotations

from typing import Any


class File:
    """What vfs_read reads: a name and a position."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pos = 0


def vfs_read(file: File, buf: bytearray, count: int, pos: int) -> int:
    file.pos = pos + count
    return count


def vfs_open(path: str, file: File) -> int:
    path = "rebound"  # the parameter rebound before the return: $arg1 at exit is the entry's
    return len(path) + len(file.name)


def kernel_clone(flags: int, stack: int = 0) -> int:
    return flags + stack


def do_exit(code: int) -> int:
    return code


def kfree(objp: object) -> None:
    return None


def tracefs_create_dir(name: str, parent: Any = None) -> str:
    return name


def with_every_kind(a: int, /, b: int, c: int = 3, *args: int, k: int, **kw: int) -> int:
    """Positional-only, positional, defaulted, *args, keyword-only, **kwargs."""
    return a + b + c + sum(args) + k + sum(kw.values())


def outer(x: int) -> int:
    def inner(y: int) -> int:
        return y + 1

    return inner(x)


# Two functions whose qualname is one and the same (the kernel's non-unique symbol).
lam1 = lambda q: q  # noqa: E731 - a lambda is the point
lam2 = lambda q: q + 1  # noqa: E731
