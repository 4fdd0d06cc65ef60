"""Return probes of the rewrite arch (`build(..., returns=(on_return, on_unwind))`) against
the corpus of test_rewrite_corpus.py.

Every function of the corpus is rebuilt with return hooks and an entry hit, and run as the
original is (several times, so that the rebuilt code specializes). Checked:

* the program sees the same thing: results, yields, exceptions (type, args, the whole text
  `traceback.format_exception` prints, so every line number and caret, and the chained
  `__cause__`/`__context__`);
* every frame that started (the entry hit ran) ends exactly once, by `on_return` or
  `on_unwind`, and no frame ends that did not start;
* what each hook was given is what the frame's caller got: every function, generator,
  coroutine and async generator the corpus calls is wrapped (corpus `WRAP`) in a recorder
  of what its caller sees (the value or exception of a call; StopIteration's value;
  the exception out of next/send/throw/close; StopAsyncIteration at an async generator's
  end); the hooks' arguments must be those very objects, in the same order. A generator
  closed by close() or by the garbage collector is seen ending by GeneratorExit (or by
  returning, if it returns instead).

Then the same with a hit at every accepted offset at once; the 'line', 'call', 'return'
and 'exception' events a debugger sees; `offsets` against an independent decoding (dis);
the stack size. Last, one test per rule of the semantics (hooks in the probed frame, hooks
that fail or are interrupted, the exception state, generators collected, unstarted,
ignoring close(), returning from close(), StopIteration inside, frames run inline by
FOR_ITER/SEND, a return right after a loop), including the three version quirks shown to
matter by forcing them off (3.11's StopIteration conversion, 3.13's gen.close() shortcut,
3.12+'s prologue covered by the implicit handler).
"""

from __future__ import annotations

import difflib
import dis
import gc
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pykprobes import insn
from pykprobes.arch.rewrite import RewriteArch, inject
from pykprobes.core.address import line_of
from tests.arch import test_rewrite_corpus as corpus
from tests.arch.test_rewrite_corpus import (
    CASES,
    NOOP,
    Case,
    accepted,
    expected_count,
    prepare,
    traced,
)

ARCH = RewriteArch()
VERSION = sys.version_info[:2]

#: 3.13's gen.close() does not run a generator suspended outside any try block (see
#: assembly.ReturnSequences.fix): the original's implicit StopIteration handler does not
#: run then, the rebuilt code's does (GeneratorExit goes through it on its way out).
FAST_CLOSE = VERSION >= (3, 13)

FUNCTION_CASES = [c for c in CASES if c.code.co_flags & inspect.CO_OPTIMIZED]
BODY_CASES = [c for c in CASES if not c.code.co_flags & inspect.CO_OPTIMIZED]
assert len(BODY_CASES) == 2  # the class body and the module


# --------------------------------------------------------------------------- recording


class Ends:
    """The entry hit and the two return hooks of one rebuilt code object."""

    def __init__(self) -> None:
        self.entries = 0
        #: What the hooks were given, in order: (kind, id of the object, its type name).
        self.log: list[tuple[str, int, str]] = []
        #: id(frame) -> frames of that id that started and did not end (0 or 1). Frame
        #: objects are not kept alive (that would keep generators alive): an id may be
        #: reused, but only once the frame that had it ended.
        self.open: dict[int, int] = {}
        self.problems: list[str] = []

    def entry(self) -> None:
        frame = sys._getframe(1)
        self.entries += 1
        if self.open.get(id(frame)):
            self.problems.append(f"{frame.f_code.co_name}: entered twice")
        self.open[id(frame)] = 1

    def _end(self, kind: str, obj: object) -> None:
        frame = sys._getframe(2)
        if not self.open.get(id(frame)):
            self.problems.append(f"{frame.f_code.co_name}: {kind} without an entry")
        self.open[id(frame)] = 0
        self.log.append((kind, id(obj), type(obj).__name__))

    def on_return(self, value: object) -> None:
        self._end("return", value)

    def on_unwind(self, exc: BaseException) -> None:
        self._end("unwind", exc)

    @property
    def returns(self) -> tuple[Callable[[object], None], Callable[[BaseException], None]]:
        return self.on_return, self.on_unwind

    def still_open(self) -> int:
        return sum(self.open.values())


#: What a caller saw end a frame: (kind, id of the object, its type name), where kind is
#: "return", "unwind", or "closed" (close()/aclose() completed: the frame ended by
#: GeneratorExit or returned in response to it) or "collected" (an unfinished generator
#: dropped: the garbage collector closes it).
Seen = tuple[str, int, str]


class Callers:
    """Wraps the functions a case calls and records what their callers see."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def wrap(self, fn: Any) -> Any:
        flags = fn.__code__.co_flags
        callers = self
        if flags & inspect.CO_GENERATOR:

            def gen_wrapper(*args: Any, **kwargs: Any) -> Any:
                return GeneratorCaller(fn(*args, **kwargs), callers.seen)

            return gen_wrapper
        if flags & inspect.CO_ASYNC_GENERATOR:

            def agen_wrapper(*args: Any, **kwargs: Any) -> Any:
                return AsyncGeneratorCaller(fn(*args, **kwargs), callers.seen)

            return agen_wrapper
        if flags & inspect.CO_COROUTINE:

            def coro_wrapper(*args: Any, **kwargs: Any) -> Any:
                return callers.await_(fn(*args, **kwargs))

            return coro_wrapper

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:
                callers.record("unwind", exc)
                raise
            callers.record("return", value)
            return value

        return wrapper

    async def await_(self, coro: Any) -> Any:
        try:
            value = await coro
        except BaseException as exc:
            self.record("unwind", exc)
            raise
        self.record("return", value)
        return value

    def record(self, kind: str, obj: object) -> None:
        self.seen.append((kind, id(obj), type(obj).__name__))


def _frame_state(frame: types.FrameType | None, code: types.CodeType) -> str:
    if frame is None:
        return "finished"
    # Not started while its last instruction is in the prologue (before the first RESUME
    # has run: f_lasti is at or before it).
    resume = next(i.offset for i in dis.get_instructions(code) if i.opname == "RESUME")
    return "started" if frame.f_lasti > resume else "created"


class GeneratorCaller:
    """A generator as its caller sees it."""

    def __init__(self, gen: Any, seen: list[Seen]) -> None:
        self.gen = gen
        self.seen = seen

    def _state(self) -> str:
        return _frame_state(self.gen.gi_frame, self.gen.gi_code)

    def _call(self, starts: bool, op: Callable[[], Any], closing: bool = False) -> Any:
        before = self._state()
        try:
            value = op()
        except StopIteration as stop:
            if before != "finished" and (before == "started" or starts):
                self.seen.append(("return", id(stop.value), type(stop.value).__name__))
            raise
        except BaseException as exc:
            if before != "finished" and (before == "started" or starts):
                self.seen.append(("unwind", id(exc), type(exc).__name__))
            raise
        if closing and before == "started":
            self.seen.append(("closed", 0, ""))
        return value

    def __iter__(self) -> GeneratorCaller:
        return self

    def __next__(self) -> Any:
        return self._call(True, self.gen.__next__)

    def send(self, value: Any) -> Any:
        return self._call(True, lambda: self.gen.send(value))

    def throw(self, exc: BaseException) -> Any:
        return self._call(False, lambda: self.gen.throw(exc))

    def close(self) -> Any:
        return self._call(False, self.gen.close, closing=True)

    def __del__(self) -> None:
        # The generator goes right after this: the garbage collector closes it.
        if self._state() == "started":
            self.seen.append(("collected", 0, ""))


class AsyncGeneratorCaller:
    """An async generator as its caller sees it."""

    def __init__(self, agen: Any, seen: list[Seen]) -> None:
        self.agen = agen
        self.seen = seen

    def _state(self) -> str:
        return _frame_state(self.agen.ag_frame, self.agen.ag_code)

    async def _call(self, starts: bool, awaitable: Any, closing: bool = False) -> Any:
        before = self._state()
        try:
            value = await awaitable
        except StopAsyncIteration as stop:
            # The end of an async generator (its return) reaches the caller as this.
            if before != "finished" and (before == "started" or starts):
                self.seen.append(("return", id(None), "NoneType"))
            raise stop from None
        except BaseException as exc:
            if before != "finished" and (before == "started" or starts):
                self.seen.append(("unwind", id(exc), type(exc).__name__))
            raise
        if closing and before == "started":
            self.seen.append(("closed", 0, ""))
        return value

    def __aiter__(self) -> AsyncGeneratorCaller:
        return self

    def __anext__(self) -> Any:
        return self._call(True, self.agen.__anext__())

    def asend(self, value: Any) -> Any:
        return self._call(True, self.agen.asend(value))

    def athrow(self, exc: BaseException) -> Any:
        return self._call(False, self.agen.athrow(exc))

    def aclose(self) -> Any:
        return self._call(False, self.agen.aclose(), closing=True)


def matches(seen: Seen, ended: tuple[str, int, str]) -> bool:
    kind, ident, name = seen
    if kind in ("closed", "collected"):
        # By GeneratorExit, or a return in response to it (3.13's close() hands back the
        # value; older ones drop it, and the collector always does).
        return ended[0] == "return" or ended[2] == "GeneratorExit"
    return (kind, ident, name) == ended


class Observation:
    """One run of a case with callers recorded, and the detailed observation."""

    def __init__(self, case: Case, code: types.CodeType) -> None:
        self.callers = Callers()
        corpus.WRAP[0] = self.callers.wrap
        corpus.DETAILED[0] = True
        try:
            self.observed = case.run(code)
            # Generators dropped inside a cycle (and asyncio's pending closes) end here.
            gc.collect()
        finally:
            corpus.WRAP[0] = None
            corpus.DETAILED[0] = False


_detailed: dict[str, Any] = {}


def detailed_original(case: Case) -> Any:
    if case.name not in _detailed:
        _detailed[case.name] = Observation(case, case.code).observed
    return _detailed[case.name]


def check_run(case: Case, new: types.CodeType, ends: Ends) -> list[Any]:
    """Run `new` once as the case runs its code; the differences from the original."""
    want = detailed_original(case)
    before = len(ends.log)
    run = Observation(case, new)
    failures: list[Any] = []
    if run.observed != want:
        failures.append(("behaviour", run.observed, want))
    log = ends.log[before:]
    if len(log) != len(run.callers.seen) or not all(
        matches(s, e) for s, e in zip(run.callers.seen, log, strict=False)
    ):
        failures.append(("hooks", log, run.callers.seen))
    if ends.still_open():
        failures.append(("frames left open", ends.still_open()))
    return failures


# --------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module", autouse=True)
def _close_loop() -> Iterator[None]:
    yield
    while corpus._loop:
        corpus._loop.pop().close()


@pytest.mark.parametrize("case", FUNCTION_CASES, ids=[c.name for c in FUNCTION_CASES])
def test_returns(case: Case) -> None:
    p = prepare(case)
    ends = Ends()
    built = ARCH.build(case.code, {0: ends.entry}, {}, ends.returns)
    failures = []
    for _ in range(case.repeat):
        failures += check_run(case, built.code, ends)
        if failures:
            break
    assert not failures
    assert not ends.problems
    # As many frames started as in the original, and each one ended once.
    assert ends.entries == p.counts[corpus.ENTRY] * case.repeat
    assert len(ends.log) == ends.entries


@pytest.mark.parametrize("case", FUNCTION_CASES, ids=[c.name for c in FUNCTION_CASES])
def test_returns_with_every_accepted_offset(case: Case) -> None:
    p = prepare(case)
    ends = Ends()
    chosen = accepted(case, p)
    hits = {p.instrs[i].start: corpus.Hit() for i in chosen}
    probes = {off: h.make() for off, h in hits.items()}
    # The entry hit that counts frames rides along with the probe at offset 0.
    probes[0] = _entry_and(ends, probes[0])
    built = ARCH.build(case.code, probes, {}, ends.returns)
    failures = []
    for _ in range(case.repeat):
        failures += check_run(case, built.code, ends)
        if failures:
            break
    assert not failures
    assert not ends.problems
    more = stop_iteration_handler(p) if FAST_CLOSE else set()
    wrong = {}
    for i in chosen:
        start = p.instrs[i].start
        got, want = hits[start].n, expected_count(p, i) * case.repeat
        if got != want and not (start in more and got > want):
            wrong[start] = (got, want)
    assert not wrong
    assert ends.entries == len(ends.log) == p.counts[corpus.ENTRY] * case.repeat
    assert_offsets(case.code, built.code, built.offsets)


def stop_iteration_handler(p: corpus.Prepared) -> set[int]:
    """The implicit handler of generator-like code (3.12+): CALL_INTRINSIC_1
    INTRINSIC_STOPITERATION_ERROR and the RERAISE after it."""
    out = set()
    for a, b in zip(p.instrs, p.instrs[1:], strict=False):
        if a.opname == "CALL_INTRINSIC_1" and a.arg == 3 and b.opname == "RERAISE":
            out |= {a.start, b.start}
    return out


def _entry_and(ends: Ends, hit: Callable[[], None]) -> Callable[[], None]:
    def entry() -> None:
        frame = sys._getframe(1)
        ends.entries += 1
        if ends.open.get(id(frame)):
            ends.problems.append(f"{frame.f_code.co_name}: entered twice")
        ends.open[id(frame)] = 1
        hit()

    return entry


@pytest.mark.parametrize("case", FUNCTION_CASES, ids=[c.name for c in FUNCTION_CASES])
def test_line_events_unchanged_with_returns(case: Case) -> None:
    p = prepare(case)
    ends = Ends()
    chosen = traced(case, p)
    hits = {p.instrs[i].start: NOOP for i in chosen}
    new = ARCH.build(case.code, hits, {}, ends.returns).code
    assert corpus.line_events(case, new) == corpus.line_events(case, case.code)


def trace_events(case: Case, code: types.CodeType) -> list[tuple[str, int | None, Any]]:
    """Every sys.settrace event of frames running `code`: kind, line, and the returned
    value's repr or the exception's type."""
    out: list[tuple[str, int | None, Any]] = []

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        what = None
        if event == "return":
            what = repr(arg)
        elif event == "exception":
            what = arg[0].__name__
        out.append((event, frame.f_lineno, what))
        return local

    def global_(frame: types.FrameType, event: str, arg: Any) -> Any:
        return local(frame, event, arg) if frame.f_code is code else None

    old = sys.gettrace()
    sys.settrace(global_)
    try:
        case.run(code)
    finally:
        sys.settrace(old)
    return out


def _prefixed_loops(code: types.CodeType) -> set[int | None]:
    """The lines of the FOR_ITERs of `code` that carry an EXTENDED_ARG (a loop body longer
    than 255 code units)."""
    return {
        line_of(code, ins.offset)
        for ins in insn.decode(code)
        if ins.opname == "FOR_ITER" and ins.start != ins.offset
    }


def _loop_stop_iterations(code: types.CodeType, new: types.CodeType) -> set[Any]:
    """The 'exception' events CPython 3.13+ itself shows a tracer when a loop over a
    generator ends at a FOR_ITER with an EXTENDED_ARG, which the call sequences can give a
    loop that had none. The line event of the loop's head is on the EXTENDED_ARG then, so
    the FOR_ITER after it specializes to FOR_ITER_GEN under tracing, and the exhausted
    generator returns to the END_FOR, whose instrumented form reports a STOP_ITERATION
    (an 'exception' event); a FOR_ITER that carries the line event itself stays generic and
    jumps over the END_FOR (measured: 3.13-3.15 print the event for such a loop of their
    own compiling, 3.12 does not; gh-116090: the event depends on specialization)."""
    return {("exception", line, "StopIteration")
            for line in _prefixed_loops(new) - _prefixed_loops(code)}


@pytest.mark.parametrize("case", FUNCTION_CASES, ids=[c.name for c in FUNCTION_CASES])
def test_trace_events_unchanged_with_returns(case: Case) -> None:
    """A debugger sees the same 'call', 'line', 'return' and 'exception' events, except, on
    3.13, a close() of a generator suspended outside any try block: the original is not
    run (gen_close's shortcut), the rebuilt code is (see assembly.ReturnSequences.fix); and
    what CPython shows for a loop over a generator grown past an EXTENDED_ARG
    (`_loop_stop_iterations`)."""
    p = prepare(case)
    hits = {p.instrs[i].start: NOOP for i in traced(case, p)}
    new = ARCH.build(case.code, hits, {}, Ends().returns).code
    before, after = trace_events(case, case.code), trace_events(case, new)
    grown = _loop_stop_iterations(case.code, new)
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op == "equal":
            continue
        added = after[b1:b2]
        if op == "insert" and set(added) <= grown:
            continue
        assert op == "insert" and FAST_CLOSE, (op, before[a1:a2], added)
        for i in range(0, len(added), 3):
            (call, exc, ret) = added[i : i + 3]
            line = call[1]
            assert (call, exc, ret) == (
                ("call", line, None),
                ("exception", line, "GeneratorExit"),
                ("return", line, "None"),
            )


@pytest.mark.parametrize("case", BODY_CASES, ids=[c.name for c in BODY_CASES])
def test_module_and_class_bodies_refuse_returns(case: Case) -> None:
    ends = Ends()
    with pytest.raises(ValueError, match="not module or class bodies"):
        ARCH.build(case.code, {}, {}, ends.returns)
    # Hits alone are fine there.
    assert ARCH.build(case.code, {0: lambda: None}, {}).code is not case.code


# --------------------------------------------------------------------------- offsets


def dis_opname_at(code: types.CodeType) -> dict[int, str]:
    """Instruction start -> opname, decoded by `dis` (independently of insn.py): an
    instruction's EXTENDED_ARG prefixes start it; CACHE entries are not shown."""
    out: dict[int, str] = {}
    start: int | None = None
    for ins in dis.get_instructions(code):
        if ins.opname == "EXTENDED_ARG":
            start = ins.offset if start is None else start
            continue
        out[ins.offset if start is None else start] = ins.opname
        start = None
    return out


def assert_offsets(code: types.CodeType, new: types.CodeType, offsets: dict[int, int]) -> None:
    assert sorted(offsets) == list(insn.starts(code))
    old = dis_opname_at(code)
    moved = dis_opname_at(new)
    previous = -1
    old_pos = list(code.co_positions())
    new_pos = list(new.co_positions())
    for start in insn.starts(code):
        target = offsets[start]
        assert target > previous, (start, target)  # in order
        previous = target
        assert moved.get(target) == old[start], (start, target, old[start], moved.get(target))
        # The instruction keeps its positions (lines and columns), code unit by code unit.
        size = _size(code, start)
        assert (
            new_pos[target // 2 : (target + size) // 2] == old_pos[start // 2 : (start + size) // 2]
        )


def _size(code: types.CodeType, start: int) -> int:
    starts = list(insn.starts(code))
    i = starts.index(start)
    return (starts[i + 1] if i + 1 < len(starts) else len(code.co_code)) - start


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_offsets(case: Case) -> None:
    p = prepare(case)
    chosen = [p.instrs[i].start for i in accepted(case, p)]
    ends = Ends()
    variants: list[tuple[dict[int, Any], Any]] = [
        ({}, None),
        ({0: lambda: None}, None),
        ({off: (lambda: None) for off in chosen}, None),
        ({off: (lambda: None) for off in chosen[1::2]}, None),
    ]
    if case in FUNCTION_CASES:
        variants += [({}, ends.returns), ({off: (lambda: None) for off in chosen}, ends.returns)]
    for hits, returns in variants:
        built = ARCH.build(case.code, hits, {}, returns)
        assert_offsets(case.code, built.code, dict(built.offsets))


def test_offsets_in_stdlib_modules() -> None:
    import json.decoder
    import textwrap

    count = 0
    for module in (textwrap, json.decoder, inspect):
        assert module.__spec__ is not None and module.__spec__.loader is not None
        module_code = module.__spec__.loader.get_code(module.__name__)  # type: ignore[attr-defined]
        for code in corpus.every_code(module_code):
            ok = [s for s in insn.starts(code) if ARCH.check_optimizable(code, s) is None]
            returns = Ends().returns if code.co_flags & inspect.CO_OPTIMIZED else None
            built = ARCH.build(code, {o: (lambda: None) for o in ok}, {}, returns)
            assert_offsets(code, built.code, dict(built.offsets))
            count += 1
    assert count > 100


# --------------------------------------------------------------------------- semantics


def rebuilt(fn: Any, code: types.CodeType) -> Any:
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def with_returns(fn: Any, ends: Ends, hits: dict[int, Any] | None = None) -> Any:
    return rebuilt(
        fn, ARCH.build(fn.__code__, {0: ends.entry, **(hits or {})}, {}, ends.returns).code
    )


def caught(fn: Callable[[], Any]) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    raise AssertionError("no exception")


def raising(x: int) -> int:
    y = x + 1
    if y:
        raise KeyError(y)
    return y


def returning(x: int) -> int:
    y = x * 2
    return y  # the line of the return


def test_hooks_run_in_the_probed_frame_at_the_right_line() -> None:
    seen: list[Any] = []

    def on_return(value: object) -> None:
        frame = sys._getframe(1)
        seen.append(("return", frame.f_code.co_name, frame.f_lineno, value))

    def on_unwind(exc: BaseException) -> None:
        frame = sys._getframe(1)
        tb = exc.__traceback__
        assert tb is not None and tb.tb_frame is frame
        # The handler is no line of the source: f_lineno is None there; the line the
        # exception left from is the traceback's.
        seen.append(("unwind", frame.f_code.co_name, frame.f_lineno, tb.tb_lineno))

    first = returning.__code__.co_firstlineno
    fn = rebuilt(returning, ARCH.build(returning.__code__, {}, {}, (on_return, on_unwind)).code)
    assert fn(4) == 8
    fn = rebuilt(raising, ARCH.build(raising.__code__, {}, {}, (on_return, on_unwind)).code)
    exc = caught(lambda: fn(1))
    assert seen == [
        ("return", "returning", first + 2, 8),
        ("unwind", "raising", None, raising.__code__.co_firstlineno + 3),
    ]
    # The finished frame is left where the original leaves it (RERAISE 1 puts back lasti).
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    assert tb is not None and tb.tb_frame.f_code is fn.__code__
    assert tb.tb_frame.f_lineno == raising.__code__.co_firstlineno + 3


def test_hooks_that_raise_change_nothing() -> None:
    def bad_return(value: object) -> None:
        raise OSError("from on_return")

    def bad_unwind(exc: BaseException) -> None:
        raise OSError("from on_unwind")

    def gen(n: int) -> Any:
        yield n
        if n:
            raise ValueError(n)
        return "end"

    for fn, args in (
        (returning, (3,)),
        (raising, (1,)),
        (raising, (-1,)),
        (gen, (0,)),
        (gen, (1,)),
    ):
        new = rebuilt(fn, ARCH.build(fn.__code__, {}, {}, (bad_return, bad_unwind)).code)
        for _ in range(10):  # specialized too
            runs = []
            for f in (fn, new):
                try:
                    result = f(*args)
                    runs.append(("ok", list(result) if inspect.isgenerator(result) else result))
                except BaseException as exc:  # noqa: BLE001
                    runs.append(("raise", corpus.detail(exc)[:-1], repr(exc)))
            assert runs[0] == runs[1], fn
        assert sys.exc_info() == (None, None, None)


def test_hooks_interrupted_let_the_interrupt_through() -> None:
    """A KeyboardInterrupt (or SystemExit) out of a hook is no failure of the hook but a
    signal handler's exception raised while it ran: it is not dropped."""

    def interrupted(value: object) -> None:
        raise KeyboardInterrupt

    for fn, args in ((returning, (3,)), (raising, (1,))):
        new = rebuilt(fn, ARCH.build(fn.__code__, {}, {}, (interrupted, interrupted)).code)
        exc = caught(lambda new=new, args=args: new(*args))
        assert type(exc) is KeyboardInterrupt
    assert sys.exc_info() == (None, None, None)


def test_no_exception_state_leaks() -> None:
    ends = Ends()
    fn = with_returns(raising, ends)
    try:
        fn(1)
    except KeyError:
        assert isinstance(sys.exc_info()[1], KeyError)
    assert sys.exc_info() == (None, None, None)

    def inside() -> Any:
        try:
            raise TypeError("outer")
        except TypeError:
            try:
                fn(1)
            except KeyError as exc:
                # The program's own chaining is untouched.
                assert isinstance(exc.__context__, TypeError)
            return sys.exc_info()[0]

    assert inside() is TypeError
    assert [k for k, _, _ in ends.log] == ["unwind", "unwind"]


def test_a_generator_collected_unfinished_ends_by_generator_exit() -> None:
    def gen() -> Any:
        try:
            yield 1
            yield 2
        finally:
            pass

    ends = Ends()
    fn = with_returns(gen, ends)
    it = fn()
    assert next(it) == 1
    del it  # refcount: closed now
    assert [(k, n) for k, _, n in ends.log] == [("unwind", "GeneratorExit")]
    cycle: list[Any] = []
    it = fn()
    next(it)
    cycle.append(it)
    cycle.append(cycle)
    del it, cycle
    gc.collect()  # closed by the cycle collector
    assert [(k, n) for k, _, n in ends.log] == [("unwind", "GeneratorExit")] * 2
    assert ends.entries == 2 and not ends.still_open()


def test_unstarted_generators_neither_start_nor_end() -> None:
    def gen() -> Any:
        yield 1

    ends = Ends()
    fn = with_returns(gen, ends)
    fn().close()
    exc = caught(lambda: fn().throw(KeyError("before start")))
    assert isinstance(exc, KeyError)
    del exc
    fn()  # dropped unstarted
    gc.collect()
    assert ends.entries == 0 and ends.log == []


def test_a_generator_that_ignores_close_has_not_ended() -> None:
    """close() raises RuntimeError("generator ignored GeneratorExit") in the caller while
    the frame stays suspended: it has not ended, no hook runs. When the generator is then
    collected, the collector's close fails the same way (an unraisable error) and the frame
    is dropped without running again: an entry with no end, as for a frame that is never
    resumed (the core must reclaim such instances, as kprobe_flush_task does)."""

    def stubborn() -> Any:
        while True:
            try:
                yield 1
            except GeneratorExit:
                pass

    ends = Ends()
    fn = with_returns(stubborn, ends)
    it = fn()
    next(it)
    exc = caught(it.close)
    assert isinstance(exc, RuntimeError) and "ignored GeneratorExit" in str(exc)
    assert ends.log == [] and ends.still_open() == 1
    unraisable: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        del it, exc
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert ends.log == [] and len(unraisable) == 1


def test_close_returning_a_value() -> None:
    def gen() -> Any:
        try:
            yield 1
        except GeneratorExit:
            return "closing value"

    ends = Ends()
    fn = with_returns(gen, ends)
    it = fn()
    next(it)
    value = it.close()
    assert value == gen_close_value(gen)
    assert [(k, n) for k, _, n in ends.log] == [("return", "str")]


def gen_close_value(fn: Any) -> Any:
    # 3.13 hands the return value back from close() (gh-104770); earlier versions drop it.
    it = fn()
    next(it)
    return it.close()


def test_stop_iteration_inside_a_generator() -> None:
    """The caller gets RuntimeError (cause: the StopIteration), and on_unwind is given that
    very RuntimeError: 3.12+ convert in the frame, 3.11 in C after the frame, which the
    3.11 unwind sequence does first (assembly.ReturnSequences.unwind_generator)."""

    def gen() -> Any:
        yield 1
        raise StopIteration("inside")

    got: list[BaseException] = []
    fn = rebuilt(gen, ARCH.build(gen.__code__, {}, {}, (lambda v: None, got.append)).code)
    exc, original = (caught(lambda f=f: list(f())) for f in (fn, gen))
    assert got == [exc] and got[0] is exc
    assert isinstance(exc, RuntimeError) and isinstance(exc.__cause__, StopIteration)
    assert corpus.detail(exc) == corpus.detail(original)


@pytest.mark.skipif(VERSION != (3, 11), reason="3.11 converts StopIteration outside the frame")
def test_without_the_311_conversion_on_unwind_would_not_see_what_the_caller_sees() -> None:
    def gen() -> Any:
        yield 1
        raise StopIteration("inside")

    got: list[BaseException] = []
    arch = RewriteArch()
    arch._returns = arch._returns._replace(unwind_generator=())  # type: ignore[union-attr]
    fn = rebuilt(gen, arch.build(gen.__code__, {}, {}, (lambda v: None, got.append)).code)
    exc = caught(lambda: list(fn()))
    assert isinstance(exc, RuntimeError) and isinstance(got[0], StopIteration)


@pytest.mark.skipif(VERSION < (3, 13), reason="3.12.1's close() never skips the frame (gh-111107)")
def test_without_the_fix_close_would_not_be_seen() -> None:
    def gen() -> Any:
        yield 1

    ends = Ends()
    arch = RewriteArch()
    arch._returns = arch._returns._replace(fix=None)  # type: ignore[union-attr]
    fn = rebuilt(gen, arch.build(gen.__code__, {0: ends.entry}, {}, ends.returns).code)
    it = fn()
    next(it)
    it.close()
    assert ends.log == [] and ends.still_open() == 1
    # With it (the arch as built): seen.
    ends = Ends()
    it = with_returns(gen, ends)()
    next(it)
    it.close()
    assert [(k, n) for k, _, n in ends.log] == [("unwind", "GeneratorExit")]


@pytest.mark.skipif(not hasattr(sys, "monitoring"), reason="needs sys.monitoring (3.12+)")
@pytest.mark.parametrize("own", [True, False], ids=["own-handler", "forced-shared"])
def test_an_exception_in_the_prologue_of_a_generator_is_no_end(
    own: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3.12+ cover a generator's first RESUME with its implicit StopIteration handler, so
    an exception raised there (here by a PY_START callback; a signal handler's can too)
    goes through that handler, whose RERAISE is covered by the unwind handler: the
    prologue's own copy of the handler (inject._own_prologue_handlers) keeps it from
    reporting a frame that never started."""
    monitoring = sys.monitoring  # type: ignore[attr-defined]

    def gen() -> Any:
        yield 1

    ends = Ends()
    arch = RewriteArch()
    if not own:
        monkeypatch.setattr(inject, "_own_prologue_handlers", lambda *args: [])
    code = arch.build(gen.__code__, {0: ends.entry}, {}, ends.returns).code
    fn = rebuilt(gen, code)
    tool = next(i for i in range(6) if monitoring.get_tool(i) is None)
    monitoring.use_tool_id(tool, "pykprobes-test")

    def start(c: types.CodeType, offset: int) -> None:
        raise LookupError("at PY_START")

    try:
        monitoring.register_callback(tool, monitoring.events.PY_START, start)
        monitoring.set_local_events(tool, code, monitoring.events.PY_START)
        monitoring.set_local_events(tool, gen.__code__, monitoring.events.PY_START)
        exc, original = (caught(lambda f=f: next(f())) for f in (fn, gen))
    finally:
        monitoring.set_local_events(tool, code, 0)
        monitoring.set_local_events(tool, gen.__code__, 0)
        monitoring.register_callback(tool, monitoring.events.PY_START, None)
        monitoring.free_tool_id(tool)
    assert corpus.detail(exc) == corpus.detail(original)
    assert ends.entries == 0
    if own:
        assert ends.log == []
    else:
        assert [(k, n) for k, _, n in ends.log] == [("unwind", "LookupError")]


def test_the_fix_counts_the_outermost_handler() -> None:
    """3.12: YIELD_VALUE's argument is the number of handlers around the yield; 3.13+: the
    RESUME after a yield says whether that number is 1 (RESUME_OPARG_DEPTH1_MASK: 4, from
    3.15 8). The rebuilt code has one handler more around every yield."""
    code = corpus.simple_gen.__code__
    new = ARCH.build(code, {}, {}, Ends().returns).code
    old_args = [(i.opname, i.arg) for i in dis.get_instructions(code)]
    new_args = [(i.opname, i.arg) for i in dis.get_instructions(new)]
    old_yields = [a for op, a in old_args if op == "YIELD_VALUE"]
    new_yields = [a for op, a in new_args if op == "YIELD_VALUE"]
    old_resumes = [a for op, a in old_args if op == "RESUME"]
    new_resumes = [a for op, a in new_args if op == "RESUME"]
    if VERSION == (3, 12):
        assert new_yields == [a + 1 for a in old_yields]
        assert new_resumes == old_resumes
    elif VERSION >= (3, 13):
        mask = 8 if VERSION >= (3, 15) else 4
        assert any(a & mask for a in old_resumes) and not any(a & mask for a in new_resumes)
        assert new_resumes == [a & ~mask for a in old_resumes]
        assert new_yields == old_yields
    else:
        assert (new_yields, new_resumes) == (old_yields, old_resumes)


def test_returns_need_sequences_for_this_python() -> None:
    arch = RewriteArch()
    arch._returns = None
    with pytest.raises(ValueError, match="no return sequences"):
        arch.build(returning.__code__, {}, {}, Ends().returns)


def test_stack_size_is_enough() -> None:
    """`bytecode`'s own stack analysis of every rebuilt corpus code agrees with the
    co_stacksize build() sets (original + 3, and at least 5 for the unwind handler).
    Its analysis can exceed CPython's for the original (it does for `chained`), so the
    growth it finds is compared with the growth build() allowed. (Decoded as build()
    decodes, for the t-strings bytecode 0.19.1 cannot read on its own.)"""
    for case in FUNCTION_CASES:
        p = prepare(case)
        hits = {p.instrs[i].start: NOOP for i in accepted(case, p)}
        before = inject._abstract(case.code).compute_stacksize()
        for h in ({}, hits):
            new = ARCH.build(case.code, h, {}, Ends().returns).code
            needed = inject._abstract(new).compute_stacksize()
            assert new.co_stacksize == max(case.code.co_stacksize + 3, 5), case.name
            assert needed <= new.co_stacksize or (
                needed - before <= new.co_stacksize - case.code.co_stacksize
            ), case.name


def test_generators_run_by_the_interpreter_inline() -> None:
    """3.12+ run a generator's frame inside the caller's loop (FOR_ITER_GEN, SEND_GEN, once
    specialized): a rebuilt generator consumed by `for`, delegated to by `yield from`
    (throw() and close() going through), and a rebuilt coroutine awaited by another."""

    def inner(n: int) -> Any:
        try:
            for i in range(n):
                got = yield i
                if got == "raise":
                    raise ValueError("asked")
        except KeyError as exc:
            return ("caught", str(exc))
        return n

    ends = Ends()
    fn = with_returns(inner, ends)

    def consume(n: int) -> list[int]:
        out = []
        for x in fn(n):
            out.append(x)
        return out

    def outer(n: int) -> Any:
        result = yield from fn(n)
        return ("outer", result)

    for _ in range(30):  # until FOR_ITER and SEND specialize
        assert consume(3) == [0, 1, 2]
    it = outer(3)
    assert next(it) == 0
    with pytest.raises(StopIteration) as stop:
        it.throw(KeyError("k"))
    assert stop.value.value == ("outer", ("caught", "'k'"))
    it = outer(3)
    next(it)
    with pytest.raises(ValueError, match="asked") as info:
        it.send("raise")
    raised = info.value
    it = outer(3)
    next(it)
    it.close()
    assert [n for _, _, n in ends.log] == ["int"] * 30 + ["tuple", "ValueError", "GeneratorExit"]
    assert ends.log[-2][1] == id(raised)
    assert ends.entries == 33 and not ends.still_open() and not ends.problems

    async def leaf(x: int) -> int:
        if x < 0:
            raise LookupError(x)
        return x

    aends = Ends()
    afn = with_returns(leaf, aends)

    async def main() -> list[Any]:
        out: list[Any] = []
        for x in (1, -1) * 20:
            try:
                out.append(await afn(x))
            except LookupError as exc:
                out.append(exc)
        return out

    coro = main()
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    results = done.value.value
    assert [k for k, _, _ in aends.log] == ["return", "unwind"] * 20
    assert [i for _, i, _ in aends.log] == [id(r) for r in results]


def test_a_return_right_after_a_loop() -> None:
    """3.12+ exit an exhausted loop past its END_FOR (3.13: and the POP_TOP after it) by
    offset, not by label: the return hook right after them must still be run."""

    def tail_loop(xs: Any) -> None:
        for _ in xs:
            pass

    def gen_items() -> Any:
        yield from (1, 2)

    ends = Ends()
    fn = with_returns(tail_loop, ends)
    for _ in range(20):  # FOR_ITER_LIST, _RANGE, _TUPLE, _GEN once specialized
        for xs in ([1, 2], range(3), (4,), gen_items()):
            assert fn(xs) is None
    assert len(ends.log) == ends.entries == 80
    assert not ends.problems and not ends.still_open()
