"""Early kprobes: the seed, in one place (the early-kprobes patch's CONFIG_EARLY_KPROBES,
transposed: docs/architecture.md, "Early kprobes").

A process is *early* from the moment the boot stage calls `start()` until `init_kprobes()`
converts the early probes; a process whose boot stage never ran is never early. While early,
`register_kprobe()` takes the seed's `register_early_kprobe()` and uses what `start()`
preallocates:

* the **early slots** (`CONFIG_NR_EARLY_KPROBES_SLOTS`, 1..64, default 16): a fixed table,
  one slot per early probe, the seed's `DEFINE_EKPROBE_ALLOC_OPS` bitmap. `slot_probes()` is
  the seed's `early_kprobe_hlist`, which `get_kprobe()` searches while early; the sites of
  the early probes live in the early table (`sites`), not the main one;
* the **early blacklist**: the import machinery the module notifier runs in (EARLY_NEEDED),
  on top of the core's blacklist; it may be probed once the core is initialised. The early
  machinery's own hits are kept out of the trace by kprobe_busy, not by a blacklist;
* no breakpoint arch (the seed: "interrupt handlers may not been initialized yet"): an early
  probe is optimized at once (`arch_optimize_kprobes()` without the delayed optimizer), and
  the mechanisms are a stand-in breakpoint (`EarlyBreakpoint`) and the optimizer, loaded at
  the first probe whose code must be rewritten;
* the conversion **notifiers**: the trace side of the boot stage hears when the probes
  became normal ones, to move its early events into the trace buffer.

`convert_early_kprobes()` (called by `init_kprobes()`, table lock held) checks every early
site again as check_kprobe_address_safe() does (an unsafe one is removed, or the process
panics with PYKPROBES_PANIC_ON_UNSAFE=1), moves the sites into the main table unchanged, and
hands over to the real breakpoint arch.

The room is handed the table (core/table.py); its state changes under the table's lock,
except `start()`, which the boot stage calls before any other thread can use it.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Callable
from types import CodeType
from typing import TYPE_CHECKING, Any, ClassVar

from pykprobes.core import codestate, resolve
from pykprobes.core.address import ProbeAddress
from pykprobes.core.arch import Capabilities, OptimizerArch, select_optimizer
from pykprobes.core.blacklist import blacklist_reason
from pykprobes.core.codestate import CodeState, Mechanisms
from pykprobes.core.kprobe_addr import check_offset, check_offset_value, target_from_addr
from pykprobes.core.probe import KPROBE_FLAG_DISABLED, KPROBE_FLAG_EARLY, Kprobe
from pykprobes.errors import KprobeError, einval, enoent

if TYPE_CHECKING:
    from pykprobes.core.site import Site
    from pykprobes.core.table import KprobeTable

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
#: runs in kprobe_busy (core/guard.py), where a hit records nothing and counts nmissed, as
#: the kernel's kprobe_busy_begin() brackets its own work.
EARLY_NEEDED = ("zipimport",)

#: The standard library modules that loading the rewrite arch imports (bytecode's inspect,
#: dataclasses...: measured on 3.11-3.15 by tests/boot/test_import_weight.py). An early
#: probe waiting for one of them loads the optimizer when it is registered: loaded at the
#: module's own import, the optimizer would import it again halfway through.
OPTIMIZER_IMPORTS = frozenset(
    ("ast", "copy", "dataclasses", "enum", "inspect", "linecache", "re", "token", "tokenize",
     # the rewrite arch's own (since insn.py, the core no longer loads it at start-up); on
     # the core's blacklist anyway.
     "dis",
     # 3.14+: dataclasses and inspect read annotations through it (PEP 649/749).
     "annotationlib",
     # 3.14+: the interpreter starts without the io module (it uses _io); tokenize imports it.
     "io",
     # bytecode's (the core decodes with opcode's tables, insn.py); blacklisted anyway.
     "dis"))


def imported_by_optimizer(module: str) -> bool:
    """Whether loading the optimizer would import `module`, not imported yet."""
    return module.partition(".")[0] in OPTIMIZER_IMPORTS and module not in sys.modules


_NEVER = 0
_EARLY = 1
_CONVERTED = 2


class EarlyBreakpoint:
    """The breakpoint arch while early: there is none (the seed: "interrupt handlers may not
    been initialized yet"). Early probes are optimized at once, so the table asks it to
    arm only versions that no early probe depends on (the code a rewrite replaced); it arms
    nothing, and at conversion the real arch arms what is still needed."""

    name = "none (early)"
    #: It reaches nothing; a generator's close is taken to report its end, as the real
    #: arches measure it does on every CPython but 3.13.0.
    capabilities: ClassVar[Capabilities] = Capabilities(return_at_generator_close=True)

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


class EarlyKprobes:
    """The early slots, the early table and the early mechanisms of one table."""

    def __init__(self, table: KprobeTable) -> None:
        self.table = table
        self.state = _NEVER
        self.booted = False
        #: The slots: index -> the early probe holding it, or None (free).
        self.slots: list[Kprobe | None] = []
        #: Module (top-level package) -> why an early probe may not target it.
        self.blacklist: dict[str, str] = {}
        #: Called (without arguments, outside the table lock) once the early probes are
        #: converted.
        self.notifiers: list[Callable[[], None]] = []
        #: PYKPROBES_PANIC_ON_UNSAFE: an early probe found unsafe at conversion aborts.
        self.panic_on_unsafe = False
        #: The directory the program will find first on sys.path (the script's directory,
        #: or the current one for -m and -c): the boot stage runs before Python puts it
        #: there, and a target module that lives in it is not "not found".
        self.main_path0: str | None = None
        #: The early table (the seed's early_kprobe_hlist): the sites of early probes.
        self.sites: dict[tuple[int, int], Site] = {}
        #: The mechanisms while early: the optimizer (loaded at the first rewrite) and the
        #: breakpoint stand-in. At conversion the same object gets the real breakpoint arch
        #: and becomes the table's.
        self.mech: Mechanisms | None = None
        self.mech_lock = threading.Lock()  # never held while taking another lock
        #: Why the optimizer could not be loaded while early (early probes then cannot be
        #: armed).
        self.opt_error: str | None = None

    # ------------------------------------------------------------------ the state

    def start(self, nr_slots: int, *, panic: bool = False, path0: str | None = None) -> bool:
        """The boot stage: preallocate `nr_slots` early slots and enter the early state.
        False (nothing done) if the process is early already or the core is initialised."""
        if self.state != _NEVER:
            return False
        if not NR_EARLY_KPROBES_SLOTS_MIN <= nr_slots <= NR_EARLY_KPROBES_SLOTS_MAX:
            raise ValueError(f"nr_slots {nr_slots} is out of range "
                             f"{NR_EARLY_KPROBES_SLOTS_MIN}..{NR_EARLY_KPROBES_SLOTS_MAX}")
        self.slots = [None] * nr_slots
        for name in EARLY_NEEDED:
            self.blacklist.setdefault(name, "needed by the early probe machinery while early")
        self.panic_on_unsafe = panic
        self.main_path0 = path0
        self.booted = True
        self.state = _EARLY
        return True

    def is_early(self) -> bool:
        """The seed's kprobes_is_early(): the boot stage ran and init_kprobes() has not."""
        return self.state == _EARLY

    def finish(self) -> list[Callable[[], None]]:
        """Leave the early state for good (table lock held): the early slots are all free,
        and nothing will ever be early again in this process. Returns the notifiers to call
        once the lock is released (none unless the process was early)."""
        was = self.state == _EARLY
        self.state = _CONVERTED
        for i in range(len(self.slots)):
            self.slots[i] = None
        self.blacklist.clear()
        if not was:
            return []
        notifiers = list(self.notifiers)
        self.notifiers.clear()
        return notifiers

    def on_convert(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once the early probes are converted (outside the table lock)."""
        if self.state == _EARLY:
            self.notifiers.append(callback)

    # ------------------------------------------------------------------ slots

    def alloc_slot(self, p: Kprobe) -> bool:
        """Give `p` the first free slot (the seed's ek_alloc_early_kprobe); False if none."""
        for i, holder in enumerate(self.slots):
            if holder is None:
                self.slots[i] = p
                return True
        return False

    def free_slot(self, p: Kprobe) -> bool:
        """Return `p`'s slot (the seed's ek_free_early_kprobe); False if it holds none."""
        for i, holder in enumerate(self.slots):
            if holder is p:
                self.slots[i] = None
                return True
        return False

    def slot_probes(self) -> list[Kprobe]:
        """The early probes, in slot order (the seed's early_kprobe_hlist)."""
        return [p for p in self.slots if p is not None]

    def nr_free_slots(self) -> int:
        return sum(1 for p in self.slots if p is None)

    # ------------------------------------------------------------------ blacklist

    def blacklist_reason(self, module: str) -> str | None:
        """Why an early probe may not target `module` now (None after conversion)."""
        if self.state != _EARLY:
            return None
        return self.blacklist.get(module) or self.blacklist.get(module.partition(".")[0])

    def blacklisted_modules(self) -> dict[str, str]:
        return dict(self.blacklist) if self.state == _EARLY else {}

    def _check_blacklists(self, module: str, code: CodeType | None, symbol: str) -> None:
        reason = blacklist_reason(module, code) or self.blacklist_reason(module)
        if reason is not None:
            raise einval(f"{symbol}: cannot probe {module} ({reason})")

    def _module_exists(self, module: str) -> bool:
        if resolve.module_exists(module):
            return True
        path0 = self.main_path0
        if not path0:
            return False
        import importlib.machinery

        top = module.partition(".")[0]
        return importlib.machinery.PathFinder.find_spec(top, [path0]) is not None

    # ------------------------------------------------------------------ mechanisms

    def mechanisms(self) -> Mechanisms:
        with self.mech_lock:
            if self.mech is None:
                self.mech = Mechanisms(EarlyBreakpoint(), None)  # type: ignore[arg-type]
            return self.mech

    def load_optimizer(self) -> None:
        """Load the optimizer for the early probes, outside the lock (it imports the rewrite
        arch and `bytecode`): done at the first early probe whose code must be rewritten, so
        that a process whose early targets are never imported never loads it."""
        em = self.mechanisms()
        if em.optimizer is not None or self.opt_error is not None:
            return
        try:
            opt, _ = select_optimizer()
        except Exception as exc:  # noqa: BLE001 - reported when an early probe needs it
            self.opt_error = str(exc)
            return
        with self.table.lock:
            if em.optimizer is None:
                em.optimizer = opt

    def unoptimized_reason(self, site: Site, state: CodeState, m: Mechanisms) -> str:
        """Why an early site could not be optimized (it has no other mechanism)."""
        if m.optimizer is None:
            return f"the optimizer is not available: {self.opt_error or 'not loaded'}"
        if site.posts:
            return "it has a post_handler"
        return self.table.optimizer.check(site, state, m) or "not optimizable"

    # ------------------------------------------------------------------ register

    def register_early_kprobe(self, p: Kprobe) -> bool:
        """The seed's register_early_kprobe(): refuse what the early path cannot serve, take
        an early slot, prepare the optimized probe and optimize it at once. Returns False,
        having done nothing, if the process stopped being early meanwhile (init_kprobes()
        ran in another thread): the caller then registers `p` normally.

        The seed resolves the address before its early branch (kprobe_addr()), so a symbol
        that does not resolve costs no slot; then: EINVAL for a post_handler or a DISABLED
        probe, ENOMEM "No enough early kprobe slots.", and every failure after that frees
        the slot. A module not imported yet makes a pending probe, armed (rewritten) when
        it is imported, before its body runs; one not found on sys.path yet may live in the
        directory the program will add first (the boot stage runs before Python adds it):
        that counts too."""
        table = self.table
        if p.registered:
            raise einval(f"probe {p.symbol} is already registered")
        if (p.symbol_name is None) == (p.addr is None):
            raise einval("give exactly one of symbol_name and addr")
        # kprobe_addr(): where it goes, without touching `p` yet.
        target: resolve.Target | None = None
        module = qualname = symbol = ""
        offset = p.offset
        if p.symbol_name is not None:
            module, qualname = resolve.split_symbol(p.symbol_name)
            symbol = f"{module}:{qualname}"
            self._check_blacklists(module, None, symbol)
            if imported_by_optimizer(module):
                self.load_optimizer()  # it imports the module, which is then probed in place
            mod = table.modules.module_object(module)
            if mod is None:
                if module not in table.expected and not self._module_exists(module):
                    raise enoent(f"{p.symbol_name}: no module named {module!r}")
                check_offset_value(offset, symbol)
            else:
                target = resolve.holder_chain(
                    resolve.resolve_imported(mod, qualname, table.original), mod,
                    table.original)
        else:
            target = target_from_addr(table, p.addr)
            module = target.module
            symbol = f"{target.module}:{target.code.co_qualname}"
            if isinstance(p.addr, ProbeAddress):
                offset = p.addr.offset + p.offset
            self._check_blacklists(target.module, target.code, symbol)
        # The seed sets KPROBE_FLAG_EARLY, then refuses.
        p.flags |= KPROBE_FLAG_EARLY
        if p.post_handler is not None:
            raise einval(f"{symbol}+{offset}: an early kprobe cannot have a post_handler")
        if p.flags & KPROBE_FLAG_DISABLED:
            raise einval(f"{symbol}+{offset}: an early kprobe cannot be registered disabled")
        if target is not None:
            self.load_optimizer()
        m = self.mechanisms()
        with table.lock:
            if not self.is_early():
                p.flags &= ~KPROBE_FLAG_EARLY
                return False
            if not self.alloc_slot(p):
                raise KprobeError(errno.ENOMEM, NO_SLOT_MESSAGE)
            p.flags = KPROBE_FLAG_EARLY  # DISABLED was refused; every other flag is masked
            p.nmissed = 0
            try:
                if target is None:
                    p.offset = offset
                    table.modules.add_pending(p, module, qualname)
                else:
                    if isinstance(p.addr, ProbeAddress):
                        p.offset = offset
                    table.register_aggr_kprobe(p, target, symbol, m)
            except BaseException:
                self.free_slot(p)  # the seed's error paths: free_slot
                raise
        table.modules.watch(module, sys.modules.get(module) if target is not None else None)
        table.modules.install()  # the module notifier: init_kprobes() installs it otherwise
        return True

    def failed_to_prepare(self, symbol: str, offset: int, why: object) -> KprobeError:
        """arch_prepare_optimized_kprobe() failed: an early probe has no other mechanism."""
        return einval(f"{symbol}+{offset}: Failed to prepare optimized kprobe. ({why})")

    # ------------------------------------------------------------------ conversion

    def convert_early_kprobes(
        self, m: Mechanisms, bp: Any, opt: OptimizerArch | None
    ) -> tuple[list[str], list[Callable[[], None]]]:
        """The seed's convert_early_kprobes(), table lock held: every early probe becomes a
        normal one. Returns the unsafe reports and the early notifiers to run once the lock
        is released.

        Each early site is checked again as check_kprobe_address_safe() does (the blacklist
        may have grown: @nokprobe); an unsafe one is removed, or the process panics with
        PYKPROBES_PANIC_ON_UNSAFE=1. The others move into the main table unchanged: the same
        Site objects and the same rewritten code, so a thread hitting one meanwhile goes on
        hitting it (no gap). The early slots are returned, the real breakpoint arch takes
        over from the stand-in (it arms what running versions need), and the global switches
        set while early (set_optimization, disarm_all_kprobes) apply from now on."""
        table = self.table
        # Nothing was armed by the stand-in: forget what it was asked to arm.
        for state in table.states.values():
            state.armed.clear()
            state.ret_armed.clear()
        m.breakpoint = bp
        if m.optimizer is None:
            m.optimizer = opt
        reports: list[str] = []
        for site in list(self.sites.values()):
            reason = self._address_unsafe(site, table.states.get(id(site.addr.code)))
            if reason is None:
                continue
            message = f"Insert kprobe at {site.symbol}+{site.addr.offset} is not safe! " \
                      f"({reason})"
            if self.panic_on_unsafe:
                panic(message)
            for p in list(site.probes):
                table.unregister(p)  # frees its slot
            reports.append(message)
        table.sites.update(self.sites)
        self.sites.clear()
        notifiers = self.finish()  # not early any more; every slot is free
        with codestate.switching(m):
            for state in list(table.states.values()):
                for site in list(state.sites.values()):
                    table.arm_kprobe(site, state, m)
                codestate.reconcile_breakpoints(state, m)
        if m.retiring:
            table.optimizer.kick()  # retire what no frame runs any more
        return reports, notifiers

    def _address_unsafe(self, site: Site, state: CodeState | None) -> str | None:
        """check_kprobe_address_safe() for a converted early site: why it is not safe now."""
        if state is None:
            return "its code is not tracked"
        versions = [state.original, state.current.code, *(v.code for v in state.retired)]
        for code in versions:
            reason = blacklist_reason(state.module, code)
            if reason is not None:
                return reason
        try:
            check_offset(state.original, site.addr.offset, site.symbol)
        except KprobeError as exc:
            return str(exc)
        return None


def panic(message: str) -> None:
    """The kernel panics on an unsafe early probe; with PYKPROBES_PANIC_ON_UNSAFE=1 so do we."""
    text = f"pykprobes: Kernel panic - not syncing: {message}\n"
    try:
        os.write(2, text.encode("utf-8", "replace"))
    finally:
        os.abort()


__all__ = [
    "EARLY_NEEDED",
    "NO_SLOT_MESSAGE",
    "NR_EARLY_KPROBES_SLOTS_DEFAULT",
    "NR_EARLY_KPROBES_SLOTS_MAX",
    "NR_EARLY_KPROBES_SLOTS_MIN",
    "OPTIMIZER_IMPORTS",
    "EarlyBreakpoint",
    "EarlyKprobes",
    "imported_by_optimizer",
]
