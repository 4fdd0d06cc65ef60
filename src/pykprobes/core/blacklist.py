"""What can never be probed (the kernel's NOKPROBE_SYMBOL and kprobe_blacklist).

pykprobes itself, and the interpreter code it runs while a probe is being hit, registered
or armed: probing those would recurse (a hit inside the hit path) or deadlock (a probe in
the import machinery our module notifier runs in).
"""

from __future__ import annotations

from collections.abc import Callable
from types import CodeType, FunctionType
from typing import Any, Final, TypeVar

#: Modules (and their submodules) that are never probed, with the reason.
BLACKLIST_MODULES: Final[dict[str, str]] = {
    "pykprobes": "pykprobes itself",
    "bytecode": "the rewrite mechanism's assembler",
    "importlib": "the import machinery the module notifier runs in",
    "_frozen_importlib": "the import machinery the module notifier runs in",
    "_frozen_importlib_external": "the import machinery the module notifier runs in",
    "threading": "the optimizer's thread and the table lock",
    "_weakrefset": "weak references kept by the kprobes table",
    "weakref": "weak references kept by the kprobes table",
    "warnings": "handler faults are reported through warnings",
    # 3.14+: warnings.py re-exports its Python code from _py_warnings (showwarning, ...).
    "_py_warnings": "handler faults are reported through warnings",
    "dis": "the breakpoint arches read exception tables with dis",
    "opcode": "registration decodes instructions with opcode's tables (insn.py)",
}

_nokprobe_codes: dict[int, CodeType] = {}

F = TypeVar("F", bound=Callable[..., Any])


def nokprobe(obj: F) -> F:
    """Decorator: never probe this function (or every method of this class).

    The analogue of `NOKPROBE_SYMBOL()`: registering a probe on it fails with EINVAL.
    """
    if isinstance(obj, type):
        for value in vars(obj).values():
            func = getattr(value, "__func__", value)
            if isinstance(value, property):
                for f in (value.fget, value.fset, value.fdel):
                    if isinstance(f, FunctionType):
                        _nokprobe_codes[id(f.__code__)] = f.__code__
            elif isinstance(func, FunctionType):
                _nokprobe_codes[id(func.__code__)] = func.__code__
        return obj
    func = getattr(obj, "__func__", obj)
    code = getattr(func, "__code__", None)
    if not isinstance(code, CodeType):
        raise TypeError(f"@nokprobe needs a function or a class, not {type(obj).__name__}")
    _nokprobe_codes[id(code)] = code
    return obj


def blacklist_reason(module: str, code: CodeType | None) -> str | None:
    """Why this module or code may not be probed, or None."""
    top = module.partition(".")[0]
    reason = BLACKLIST_MODULES.get(module) or BLACKLIST_MODULES.get(top)
    if reason is not None:
        return reason
    if code is not None and _nokprobe_codes.get(id(code)) is code:
        return "marked @nokprobe"
    return None


def blacklist_lines() -> list[str]:
    """The `kprobes/blacklist` view."""
    lines = [f"{name}.*\t{why}" for name, why in BLACKLIST_MODULES.items()]
    lines += [f"0x{key:016x}\t{code.co_qualname}" for key, code in _nokprobe_codes.items()]
    return lines
