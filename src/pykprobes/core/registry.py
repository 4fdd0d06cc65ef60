"""The kprobe table and the registration API (kernel/kprobes.c).

One lock, `_lock` (the kernel's `kprobe_mutex`), guards the table, the code states, the
optimizer's queue and the global switches. It is never held while a handler runs (hits
do not take it) and never while importing (wrapt's rule: import hooks outside locks).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from types import CodeType, FunctionType, MethodType, ModuleType
from typing import Any, Final

from pykprobes.core import codestate, kretprobe, resolve
from pykprobes.core.address import ProbeAddress, instruction_starts, is_entry
from pykprobes.core.arch import select_breakpoint, select_optimizer
from pykprobes.core.blacklist import blacklist_reason
from pykprobes.core.codestate import CodeState, Mechanisms
from pykprobes.core.probe import (
    KPROBE_FLAG_DISABLED,
    KPROBE_FLAG_FTRACE,
    KPROBE_FLAG_GONE,
    KPROBE_FLAG_OPTIMIZED,
    Kprobe,
)
from pykprobes.core.site import Site, synchronize_hits
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


# --------------------------------------------------------------------------- init


def init_kprobes() -> None:
    """Initialise the core (idempotent, thread-safe): choose the mechanisms and install
    the module notifier. The first use of the API calls it."""
    global _mech, _rejected
    if _mech is not None:
        return
    # Load the arches before taking the lock: importing under our lock could deadlock
    # with a thread whose import runs the module notifier.
    bp, rejected = select_breakpoint()
    try:
        opt, rejected_opt = select_optimizer()
    except Exception as exc:  # noqa: BLE001 - no optimizer: breakpoints only
        opt, rejected_opt = None, {"rewrite": str(exc)}
    from pykprobes.core import modwatch

    with _lock:
        if _mech is not None:
            return
        _rejected = {**rejected, **rejected_opt}
        _mech = Mechanisms(bp, opt)
        modwatch.install()


def _m() -> Mechanisms:
    if _mech is None:
        init_kprobes()
    assert _mech is not None
    return _mech


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


def _target_from_addr(addr: Any) -> resolve.Target:
    if isinstance(addr, ProbeAddress):
        return resolve.Target(_module_name(addr.code), addr.code)
    obj = addr
    if isinstance(obj, (staticmethod, classmethod, MethodType)):
        obj = obj.__func__
    if isinstance(obj, FunctionType):
        return resolve.Target(obj.__module__ or "?", _original(obj.__code__))
    if isinstance(obj, CodeType):
        return resolve.Target(_module_name(obj), _original(obj))
    raise einval(f"addr must be a function, a code object or a ProbeAddress, not "
                 f"{type(addr).__name__}")


def _module_name(code: CodeType) -> str:
    mod = resolve.module_of_file(code.co_filename)
    return mod.__name__ if mod is not None else code.co_filename


def _check_offset(code: CodeType, offset: int, symbol: str) -> int:
    if not isinstance(offset, int) or offset < 0:
        raise einval(f"{symbol}: offset {offset!r} must be a non-negative int")
    if is_entry(code, offset):
        return 0  # anywhere in the prologue is the function's entry
    if offset not in instruction_starts(code):
        if offset >= len(code.co_code):
            raise einval(f"{symbol}+{offset}: offset past the end of the code "
                         f"({len(code.co_code)} bytes)")
        raise einval(f"{symbol}+{offset}: offset is not on an instruction boundary")
    return offset


# --------------------------------------------------------------------------- register


def register_kprobe(p: Kprobe) -> None:
    """Register and arm `p` (unless it is DISABLED). Raises KprobeError."""
    m = _m()
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
            _register_pending(p, module, qualname)
            return
        target = resolve.resolve_imported(mod, qualname)
        target.code = _original(target.code)
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
    with _lock:
        _register_target_locked(p, target, symbol, m)


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
    site = _table.get(addr.key)
    if site is not None and p in site.probes:
        raise einval(f"probe {symbol}+{offset} is already registered")
    state = _state_for_locked(target, m)
    if site is None:
        site = Site(addr, symbol)
        _table[addr.key] = site
        state.sites[offset] = site
    given = (p.addr, p.offset)
    site.probes.append(p)
    p.addr = addr
    p.offset = offset
    p._site = site
    try:
        kretprobe.attach_locked(p, state)
        _refresh_site_locked(site, state, m)
    except BaseException:
        # The mechanism refused the address (prepare failed): undo, as the kernel's error
        # paths do, and leave p as the caller gave it.
        _unregister(p)
        p.addr, p.offset = given
        raise


def _refresh_site_locked(site: Site, state: CodeState, m: Mechanisms) -> None:
    """Recompute what a hit runs, re-arm, and queue or cancel optimization."""
    gone = any(p.flags & KPROBE_FLAG_GONE for p in site.probes)
    if _all_disarmed or gone:
        site.active = ()
    else:
        site.active = tuple(p for p in site.probes if not p.is_disabled())
    site.posts = tuple(p for p in site.active if p.post_handler is not None)
    kretprobe.refresh_locked(state)
    if site.optimized and not _optimizable_locked(site, state, m):
        site.optimized = False  # unoptimize at once (the kernel's forced unoptimize)
    codestate.sync(state, m)
    if not site.optimized and _optimizable_locked(site, state, m):
        _optimizing.add(site)
        _kick_optimizer_locked()
    _update_flags(site)


def _optimizable_locked(site: Site, state: CodeState, m: Mechanisms) -> bool:
    return (
        m.optimizer is not None
        and _allow_optimization
        and not _all_disarmed
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
        flags = p.flags & (KPROBE_FLAG_DISABLED | KPROBE_FLAG_GONE) | (p.flags & 16)
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
    for state in touched.values():
        try:
            codestate.sync(state, m)
        except Exception as exc:  # noqa: BLE001 - a rewrite that fails stays a breakpoint
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
    for state in list(_states.values()):
        if _ancestor_executing(state):
            # Its parent's body is still running from the code it started with, and may
            # still create functions holding an old version: keep those versions covered,
            # switch the functions it created so far, and look again later.
            codestate.adopt_holders(state)
            running = True
            continue
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
    with _lock:
        _allow_optimization = bool(enabled)
        for state in list(_states.values()):
            for site in state.sites.values():
                _refresh_site_locked(site, state, m)


def optimization_enabled() -> bool:
    return _allow_optimization


# --------------------------------------------------------------------------- unregister


def unregister_kprobe(p: Kprobe) -> None:
    """Disarm and remove `p`; once no probe needs it, the code is the original again.
    When it returns, no handler of `p` runs any more (hits in flight have finished)."""
    _unregister(p)
    synchronize_hits()


def _unregister(p: Kprobe) -> None:
    m = _m()
    with _lock:
        site = p._site
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
            site.active = ()
            site.posts = ()
            site.optimized = False
            del _table[site.addr.key]
            del state.sites[site.addr.offset]
            _optimizing.discard(site)
            codestate.sync(state, m)
            _drop_unused_locked(state, m)
        else:
            _refresh_site_locked(site, state, m)


def _drop_unused_locked(state: CodeState, m: Mechanisms) -> None:
    # Retired versions need nothing once no site is left: their call sequences call
    # sites that are inactive now, and there is no breakpoint to keep for them.
    while state.unused and state.current.code is state.original:
        del _states[id(state.original)]
        m.versions.pop(id(state.original), None)
        parent = state.parent
        if parent is None:
            return
        assert state.const_index is not None
        del parent.children[state.const_index]
        codestate.sync(parent, m)
        state = parent


def register_kprobes(probes: Iterable[Kprobe]) -> None:
    """All or nothing: on an error, the probes already registered are unregistered."""
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
    kernel's batch unregistration does one RCU sync)."""
    for p in list(probes):
        if p.registered:
            _unregister(p)
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
    with _lock:
        _all_disarmed = value
        for state in list(_states.values()):
            for site in list(state.sites.values()):
                _refresh_site_locked(site, state, m)


def kprobes_all_disarmed() -> bool:
    return _all_disarmed


# --------------------------------------------------------------------------- lookup


def get_kprobe(addr: Any, offset: int = 0) -> Kprobe | None:
    """The (first) probe registered at an address, or None. `addr` is a ProbeAddress,
    or a function or code object with `offset`."""
    _m()
    check_gone()
    try:
        target = _target_from_addr(addr)
    except KprobeError:
        return None
    if isinstance(addr, ProbeAddress):
        offset = addr.offset + offset
    with _lock:
        site = _table.get((id(target.code), offset))
        return site.probes[0] if site and site.probes else None


def all_probes() -> list[Kprobe]:
    with _lock:
        probes = [p for site in _table.values() for p in site.probes]
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


def expect_module(name: str) -> None:
    """Declare that `name`'s code will be handed over with `module_code_loaded()` (even if a
    module of that name is in sys.modules now): probes on it wait for that."""
    with _lock:
        _expected.add(name)


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
                _register_target_locked(p, target, f"{module}:{qualname}", m)
            except KprobeError as exc:
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


def module_executed(module: str, code: CodeType) -> None:
    """After the body ran: the functions it created now hold their code, so code states
    whose holder was the module's (or a class body's) constants are held by functions."""
    with _lock:
        _executing.discard(id(code))
        root = _states.get(id(code))
        if root is None:
            return
        _detach_executed_locked(root)


def _detach_executed_locked(state: CodeState) -> None:
    # Module and class bodies run once: their children are held by objects from now on.
    for index, child in list(state.children.items()):
        if _runs_once(child.original):
            _detach_executed_locked(child)
        child.parent = None
        child.const_index = None
        del state.children[index]
        codestate.adopt_holders(child)
    if not state.sites and not state.children:
        _states.pop(id(state.original), None)


def _runs_once(code: CodeType) -> bool:
    return not (code.co_flags & 0x01)  # not CO_OPTIMIZED: a module or class body


def module_gone(module: str) -> None:
    """The module was removed or reloaded: its probes are GONE (kill_kprobe)."""
    m = _m()
    with _lock:
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


def _warn(message: str) -> None:
    import warnings

    try:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    except Exception:  # noqa: BLE001 - warnings as errors must not break an import
        pass


__all__ = [
    "arm_all_kprobes",
    "disable_kprobe",
    "disarm_all_kprobes",
    "enable_kprobe",
    "get_kprobe",
    "init_kprobes",
    "list_kprobes",
    "register_kprobe",
    "register_kprobes",
    "set_optimization",
    "unregister_kprobe",
    "unregister_kprobes",
    "wait_for_kprobe_optimizer",
]
