"""The contract between the core and the mechanisms (the kernel's `arch_*` verbs).

The core never imports a mechanism statically: `select_breakpoint()` and `select_optimizer()`
load them by dotted name from the tables below, the way wrapt defers `'module:function'`
hooks, and return the chosen one together with the reason each other one was rejected
(coverage.py's tracer selection), which `pykprobes info` prints.

Two kinds of mechanism, as in the kernel:

* a **breakpoint** arch (`sys.monitoring` on 3.12+, `sys.settrace` on 3.11) arms a probe
  address so that it is hit at once, including in frames that are already running;
* an **optimizer** arch (bytecode rewriting) builds a new code object with the probe's call
  sequence at the address; the core then switches the code's holders to it.

An address is always (code object, offset), where the code object is compared by identity
and the offset is the start of an instruction (its first EXTENDED_ARG prefix if it has one).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, MutableMapping
from types import CodeType, FrameType
from typing import Any, Protocol

from pykprobes.core.guard import CURRENT_KPROBE


class Capabilities:
    """What a breakpoint arch can reach, measured by its tests (the tests skip on these,
    never on the Python version; `pykprobes info` prints them). A plain class, not a
    dataclass or a typing.NamedTuple: the boot stage imports this module, and both cost
    start-up time (a NamedTuple class imports annotationlib, ast and enum on 3.14+)."""

    __slots__ = (
        "running_frames_this_thread",
        "running_frames_other_threads",
        "threads_started_earlier",
        "threads_started_later",
        "unprobed_code_untaxed",
        "entry_event",
        "post_handler",
        "hits_inside_handlers",
        "return_of_running_frames_this_thread",
        "return_of_running_frames_other_threads",
        "return_of_suspended_generators",
        "unwind_exception_exact",
        "returns_inside_handlers",
        "return_at_generator_close",
        "local_unwind",
        "instruction_events_shared",
    )

    def __init__(
        self,
        *,
        running_frames_this_thread: bool = False,
        running_frames_other_threads: bool = False,
        threads_started_earlier: bool = False,
        threads_started_later: bool = False,
        unprobed_code_untaxed: bool = False,
        entry_event: bool = False,
        post_handler: bool = False,
        hits_inside_handlers: bool = False,
        return_of_running_frames_this_thread: bool = False,
        return_of_running_frames_other_threads: bool = False,
        return_of_suspended_generators: bool = False,
        unwind_exception_exact: bool = False,
        returns_inside_handlers: bool = False,
        return_at_generator_close: bool = False,
        local_unwind: bool = False,
        instruction_events_shared: bool = False,
    ) -> None:
        #: Frames already running when an address is armed: in the arming thread, in others.
        self.running_frames_this_thread = running_frames_this_thread
        self.running_frames_other_threads = running_frames_other_threads
        #: Threads started before the first probe was armed, and after.
        self.threads_started_earlier = threads_started_earlier
        self.threads_started_later = threads_started_later
        #: Code with no probe runs at full speed.
        self.unprobed_code_untaxed = unprobed_code_untaxed
        self.entry_event = entry_event
        self.post_handler = post_handler
        #: A probe hit by a handler is seen (and counted missed).
        self.hits_inside_handlers = hits_inside_handlers
        #: Return hooks: frames running when armed (this thread, others) and generators
        #: suspended when armed report their end; on_unwind gets the very exception the caller
        #: sees; a frame ending inside a handler is seen.
        self.return_of_running_frames_this_thread = return_of_running_frames_this_thread
        self.return_of_running_frames_other_threads = return_of_running_frames_other_threads
        self.return_of_suspended_generators = return_of_suspended_generators
        self.unwind_exception_exact = unwind_exception_exact
        self.returns_inside_handlers = returns_inside_handlers
        #: Closing a suspended generator runs its frame, so that its end is reported (measured
        #: at start: False on CPython 3.13.0).
        self.return_at_generator_close = return_at_generator_close
        #: sys.monitoring only (measured at start): a local PY_UNWIND event; INSTRUCTION
        #: events shared with another tool of the same code.
        self.local_unwind = local_unwind
        self.instruction_events_shared = instruction_events_shared

    def replace(self, **changes: bool) -> Capabilities:
        """A copy with `changes` (an arch adds what it measures on this interpreter)."""
        unknown = set(changes) - set(self.__slots__)
        if unknown:
            raise TypeError(f"no capabilities {sorted(unknown)}")
        return Capabilities(**{**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, bool]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in self.as_dict().items())
        return f"Capabilities({shown})"


#: pre(frame, offset): called before the instruction at `offset` executes, in the probed
#: frame's thread, with that frame. It never raises. A mechanism whose callback CPython
#: calls for the probed frame may pass None instead, having added the callback's code to
#: core/regs.py CALLBACK_CODES: the frame is then found only if a handler asks for it (a
#: frame object costs as much as the handler call).
PreHit = Callable[[FrameType | None, int], None]
#: post(frame, offset): called after the instruction at `offset` executed (the next
#: instruction executed in that frame); never raises.
PostHit = Callable[[FrameType, int], None]
#: Optimized hit: called with no argument from the injected call sequence; it finds the
#: probed frame with sys._getframe(1). Never raises.
OptHit = Callable[[], None]


class CompiledCall:
    """An optimized hit that hands the probe some variables of the probed frame, loaded by
    the call sequence itself: `if record(*values of variables): hit()`.

    Offered by a probe (`Kprobe.compile_call`) when it alone is active at a site, so that
    what it does on a hit can run without a frame object (a probe event records the values
    of its argument fetchargs: trace/recorder.py). `record` returns True when it did not do
    the probe's work and the careful path `hit` (the site's optimized hit) must run; it
    never raises. `variables` are names of the code's arguments: an optimizer places the
    call at the function's entry only, where every argument is bound, and anywhere else (or
    for a name that is no argument) calls `hit()` as for any probe.

    Two compiled calls are equal when they would be assembled the same: the table
    rebuilds a code object when its sites' calls change (a second probe, a disable).
    """

    __slots__ = ("record", "variables", "hit")

    def __init__(
        self, record: Callable[..., bool], variables: tuple[str, ...], hit: OptHit
    ) -> None:
        self.record = record
        self.variables = variables
        self.hit = hit

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is CompiledCall
            and other.record is self.record
            and other.variables == self.variables
            and other.hit == self.hit
        )

    def __hash__(self) -> int:
        return hash((id(self.record), self.variables))

    def __repr__(self) -> str:
        return f"<CompiledCall {self.record!r}({', '.join(self.variables)}) else {self.hit!r}>"


class InlineHit:
    """An optimized hit whose handler the rewritten code calls itself (core/opthit.py):
    `enter()` returns (handler, probe, regs, held) after marking `held[0]` and counting, or
    None after running the careful path; the code then calls `handler(probe, regs)` and
    clears `held[0]`, or, where the handler raised, calls `fault(exc)` (which clears it and
    lets only KeyboardInterrupt go on). `gate` is registered with the offsets of those calls
    (core/regs.py INLINE_CALLS). An optimizer that cannot build the inline sequence at an
    offset calls `hit()` there instead, as for any OptHit."""

    __slots__ = ("enter", "fault", "gate", "hit")

    def __init__(
        self,
        enter: Callable[[], Any],
        fault: Callable[[BaseException], None],
        gate: Any,
        hit: OptHit,
    ) -> None:
        self.enter = enter
        self.fault = fault
        self.gate = gate
        self.hit = hit

    def __repr__(self) -> str:
        return f"<InlineHit {self.enter!r} else {self.hit!r}>"


def opt_call(
    probes: tuple[Any, ...], hit: OptHit, code: CodeType, offset: int
) -> OptHit | CompiledCall:
    """What the optimizer should call at a site whose active probes are `probes`: the
    compiled call its one probe offers (`compile_call(code, offset, current)` -> `(record,
    variables)` or None), or else the site's `hit`. An offer that raises is no offer.

    `current` is core/guard.py's CURRENT_KPROBE: the marks a record must test before it
    does the probe's work alone (a handler running in some thread sends the hit to `hit`,
    the careful path, which applies the reentrancy rule)."""
    if len(probes) == 1:
        offer = getattr(probes[0], "compile_call", None)
        if offer is not None:
            try:
                got = offer(code, offset, CURRENT_KPROBE)
            except Exception:  # noqa: BLE001 - a bad offer leaves the probe a plain one
                got = None
            if got is not None:
                record, variables = got
                return CompiledCall(record, tuple(variables), hit)
    return hit


#: Return hooks of the breakpoint arch: on_return(frame, value) when a frame of the code
#: returns, on_unwind(frame, exc) when an exception leaves it. Never raise.
ReturnHit = Callable[[FrameType, object], None]
UnwindHit = Callable[[FrameType, BaseException], None]
#: Return hooks built into rewritten code: (on_return(value), on_unwind(exc)), called from
#: the probed frame itself (sys._getframe(1) is it). Never raise.
OptReturns = tuple[Callable[[object], None], Callable[[BaseException], None]]


class Built:
    """What `OptimizerArch.build` returns: the new code, and where each instruction of the
    original code sits in it (original offset -> new offset, every instruction start)."""

    __slots__ = ("code", "offsets")

    def __init__(self, code: CodeType, offsets: Mapping[int, int]) -> None:
        self.code = code
        self.offsets = offsets


class BreakpointArch(Protocol):
    """A mechanism that acts at once (the kernel's int3 probe).

    Its constructor raises ArchUnavailable when it cannot work on this interpreter, or
    KprobeError(EBUSY) when what it needs is held by another tool. `arm` raises
    KprobeError(EINVAL) for an address it can never serve.
    """

    name: str
    #: What it can reach (see Capabilities).
    capabilities: Capabilities

    def arm(self, code: CodeType, offset: int, pre: PreHit, post: PostHit | None) -> None:
        """From now on call `pre` before every execution of the instruction at `offset` of
        this very `code` object, in every thread (as far as the mechanism can reach), and
        `post` after it, if given. Arming an armed address replaces its callbacks."""

    def disarm(self, code: CodeType, offset: int) -> None:
        """Undo `arm`: the address runs with no callback. Disarming an unarmed one is a no-op."""

    def arm_return(self, code: CodeType, on_return: ReturnHit, on_unwind: UnwindHit) -> None:
        """From now on, when a frame of this very `code` object ends, call
        `on_return(frame, value)` if it returned `value`, or `on_unwind(frame, exc)` if the
        exception `exc` left it (after the frame's own handlers had their chance; the
        exception then propagates unchanged). A generator, coroutine or async generator
        frame ends once: when it returns (value = what it returned, i.e. StopIteration's
        value), raises, or is closed (GeneratorExit, unless it returns instead); never at a
        yield or await. In every thread the mechanism reaches (see `capabilities`). Arming
        an armed code replaces its hooks."""

    def disarm_return(self, code: CodeType) -> None:
        """Undo `arm_return`; a no-op if not armed."""

    def uses_entry_event(self, code: CodeType, offset: int) -> bool:
        """True when a probe at this address is served by a function-entry event
        (the analogue of the kernel's ftrace-based probe, KPROBE_FLAG_FTRACE)."""

    def close(self) -> None:
        """Disarm everything and give back what was claimed (tool ids, trace functions)."""


class OptimizerArch(Protocol):
    """A mechanism that rewrites code (the kernel's optprobe)."""

    name: str
    #: A CompiledCall at a function's entry is built as one, always, when its variables are
    #: the function's parameters (the core pairs such an entry with return hooks that rely
    #: on it: core/rethook.py); False: compiled calls are served as their plain hit.
    compiles_calls: bool

    def check_optimizable(self, code: CodeType, offset: int) -> str | None:
        """None when a call sequence can safely be inserted before this instruction;
        otherwise the reason it cannot (the probe then stays a breakpoint)."""

    def build(
        self,
        code: CodeType,
        hits: Mapping[int, OptHit | CompiledCall | InlineHit],
        consts: Mapping[int, CodeType],
        returns: OptReturns | None = None,
    ) -> Built:
        """A new code object: `code` with, before the instruction at each offset in `hits`,
        a call of `hits[offset]()` whose line number is the instruction's (for a
        CompiledCall: its call at the entry, its `hit` anywhere else); and with each
        code constant at index `i` of `code.co_consts` replaced by `consts[i]` (the nested
        functions' own rewritten code). With `returns`, the frame also calls
        `returns[0](value)` as it returns `value`, and `returns[1](exc)` as an exception
        leaves it (then re-raised unchanged, traceback included), with the meaning of
        `BreakpointArch.arm_return`. Everything else behaves exactly as `code`. Raises
        ValueError for an offset `check_optimizable` refuses."""

    def frames_running(self, code: CodeType) -> bool:
        """True while some frame (a thread's stack, a suspended generator or coroutine)
        still executes this very code object."""

    def share(self, code: CodeType, namespace: MutableMapping[str, Any]) -> None:
        """Functions whose globals are `namespace` run `code` (built here): put there
        what the code reads from its globals, so that a function pickled by value (with
        the globals its code names) takes it along."""


BREAKPOINT_ARCHES: Mapping[str, str] = {
    "monitoring": "pykprobes.arch.monitoring:MonitoringArch",
    "settrace": "pykprobes.arch.settrace:SettraceArch",
}
OPTIMIZER_ARCHES: Mapping[str, str] = {
    "rewrite": "pykprobes.arch.rewrite:RewriteArch",
}


class ArchUnavailable(Exception):
    """Raised by an arch's constructor when it cannot work on this interpreter; the message
    is the reason shown by `pykprobes info`."""


def _load(spec: str) -> type:
    module, _, attr = spec.partition(":")
    cls: type = getattr(importlib.import_module(module), attr)
    return cls


def _select(table: Mapping[str, str], wanted: str | None) -> tuple[object, dict[str, str]]:
    rejected: dict[str, str] = {}
    for name, spec in table.items():
        if wanted and name != wanted:
            rejected[name] = f"not chosen: PYKPROBES_BREAKPOINT={wanted}"
            continue
        try:
            return _load(spec)(), rejected
        except ArchUnavailable as exc:
            rejected[name] = str(exc)
        except ImportError as exc:  # e.g. `bytecode` is not installed
            rejected[name] = f"cannot import {spec}: {exc}"

    raise ArchUnavailable("; ".join(f"{n}: {r}" for n, r in rejected.items()))


def select_breakpoint() -> tuple[BreakpointArch, dict[str, str]]:
    """The first breakpoint arch that works here, and why the others were not taken."""
    arch, rejected = _select(BREAKPOINT_ARCHES, os.environ.get("PYKPROBES_BREAKPOINT") or None)
    return arch, rejected  # type: ignore[return-value]


def select_optimizer() -> tuple[OptimizerArch, dict[str, str]]:
    arch, rejected = _select(OPTIMIZER_ARCHES, None)
    return arch, rejected  # type: ignore[return-value]
