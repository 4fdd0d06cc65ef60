"""pykprobes: kprobes for the CPython virtual machine.

The public API is loaded lazily (PEP 562): `import pykprobes` imports nothing else, because
the start-up `.pth` hook imports this package first and must cost next to nothing.
"""

from __future__ import annotations

from pykprobes._version import __version__

# Not `from typing import TYPE_CHECKING`: the start-up hook imports this package, and typing
# costs milliseconds to import.
TYPE_CHECKING = False

_EXPORTS: dict[str, str] = {
    "Kprobe": "pykprobes.core.probe",
    "KPROBE_FLAG_GONE": "pykprobes.core.probe",
    "KPROBE_FLAG_DISABLED": "pykprobes.core.probe",
    "KPROBE_FLAG_OPTIMIZED": "pykprobes.core.probe",
    "KPROBE_FLAG_FTRACE": "pykprobes.core.probe",
    "KPROBE_FLAG_EARLY": "pykprobes.core.probe",
    "ProbeAddress": "pykprobes.core.address",
    "Regs": "pykprobes.core.regs",
    "KprobeError": "pykprobes.errors",
    "KprobeFaultWarning": "pykprobes.core.guard",
    "nokprobe": "pykprobes.core.blacklist",
    "resolve_line": "pykprobes.core.lines",
    "line_symbols": "pykprobes.core.lines",
    "code_before_import": "pykprobes.core.lines",
    "register_module_notifier": "pykprobes.core.registry",
    "unregister_module_notifier": "pykprobes.core.registry",
    "register_kprobe": "pykprobes.core.registry",
    "unregister_kprobe": "pykprobes.core.registry",
    "register_kprobes": "pykprobes.core.registry",
    "unregister_kprobes": "pykprobes.core.registry",
    "enable_kprobe": "pykprobes.core.registry",
    "disable_kprobe": "pykprobes.core.registry",
    "get_kprobe": "pykprobes.core.registry",
    "list_kprobes": "pykprobes.core.registry",
    "arm_all_kprobes": "pykprobes.core.registry",
    "disarm_all_kprobes": "pykprobes.core.registry",
    "set_optimization": "pykprobes.core.registry",
    "wait_for_kprobe_optimizer": "pykprobes.core.registry",
    "init_kprobes": "pykprobes.core.registry",
    "kprobes_is_early": "pykprobes.core.registry",
    "Kretprobe": "pykprobes.core.kretprobe",
    "KretprobeInstance": "pykprobes.core.returns",
    "register_kretprobe": "pykprobes.core.kretprobe",
    "unregister_kretprobe": "pykprobes.core.kretprobe",
    "register_kretprobes": "pykprobes.core.kretprobe",
    "unregister_kretprobes": "pykprobes.core.kretprobe",
    "enable_kretprobe": "pykprobes.core.kretprobe",
    "disable_kretprobe": "pykprobes.core.kretprobe",
}

# A literal list, so that type checkers see what the package exports
# (tests/test_house_rules.py checks that it names _EXPORTS).
__all__ = [
    "KPROBE_FLAG_DISABLED",
    "KPROBE_FLAG_EARLY",
    "KPROBE_FLAG_FTRACE",
    "KPROBE_FLAG_GONE",
    "KPROBE_FLAG_OPTIMIZED",
    "Kprobe",
    "KprobeError",
    "KprobeFaultWarning",
    "Kretprobe",
    "KretprobeInstance",
    "ProbeAddress",
    "Regs",
    "__version__",
    "arm_all_kprobes",
    "code_before_import",
    "disable_kprobe",
    "disable_kretprobe",
    "disarm_all_kprobes",
    "enable_kprobe",
    "enable_kretprobe",
    "get_kprobe",
    "init_kprobes",
    "kprobes_is_early",
    "line_symbols",
    "list_kprobes",
    "nokprobe",
    "register_kprobe",
    "register_kprobes",
    "register_kretprobe",
    "register_kretprobes",
    "register_module_notifier",
    "resolve_line",
    "set_optimization",
    "unregister_kprobe",
    "unregister_kprobes",
    "unregister_kretprobe",
    "unregister_kretprobes",
    "unregister_module_notifier",
    "wait_for_kprobe_optimizer",
]

if TYPE_CHECKING:
    from typing import Any

    from pykprobes.core.address import ProbeAddress
    from pykprobes.core.blacklist import nokprobe
    from pykprobes.core.guard import KprobeFaultWarning
    from pykprobes.core.kretprobe import (
        Kretprobe,
        disable_kretprobe,
        enable_kretprobe,
        register_kretprobe,
        register_kretprobes,
        unregister_kretprobe,
        unregister_kretprobes,
    )
    from pykprobes.core.lines import code_before_import, line_symbols, resolve_line
    from pykprobes.core.probe import (
        KPROBE_FLAG_DISABLED,
        KPROBE_FLAG_EARLY,
        KPROBE_FLAG_FTRACE,
        KPROBE_FLAG_GONE,
        KPROBE_FLAG_OPTIMIZED,
        Kprobe,
    )
    from pykprobes.core.registry import (
        arm_all_kprobes,
        disable_kprobe,
        disarm_all_kprobes,
        enable_kprobe,
        get_kprobe,
        init_kprobes,
        kprobes_is_early,
        list_kprobes,
        register_kprobe,
        register_kprobes,
        register_module_notifier,
        set_optimization,
        unregister_kprobe,
        unregister_kprobes,
        unregister_module_notifier,
        wait_for_kprobe_optimizer,
    )
    from pykprobes.core.regs import Regs
    from pykprobes.core.returns import KretprobeInstance
    from pykprobes.errors import KprobeError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pykprobes' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
