"""What a Python user would use instead of a probe, each as a benchmark technique.

Every technique runs the same handler, `handler()`, which counts its calls in `HITS`, so that
a run whose probe did not fire the expected number of times is caught (docs/architecture.md,
"Costs").
The raw injected bytecode is written here with the `bytecode` library directly (the
per-version call sequences measured before the design), not through pykprobes' rewrite arch,
so that the peer stays the same whatever the arch's internals become.

Runs in the benchmarked interpreter (CPython >= 3.11).
"""

from __future__ import annotations

import dis
import sys
from collections.abc import Callable
from types import CodeType, FunctionType
from typing import Any

HITS = 0


def handler(a: object = None, b: object = None, c: object = None) -> None:
    """The probe handler of every technique: counts the hit, nothing else."""
    global HITS
    HITS += 1


def reset_hits() -> None:
    global HITS
    HITS = 0


def hits() -> int:
    return HITS


# --------------------------------------------------------------------------- installs
#
# An install takes the fresh target function and returns (callable the loop calls,
# teardown). It raises Unavailable (with the reason) where the technique does not exist.


class Unavailable(Exception):
    """The technique does not exist on this interpreter (or its library is missing)."""


Install = Callable[[FunctionType], tuple[Callable[..., Any], Callable[[], None]]]


def _nothing() -> None:
    pass


def install_closure(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    """A decorator's closure: handler(args, kwargs), then the function."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        handler(args, kwargs)
        return fn(*args, **kwargs)

    return wrapper, _nothing


def install_closure_exact(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    """The cheapest closure: the function's own signature, written by hand."""

    def wrapper(a: Any, b: Any) -> Any:
        handler(a, b)
        return fn(a, b)

    return wrapper, _nothing


def install_wrapt(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    try:
        import wrapt
    except ImportError as exc:
        raise Unavailable(f"wrapt is not installed ({exc})") from None

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        handler(args, kwargs)
        return wrapped(*args, **kwargs)

    return wrapt.FunctionWrapper(fn, wrapper), _nothing


def install_setprofile(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    code = fn.__code__

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            handler(frame)

    if sys.getprofile() is not None:
        raise RuntimeError("a profile function is already set")
    sys.setprofile(profile)
    return fn, _clear_profile


def _clear_profile() -> None:
    sys.setprofile(None)


def install_settrace(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    code = fn.__code__

    def trace(frame: Any, event: str, arg: Any) -> None:
        if frame.f_code is code:
            handler(frame)
        return None  # no local tracing: 'call' events only

    if sys.gettrace() is not None:
        raise RuntimeError("a trace function is already set")
    sys.settrace(trace)
    return fn, _clear_trace


def _clear_trace() -> None:
    sys.settrace(None)


# --------------------------------------------------------------------------- sys.monitoring


def _free_tool_id() -> int:
    mon = getattr(sys, "monitoring", None)
    if mon is None:
        raise Unavailable("sys.monitoring does not exist before 3.12 (PEP 669)")
    # pykprobes claims 4, then 3: take another one.
    for tool in (5, 2, 1, 0):
        if mon.get_tool(tool) is None:
            return tool
    raise RuntimeError("no free sys.monitoring tool id")


def _monitoring(
    fn: FunctionType, event_name: str, make_cb: Callable[[Any], Callable[..., Any]]
) -> tuple[Callable[..., Any], Callable[[], None]]:
    tool = _free_tool_id()
    mon = sys.monitoring  # type: ignore[attr-defined]
    event = getattr(mon.events, event_name)
    code = fn.__code__
    mon.use_tool_id(tool, "pykprobes-bench")
    mon.register_callback(tool, event, make_cb(mon))
    mon.set_local_events(tool, code, event)

    def teardown() -> None:
        mon.set_local_events(tool, code, 0)
        mon.register_callback(tool, event, None)
        mon.free_tool_id(tool)

    return fn, teardown


def install_monitoring_start(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    """PY_START, local to the function's code; the callback calls the handler."""

    def make(mon: Any) -> Callable[..., Any]:
        def on_start(code: CodeType, offset: int) -> None:
            handler(code, offset)

        return on_start

    return _monitoring(fn, "PY_START", make)


def install_monitoring_instruction(
    fn: FunctionType,
) -> tuple[Callable[..., Any], Callable[[], None]]:
    """INSTRUCTION, local; DISABLE for every other offset (as pykprobes' breakpoint does)."""
    target = offset_of(fn.__code__, "BINARY_OP")

    def make(mon: Any) -> Callable[..., Any]:
        disable = mon.DISABLE

        def on_instruction(code: CodeType, offset: int) -> Any:
            if offset == target:
                handler(code, offset)
                return None
            return disable

        return on_instruction

    return _monitoring(fn, "INSTRUCTION", make)


def install_monitoring_line(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    """LINE, local; DISABLE for every other line."""
    target = fn.__code__.co_firstlineno + 1

    def make(mon: Any) -> Callable[..., Any]:
        disable = mon.DISABLE

        def on_line(code: CodeType, line: int) -> Any:
            if line == target:
                handler(code, line)
                return None
            return disable

        return on_line

    return _monitoring(fn, "LINE", make)


def install_monitoring_return(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
    """PY_RETURN, local; the callback calls the handler with the value."""

    def make(mon: Any) -> Callable[..., Any]:
        def on_return(code: CodeType, offset: int, value: object) -> None:
            handler(value)

        return on_return

    return _monitoring(fn, "PY_RETURN", make)


def install_inject_entry_return(
    fn: FunctionType,
) -> tuple[Callable[..., Any], Callable[[], None]]:
    """Raw injected bytecode at both ends of one function: handler() after RESUME and
    handler(rv) before RETURN_VALUE (what a kretprobe's entry and return hooks are)."""
    _, restore_entry = install_inject("entry")(fn)
    _, restore_return = install_inject("return")(fn)

    def teardown() -> None:
        restore_return()  # back to the entry-injected code ...
        restore_entry()  # ... and to the original

    return fn, teardown


# --------------------------------------------------------------------------- injection


def offset_of(code: CodeType, opname: str) -> int:
    for ins in dis.get_instructions(code):
        if ins.opname == opname:
            return ins.offset
    raise ValueError(f"no {opname} in {code.co_qualname}")


def call_ops(func: object, args: list[Any], nargs: int) -> list[Any]:
    """Instructions that call the constant `func` with the `nargs` values the instruction
    list `args` pushes, leaving its result on the stack (the injected call of
    docs/architecture.md, "Costs")."""
    from bytecode import Instr

    version = sys.version_info[:2]
    if version == (3, 11):
        return [Instr("PUSH_NULL"), Instr("LOAD_CONST", func), *args,
                Instr("PRECALL", nargs), Instr("CALL", nargs)]
    if version == (3, 12):
        return [Instr("PUSH_NULL"), Instr("LOAD_CONST", func), *args, Instr("CALL", nargs)]
    if version in ((3, 13), (3, 14), (3, 15)):
        # 3.13 put the callable below its NULL (gh-107788); 3.14 and 3.15 kept that order.
        return [Instr("LOAD_CONST", func), Instr("PUSH_NULL"), *args, Instr("CALL", nargs)]
    raise Unavailable(f"no call sequence written for CPython {version[0]}.{version[1]}")


def inject(
    fn: FunctionType, where: str, make_ops: Callable[[Any], list[Any]]
) -> CodeType:
    """A copy of fn's code with `make_ops(location)` inserted: after RESUME (`entry`),
    before the first BINARY_OP (`offset`) or before the RETURN_VALUE (`return`)."""
    try:
        from bytecode import Bytecode, Instr
    except ImportError as exc:
        raise Unavailable(f"bytecode is not installed ({exc})") from None
    bc = Bytecode.from_code(fn.__code__)
    for i, ins in enumerate(bc):
        if not isinstance(ins, Instr):
            continue
        if where == "entry" and ins.name == "RESUME":
            at = i + 1
            break
        if where == "offset" and ins.name == "BINARY_OP":
            at = i
            break
        if where == "return" and ins.name == "RETURN_VALUE":
            at = i
            break
    else:
        raise ValueError(f"no place for {where} in {fn.__code__.co_qualname}")
    location = bc[at].location if isinstance(bc[at], Instr) else None
    ops = make_ops(location)
    bc[at:at] = ops
    return bc.to_code()


def _with_location(ops: list[Any], location: Any) -> list[Any]:
    for op in ops:
        op.location = location
    return ops


def install_inject(where: str, func: Callable[..., Any] = handler) -> Install:
    """Raw injected bytecode: a call of `func` at entry, before BINARY_OP, or with the
    value being returned before RETURN_VALUE."""
    from_return = where == "return"

    def install(fn: FunctionType) -> tuple[Callable[..., Any], Callable[[], None]]:
        from bytecode import Instr

        def make(location: Any) -> list[Any]:
            # handler(rv): the return value is below what the call pushes (NULL + callable).
            args = [Instr("COPY", 3)] if from_return else []
            ops = [*call_ops(func, args, 1 if from_return else 0), Instr("POP_TOP")]
            return _with_location(ops, location)

        original = fn.__code__
        fn.__code__ = inject(fn, where, make)

        def teardown() -> None:
            fn.__code__ = original

        return fn, teardown

    return install
