"""Is a code object still being run? (The optimizer's `synchronize_rcu_tasks`.)

After the core switched every holder of a code object to a rewritten one, frames that had
already started keep running the old code. It may be forgotten (and its breakpoints removed)
only once no frame runs it any more. A frame runs it if it is

* on a thread's stack: `sys._current_frames()` gives each thread's innermost frame, and the
  `f_back` chain the rest (a running generator's frame is on its thread's stack too);
* the frame of a suspended generator, coroutine or async generator, or of one created but
  not yet started: it will run the old code when resumed. Those frames are on no stack;
  they live inside the generator object, which refers to the code through its frame
  (3.11: also `gi_code`; 3.12: the frame's `f_code`; 3.13-3.15: the frame's
  `f_executable`, a stack reference the generator's traverse visits), so
  `gc.get_referrers(code)` finds it. That walks the whole heap, so it is done only for code
  that can make a generator (its CO_GENERATOR, CO_COROUTINE, CO_ASYNC_GENERATOR or
  CO_ITERABLE_COROUTINE flag is set): other code can only run on a stack.

Frames of other interpreters (PEP 684) and of stackful coroutine libraries (greenlet) are
not visible from here. The JIT (3.13+) changes nothing here: an executor runs a frame of the
code object it was compiled from, and that frame is on its thread's stack or in its
generator like any other (tests/core/test_jit.py).
"""

from __future__ import annotations

import gc
import inspect
import sys
from types import AsyncGeneratorType, CodeType, CoroutineType, FrameType, GeneratorType
from typing import Final

_GENERATOR_FLAGS: Final = (
    inspect.CO_GENERATOR
    | inspect.CO_COROUTINE
    | inspect.CO_ASYNC_GENERATOR
    | inspect.CO_ITERABLE_COROUTINE
)


def on_a_stack(code: CodeType) -> bool:
    """True if a frame of some thread's stack runs this very code object."""
    for top in sys._current_frames().values():
        frame: FrameType | None = top
        while frame is not None:
            if frame.f_code is code:
                return True
            frame = frame.f_back
    return False


def suspended(code: CodeType) -> bool:
    """True if a generator, coroutine or async generator that has not finished runs it."""
    if not code.co_flags & _GENERATOR_FLAGS:
        return False
    for obj in gc.get_referrers(code):
        # The referrer may hold the code for another reason (a local variable of its frame,
        # say): check that it is its own code, and that its frame is not cleared (a finished
        # generator drops its frame: gi_frame becomes None).
        kind = type(obj)
        if kind is GeneratorType:
            own, alive = obj.gi_code is code, obj.gi_frame is not None
        elif kind is CoroutineType:
            own, alive = obj.cr_code is code, obj.cr_frame is not None
        elif kind is AsyncGeneratorType:
            own, alive = obj.ag_code is code, obj.ag_frame is not None
        else:
            continue
        if own and alive:
            return True
    return False


def frames_running(code: CodeType) -> bool:
    # The stacks first: cheap, and a running generator is found there too.
    return on_a_stack(code) or suspended(code)
