"""The kprobes table (kernel/kprobes.c: `kprobe_table`, `kprobe_mutex` and the verbs that
work on them).

One object, `KprobeTable`, holds the state of the process's probes: the lock, the sites
(one per probed address: an aggregate probe when several probes share it), the code states
(core/codestate.py), the mechanisms, the pending list (probes waiting for their module) and
the rooms that are handed it: the delayed optimizer (core/optimizer.py), the early kprobes
(core/early_kprobes.py) and the module notifier (core/modules.py). `TABLE` is the process's
one table; the public API (core/registry.py) delegates to it.

The verbs are the kernel's: `register_kprobe` checks and places a probe (kprobe_addr(), in
core/kprobe_addr.py), `register_aggr_kprobe` adds it to the site at its address,
`prepare_kprobe` checks the address, `arm_kprobe` publishes what a hit runs and arms the
mechanisms, `try_to_optimize_kprobe` queues the site for the optimizer, `disarm_kprobe`
empties a site that lost its last probe.

The lock (`kprobe_mutex`) guards the table, the code states, the optimizer's queue and the
global switches. It is never held while a handler runs (hits do not take it) and never while
importing (wrapt's rule: import hooks outside locks).
"""

from __future__ import annotations

import os
import sys
import threading
import types
from collections.abc import Iterable
from types import CodeType, ModuleType
from typing import TYPE_CHECKING, Any

from pykprobes.core import codestate, resolve, returns
from pykprobes.core.address import ProbeAddress
from pykprobes.core.arch import OptimizerArch, select_breakpoint, select_optimizer
from pykprobes.core.codestate import CodeState, Mechanisms
from pykprobes.core.early_kprobes import EarlyKprobes
from pykprobes.core.guard import synchronize_hits, warn, write_stderr
from pykprobes.core.kprobe_addr import (
    check_kprobe_address_safe,
    check_offset,
    code_from_addr,
    kprobe_addr,
)
from pykprobes.core.modules import ModuleNotifier, PendingSite
from pykprobes.core.optimizer import KprobeOptimizer
from pykprobes.core.probe import (
    KPROBE_FLAG_DISABLED,
    KPROBE_FLAG_EARLY,
    KPROBE_FLAG_FTRACE,
    KPROBE_FLAG_GONE,
    KPROBE_FLAG_OPTIMIZED,
    Kprobe,
)
from pykprobes.core.site import Site
from pykprobes.errors import KprobeError, einval

if TYPE_CHECKING:
    from collections.abc import Mapping


class TableView:
    """A read-only view of a table's state (tests, `pykprobes info`): live mappings that
    cannot be written through. (A plain class, not a typing.NamedTuple: the boot stage
    imports this module, and a NamedTuple class imports annotationlib, ast and enum on
    3.14+.)"""

    __slots__ = ("sites", "early_sites", "states", "pending", "opt_reasons", "versions",
                 "retiring", "mechanisms", "allocated")

    def __init__(self, tables: Mapping[str, dict[Any, Any]], mechanisms: Mechanisms) -> None:
        proxy = types.MappingProxyType
        self.sites: Mapping[tuple[int, int], Site] = proxy(tables["sites"])
        self.early_sites: Mapping[tuple[int, int], Site] = proxy(tables["early_sites"])
        self.states: Mapping[int, CodeState] = proxy(tables["states"])
        self.pending: Mapping[str, list[tuple[Kprobe, str]]] = proxy(tables["pending"])
        self.opt_reasons: Mapping[tuple[int, int], str | None] = proxy(tables["opt_reasons"])
        self.versions: Mapping[int, CodeState] = proxy(tables["versions"])
        self.retiring: Mapping[int, CodeState] = proxy(tables["retiring"])
        self.mechanisms = mechanisms
        #: The bytes each of those dicts holds now (an emptied dict keeps what it grew to
        #: until cleared: KprobeTable.sync_emptied gives it back).
        self.allocated: Mapping[str, int] = {name: sys.getsizeof(t)
                                             for name, t in tables.items()}


class KprobeTable:
    """The state of the process's probes, and the kernel's verbs on it."""

    def __init__(self) -> None:
        #: kprobe_mutex.
        self.lock = threading.RLock()
        #: Serialises init_kprobes() (taken before `lock`, never after it).
        self.init_lock = threading.Lock()
        #: The mechanisms, once init_kprobes() chose them (`mechanisms()`).
        self.mech: Mechanisms | None = None
        #: Arches not chosen, with the reason.
        self.rejected: dict[str, str] = {}
        #: id(original code) -> its code state.
        self.states: dict[int, CodeState] = {}
        #: ProbeAddress.key -> site (the kernel's kprobe_table).
        self.sites: dict[tuple[int, int], Site] = {}
        #: module -> [(probe, qualname)]: probes waiting for their module.
        self.pending: dict[str, list[tuple[Kprobe, str]]] = {}
        #: Modules whose code is about to run outside the import system (`pykprobes run`
        #: runs the program as `__main__`): probes on them wait for `modules.loaded()`.
        self.expected: set[str] = set()
        #: id() of the module (or class body) codes whose body is running now, between
        #: modules.loaded() and modules.executed().
        self.executing: set[int] = set()
        #: debugfs `kprobes/enabled` = 0 (kprobes_all_disarmed).
        self.all_disarmed = False
        self.optimizer = KprobeOptimizer(self)
        self.early = EarlyKprobes(self)
        self.modules = ModuleNotifier(self)

    def view(self) -> TableView:
        m = self.mechanisms()
        tables: dict[str, dict[Any, Any]] = {
            "sites": self.sites, "early_sites": self.early.sites, "states": self.states,
            "pending": self.pending, "opt_reasons": self.optimizer.reasons,
            "versions": m.versions, "retiring": m.retiring}
        return TableView(tables, m)

    # ------------------------------------------------------------------ init

    def init_kprobes(self) -> None:
        """Choose the mechanisms, install the module notifier, and convert the early probes
        into normal ones (the seed's init_kprobes() calling convert_early_kprobes()).
        Idempotent, thread-safe."""
        if self.mech is not None:
            return
        with self.init_lock:
            if self.mech is not None:
                return
            # Load the arches before taking the lock: importing under our lock could
            # deadlock with a thread whose import runs the module notifier.
            bp, rejected = select_breakpoint()
            em = self.early.mech
            if em is not None and em.optimizer is not None:
                opt: OptimizerArch | None = em.optimizer  # rewritten code came from this one
                rejected_opt: dict[str, str] = {}
            else:
                try:
                    opt, rejected_opt = select_optimizer()
                except Exception as exc:  # noqa: BLE001 - no optimizer: breakpoints only
                    opt, rejected_opt = None, {"rewrite": str(exc)}
            with self.lock:
                self.rejected = {**rejected, **rejected_opt}
                if em is None:
                    mech = Mechanisms(bp, opt)
                    reports: list[str] = []
                    notifiers = self.early.finish()
                else:
                    mech = em
                    reports, notifiers = self.early.convert_early_kprobes(mech, bp, opt)
                if opt is not None and not bp.capabilities.unprobed_code_untaxed:
                    # Breakpoints are armed by rewrites there (optimizer.rewrites_breakpoint):
                    # forget the code they replace as soon as no frame runs it.
                    mech.reap = self.optimizer.reap
                self.mech = mech
                self.modules.install()
        for message in reports:
            write_stderr(f"pykprobes: {message}: the early probe is removed\n")
        for notify in notifiers:
            try:
                notify()
            except Exception as exc:  # noqa: BLE001 - a notifier's failure is reported
                write_stderr(f"pykprobes: early events could not be moved into the trace: "
                             f"{exc!r}\n")

    def mechanisms(self) -> Mechanisms:
        """The mechanisms (the early ones while early); initialises the core on first use."""
        m = self.mech
        if m is not None:
            return m
        if self.early.is_early():
            return self.early.mechanisms()
        self.init_kprobes()
        assert self.mech is not None
        return self.mech

    def original(self, code: CodeType) -> CodeType:
        """Map a running version (a rewritten copy) back to the compiled original."""
        state = self.mechanisms().versions.get(id(code))
        if state is not None and (state.current.code is code or
                                  any(v.code is code for v in state.retired)):
            return state.original
        return code

    def kprobes_all_disarmed(self) -> bool:
        return self.all_disarmed and not self.early.is_early()

    # ------------------------------------------------------------------ register

    def register_kprobe(self, p: Kprobe) -> None:
        """Register and arm `p` (unless it is DISABLED); while early, the seed's
        register_early_kprobe(). Raises KprobeError."""
        if self.early.is_early() and self.early.register_early_kprobe(p):
            return
        m = self.mechanisms()
        resolved = self.resolve_for_register(p)
        if resolved is not None:
            with self.lock:
                self.register_aggr_kprobe(p, *resolved, m)

    def resolve_for_register(self, p: Kprobe) -> tuple[resolve.Target, str] | None:
        """Check `p` and find its target, outside the lock (resolving may import). None when
        its module is not imported yet: `p` is then registered, pending."""
        if p.flags & KPROBE_FLAG_EARLY:
            # The seed's WARN(p->flags & KPROBE_FLAG_EARLY, ...); registration goes on.
            # (stacklevel: warn, here, register_kprobe(s) here, registry's, the caller.)
            warn("register early kprobe after kprobes initialized", stacklevel=5)
        if p.registered:
            raise einval(f"probe {p.symbol} is already registered")
        if (p.symbol_name is None) == (p.addr is None):
            raise einval("give exactly one of symbol_name and addr")
        p.flags &= KPROBE_FLAG_DISABLED  # the kernel masks every other flag
        p.nmissed = 0
        found = kprobe_addr(self, p)
        if found is None:
            assert p.symbol_name is not None
            module, qualname = resolve.split_symbol(p.symbol_name)
            self.modules.register_pending(p, module, qualname)
            return None
        target, _ = found
        if isinstance(p.addr, ProbeAddress):
            p.offset = p.addr.offset + p.offset
        self.modules.watch(target.module, self.modules.module_object(target.module))
        return found

    def prepare_kprobe(self, target: resolve.Target, offset: int, symbol: str) -> ProbeAddress:
        """Check the address again under the lock (the blacklist may have grown: @nokprobe)
        and find its instruction: the probe's address."""
        check_kprobe_address_safe(target.module, target.code, symbol)
        return ProbeAddress(target.code, check_offset(target.code, offset, symbol))

    def state_for(self, target: resolve.Target, m: Mechanisms) -> CodeState:
        """The code state of `target`'s code (and its parents'), made on first use."""
        state = self.states.get(id(target.code))
        if state is not None:
            return state
        state = CodeState(target.module, target.code)
        self.states[id(target.code)] = state
        m.versions[id(target.code)] = state
        if target.parent is not None and target.const_index is not None:
            parent = self.state_for(target.parent, m)
            state.parent = parent
            state.const_index = target.const_index
            parent.children[target.const_index] = state
        return state

    def site_table(self) -> dict[tuple[int, int], Site]:
        """The table new sites go into: the early table while early, else the main one."""
        return self.early.sites if self.early.is_early() else self.sites

    def register_aggr_kprobe(
        self, p: Kprobe, target: resolve.Target, symbol: str, m: Mechanisms
    ) -> None:
        """Put `p` at its address (lock held): a new site, or the aggregate probe of the
        site there, then arm it. On failure, `p` is left as the caller gave it."""
        addr = self.prepare_kprobe(target, p.offset, symbol)
        offset = addr.offset
        table = self.site_table()
        site = table.get(addr.key)
        if site is not None and p in site.probes:
            raise einval(f"probe {symbol}+{offset} is already registered")
        state = self.state_for(target, m)
        if site is None:
            site = Site(addr, symbol)
            table[addr.key] = site
            state.sites[offset] = site
        given = (p.addr, p.offset)
        site.probes.append(p)
        p.addr = addr
        p.offset = offset
        p._site = site
        early = self.early
        try:
            returns.attach(p, state, self.kprobes_all_disarmed())
            self.arm_kprobe(site, state, m)
            if early.is_early() and site.active and not site.optimized:
                # arch_prepare_optimized_kprobe() failed: an early probe has no other
                # mechanism.
                raise early.failed_to_prepare(symbol, offset,
                                              early.unoptimized_reason(site, state, m))
        except BaseException as exc:
            # The mechanism refused the address (prepare failed): undo, as the kernel's
            # error paths do, and leave p as the caller gave it.
            self.unregister(p, keep_slot=True)
            p.addr, p.offset = given
            if early.is_early() and isinstance(exc, Exception) and \
                    not isinstance(exc, KprobeError):
                # The rewrite itself failed while early (no breakpoint to fall back on).
                raise early.failed_to_prepare(symbol, offset, exc) from exc
            raise

    def register_kprobes(self, probes: list[Kprobe]) -> None:
        """All or nothing. The targets are resolved first, outside the lock (resolving may
        import); then the probes are registered under one hold of the lock, switching
        functions with one heap walk at most."""
        if self.early.is_early():
            self._register_one_by_one(probes)
            return
        m = self.mechanisms()
        done: list[Kprobe] = []  # registered (pending ones included)
        resolved: list[tuple[Kprobe, resolve.Target, str, tuple[Any, int, int]]] = []
        try:
            for p in probes:
                given = (p.addr, p.offset, p.flags)
                target = self.resolve_for_register(p)
                if target is None:
                    done.append(p)
                else:
                    resolved.append((p, *target, given))
            with self.lock, codestate.switching(m):
                try:
                    for p, where, symbol, _ in resolved:
                        if p.registered:  # listed twice
                            raise einval(f"probe {p.symbol} is already registered")
                        self.register_aggr_kprobe(p, where, symbol, m)
                        done.append(p)
                except BaseException:
                    for p in reversed(done):
                        self.unregister(p)
                    done.clear()
                    raise
        except BaseException:
            with self.lock, codestate.switching(m):
                for p in reversed(done):
                    self.unregister(p)
            synchronize_hits()
            # The probes resolved but not registered are left as the caller gave them.
            for p, _, _, (addr, offset, flags) in resolved:
                if not p.registered:
                    p.addr, p.offset, p.flags = addr, offset, flags
            raise

    def _register_one_by_one(self, probes: list[Kprobe]) -> None:
        done: list[Kprobe] = []
        try:
            for p in probes:
                self.register_kprobe(p)
                done.append(p)
        except BaseException:
            for p in reversed(done):
                self.unregister(p)
                synchronize_hits()
            raise

    # ------------------------------------------------------------------ arm

    def arm_kprobe(self, site: Site, state: CodeState, m: Mechanisms) -> None:
        """Publish what a hit runs (the enabled probes, none while disarmed or gone), re-arm
        the mechanisms, and queue or cancel optimization (lock held)."""
        gone = any(p.flags & KPROBE_FLAG_GONE for p in site.probes)
        if self.kprobes_all_disarmed() or gone:
            site.set_active(())
        else:
            site.set_active(tuple(p for p in site.probes if not p.is_disabled()))
        returns.refresh(state, self.kprobes_all_disarmed())
        optimizer = self.optimizer
        if site.optimized and not optimizer.optimizable(site, state, m):
            site.optimized = False  # unoptimize at once (the kernel's forced unoptimize)
        if self.early.is_early() and not site.optimized and \
                optimizer.optimizable(site, state, m):
            # While early the seed calls arch_optimize_kprobes() at once: no optimizer
            # thread, and no breakpoint to serve the probe until it runs.
            site.optimized = True
        site.inline = site.optimized or optimizer.rewrites_breakpoint(site, state, m)
        if site.inline and not site.optimized:
            optimizer.sync(state, m)  # a failed rewrite leaves the breakpoint arch the site
        else:
            codestate.sync(state, m)
        self.try_to_optimize_kprobe(site, state, m)
        self.update_flags(site)

    def try_to_optimize_kprobe(self, site: Site, state: CodeState, m: Mechanisms) -> None:
        self.optimizer.try_to_optimize_kprobe(site, state, m)

    def arm_all_sites(self, m: Mechanisms) -> None:
        """arm_kprobe() every site again, after a global switch (lock held, in a batch)."""
        for state in list(self.states.values()):
            for site in list(state.sites.values()):
                self.arm_kprobe(site, state, m)

    def set_all_disarmed(self, value: bool) -> None:
        """debugfs `kprobes/enabled`: disarm every probe (True), or arm them again."""
        m = self.mechanisms()
        with self.lock, codestate.switching(m):
            self.all_disarmed = value
            self.arm_all_sites(m)

    def set_disabled(self, p: Kprobe, disabled: bool) -> None:
        """disable_kprobe() / enable_kprobe()."""
        m = self.mechanisms()
        with self.lock:
            site = p._site
            if site is None:
                raise einval(f"probe {p.symbol} is not registered")
            if disabled:
                p.flags |= KPROBE_FLAG_DISABLED
            else:
                if p.flags & KPROBE_FLAG_GONE:
                    raise einval(f"probe {p.symbol} is gone: it cannot be enabled")
                p.flags &= ~KPROBE_FLAG_DISABLED
            if isinstance(site, Site):
                self.arm_kprobe(site, self.states[id(site.addr.code)], m)

    def update_flags(self, site: Site) -> None:
        """The probes' OPTIMIZED and FTRACE flags, from how the site is served now."""
        for p in site.probes:
            flags = p.flags & (KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE | KPROBE_FLAG_EARLY)
            if site.optimized and p in site.active:
                flags |= KPROBE_FLAG_OPTIMIZED
            if site.entry_event and p in site.active:
                flags |= KPROBE_FLAG_FTRACE
            p.flags = flags

    def ancestor_executing(self, state: CodeState) -> bool:
        """A parent of `state` is a module or class body running now."""
        parent = state.parent
        while parent is not None:
            if id(parent.original) in self.executing:
                return True
            parent = parent.parent
        return False

    # ------------------------------------------------------------------ unregister

    def unregister(
        self, p: Kprobe, keep_slot: bool = False, emptied: dict[int, CodeState] | None = None
    ) -> None:
        """Remove `p` (the kernel's __unregister_kprobe_top). With `emptied`, a code state
        that lost a site is put there instead of being synced: the caller syncs each once
        (a batch removing n sites of one code would otherwise rebuild it n times). Until
        then its running versions still call or break at the removed sites, which have no
        active probe left: nothing runs there."""
        m = self.mechanisms()
        with self.lock:
            site = p._site
            if site is not None and not keep_slot:
                self.early.free_slot(p)
            if isinstance(site, PendingSite):
                self.modules.remove_pending(p, site)
                return
            if site is None:
                raise einval(f"probe {p.symbol} is not registered")
            site.probes.remove(p)
            p._site = None
            p.flags &= ~(KPROBE_FLAG_OPTIMIZED | KPROBE_FLAG_FTRACE)
            state = self.states[id(site.addr.code)]
            returns.detach(p, state)
            if not site.probes:
                self.disarm_kprobe(site, state)
                if emptied is not None:
                    emptied[id(state)] = state
                    return
                self.sync_emptied([state], m)
            else:
                self.arm_kprobe(site, state, m)

    def disarm_kprobe(self, site: Site, state: CodeState) -> None:
        """A site that lost its last probe: nothing runs there any more, and it leaves the
        table and the optimizer's queue (its code is synced by the caller)."""
        site.set_active(())
        site.optimized = site.inline = False
        del self.site_table()[site.addr.key]
        self.optimizer.forget(site)
        del state.sites[site.addr.offset]

    def unregister_kprobes(self, probes: list[Kprobe]) -> None:
        m = self.mechanisms()
        emptied: dict[int, CodeState] = {}
        with self.lock, codestate.switching(m):
            try:
                for p in probes:
                    if p.registered:
                        self.unregister(p, emptied=emptied)
            finally:
                self.sync_emptied(emptied.values(), m)

    def sync_emptied(self, states: Iterable[CodeState], m: Mechanisms) -> None:
        """Sync code states that lost sites, and forget those left without any."""
        for state in states:
            if self.states.get(id(state.original)) is state:
                codestate.sync(state, m)
                self._drop_unused(state, m)
        _release_if_empty(self.sites, self.early.sites, self.optimizer.reasons, self.states,
                          m.versions, m.retiring)

    def _drop_unused(self, state: CodeState, m: Mechanisms) -> None:
        # Retired versions need nothing once no site is left: their call sequences call
        # sites that are inactive now, and there is no breakpoint to keep for them.
        while state.unused and state.current.code is state.original:
            del self.states[id(state.original)]
            for version in (state.current, *state.retired):
                m.versions.pop(id(version.code), None)
            codestate.set_retired(state, [], m)
            parent = state.parent
            if parent is None:
                return
            assert state.const_index is not None
            del parent.children[state.const_index]
            codestate.sync(parent, m)
            state = parent

    # ------------------------------------------------------------------ lookup

    def get_kprobe(self, addr: Any, offset: int = 0) -> Kprobe | None:
        self.mechanisms()
        self.modules.check_gone()
        try:
            code, _ = code_from_addr(self, addr)
        except KprobeError:
            return None
        if isinstance(addr, ProbeAddress):
            offset = addr.offset + offset
        key = (id(code), offset)
        with self.lock:
            if self.early.is_early():
                # The seed's get_kprobe() walks early_kprobe_hlist while early.
                for p in self.early.slot_probes():
                    if isinstance(p._site, Site) and p._site.addr.key == key:
                        return p
                return None
            site = self.sites.get(key)
            return site.probes[0] if site and site.probes else None

    def all_probes(self) -> list[Kprobe]:
        with self.lock:
            probes = [p for t in (self.sites, self.early.sites) for site in t.values()
                      for p in site.probes]
            probes += [p for entries in self.pending.values() for p, _ in entries]
        return probes

    def module_object(self, name: str) -> ModuleType | None:
        return self.modules.module_object(name)

    # ------------------------------------------------------------------ fork

    # A child made by os.fork() has only the thread that forked: a lock another thread held
    # at the fork (the optimizer's, during a pass) would never be released there. So the
    # fork waits for the table to be free, and the child starts with its own locks, and with
    # no optimizer timer (its thread is the parent's): one is started if the parent had
    # work pending.
    def before_fork(self) -> None:
        self.lock.acquire()
        self.early.mech_lock.acquire()

    def after_fork_in_parent(self) -> None:
        self.early.mech_lock.release()
        self.lock.release()

    def after_fork_in_child(self) -> None:
        self.early.mech_lock._at_fork_reinit()  # type: ignore[attr-defined]
        self.lock._at_fork_reinit()  # type: ignore[attr-defined]
        self.optimizer.after_fork_in_child()


def _release_if_empty(*tables: dict[Any, Any]) -> None:
    """A dict keeps the size it grew to when its entries are deleted, and clear() gives it
    back: after 10,000 probes were unregistered, ~150 bytes per probe stayed allocated in
    these tables (bench/suite.py run_memory, 3.12.1)."""
    for table in tables:
        if not table:
            table.clear()


#: The process's one table.
TABLE = KprobeTable()
os.register_at_fork(before=TABLE.before_fork, after_in_parent=TABLE.after_fork_in_parent,
                    after_in_child=TABLE.after_fork_in_child)
