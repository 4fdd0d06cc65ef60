"""`Regs`: what a handler sees of the probed frame (the kernel's `struct pt_regs`).

A slots record whose expensive views (`args`, `locals`) are computed only when a handler
asks for them. The careful path builds one per hit; the fast path hands each site's own
`SiteRegs` to its handler, which finds the probed frame only when asked. Either is valid
while the handler runs, as the kernel's pt_regs are (they live on the stack of the hit).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Mapping
from types import CodeType, FrameType
from typing import Any, Final

from pykprobes.core.rethook import hit_frame as _hit_frame

# Code flags (Include/cpython/code.h); spelled out so that the hot path does not import inspect.
_CO_VARARGS: Final = 0x04
_CO_VARKEYWORDS: Final = 0x08

_INVALID: Final = "pykprobes: these regs are valid only while their handler runs (as pt_regs)"


class Regs:
    __slots__ = ("_frame", "exception", "offset", "retval")

    def __init__(self, frame: FrameType, offset: int) -> None:
        self._frame: FrameType | None = frame
        #: The probe's bytecode offset in the original code object.
        self.offset = offset
        #: Set for return probes.
        self.retval: Any = None
        self.exception: BaseException | None = None

    @property
    def frame(self) -> FrameType:
        """The probed frame; reading it once the hit is over raises RuntimeError (the hit
        paths `invalidate()` their Regs)."""
        frame = self._frame
        if frame is None:
            raise RuntimeError(_INVALID)
        return frame

    def invalidate(self) -> None:
        """The hit is over: the Regs keeps no frame alive, and says so when read."""
        self._frame = None

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
        frame = self._frame
        if frame is None:
            return f"<Regs +{self.offset} (hit over)>"
        return f"<Regs {frame.f_code.co_qualname}+{self.offset} line {frame.f_lineno}>"


class CodeIds:
    """Code objects, tested by identity: `id(code) in codes.ids`. A code object's hash is
    computed from its contents at every call (3.11-3.13 cache none): a set of code objects
    costs ~1 us per test on the hit path, a set of ids a few ns. The objects are kept, so
    that no other object can take their ids."""

    __slots__ = ("_keep", "ids")

    def __init__(self, *codes: CodeType) -> None:
        self.ids: set[int] = set()
        self._keep: list[CodeType] = []
        for code in codes:
            self.add(code)

    def add(self, code: CodeType) -> None:
        if id(code) not in self.ids:
            self._keep.append(code)
            self.ids.add(id(code))


#: The code of mechanism callbacks that CPython calls on behalf of the probed frame and that
#: call a hit without its frame (arch/monitoring.py adds its own): the way up from a hit's
#: frame to the probed frame steps over them.
CALLBACK_CODES: Final = CodeIds()


def probed_frame(hit_frame: FrameType) -> FrameType:
    """The probed frame of the hit that runs in `hit_frame` (a trampoline, which rewritten
    code calls, or `Site.pre`, which a mechanism's callback calls): its caller, past the
    callback."""
    frame = hit_frame.f_back
    callbacks = CALLBACK_CODES.ids
    while frame is not None and id(frame.f_code) in callbacks:
        frame = frame.f_back
    if frame is None:
        raise RuntimeError("pykprobes: no probed frame above the hit")
    return frame


#: The optimized hit's handler calls, made by the probed frame itself (core/opthit.py): per
#: rewritten code object (by id, for as long as it lives), each `f_lasti` a frame of it has
#: while it is inside the call of a handler or of the fault report, and the site's Gate.
INLINE_CALLS: Final[dict[int, dict[int, Any]]] = {}


def register_inline_calls(code: CodeType, calls: dict[int, Any]) -> None:
    """`code` (just built) calls handlers inline at these offsets."""
    if not calls:
        return
    key = id(code)
    INLINE_CALLS[key] = calls
    final = weakref.finalize(code, _forget_inline_calls, key, calls)
    final.atexit = False


def _forget_inline_calls(key: int, calls: dict[int, Any]) -> None:
    if INLINE_CALLS.get(key) is calls:
        del INLINE_CALLS[key]


def inline_gate(frame: FrameType) -> Any:
    """The Gate of the optimized hit whose handler `frame` is calling, or None."""
    calls = INLINE_CALLS.get(id(frame.f_code))
    if calls is None:
        return None
    return calls.get(frame.f_lasti)


#: The code of the frames that run handlers on the careful path (core/site.py adds them): a
#: hit frame that called one of them is not a fast-path hit.
CAREFUL_CODES: Final = CodeIds()


class SiteRegs(Regs):
    """A site's reusable Regs, handed to the fast path's handler (core/site.py). Getting a
    frame object costs as much as calling the handler (3.11+ creates it on demand), so
    `frame` is found when asked: the one given by a breakpoint hit, or else the probed
    frame of this Regs' own hit, which is in flight only while the fast path's mark holds
    it (`held[0] is self`). That hit began with no handler running in any thread, so its
    hit frame is the outermost one of the thread's stack, and ran its handler directly:
    a probe hit inside the handler is deeper (and careful); a hit frame that called the
    careful path is another thread's. Read at any other time, `frame` raises."""

    __slots__ = ("_busy", "_held", "_hit_codes", "_trampoline")

    def __init__(
        self,
        offset: int,
        trampoline: CodeType,
        hit_codes: CodeIds,
        held: list[Any],
        busy: Mapping[int, Any],
    ) -> None:
        self.offset = offset
        self.retval = None
        self.exception = None
        self._frame = None
        #: The trampoline's code, tested first: rewritten code calls it directly, so the
        #: probed frame is its caller (the common case, and the hot one: kretprobes read
        #: the frame at every entry).
        self._trampoline = trampoline
        self._hit_codes = hit_codes
        #: The fast path's mark and the careful path's table (core/site.py).
        self._held = held
        self._busy = busy

    @property
    def frame(self) -> FrameType:
        if self._frame is not None:
            return self._frame
        if _hit_frame is not None:
            # The fast path of kretprobes (core/rethook.py) marks its thread in `busy`, and
            # its C twin knows the probed frame without a frame object: made now.
            made = _hit_frame(self)
            if made is not None:
                self._frame = made
                return made
        if self._held[0] is not self:
            raise RuntimeError(_INVALID)
        trampoline = self._trampoline
        hits = self._hit_codes.ids
        nested = bool(self._busy)  # a careful hit may run inside ours: go to the outermost
        found: FrameType | None = None
        callee: FrameType | None = None
        below: FrameType | None = None
        inline = INLINE_CALLS
        f: FrameType | None = sys._getframe(1)
        while f is not None:
            code = f.f_code
            calls = inline.get(id(code))
            if code is trampoline or id(code) in hits or (
                    calls is not None and f.f_lasti in calls):
                found, callee = f, below
                if not nested:
                    break
            below = f
            f = f.f_back
        if found is None or (callee is not None and id(callee.f_code) in CAREFUL_CODES.ids):
            raise RuntimeError(_INVALID)
        if found.f_code is trampoline and found.f_back is not None:
            return found.f_back
        if id(found.f_code) in inline:
            return found  # an inline hit: the probed frame calls the handler itself
        return probed_frame(found)

    def __repr__(self) -> str:
        return f"<SiteRegs +{self.offset}>"
