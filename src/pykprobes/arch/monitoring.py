"""The breakpoint arch on `sys.monitoring` (PEP 669, CPython 3.12+): the kernel's int3 probe.

How an address (code object, offset) is armed
----------------------------------------------
* We claim one tool id (4, else 3) and set *local* events on the probed code object only,
  so code that is not probed pays nothing.
* An ordinary offset is served by the INSTRUCTION event. Its callback returns
  `sys.monitoring.DISABLE` for every offset of that code that is not armed, so after the
  first run of the code only the armed offsets cost a callback.
* An offset in the prologue (offset 0, or anything up to and including its RESUME,
  insn.entry_index: MAKE_CELL, COPY_FREE_VARS, RETURN_GENERATOR, POP_TOP, RESUME) never
  fires INSTRUCTION events (it lies before `_co_firsttraceable`), so it is served by
  PY_START and `uses_entry_event()` is True for it (the core sets KPROBE_FLAG_FTRACE). For
  generators and coroutines PY_START fires at the *first resumption* (first
  `next()`/`send()`), not when the generator object is created by the call. The
  pre-handler gets the armed offset.
* A RESUME after a `yield`/`await` never fires INSTRUCTION events either: it is served by
  PY_RESUME. END_FOR never runs with an event (an exhausted FOR_ITER jumps over it), so it
  cannot be probed (EINVAL).

Re-arming without `restart_events()`
------------------------------------
An offset that returned DISABLE stays disabled until the code is re-instrumented. The
global `sys.monitoring.restart_events()` would also re-enable every other tool's disabled
events, so we never call it. Instead, when an arm adds an offset, we set this code's local
events for our tool to 0 and back (`_retoggle`). In CPython, `set_local_events` ->
`_PyMonitoring_SetLocalEvents` -> `set_local_events` + `_Py_Instrument` (3.12) /
`force_instrument_lock_held` (3.13) computes `removed_events = active - new` and
`new_events = new - active` for the code, and calls `remove_per_instruction_tools` /
`add_per_instruction_tools` on every instruction for exactly those tool bits: turning our
INSTRUCTION bit off clears it everywhere, turning it on sets it on every instruction again,
while the other tools' bits (`per_instruction_tools[i]`) are untouched. Verified on 3.12.1
and 3.13.0 (tests/arch/test_monitoring.py::test_rearm_after_disable_*). The two calls are
made from one C-level `map()` so that no bytecode (hence no GIL switch) runs between them:
another thread cannot execute the code in the gap and miss an armed hit (GIL builds; on a
free-threaded build the gap exists).

Post-handlers
-------------
`post(frame, offset)` runs at the next instruction executed in the same frame. We arm,
internally, the armed instruction's static successors (see `successors.py`) and record a
pending post keyed by the frame object (frames hash by identity). The first successor
reached in that frame runs the post. If the instruction raised instead and a handler in the
frame caught it, the handler (also armed) drops the pending post: an instruction that raised
did not complete. Instructions that leave the frame run the post from PY_RETURN (RETURN_*),
PY_YIELD (YIELD_VALUE), or, for RAISE_VARARGS/RERAISE with no handler in the frame,
PY_UNWIND, a local event of the code where it can be one (3.15: the `local_unwind`
capability, measured by monitoring_caps.py); before 3.15 PY_UNWIND cannot be a local event
(ValueError "invalid local event set"), so it is enabled *globally*, and only while such a
probe is armed: every frame unwound by an exception anywhere then costs one cheap callback.

Pending posts hold a strong reference to their frame. A frame left by an exception from an
instruction that is not a raise leaves its record behind; records are capped at
`PENDING_CAP`: on overflow the dead ones (frames nobody else references: not executing, not
resumable) are swept, then the oldest are dropped (`pending_dropped` counts them).

Return hooks (`arm_return`)
---------------------------
`on_return(frame, value)` runs from the local PY_RETURN event, which fires at every
RETURN_VALUE/RETURN_CONST of the code, including a generator's, coroutine's or async
generator's final return (value = StopIteration's value) and never at a yield or an await
(those are PY_YIELD: not needed, see below). It is served by the same per-offset sites as
the posts of return instructions, so the callback finds it without hashing the code, and
a return offset of a code with return hooks never answers DISABLE.

`on_unwind(frame, exc)` runs from PY_UNWIND, which fires when an exception leaves a frame,
after the frame's handlers had their chance, with the very exception the caller then sees
(a generator's StopIteration already turned into RuntimeError by its wrapper handler, PEP
479). Where PY_UNWIND can be a local event (`local_unwind`: 3.15, gh-142186), it is one of
the code's local events, and an exception leaving any other frame costs nothing. Before 3.15
it cannot be (ValueError "invalid local event set"), so it is enabled globally while some
code has return hooks or a raise-post is armed: one callback, one table lookup by
`id(code)` for every frame unwound anywhere in the process. The callback returns None:
returning DISABLE from PY_UNWIND makes CPython replace the program's exception by
`ValueError: Cannot disable PY_UNWIND events. Callback removed.` and unregister the callback
(3.12.1 to 3.14.10), and on 3.15 it would turn the event off for the whole code object
(tests/arch/test_monitoring_returns.py). A generator closed by
`close()` or by its finalizer at a yield runs its frame with GeneratorExit: PY_UNWIND
reports GeneratorExit, or PY_RETURN reports the value if the generator catches it and
returns (3.12.1 and 3.13.0 alike; 3.13's `close()` also returns that value, 3.12's drops it).

Both events see frames that were already running when the hooks were armed, in every
thread, and suspended generators when they end: instrumenting a code object patches the
bytecode every frame of it executes.

Not seen (`capabilities`):

* 3.13.0 closes a generator suspended at a yield covered only by the implicit StopIteration
  handler (a plain `yield`, not inside try/with/`yield from`/await) without running its
  frame (see successors.py): `close()`, or dropping an unfinished generator (`for x in
  gen(): break`), reports nothing (`return_at_generator_close` is False there). PY_YIELD
  does not help: the shortcut does not look at instrumentation. A frame of such a generator
  must not be kept to be read later either: on 3.13.0 its `f_locals` reads freed locals
  after that shortcut (measured on 3.13.0; cf. gh-125723).
* A generator that was never started has no frame that ran: closing it reports nothing
  (nor did its entry fire).
* The end of a frame that runs inside a callback (see below): a probed function called
  from a pre/post/return hook has neither its entry nor its return seen.

Limits and quirks (3.12.1, 3.13.0)
----------------------------------
* sys.monitoring does not call any callback while one is running (`tstate->tracing`):
  a probe hit inside a pre/post/return handler, or inside another tool's callback, is not
  seen at all (it can not be counted as missed); nor is the return of a frame that ends
  there (a probed generator resumed by a handler and finishing inside it).
* If another tool enables INSTRUCTION events on a code object on which we already have
  them, CPython loses ours on that code (`update_instrumentation_data` allocates
  `per_instruction_tools` zeroed when a second tool appears; cpython#157900, still so in
  3.14.10 and 3.15.2); the reverse also holds. sys.settrace with `f_trace_opcodes` on 3.12+
  is such a tool. The capability `instruction_events_shared` measures it (monitoring_caps.py).

Other tools
-----------
Where `instruction_events_shared` is False, arming INSTRUCTION events on a code where another
tool already has them would silently stop that tool's. So when our INSTRUCTION events appear
on such a code, we set that tool's local events on it to 0 and back (`_spare_others_locked`),
which gives the second tool's bits back: both tools then see their events (measured on
3.12.1 to 3.15.2; later toggles by either tool no longer lose anything). The other tool's
DISABLEd offsets come back once, which costs it a callback each and no event. The reverse
(another tool arriving after us) we cannot see: our probes on that code stop firing.

JIT (PYTHON_JIT=1, 3.14+)
-------------------------
Instrumenting a code object invalidates the JIT's executors for it; CPython does not JIT
code while a tool monitors it (PR #142842, 3.14). Probes armed on a hot loop already
running as JIT code fire from the next iteration (tests/arch/test_monitoring_jit.py).
* A hit that already started in another thread can still call pre/post once after
  `disarm()` returned (there is no synchronize_rcu).
* A callback that raises never reaches the program: the address is disarmed, the failure
  counted (`nfailures`, `failures`) and passed to `on_failure` if set. For return hooks
  the offset reported is `RETURN_HOOKS` (-1) and the code's return hooks are disarmed.
  KeyboardInterrupt is re-raised: it is the program's signal, not the handler's failure.
"""

from __future__ import annotations

import collections
import errno
import opcode
import sys
import threading
from collections.abc import Callable, Mapping
from types import CodeType, FrameType, MappingProxyType
from typing import Any, ClassVar, Final

from pykprobes import insn
from pykprobes.arch import frametable
from pykprobes.arch.frametable import PENDING_CAP
from pykprobes.arch.monitoring_caps import (
    free_tool_id,
    instruction_events_shared,
    jit_records_instrumented,
    local_unwind,
)
from pykprobes.arch.successors import Flow, analyze, generator_close_runs_frame
from pykprobes.core.arch import (
    ArchUnavailable,
    Capabilities,
    PostHit,
    PreHit,
    ReturnHit,
    UnwindHit,
)
from pykprobes.core.regs import CALLBACK_CODES
from pykprobes.errors import KprobeError

__all__ = ["RETURN_HOOKS", "MonitoringArch"]

TOOL_IDS: Final = (4, 3)
TOOL_NAME: Final = "pykprobes"
#: At most this many pending post records (frames between an armed instruction and the
#: next one); see the module docstring.
#: The offset reported to `on_failure` and in `failures` for a failed return hook.
RETURN_HOOKS: Final = -1

_getframe = sys._getframe


class _Site:
    """What one event at one (code, offset) does. Immutable once published, except that a
    failure clears `pre`/`post`; chained (`also`) with more entry probes of the same code.
    When several codes have a site at one offset, the table holds a `_Hub` there."""

    #: The sites of the other codes at this offset, by id(code): a `_Hub`'s only.
    peers: Mapping[int, _Site] = MappingProxyType({})

    __slots__ = (
        "code",
        "also",
        "pre",
        "post",
        "armed",
        "waits",
        "succ",
        "handler",
        "ret",
    )

    def __init__(self, code: CodeType) -> None:
        self.code = code
        self.also: _Site | None = None
        self.pre: PreHit | None = None
        self.post: PostHit | None = None
        #: The armed offset, passed to pre/post (for PY_START: the offset probed).
        self.armed = -1
        #: This offset is a successor or handler of a post-armed instruction of this code.
        self.waits = False
        #: Where this site's post runs: offsets (INSTRUCTION), or -1 for PY_RETURN/PY_YIELD/
        #: PY_UNWIND.
        self.succ: frozenset[int] = frozenset()
        #: The handler catching this instruction in the frame (a raise's post runs there).
        self.handler = -1
        #: PY_RETURN sites: the code's return hooks, if armed.
        self.ret: _Ret | None = None



class _Hub(_Site):
    """The table entry at an offset where several codes have a site: `peers` maps each
    one's id(code) to its site. A callback reads `peers` with one `get`, and the arch
    changes it one key at a time (each store or pop is atomic): a site is complete before
    it is stored, so a callback finds a code's old site or its new one, never a half-made
    one. Publishing a code's sites thus touches only that code's entries, where the chains
    that this replaced had to be cloned whole at every arm (38,512 clones to register 1,000
    probes; bench/results/ANALYSIS.md, "Scale")."""

    __slots__ = ("peers",)  # shadows the class-level empty mapping

    def __init__(self, peers: dict[int, _Site]) -> None:
        super().__init__(_HUB_CODE)
        self.peers: dict[int, _Site] = peers


#: A hub's `code`: a code object no callback is ever called for, so that `site.code is
#: code` is False for a hub without a separate test on the hit path.
_HUB_CODE: Final = compile("", "<pykprobes hub>", "exec")


class _Ret:
    """The return hooks of one code object. Immutable once published, except that a
    failure clears both hooks."""

    __slots__ = ("code", "on_return", "on_unwind")

    def __init__(self, code: CodeType, on_return: ReturnHit, on_unwind: UnwindHit) -> None:
        self.code = code
        self.on_return: ReturnHit | None = on_return
        self.on_unwind: UnwindHit | None = on_unwind


class _Probe:
    __slots__ = ("pre", "post")

    def __init__(self, pre: PreHit, post: PostHit | None) -> None:
        self.pre = pre
        self.post = post


class _CodeModel:
    """The lock-guarded truth for one armed code object."""

    __slots__ = ("code", "flows", "entry_end", "probes", "ret", "keys", "events", "needs_unwind")

    def __init__(self, code: CodeType, flows: dict[int, Flow], entry_end: int) -> None:
        self.code = code  # the strong reference that keeps id(code) stable
        self.flows = flows
        self.entry_end = entry_end
        self.probes: dict[int, _Probe] = {}
        #: The return hooks, if armed.
        self.ret: _Ret | None = None
        #: (event, offset) pairs currently published for this code.
        self.keys: set[tuple[int, int]] = set()
        self.events = 0
        #: Some probe of this code runs its post from the global PY_UNWIND event.
        self.needs_unwind = False


class MonitoringArch:
    """Breakpoints on sys.monitoring local events. See the module docstring."""

    name = "monitoring"
    #: Measured on 3.12.1 to 3.15.2 (tests/arch/test_monitoring.py and, for the return_*
    #: and unwind_* ones, tests/arch/test_monitoring_returns.py). An instance adds what it
    #: measures on this interpreter: `return_at_generator_close` (module docstring),
    #: `local_unwind` and `instruction_events_shared` (monitoring_caps.py).
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        running_frames_this_thread=True,
        running_frames_other_threads=True,
        threads_started_earlier=True,
        threads_started_later=True,
        unprobed_code_untaxed=True,
        entry_event=True,
        post_handler=True,
        hits_inside_handlers=False,
        # Return hooks: frames already running when armed, in this thread and in others,
        # and generators suspended when armed, report their end.
        return_of_running_frames_this_thread=True,
        return_of_running_frames_other_threads=True,
        return_of_suspended_generators=True,
        # on_unwind gets the very exception the caller sees (PY_UNWIND passes it).
        unwind_exception_exact=True,
        # A frame ending inside a handler is not seen (tstate->tracing).
        returns_inside_handlers=False,
    )
    capabilities: Capabilities

    def __init__(self) -> None:
        mon = getattr(sys, "monitoring", None)
        if mon is None:
            raise ArchUnavailable("sys.monitoring does not exist before 3.12 (PEP 669)")
        self._mon: Any = mon
        self.capabilities = self.CAPABILITIES.replace(
            return_at_generator_close=generator_close_runs_frame())
        events = mon.events
        self._E_INS: int = events.INSTRUCTION
        self._E_START: int = events.PY_START
        self._E_RESUME: int = events.PY_RESUME
        self._E_RETURN: int = events.PY_RETURN
        self._E_YIELD: int = events.PY_YIELD
        self._E_UNWIND: int = events.PY_UNWIND
        tool = -1
        for candidate in TOOL_IDS:
            try:
                mon.use_tool_id(candidate, TOOL_NAME)
            except ValueError:
                continue
            tool = candidate
            break
        if tool < 0:
            holders = ", ".join(f"{t} by {mon.get_tool(t)!r}" for t in TOOL_IDS)
            raise KprobeError(
                errno.EBUSY, f"no sys.monitoring tool id free for pykprobes: held: {holders}"
            )
        self.tool: int = tool
        self._local_unwind = local_unwind(mon, tool)
        self._ins_shared = instruction_events_shared(mon, tool)
        self.capabilities = self.capabilities.replace(
            local_unwind=self._local_unwind, instruction_events_shared=self._ins_shared)
        #: id(code) -> the offsets of its JUMP_BACKWARDs, which keep their INSTRUCTION event
        #: where the JIT's recording would double our events (monitoring_caps.py); else None.
        self._backjumps: dict[int, frozenset[int]] | None = (
            {} if jit_records_instrumented() else None
        )
        self._lock = threading.Lock()
        self._codes: dict[int, _CodeModel] = {}
        #: id(code) of the models that need the global PY_UNWIND event.
        self._unwinders: set[int] = set()
        self._unwind_on = False
        self._closed = False
        #: Failures of pre/post callbacks (each disarmed its address).
        self.nfailures = 0
        self.failures: collections.deque[tuple[CodeType, int, BaseException]] = collections.deque(
            maxlen=16
        )
        #: on_failure(code, offset, exc), called (guarded) when a callback failed.
        self.on_failure: Callable[[CodeType, int, BaseException], None] | None = None
        #: Pending posts dropped because of PENDING_CAP.
        self.pending_dropped = 0
        #: Sites whose callback failed, drained under the lock (deque: atomic append/pop).
        self._failed: collections.deque[_Site] = collections.deque()
        #: Return hooks that failed, drained under the lock.
        self._failed_rets: collections.deque[_Ret] = collections.deque()
        self._install_callbacks()

    # ------------------------------------------------------------------ hot path

    def _install_callbacks(self) -> None:
        # Tables read by the callbacks; the callbacks are closures so that every name they
        # use is a fast local or cell (no attribute lookups on self per hit).
        ins: dict[int, _Site] = {}
        start: dict[int, _Site] = {}
        resume: dict[int, _Site] = {}
        leave: dict[int, _Site] = {}
        #: id(code) -> its return hooks, for the global PY_UNWIND.
        unwind: dict[int, _Ret] = {}
        pending: dict[FrameType, _Site] = {}
        epoch = [0]
        self._ins, self._start, self._resume, self._leave = ins, start, resume, leave
        self._unwind, self._pending, self._epoch = unwind, pending, epoch
        DISABLE = self._mon.DISABLE
        backjumps = self._backjumps
        fail = self._fail
        fail_ret = self._fail_ret
        trim = self._trim_pending
        cap = PENDING_CAP

        def run_post(site: _Site, frame: FrameType) -> None:
            post = site.post
            if post is not None:
                try:
                    post(frame, site.armed)
                except BaseException as exc:  # never reaches the program
                    if exc.__class__ is KeyboardInterrupt:
                        raise
                    fail(site, exc)

        def on_instruction(code: CodeType, offset: int) -> Any:
            try:
                site = ins[offset]
            except KeyError:
                # No switch point between the lookup and the DISABLE (subscript, no call;
                # 3.12+ runs the GC only at eval-breaker checks): a concurrent arm() is
                # either already visible or toggles after this DISABLE is applied.
                if backjumps is not None and offset in backjumps.get(id(code), ()):
                    return None
                return DISABLE
            if site.code is not code:
                e = epoch[0]  # read before any switch point can happen
                site = site.peers.get(id(code))  # type: ignore[assignment]
                if site is None or site.code is not code:
                    if backjumps is not None and offset in backjumps.get(id(code), ()):
                        return None
                    return DISABLE if epoch[0] == e else None
            # A frame object costs as much as a handler call: made only for a post-handler;
            # pre() finds it itself if a handler asks (core/arch.py PreHit).
            frame = None
            if site.waits and pending:
                frame = _getframe(1)
                rec = pending.pop(frame, None)
                if rec is not None and (offset in rec.succ):
                    run_post(rec, frame)
            pre, post = site.pre, site.post
            if pre is not None:
                if post is not None and frame is None:
                    frame = _getframe(1)
                try:
                    pre(frame, offset)
                except BaseException as exc:  # never reaches the program
                    if exc.__class__ is KeyboardInterrupt:
                        raise
                    fail(site, exc)
                    return None
                if frame is not None and post is not None:
                    pending[frame] = site
                    if len(pending) > cap:
                        trim()
            elif not site.waits and post is None:
                return DISABLE
            return None

        def on_start(code: CodeType, offset: int) -> Any:
            site = start.get(offset)
            if site is not None and site.code is not code:
                site = site.peers.get(id(code))
                if site is not None and site.code is not code:
                    site = None
            if site is None:
                return None
            frame = None
            while site is not None:
                pre, post = site.pre, site.post
                if pre is not None:
                    if post is not None and frame is None:
                        frame = _getframe(1)
                    try:
                        pre(frame, site.armed)
                    except BaseException as exc:
                        if exc.__class__ is KeyboardInterrupt:
                            raise
                        fail(site, exc)
                        site = site.also
                        continue
                    if frame is not None and post is not None:
                        pending[frame] = site
                        if len(pending) > cap:
                            trim()
                site = site.also
            return None

        def on_resume(code: CodeType, offset: int) -> Any:
            e = epoch[0]
            site = resume.get(offset)
            if site is not None and site.code is not code:
                site = site.peers.get(id(code))
            if site is None or site.code is not code:
                return DISABLE if epoch[0] == e else None
            pre, post = site.pre, site.post
            if pre is not None:
                frame = None if post is None else _getframe(1)
                try:
                    pre(frame, offset)
                except BaseException as exc:
                    if exc.__class__ is KeyboardInterrupt:
                        raise
                    fail(site, exc)
                    return None
                if frame is not None:
                    pending[frame] = site
                    if len(pending) > cap:
                        trim()
            return None

        def on_yield(code: CodeType, offset: int, value: object) -> Any:
            e = epoch[0]
            site = leave.get(offset)
            if site is not None and site.code is not code:
                site = site.peers.get(id(code))
            if site is None or site.code is not code:
                return DISABLE if epoch[0] == e else None
            if pending:
                frame = _getframe(1)
                rec = pending.pop(frame, None)
                if rec is not None and rec.code is code and rec.armed == site.armed:
                    run_post(rec, frame)
            return None

        def on_return(code: CodeType, offset: int, value: object) -> Any:
            e = epoch[0]
            site = leave.get(offset)
            if site is not None and site.code is not code:
                site = site.peers.get(id(code))
            if site is None or site.code is not code:
                return DISABLE if epoch[0] == e else None
            frame = None
            if pending:
                frame = _getframe(1)
                rec = pending.pop(frame, None)
                if rec is not None and rec.code is code and rec.armed == site.armed:
                    run_post(rec, frame)  # the instruction's post, then the function's
            r = site.ret
            if r is not None:
                hook = r.on_return
                if hook is not None:
                    try:
                        hook(frame or _getframe(1), value)
                    except BaseException as exc:  # never reaches the program
                        if exc.__class__ is KeyboardInterrupt:
                            raise
                        fail_ret(r, exc)
            return None

        def on_unwind(code: CodeType, offset: int, exc: BaseException) -> Any:
            # A global event before 3.15 (`local_unwind`): be quick for other code. Never
            # return DISABLE: before 3.15 CPython would replace the program's exception by a
            # ValueError; on 3.15 it would disable the event for the whole code.
            if pending:
                frame = _getframe(1)
                rec = pending.pop(frame, None)
                if rec is not None and rec.code is code and rec.succ is _UNWIND:
                    run_post(rec, frame)
            if unwind:
                r = unwind.get(id(code))
                if r is not None and r.code is code:
                    hook = r.on_unwind
                    if hook is not None:
                        try:
                            hook(_getframe(1), exc)
                        except BaseException as err:  # never reaches the program
                            if err.__class__ is KeyboardInterrupt:
                                raise
                            fail_ret(r, err)
            return None

        mon, tool, E = self._mon, self.tool, self._mon.events
        # They call pre() without the frame: the core steps over them to find it.
        for cb in (on_instruction, on_start, on_resume):
            CALLBACK_CODES.add(cb.__code__)
        mon.register_callback(tool, E.INSTRUCTION, on_instruction)
        mon.register_callback(tool, E.PY_START, on_start)
        mon.register_callback(tool, E.PY_RESUME, on_resume)
        mon.register_callback(tool, E.PY_RETURN, on_return)
        mon.register_callback(tool, E.PY_YIELD, on_yield)
        mon.register_callback(tool, E.PY_UNWIND, on_unwind)

    def _fail(self, site: _Site, exc: BaseException) -> None:
        """A pre/post raised: stop calling it, count it, disarm the address at the next
        arm/disarm (we may be inside the program's frame: take no lock here)."""
        try:
            site.pre = None
            site.post = None
            self.nfailures += 1
            self.failures.append((site.code, site.armed, exc))
            self._failed.append(site)
            hook = self.on_failure
            if hook is not None:
                hook(site.code, site.armed, exc)
        except BaseException:  # noqa: BLE001 - never reaches the program
            pass

    def _fail_ret(self, r: _Ret, exc: BaseException) -> None:
        """A return hook raised: stop calling this code's hooks, count it, disarm them at
        the next arm/disarm (no lock here, as in `_fail`)."""
        try:
            r.on_return = None
            r.on_unwind = None
            self.nfailures += 1
            self.failures.append((r.code, RETURN_HOOKS, exc))
            self._failed_rets.append(r)
            hook = self.on_failure
            if hook is not None:
                hook(r.code, RETURN_HOOKS, exc)
        except BaseException:  # noqa: BLE001 - never reaches the program
            pass

    def _trim_pending(self) -> None:
        self.pending_dropped += frametable.trim(self._pending)

    # ------------------------------------------------------------------ arm/disarm

    def uses_entry_event(self, code: CodeType, offset: int) -> bool:
        return 0 <= offset <= insn.entry_offset(code)

    def arm(self, code: CodeType, offset: int, pre: PreHit, post: PostHit | None) -> None:
        if self._closed:
            raise KprobeError(errno.EINVAL, "the monitoring arch is closed")
        flows = analyze(code)  # outside the lock: dis runs Python code
        entry_end = insn.entry_offset(code)
        flow = flows.get(offset)
        if flow is None:
            raise KprobeError(
                errno.EINVAL, f"{code.co_name}+{offset} is not the start of an instruction"
            )
        if flow.opname == "END_FOR":
            raise KprobeError(
                errno.EINVAL,
                f"{code.co_name}+{offset}: END_FOR never runs with an event "
                "(an exhausted FOR_ITER jumps over it)",
            )
        with self._lock:
            self._reap_locked()
            model = self._codes.get(id(code))
            if model is None or model.code is not code:
                model = self._codes[id(code)] = _CodeModel(code, flows, entry_end)
            previous = model.probes.get(offset)
            model.probes[offset] = _Probe(pre, post)
            self._epoch[0] += 1
            # A site whose callback failed may have returned DISABLE: re-instrument.
            failed = any(s.pre is None for s in self._published(code, offset))
            try:
                self._publish_locked(model, force_toggle=failed)
            except (ValueError, SystemError) as exc:
                # e.g. 3.13's "cannot instrument shim code object": leave things as they were.
                if previous is None:
                    del model.probes[offset]
                else:
                    model.probes[offset] = previous
                try:
                    self._publish_locked(model)
                except (ValueError, SystemError):
                    pass
                raise KprobeError(
                    errno.EINVAL, f"{code.co_name}+{offset}: sys.monitoring refused: {exc}"
                ) from exc

    def disarm(self, code: CodeType, offset: int) -> None:
        with self._lock:
            self._reap_locked()
            model = self._codes.get(id(code))
            if model is None or model.code is not code or offset not in model.probes:
                return
            del model.probes[offset]
            self._publish_locked(model)

    def arm_return(self, code: CodeType, on_return: ReturnHit, on_unwind: UnwindHit) -> None:
        """See core/arch.py and "Return hooks" in the module docstring."""
        if self._closed:
            raise KprobeError(errno.EINVAL, "the monitoring arch is closed")
        flows = analyze(code)  # outside the lock: dis runs Python code
        entry_end = insn.entry_offset(code)
        with self._lock:
            self._reap_locked()
            model = self._codes.get(id(code))
            if model is None or model.code is not code:
                model = self._codes[id(code)] = _CodeModel(code, flows, entry_end)
            previous = model.ret
            model.ret = _Ret(code, on_return, on_unwind)
            self._epoch[0] += 1
            try:
                self._publish_locked(model)
            except (ValueError, SystemError) as exc:
                model.ret = previous
                try:
                    self._publish_locked(model)
                except (ValueError, SystemError):
                    pass
                raise KprobeError(
                    errno.EINVAL, f"{code.co_name}%return: sys.monitoring refused: {exc}"
                ) from exc

    def disarm_return(self, code: CodeType) -> None:
        with self._lock:
            self._reap_locked()
            model = self._codes.get(id(code))
            if model is None or model.code is not code or model.ret is None:
                return
            model.ret = None
            self._publish_locked(model)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for model in list(self._codes.values()):
                model.probes.clear()
                model.ret = None
                self._publish_locked(model)
            self._pending.clear()
            mon, tool = self._mon, self.tool
            try:
                mon.set_events(tool, 0)
                for ev in (
                    self._E_INS,
                    self._E_START,
                    self._E_RESUME,
                    self._E_RETURN,
                    self._E_YIELD,
                    self._E_UNWIND,
                ):
                    mon.register_callback(tool, ev, None)
            finally:
                free_tool_id(mon, tool)

    # ------------------------------------------------------------------ tables

    def _reap_locked(self) -> None:
        """Disarm the addresses whose callback failed (queued by `_fail`)."""
        failed = self._failed
        while failed:
            try:
                site = failed.popleft()
            except IndexError:
                break
            model = self._codes.get(id(site.code))
            if model is None or model.code is not site.code:
                continue
            probe = model.probes.get(site.armed)
            if probe is not None:
                del model.probes[site.armed]
                self._publish_locked(model)
        rets = self._failed_rets
        while rets:
            try:
                r = rets.popleft()
            except IndexError:
                break
            model = self._codes.get(id(r.code))
            if model is not None and model.ret is r:
                model.ret = None
                self._publish_locked(model)

    def _build_locked(self, model: _CodeModel) -> dict[tuple[int, int], _Site]:
        """The sites this code needs, keyed by (event, event offset)."""
        code, flows = model.code, model.flows
        sites: dict[tuple[int, int], _Site] = {}
        E_INS, E_START, E_RESUME = self._E_INS, self._E_START, self._E_RESUME

        def site(event: int, off: int) -> _Site:
            s = sites.get((event, off))
            if s is None:
                s = sites[(event, off)] = _Site(code)
            return s

        for offset in sorted(model.probes):
            probe = model.probes[offset]
            flow = flows[offset]
            if offset <= model.entry_end:
                s = _Site(code)
                head = sites.get((E_START, model.entry_end))
                if head is None:
                    sites[(E_START, model.entry_end)] = s
                else:
                    while head.also is not None:
                        head = head.also
                    head.also = s
                after = flows[model.entry_end].successors
            elif flow.opname == "RESUME":
                s = site(E_RESUME, offset)
                after = flow.successors
            else:
                s = site(E_INS, offset)
                after = flow.successors
            s.pre, s.post, s.armed = probe.pre, probe.post, offset
            if probe.post is None:
                continue
            if flow.leaves in ("return", "yield") and offset > model.entry_end:
                s.succ = _LEAVE
                leave_event = self._E_RETURN if flow.leaves == "return" else self._E_YIELD
                site(leave_event, flow.real_offset).armed = offset
            elif flow.leaves == "raise":
                if flow.handler is not None:
                    s.succ = frozenset({flow.handler})
                else:
                    s.succ = _UNWIND
            else:
                s.succ = after
            drops = set(s.succ) if isinstance(s.succ, frozenset) else set()
            if flow.handler is not None and offset > model.entry_end:
                drops.add(flow.handler)
            for w in drops:
                if w >= 0:
                    site(E_INS, w).waits = True
        if model.ret is not None:
            for flow in flows.values():
                if flow.leaves == "return":
                    site(self._E_RETURN, flow.real_offset).ret = model.ret
        return sites

    def _published(self, code: CodeType, offset: int) -> list[_Site]:
        """`code`'s published sites at `offset` (INSTRUCTION and PY_RESUME tables)."""
        out = []
        for table in (self._ins, self._resume):
            s = table.get(offset)
            if s is not None and s.code is not code:
                s = s.peers.get(id(code))
            if s is not None and s.code is code:
                out.append(s)
        return out

    def _publish_locked(self, model: _CodeModel, force_toggle: bool = False) -> None:
        code = model.code
        new = self._build_locked(model)
        tables = {
            self._E_INS: self._ins,
            self._E_START: self._start,
            self._E_RESUME: self._resume,
            self._E_RETURN: self._leave,
            self._E_YIELD: self._leave,
        }
        old_keys = model.keys
        new_keys = set(new)
        # Publish the new and changed sites before enabling events, unpublish the removed
        # ones after (a callback finding nothing returns DISABLE or nothing).
        for (event, off), s in new.items():
            self._relink(tables[event], off, code, s)
        events = 0
        for event, _off in new_keys:
            events |= event
        model.needs_unwind = any(s.succ is _UNWIND for s in new.values())
        unwinds = model.needs_unwind or model.ret is not None
        if self._local_unwind:
            if unwinds:
                events |= self._E_UNWIND  # this code's frames only (module docstring)
        elif unwinds:
            self._unwinders.add(id(code))
        else:
            self._unwinders.discard(id(code))
        if model.ret is not None:
            self._unwind[id(code)] = model.ret
        mon, tool = self._mon, self.tool
        if self._backjumps is not None:
            if events & self._E_INS:
                self._backjumps[id(code)] = _backward_jumps(code)
            else:
                self._backjumps.pop(id(code), None)
        grew = force_toggle or not new_keys <= old_keys
        if events == 0:
            if model.events:
                mon.set_local_events(tool, code, 0)
            if model.ret is None:  # a code with no return instruction keeps PY_UNWIND
                del self._codes[id(code)]
                if not self._codes:
                    self._codes.clear()  # give back the size it grew to
        elif grew and model.events:
            # Re-instrument this code for our tool only: see "Re-arming" above.
            list(map(mon.set_local_events, (tool, tool), (code, code), (0, events)))
        elif events != model.events:
            mon.set_local_events(tool, code, events)
        if events & self._E_INS and not model.events & self._E_INS and not self._ins_shared:
            self._spare_others_locked(code)
        for event, off in old_keys - new_keys:
            self._relink(tables[event], off, code, None)
        if model.ret is None:
            self._unwind.pop(id(code), None)
        model.keys = new_keys
        model.events = events
        self._set_unwind_locked(bool(self._unwinders))

    def _spare_others_locked(self, code: CodeType) -> None:
        """Give back the INSTRUCTION events our own just took from the other tools on `code`
        ("Other tools" in the module docstring)."""
        mon, E_INS = self._mon, self._E_INS
        for other in range(6):
            if other == self.tool:
                continue
            events = mon.get_local_events(other, code)
            if events & E_INS:
                # One C-level map(): no bytecode, so no thread runs the code in between.
                list(map(mon.set_local_events, (other, other), (code, code), (0, events)))

    def _set_unwind_locked(self, on: bool) -> None:
        if on != self._unwind_on:
            self._mon.set_events(self.tool, self._E_UNWIND if on else 0)
            self._unwind_on = on

    @staticmethod
    def _relink(table: dict[int, _Site], off: int, code: CodeType, new: _Site | None) -> None:
        """Replace `code`'s site at `off` by `new` (None: remove it), touching no other
        code's site (see `_Hub`)."""
        cur = table.get(off)
        if type(cur) is _Hub:
            peers = cur.peers
            if new is not None:
                peers[id(code)] = new
            else:
                peers.pop(id(code), None)
            if len(peers) == 1:
                table[off] = next(iter(peers.values()))  # the last one needs no hub
            elif not peers:
                table.pop(off, None)
        elif cur is None or cur.code is code:
            if new is not None:
                table[off] = new
            elif cur is not None:
                table.pop(off, None)
        elif new is not None:
            table[off] = _Hub({id(cur.code): cur, id(code): new})

    # ------------------------------------------------------------------ introspection

    def armed_addresses(self) -> list[tuple[CodeType, int]]:
        """The armed addresses (for tests and `pykprobes info`)."""
        with self._lock:
            return [(m.code, off) for m in self._codes.values() for off in sorted(m.probes)]

    def armed_returns(self) -> list[CodeType]:
        """The code objects whose return hooks are armed."""
        with self._lock:
            return [m.code for m in self._codes.values() if m.ret is not None]


# Markers for where a post runs when the instruction leaves the frame.
_LEAVE: Final[frozenset[int]] = frozenset({-1})
_UNWIND: Final[frozenset[int]] = frozenset({-2})


_JUMP_BACKWARD: Final = opcode.opmap["JUMP_BACKWARD"]


def _backward_jumps(code: CodeType) -> frozenset[int]:
    """The offsets of `code`'s JUMP_BACKWARDs (co_code has its caches zeroed: an even byte
    equal to the opcode is one)."""
    raw = code.co_code
    return frozenset(i for i in range(0, len(raw), 2) if raw[i] == _JUMP_BACKWARD)
