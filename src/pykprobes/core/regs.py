"""`Regs`: what a handler sees of the probed frame (the kernel's `struct pt_regs`).

Built on every hit, so it is a slots record whose expensive views (`args`, `locals`) are
computed only when a handler asks for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import CodeType, FrameType
from typing import Any, Final

# Code flags (Include/cpython/code.h); spelled out so that the hot path does not import inspect.
_CO_VARARGS: Final = 0x04
_CO_VARKEYWORDS: Final = 0x08


class Regs:
    __slots__ = ("exception", "frame", "offset", "retval")

    def __init__(self, frame: FrameType, offset: int) -> None:
        #: The probed frame.
        self.frame = frame
        #: The probe's bytecode offset in the original code object.
        self.offset = offset
        #: Set for return probes.
        self.retval: Any = None
        self.exception: BaseException | None = None

    @property
    def code(self) -> CodeType:
        return self.frame.f_code

    @property
    def lineno(self) -> int:
        return self.frame.f_lineno

    @property
    def locals(self) -> Mapping[str, Any]:
        """A snapshot of the frame's local variables."""
        return dict(self.frame.f_locals)

    @property
    def args(self) -> Mapping[str, Any]:
        """The function's arguments by name, as bound now (`*args`/`**kwargs` included)."""
        code = self.frame.f_code
        nargs = code.co_argcount + code.co_kwonlyargcount
        if code.co_flags & _CO_VARARGS:
            nargs += 1
        if code.co_flags & _CO_VARKEYWORDS:
            nargs += 1
        names = code.co_varnames[:nargs]
        f_locals = self.frame.f_locals
        return {name: f_locals[name] for name in names if name in f_locals}

    def __repr__(self) -> str:
        return f"<Regs {self.frame.f_code.co_qualname}+{self.offset} line {self.lineno}>"
