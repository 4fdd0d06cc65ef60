"""Which version of a probed code object runs, and who holds it.

For every code object with probes (and every code object enclosing one, when the optimizer
has to replace a nested function's code in its parent's constants) the table keeps a
`CodeState`: the *original* code (what the program compiled; the identity probe addresses
refer to), the *current* version its holders hold (the original, or a rewritten copy with
call sequences for the optimized sites and/or rewritten nested code in its constants), and
the *retired* versions that frames may still be running.

`sync()` makes the state match its sites: it rebuilds the current version when the set of
optimized sites changed, switches every holder to it (function objects; the parent's
constants), and arms the breakpoint mechanism exactly where the running versions need it:
at non-optimized sites of the current version (offsets translated when the version is
rewritten), and at every site of a retired version that lacks that site's call sequence,
for as long as frames run it (the analogue of waiting for `synchronize_rcu_tasks()`).

Holders switch in batches (`switching()`, see holders.py): one heap walk at most per
batch, none when the holders of the version being left are known for sure. Breakpoints are
still armed before any function switches to a version: a batch's switches happen when it
ends, after every arm of the batch (commit 1282e8d). Until then the versions being left
are retired, hence covered where they lack a call sequence, and the optimizer forgets
retired versions only after its batch ended; the one exception is the last probe of a code
being unregistered, whose versions are forgotten at once: they have nothing left to cover.

Every function here expects the table lock to be held (hence `_locked`-free names: this
module is private to the table, core/table.py).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import CodeType, FunctionType, ModuleType
from typing import TYPE_CHECKING, Final

from pykprobes import accelerator
from pykprobes.core.arch import CompiledCall, InlineHit, OptHit
from pykprobes.core.holders import Switches

if TYPE_CHECKING:
    from pykprobes.core.arch import BreakpointArch, OptimizerArch
    from pykprobes.core.returns import ReturnSite
    from pykprobes.core.site import Site


class Version:
    """One runnable version of a code state: the code, where each original instruction
    sits in it, and which sites have a call sequence in it."""

    __slots__ = ("code", "consts", "hits", "made_late", "map", "opt", "ret")

    def __init__(
        self,
        code: CodeType,
        offmap: dict[int, int] | None,
        opt: frozenset[int],
        consts: dict[int, CodeType],
        ret: bool = False,
        hits: Mapping[int, object] | None = None,
    ) -> None:
        self.code = code
        #: What the call sequence at each optimized offset calls (core/arch.py opt_call).
        self.hits = hits or {}
        #: original offset -> offset in `code`; None means the identity.
        self.map = offmap
        self.opt = opt
        self.consts = consts
        #: The return hooks are built into `code`.
        self.ret = ret
        #: Retired, it was kept because a running parent version may make functions of it
        #: after its holders were switched (prune_retired).
        self.made_late = False

    def phys(self, offset: int) -> int:
        return offset if self.map is None else self.map[offset]


class CodeState:
    __slots__ = (
        "armed",
        "children",
        "const_index",
        "current",
        "holders",
        "module",
        "original",
        "parent",
        "ret_armed",
        "retired",
        "returns",
        "sites",
    )

    def __init__(self, module: str, original: CodeType) -> None:
        self.module = module
        self.original = original
        self.current = Version(original, None, frozenset(), {})
        self.retired: list[Version] = []
        self.parent: CodeState | None = None
        self.const_index: int | None = None
        self.children: dict[int, CodeState] = {}
        self.sites: dict[int, Site] = {}
        #: (id(version code), physical offset) -> (version code, offset, site, with post)
        self.armed: dict[tuple[int, int], tuple[CodeType, int, Site, bool]] = {}
        #: The return probes on this code (kretprobes), or None.
        self.returns: ReturnSite | None = None
        #: id(version code) -> version code whose return hooks the breakpoint arch serves.
        self.ret_armed: dict[int, CodeType] = {}
        #: id(function) -> the functions last seen holding a version (holders.py).
        self.holders: dict[int, weakref.ref[FunctionType]] = {}

    @property
    def unused(self) -> bool:
        return not self.sites and not self.children and self.returns is None

    def __repr__(self) -> str:
        return f"<CodeState {self.module}:{self.original.co_qualname}>"


class Mechanisms:
    """The two arches the states are synced with (the optimizer may be missing)."""

    __slots__ = ("breakpoint", "installs", "optimizer", "reap", "retiring", "switches",
                 "versions", "walks")

    def __init__(self, breakpoint: BreakpointArch, optimizer: OptimizerArch | None) -> None:
        self.breakpoint = breakpoint
        self.optimizer = optimizer
        #: Called after each outermost batch of switches, or None: forgets at once the
        #: retired versions no frame runs (core/optimizer.py `reap`), when breakpoints left
        #: on them would tax every call (a global trace function).
        self.reap: Callable[[], None] | None = None
        #: id(any version's code) -> its state, to map a function's current code back.
        self.versions: dict[int, CodeState] = {}
        #: id(state) -> the states with retired versions (the optimizer looks only at these).
        self.retiring: dict[int, CodeState] = {}
        #: The batch of holder switches open now, if any (`switching`).
        self.switches: Switches | None = None
        #: Heap walks done so far (holders.py), for tests and the bench.
        self.walks = 0
        #: Module -> versions installed so far for its code: unchanged across the module
        #: body's run, the functions it made hold the versions it was given
        #: (core/modules.py module_executed).
        self.installs: dict[str, int] = {}


@contextmanager
def switching(mech: Mechanisms) -> Iterator[None]:
    """Batch the holder switches made inside: functions switch when the outermost block
    ends (one heap walk at most). The registry lock must be held for the whole block."""
    if mech.switches is not None:
        yield
        return
    batch = mech.switches = Switches()
    try:
        yield
    finally:
        mech.switches = None
        try:
            batch.flush()
        finally:
            mech.walks += batch.walks
        reap = mech.reap
        if reap is not None and mech.retiring:
            reap()


@contextmanager
def unheld(mech: Mechanisms) -> Iterator[None]:
    """The holder switches made inside are dropped: they are of code just loaded, whose
    body has not run, so no function holds any version of it yet (and the heap walk would
    find nothing). Inside an open batch, they join it as usual."""
    if mech.switches is not None:
        yield
        return
    mech.switches = Switches()
    try:
        yield
    finally:
        mech.switches = None


def _switch(state: CodeState, old: Version, mech: Mechanisms) -> None:
    """Switch the holders of `old` to the state's current version, now or at the end of
    the open batch."""
    if mech.switches is not None:
        mech.switches.add(state, old)
        return
    with switching(mech):
        assert mech.switches is not None
        mech.switches.add(state, old)


def set_retired(state: CodeState, retired: list[Version], mech: Mechanisms) -> None:
    """Set the state's retired versions, keeping `mech.retiring` in step."""
    state.retired = retired
    if retired:
        mech.retiring[id(state)] = state
    else:
        mech.retiring.pop(id(state), None)


def sync(state: CodeState, mech: Mechanisms) -> None:
    """Make `state` (and, when its code changed, its parents) match its sites."""
    _rebuild(state, mech)
    reconcile_breakpoints(state, mech)


def _rebuild(state: CodeState, mech: Mechanisms) -> None:
    # Every site served by a call sequence: optimized ones, and those the breakpoint arms by
    # a rewrite (Site.inline); both call the same hit, so optimizing one changes nothing here.
    opt = frozenset(off for off, site in state.sites.items() if site.inline and site.active)
    consts = {
        index: child.current.code
        for index, child in state.children.items()
        if child.current.code is not child.original
    }
    # Return hooks ride along whenever the code is rewritten anyway (the entry probe of a
    # kretprobe is a site at offset 0, so an optimized kretprobe rewrites its code).
    returns = state.returns
    ret = bool(opt) and returns is not None and returns.armed
    # A site's one probe may offer a compiled call: a change of its probes changes the call.
    hits: dict[int, OptHit | CompiledCall | InlineHit] = {
        off: state.sites[off].opt_hit(state.original) for off in opt
    }
    hooks = None
    if ret and returns is not None:
        if 0 in opt and returns.fast and getattr(mech.optimizer, "compiles_calls", False):
            # The kretprobe fast path (core/rethook.py): its entry and its returns are built
            # into this version together, so that every call of it passes both.
            hits[0] = CompiledCall(returns.entry_hook, returns.variables, state.sites[0].hit)
            hooks = (returns.ret_hook, returns.unwind_hook)
        else:
            hooks = (returns.opt_return, returns.opt_unwind)
    cur = state.current
    same_consts = consts.keys() == cur.consts.keys() and all(
        cur.consts[i] is c for i, c in consts.items()
    )
    if opt == cur.opt and ret == cur.ret and hits == cur.hits and same_consts:
        return
    original = state.original
    if not opt and not consts:
        version = Version(original, None, opt, consts)
    elif not opt:
        patched = list(original.co_consts)
        for index, code in consts.items():
            patched[index] = code
        version = Version(original.replace(co_consts=tuple(patched)), None, opt, consts)
    else:
        assert mech.optimizer is not None
        built = mech.optimizer.build(original, hits, consts, hooks)
        version = Version(built.code, dict(built.offsets), opt, consts, ret, hits)
    _install(state, version, mech)


def share_names(state: CodeState, mech: Mechanisms) -> None:
    """Give the current version's names to its module's globals (core/arch.py `share`)."""
    module = sys.modules.get(state.module)
    if mech.optimizer is not None and isinstance(module, ModuleType) and \
            state.current.map is not None:
        mech.optimizer.share(state.current.code, module.__dict__)


def _install(state: CodeState, version: Version, mech: Mechanisms) -> None:
    old = state.current
    state.current = version
    mech.installs[state.module] = mech.installs.get(state.module, 0) + 1
    mech.versions[id(version.code)] = state
    share_names(state, mech)
    retired = [v for v in state.retired if v.code is not version.code]
    if old.code is not version.code:
        retired.append(old)
    set_retired(state, retired, mech)
    # Arm the new version's breakpoints before any function runs it: a thread calling the
    # function right after the switch must find them there (unoptimizing switches back to
    # the original code, which only breakpoints cover).
    reconcile_breakpoints(state, mech)
    _switch(state, old, mech)
    if state.parent is not None:
        _rebuild(state.parent, mech)
        reconcile_breakpoints(state.parent, mech)


def adopt_holders(state: CodeState, mech: Mechanisms) -> None:
    """Point every function that holds the original or a retired version at the current one.

    Needed when the holders were made from a parent's constants that changed under a
    running frame: a module body that the optimizer rewrote while it ran still creates its
    functions from the code it started with."""
    for v in (Version(state.original, None, frozenset(), {}), *state.retired):
        _switch(state, v, mech)


def prune_retired(state: CodeState, mech: Mechanisms) -> bool:
    """Forget retired versions no frame runs any more; True if some are still running.

    Nested code is made into functions by its parent at each call, from the parent's
    constants: a frame still running a retired version of the parent (a suspended
    generator, a loop, another thread) goes on making functions of the child version that
    version holds, after the holders of that child version were switched. So a child
    version stays retired (covered by breakpoints where it lacks a call sequence) while a
    retired parent version holding it may still run, and the functions made of it
    meanwhile are switched before it is forgotten. The caller must not have a batch of
    switches open (optimizer.py run_pass)."""
    if not state.retired:
        return False
    opt = mech.optimizer
    keep: list[Version] = []
    for v in state.retired:
        if opt is not None and opt.frames_running(v.code):
            keep.append(v)
        elif _parent_may_make(state, v):
            v.made_late = True
            keep.append(v)
    if len(keep) != len(state.retired):
        for v in state.retired:
            if v in keep:
                continue
            if v.made_late:
                _switch(state, v, mech)
            if v.code is not state.original:
                mech.versions.pop(id(v.code), None)
        set_retired(state, keep, mech)
        reconcile_breakpoints(state, mech)
    return bool(keep)


#: The C accelerator's Untraced, or None (accelerator.py; its comment in _speedups.c): what the
#: breakpoint mechanism calls runs inside a sys.monitoring or sys.settrace callback, where
#: CPython reports no event; through it, a probe hit by a handler is seen and counted missed,
#: as with rewritten code. Without it such a hit is not seen at all (README, "Known limits").
UNTRACED: Final = getattr(accelerator.MODULE, "Untraced", None)


def _untraced(hit: Callable[..., None]) -> Callable[..., None]:
    return hit if UNTRACED is None else UNTRACED(hit)


def _parent_may_make(state: CodeState, v: Version) -> bool:
    """A retired version of the parent holds `v.code` as the constant functions are made
    of (the parent's retired versions are the ones frames may still run)."""
    parent, index = state.parent, state.const_index
    if parent is None or index is None:
        return False
    return any(pv.code.co_consts[index] is v.code for pv in parent.retired)


def reconcile_breakpoints(state: CodeState, mech: Mechanisms) -> None:
    """Arm the breakpoint exactly where the running versions need it."""
    want: dict[tuple[int, int], tuple[CodeType, int, Site, bool]] = {}
    cur = state.current
    for off, site in state.sites.items():
        if not site.active:
            continue
        post = bool(site.posts)
        if off not in cur.opt:
            phys = cur.phys(off)
            want[(id(cur.code), phys)] = (cur.code, phys, site, post)
        for v in state.retired:
            if off not in v.opt:
                phys = v.phys(off)
                want[(id(v.code), phys)] = (v.code, phys, site, post)
    bp = mech.breakpoint
    for key, (code, phys, _, _) in list(state.armed.items()):
        if key not in want:
            bp.disarm(code, phys)
            del state.armed[key]
    for key, entry in want.items():
        if state.armed.get(key) != entry:
            code, phys, site, post = entry
            bp.arm(code, phys, _untraced(site.pre), _untraced(site.post) if post else None)
            state.armed[key] = entry
    for off, site in state.sites.items():
        # Only a site at offset 0 can be: the table puts every probe in the prologue
        # there. Asking the arch about every site decodes the code for each (a sync of a
        # code with n sites cost n decodings).
        # A breakpoint armed by a rewrite (Site.inline) is still the breakpoint's probe: the
        # prologue call stands for its entry event.
        site.entry_event = off == 0 and not site.optimized and bool(site.active) and \
            bp.uses_entry_event(state.original, off)
    _reconcile_returns(state, mech)


def _reconcile_returns(state: CodeState, mech: Mechanisms) -> None:
    """Serve the return hooks with the breakpoint arch on every running version that does
    not have them built in."""
    returns = state.returns
    want: dict[int, CodeType] = {}
    if returns is not None and returns.armed:
        for v in (state.current, *state.retired):
            if not v.ret:
                want[id(v.code)] = v.code
    bp = mech.breakpoint
    for key, code in list(state.ret_armed.items()):
        if key not in want:
            bp.disarm_return(code)
            del state.ret_armed[key]
    for key, code in want.items():
        if key not in state.ret_armed:
            assert returns is not None
            bp.arm_return(code, _untraced(returns.bp_return), _untraced(returns.bp_unwind))
            state.ret_armed[key] = code


