"""The one error hierarchy of pykprobes.

A `KprobeError` carries the errno the kernel would return (`-EINVAL`, `-ENOENT`, ...), so that
callers can branch on `.errno` exactly as kernel code branches on the return value.
"""

from __future__ import annotations

import errno as _errno
import os


class KprobeError(Exception):
    """A registration-time error, with the kernel's errno (`errno.EINVAL`, ...)."""

    errno: int

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.args[0]}" if self.args else f"[{name}] {os.strerror(self.errno)}"


def einval(message: str) -> KprobeError:
    return KprobeError(_errno.EINVAL, message)


def enoent(message: str) -> KprobeError:
    return KprobeError(_errno.ENOENT, message)
