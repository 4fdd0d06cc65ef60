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


#: The kernel's error codes and messages (kernel/trace/trace_probe.h ERRORS), in its words.
#: Every ParseError names one of these codes.
ERRORS: dict[str, str] = {
    "BAD_FETCH_ARG": "Invalid fetch argument",
}


class ParseError(Exception):
    """A bad definition: the code from ERRORS, the column of the bad part, and the text."""

    def __init__(self, code: str, pos: int, text: str) -> None:
        super().__init__(ERRORS.get(code, code))
        self.code = code
        self.pos = pos
        self.text = text

    @property
    def message(self) -> str:
        return ERRORS.get(self.code, self.code)

    def caret(self) -> str:
        """The definition and a caret under the bad column, as error_log shows them."""
        return f"{self.text}\n{' ' * self.pos}^"

    def __str__(self) -> str:
        return f"{self.message}\n{self.caret()}"
