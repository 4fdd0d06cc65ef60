"""The delayed optimizer (kernel/kprobes.c: `kprobe_optimizer`, `optimizing_list`,
`OPTIMIZE_DELAY`, `kprobes_allow_optimization`).

A probe is served by a breakpoint as soon as it is armed; `try_to_optimize_kprobe` queues its
site, and a pass run OPTIMIZE_DELAY later (on a timer thread, so that registrations batch)
rewrites the queued sites' code and forgets replaced code no frame runs any more. It is handed
the table (core/table.py) and works under the table's lock.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Final

from pykprobes.core import codestate
from pykprobes.core.guard import kprobe_busy

if TYPE_CHECKING:
    from pykprobes.core.codestate import CodeState, Mechanisms
    from pykprobes.core.site import Site
    from pykprobes.core.table import KprobeTable

#: The kernel's OPTIMIZE_DELAY (5 jiffies): how long the optimizer waits to batch probes.
OPTIMIZE_DELAY: Final = 0.005
#: How often the optimizer looks again for frames still running replaced code.
RETIRE_RECHECK: Final = 0.1
#: inspect.CO_OPTIMIZED (not imported: the boot stage imports this module): a function's
#: code, not a module or class body.
_CO_OPTIMIZED: Final = 0x01


class KprobeOptimizer:
    """The optimizer's queue, timer and switch, for one table."""

    __slots__ = ("allowed", "queue", "reaping", "reasons", "rechecks", "table", "timer")

    def __init__(self, table: KprobeTable) -> None:
        self.table = table
        #: The kernel's optimizing_list: sites waiting for the next pass.
        self.queue: set[Site] = set()
        self.timer: threading.Timer | None = None
        #: `debug.kprobes-optimization` (kprobes_allow_optimization).
        self.allowed = True
        #: ProbeAddress.key -> why the optimizer refuses that address (None: it may).
        self.reasons: dict[tuple[int, int], str | None] = {}
        #: Consecutive passes that found replaced code still possibly in use. Each such pass
        #: scans the heap (gc.get_referrers), so the re-checks back off: 0.1 s, 0.2 s, ...
        #: up to 6.4 s.
        self.rechecks = 0
        #: `reap` is running (its own batches end in a reap).
        self.reaping = False

    # ------------------------------------------------------------------ decisions

    def check(self, site: Site, state: CodeState, m: Mechanisms) -> str | None:
        """Why the optimizer cannot rewrite `site` (cached per address), or None."""
        key = site.addr.key
        if key not in self.reasons:
            assert m.optimizer is not None
            self.reasons[key] = m.optimizer.check_optimizable(state.original, site.addr.offset)
        return self.reasons[key]

    def optimizable(self, site: Site, state: CodeState, m: Mechanisms) -> bool:
        # While early, the seed's optimize_kprobe() ignores kprobes_allow_optimization and
        # kprobes_all_disarmed: early probes have no other mechanism. Both apply at
        # conversion. Outside the early stage a module or class body is not optimized: it
        # runs once, most often while the delayed pass comes, and a rewrite then would put
        # its call names in the namespace the body runs in, where the program sees them in
        # `globals()`. An early rewrite, made before the body runs, stays.
        early = self.table.early.is_early()
        return (
            m.optimizer is not None
            and (early or (self.allowed and not self.table.all_disarmed))
            and (early or site.optimized or bool(state.original.co_flags & _CO_OPTIMIZED))
            and bool(site.active)
            and not site.posts
            and self.check(site, state, m) is None
        )

    def rewrites_breakpoint(self, site: Site, state: CodeState, m: Mechanisms) -> bool:
        """Whether the breakpoint of `site` is armed by a rewrite rather than by the
        breakpoint arch: where that arch taxes every call of unprobed code (a global trace
        function, CPython 3.11), a call of the site's hit in rewritten code serves the new
        calls, and the arch is left only the frames that already run the code it replaces
        (retired versions, until `reap` finds none). The probe stays a breakpoint to the
        kernel's eye (not OPTIMIZED); its hit is the optimized one, so the counts are those
        of the optimizer. Not for a post-handler (the instruction after may be any one)
        nor where the optimizer refuses the address, nor in a module or class body: it
        runs once, most often at once, and its rewrite would put the names its calls read
        in the very namespace the body runs in (the program sees them in `globals()`).
        Nor while optimization is allowed: the optimizer's next pass rewrites the site anyway
        (the kernel's int3 first, its jump later), in one batch with one heap walk, where a
        rewrite at every registration cost 21 ms a probe and a second rewrite (the
        bench's 3.11 scale rows, 2026-12-03)."""
        return (
            m.optimizer is not None
            and not self.allowed
            and not m.breakpoint.capabilities.unprobed_code_untaxed
            and not self.table.early.is_early()
            and bool(state.original.co_flags & _CO_OPTIMIZED)
            and bool(site.active)
            and not site.posts
            and self.check(site, state, m) is None
        )

    def sync(self, state: CodeState, m: Mechanisms) -> None:
        """codestate.sync, leaving to the breakpoint arch the sites whose rewrite failed
        (table lock held)."""
        # Rewriting runs library code a program may probe (enum and contextlib, under
        # `bytecode`): pykprobes' own work, in which a hit records nothing (kprobe_busy: it
        # counts nmissed; hits in other threads take the careful path meanwhile).
        with kprobe_busy():
            try:
                codestate.sync(state, m)
            except Exception as exc:  # noqa: BLE001 - a failed rewrite stays a breakpoint
                for site in state.sites.values():
                    if site.inline:
                        site.optimized = site.inline = False
                        self.reasons[site.addr.key] = f"rewrite failed: {exc}"
                codestate.sync(state, m)

    def try_to_optimize_kprobe(self, site: Site, state: CodeState, m: Mechanisms) -> None:
        """Queue `site` for the next pass if it can be optimized (table lock held)."""
        if not site.optimized and self.optimizable(site, state, m):
            self.queue.add(site)
            self.kick()

    def forget(self, site: Site) -> None:
        """The site is gone (table lock held): off the queue, its reason forgotten (keyed
        by id(original code): it goes with the site, before the id can be reused)."""
        self.queue.discard(site)
        self.reasons.pop(site.addr.key, None)

    # ------------------------------------------------------------------ passes

    def kick(self, delay: float = OPTIMIZE_DELAY) -> None:
        """Start a pass `delay` from now unless one is due (table lock held)."""
        if self.timer is not None:
            return
        self.timer = threading.Timer(delay, self._work)
        self.timer.daemon = True
        self.timer.start()

    def _work(self) -> None:
        # The optimizer's own thread runs no probe (pykprobes is NOPROBE): it must not pay
        # for a trace function installed for new threads (threading.settrace: the 3.11
        # breakpoint arch's, while the probes it optimizes are breakpoints, or a debugger's).
        # Traced, the passes of 10,000 registrations took 2.6x longer (3.11.7).
        sys.settrace(None)
        with self.table.lock:
            self.timer = None
            if self.run_pass():
                self.kick(self._recheck_delay())

    def _recheck_delay(self) -> float:
        self.rechecks += 1
        return RETIRE_RECHECK * (1 << min(self.rechecks - 1, 6))

    def run_pass(self) -> bool:
        """One optimizer pass (kprobe_optimizer), table lock held: optimize the queued
        sites, forget replaced code no frame runs any more. True if it must look again."""
        table = self.table
        m = table.mechanisms()
        queued = list(self.queue)
        self.queue.clear()
        touched: dict[int, CodeState] = {}
        for site in queued:
            state = table.states.get(id(site.addr.code))
            if state is None or state.sites.get(site.addr.offset) is not site:
                continue
            if self.optimizable(site, state, m):
                site.optimized = site.inline = True
                touched[id(state)] = state
        # One heap walk at most for the whole pass (holders.py), done when the block ends:
        # before any retired version is forgotten below.
        with codestate.switching(m):
            for state in touched.values():
                self.sync(state, m)
                for site in state.sites.values():
                    table.update_flags(site)
        if queued:
            self.rechecks = 0
        running = False
        adopting: set[int] = set()
        if table.executing:
            with codestate.switching(m):
                for state in list(table.states.values()):
                    if table.ancestor_executing(state):
                        # Its parent's body is still running from the code it started with,
                        # and may still create functions holding an old version: keep those
                        # versions covered, switch the functions it created so far, and look
                        # again later.
                        codestate.adopt_holders(state, m)
                        adopting.add(id(state))
                        running = True
        return self._prune(m, adopting) or running

    def _prune(self, m: Mechanisms, adopting: set[int]) -> bool:
        """Forget the retired versions no frame runs any more (except those of `adopting`);
        True if some are still running."""
        running = False
        # Only states with retired versions have something to forget (not all of them:
        # with 10,000 probes, every pass would look at 10,000 states).
        for state in list(m.retiring.values()):
            if id(state) not in adopting:
                running |= codestate.prune_retired(state, m)
        return running

    def reap(self) -> None:
        """Mechanisms.reap: after a batch of switches, forget at once the retired versions
        no frame runs, so that the breakpoint arch leaves them (and, with nothing else
        armed, removes its global trace function) now rather than at the next pass; those
        still running are looked at again by the passes (table lock held). Versions a
        running module or class body may still make functions of are left to the passes."""
        if self.reaping:
            return  # prune_retired's own switches end a batch too
        self.reaping = True
        try:
            table = self.table
            m = table.mechanisms()
            adopting = {id(s) for s in m.retiring.values() if table.ancestor_executing(s)} \
                if table.executing else set()
            if self._prune(m, adopting) or adopting:
                self.kick(RETIRE_RECHECK)
        finally:
            self.reaping = False

    def wait_for_kprobe_optimizer(self) -> None:
        """Run the pending optimization now (the kernel flushes the optimizer's work)."""
        with self.table.lock:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.run_pass():
                self.kick(self._recheck_delay())

    def set_optimization(self, enabled: bool) -> None:
        """`debug.kprobes-optimization`: False unoptimizes every probe and keeps new ones
        unoptimized; True optimizes them again."""
        table = self.table
        m = table.mechanisms()
        with table.lock, codestate.switching(m):
            self.allowed = bool(enabled)
            table.arm_all_sites(m)

    def after_fork_in_child(self) -> None:
        """The child has no optimizer thread (it was the parent's): start one if the
        parent had work pending (table lock reinitialised, free)."""
        pending, self.timer = self.timer is not None, None
        if pending:
            with self.table.lock:
                self.kick()
