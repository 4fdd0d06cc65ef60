"""Return probes built into rewritten code (the kernel's kretprobe trampoline).

With `returns=(on_return, on_unwind)`, inject.py adds to the code the return sequences of
assembly.py:

* before each RETURN_VALUE (and RETURN_CONST, 3.12+), a call `on_return(value)`;
* one exception handler after the end of the code, covering every instruction after the
  prologue that no exception-table entry of the code covers: it calls `on_unwind(exc)`
  and re-raises `exc` unchanged.

The exception table is flat (each instruction has at most one handler, CPython's
exceptions.md), so "outermost" means "filling the gaps": an exception first meets the
code's own handlers exactly as before; only what leaves them (through a handler's final
RERAISE, which is itself in a gap, or from an instruction no handler covers) reaches ours.

This module holds what is not an instruction sequence: which code objects may get return
sequences, and the StopIteration conversion that 3.11 does outside the frame.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import CodeType
from typing import Final

#: Code that makes a generator, coroutine or async generator when called.
GENERATOR_LIKE: Final = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def refuse_returns(code: CodeType) -> str | None:
    """Why `code` cannot get return sequences (None: it can).

    Only function bodies have a frame that returns to a caller: module, class-body and
    exec/eval code (no CO_OPTIMIZED) run once for their side effects, and the core never
    asks for their returns."""
    if not code.co_flags & inspect.CO_OPTIMIZED:
        return f"{code.co_qualname}: return probes are for functions, not module or class bodies"
    return None


def _kind(flags: int) -> str:
    # The type of the object RETURN_GENERATOR makes follows these flags
    # (3.11 ceval.c _Py_MakeCoro), and gen_send_ex2's message follows that type.
    if flags & inspect.CO_COROUTINE:
        return "coroutine"
    if flags & inspect.CO_ASYNC_GENERATOR:
        return "async generator"
    return "generator"


def _make_stop_iteration_error(kind: str) -> Callable[[BaseException], BaseException]:
    async_gen = kind == "async generator"
    stop_message = f"{kind} raised StopIteration"

    def stop_iteration_error(exc: BaseException) -> BaseException:
        """The exception the caller of a 3.11 generator gets when `exc` leaves its frame:
        gen_send_ex2 (genobject.c) turns a StopIteration, and in an async generator a
        StopAsyncIteration, into `RuntimeError(message)` with the original as both cause
        and context (_PyErr_FormatFromCause); 3.12 does the same in the frame
        (ceval.c stopiteration_error)."""
        if isinstance(exc, StopIteration):
            message = stop_message
        elif async_gen and isinstance(exc, StopAsyncIteration):
            message = "async generator raised StopAsyncIteration"
        else:
            return exc
        error = RuntimeError(message)
        error.__cause__ = exc  # also sets __suppress_context__, as PyException_SetCause
        error.__context__ = exc
        return error

    return stop_iteration_error


#: One converter per kind of generator (3.11 only), shared by every code object.
STOP_ITERATION_ERROR: Final = {
    kind: _make_stop_iteration_error(kind) for kind in ("generator", "coroutine", "async generator")
}


def stop_iteration_error(code: CodeType) -> Callable[[BaseException], BaseException]:
    """The converter for generator-like `code`."""
    return STOP_ITERATION_ERROR[_kind(code.co_flags)]
