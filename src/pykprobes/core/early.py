"""Early kprobes: what the core knows before `init_kprobes()` (the seed's CONFIG_EARLY_KPROBES).

A process is *early* from the moment the boot stage calls `start()` until `init_kprobes()`
converts the early probes (`finish()`); a process whose boot stage never ran is never early.
While early, `register_kprobe()` takes the seed's `register_early_kprobe()` path (in
core/registry.py) and uses what this module preallocates:

* the **early slots** (`CONFIG_NR_EARLY_KPROBES_SLOTS`, 1..64, default 16): a fixed table, one
  slot per early probe, the seed's `DEFINE_EKPROBE_ALLOC_OPS` bitmap. `slot_probes()` is the
  seed's `early_kprobe_hlist`, which `get_kprobe()` searches while early;
* the **early blacklist**: the import machinery the module notifier runs in (EARLY_NEEDED),
  on top of the core's blacklist; it may be probed once the core is initialised. The early
  machinery's own hits are kept out of the trace by kprobe_busy, not by a blacklist;
* the conversion **notifiers**: the trace side of the boot stage hears when the probes became
  normal ones, to move its early events into the trace buffer.

This module is imported at interpreter start-up: it imports nothing (plain `__slots__`
records, no `typing` at run time). Its state changes only under the registry's lock, except
`start()`, which the boot stage calls before any other thread can use it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: typing costs milliseconds to import
if TYPE_CHECKING:
    from collections.abc import Callable

    from pykprobes.core.probe import Kprobe

#: The seed's Kconfig: `range 1 64`, `default 16`.
NR_EARLY_KPROBES_SLOTS_MIN = 1
NR_EARLY_KPROBES_SLOTS_MAX = 64
NR_EARLY_KPROBES_SLOTS_DEFAULT = 16

#: The seed's message (kernel/kprobes.c, register_early_kprobe), word for word.
NO_SLOT_MESSAGE = "No enough early kprobe slots."

#: What an early probe may not target besides the core's blacklist (pykprobes, bytecode,
#: importlib, threading, weakref, warnings, dis, opcode: core/blacklist.py): the import
#: machinery's other half, which the module notifier runs in. The rest of the standard
#: library, the modules the boot stage imports included (typing, re, functools,
#: collections, enum, contextlib...), may be probed early: the early machinery's own work
#: (the boot stage, arming at import, loading the rewrite arch, writing the events at exit)
#: runs in kprobe_busy (core/site.py), where a hit records nothing and counts nmissed, as
#: the kernel's kprobe_busy_begin() brackets its own work.
EARLY_NEEDED = ("zipimport",)

#: The standard library modules that loading the rewrite arch imports (bytecode's inspect,
#: dataclasses...: measured on 3.11-3.15 by tests/boot/test_import_weight.py). An early
#: probe waiting for one of them loads the optimizer when it is registered: loaded at the
#: module's own import, the optimizer would import it again halfway through.
OPTIMIZER_IMPORTS = frozenset(
    ("ast", "copy", "dataclasses", "enum", "inspect", "linecache", "re", "token", "tokenize",
     # 3.14+: dataclasses and inspect read annotations through it (PEP 649/749).
     "annotationlib",
     # 3.14+: the interpreter starts without the io module (it uses _io); tokenize imports it.
     "io",
     # bytecode's (the core decodes with opcode's tables, insn.py); blacklisted anyway.
     "dis"))


def imported_by_optimizer(module: str) -> bool:
    """Whether loading the optimizer would import `module`, not imported yet."""
    import sys

    return module.partition(".")[0] in OPTIMIZER_IMPORTS and module not in sys.modules


_NEVER = 0
_EARLY = 1
_CONVERTED = 2

_state = _NEVER
_booted = False
#: The slots: index -> the early probe holding it, or None (free).
_slots: list[Kprobe | None] = []
#: Module (top-level package) -> why an early probe may not target it.
_blacklist: dict[str, str] = {}
#: Called (without arguments, outside the registry lock) once the early probes are converted.
_notifiers: list[Callable[[], None]] = []
#: PYKPROBES_PANIC_ON_UNSAFE: an early probe found unsafe at conversion aborts the process.
panic_on_unsafe = False
#: The directory the program will find first on sys.path (the script's directory, or the
#: current one for -m and -c): the boot stage runs before Python puts it there, and a target
#: module that lives in it is not "not found".
main_path0: str | None = None


def start(nr_slots: int, *, panic: bool = False, path0: str | None = None) -> bool:
    """The boot stage: preallocate `nr_slots` early slots and enter the early state. False
    (nothing done) if the process is early already or the core is initialised."""
    global _state, _slots, _booted, panic_on_unsafe, main_path0
    if _state != _NEVER:
        return False
    if not NR_EARLY_KPROBES_SLOTS_MIN <= nr_slots <= NR_EARLY_KPROBES_SLOTS_MAX:
        raise ValueError(f"nr_slots {nr_slots} is out of range "
                         f"{NR_EARLY_KPROBES_SLOTS_MIN}..{NR_EARLY_KPROBES_SLOTS_MAX}")
    _slots = [None] * nr_slots
    for name in EARLY_NEEDED:
        _blacklist.setdefault(name, "needed by the early probe machinery while early")
    panic_on_unsafe = panic
    main_path0 = path0
    _booted = True
    _state = _EARLY
    return True


def is_early() -> bool:
    """The seed's kprobes_is_early(): the boot stage ran and init_kprobes() has not."""
    return _state == _EARLY


def was_early() -> bool:
    """True once the boot stage entered the early state (also after conversion)."""
    return _booted


def finish() -> list[Callable[[], None]]:
    """Leave the early state for good (registry lock held): the early slots are all free, and
    nothing will ever be early again in this process. Returns the notifiers to call once the
    lock is released (none unless the process was early)."""
    global _state
    was = _state == _EARLY
    _state = _CONVERTED
    for i in range(len(_slots)):
        _slots[i] = None
    _blacklist.clear()
    if not was:
        return []
    notifiers = list(_notifiers)
    _notifiers.clear()
    return notifiers


# ----------------------------------------------------------------------------- slots


def alloc_slot(p: Kprobe) -> bool:
    """Give `p` the first free slot (the seed's ek_alloc_early_kprobe); False if none is free."""
    for i, holder in enumerate(_slots):
        if holder is None:
            _slots[i] = p
            return True
    return False


def free_slot(p: Kprobe) -> bool:
    """Return `p`'s slot (the seed's ek_free_early_kprobe); False if it holds none."""
    for i, holder in enumerate(_slots):
        if holder is p:
            _slots[i] = None
            return True
    return False


def slot_probes() -> list[Kprobe]:
    """The early probes, in slot order (the seed's early_kprobe_hlist)."""
    return [p for p in _slots if p is not None]


def nr_slots() -> int:
    return len(_slots)


def nr_free_slots() -> int:
    return sum(1 for p in _slots if p is None)


# ----------------------------------------------------------------------------- blacklist


def blacklist_reason(module: str) -> str | None:
    """Why an early probe may not target `module` now (None after conversion)."""
    if _state != _EARLY:
        return None
    return _blacklist.get(module) or _blacklist.get(module.partition(".")[0])


def blacklisted_modules() -> dict[str, str]:
    return dict(_blacklist) if _state == _EARLY else {}


# ----------------------------------------------------------------------------- stand-in


class EarlyBreakpoint:
    """The breakpoint arch while early: there is none (the seed: "interrupt handlers may not
    been initialized yet"). Early probes are optimized at once, so the registry asks it to
    arm only versions that no early probe depends on (the code a rewrite replaced); it arms
    nothing, and at conversion the real arch arms what is still needed."""

    name = "none (early)"
    capabilities: dict[str, bool] = {}  # noqa: RUF012 - read-only, as the real arches'

    def arm(self, code: object, offset: int, pre: object, post: object) -> None:
        pass

    def disarm(self, code: object, offset: int) -> None:
        pass

    def arm_return(self, code: object, on_return: object, on_unwind: object) -> None:
        pass

    def disarm_return(self, code: object) -> None:
        pass

    def uses_entry_event(self, code: object, offset: int) -> bool:
        return False

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- notifiers


def on_convert(callback: Callable[[], None]) -> None:
    """Call `callback()` once the early probes are converted (outside the registry lock)."""
    if _state == _EARLY:
        _notifiers.append(callback)


__all__ = [
    "NO_SLOT_MESSAGE",
    "NR_EARLY_KPROBES_SLOTS_DEFAULT",
    "NR_EARLY_KPROBES_SLOTS_MAX",
    "NR_EARLY_KPROBES_SLOTS_MIN",
    "EarlyBreakpoint",
    "alloc_slot",
    "blacklist_reason",
    "blacklisted_modules",
    "finish",
    "free_slot",
    "imported_by_optimizer",
    "is_early",
    "nr_free_slots",
    "nr_slots",
    "on_convert",
    "slot_probes",
    "start",
    "was_early",
]
