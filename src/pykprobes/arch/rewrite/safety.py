"""Where a call sequence may be inserted (the kernel's `can_optimize()`).

A call sequence before an instruction X is a detour every path to X takes first. That is
wrong only where CPython relies on two instructions being adjacent, or on X being the very
instruction reached, beyond what jump arguments and the exception table say (those the
`bytecode` library rewrites). Each such place is a rule below, found by reading CPython and
confirmed by `tests/arch/test_rewrite_corpus.py` (every accepted offset of a corpus of tricky
code, run until specialized) and `tests/arch/test_rewrite_safety.py` (each refusal of the
breaking kind shown to break when forced).

The prologue (up to and including its RESUME: insn.entry_index) is not refused: an offset
there means the function's entry, served after that RESUME (see inject.py).
"""

from __future__ import annotations

from types import CodeType
from typing import Final, NamedTuple

from pykprobes import env, insn
from pykprobes.codecache import cached


class Rule(NamedTuple):
    """No call sequence before an `opname` instruction [that follows an `after` one]."""

    opname: str
    #: Only when the previous instruction (in code order) is this one; None: always.
    after: str | None
    reason: str


_RESUME_YIELD_FROM = Rule(
    "RESUME",
    None,
    "a RESUME after the prologue is where a generator or coroutine resumes after "
    "YIELD_VALUE, and gen.throw(), gen.close() and gi_yieldfrom find a pending 'yield from' "
    "or 'await' by reading the instruction right after YIELD_VALUE (3.11/3.12 genobject.c "
    "_PyGen_yf): with a sequence there, a throw() would not reach the inner generator",
)
_RESUME_313 = Rule(
    "RESUME",
    None,
    "a RESUME after the prologue is where a generator or coroutine resumes after "
    "YIELD_VALUE: gen.close() skips raising GeneratorExit into a frame suspended at a "
    "RESUME outside any try block (3.13, 3.14 and 3.15 genobject.c gen_close), and "
    "_PyGen_yf asserts the RESUME is there; with a sequence there, close() would run the "
    "frame (visible to tracers) where it does not",
)

_FOR_ITER_EXIT = (
    "an exhausted FOR_ITER jumps to the instruction after its target END_FOR "
    "(3.12 bytecodes.c FOR_ITER: JUMPBY(oparg + 1)), so a sequence there would be entered "
    "in its middle"
)
_FOR_ITER_EXIT_313 = (
    "an exhausted FOR_ITER jumps past its target END_FOR and the POP_TOP after it "
    "(3.13 bytecodes.c FOR_ITER: JUMPBY(oparg + 2)), so a sequence there would be entered "
    "in its middle"
)
_FOR_ITER_OVER_GENERATOR = Rule(
    "FOR_ITER",
    None,
    "a loop over a generator reports a StopIteration (PEP 380: a sys.monitoring "
    "STOP_ITERATION event, an 'exception' event for sys.settrace) when it ends, unless "
    "FOR_ITER carries the LINE instrumentation, which runs it unspecialized (measured on "
    "3.13.0, 3.14.10 and 3.15.2; 3.12.1 reports none either way): a sequence before "
    "FOR_ITER takes that instrumentation, so debuggers would see a StopIteration that "
    "the original never shows them",
)
_FOR_ITER_EXIT_314 = (
    "an exhausted FOR_ITER jumps past its target END_FOR, onto the POP_ITER after it "
    "(3.14 and 3.15 bytecodes.c FOR_ITER: JUMPBY(oparg + 1)), so a sequence there would be "
    "entered in its middle"
)
_BRANCH_FROM_SEQUENCE = (
    "after a sequence, coverage tools would see a branch from the sequence's last "
    "instruction, where no branch of co_branches() starts"
)
_RULES_314: Final = (
    Rule(
        "RESUME",
        None,
        "a RESUME after the prologue is where a generator or coroutine resumes after "
        "YIELD_VALUE, and where close() and throw() find it suspended: with a sequence "
        "there, a close() of a suspended 'yield from' or 'await' shows tracers one 'line' "
        "event fewer (measured on 3.14.10 and 3.15.2), and close() runs a frame that it "
        "would otherwise finish without running it (3.14 genobject.c gen_close: a RESUME "
        "with RESUME_OPARG_DEPTH1_MASK and no tool monitoring PY_UNWIND)",
    ),
    Rule("END_FOR", None, _FOR_ITER_EXIT_314),
    _FOR_ITER_OVER_GENERATOR,
    Rule(
        "NOT_TAKEN",
        None,
        "sys.monitoring reports a conditional jump that falls through as a BRANCH_LEFT "
        "event at NOT_TAKEN, from the instruction executed before it (3.14 "
        "INSTRUMENTED_NOT_TAKEN: prev_instr): " + _BRANCH_FROM_SEQUENCE,
    ),
    Rule(
        "POP_ITER",
        None,
        "sys.monitoring reports a loop's exit as a BRANCH_RIGHT event at POP_ITER, from the "
        "instruction executed before it, the FOR_ITER (3.14 INSTRUMENTED_POP_ITER: "
        "prev_instr): " + _BRANCH_FROM_SEQUENCE,
    ),
    Rule(
        "END_SEND",
        None,
        "an 'async for' loop's exit is a BRANCH_RIGHT event from the END_SEND that its "
        "END_ASYNC_FOR names (3.14 INSTRUMENTED_END_ASYNC_FOR: this_instr - oparg), and "
        "co_branches() counts from there to the NOT_TAKEN after it: with a sequence before "
        "END_SEND, both would start at the sequence instead, and not at the same place",
    ),
)

#: Per CPython version. Each rule was seen to matter when forced (a crash, wrong results or
#: different trace events); tests/arch/test_rewrite_safety.py keeps showing it.
RULES: Final[dict[tuple[int, int], tuple[Rule, ...]]] = {
    (3, 11): (
        _RESUME_YIELD_FROM,
        Rule(
            "CALL",
            "PRECALL",
            "3.11 splits a call into PRECALL + CALL: a specialized PRECALL_* makes the whole "
            "call and then skips the CALL it assumes comes next (ceval.c SKIP_CALL)",
        ),
        Rule(
            "PRECALL",
            "KW_NAMES",
            "KW_NAMES leaves the keyword names in the interpreter's call_shape for the next "
            "call (3.11 ceval.c): the injected call would take them",
        ),
        Rule(
            "YIELD_VALUE",
            "SEND",
            "gen.throw() into a 'yield from' or 'await' that finishes it leaves the SEND loop "
            "by reading SEND's jump from the instruction right before YIELD_VALUE (3.11 "
            "genobject.c _gen_throw)",
        ),
        Rule(
            "SEND",
            None,
            "3.11 tracing reports no new 'line' event when a 'yield from'/'await' loop jumps "
            "back to its SEND (ceval.c maybe_call_line_trace tests that the jump lands on "
            "SEND): with a sequence before SEND, every resumption would be a spurious 'line' "
            "event for debuggers",
        ),
    ),
    (3, 12): (
        _RESUME_YIELD_FROM,
        Rule(
            "CALL",
            "KW_NAMES",
            "KW_NAMES leaves the keyword names in the frame for the next CALL "
            "(3.12 bytecodes.c): the injected call would take them",
        ),
        Rule("END_FOR", None, _FOR_ITER_EXIT),
    ),
    (3, 13): (
        _RESUME_313,
        Rule("END_FOR", None, _FOR_ITER_EXIT_313),
        Rule("POP_TOP", "END_FOR", _FOR_ITER_EXIT_313),
        _FOR_ITER_OVER_GENERATOR,
    ),
    (3, 14): _RULES_314,
    (3, 15): _RULES_314,
}


def rules() -> tuple[Rule, ...]:
    return RULES.get(env.PYVERSION, ())


# The core asks about several offsets of one code object in a row, and build() checks every
# hit again.
@cached
def reasons(code: CodeType) -> dict[int, str | None]:
    """Instruction start -> why no call sequence may go there (None: it may)."""
    instrs = insn.decode(code)
    try:
        entry = insn.entry_index(instrs)
    except ValueError as exc:
        return {ins.start: f"{code.co_name}: {exc}" for ins in instrs}
    table = rules()
    out: dict[int, str | None] = {}
    for index, ins in enumerate(instrs):
        out[ins.start] = None
        if index <= entry:
            continue  # the function's entry: served right after the prologue's RESUME
        previous = instrs[index - 1].opname
        for rule in table:
            if rule.opname == ins.opname and (rule.after is None or rule.after == previous):
                out[ins.start] = f"{ins.opname} at {ins.start}: {rule.reason}"
                break
    return out


def check_optimizable(code: CodeType, offset: int) -> str | None:
    table = reasons(code)
    if offset in table:
        return table[offset]
    for ins in insn.decode(code):
        if ins.start < offset < ins.end:
            return (
                f"offset {offset} is not an instruction boundary: it is inside "
                f"{ins.opname} at {ins.start}..{ins.end - 2}"
            )
    return f"offset {offset} is not in {code.co_name} (its bytecode is {len(code.co_code)} bytes)"
