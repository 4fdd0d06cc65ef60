"""Every sequence of assembly.py assembles and runs on the Python it is for.

A sequence is written for one CPython version: on this interpreter the one for this version
is assembled (with the `bytecode` library directly, not through inject.py, so that this tests
the data) and run; the others are skipped, naming the version they need. That holds for the
call sequences and for the return sequences (the hooks before returns, the unwind handler
and, on 3.11, the StopIteration conversion), which are run with hooks that
work and with hooks that raise.
"""

from __future__ import annotations

import dis
import inspect
import sys
import traceback
import types
from typing import Any

import pytest
from bytecode import Bytecode, Compare, Instr, Label, TryBegin, TryEnd

from pykprobes.arch.rewrite.assembly import (
    CALL_SEQUENCES,
    CONST,
    CONVERT,
    HIT,
    ON_RETURN,
    ON_UNWIND,
    RETURN_GUARD,
    RETURN_SEQUENCES,
    UNWIND_ENTRY,
    CallSequence,
    Handler,
    Mark,
    ReturnSequences,
    call_sequence,
    return_sequences,
)

VERSIONS = sorted(CALL_SEQUENCES)


def test_this_python_has_a_sequence() -> None:
    assert call_sequence() is CALL_SEQUENCES[sys.version_info[:2]]


def _assemble(seq: CallSequence, hit: object) -> list[Instr]:
    return [
        Instr(op) if arg is None else Instr(op, hit if arg is HIT else arg) for op, arg in seq.ops
    ]


def _for_this_python(version: tuple[int, int]) -> CallSequence:
    if version != sys.version_info[:2]:
        pytest.skip(f"this sequence runs only on CPython {version[0]}.{version[1]}")
    return CALL_SEQUENCES[version]


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{a}.{b}" for a, b in VERSIONS])
def test_sequence_opcodes_exist(version: tuple[int, int]) -> None:
    seq = _for_this_python(version)
    for opname, _ in seq.ops:
        assert opname in dis.opmap, opname


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{a}.{b}" for a, b in VERSIONS])
def test_sequence_is_stack_neutral(version: tuple[int, int]) -> None:
    seq = _for_this_python(version)
    depth = deepest = 0
    for instr in _assemble(seq, len):
        depth += instr.stack_effect(jump=False)
        deepest = max(deepest, depth)
    assert depth == 0
    assert deepest == seq.depth


@pytest.mark.parametrize("version", VERSIONS, ids=[f"{a}.{b}" for a, b in VERSIONS])
def test_sequence_runs(version: tuple[int, int]) -> None:
    seq = _for_this_python(version)
    calls: list[int] = []

    def hit() -> str:
        calls.append(sys._getframe(1).f_lineno)
        return "dropped"

    def target(a: int, b: int) -> int:
        c = a + b
        return c * 2

    code = Bytecode.from_code(target.__code__)
    # Before `return c * 2`, and again before `c = a + b`: inside an expression's stack
    # (with a and b pushed) the sequence must leave it as it found it.
    body = [i for i, ins in enumerate(code) if isinstance(ins, Instr) and ins.name == "BINARY_OP"]
    for index in reversed(body):
        code[index:index] = _assemble(seq, hit)
    new = code.to_code()
    fn = types.FunctionType(new, target.__globals__)
    for _ in range(20):  # until specialized
        assert fn(2, 3) == 10
    first = target.__code__.co_firstlineno
    assert calls == [first + 1, first + 2] * 20


# --------------------------------------------------------------------------- return sequences

RETURN_VERSIONS = sorted(RETURN_SEQUENCES)


def test_this_python_has_return_sequences() -> None:
    assert return_sequences() is RETURN_SEQUENCES[sys.version_info[:2]]


def _returns_for_this_python(version: tuple[int, int]) -> ReturnSequences:
    if version != sys.version_info[:2]:
        pytest.skip(f"these sequences run only on CPython {version[0]}.{version[1]}")
    return RETURN_SEQUENCES[version]


class _Asm:
    """A minimal reading of assembly.py's pseudo-instructions, independent of inject.py."""

    def __init__(self, values: dict[object, object]) -> None:
        self.values = values
        self.labels: dict[Mark, Label] = {}

    def label(self, mark: Mark) -> Label:
        return self.labels.setdefault(mark, Label())

    def __call__(self, ops: tuple[tuple[str, object], ...]) -> list[Any]:
        out: list[Any] = []
        opened: list[TryBegin] = []
        for opname, arg in ops:
            if opname == "TRY":
                assert isinstance(arg, Handler)
                opened.append(TryBegin(self.label(arg.mark), arg.lasti, arg.depth))
                out.append(opened[-1])
            elif opname == "END_TRY":
                out.append(TryEnd(opened.pop()))
            elif opname == "LABEL":
                assert isinstance(arg, Mark)
                out.append(self.label(arg))
            elif arg is None:
                out.append(Instr(opname))
            elif isinstance(arg, Mark):
                out.append(Instr(opname, self.label(arg)))
            elif opname == "COMPARE_OP":
                out.append(Instr(opname, {">": Compare.GT}[arg]))  # type: ignore[index]
            else:
                out.append(Instr(opname, self.values.get(arg, arg)))
        assert not opened
        return out


def _with_returns(fn: Any, seq: ReturnSequences, values: dict[object, object]) -> Any:
    """`fn` with seq.value/seq.const before its returns and the unwind handler outermost
    over its body, put together by hand."""
    code = fn.__code__
    asm = _Asm(values)
    items = list(Bytecode.from_code(code, conserve_exception_block_stackdepth=True))
    resume = next(i for i, x in enumerate(items) if isinstance(x, Instr) and x.name == "RESUME")
    unwind = TryBegin(asm.label(UNWIND_ENTRY.mark), UNWIND_ENTRY.lasti, UNWIND_ENTRY.depth)
    # Nested entries, innermost last; made flat below.
    nested: list[Any] = [*items[: resume + 1], unwind]
    tails: list[Any] = []
    for item in items[resume + 1 :]:
        if isinstance(item, Instr) and item.name == "RETURN_VALUE":
            asm.labels.pop(RETURN_GUARD, None)  # one tail per return
            nested += asm(seq.value)
            tails += asm(seq.value_tail)
        elif isinstance(item, Instr) and item.name == "RETURN_CONST":
            assert seq.const is not None and seq.const_tail is not None
            asm.values[CONST] = item.arg
            asm.labels.pop(RETURN_GUARD, None)
            nested += asm(seq.const)
            tails += asm(seq.const_tail)
        nested.append(item)
    nested.append(TryEnd(unwind))
    handler = [asm.label(UNWIND_ENTRY.mark)]
    generator = code.co_flags & inspect.CO_GENERATOR
    handler += asm(seq.unwind_generator if generator and seq.unwind_generator else seq.unwind)
    new = Bytecode(_flat(nested, unwind) + _flat(tails) + _flat(handler))
    new._copy_attr_from(Bytecode.from_code(code))
    # The depths of the entries are the ones written here, as inject.py keeps them:
    # `bytecode`'s own analysis does not reach the handler's inner entry (it gives it
    # 32768, which 3.14's unwinding trusts and crashes on).
    stacksize = max(code.co_stacksize + seq.depth, seq.handler_depth)
    new_code = new.to_code(stacksize=stacksize, compute_exception_stack_depths=False)
    return types.FunctionType(new_code, fn.__globals__, fn.__name__)


def _flat(items: list[Any], outermost: TryBegin | None = None) -> list[Any]:
    """Each instruction covered by the innermost open entry only (the exception table is
    flat: one handler per instruction); `outermost` is below every other entry."""
    out: list[Any] = []
    stack: list[TryBegin] = []
    current: TryBegin | None = None
    emitted: TryBegin | None = None
    for item in items:
        if isinstance(item, TryBegin):
            if item is outermost:
                stack.insert(0, item)
            else:
                stack.append(item)
        elif isinstance(item, TryEnd):
            stack.remove(item.entry)
        elif isinstance(item, Instr):
            want = stack[-1] if stack else None
            if want is not current:
                if emitted is not None:
                    out.append(TryEnd(emitted))
                    emitted = None
                if want is not None:
                    emitted = TryBegin(want.target, want.push_lasti, want.stack_depth)
                    out.append(emitted)
                current = want
            out.append(item)
        else:
            out.append(item)
    if emitted is not None:
        out.append(TryEnd(emitted))
    return out


def _plain(a: int, b: int) -> int:
    c = a + b
    if c < 0:
        raise KeyError(c)
    return c * 2


def _gen(n: int) -> Any:
    yield n
    if n < 0:
        raise StopIteration("inside")


def _hooks(seen: list[Any], fail: type[BaseException] | None = None) -> dict[object, object]:
    def on_return(value: object) -> None:
        seen.append(("return", sys._getframe(1).f_code.co_name, value))
        if fail:
            raise fail("on_return failed")

    def on_unwind(exc: BaseException) -> None:
        seen.append(("unwind", sys._getframe(1).f_code.co_name, exc))
        if fail:
            raise fail("on_unwind failed")

    return {ON_RETURN: on_return, ON_UNWIND: on_unwind, CONVERT: _convert}


def _convert(exc: BaseException) -> BaseException:
    if isinstance(exc, StopIteration):
        error = RuntimeError("generator raised StopIteration")
        error.__cause__ = error.__context__ = exc
        return error
    return exc


def _outcome(fn: Any, *args: Any) -> Any:
    try:
        result = fn(*args)
        return ("ok", list(result) if inspect.isgenerator(result) else result)
    except BaseException as exc:  # noqa: BLE001
        return (
            "raise",
            repr(exc),
            "".join(traceback.format_exception(exc)).replace(fn.__code__.co_name, "<fn>"),
        )


@pytest.mark.parametrize("fail", [None, OSError], ids=["hooks", "failing-hooks"])
@pytest.mark.parametrize("version", RETURN_VERSIONS, ids=[f"{a}.{b}" for a, b in RETURN_VERSIONS])
def test_return_sequences_run(version: tuple[int, int], fail: type[BaseException] | None) -> None:
    seq = _returns_for_this_python(version)
    seen: list[Any] = []
    fn = _with_returns(_plain, seq, _hooks(seen, fail))
    gen = _with_returns(_gen, seq, _hooks(seen, fail))
    for _ in range(10):  # until specialized
        for original, new, args in (
            (_plain, fn, (2, 3)),
            (_plain, fn, (-5, 1)),
            (_gen, gen, (1,)),
            (_gen, gen, (-1,)),
        ):
            assert _outcome(new, *args) == _outcome(original, *args)
    kinds = [(k, name, type(v).__name__) for k, name, v in seen[:4]]
    assert kinds == [
        ("return", "_plain", "int"),
        ("unwind", "_plain", "KeyError"),
        ("return", "_gen", "NoneType"),
        ("unwind", "_gen", "RuntimeError"),  # what the caller gets, on 3.11 too
    ]
    assert len(seen) == 40
    assert sys.exc_info() == (None, None, None)


@pytest.mark.parametrize("version", RETURN_VERSIONS, ids=[f"{a}.{b}" for a, b in RETURN_VERSIONS])
def test_return_sequences_are_stack_neutral(version: tuple[int, int]) -> None:
    seq = _returns_for_this_python(version)
    for ops, start in ((seq.value, 1), (seq.const, 0)):
        if ops is None:
            continue
        depth = deepest = start
        for instr in _Asm({CONST: None, ON_RETURN: len})(ops):
            if isinstance(instr, Instr):
                depth += instr.stack_effect(jump=False)
                deepest = max(deepest, depth)
        assert depth == start
        assert deepest - start == seq.depth
    # The unwind handler, entered with [lasti, exc], with the conversion.
    handler = seq.unwind_generator or seq.unwind
    depth = deepest = 2
    for instr in _Asm({CONVERT: _convert, ON_UNWIND: len})(handler):
        if isinstance(instr, Instr):
            if instr.name == "RERAISE":
                break
            depth += instr.stack_effect(jump=False)
            deepest = max(deepest, depth)
    assert depth == 2 and deepest == seq.handler_depth


@pytest.mark.parametrize("version", RETURN_VERSIONS, ids=[f"{a}.{b}" for a, b in RETURN_VERSIONS])
def test_return_sequences_let_interrupts_through(version: tuple[int, int]) -> None:
    seq = _returns_for_this_python(version)
    seen: list[Any] = []
    fn = _with_returns(_plain, seq, _hooks(seen, KeyboardInterrupt))
    for args in ((2, 3), (-5, 1)):
        with pytest.raises(KeyboardInterrupt, match="failed"):
            fn(*args)
    assert [k for k, _, _ in seen] == ["return", "unwind"]
