"""The kprobes API (include/linux/kprobes.h), for the process's one table.

Every function here delegates to `TABLE` (core/table.py), which holds the state and the
kernel's verbs; docs/architecture.md walks a registration through the rooms it passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import CodeType, ModuleType
from typing import Any

from pykprobes.core.arch import Capabilities
from pykprobes.core.guard import synchronize_hits
from pykprobes.core.modules import Loading, NoAddr
from pykprobes.core.optimizer import OPTIMIZE_DELAY, RETIRE_RECHECK
from pykprobes.core.probe import (
    KPROBE_FLAG_DISABLED,
    KPROBE_FLAG_FTRACE,
    KPROBE_FLAG_GONE,
    KPROBE_FLAG_OPTIMIZED,
    Kprobe,
)
from pykprobes.core.site import Site
from pykprobes.core.table import TABLE, TableView

# --------------------------------------------------------------------------- init


def init_kprobes() -> None:
    """Initialise the core (idempotent, thread-safe): choose the mechanisms, install the
    module notifier, and convert the early probes into normal ones (the seed's
    init_kprobes() calling convert_early_kprobes()). Without a boot stage, the first use of
    the API calls it; in an early process it is called explicitly, by `pykprobes run`, or
    at the control socket's first request."""
    TABLE.init_kprobes()


def kprobes_is_early() -> bool:
    """The seed's kprobes_is_early(): the boot stage ran and init_kprobes() has not."""
    return TABLE.early.is_early()


def mechanisms_capabilities() -> Capabilities:
    """The breakpoint arch's measured capabilities."""
    caps: Capabilities = TABLE.mechanisms().breakpoint.capabilities
    return caps


def mechanisms() -> tuple[str, str | None, dict[str, str]]:
    """(breakpoint arch, optimizer arch or None, {rejected arch: reason})."""
    m = TABLE.mechanisms()
    return m.breakpoint.name, m.optimizer.name if m.optimizer else None, dict(TABLE.rejected)


def table_view() -> TableView:
    """A read-only view of the table's state (tests, `pykprobes info`)."""
    return TABLE.view()


def original_code(code: CodeType) -> CodeType:
    """The code the program compiled, for a version pykprobes runs instead (or `code`)."""
    return TABLE.original(code)


# --------------------------------------------------------------------------- register


def register_kprobe(p: Kprobe) -> None:
    """Register and arm `p` (unless it is DISABLED). Raises KprobeError.

    While early, this is the seed's register_early_kprobe() (core/early_kprobes.py)."""
    TABLE.register_kprobe(p)


def register_kprobes(probes: Iterable[Kprobe]) -> None:
    """All or nothing: on an error, the probes already registered are unregistered.

    The targets are resolved first, outside the lock (resolving may import); then the
    probes are registered under one hold of the lock, switching functions with one heap
    walk at most."""
    TABLE.register_kprobes(list(probes))


def unregister_kprobe(p: Kprobe) -> None:
    """Disarm and remove `p`; once no probe needs it, the code is the original again.
    When it returns, no handler of `p` runs any more (hits in flight have finished).
    An early probe's slot is returned (the seed's free_aggr_kprobe -> ek_free_early_kprobe)."""
    TABLE.unregister(p)
    synchronize_hits()


def unregister_kprobes(probes: Iterable[Kprobe]) -> None:
    """Unregister each registered probe, then wait once for the hits in flight (the
    kernel's batch unregistration does one RCU sync), and switch the functions back to
    their code with one heap walk at most."""
    TABLE.unregister_kprobes(list(probes))
    synchronize_hits()


# --------------------------------------------------------------------------- enable


def disable_kprobe(p: Kprobe) -> None:
    TABLE.set_disabled(p, True)


def enable_kprobe(p: Kprobe) -> None:
    TABLE.set_disabled(p, False)


def arm_all_kprobes() -> None:
    """debugfs `kprobes/enabled` = 1: arm every probe again (disabled ones stay disabled)."""
    TABLE.set_all_disarmed(False)


def disarm_all_kprobes() -> None:
    """debugfs `kprobes/enabled` = 0: disarm every probe, keeping each one's state."""
    TABLE.set_all_disarmed(True)


def kprobes_all_disarmed() -> bool:
    return TABLE.kprobes_all_disarmed()


# --------------------------------------------------------------------------- optimizer


def wait_for_kprobe_optimizer() -> None:
    """Run the pending optimization now (the kernel flushes the optimizer's work)."""
    TABLE.optimizer.wait_for_kprobe_optimizer()


def set_optimization(enabled: bool) -> None:
    """`debug.kprobes-optimization`: False unoptimizes every probe and keeps new ones
    unoptimized; True optimizes them again."""
    TABLE.optimizer.set_optimization(enabled)


def optimization_enabled() -> bool:
    return TABLE.optimizer.allowed


# --------------------------------------------------------------------------- lookup


def get_kprobe(addr: Any, offset: int = 0) -> Kprobe | None:
    """The (first) probe registered at an address, or None. `addr` is a ProbeAddress,
    or a function or code object with `offset`."""
    return TABLE.get_kprobe(addr, offset)


def all_probes() -> list[Kprobe]:
    return TABLE.all_probes()


def list_kprobes() -> str:
    """The `kprobes/list` text: `ADDR  k  SYMBOL+OFFS  [GONE][DISABLED][OPTIMIZED][FTRACE]`."""
    TABLE.mechanisms()
    TABLE.modules.check_gone()
    lines = []
    for p in all_probes():
        site = p._site
        flags = ""
        if p.flags & KPROBE_FLAG_GONE:
            flags += "[GONE]"
        elif p.flags & KPROBE_FLAG_DISABLED:
            flags += "[DISABLED]"
        if p.flags & KPROBE_FLAG_OPTIMIZED:
            flags += "[OPTIMIZED]"
        if p.flags & KPROBE_FLAG_FTRACE:
            flags += "[FTRACE]"
        kind = getattr(p, "kind", "k")
        lines.append(f"{site.addr.hexid if isinstance(site, Site) else NoAddr.hexid}  "
                     f"{kind}  {site.symbol}+{site.addr.offset}  {flags}".rstrip())
    return "\n".join(lines) + ("\n" if lines else "")


# --------------------------------------------------------------------------- modules


def register_module_notifier(notifier: Callable[[str], None]) -> None:
    """Call `notifier(name)` whenever the code of a module with probes (or probes waiting
    for it) is loaded for an import, before its body runs (core/modules.py). Never raised
    into the import: a notifier that raises is reported as a warning."""
    TABLE.modules.register_module_notifier(notifier)


def unregister_module_notifier(notifier: Callable[[str], None]) -> None:
    TABLE.modules.unregister_module_notifier(notifier)


def module_object(name: str) -> ModuleType | None:
    return TABLE.modules.module_object(name)


def expect_module(name: str, path: str | None = None) -> None:
    """Declare that `name`'s code will be handed over with `loading()` (even if a module of
    that name is in sys.modules now): probes on it wait for that. `path`, the source file,
    lets line targets in it wait too (see core/lines.py)."""
    TABLE.modules.expect(name, path)


def loading(name: str, code: CodeType) -> Loading:
    """`with loading(name, code) as run: exec(run, namespace)`: run a module's code outside
    the import system with its probes armed (core/modules.py Loading)."""
    return TABLE.modules.loading(name, code)


def module_code_loaded(name: str, code: CodeType) -> CodeType:
    """`name`'s code is about to run: arm its pending probes, and return the code to run."""
    return TABLE.modules.loaded(name, code)


def module_executed(name: str, code: CodeType) -> None:
    """`name`'s body ran from `code`."""
    TABLE.modules.executed(name, code)


def pending_modules() -> set[str]:
    return TABLE.modules.pending_modules()


def probed_modules() -> set[str]:
    return TABLE.modules.probed_modules()


def check_waiting_target(module: str, qualname: str, offset: int) -> CodeType | None:
    """What a probe on `module:qualname+offset`, registered while the module is not
    imported, will meet at the import (core/modules.py)."""
    return TABLE.modules.check_waiting_target(module, qualname, offset)


def check_gone() -> None:
    """Mark GONE the probes of modules that left sys.modules since they were probed."""
    TABLE.modules.check_gone()


# --------------------------------------------------------------------------- early


def start_early_kprobes(nr_slots: int, *, panic: bool = False, path0: str | None = None
                        ) -> bool:
    """The boot stage: enter the early state with `nr_slots` early slots
    (core/early_kprobes.py). False if the process is early already or initialised."""
    return TABLE.early.start(nr_slots, panic=panic, path0=path0)


def on_early_conversion(callback: Callable[[], None]) -> None:
    """Call `callback()` once init_kprobes() converted the early probes (outside the lock)."""
    TABLE.early.on_convert(callback)


def early_main_path0() -> str | None:
    """The directory the program will find first on sys.path (the boot stage's guess)."""
    return TABLE.early.main_path0


class EarlyStatus:
    """What the early kprobes hold now (read-only: the boot stage's status, the tests)."""

    __slots__ = ()

    def is_early(self) -> bool:
        return TABLE.early.is_early()

    def was_early(self) -> bool:
        """The boot stage entered the early state (also after conversion)."""
        return TABLE.early.booted

    def nr_slots(self) -> int:
        return len(TABLE.early.slots)

    def nr_free_slots(self) -> int:
        return TABLE.early.nr_free_slots()

    def blacklisted_modules(self) -> dict[str, str]:
        return TABLE.early.blacklisted_modules()

    def slot_probes(self) -> list[Kprobe]:
        return TABLE.early.slot_probes()


#: The early kprobes' state, read-only.
early_status: EarlyStatus = EarlyStatus()


__all__ = [
    "OPTIMIZE_DELAY",
    "RETIRE_RECHECK",
    "arm_all_kprobes",
    "disable_kprobe",
    "disarm_all_kprobes",
    "enable_kprobe",
    "get_kprobe",
    "init_kprobes",
    "kprobes_is_early",
    "list_kprobes",
    "register_kprobe",
    "register_kprobes",
    "set_optimization",
    "unregister_kprobe",
    "unregister_kprobes",
    "wait_for_kprobe_optimizer",
]
