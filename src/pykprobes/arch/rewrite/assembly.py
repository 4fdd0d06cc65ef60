"""The instruction sequences the rewrite arch injects, per CPython version (data).

Two kinds:

* the **call sequence** put before a probed instruction: it calls one constant callable
  with no argument and drops its result, so the stack is the same before and after it. It
  is the cheapest measured way to run a handler at an offset (docs/architecture.md,
  "Costs");
* the **return sequences** of a return probe (`ReturnSequences`): one before each return
  instruction, calling a constant callable with the value being returned, and one
  exception handler, placed after the end of the code and covering the whole body, that
  calls a constant callable with the exception leaving the frame and re-raises it.

`tests/arch/test_rewrite_assembly.py` assembles and runs the ones for the running
interpreter. inject.py reads the pseudo-instructions below (TRY, END_TRY, LABEL) and the
placeholders; every other entry is an opcode name and its argument.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from pykprobes import env


class Placeholder:
    """Stands, in a sequence, for a value known only when the sequence is assembled."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The callable a call sequence calls (the argument of its LOAD_CONST).
HIT: Final = Placeholder("HIT")
#: A compiled call's callables (core/arch.py CompiledCall): `record(*variables)`, and the
#: site's hit when it returns True; and the number of variables (the argument of CALL).
RECORD: Final = Placeholder("RECORD")
NARGS: Final = Placeholder("NARGS")
#: The return probe's callables: on_return(value) and on_unwind(exc).
ON_RETURN: Final = Placeholder("ON_RETURN")
ON_UNWIND: Final = Placeholder("ON_UNWIND")
#: The inline hit's (core/arch.py InlineHit): `enter`, the fault report, and the None it
#: clears the mark with.
GATE: Final = Placeholder("GATE")
FAULT: Final = Placeholder("FAULT")
NOTHING: Final = Placeholder("NOTHING")
#: The constant a RETURN_CONST returns (3.12+).
CONST: Final = Placeholder("CONST")
#: The callable that turns a StopIteration leaving a generator into the RuntimeError the
#: interpreter would make of it (3.11, see `ReturnSequences.unwind_generator`).
CONVERT: Final = Placeholder("CONVERT")


class Mark:
    """A label inside a sequence, by name: the argument of LABEL, of a jump, of TRY."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


class Handler(NamedTuple):
    """The argument of a TRY pseudo-instruction: the instructions up to the matching
    END_TRY are covered by an exception-table entry to `mark`, entered with the stack cut
    to `depth` items (plus the offset of the raising instruction when `lasti`), and then
    the exception on top. In an inline sequence, `depth` counts from the depth where the
    sequence is inserted."""

    mark: Mark
    depth: int
    lasti: bool


#: One instruction: (opname, argument); None for opcodes that take none. Pseudo-opnames:
#: "TRY" (argument a Handler), "END_TRY" (None), "LABEL" (a Mark), "HIT_CALL" and
#: "END_HIT_CALL" (None: the instructions between make a call during which the frame is
#: inside a hit; their offsets are registered, core/regs.py INLINE_CALLS).
Op = tuple[str, object]


class CallSequence(NamedTuple):
    ops: tuple[Op, ...]
    #: How many stack slots the sequence needs above the depth where it is inserted.
    depth: int


_CALL_313: Final = CallSequence(
    (("LOAD_CONST", HIT), ("PUSH_NULL", None), ("CALL", 0), ("POP_TOP", None)),
    depth=2,
)

CALL_SEQUENCES: Final[dict[tuple[int, int], CallSequence]] = {
    # 3.11: a call is PRECALL + CALL ("PRECALL: prefixes CALL", dis docs), with the
    # callable above a NULL (or below a bound method's self).
    (3, 11): CallSequence(
        (("PUSH_NULL", None), ("LOAD_CONST", HIT), ("PRECALL", 0), ("CALL", 0), ("POP_TOP", None)),
        depth=2,
    ),
    # 3.12: PRECALL is gone; CALL takes NULL, callable, args (dis docs).
    (3, 12): CallSequence(
        (("PUSH_NULL", None), ("LOAD_CONST", HIT), ("CALL", 0), ("POP_TOP", None)),
        depth=2,
    ),
    # 3.13: CALL takes callable, self-or-NULL, args: the NULL moved above the callable.
    (3, 13): _CALL_313,
    # 3.14 and 3.15: the same CALL (bytecodes.c _CALL: callable, self_or_null, args).
    (3, 14): _CALL_313,
    (3, 15): _CALL_313,
}


# The inline hit (core/opthit.py): `fast = enter()`; if not None, `handler(p, regs)` under
# an exception-table entry whose handler calls `fault(exc)` (a handler that does `except
# BaseException as exc`, with the cleanup entry that lets what fault() raises go on:
# KeyboardInterrupt), else `held[0] = None`. enter returns (handler, p, regs, held), which
# UNPACK_SEQUENCE pushes as [held, regs, p, handler] and SWAP 3 turns into [held, handler,
# p, regs]: the form of a method call `handler(p, regs)` (3.11/3.12: method, self, args;
# 3.13+: callable, self_or_null, args), with the mark's list below it for the unmark (no
# name to load: fault() unmarks with its own). Every jump goes forward: the handler code
# sits inline.
# The handler call's entry starts one instruction before its CALL: on 3.15.2 an entry that
# starts at the CALL itself does not catch the callee's exception (measured: the lookup
# lands before the CALL), which the compiler's `try: f()` never meets (its range starts
# with the loads of f). It and the registered offsets (HIT_CALL) also take
# in the POP_TOP after the CALL.
# `depth` is what it needs above the depth where it goes: the fault handler's [held,
# previous exception, exc, fault, NULL, exc].
SKIP: Final = Mark("skip")
FAULTED: Final = Mark("faulted")
CLEANUP: Final = Mark("cleanup")
HIT_DONE: Final = Mark("hit-done")


def _inline(
    call0: tuple[Op, ...], call1: tuple[Op, ...], if_none: str, fault_call: tuple[Op, ...]
) -> CallSequence:
    return CallSequence(
        (
            *call0,  # enter()
            ("COPY", 1),
            (if_none, SKIP),
            ("UNPACK_SEQUENCE", 4),
            ("TRY", Handler(FAULTED, 1, False)),
            ("SWAP", 3),
            ("HIT_CALL", None),
            *call1,  # handler(p, regs)
            ("POP_TOP", None),
            ("END_HIT_CALL", None),
            ("END_TRY", None),
            ("LOAD_CONST", NOTHING),
            ("SWAP", 2),
            ("LOAD_CONST", 0),
            ("STORE_SUBSCR", None),  # held[0] = None
            ("JUMP_FORWARD", HIT_DONE),
            ("LABEL", FAULTED),  # [held, exc]
            ("TRY", Handler(CLEANUP, 2, True)),
            ("PUSH_EXC_INFO", None),  # [held, previous exception, exc]
            ("HIT_CALL", None),
            *fault_call,  # fault(exc)
            ("POP_TOP", None),
            ("END_HIT_CALL", None),
            ("POP_TOP", None),
            ("END_TRY", None),
            ("POP_EXCEPT", None),
            ("POP_TOP", None),
            ("JUMP_FORWARD", HIT_DONE),
            ("LABEL", CLEANUP),  # [held, previous exception, lasti, exception from fault()]
            ("COPY", 3),
            ("POP_EXCEPT", None),
            ("RERAISE", 1),
            ("LABEL", SKIP),
            ("POP_TOP", None),
            ("LABEL", HIT_DONE),
        ),
        depth=6,
    )


_INLINE_313: Final = _inline(
    (("LOAD_CONST", GATE), ("PUSH_NULL", None), ("CALL", 0)),
    (("CALL", 1),),
    "POP_JUMP_IF_NONE",
    (("LOAD_CONST", FAULT), ("PUSH_NULL", None), ("COPY", 3), ("CALL", 1)),
)

INLINE_SEQUENCES: Final[dict[tuple[int, int], CallSequence]] = {
    (3, 11): _inline(
        (("PUSH_NULL", None), ("LOAD_CONST", GATE), ("PRECALL", 0), ("CALL", 0)),
        (("PRECALL", 1), ("CALL", 1)),
        "POP_JUMP_FORWARD_IF_NONE",
        (("PUSH_NULL", None), ("LOAD_CONST", FAULT), ("COPY", 3), ("PRECALL", 1),
         ("CALL", 1)),
    ),
    (3, 12): _inline(
        (("PUSH_NULL", None), ("LOAD_CONST", GATE), ("CALL", 0)),
        (("CALL", 1),),
        "POP_JUMP_IF_NONE",
        (("PUSH_NULL", None), ("LOAD_CONST", FAULT), ("COPY", 3), ("CALL", 1)),
    ),
    (3, 13): _INLINE_313,
    # 3.14 and 3.15: the same (their compiler follows a conditional jump with NOT_TAKEN,
    # for sys.monitoring's BRANCH events, which are about the program's branches: none).
    (3, 14): _INLINE_313,
    (3, 15): _INLINE_313,
}


#: Where a compiled call sequence goes on when `record` returned False.
DONE: Final = Mark("done")

# A compiled call: `if record(v1, ..., vn): hit()`, at the entry only. "VARS" is a
# pseudo-instruction: inject.py puts there one load per variable (LOAD_FAST, or LOAD_DEREF
# for an argument that is a cell: the prologue's MAKE_CELL, which runs before the entry,
# has put the argument into its cell). `record` returns an exact bool, because from 3.13
# POP_JUMP_IF_FALSE expects one (the compiler puts TO_BOOL before it otherwise; we need
# not). `depth` is what it needs without the variables: one slot more per variable.
_COMPILED_313: Final = CallSequence(
    (
        ("LOAD_CONST", RECORD),
        ("PUSH_NULL", None),
        ("VARS", None),
        ("CALL", NARGS),
        ("POP_JUMP_IF_FALSE", DONE),
        ("LOAD_CONST", HIT),
        ("PUSH_NULL", None),
        ("CALL", 0),
        ("POP_TOP", None),
        ("LABEL", DONE),
    ),
    depth=2,
)

COMPILED_CALL_SEQUENCES: Final[dict[tuple[int, int], CallSequence]] = {
    (3, 11): CallSequence(
        (
            ("PUSH_NULL", None),
            ("LOAD_CONST", RECORD),
            ("VARS", None),
            ("PRECALL", NARGS),
            ("CALL", NARGS),
            ("POP_JUMP_FORWARD_IF_FALSE", DONE),
            ("PUSH_NULL", None),
            ("LOAD_CONST", HIT),
            ("PRECALL", 0),
            ("CALL", 0),
            ("POP_TOP", None),
            ("LABEL", DONE),
        ),
        depth=2,
    ),
    (3, 12): CallSequence(
        (
            ("PUSH_NULL", None),
            ("LOAD_CONST", RECORD),
            ("VARS", None),
            ("CALL", NARGS),
            ("POP_JUMP_IF_FALSE", DONE),
            ("PUSH_NULL", None),
            ("LOAD_CONST", HIT),
            ("CALL", 0),
            ("POP_TOP", None),
            ("LABEL", DONE),
        ),
        depth=2,
    ),
    (3, 13): _COMPILED_313,
    # 3.14 and 3.15: the same. The compiler follows each conditional jump with NOT_TAKEN
    # (the instruction sys.monitoring reports BRANCH_LEFT at), which the jump steps over
    # when it is there; ours has none, as BRANCH events are about the program's branches.
    (3, 14): _COMPILED_313,
    (3, 15): _COMPILED_313,
}


class ArgFix(NamedTuple):
    """A change to the argument of every `opname` instruction of generator-like code that
    gets return sequences: (arg + add) & ~clear."""

    opname: str
    add: int = 0
    clear: int = 0


class ReturnSequences(NamedTuple):
    """What a return probe adds to a code object, for one CPython version.

    `value` goes right before each RETURN_VALUE (the value on top of the stack) and
    `const` before each RETURN_CONST (3.12+): both call ON_RETURN with the value about to
    be returned and leave the stack as they found it. Their TRY covers the call only:
    should the callable raise an Exception, the handler (`value_tail`, `const_tail`,
    placed after the end of the code) drops it and returns the value anyway. Any other
    exception (KeyboardInterrupt from a signal handler that ran during the call,
    SystemExit) goes on out of the frame, as it would have from the next instruction: a
    lost Ctrl-C would be worse than a frame that returned and then raised.

    `unwind` is the handler of the entry UNWIND_ENTRY (depth 0, lasti), which covers every
    instruction after the prologue that no entry of the code covers, so it sees an
    exception only once the code's own handlers let it go. It is entered with
    [lasti, exc], calls ON_UNWIND with exc, and re-raises exc with RERAISE 1: RERAISE
    never adds a traceback entry (it goes straight to exception_unwind in the 3.11, 3.12
    and 3.13 ceval), and oparg 1 puts the frame's instruction pointer back at the
    instruction the exception left from, so even the finished frame's f_lineno is the
    original's. Should ON_UNWIND raise an Exception, it is dropped and exc re-raised;
    another exception (KeyboardInterrupt...) goes on instead of exc.

    `unwind_generator`, when not empty, replaces `unwind` for generator-like code. On
    3.11 it first turns a StopIteration (in an async generator, also a
    StopAsyncIteration) into the RuntimeError the caller gets: 3.11 does that in C after
    the frame ended (genobject.c gen_send_ex2), where 3.12 does it in the frame
    (CALL_INTRINSIC_1 INTRINSIC_STOPITERATION_ERROR, in an implicit handler that UNWIND
    lies outside of). Doing it in the frame, as 3.12 does, lets ON_UNWIND see what the
    caller will see.

    `fix` changes an argument that counts the exception handlers around a yield, which
    the outermost handler adds one to. gen.close() skips raising GeneratorExit into a
    generator suspended outside any try block (3.13: the RESUME after the yield carries
    RESUME_OPARG_DEPTH1_MASK = 4; 3.12: YIELD_VALUE's argument is the depth, though
    3.12.1's gen_close reads the opcode instead, gh-111107, so the shortcut never fires
    there), and without the fix ON_UNWIND would not see that close().
    """

    value: tuple[Op, ...]
    value_tail: tuple[Op, ...]
    const: tuple[Op, ...] | None
    const_tail: tuple[Op, ...] | None
    unwind: tuple[Op, ...]
    unwind_generator: tuple[Op, ...]
    fix: ArgFix | None
    #: Stack slots the code needs: above the depth of a return instruction ([value, NULL,
    #: hook, value]: 3), and in all (the unwind handler's [lasti, exc, NULL, hook, exc]).
    depth: int
    handler_depth: int


#: The marks of the return sequences.
RETURN_GUARD: Final = Mark("return-guard")
UNWIND: Final = Mark("unwind")
UNWIND_GUARD: Final = Mark("unwind-guard")
RETURN_RAISE: Final = Mark("return-raise")
UNWIND_RAISE: Final = Mark("unwind-raise")

#: How UNWIND is entered: the stack cut to nothing, then lasti and the exception pushed.
UNWIND_ENTRY: Final = Handler(UNWIND, 0, True)

# Each hook is called in the form the compiler gives `hook(arg)`: a NULL and the callable
# (3.11/3.12: NULL below the callable; 3.13: above it), the argument (a COPY of the value
# being returned or of the exception), CALL 1, and its result dropped. Putting the hook in
# the "method" slot and the argument in the "self" slot instead (LOAD_CONST, COPY 2,
# CALL 0) saves the PUSH_NULL, and costs the same for a plain function, but makes a bound
# method (what the core passes) take CALL's generic path: measured per return, +41 ns
# against +23 ns on 3.11, +44 against +25 on 3.12, +43 against +22 on 3.13.
#
# Each `unwind` starts right after LABEL UNWIND with [lasti, exc] on the stack. From 3.14
# lasti is a tagged int, no object (the exception unwinding pushes PyStackRef_TagInt): only
# RERAISE may read it; an instruction that took it for an object would crash.

# The pieces 3.13 and later share (the tails: 3.12 and later).
_VALUE_313: Final[tuple[Op, ...]] = (
    ("TRY", Handler(RETURN_GUARD, 1, False)),
    ("LOAD_CONST", ON_RETURN),
    ("PUSH_NULL", None),
    ("COPY", 3),
    ("CALL", 1),
    ("POP_TOP", None),
    ("END_TRY", None),
)
_VALUE_TAIL: Final[tuple[Op, ...]] = (
    ("LABEL", RETURN_GUARD),  # [value, exception from ON_RETURN]
    ("LOAD_CONST", Exception),
    ("CHECK_EXC_MATCH", None),
    ("POP_JUMP_IF_FALSE", RETURN_RAISE),
    ("POP_TOP", None),
    ("RETURN_VALUE", None),
    ("LABEL", RETURN_RAISE),
    ("RERAISE", 0),
)
_CONST_313: Final[tuple[Op, ...]] = (
    ("TRY", Handler(RETURN_GUARD, 0, False)),
    ("LOAD_CONST", ON_RETURN),
    ("PUSH_NULL", None),
    ("LOAD_CONST", CONST),
    ("CALL", 1),
    ("POP_TOP", None),
    ("END_TRY", None),
)
_CONST_TAIL: Final[tuple[Op, ...]] = (
    ("LABEL", RETURN_GUARD),  # [exception from ON_RETURN]
    ("LOAD_CONST", Exception),
    ("CHECK_EXC_MATCH", None),
    ("POP_JUMP_IF_FALSE", RETURN_RAISE),
    ("POP_TOP", None),
    ("RETURN_CONST", CONST),
    ("LABEL", RETURN_RAISE),
    ("RERAISE", 0),
)
# [lasti, exc] after the call of ON_UNWIND: re-raise exc; and the handler of that call.
_UNWIND_TAIL: Final[tuple[Op, ...]] = (
    ("RERAISE", 1),
    ("LABEL", UNWIND_GUARD),  # [lasti, exc, exception from the call]
    ("LOAD_CONST", Exception),
    ("CHECK_EXC_MATCH", None),
    ("POP_JUMP_IF_FALSE", UNWIND_RAISE),
    ("POP_TOP", None),
    ("RERAISE", 1),
    ("LABEL", UNWIND_RAISE),
    ("RERAISE", 0),
)
_UNWIND_313: Final[tuple[Op, ...]] = (
    ("TRY", Handler(UNWIND_GUARD, 2, False)),
    ("LOAD_CONST", ON_UNWIND),
    ("PUSH_NULL", None),
    ("COPY", 3),
    ("CALL", 1),
    ("POP_TOP", None),
    ("END_TRY", None),
    *_UNWIND_TAIL,
)

_RETURNS_313: Final = ReturnSequences(
    value=_VALUE_313,
    value_tail=_VALUE_TAIL,
    const=_CONST_313,
    const_tail=_CONST_TAIL,
    unwind=_UNWIND_313,
    unwind_generator=(),  # the same as `unwind`: the implicit handler converts
    fix=ArgFix("RESUME", clear=4),
    depth=3,
    handler_depth=5,
)
_RETURNS_314: Final = _RETURNS_313._replace(const=None, const_tail=None)

RETURN_SEQUENCES: Final[dict[tuple[int, int], ReturnSequences]] = {
    (3, 11): ReturnSequences(
        value=(
            ("TRY", Handler(RETURN_GUARD, 1, False)),
            ("PUSH_NULL", None),
            ("LOAD_CONST", ON_RETURN),
            ("COPY", 3),
            ("PRECALL", 1),
            ("CALL", 1),
            ("POP_TOP", None),
            ("END_TRY", None),
        ),
        value_tail=(
            ("LABEL", RETURN_GUARD),  # [value, exception from ON_RETURN]
            ("LOAD_CONST", Exception),
            ("CHECK_EXC_MATCH", None),
            ("POP_JUMP_FORWARD_IF_FALSE", RETURN_RAISE),
            ("POP_TOP", None),
            ("RETURN_VALUE", None),
            ("LABEL", RETURN_RAISE),
            ("RERAISE", 0),
        ),
        const=None,  # no RETURN_CONST before 3.12
        const_tail=None,
        unwind=(
            ("TRY", Handler(UNWIND_GUARD, 2, False)),
            ("PUSH_NULL", None),
            ("LOAD_CONST", ON_UNWIND),
            ("COPY", 3),
            ("PRECALL", 1),
            ("CALL", 1),
            ("POP_TOP", None),
            ("END_TRY", None),
            ("RERAISE", 1),
            ("LABEL", UNWIND_GUARD),  # [lasti, exc, exception from the call]
            ("LOAD_CONST", Exception),
            ("CHECK_EXC_MATCH", None),
            ("POP_JUMP_FORWARD_IF_FALSE", UNWIND_RAISE),
            ("POP_TOP", None),
            ("RERAISE", 1),
            ("LABEL", UNWIND_RAISE),
            ("RERAISE", 0),
        ),
        unwind_generator=(
            ("TRY", Handler(UNWIND_GUARD, 2, False)),
            # [lasti, exc] -> [lasti, CONVERT(exc)]
            ("PUSH_NULL", None),
            ("LOAD_CONST", CONVERT),
            ("COPY", 3),
            ("PRECALL", 1),
            ("CALL", 1),
            ("SWAP", 2),
            ("POP_TOP", None),
            ("PUSH_NULL", None),
            ("LOAD_CONST", ON_UNWIND),
            ("COPY", 3),
            ("PRECALL", 1),
            ("CALL", 1),
            ("POP_TOP", None),
            ("END_TRY", None),
            ("RERAISE", 1),
            ("LABEL", UNWIND_GUARD),  # [lasti, exc, exception from the call]
            ("LOAD_CONST", Exception),
            ("CHECK_EXC_MATCH", None),
            ("POP_JUMP_FORWARD_IF_FALSE", UNWIND_RAISE),
            ("POP_TOP", None),
            ("RERAISE", 1),
            ("LABEL", UNWIND_RAISE),
            ("RERAISE", 0),
        ),
        fix=None,  # 3.11 gen_close always raises GeneratorExit into the frame
        depth=3,
        handler_depth=5,
    ),
    (3, 12): ReturnSequences(
        value=(
            ("TRY", Handler(RETURN_GUARD, 1, False)),
            ("PUSH_NULL", None),
            ("LOAD_CONST", ON_RETURN),
            ("COPY", 3),
            ("CALL", 1),
            ("POP_TOP", None),
            ("END_TRY", None),
        ),
        value_tail=_VALUE_TAIL,
        const=(
            ("TRY", Handler(RETURN_GUARD, 0, False)),
            ("PUSH_NULL", None),
            ("LOAD_CONST", ON_RETURN),
            ("LOAD_CONST", CONST),
            ("CALL", 1),
            ("POP_TOP", None),
            ("END_TRY", None),
        ),
        const_tail=_CONST_TAIL,
        unwind=(
            ("TRY", Handler(UNWIND_GUARD, 2, False)),
            ("PUSH_NULL", None),
            ("LOAD_CONST", ON_UNWIND),
            ("COPY", 3),
            ("CALL", 1),
            ("POP_TOP", None),
            ("END_TRY", None),
            *_UNWIND_TAIL,
        ),
        unwind_generator=(),  # the same as `unwind`: the implicit handler converts
        fix=ArgFix("YIELD_VALUE", add=1),
        depth=3,
        handler_depth=5,
    ),
    (3, 13): _RETURNS_313,
    # 3.14: RETURN_CONST is gone (LOAD_CONST or LOAD_SMALL_INT, then RETURN_VALUE), the rest
    # is 3.13's; RESUME_OPARG_DEPTH1_MASK is still 4 (Include/internal/pycore_opcode_utils.h).
    (3, 14): _RETURNS_314,
    # 3.15: RESUME's argument grew a bit and RESUME_OPARG_DEPTH1_MASK became 8 (a yield
    # outside any try block compiles to RESUME 9: RESUME_AFTER_YIELD | 8).
    (3, 15): _RETURNS_314._replace(fix=ArgFix("RESUME", clear=8)),
}


def call_sequence() -> CallSequence | None:
    """The sequence for the running interpreter; None if none was written and tested for it."""
    return CALL_SEQUENCES.get(env.PYVERSION)


def inline_sequence() -> CallSequence | None:
    """The inline hit's sequence for the running interpreter, or None (then inline hits are
    served by their trampoline)."""
    return INLINE_SEQUENCES.get(env.PYVERSION)


def compiled_call_sequence() -> CallSequence | None:
    """The compiled call sequence for the running interpreter, or None (then compiled calls
    are served as plain hits)."""
    return COMPILED_CALL_SEQUENCES.get(env.PYVERSION)


def return_sequences() -> ReturnSequences | None:
    """The return sequences for the running interpreter; None if none were written."""
    return RETURN_SEQUENCES.get(env.PYVERSION)
