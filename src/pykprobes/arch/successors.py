"""Static control flow of one code object, for the breakpoint arches' post-handlers.

A post-handler runs "after the armed instruction executed", i.e. at the next instruction
executed in the same frame. The monitoring arch implements that by arming, internally, every
instruction that can run next: the fall-through and jump targets of the armed instruction.
This module computes them from the instructions the one decoder (insn.py) reads in the
de-instrumented `co_code`, for CPython 3.12+ (the versions with `sys.monitoring`).

What counts as "the next instruction" is what fires the next INSTRUCTION event, so the
instructions that never fire one are looked through (`_silent_opcodes`):

* `RESUME` and `END_FOR` are skipped by the INSTRUCTION instrumentation
  (`_Py_Instrument` in 3.12, `force_instrument_lock_held` in 3.13, Python/instrumentation.c:
  "if (opcode == RESUME || opcode == END_FOR) continue");
* the prologue (`MAKE_CELL`, `COPY_FREE_VARS`, `RETURN_GENERATOR`, `POP_TOP`, up to and
  including its `RESUME`, insn.entry_index) lies before `co->_co_firsttraceable` and is never
  instrumented either: a probe there is served by the PY_START event instead.

An exhausted `FOR_ITER` does not jump to its `dis` target but past it
(`env.FOR_ITER_EXIT_SKIPS`). Exception-table handlers are not successors: an instruction that
raises did not complete, so no post-handler runs for it; the handler is reported separately
(`Flow.handler`) so that the arch can drop the pending post there.

Frame ends (`exits`), for the return hooks
------------------------------------------
`exits(code)` tells where a frame of the code leaves: its return instructions, its yields,
and the `f_lasti` a frame shows when it reports a yield (the YIELD_VALUE on 3.11 and 3.12,
the RESUME after it on 3.13, measured in tests/arch/test_settrace_returns.py). It also
lists the yields at which `close()` (and the finalizer of an unfinished generator) ends
the frame without running it on interpreters that take that shortcut
(`generator_close_runs_frame()`): CPython 3.13 `gen_close` marks a generator suspended at a
yield covered only by the implicit StopIteration handler (RESUME's
`RESUME_OPARG_DEPTH1_MASK`) completed and clears its locals in C, so no event of any kind
(PY_UNWIND, PY_THROW, sys.settrace 'return', sys.setprofile 'return') reports that end.
3.12's `gen_close` has the same shortcut but compares the YIELD_VALUE's opcode, not its
oparg, with 1 (`frame->prev_instr[0].op.code`), so 3.12.1 never takes it; later 3.12
patch releases reworked that code (gh-118272), hence a measurement, not a version check.
3.11 has no shortcut: it even starts a never-started generator's frame to throw
GeneratorExit into it (a 'call' event, then its end), where 3.12+ run nothing.
"""

from __future__ import annotations

import dis
import opcode
import sys
from types import CodeType
from typing import Any, Final

from pykprobes import env, insn
from pykprobes.codecache import cached

__all__ = ["Exits", "Flow", "analyze", "exits", "generator_close_runs_frame"]

# Instructions after which the frame is left instead of continuing at a successor.
# The value is the local event that still sees the frame (PY_UNWIND is global-only).
_LEAVES: Final[dict[str, str]] = {
    "RETURN_VALUE": "return",
    "RETURN_CONST": "return",
    "YIELD_VALUE": "yield",
    "RAISE_VARARGS": "raise",
    "RERAISE": "raise",
}

_UNCONDITIONAL_JUMPS: Final = frozenset(
    {"JUMP_FORWARD", "JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT", "JUMP", "JUMP_NO_INTERRUPT"}
)

# Which opcodes never fire an INSTRUCTION event (Python/instrumentation.c, see above).
_silent_opcodes: Final = frozenset({"RESUME", "END_FOR"})

# Jump opcodes (for `dis`) that never jump: 3.14's END_ASYNC_FOR names its loop's END_SEND
# only so that sys.monitoring can report the loop's exit as a BRANCH_RIGHT from there; it
# swallows the StopAsyncIteration and goes on to the next instruction (or re-raises).
_NAMES_ONLY: Final = frozenset({"END_ASYNC_FOR"})


class Flow:
    """The control flow out of one instruction (its first EXTENDED_ARG prefix included)."""

    __slots__ = ("offset", "opname", "real_offset", "end", "successors", "leaves", "handler")

    def __init__(
        self,
        offset: int,
        opname: str,
        real_offset: int,
        end: int,
        successors: frozenset[int],
        leaves: str | None,
        handler: int | None,
    ) -> None:
        #: The instruction's address: its first EXTENDED_ARG prefix if it has one.
        self.offset = offset
        #: The real opcode (not EXTENDED_ARG) and its own offset.
        self.opname = opname
        self.real_offset = real_offset
        #: The offset of the next instruction in the code (after the inline caches).
        self.end = end
        #: Offsets whose INSTRUCTION event can come next in the same frame, on completion.
        self.successors = successors
        #: "return", "yield" or "raise" when the instruction leaves the frame (for "raise":
        #: unless `handler` catches it in the frame).
        self.leaves = leaves
        #: The exception-table handler covering this instruction, if any.
        self.handler = handler

    def __repr__(self) -> str:
        return (
            f"Flow({self.offset}, {self.opname}, succ={sorted(self.successors)}, "
            f"leaves={self.leaves}, handler={self.handler})"
        )


@cached
def analyze(code: CodeType) -> dict[int, Flow]:
    """The Flow of every instruction of `code`, keyed by address (computed once per code
    object: arming one probe per line of a function asked for it once per probe; shared,
    read only)."""
    instrs = insn.decode(code)
    opname_at: dict[int, str] = {}
    end_at: dict[int, int] = {}
    for ins in instrs:
        opname_at[ins.start] = ins.opname
        end_at[ins.start] = ins.end
    by_real = {ins.offset: ins.start for ins in instrs}
    # Bytecode.exception_entries exists since 3.11 but is missing from typeshed.
    entries = dis.Bytecode(code).exception_entries  # type: ignore[attr-defined]
    first_resume = insn.entry_offset(code)
    skips = env.FOR_ITER_EXIT_SKIPS

    def handler_for(real: int) -> int | None:
        for e in entries:
            if e.start <= real < e.end:
                return int(e.target)
        return None

    def resolve(target: int, seen: frozenset[int] = frozenset()) -> frozenset[int]:
        # Look through instructions that never fire INSTRUCTION events.
        name = opname_at.get(target)
        if name is None:
            return frozenset()
        if name in _silent_opcodes and target not in seen:
            return resolve(end_at[target], seen | {target})
        return frozenset({target})

    flows: dict[int, Flow] = {}
    for ins in instrs:
        name = ins.opname
        succ: set[int] = set()
        leaves = _LEAVES.get(name)
        if leaves is None:
            target = None if name in _NAMES_ONLY else ins.jump_target
            if target is not None:
                target = by_real.get(target, target)
            if name == "FOR_ITER" and target is not None:
                t = target
                for skipped in skips:
                    if opname_at.get(t) == skipped:
                        t = end_at[t]
                succ |= resolve(t)
            elif target is not None:
                succ |= resolve(target)
            if name not in _UNCONDITIONAL_JUMPS:
                succ |= resolve(ins.end)
        handler = handler_for(ins.offset) if ins.start > first_resume else None
        flows[ins.start] = Flow(
            ins.start, name, ins.offset, ins.end, frozenset(succ), leaves, handler
        )
    return flows


# ---------------------------------------------------------------- frame ends

_RETURNS: Final = frozenset({"RETURN_VALUE", "RETURN_CONST"})
#: The implicit handler wrapping a generator's, coroutine's or async generator's body
#: (3.12+): `CALL_INTRINSIC_1 INTRINSIC_STOPITERATION_ERROR; RERAISE 1` (the argument as
#: `dis` names it; 3.11 has no CALL_INTRINSIC_1).
_WRAPPER_INTRINSIC: Final = (
    opcode._intrinsic_1_descs.index("INTRINSIC_STOPITERATION_ERROR")
    if hasattr(opcode, "_intrinsic_1_descs")
    else -1
)


class Exits:
    """Where a frame of one code object can leave (every set holds addresses: the first
    EXTENDED_ARG prefix, and also the real opcode's offset when it differs)."""

    __slots__ = ("returns", "yields", "yield_lasti", "close_skips")

    def __init__(
        self,
        returns: frozenset[int],
        yields: frozenset[int],
        yield_lasti: frozenset[int],
        close_skips: frozenset[int],
    ) -> None:
        #: RETURN_VALUE / RETURN_CONST.
        self.returns = returns
        #: YIELD_VALUE (a yield, an await's or a `yield from`'s suspension).
        self.yields = yields
        #: The `f_lasti` of a frame reporting a yield: each YIELD_VALUE and the RESUME after
        #: it (3.13 reports the latter).
        self.yield_lasti = yield_lasti
        #: The subset of `yield_lasti` whose yield is covered only by the implicit wrapper
        #: handler: where `close()` skips the frame on interpreters that take the shortcut
        #: (see the module docstring).
        self.close_skips = close_skips


@cached
def exits(code: CodeType) -> Exits:
    """The ways out of a frame of `code` (see `Exits`; computed once per code object)."""
    instrs = insn.decode(code)
    entries = dis.Bytecode(code).exception_entries  # type: ignore[attr-defined]
    target_op = {ins.offset: (ins.opname, ins.arg) for ins in instrs}

    def wrapper_only(real: int) -> bool:
        for e in entries:
            if e.start <= real < e.end:
                return target_op.get(int(e.target)) == ("CALL_INTRINSIC_1", _WRAPPER_INTRINSIC)
        return False

    returns: set[int] = set()
    yields: set[int] = set()
    lasti: set[int] = set()
    skips: set[int] = set()
    for i, ins in enumerate(instrs):
        if ins.opname in _RETURNS:
            returns |= {ins.start, ins.offset}
        elif ins.opname == "YIELD_VALUE":
            here = {ins.start, ins.offset}
            if i + 1 < len(instrs) and instrs[i + 1].opname == "RESUME":
                here |= {instrs[i + 1].start, instrs[i + 1].offset}
            yields |= {ins.start, ins.offset}
            lasti |= here
            if wrapper_only(ins.offset):
                skips |= here
    return Exits(frozenset(returns), frozenset(yields), frozenset(lasti), frozenset(skips))


_close_runs_frame: bool | None = None


def _close_probe() -> Any:
    yield


def generator_close_runs_frame() -> bool:
    """Does `close()` of a generator suspended at a plain yield run its frame (so that the
    mechanisms see the GeneratorExit leave it)? Measured once, with a profile function
    (mechanism-neutral: neither arch uses it), in a fresh generator: 3.11.7 and 3.12.1
    yes, 3.13.0 no. If a profile function is installed we cannot measure and answer what
    the bytecode says: no when RESUME carries the 3.13 depth-1 flag."""
    global _close_runs_frame
    if _close_runs_frame is not None:
        return _close_runs_frame
    code = _close_probe.__code__
    if sys.getprofile() is not None:
        # The RESUME after this plain `yield` says RESUME_AFTER_YIELD (1), plus the depth-1
        # flag where close() looks at it (3.13 and 3.14: 4; 3.15: 8).
        resume_flag = any(ins.opname == "RESUME" and ins.arg > 1 for ins in insn.decode(code))
        return not resume_flag
    seen: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if frame.f_code is code:
            seen.append(event)

    gen = _close_probe()
    next(gen)
    sys.setprofile(profile)
    try:
        gen.close()
    finally:
        sys.setprofile(None)
    _close_runs_frame = bool(seen)
    return _close_runs_frame
