"""The kprobe table and the registration API (kernel/kprobes.c).

One lock, `_lock` (the kernel's `kprobe_mutex`), guards the table, the code states, the
optimizer's queue and the global switches. It is never held while a handler runs (hits
do not take it) and never while importing (wrapt's rule: import hooks outside locks).

Early probes (the seed, ../shared/seed/early-kprobes-core-logic.patch.txt): in a process whose
boot stage ran (`core.early.start()`), `register_kprobe()` takes `_register_early_kprobe()`
until `init_kprobes()`: the probe gets KPROBE_FLAG_EARLY and an early slot, lives in the
early table (`_early_table`, the seed's `early_kprobe_hlist`), and is optimized at once
(`arch_optimize_kprobes()` without the delayed optimizer), since no breakpoint arch is up:
the mechanisms are then `_early_mech`, whose breakpoint arch is a stand-in that arms
nothing. `init_kprobes()` converts them (`_convert_early_kprobes_locked()`).
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Iterable
from types import CodeType, FunctionType, MethodType, ModuleType
from typing import Any, Final

from pykprobes import insn
from pykprobes.core import codestate, early, kretprobe, resolve
from pykprobes.core.address import ProbeAddress, is_entry
from pykprobes.core.arch import OptimizerArch, select_breakpoint, select_optimizer
from pykprobes.core.blacklist import blacklist_reason
from pykprobes.core.codestate import CodeState, Mechanisms
from pykprobes.core.probe import (
    KPROBE_FLAG_DISABLED,
    KPROBE_FLAG_EARLY,
    KPROBE_FLAG_FTRACE,
    KPROBE_FLAG_GONE,
    KPROBE_FLAG_OPTIMIZED,
    Kprobe,
)
from pykprobes.core.site import Site, kprobe_busy, synchronize_hits
from pykprobes.errors import KprobeError, einval, enoent

#: The kernel's OPTIMIZE_DELAY (5 jiffies): how long the optimizer waits to batch probes.
OPTIMIZE_DELAY: Final = 0.005
#: How often the optimizer looks again for frames still running replaced code.
RETIRE_RECHECK: Final = 0.1

_lock = threading.RLock()
_mech: Mechanisms | None = None
_rejected: dict[str, str] = {}
_states: dict[int, CodeState] = {}  # id(original code) -> state
_table: dict[tuple[int, int], Site] = {}  # ProbeAddress.key -> site
_pending: dict[str, list[tuple[Kprobe, str]]] = {}  # module -> [(probe, qualname)]
_optimizing: set[Site] = set()
_all_disarmed = False
_allow_optimization = True
_timer: threading.Timer | None = None
#: The early table (the seed's early_kprobe_hlist): the sites of early probes, while early.
_early_table: dict[tuple[int, int], Site] = {}
#: The mechanisms while early: the optimizer (loaded at the first rewrite) and a breakpoint
#: stand-in. At conversion the same object gets the real breakpoint arch and becomes `_mech`.
_early_mech: Mechanisms | None = None
_early_mech_lock = threading.Lock()  # never held while taking another lock
#: Serialises init_kprobes() (taken before `_lock`, never after it).
_init_lock = threading.Lock()


# A child made by os.fork() has only the thread that forked: a lock another thread held at
# the fork (the optimizer's, during a pass) would never be released there. So the fork waits
# for the tables to be free, and the child starts with its own locks, and with no optimizer
# timer (its thread is the parent's): one is started if the parent had work pending.
def _before_fork() -> None:
    _lock.acquire()
    _early_mech_lock.acquire()


def _after_fork_in_parent() -> None:
    _early_mech_lock.release()
    _lock.release()


def _after_fork_in_child() -> None:
    global _timer
    _early_mech_lock._at_fork_reinit()  # type: ignore[attr-defined]
    _lock._at_fork_reinit()  # type: ignore[attr-defined]
    pending, _timer = _timer is not None, None
    if pending:
        with _lock:
            _kick_optimizer_locked()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------- init


def init_kprobes() -> None:
    """Initialise the core (idempotent, thread-safe): choose the mechanisms, install the
    module notifier, and convert the early probes into normal ones (the seed's
    init_kprobes() calling convert_early_kprobes()). Without a boot stage, the first use of
    the API calls it; in an early process it is called explicitly, by `pykprobes run`, or
    at the control socket's first request."""
    global _mech, _rejected
    if _mech is not None:
        return
    with _init_lock:
        if _mech is not None:
            return
        # Load the arches before taking the lock: importing under our lock could deadlock
        # with a thread whose import runs the module notifier.
        bp, rejected = select_breakpoint()
        em = _early_mech
        if em is not None and em.optimizer is not None:
            opt: OptimizerArch | None = em.optimizer  # rewritten code came from this one
            rejected_opt: dict[str, str] = {}
        else:
            try:
                opt, rejected_opt = select_optimizer()
            except Exception as exc:  # noqa: BLE001 - no optimizer: breakpoints only
                opt, rejected_opt = None, {"rewrite": str(exc)}
        from pykprobes.core import modwatch

        with _lock:
            _rejected = {**rejected, **rejected_opt}
            if em is None:
                mech = Mechanisms(bp, opt)
                reports: list[str] = []
                notifiers = early.finish()
            else:
                mech = em
                reports, notifiers = _convert_early_kprobes_locked(mech, bp, opt)
            _mech = mech
            modwatch.install()
    _report_unsafe(reports)
    for notify in notifiers:
        try:
            notify()
        except Exception as exc:  # noqa: BLE001 - a notifier's failure is reported, not raised
            _stderr(f"pykprobes: early events could not be moved into the trace: {exc!r}\n")


def kprobes_is_early() -> bool:
    """The seed's kprobes_is_early(): the boot stage ran and init_kprobes() has not."""
    return early.is_early()


def _m() -> Mechanisms:
    m = _mech
    if m is not None:
        return m
    if early.is_early():
        return _early_mechanisms()
    init_kprobes()
    assert _mech is not None
    return _mech


def _early_mechanisms() -> Mechanisms:
    global _early_mech
    with _early_mech_lock:
        if _early_mech is None:
            _early_mech = Mechanisms(early.EarlyBreakpoint(), None)
        return _early_mech


#: Why the optimizer could not be loaded while early (the early probes then cannot be armed).
_early_opt_error: str | None = None


def _load_early_optimizer() -> None:
    """Load the optimizer for the early probes, outside the lock (it imports the rewrite arch
    and `bytecode`): done at the first early probe whose code must be rewritten, so that a
    process whose early targets are never imported never loads it."""
    global _early_opt_error
    em = _early_mechanisms()
    if em.optimizer is not None or _early_opt_error is not None:
        return
    try:
        opt, _ = select_optimizer()
    except Exception as exc:  # noqa: BLE001 - reported when an early probe needs it
        _early_opt_error = str(exc)
        return
    with _lock:
        if em.optimizer is None:
            em.optimizer = opt


def mechanisms_capabilities() -> dict[str, bool]:
    """The breakpoint arch's measured capabilities."""
    caps: dict[str, bool] = getattr(_m().breakpoint, "capabilities", {})
    return caps


def mechanisms() -> tuple[str, str | None, dict[str, str]]:
    """(breakpoint arch, optimizer arch or None, {rejected arch: reason})."""
    m = _m()
    return m.breakpoint.name, m.optimizer.name if m.optimizer else None, dict(_rejected)


# --------------------------------------------------------------------------- resolution


def _original(code: CodeType) -> CodeType:
    """Map a running version (a rewritten copy) back to the compiled original."""
    state = _m().versions.get(id(code))
    if state is not None and (state.current.code is code or
                              any(v.code is code for v in state.retired)):
        return state.original
    return code


def _code_from_addr(addr: Any) -> tuple[CodeType, str | None]:
    """The original code `addr` names, and the module name a function gives."""
    if isinstance(addr, ProbeAddress):
        return _original(addr.code), None
    obj = addr
    if isinstance(obj, (staticmethod, classmethod, MethodType)):
        obj = obj.__func__
    if isinstance(obj, FunctionType):
        return _original(obj.__code__), obj.__module__ or "?"
    if isinstance(obj, CodeType):
        return _original(obj), None
    raise einval(f"addr must be a function, a code object or a ProbeAddress, not "
                 f"{type(addr).__name__}")


def _target_from_addr(addr: Any) -> resolve.Target:
    """The target of `addr`, with the code objects holding it when it is nested code in
    an imported module (resolve.holder_chain): without them, functions made from its
    parent's constants after the optimizer ran would run the original code, unprobed."""
    code, module = _code_from_addr(addr)
    mod = resolve.module_of_file(code.co_filename)
    if module is None:
        module = mod.__name__ if mod is not None else code.co_filename
    target = resolve.Target(module, code)
    return target if mod is None else resolve.holder_chain(target, mod, _original)


def _check_offset_value(offset: object, symbol: str) -> int:
    """What can be checked of an offset without its code (a probe waiting for its module
    is checked this far at registration, and the rest at the import)."""
    if not isinstance(offset, int) or offset < 0:
        raise einval(f"{symbol}: offset {offset!r} must be a non-negative int")
    return offset


def _check_offset(code: CodeType, offset: int, symbol: str) -> int:
    _check_offset_value(offset, symbol)
    try:
        if is_entry(code, offset):
            return 0  # anywhere in the prologue is the function's entry
    except ValueError as exc:
        raise einval(f"{symbol}: {exc}") from exc
    ins = insn.insn_at(code, offset)
    if ins is None:
        if offset >= len(code.co_code):
            raise einval(f"{symbol}+{offset}: offset past the end of the code "
                         f"({len(code.co_code)} bytes)")
        raise einval(f"{symbol}+{offset}: offset is not on an instruction boundary")
    # The offset `dis` shows for an instruction with EXTENDED_ARG prefixes is its opcode's:
    # the probe is at the instruction, whose address is its first prefix.
    return ins.start


# --------------------------------------------------------------------------- register


def register_kprobe(p: Kprobe) -> None:
    """Register and arm `p` (unless it is DISABLED). Raises KprobeError.

    While early, this is the seed's register_early_kprobe() (`_register_early_kprobe`)."""
    if early.is_early() and _register_early_kprobe(p):
        return
    m = _m()
    resolved = _resolve_for_register(p)
    if resolved is not None:
        with _lock:
            _register_target_locked(p, *resolved, m)


def _resolve_for_register(p: Kprobe) -> tuple[resolve.Target, str] | None:
    """Check `p` and find its target, outside the lock (resolving may import). None when
    its module is not imported yet: `p` is then registered, pending."""
    if p.flags & KPROBE_FLAG_EARLY:
        # The seed's WARN(p->flags & KPROBE_FLAG_EARLY, ...); registration goes on.
        _warn("register early kprobe after kprobes initialized", stacklevel=4)
    if p.registered:
        raise einval(f"probe {p.symbol} is already registered")
    if (p.symbol_name is None) == (p.addr is None):
        raise einval("give exactly one of symbol_name and addr")
    p.flags &= KPROBE_FLAG_DISABLED  # the kernel masks every other flag
    p.nmissed = 0
    if p.symbol_name is not None:
        module, qualname = resolve.split_symbol(p.symbol_name)
        reason = blacklist_reason(module, None)
        if reason is not None:
            raise einval(f"{p.symbol_name}: cannot probe {module} ({reason})")
        mod = None if module in _expected else sys.modules.get(module)
        if mod is None:
            if module not in _expected and not resolve.module_exists(module):
                raise enoent(f"{p.symbol_name}: no module named {module!r}")
            _check_offset_value(p.offset, f"{module}:{qualname}")
            _register_pending(p, module, qualname)
            return None
        target = resolve.holder_chain(resolve.resolve_imported(mod, qualname, _original),
                                      mod, _original)
        symbol = f"{module}:{qualname}"
        _watch(module)
    else:
        target = _target_from_addr(p.addr)
        symbol = f"{target.module}:{target.code.co_qualname}"
        if isinstance(p.addr, ProbeAddress):
            p.offset = p.addr.offset + p.offset
        reason = blacklist_reason(target.module, target.code)
        if reason is not None:
            raise einval(f"{symbol}: cannot probe it ({reason})")
        _watch(target.module)
    return target, symbol


def _register_early_kprobe(p: Kprobe) -> bool:
    """The seed's register_early_kprobe(): refuse what the early path cannot serve, take an
    early slot, prepare the optimized probe and optimize it at once. Returns False, having
    done nothing, if the process stopped being early meanwhile (init_kprobes() ran in
    another thread): the caller then registers `p` normally.

    The seed resolves the address before its early branch (kprobe_addr()), so a symbol that
    does not resolve costs no slot; then: EINVAL for a post_handler or a DISABLED probe,
    ENOMEM "No enough early kprobe slots.", and every failure after that frees the slot.
    A module not imported yet makes a pending probe, armed (rewritten) when it is imported,
    before its body runs; one not found on sys.path yet may live in the directory the
    program will add first (the boot stage runs before Python adds it): that counts too."""
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
        _check_early_blacklists(module, None, symbol)
        if early.imported_by_optimizer(module):
            _load_early_optimizer()  # it imports the module, which is then probed in place
        mod = None if module in _expected else sys.modules.get(module)
        if mod is None:
            if module not in _expected and not _early_module_exists(module):
                raise enoent(f"{p.symbol_name}: no module named {module!r}")
            _check_offset_value(offset, symbol)
        else:
            target = resolve.holder_chain(
                resolve.resolve_imported(mod, qualname, _original), mod, _original)
    else:
        target = _target_from_addr(p.addr)
        module = target.module
        symbol = f"{target.module}:{target.code.co_qualname}"
        if isinstance(p.addr, ProbeAddress):
            offset = p.addr.offset + p.offset
        _check_early_blacklists(target.module, target.code, symbol)
    # The seed sets KPROBE_FLAG_EARLY, then refuses.
    p.flags |= KPROBE_FLAG_EARLY
    if p.post_handler is not None:
        raise einval(f"{symbol}+{offset}: an early kprobe cannot have a post_handler")
    if p.flags & KPROBE_FLAG_DISABLED:
        raise einval(f"{symbol}+{offset}: an early kprobe cannot be registered disabled")
    from pykprobes.core import modwatch

    if target is not None:
        _load_early_optimizer()
    m = _early_mechanisms()
    with _lock:
        if not early.is_early():
            p.flags &= ~KPROBE_FLAG_EARLY
            return False
        if not early.alloc_slot(p):
            raise KprobeError(errno.ENOMEM, early.NO_SLOT_MESSAGE)
        p.flags = KPROBE_FLAG_EARLY  # DISABLED was refused; every other flag is masked
        p.nmissed = 0
        try:
            if target is None:
                p.offset = offset
                _pending.setdefault(module, []).append((p, qualname))
                p._site = _PendingSite(symbol, offset)
            else:
                if isinstance(p.addr, ProbeAddress):
                    p.offset = offset
                _register_target_locked(p, target, symbol, m)
        except BaseException:
            early.free_slot(p)  # the seed's error paths: free_slot
            raise
    modwatch.watch(module, sys.modules.get(module) if target is not None else None)
    modwatch.install()  # the module notifier: init_kprobes() installs it otherwise
    return True


def _check_early_blacklists(module: str, code: CodeType | None, symbol: str) -> None:
    reason = blacklist_reason(module, code) or early.blacklist_reason(module)
    if reason is not None:
        raise einval(f"{symbol}: cannot probe {module} ({reason})")


def _early_module_exists(module: str) -> bool:
    if resolve.module_exists(module):
        return True
    path0 = early.main_path0
    if not path0:
        return False
    import importlib.machinery

    top = module.partition(".")[0]
    return importlib.machinery.PathFinder.find_spec(top, [path0]) is not None


def _watch(module: str) -> None:
    """Tell the module notifier, so that a reload or a removal marks the probes GONE."""
    from pykprobes.core import modwatch

    modwatch.watch(module, sys.modules.get(module))


def _register_pending(p: Kprobe, module: str, qualname: str) -> None:
    from pykprobes.core import modwatch

    with _lock:
        _pending.setdefault(module, []).append((p, qualname))
        p._site = _PendingSite(f"{module}:{qualname}", p.offset)
    modwatch.watch(module)


class _PendingSite:
    """Stands in for the site of a probe whose module is not imported yet."""

    __slots__ = ("addr", "symbol")

    def __init__(self, symbol: str, offset: int) -> None:
        self.symbol = symbol
        self.addr = _NoAddr(offset)


class _NoAddr:
    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset

    hexid = "0" * 16


def _state_for_locked(target: resolve.Target, m: Mechanisms) -> CodeState:
    state = _states.get(id(target.code))
    if state is not None:
        return state
    state = CodeState(target.module, target.code)
    _states[id(target.code)] = state
    m.versions[id(target.code)] = state
    if target.parent is not None and target.const_index is not None:
        parent = _state_for_locked(target.parent, m)
        state.parent = parent
        state.const_index = target.const_index
        parent.children[target.const_index] = state
    return state


def _register_target_locked(
    p: Kprobe, target: resolve.Target, symbol: str, m: Mechanisms
) -> None:
    code = target.code
    if blacklist_reason(target.module, code) is not None:
        raise einval(f"{symbol}: cannot probe it ({blacklist_reason(target.module, code)})")
    offset = _check_offset(code, p.offset, symbol)
    addr = ProbeAddress(code, offset)
    table = _site_table()
    site = table.get(addr.key)
    if site is not None and p in site.probes:
        raise einval(f"probe {symbol}+{offset} is already registered")
    state = _state_for_locked(target, m)
    if site is None:
        site = Site(addr, symbol)
        table[addr.key] = site
        state.sites[offset] = site
    given = (p.addr, p.offset)
    site.probes.append(p)
    p.addr = addr
    p.offset = offset
    p._site = site
    try:
        kretprobe.attach_locked(p, state)
        _refresh_site_locked(site, state, m)
        if early.is_early() and site.active and not site.optimized:
            # arch_prepare_optimized_kprobe() failed: an early probe has no other mechanism.
            raise einval(f"{symbol}+{offset}: Failed to prepare optimized kprobe. "
                         f"({_unoptimized_reason(site, state, m)})")
    except BaseException as exc:
        # The mechanism refused the address (prepare failed): undo, as the kernel's error
        # paths do, and leave p as the caller gave it.
        _unregister(p, keep_slot=True)
        p.addr, p.offset = given
        if early.is_early() and isinstance(exc, Exception) and \
                not isinstance(exc, KprobeError):
            # The rewrite itself failed while early (no breakpoint to fall back on).
            raise einval(f"{symbol}+{offset}: Failed to prepare optimized kprobe. "
                         f"({exc})") from exc
        raise


def _site_table() -> dict[tuple[int, int], Site]:
    """The table new sites go into: the early table while early, else the main one."""
    return _early_table if early.is_early() else _table


def _unoptimized_reason(site: Site, state: CodeState, m: Mechanisms) -> str:
    if m.optimizer is None:
        return f"the optimizer is not available: {_early_opt_error or 'not loaded'}"
    if site.posts:
        return "it has a post_handler"
    return _opt_check(site, state, m) or "not optimizable"


def _refresh_site_locked(site: Site, state: CodeState, m: Mechanisms) -> None:
    """Recompute what a hit runs, re-arm, and queue or cancel optimization."""
    gone = any(p.flags & KPROBE_FLAG_GONE for p in site.probes)
    if kprobes_all_disarmed() or gone:
        site.set_active(())
    else:
        site.set_active(tuple(p for p in site.probes if not p.is_disabled()))
    kretprobe.refresh_locked(state)
    if site.optimized and not _optimizable_locked(site, state, m):
        site.optimized = False  # unoptimize at once (the kernel's forced unoptimize)
    if early.is_early() and not site.optimized and _optimizable_locked(site, state, m):
        # While early the seed calls arch_optimize_kprobes() at once: no optimizer thread,
        # and no breakpoint to serve the probe until it runs.
        site.optimized = True
    codestate.sync(state, m)
    if not site.optimized and _optimizable_locked(site, state, m):
        _optimizing.add(site)
        _kick_optimizer_locked()
    _update_flags(site)


def _optimizable_locked(site: Site, state: CodeState, m: Mechanisms) -> bool:
    # While early, the seed's optimize_kprobe() ignores kprobes_allow_optimization and
    # kprobes_all_disarmed: early probes have no other mechanism. Both apply at conversion.
    return (
        m.optimizer is not None
        and (early.is_early() or (_allow_optimization and not _all_disarmed))
        and bool(site.active)
        and not site.posts
        and _opt_check(site, state, m) is None
    )


_opt_reasons: dict[tuple[int, int], str | None] = {}


def _opt_check(site: Site, state: CodeState, m: Mechanisms) -> str | None:
    key = site.addr.key
    if key not in _opt_reasons:
        assert m.optimizer is not None
        _opt_reasons[key] = m.optimizer.check_optimizable(state.original, site.addr.offset)
    return _opt_reasons[key]


def _update_flags(site: Site) -> None:
    for p in site.probes:
        flags = p.flags & (KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE | KPROBE_FLAG_EARLY)
        if site.optimized and p in site.active:
            flags |= KPROBE_FLAG_OPTIMIZED
        if site.entry_event and p in site.active:
            flags |= KPROBE_FLAG_FTRACE
        p.flags = flags


# --------------------------------------------------------------------------- optimizer


def _kick_optimizer_locked(delay: float = OPTIMIZE_DELAY) -> None:
    global _timer
    if _timer is not None:
        return
    _timer = threading.Timer(delay, _optimizer_work)
    _timer.daemon = True
    _timer.start()


def _optimizer_work() -> None:
    global _timer
    # The optimizer's own thread runs no probe (pykprobes is NOPROBE): it must not pay for
    # a trace function installed for new threads (threading.settrace: the 3.11 breakpoint
    # arch's, while the probes it optimizes are breakpoints, or a debugger's). Traced, the
    # passes of 10,000 registrations took 2.6x longer (3.11.7).
    sys.settrace(None)
    with _lock:
        _timer = None
        again = _optimize_locked()
        if again:
            _kick_optimizer_locked(_recheck_delay())


#: Consecutive passes that found replaced code still possibly in use. Each such pass scans
#: the heap (gc.get_referrers), so the re-checks back off: 0.1 s, 0.2 s, ... up to 6.4 s.
_rechecks = 0


def _recheck_delay() -> float:
    global _rechecks
    _rechecks += 1
    return RETIRE_RECHECK * 2 ** min(_rechecks - 1, 6)


def _optimize_locked() -> bool:
    """One optimizer pass (kprobe_optimizer): optimize the queued sites, forget replaced
    code no frame runs any more. True if it must look again later."""
    m = _m()
    queued = list(_optimizing)
    _optimizing.clear()
    touched: dict[int, CodeState] = {}
    for site in queued:
        state = _states.get(id(site.addr.code))
        if state is None or state.sites.get(site.addr.offset) is not site:
            continue
        if _optimizable_locked(site, state, m):
            site.optimized = True
            touched[id(state)] = state
    # One heap walk at most for the whole pass (holders.py), done when the block ends:
    # before any retired version is forgotten below.
    with codestate.switching(m):
        for state in touched.values():
            # Rewriting runs library code a program may probe (enum and contextlib, under
            # `bytecode`): pykprobes' own work, in which a hit records nothing (kprobe_busy:
            # it counts nmissed; hits in other threads take the careful path meanwhile).
            with kprobe_busy():
                try:
                    codestate.sync(state, m)
                except Exception as exc:  # noqa: BLE001 - a failed rewrite stays a breakpoint
                    for site in state.sites.values():
                        if site.optimized:
                            site.optimized = False
                            _opt_reasons[site.addr.key] = f"rewrite failed: {exc}"
                    codestate.sync(state, m)
            for site in state.sites.values():
                _update_flags(site)
    global _rechecks
    if queued:
        _rechecks = 0
    running = False
    adopting: set[int] = set()
    if _executing:
        with codestate.switching(m):
            for state in list(_states.values()):
                if _ancestor_executing(state):
                    # Its parent's body is still running from the code it started with,
                    # and may still create functions holding an old version: keep those
                    # versions covered, switch the functions it created so far, and look
                    # again later.
                    codestate.adopt_holders(state, m)
                    adopting.add(id(state))
                    running = True
    # Only states with retired versions have something to forget (not all of them: with
    # 10,000 probes, every pass would look at 10,000 states).
    for state in list(m.retiring.values()):
        if id(state) not in adopting:
            running |= codestate.prune_retired(state, m)
    return running


#: id() of the module (or class body) codes whose body is running now, between
#: module_code_loaded() and module_executed().
_executing: set[int] = set()


def _ancestor_executing(state: CodeState) -> bool:
    parent = state.parent
    while parent is not None:
        if id(parent.original) in _executing:
            return True
        parent = parent.parent
    return False


def wait_for_kprobe_optimizer() -> None:
    """Run the pending optimization now (the kernel flushes the optimizer's work)."""
    global _timer
    with _lock:
        if _timer is not None:
            _timer.cancel()
            _timer = None
        if _optimize_locked():
            _kick_optimizer_locked(_recheck_delay())


def set_optimization(enabled: bool) -> None:
    """`debug.kprobes-optimization`: False unoptimizes every probe and keeps new ones
    unoptimized; True optimizes them again."""
    global _allow_optimization
    m = _m()
    with _lock, codestate.switching(m):
        _allow_optimization = bool(enabled)
        for state in list(_states.values()):
            for site in state.sites.values():
                _refresh_site_locked(site, state, m)


def optimization_enabled() -> bool:
    return _allow_optimization


# --------------------------------------------------------------------------- unregister


def unregister_kprobe(p: Kprobe) -> None:
    """Disarm and remove `p`; once no probe needs it, the code is the original again.
    When it returns, no handler of `p` runs any more (hits in flight have finished).
    An early probe's slot is returned (the seed's free_aggr_kprobe -> ek_free_early_kprobe)."""
    _unregister(p)
    synchronize_hits()


def _unregister(
    p: Kprobe, keep_slot: bool = False, emptied: dict[int, CodeState] | None = None
) -> None:
    """Remove `p`. With `emptied`, a code state that lost a site is put there instead of
    being synced: the caller syncs each once (a batch removing n sites of one code would
    otherwise rebuild it n times). Until then its running versions still call or break at
    the removed sites, which have no active probe left: nothing runs there."""
    m = _m()
    with _lock:
        site = p._site
        if site is not None and not keep_slot:
            early.free_slot(p)
        if isinstance(site, _PendingSite):
            module = site.symbol.partition(":")[0]
            entries = _pending.get(module, [])
            _pending[module] = [e for e in entries if e[0] is not p]
            if not _pending[module]:
                del _pending[module]
            p._site = None
            return
        if site is None:
            raise einval(f"probe {p.symbol} is not registered")
        site.probes.remove(p)
        p._site = None
        p.flags &= ~(KPROBE_FLAG_OPTIMIZED | KPROBE_FLAG_FTRACE)
        state = _states[id(site.addr.code)]
        kretprobe.detach_locked(p, state)
        if not site.probes:
            site.set_active(())
            site.optimized = False
            del _site_table()[site.addr.key]
            # Keyed by id(original code): it goes with the site, before the id can be reused.
            _opt_reasons.pop(site.addr.key, None)
            del state.sites[site.addr.offset]
            _optimizing.discard(site)
            if emptied is not None:
                emptied[id(state)] = state
                return
            _sync_emptied_locked([state], m)
        else:
            _refresh_site_locked(site, state, m)


def _sync_emptied_locked(states: Iterable[CodeState], m: Mechanisms) -> None:
    """Sync code states that lost sites, and forget those left without any."""
    for state in states:
        if _states.get(id(state.original)) is state:
            codestate.sync(state, m)
            _drop_unused_locked(state, m)
    _release_if_empty(_table, _early_table, _opt_reasons, _states, m.versions, m.retiring)


def _release_if_empty(*tables: dict[Any, Any]) -> None:
    """A dict keeps the size it grew to when its entries are deleted, and clear() gives it
    back: after 10,000 probes were unregistered, ~150 bytes per probe stayed allocated in
    these tables (bench/suite.py run_memory, 3.12.1)."""
    for table in tables:
        if not table:
            table.clear()


def _drop_unused_locked(state: CodeState, m: Mechanisms) -> None:
    # Retired versions need nothing once no site is left: their call sequences call
    # sites that are inactive now, and there is no breakpoint to keep for them.
    while state.unused and state.current.code is state.original:
        del _states[id(state.original)]
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


def register_kprobes(probes: Iterable[Kprobe]) -> None:
    """All or nothing: on an error, the probes already registered are unregistered.

    The targets are resolved first, outside the lock (resolving may import); then the
    probes are registered under one hold of the lock, switching functions with one heap
    walk at most."""
    probes = list(probes)
    if early.is_early():
        _register_one_by_one(probes)
        return
    m = _m()
    done: list[Kprobe] = []  # registered (pending ones included)
    resolved: list[tuple[Kprobe, resolve.Target, str, tuple[Any, int, int]]] = []
    try:
        for p in probes:
            given = (p.addr, p.offset, p.flags)
            target = _resolve_for_register(p)
            if target is None:
                done.append(p)
            else:
                resolved.append((p, *target, given))
        with _lock, codestate.switching(m):
            try:
                for p, target, symbol, _ in resolved:
                    if p.registered:  # listed twice
                        raise einval(f"probe {p.symbol} is already registered")
                    _register_target_locked(p, target, symbol, m)
                    done.append(p)
            except BaseException:
                for p in reversed(done):
                    _unregister(p)
                done.clear()
                raise
    except BaseException:
        with _lock, codestate.switching(m):
            for p in reversed(done):
                _unregister(p)
        synchronize_hits()
        # The probes resolved but not registered are left as the caller gave them.
        for p, _, _, (addr, offset, flags) in resolved:
            if not p.registered:
                p.addr, p.offset, p.flags = addr, offset, flags
        raise


def _register_one_by_one(probes: list[Kprobe]) -> None:
    done: list[Kprobe] = []
    try:
        for p in probes:
            register_kprobe(p)
            done.append(p)
    except BaseException:
        for p in reversed(done):
            unregister_kprobe(p)
        raise


def unregister_kprobes(probes: Iterable[Kprobe]) -> None:
    """Unregister each registered probe, then wait once for the hits in flight (the
    kernel's batch unregistration does one RCU sync), and switch the functions back to
    their code with one heap walk at most."""
    probes = list(probes)
    m = _m()
    emptied: dict[int, CodeState] = {}
    with _lock, codestate.switching(m):
        try:
            for p in probes:
                if p.registered:
                    _unregister(p, emptied=emptied)
        finally:
            _sync_emptied_locked(emptied.values(), m)
    synchronize_hits()


# --------------------------------------------------------------------------- enable


def _registered_site(p: Kprobe) -> Site:
    site = p._site
    if site is None:
        raise einval(f"probe {p.symbol} is not registered")
    return site  # type: ignore[no-any-return]


def disable_kprobe(p: Kprobe) -> None:
    m = _m()
    with _lock:
        site = _registered_site(p)
        p.flags |= KPROBE_FLAG_DISABLED
        if isinstance(site, Site):
            _refresh_site_locked(site, _states[id(site.addr.code)], m)


def enable_kprobe(p: Kprobe) -> None:
    m = _m()
    with _lock:
        site = _registered_site(p)
        if p.flags & KPROBE_FLAG_GONE:
            raise einval(f"probe {p.symbol} is gone: it cannot be enabled")
        p.flags &= ~KPROBE_FLAG_DISABLED
        if isinstance(site, Site):
            _refresh_site_locked(site, _states[id(site.addr.code)], m)


def arm_all_kprobes() -> None:
    """debugfs `kprobes/enabled` = 1: arm every probe again (disabled ones stay disabled)."""
    _set_all_disarmed(False)


def disarm_all_kprobes() -> None:
    """debugfs `kprobes/enabled` = 0: disarm every probe, keeping each one's state."""
    _set_all_disarmed(True)


def _set_all_disarmed(value: bool) -> None:
    global _all_disarmed
    m = _m()
    with _lock, codestate.switching(m):
        _all_disarmed = value
        for state in list(_states.values()):
            for site in list(state.sites.values()):
                _refresh_site_locked(site, state, m)


def kprobes_all_disarmed() -> bool:
    return _all_disarmed and not early.is_early()


# --------------------------------------------------------------------------- lookup


def get_kprobe(addr: Any, offset: int = 0) -> Kprobe | None:
    """The (first) probe registered at an address, or None. `addr` is a ProbeAddress,
    or a function or code object with `offset`."""
    _m()
    check_gone()
    try:
        code, _ = _code_from_addr(addr)
    except KprobeError:
        return None
    if isinstance(addr, ProbeAddress):
        offset = addr.offset + offset
    key = (id(code), offset)
    with _lock:
        if early.is_early():
            # The seed's get_kprobe() walks early_kprobe_hlist while early.
            for p in early.slot_probes():
                if isinstance(p._site, Site) and p._site.addr.key == key:
                    return p
            return None
        site = _table.get(key)
        return site.probes[0] if site and site.probes else None


def all_probes() -> list[Kprobe]:
    with _lock:
        probes = [p for t in (_table, _early_table) for site in t.values() for p in site.probes]
        probes += [p for entries in _pending.values() for p, _ in entries]
    return probes


def list_kprobes() -> str:
    """The `kprobes/list` text: `ADDR  k  SYMBOL+OFFS  [GONE][DISABLED][OPTIMIZED][FTRACE]`."""
    _m()
    check_gone()
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
        lines.append(f"{site.addr.hexid if isinstance(site, Site) else _NoAddr.hexid}  "
                     f"{kind}  {site.symbol}+{site.addr.offset}  {flags}".rstrip())
    return "\n".join(lines) + ("\n" if lines else "")


# --------------------------------------------------------------------------- modules


def module_object(name: str) -> ModuleType | None:
    return None if name in _expected else sys.modules.get(name)


#: Modules whose code is about to run outside the import system (`pykprobes run` runs the
#: program as `__main__`): probes on them wait for `module_code_loaded()`.
_expected: set[str] = set()


def expect_module(name: str, path: str | None = None) -> None:
    """Declare that `name`'s code will be handed over with `module_code_loaded()` (even if a
    module of that name is in sys.modules now): probes on it wait for that. `path`, the
    source file, lets line targets in it wait too (see core/lines.py)."""
    with _lock:
        _expected.add(name)
        if path is not None:
            from pykprobes.core import lines

            lines.expect_file(path, name)


def pending_modules() -> set[str]:
    with _lock:
        return set(_pending)


def probed_modules() -> set[str]:
    with _lock:
        return {s.module for s in _states.values()} | set(_pending)


def module_code_loaded(module: str, code: CodeType) -> CodeType:
    """The module notifier: `module`'s code is about to run (import). Arm its pending
    probes on the code objects it will create, and return the code to run (rewritten
    when the optimizer already handles a probe in it; early probes need that)."""
    if early.is_early() and module in _pending:
        _load_early_optimizer()  # before the lock: it imports
    m = _m()
    with _lock:
        _expected.discard(module)
        unresolved: list[tuple[Kprobe, str]] = []
        for p, qualname in _pending.pop(module, []):
            if p.flags & KPROBE_FLAG_GONE:
                unresolved.append((p, qualname))
                continue
            pending_site, p._site = p._site, None
            try:
                target = resolve.resolve_in_code(module, code, qualname)
                _refuse_class(target, module, qualname, p.offset)
                _register_target_locked(p, target, f"{module}:{qualname}", m)
            except Exception as exc:  # noqa: BLE001 - never break the program's import
                # It stays registered, GONE, as a kernel probe whose text went away.
                p._site = pending_site
                p.flags |= KPROBE_FLAG_GONE
                unresolved.append((p, qualname))
                _warn(f"pykprobes: probe on {module}:{qualname} could not be armed when "
                      f"{module} was imported: {exc}")
        if unresolved:
            _pending[module] = unresolved
        root = _states.get(id(code))
        if root is None:
            return code
        _executing.add(id(code))
        return root.current.code


def _refuse_class(target: resolve.Target, module: str, qualname: str,
                         offset: int) -> None:
    """A class named by a probe waiting for its module is refused as an imported module's
    class is (resolve_imported): its body runs once. A line of the body is another
    matter (a line target in a file not imported yet): only the body's entry is the
    class's name."""
    if qualname != resolve.MODULE_CODE and resolve.is_class_body(target.code) and \
            isinstance(offset, int) and is_entry(target.code, offset):
        raise einval(f"{module}:{qualname} is a class: probe one of its methods")


def check_waiting_target(module: str, qualname: str, offset: int) -> CodeType | None:
    """What a probe on `module:qualname+offset`, registered while the module is not
    imported, will meet at the import, found now from the module's compiled source
    (nothing imported, nothing run): the code it would sit in, or the KprobeError the
    import would report (module_code_loaded); None when there is no source to compile."""
    symbol = f"{module}:{qualname}"
    _check_offset_value(offset, symbol)
    from pykprobes.core import lines  # lines imports tokenize: not at the boot stage

    code = lines.module_code_before_import(module, symbol)
    if code is None:
        return None
    target = resolve.resolve_in_code(module, code, qualname)
    _refuse_class(target, module, qualname, offset)
    reason = blacklist_reason(module, target.code)
    if reason is not None:
        raise einval(f"{symbol}: cannot probe it ({reason})")
    _check_offset(target.code, offset, symbol)
    return target.code


def module_executed(module: str, code: CodeType) -> None:
    """After the body ran: the functions it created now hold their code, so code states
    whose holder was the module's (or a class body's) constants are held by functions."""
    m = _m()
    with _lock, codestate.switching(m):
        _executing.discard(id(code))
        # The module is in sys.modules now, whatever it was when its code was rewritten.
        for state in _states.values():
            if state.module == module:
                codestate.share_names(state, m)
        root = _states.get(id(code))
        if root is None:
            return
        _detach_executed_locked(root, m)


def _detach_executed_locked(state: CodeState, m: Mechanisms) -> None:
    # Module and class bodies run once: their children are held by objects from now on.
    for index, child in list(state.children.items()):
        if _runs_once(child.original):
            _detach_executed_locked(child, m)
        child.parent = None
        child.const_index = None
        del state.children[index]
        codestate.adopt_holders(child, m)
    # Without sites or children, nothing maps its versions back any more, nor waits for
    # them to retire.
    if not state.sites and not state.children and \
            _states.pop(id(state.original), None) is state:
        # The original too: the optimizer may have forgotten it as a retired version
        # already (the body no longer ran it) while a rewritten copy is current.
        for version in (state.current, *state.retired):
            m.versions.pop(id(version.code), None)
        if m.versions.get(id(state.original)) is state:
            del m.versions[id(state.original)]
        codestate.set_retired(state, [], m)


def _runs_once(code: CodeType) -> bool:
    return not (code.co_flags & 0x01)  # not CO_OPTIMIZED: a module or class body


def module_gone(module: str) -> None:
    """The module was removed or reloaded: its probes are GONE (kill_kprobe)."""
    m = _m()
    with _lock, codestate.switching(m):
        for state in list(_states.values()):
            if state.module != module:
                continue
            for site in list(state.sites.values()):
                for p in site.probes:
                    p.flags |= KPROBE_FLAG_GONE
                site.optimized = False
                _refresh_site_locked(site, state, m)


def check_gone() -> None:
    """Mark GONE the probes of modules that left sys.modules since they were probed."""
    from pykprobes.core import modwatch

    for module in modwatch.vanished():
        module_gone(module)


def _warn(message: str, stacklevel: int = 2) -> None:
    import warnings

    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    except Exception:  # noqa: BLE001 - warnings as errors must not break an import
        pass


def _stderr(text: str) -> None:
    """Write to stderr whatever its state (None under pythonw, closed at exit)."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(text)
            sys.stderr.flush()
    except Exception:  # noqa: BLE001 - nowhere left to report it
        pass


# --------------------------------------------------------------------------- conversion


def _convert_early_kprobes_locked(
    m: Mechanisms, bp: Any, opt: OptimizerArch | None
) -> tuple[list[str], list[Any]]:
    """The seed's convert_early_kprobes(), `_lock` held: every early probe becomes a normal
    one. Returns the unsafe reports and the early notifiers to run once the lock is released.

    Each early site is checked again as check_kprobe_address_safe() does (the blacklist may
    have grown: @nokprobe); an unsafe one is removed, or the process panics with
    PYKPROBES_PANIC_ON_UNSAFE=1. The others move into the main table unchanged: the same
    Site objects and the same rewritten code, so a thread hitting one meanwhile goes on
    hitting it (no gap). The early slots are returned, the real breakpoint arch takes over
    from the stand-in (it arms what running versions need), and the global switches set
    while early (set_optimization, disarm_all_kprobes) apply from now on."""
    # Nothing was armed by the stand-in: forget what it was asked to arm.
    for state in _states.values():
        state.armed.clear()
        state.ret_armed.clear()
    m.breakpoint = bp
    if m.optimizer is None:
        m.optimizer = opt
    reports: list[str] = []
    for site in list(_early_table.values()):
        state = _states.get(id(site.addr.code))
        reason = _address_unsafe_locked(site, state)
        if reason is None:
            continue
        message = f"Insert kprobe at {site.symbol}+{site.addr.offset} is not safe! ({reason})"
        if early.panic_on_unsafe:
            _panic(message)
        for p in list(site.probes):
            _unregister(p)  # frees its slot
        reports.append(message)
    _table.update(_early_table)
    _early_table.clear()
    notifiers = early.finish()  # not early any more; every slot is free
    with codestate.switching(m):
        for state in list(_states.values()):
            for site in list(state.sites.values()):
                _refresh_site_locked(site, state, m)
            codestate.reconcile_breakpoints(state, m)
    if m.retiring:
        _kick_optimizer_locked()  # retire what no frame runs any more
    return reports, notifiers


def _address_unsafe_locked(site: Site, state: CodeState | None) -> str | None:
    """check_kprobe_address_safe() for a converted early site: why it is not safe now."""
    if state is None:
        return "its code is not tracked"
    versions = [state.original, state.current.code, *(v.code for v in state.retired)]
    for code in versions:
        reason = blacklist_reason(state.module, code)
        if reason is not None:
            return reason
    try:
        _check_offset(state.original, site.addr.offset, site.symbol)
    except KprobeError as exc:
        return str(exc)
    return None


def _panic(message: str) -> None:
    """The kernel panics on an unsafe early probe; with PYKPROBES_PANIC_ON_UNSAFE=1 so do we."""
    import os

    text = f"pykprobes: Kernel panic - not syncing: {message}\n"
    try:
        os.write(2, text.encode("utf-8", "replace"))
    finally:
        os.abort()


def _report_unsafe(reports: list[str]) -> None:
    for message in reports:
        _stderr(f"pykprobes: {message}: the early probe is removed\n")


__all__ = [
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
