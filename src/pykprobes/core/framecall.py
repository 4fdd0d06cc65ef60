"""A compiled call served by a breakpoint: `frame_call(record, frame, names)` calls a
probe's compiled record (core/arch.py CompiledCall: an event's recorder) with the values
of `names` in the probed frame, as rewritten code would load them, and returns its result:
False when it recorded, True when the careful path must run (the recorder refused, a name
is unbound, anything failed). Never raises.

Core/site.py calls it from a breakpoint hit at a function's entry whose one probe offers a
compiled call, instead of the probe's handler (which would fetch the same values through
Regs, f_locals and the event's fetchargs). The C twin (`_rethook.frame_call`, built with
the kretprobe fast path) reads each variable with PyFrame_GetVar (3.12+), without a
f_locals snapshot; this Python twin reads `frame.f_locals`.
"""

from __future__ import annotations

from collections.abc import Callable
from types import FrameType

from pykprobes.core import rethook

__all__ = ["frame_call"]


def _frame_call(record: Callable[..., bool], frame: FrameType, names: tuple[str, ...]) -> bool:
    try:
        variables = frame.f_locals
        values = [variables[name] for name in names]
    except Exception:  # noqa: BLE001 - never raises: the careful path fetches instead
        return True
    try:
        return record(*values) is not False
    except Exception:  # noqa: BLE001 - a recorder never raises; if one did: not recorded
        return True


_c = rethook.C_MODULE
frame_call: Callable[[Callable[..., bool], FrameType, tuple[str, ...]], bool] = (
    _frame_call if _c is None else _c.frame_call)
