"""The breakpoint arch on `sys.settrace` with opcode events: the fallback for 3.11.

It also works on 3.12 and 3.13, where selection prefers the monitoring arch.

How it works
------------
A global trace function is installed with `sys.settrace` in the thread that arms the first
probe, and with `threading.settrace` for threads started later. Its 'call' event returns a
local tracer only for frames of armed code objects, and sets `f_trace_opcodes` (and clears
`f_trace_lines`) on them. The local tracer's 'opcode' event at an armed offset
(`frame.f_lasti`) calls `pre(frame, offset)`; `post` runs at the next 'opcode' or 'return'
event of that frame. Frames of armed code that are already running in the arming thread
(`sys._getframe()` and its callers) get `f_trace` set at arm time, so they hit at once.
When nothing is armed any more the trace function is removed (`sys.settrace(None)`,
`threading.settrace(None)`), and other threads remove it themselves at their next call.

A probe in the prologue (offset 0 up to and including its RESUME, insn.entry_index) is served by the
'call' event when `f_lasti` is in the prologue, i.e. at the first start of a generator or
coroutine, not at its creation nor at later resumptions: `uses_entry_event()` is True for
it, as for the monitoring arch. A RESUME after a `yield` is served by the 'call' event of
the resumption (`f_lasti` is that RESUME; RESUME itself never reports an 'opcode' event).

Return hooks (`arm_return`)
---------------------------
The 'call' event returns our local tracer for frames of code with return hooks too, with no
opcode events unless an armed offset needs them: 'return' and 'exception' events need only
a local tracer. The 'return' event fires for a return (arg: the value), for a yield or an
await (arg: the value yielded) and for an exception leaving the frame (arg None, after an
'exception' event in that frame). They are told apart by `frame.f_lasti` (successors.exits):

* at RETURN_VALUE/RETURN_CONST: a return: `on_return(frame, arg)`. No exception exit stops
  there (those instructions cannot raise, and a re-raise restores the raising
  instruction's lasti);
* at a yield (the YIELD_VALUE on 3.11/3.12, the RESUME after it on 3.13): a yield, unless
  the exception that leaves was thrown in at that yield (`throw()`, `close()`): a RERAISE
  restores `f_lasti` to the instruction that raised, so an uncaught `throw()` (or a
  `with` block's exit re-raising it) ends with `f_lasti` at the yield too (3.11.7, 3.12.1,
  3.13.0). So when an 'exception' event arrives at a yield, we turn opcode events on for
  that frame until the next 'return': if a YIELD_VALUE runs meanwhile (a handler caught it
  and the frame yields again), the 'return' is a yield; if not, the exception left.
  3.11/3.12 turn them off again; 3.13 keeps them on for that frame (turning
  `f_trace_opcodes` off there removes INSTRUCTION events from the whole code object,
  `_PyEval_SetOpcodeTrace`, also for other frames that need them);
* anywhere else: the exception left: `on_unwind(frame, exc)` with the value of the last
  'exception' event seen in that frame. That is the exception that left, except when an
  implicit re-raise (a `finally` block, an unmatched `except`) re-raises an earlier
  exception after another one was raised and handled inside that block: the later one is
  reported (`unwind_exception_exact` is False). On 3.11 a StopIteration raised in a
  generator is reported as such, while its caller sees the RuntimeError that the generator
  machinery makes of it in C after the frame left (PEP 479); 3.12+ convert it inside the
  frame, and the RuntimeError is reported. An exception that was raised before the hooks
  reached the frame is unknown: that end is counted in `unwinds_unknown`, not reported.

Frames already running in the arming thread get our local tracer at once, so their returns
are reported; suspended generators are traced from their next resumption in a traced
thread. Not reported (`capabilities`): frames running in other threads when armed (their
threads may not even have our trace function), ends inside a trace function (a handler),
and, on 3.13.0, a generator closed at a plain yield (`close()` or garbage collection of an
unfinished generator), which CPython does without running its frame (see successors.py).

Per-version facts (measured, tests/arch/test_settrace.py)
---------------------------------------------------------
* EXTENDED_ARG: 3.11 reports one 'opcode' event with `f_lasti` at the first prefix and none
  for the real opcode (ceval's EXTENDED_ARG dispatches it without the tracing check);
  3.12 and 3.13 report the prefix and then the real opcode (`f_lasti` = its own offset), so
  the real opcode's event is not taken for "the next instruction" of a post.
* 3.12: setting `f_trace_opcodes` only sets `interp->f_opcode_trace_set`
  (Objects/frameobject.c `frame_settrace_opcodes`); `_PyEval_SetTrace` turns INSTRUCTION
  events on, for every code object, only if that flag is set when a trace function is
  installed (gh-103615, documented by gh-114480). So we set it once, before the first
  `sys.settrace` that needs opcode events (or set it and call `sys.settrace` again): for
  an armed offset, or return hooks on code that can yield. The flag is never cleared:
  every later `sys.settrace` in the process, by anyone, runs with INSTRUCTION events on,
  which is slower for them.
* 3.12.1 crashes (segfault in `sys.settrace`) when, after a thread exited with an
  opcode-tracing trace function still installed (as threads started under
  `threading.settrace` do), `f_trace_opcodes` is assigned on a frame of a thread that has
  no trace function and `sys.settrace` is then called. We only ever assign
  `f_trace_opcodes` in a thread where a trace function is installed
  (`_set_opcode_trace_flag`, `_trace_running_frames` runs after `sys.settrace`).
* 3.13: the setter calls `_PyEval_SetOpcodeTrace`, which sets local INSTRUCTION events on
  the frame's code for the sys.settrace tool, but only if `f_trace` is already set: we set
  `f_trace` first. Those local INSTRUCTION events make sys.monitoring lose another tool's
  INSTRUCTION events on the same code (see arch/monitoring.py): do not mix the two arches
  on one code object.
* An exhausted FOR_ITER over a Python iterator reports an 'exception' event
  (StopIteration) although the instruction completes normally: a pending post survives
  'exception' events of FOR_ITER, SEND and of the raising instructions (RAISE_VARARGS,
  RERAISE: their post runs at the handler's first opcode or at the frame's 'return'),
  and is dropped for any other instruction, which did not complete.

Limits
------
* The global trace function is called for every call of every function in traced
  threads, and on 3.12 every instruction of every code object fires an INSTRUCTION event
  while it is installed: unprobed code is taxed (5-15x per call: docs/architecture.md, "Costs").
  So, while optimization is off, the core arms what it can by a rewrite instead
  (core/optimizer.py `rewrites_breakpoint`, asked of an arch whose `unprobed_code_untaxed`
  is False; with optimization on the optimizer's next pass rewrites the site), and
  leaves this arch the frames already running the replaced code and the probes a rewrite
  cannot take: its trace function is installed only while something is armed here.
* Threads that were already running when the first probe was armed have no trace function:
  neither their running frames nor their new calls are ever hit.
* Only one trace function per thread exists: if another one is installed (`sys.gettrace()`
  or `threading.gettrace()` is not ours), `arm` fails with EBUSY naming it. A tool that
  replaces ours later silently stops our probes in that thread.
* Trace functions are not called while one runs: hits inside pre/post/return hooks are
  not seen, nor are the ends of frames that end there.
* A callback that raises never reaches the program: the address is disarmed at the next
  arm/disarm (at once for this frame), the failure counted (`nfailures`, `failures`) and
  passed to `on_failure` if set. KeyboardInterrupt is re-raised (so is anything a signal
  handler raises while our code runs); CPython then removes the trace function of that
  thread (`trace_trampoline`), and we put it back at the thread's next profile event
  (`_escaped`), unless the program has a profile function there. For return hooks the
  offset reported is `RETURN_HOOKS` (-1) and the code's return hooks are disarmed.
"""

from __future__ import annotations

import collections
import errno
import sys
import threading
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any, ClassVar, Final

from pykprobes import insn
from pykprobes.arch import frametable
from pykprobes.arch.frametable import PENDING_CAP
from pykprobes.arch.successors import Exits, exits, generator_close_runs_frame
from pykprobes.codecache import cached
from pykprobes.core.arch import Capabilities, ReturnHit, UnwindHit
from pykprobes.errors import KprobeError

__all__ = ["RETURN_HOOKS", "SettraceArch"]

TraceFunc = Callable[[FrameType, str, Any], Any]

_PY312: Final = sys.version_info[:2] == (3, 12)
# 3.13+: clearing f_trace_opcodes on one frame removes the sys.settrace tool's INSTRUCTION
# events from the whole code object (`_PyEval_SetOpcodeTrace`).
_OPCODE_TRACE_PER_CODE: Final = sys.version_info >= (3, 13)

# A pending post survives an 'exception' event of these (see the module docstring).
_KEEP_ON_EXCEPTION: Final = frozenset({"FOR_ITER", "SEND", "RAISE_VARARGS", "RERAISE"})

#: At most this many pending posts (frames between an armed instruction and the next one),
#: and as many frames with a recorded exception.
#: The offset reported to `on_failure` and in `failures` for a failed return hook.
RETURN_HOOKS: Final = -1

_getframe = sys._getframe


_opcode_trace_flag_set = False


def _noop_trace(frame: FrameType, event: str, arg: Any) -> None:
    return None


def _set_opcode_trace_flag() -> None:
    """3.12: set `interp->f_opcode_trace_set`, once per process.

    `_PyEval_SetTrace` turns INSTRUCTION events on only if some frame set `f_trace_opcodes`
    before (gh-103615, gh-114480). The flag is set by assigning `f_trace_opcodes`, which we
    do *while a trace function is installed in this thread*: on 3.12.1, assigning it in a
    thread without one, after some thread exited with an opcode-tracing trace function
    still installed, makes the next `sys.settrace()` crash the interpreter (segfault,
    reproduced without pykprobes; tests/arch/test_settrace.py::test_no_crash_*).
    """
    global _opcode_trace_flag_set
    if _opcode_trace_flag_set:
        return
    me = _getframe()
    if sys.gettrace() is None:
        sys.settrace(_noop_trace)
        try:
            me.f_trace_opcodes = True
            me.f_trace_opcodes = False
        finally:
            sys.settrace(None)
    else:
        me.f_trace_opcodes = True
        me.f_trace_opcodes = False
    _opcode_trace_flag_set = True


class _Site:
    __slots__ = ("code", "offset", "last", "pre", "post", "keep")

    def __init__(
        self, code: CodeType, offset: int, last: int, pre: Any, post: Any, keep: bool
    ) -> None:
        self.code = code
        #: The armed offset (first EXTENDED_ARG prefix) ...
        self.offset = offset
        #: ... and the offset of its real opcode (3.12+ report both).
        self.last = last
        self.pre = pre
        self.post = post
        #: The pending post survives an 'exception' event of this instruction.
        self.keep = keep


class _Ret:
    """The return hooks of one code object; a failure clears both hooks."""

    __slots__ = ("code", "exits", "on_return", "on_unwind")

    def __init__(
        self, code: CodeType, ex: Exits, on_return: ReturnHit, on_unwind: UnwindHit
    ) -> None:
        self.code = code
        self.exits = ex
        self.on_return: ReturnHit | None = on_return
        self.on_unwind: UnwindHit | None = on_unwind


class _CodeModel:
    __slots__ = ("code", "sites", "entry", "entry_end", "ret", "opcodes")

    def __init__(self, code: CodeType, entry_end: int) -> None:
        self.code = code  # keeps id(code) stable while armed
        self.entry_end = entry_end
        #: offset -> site, for 'opcode' events and RESUME-after-yield 'call' events.
        self.sites: dict[int, _Site] = {}
        #: Prologue probes, run by the 'call' event of the first start.
        self.entry: tuple[_Site, ...] = ()
        #: The return hooks, if armed.
        self.ret: _Ret | None = None
        #: Its frames need 'opcode' events (armed offsets, or an entry probe's post).
        self.opcodes = False

    def update(self) -> None:
        self.opcodes = bool(self.sites) or any(s.post is not None for s in self.entry)

    def empty(self) -> bool:
        return not self.entry and not self.sites and self.ret is None


@cached
def _groups(code: CodeType) -> dict[int, tuple[int, str]]:
    """address -> (offset of the real opcode, its name), EXTENDED_ARG folded in (computed
    once per code object: arming a probe on every line of a function asked for it once per
    probe; shared, read only)."""
    return {ins.start: (ins.offset, ins.opname) for ins in insn.decode(code)}


def _describe(func: object) -> str:
    mod = getattr(func, "__module__", None) or type(func).__module__
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    return f"{mod}.{name} ({func!r})"


class SettraceArch:
    """Breakpoints on sys.settrace opcode events. See the module docstring."""

    name = "settrace"
    #: Measured on 3.11.7, 3.12.1 and 3.13.0 (tests/arch/test_settrace.py and, for the
    #: return_* and unwind_* ones, tests/arch/test_settrace_returns.py). An instance adds
    #: `return_at_generator_close`, measured on this interpreter (module docstring).
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        running_frames_this_thread=True,
        running_frames_other_threads=False,
        threads_started_earlier=False,
        threads_started_later=True,
        unprobed_code_untaxed=False,
        entry_event=True,
        post_handler=True,
        hits_inside_handlers=False,
        # Return hooks: frames already running in the arming thread report their end,
        # those of other threads do not; suspended generators do from their next
        # resumption in a traced thread.
        return_of_running_frames_this_thread=True,
        return_of_running_frames_other_threads=False,
        return_of_suspended_generators=True,
        # on_unwind gets the last exception raised in the frame (module docstring).
        unwind_exception_exact=False,
        returns_inside_handlers=False,
    )
    capabilities: Capabilities

    def __init__(self) -> None:
        self.capabilities = self.CAPABILITIES.replace(
            return_at_generator_close=generator_close_runs_frame())
        self._lock = threading.Lock()
        self._codes: dict[int, _CodeModel] = {}
        self._installed = False
        self._closed = False
        self._pending: dict[FrameType, _Site] = {}
        #: Return-hooked frames: the last exception raised in each (until it leaves or
        #: yields), and those in an exception-at-a-yield window (value: we turned opcode
        #: events on for it). See "Return hooks" in the module docstring.
        self._lastexc: dict[FrameType, BaseException] = {}
        self._windows: dict[FrameType, bool] = {}
        #: Exception exits whose exception was raised before our tracer saw the frame.
        self.unwinds_unknown = 0
        #: Sites whose callback failed, drained under the lock (deque: atomic append/pop).
        self._failed: collections.deque[_Site] = collections.deque()
        self._failed_rets: collections.deque[_Ret] = collections.deque()
        #: Failures of pre/post callbacks (each disarmed its address).
        self.nfailures = 0
        self.failures: collections.deque[tuple[CodeType, int, BaseException]] = collections.deque(
            maxlen=16
        )
        #: on_failure(code, offset, exc), called (guarded) when a callback failed.
        self.on_failure: Callable[[CodeType, int, BaseException], None] | None = None
        #: Pending posts dropped because of PENDING_CAP.
        self.pending_dropped = 0
        #: Threads left untraced after an exception left our trace function (`_escaped`).
        self.untraced_after_interrupt = 0
        self._global, self._local = self._make_tracers()

    # ------------------------------------------------------------------ hot path

    def _make_tracers(self) -> tuple[TraceFunc, TraceFunc]:
        codes = self._codes
        pending = self._pending
        lastexc = self._lastexc
        windows = self._windows
        fail = self._fail
        fail_ret = self._fail_ret
        unknown = self._unwind_unknown
        cap = PENDING_CAP
        trim = self._trim_pending
        trim_frames = frametable.trim
        settrace = sys.settrace
        per_code = _OPCODE_TRACE_PER_CODE
        escaped = self._escaped

        def call_pre(site: _Site, frame: FrameType) -> None:
            pre = site.pre
            if pre is None:
                return
            try:
                pre(frame, site.offset)
            except BaseException as exc:  # never reaches the program
                if exc.__class__ is KeyboardInterrupt:
                    raise
                fail(site, exc)
                return
            if site.post is not None:
                pending[frame] = site
                if len(pending) > cap:
                    trim()

        def call_post(site: _Site, frame: FrameType) -> None:
            post = site.post
            if post is None:
                return
            try:
                post(frame, site.offset)
            except BaseException as exc:  # never reaches the program
                if exc.__class__ is KeyboardInterrupt:
                    raise
                fail(site, exc)

        def leave(r: _Ret, frame: FrameType, arg: Any) -> None:
            """A return-hooked frame's 'return' event: a return, a yield or an exception
            leaving (see "Return hooks" in the module docstring)."""
            lasti = frame.f_lasti
            ex = r.exits
            if lasti in ex.returns:
                if lastexc:
                    lastexc.pop(frame, None)
                if windows:
                    windows.pop(frame, None)
                hook = r.on_return
                if hook is not None:
                    try:
                        hook(frame, arg)
                    except BaseException as exc:  # never reaches the program
                        if exc.__class__ is KeyboardInterrupt:
                            raise
                        fail_ret(r, exc)
            elif lasti in ex.yield_lasti and not (windows and frame in windows):
                if lastexc:  # handled before the yield
                    lastexc.pop(frame, None)
            else:
                if windows:
                    windows.pop(frame, None)
                raised = lastexc.pop(frame, None) if lastexc else None
                if raised is None:
                    unknown()
                    return
                uhook = r.on_unwind
                if uhook is not None:
                    try:
                        uhook(frame, raised)
                    except BaseException as err:  # never reaches the program
                        if err.__class__ is KeyboardInterrupt:
                            raise
                        fail_ret(r, err)

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            # One try around the body (free on 3.11+): see `_escaped`.
            try:
                code = frame.f_code
                m = codes.get(id(code))
                if m is None or m.code is not code:
                    pending.pop(frame, None)
                    if lastexc:
                        lastexc.pop(frame, None)
                    if windows:
                        windows.pop(frame, None)
                    return None  # disarmed: stop tracing this frame
                if event == "opcode":
                    lasti = frame.f_lasti
                    if pending:
                        rec = pending.get(frame)
                        # 3.12+ report the real opcode after its EXTENDED_ARG prefix: that is
                        # still the armed instruction, not the next one.
                        if rec is not None and not (rec.offset < lasti <= rec.last):
                            del pending[frame]
                            call_post(rec, frame)
                    site = m.sites.get(lasti)
                    if site is not None:
                        call_pre(site, frame)
                    if windows:
                        r = m.ret
                        # A YIELD_VALUE runs: the exception thrown in at a yield was handled.
                        if (
                            (r is None or lasti in r.exits.yields)
                            and windows.pop(frame, False)
                            and not (per_code or m.opcodes)
                        ):
                            frame.f_trace_opcodes = False
                elif event == "return":
                    rec = pending.pop(frame, None) if pending else None
                    if rec is not None:
                        call_post(rec, frame)
                    r = m.ret
                    if r is not None:
                        leave(r, frame, arg)
                elif event == "exception":
                    rec = pending.get(frame) if pending else None
                    if rec is not None and not rec.keep:
                        del pending[frame]  # the instruction raised: it did not complete
                    r = m.ret
                    if r is not None:
                        lastexc[frame] = arg[1]
                        if len(lastexc) > cap:
                            trim_frames(lastexc)
                        if frame.f_lasti in r.exits.yield_lasti and frame not in windows:
                            mine = not frame.f_trace_opcodes
                            windows[frame] = mine
                            if mine:
                                frame.f_trace_opcodes = True
                            if len(windows) > cap:
                                trim_frames(windows)
                return local

            except BaseException:
                escaped()
                raise

        def _on_call(m: _CodeModel, frame: FrameType) -> None:
            lasti = frame.f_lasti
            if lasti <= m.entry_end:
                for site in m.entry:
                    call_pre(site, frame)
            else:
                resumed = m.sites.get(lasti)  # a RESUME after a yield
                if resumed is not None:
                    call_pre(resumed, frame)

        def global_trace(frame: FrameType, event: str, arg: Any) -> Any:
            if not codes:
                settrace(None)  # nothing armed: leave this thread untaxed
                return None
            code = frame.f_code
            m = codes.get(id(code))
            if m is None or m.code is not code:
                return None
            try:
                frame.f_trace_lines = False
                frame.f_trace = local  # 3.13: before f_trace_opcodes, see the docstring
                if m.opcodes:
                    frame.f_trace_opcodes = True
                _on_call(m, frame)
            except BaseException:
                escaped()
                raise
            return local

        return global_trace, local

    def _escaped(self) -> None:
        """An exception leaves our trace function: a KeyboardInterrupt re-raised for the
        program, or whatever a signal handler raised while our code ran. CPython then
        removes the thread's trace function (sysmodule.c trace_trampoline), which would
        leave every breakpoint of the thread dead while still armed; so put it back at
        the thread's next profile event (a call, a C call, the exception leaving a frame):
        the profile function is a separate slot that CPython leaves alone. Not when the
        program profiles (one slot: ours would take its place); that thread is counted
        in `untraced_after_interrupt`."""
        if sys.getprofile() is not None:
            self.untraced_after_interrupt += 1
            return
        sys.setprofile(self._reinstall)

    def _reinstall(self, frame: FrameType, event: str, arg: Any) -> None:
        sys.setprofile(None)
        if not self._codes or sys.gettrace() is not None:
            return  # nothing armed any more, or another tool traces this thread now
        sys.settrace(self._global)
        # The frame whose callback raised lost its local tracer; the others kept theirs.
        local = self._local
        f: FrameType | None = frame
        while f is not None:
            m = self._codes.get(id(f.f_code))
            if m is not None and m.code is f.f_code:
                if f.f_trace is not local:
                    f.f_trace_lines = False
                    f.f_trace = local
                if m.opcodes and not f.f_trace_opcodes:
                    f.f_trace_opcodes = True
            f = f.f_back

    def _fail(self, site: _Site, exc: BaseException) -> None:
        try:
            site.pre = None
            site.post = None
            self.nfailures += 1
            self.failures.append((site.code, site.offset, exc))
            self._failed.append(site)
            hook = self.on_failure
            if hook is not None:
                hook(site.code, site.offset, exc)
        except BaseException:  # noqa: BLE001 - never reaches the program
            pass

    def _fail_ret(self, r: _Ret, exc: BaseException) -> None:
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

    def _unwind_unknown(self) -> None:
        self.unwinds_unknown += 1

    def _trim_pending(self) -> None:
        self.pending_dropped += frametable.trim(self._pending)

    # ------------------------------------------------------------------ arm/disarm

    def uses_entry_event(self, code: CodeType, offset: int) -> bool:
        return 0 <= offset <= insn.entry_offset(code)

    def arm(self, code: CodeType, offset: int, pre: Any, post: Any) -> None:
        if self._closed:
            raise KprobeError(errno.EINVAL, "the settrace arch is closed")
        groups = _groups(code)
        if offset not in groups:
            raise KprobeError(
                errno.EINVAL, f"{code.co_name}+{offset} is not the start of an instruction"
            )
        last, opname = groups[offset]
        if opname == "END_FOR":
            raise KprobeError(
                errno.EINVAL,
                f"{code.co_name}+{offset}: END_FOR never runs with an event "
                "(an exhausted FOR_ITER jumps over it)",
            )
        entry_end = insn.entry_offset(code)
        with self._lock:
            self._reap_locked()
            self._check_busy_locked()
            model = self._codes.get(id(code))
            if model is None or model.code is not code:
                model = _CodeModel(code, entry_end)
            site = _Site(code, offset, last, pre, post, opname in _KEEP_ON_EXCEPTION)
            if offset <= entry_end:
                model.entry = (*(s for s in model.entry if s.offset != offset), site)
            else:
                model.sites = {**model.sites, offset: site}
            model.update()
            self._codes[id(code)] = model
            # Install only now: our trace function removes itself from a thread whose next
            # call finds nothing armed.
            self._install_locked()
            self._trace_running_frames(code)

    def disarm(self, code: CodeType, offset: int) -> None:
        with self._lock:
            self._reap_locked()
            self._disarm_locked(code, offset)
            if not self._codes:
                self._uninstall_locked()

    def arm_return(self, code: CodeType, on_return: ReturnHit, on_unwind: UnwindHit) -> None:
        """See core/arch.py and "Return hooks" in the module docstring."""
        if self._closed:
            raise KprobeError(errno.EINVAL, "the settrace arch is closed")
        ex = exits(code)  # outside the lock: dis runs Python code
        entry_end = insn.entry_offset(code)
        with self._lock:
            self._reap_locked()
            self._check_busy_locked()
            model = self._codes.get(id(code))
            if model is None or model.code is not code:
                model = _CodeModel(code, entry_end)
            model.ret = _Ret(code, ex, on_return, on_unwind)
            self._codes[id(code)] = model
            # Opcode events only for the exception-at-a-yield window (docstring).
            self._install_locked(opcodes=bool(ex.yields))
            self._trace_running_frames(code)

    def disarm_return(self, code: CodeType) -> None:
        with self._lock:
            self._reap_locked()
            self._disarm_return_locked(code)
            if not self._codes:
                self._uninstall_locked()

    def _disarm_return_locked(self, code: CodeType) -> None:
        model = self._codes.get(id(code))
        if model is None or model.code is not code or model.ret is None:
            return
        model.ret = None
        if model.empty():
            self._forget_locked(code)
        for table in (self._lastexc, self._windows):
            for frame in [f for f in list(table) if f.f_code is code]:
                table.pop(frame, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._codes.clear()
            self._pending.clear()
            self._lastexc.clear()
            self._windows.clear()
            self._uninstall_locked()

    def _forget_locked(self, code: CodeType) -> None:
        del self._codes[id(code)]
        if not self._codes:
            self._codes.clear()  # give back the size it grew to

    def _disarm_locked(self, code: CodeType, offset: int) -> None:
        model = self._codes.get(id(code))
        if model is None or model.code is not code:
            return
        if offset <= model.entry_end:
            model.entry = tuple(s for s in model.entry if s.offset != offset)
        elif offset in model.sites:
            model.sites = {o: s for o, s in model.sites.items() if o != offset}
        model.update()
        if model.empty():
            self._forget_locked(code)
        for frame, rec in list(self._pending.items()):
            if rec.code is code and rec.offset == offset:
                self._pending.pop(frame, None)

    def _reap_locked(self) -> None:
        failed = self._failed
        while failed:
            try:
                site = failed.popleft()
            except IndexError:
                break
            model = self._codes.get(id(site.code))
            if model is None:
                continue
            current = model.sites.get(site.offset) or next(
                (s for s in model.entry if s.offset == site.offset), None
            )
            if current is site:
                self._disarm_locked(site.code, site.offset)
        rets = self._failed_rets
        while rets:
            try:
                r = rets.popleft()
            except IndexError:
                break
            model = self._codes.get(id(r.code))
            if model is not None and model.ret is r:
                self._disarm_return_locked(r.code)
        if not self._codes:
            self._uninstall_locked()

    # ------------------------------------------------------------------ the trace function

    def _check_busy_locked(self) -> None:
        ours = self._global
        current = sys.gettrace()
        if current is not None and current is not ours:
            raise KprobeError(
                errno.EBUSY, f"sys.settrace is held by {_describe(current)} in this thread"
            )
        new_threads = threading.gettrace()
        if new_threads is not None and new_threads is not ours:
            raise KprobeError(
                errno.EBUSY, f"threading.settrace is held by {_describe(new_threads)}"
            )

    def _install_locked(self, opcodes: bool = True) -> None:
        """Install our trace function; `opcodes`: something armed needs 'opcode' events."""
        ours = self._global
        current = sys.gettrace()
        new_threads = threading.gettrace()
        if _PY312 and opcodes and not _opcode_trace_flag_set:
            # 3.12: opcode events need the flag set before sys.settrace (docstring). Only
            # then, because it taxes every later sys.settrace in the process: return hooks
            # on plain functions do not need it (1.6x less per traced call, measured).
            _set_opcode_trace_flag()
            if current is ours:
                sys.settrace(ours)  # recompute the events: INSTRUCTION is now included
        if current is None:
            sys.settrace(ours)
        if new_threads is None:
            threading.settrace(ours)
        self._installed = True

    def _uninstall_locked(self) -> None:
        if not self._installed:
            return
        if sys.gettrace() is self._global:
            sys.settrace(None)
        if threading.gettrace() is self._global:
            threading.settrace(None)
        self._installed = False

    def _trace_running_frames(self, code: CodeType) -> None:
        """Give the frames of `code` already running in this thread our local tracer (and
        opcode events if its probes need them)."""
        local = self._local
        model = self._codes.get(id(code))
        opcodes = model is not None and model.opcodes
        frame: FrameType | None = _getframe(1)
        while frame is not None:
            if frame.f_code is code:
                if frame.f_trace is not local:
                    frame.f_trace_lines = False
                    frame.f_trace = local  # 3.13: before f_trace_opcodes
                if opcodes and not frame.f_trace_opcodes:
                    frame.f_trace_opcodes = True
            frame = frame.f_back

    # ------------------------------------------------------------------ introspection

    def installed(self) -> bool:
        """Is our trace function installed in this thread?"""
        return sys.gettrace() is self._global

    def armed_returns(self) -> list[CodeType]:
        """The code objects whose return hooks are armed."""
        with self._lock:
            return [m.code for m in self._codes.values() if m.ret is not None]

    def armed_addresses(self) -> list[tuple[CodeType, int]]:
        with self._lock:
            out: list[tuple[CodeType, int]] = []
            for m in self._codes.values():
                offsets = sorted({s.offset for s in m.entry} | set(m.sites))
                out.extend((m.code, o) for o in offsets)
            return out
