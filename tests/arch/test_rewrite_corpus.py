"""The rewrite arch against a corpus of tricky code: every optimizable offset of every case.

For each case, the original code is run once under an independent instruction counter
(`sys.monitoring` INSTRUCTION events on 3.12+, `sys.settrace` opcode events on 3.11), which
gives its observable behaviour and how many times each instruction ran. Then, for every
offset `check_optimizable` accepts, the code is rebuilt with one counting hit there and run
again (several times, so that the adaptive interpreter specializes the rebuilt code): its
behaviour must be the same and the hit must have run exactly as often as the instruction,
with the probed frame on the instruction's line. Finally one build with a hit at every
accepted offset at once is run the same way, and traced: its 'line' events must be the
original's.
"""

from __future__ import annotations

import asyncio
import collections
import dis
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pykprobes.arch.rewrite import RewriteArch, callees
from pykprobes.arch.rewrite.assembly import call_sequence
from pykprobes.insn import Insn, decode, entry_index

ARCH = RewriteArch()


def NOOP() -> None:
    """One hit for every site of a code where the tests compare what a tracer sees: a
    code with more than 127 distinct hits loads some of them by names whose index needs
    an EXTENDED_ARG (arch/rewrite/callees.py), and 3.13 then reports one more 'line'
    event where an exception handler starts with such a load (as it would for a
    LOAD_CONST past 255 constants)."""
SEQUENCE = call_sequence()
assert SEQUENCE is not None

#: How many times each rebuilt variant runs: enough for the adaptive interpreter to
#: specialize its instructions (which is when hidden adjacency assumptions bite).
REPEAT = 12

# --------------------------------------------------------------------------- observing


def outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """A call's observable result: its value, or its exception with the traceback's lines."""
    try:
        return ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - the exception is the observation
        return ("raise", *describe(exc))


#: Set (by the return-probe tests) to make `describe` also record the whole text
#: traceback.format_exception prints: every frame's line and carets, and the chained
#: exceptions (__cause__, __context__) with theirs. Off by default: it is slow.
DETAILED: list[bool] = [False]


def describe(exc: BaseException) -> tuple[Any, ...]:
    lines = []
    tb = exc.__traceback__
    while tb is not None:
        lines.append((tb.tb_frame.f_code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    # The first entry is the driver's own frame: the rest is the code under test.
    described = (type(exc).__name__, str(exc), tuple(lines[1:]))
    if DETAILED[0]:
        described += (detail(exc),)
    return described


def detail(exc: BaseException) -> tuple[Any, ...]:
    """What a program can see of an exception beyond its type and message, including the
    line each frame of its traceback is at (for a finished frame: where it ended)."""
    frame_lines = []
    tb = exc.__traceback__
    while tb is not None:
        frame_lines.append(tb.tb_frame.f_lineno)
        tb = tb.tb_next
    return (
        exc.args,
        tuple(frame_lines),
        "".join(traceback.format_exception(exc)),
        type(exc.__cause__).__name__,
        type(exc.__context__).__name__,
        exc.__suppress_context__,
    )


def drive_generator(gen: Any, script: list[tuple[str, Any]]) -> list[Any]:
    """Run a generator through next/send/throw/close and record every step."""
    seen: list[Any] = []
    for action, value in script:
        try:
            if action == "next":
                seen.append(("yield", next(gen)))
            elif action == "send":
                seen.append(("yield", gen.send(value)))
            elif action == "throw":
                seen.append(("yield", gen.throw(value())))  # a fresh exception each run
            elif action == "close":
                seen.append(("closed", gen.close()))
            elif action == "list":
                seen.append(("rest", list(gen)))
        except StopIteration as stop:
            seen.append(("stop", stop.value))
        except BaseException as exc:  # noqa: BLE001
            seen.append(("raise", *describe(exc)))
    return seen


_loop: list[asyncio.AbstractEventLoop] = []


def run_async(coro: Any) -> tuple[Any, ...]:
    # One event loop for the whole module (asyncio.run() per call would be slow for the
    # thousands of runs here), closed by the `_close_loop` fixture.
    if not _loop:
        _loop.append(asyncio.new_event_loop())
    try:
        return ("ok", _loop[0].run_until_complete(coro))
    except BaseException as exc:  # noqa: BLE001
        if DETAILED[0]:
            return ("raise", type(exc).__name__, str(exc), detail(exc))
        return ("raise", type(exc).__name__, str(exc))


# --------------------------------------------------------------------------- the corpus


def loops(n: int) -> Any:
    out = []
    for i in range(n):
        if i == 7:
            break
        if i % 3 == 0:
            continue
        out.append(i)
    else:
        out.append("no-break")
    j = 0
    while j < n:
        j += 2
        if j > 9:
            break
    else:
        out.append("while-else")
    for a in range(3):
        for b in range(3):
            if a == b:
                continue
            if a + b > 3:
                break
            out.append((a, b))
    # A loop over a generator: FOR_ITER runs it inline (3.12+ FOR_ITER_GEN).
    for g in (k * 3 for k in range(n)):
        if g > 9:
            break
        out.append(g)
    return out, j


def exceptions(x: Any) -> Any:
    log = []
    try:
        try:
            log.append(10 // x)
        except ZeroDivisionError as exc:
            log.append(type(exc).__name__)
            if x == 0:
                raise ValueError("inner") from exc
        finally:
            log.append("finally-1")
    except ValueError as exc:
        log.append(str(exc))
    except TypeError:
        log.append("type")
        try:
            return log
        finally:
            log.append("finally-in-return")
    else:
        log.append("else")
    finally:
        log.append("finally-2")
    for i in range(3):
        try:
            if i == 1:
                continue
            if i == 2:
                break
        finally:
            log.append(("loop-finally", i))
    return log


def uncaught(x: int) -> int:
    y = x * 2
    if y > 3:
        raise KeyError(y)
    return [1, 2][y]


class Resource:
    def __init__(self, log: list[Any], suppress: bool = False) -> None:
        self.log = log
        self.suppress = suppress

    def __enter__(self) -> Resource:
        self.log.append("enter")
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.log.append(("exit", exc[0].__name__ if exc[0] else None))
        return self.suppress

    async def __aenter__(self) -> Resource:
        await asyncio.sleep(0)
        self.log.append("aenter")
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        await asyncio.sleep(0)
        self.log.append(("aexit", exc[0].__name__ if exc[0] else None))
        return self.suppress


def withs(x: int) -> Any:
    log: list[Any] = []
    with Resource(log) as r, Resource(log, suppress=True):
        log.append(r is not None)
        if x == 1:
            raise RuntimeError("suppressed")
    for i in range(3):
        with Resource(log):
            if i == x:
                break
            if i == 0:
                continue
            log.append(i)
    try:
        with Resource(log):
            if x == 2:
                return log
            1 / (x - 3)
    except ZeroDivisionError:
        log.append("zde")
    return log


def except_star(kind: int) -> Any:
    log = []
    try:
        try:
            errors: list[Exception] = [ValueError(1), TypeError(2)]
            if kind == 1:
                errors.append(KeyError(3))
            if kind == 2:
                raise ValueError("plain")
            raise ExceptionGroup("group", errors)
        except* ValueError as eg:
            log.append(("value", len(eg.exceptions)))
        except* TypeError as eg:
            log.append(("type", len(eg.exceptions)))
    except* KeyError as eg:
        log.append(("key", repr(eg.exceptions)))
    return log


def subgen(n: int) -> Any:
    try:
        for i in range(n):
            got = yield i
            if got is not None:
                yield ("got", got)
    except KeyError:
        # Returning from a throw() makes the delegating generator's yield from finish
        # (3.11 computes that exit itself in genobject.c _gen_throw).
        return "caught"
    return "done"


def delegator(n: int) -> Any:
    log = []
    result = yield from subgen(n)
    log.append(result)
    try:
        x = yield "after"
        log.append(x)
    except ValueError as exc:
        log.append(("thrown", str(exc)))
        yield "recovered"
    finally:
        log.append("cleanup")
    yield tuple(log)
    return len(log)


def simple_gen(n: int) -> Any:
    total = 0
    for i in range(n):
        sent = yield i * i
        if sent:
            total += sent
    return total


GEN_SCRIPTS: list[list[tuple[str, Any]]] = [
    [("list", None)],
    [("next", None), ("send", 5), ("next", None), ("send", 7), ("list", None)],
    [
        ("next", None),
        ("throw", lambda: KeyError("k")),
        ("next", None),
        ("throw", lambda: ValueError("v")),
        ("list", None),
    ],
    [("next", None), ("next", None), ("close", None), ("next", None)],
    [("list", None), ("next", None)],
    [("next", None), ("next", None), ("next", None), ("send", "s"), ("list", None)],
    [("next", None), ("throw", lambda: RuntimeError("boom")), ("next", None)],
    [("next", None), ("next", None), ("send", "stop"), ("next", None)],
]


def stopping_gen(mode: int) -> Any:
    """Ends every way a generator can: StopIteration raised inside (turned into
    RuntimeError), returning in response to close(), returning, raising."""
    yield 1
    if mode == 0:
        raise StopIteration("raised inside")
    if mode == 1:
        next(iter(()))  # a StopIteration from a callee
    try:
        got = yield 2
    except GeneratorExit:
        if mode == 2:
            return "returned-on-close"
        raise
    except KeyError as exc:
        raise ValueError("from throw") from exc
    if got == "stop":
        raise StopIteration("after send")
    return ("done", mode, got)


def chained(x: int) -> Any:
    """Exceptions leaving the frame with a cause, a context, a suppressed context, by a
    bare `raise` in a handler and through a `finally`."""
    log = []
    try:
        try:
            return {0: "zero"}[x]
        except KeyError as exc:
            log.append("caught")
            if x == 1:
                raise ValueError("explicit cause") from exc
            if x == 2:
                raise TypeError("implicit context")  # noqa: B904 - the context is the point
            if x == 3:
                raise LookupError("suppressed") from None
            raise
    finally:
        log.append("finally")
        if x == 4:
            return log  # noqa: B012 - a return in finally swallows the KeyError


async def stopping_coroutine(x: int) -> Any:
    await asyncio.sleep(0)
    if x == 1:
        raise StopIteration("in a coroutine")
    if x == 2:
        raise KeyError("escapes")
    try:
        await leaf(-1)
    except ValueError as exc:
        if x == 3:
            raise RuntimeError("chained") from exc
    return x


async def stopping_agen(n: int) -> Any:
    yield 1
    if n == 1:
        raise StopAsyncIteration("in an async generator")
    if n == 2:
        raise StopIteration("in an async generator")
    try:
        yield 2
    finally:
        await asyncio.sleep(0)
    yield 3


async def drive_stopping_agen(make: Callable[[int], Any]) -> Any:
    log: list[Any] = []
    for n in (0, 1, 2, 3):
        try:
            log.append([x async for x in make(n)])
        except BaseException as exc:  # noqa: BLE001
            log.append(("raise", *describe(exc)))
    g = make(3)
    log.append(await g.__anext__())
    log.append(await g.__anext__())
    await g.aclose()  # GeneratorExit through the finally's await
    g = make(3)
    log.append(await g.__anext__())
    try:
        await g.athrow(KeyError("thrown"))
    except KeyError as exc:
        log.append(("athrow", str(exc)))
    return log


async def leaf(x: int) -> int:
    await asyncio.sleep(0)
    if x < 0:
        raise ValueError(x)
    return x * 10


async def coroutine(x: int) -> Any:
    log = []
    log.append(await leaf(x))
    try:
        log.append(await leaf(-x))
    except ValueError as exc:
        log.append(("caught", str(exc)))
    results = await asyncio.gather(leaf(1), leaf(2))
    log.extend(results)
    async with Resource(log) as r:
        log.append(r is not None)
        await asyncio.sleep(0)
    async with Resource(log, suppress=True):
        raise KeyError("inside async with")
    async for item in agen(3):
        if item == 2:
            continue
        log.append(item)
    log.append([v async for v in agen(x) if v % 2])
    log.append(await asyncio.wait_for(leaf(4), timeout=5))
    return log


async def agen(n: int) -> Any:
    for i in range(n):
        await asyncio.sleep(0)
        try:
            received = yield i
        except GeneratorExit:
            raise
        except ValueError:
            yield "thrown-in"
        if received:
            yield ("received", received)


async def drive_agen(make: Callable[[int], Any]) -> Any:
    log = []
    g = make(4)
    log.append(await g.__anext__())
    log.append(await g.asend("a"))
    log.append(await g.__anext__())
    log.append(await g.athrow(ValueError("v")))
    log.append([x async for x in g])
    g2 = make(5)
    log.append(await g2.__anext__())
    await g2.aclose()
    try:
        await g2.__anext__()
    except StopAsyncIteration:
        log.append("stopped")
    return log


def comprehensions(n: int) -> Any:
    k = 3
    a = [i * k for i in range(n) if i % 2]
    b = {i: [j for j in range(i)] for i in range(n)}
    c = {x for x in "abracadabra" if x not in "a"}
    d = sum(i for i in range(n))
    e = [(i, j) for i in range(3) for j in range(i)]
    f = [y for x in range(n) if (y := x * x) > 4]
    try:
        g = [1 // (i - 2) for i in range(n)]
    except ZeroDivisionError:
        g = None
    return a, b, sorted(c), d, e, f, g, k


def closures(n: int) -> Any:
    count = 0
    items = []

    def bump(step: int = 1) -> int:
        nonlocal count
        count += step
        return count

    def reader() -> Any:
        return (count, len(items))

    lam = lambda z: z + count  # noqa: E731
    for i in range(n):
        bump(i)
        items.append(lam(i))
    return reader(), items, bump(), [f() for f in [lambda i=i: i * count for i in range(3)]]


class Point:
    __match_args__ = ("x", "y")

    def __init__(self, x: int, y: int) -> None:
        self.x = x
        self.y = y


def matching(value: Any) -> Any:
    match value:
        case 0 | 1:
            return "small"
        case [x, y, *rest] if x == y:
            return ("pair-start", rest)
        case [x, *_]:
            return ("seq", x)
        case {"kind": "a", **others}:
            return ("mapping", sorted(others))
        case Point(x=0, y=yy):
            return ("on-y", yy)
        case Point(xx, 0):
            return ("on-x", xx)
        case str() as s if len(s) > 3:
            return ("long-str", s)
        case int(n) if n > 100:
            return "big"
        case _:
            return "other"


def formatting(x: Any, width: int = 8) -> Any:
    name = "v"
    return [
        f"{x}",
        f"{x!r:>{width}}|",
        f"{name}={x:.3f}" if isinstance(x, float) else f"{name}={x!s:^{width}}",
        f"{'nested ' + f'{x}'}",
        f"{x=}",
    ]


def walrus(data: list[int]) -> Any:
    out = []
    if (n := len(data)) > 3:
        out.append(n)
    while (chunk := data[:2]) and len(out) < 5:
        data = data[2:]
        out.append(sum(chunk))
    return out, [s for d in data if (s := d * 2) > 2]


def calls(*args: Any, **kwargs: Any) -> Any:
    def target(a: Any, b: Any = 2, *rest: Any, c: Any = 3, **extra: Any) -> Any:
        return (a, b, rest, c, sorted(extra.items()))

    out = [
        target(1),
        target(1, c=4),
        target(*args, **kwargs),
        target(1, 2, 3, *args, c=5, d=6, **kwargs),
        target(a=1, b=2, c=3),
        dict(zip("ab", args, strict=False), z=1),
        max(args or [0], key=lambda v: -v, default=None),
        "-".join(map(str, args)).upper().split(sep="-", maxsplit=1),
        sorted([3, 1, 2], reverse=True),
    ]
    return out


def strings_and_lists(n: int) -> Any:
    s = ""
    t = "x"
    acc = []
    for i in range(n):
        s += str(i)
        t = t + "y"
        acc.append(i)
        acc.append(len(s))
        if i < n // 2:
            acc.append(i * 2.5 < 3.5)
    return s, t, acc


def fib(n: int) -> int:
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)


def misc(x: Any) -> Any:
    global _MISC_GLOBAL
    _MISC_GLOBAL = x
    a, *b, c = [1, 2, 3, 4, x]
    d = {"k": [1, 2, 3]}
    d["k"][1] += x
    d["k"][0:2] = [x, x]
    del d["k"][2]
    ob = types.SimpleNamespace(v=1)
    ob.v += x
    assert ob.v > 0, "positive"
    value = "yes" if x > 2 else "no"
    chained = 1 < x <= 5 != x
    # 3.14 inlines all(), any() and tuple() of a generator, checking the builtins with
    # LOAD_COMMON_CONSTANT.
    inlined = (all(v >= 0 for v in b), any(v < 0 for v in b), tuple(v for v in b))
    return a, b, c, d, ob.v, value, chained, not x, -x, ~x, x is None, x in b, inlined


def annotated(x: int) -> Any:
    def inner(a: int = x, *, b: str = "b") -> dict[str, Any]:
        return {"a": a, "b": b}

    async def ainner() -> None:
        pass

    return inner(), inner.__annotations__, inner.__kwdefaults__, ainner.__name__


class Base:
    def describe(self) -> str:
        return "base"


class Derived(Base):
    def describe(self) -> str:
        return "derived+" + super().describe() + __class__.__name__  # type: ignore[name-defined]


def lambdas(n: int) -> Any:
    fs = [lambda x, i=i: x * i for i in range(n)]
    compose = lambda f, g: lambda x: f(g(x))  # noqa: E731
    return [f(2) for f in fs], compose(fs[-1], fs[1])(3), (lambda: n)()


def make_big_source() -> str:
    # More than 256 locals, more than 256 constants, and jumps longer than 255 code units
    # both ways: EXTENDED_ARG on local, constant and jump arguments. The 300 locals are
    # assigned in dead code, which the compiler drops while keeping them in co_varnames (so
    # this also checks that the rewrite keeps unused names); v299 is live.
    names = " = ".join(f"v{i}" for i in range(300))
    consts = ", ".join(str(1000 + i) for i in range(300))
    return f"""
def big(x):
    if 0:
        {names} = 0
    total = 0
    for k in range(3):
        if x > k:
            table = (x, {consts})
            total += table[k * 100 + 1] + len(table)
        else:
            total -= 1
    v299 = total
    return v299, v0 if x > 100 else None
"""


# t-strings (PEP 750, 3.14+): BUILD_INTERPOLATION with each conversion and a format spec,
# BUILD_TEMPLATE. Compiled from text, as older Pythons cannot parse them.
TEMPLATES_SOURCE = """
def templates(x, width=6):
    name = "v"
    t = t"{name}={x!r:>{width}} and {x + 1 if isinstance(x, int) else x!s} {x!a} {x:}"
    parts = [p if isinstance(p, str) else (p.value, p.expression, p.conversion, p.format_spec)
             for p in t]
    return t.strings, parts, [(i.value, i.conversion) for i in t.interpolations]
"""
try:
    _templates_namespace: dict[str, Any] = {}
    exec(compile(TEMPLATES_SOURCE, "<templates>", "exec"), _templates_namespace)
    TEMPLATES: list[Any] = [_templates_namespace["templates"]]
except SyntaxError:  # no t-strings before 3.14
    TEMPLATES = []

_big_namespace: dict[str, Any] = {}
exec(compile(make_big_source(), "<big>", "exec"), _big_namespace)
big = _big_namespace["big"]

CLASS_SOURCE = '''
class Body:
    """doc"""
    x = 1
    y = [i * 2 for i in range(3)]
    if x:
        z = "yes"
    else:
        z = "no"
    def method(self):
        return __class__.__name__
    try:
        w = undefined_name
    except NameError:
        w = "fallback"
    for i in range(2):
        x += i
    del i
'''

MODULE_SOURCE = '''
"""module doc"""
import math
import collections as _c
VALUE = math.floor(2.5)
def helper(a, b=2):
    return a * b
class K:
    attr = helper(VALUE)
try:
    import no_such_module_for_pykprobes
except ImportError:
    FALLBACK = True
for _i in range(3):
    VALUE += _i
RESULT = [helper(i) for i in range(4) if i % 2]
ASSIGNED = _c.Counter("aab")["a"]
if __name__ == "probe_module":
    MAIN = "yes"
'''


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One target code object and how to run it.

    `run(code)` runs the target with `code` standing in for it and returns what it observed.
    """

    name: str
    code: types.CodeType
    run: Callable[[types.CodeType], Any]
    repeat: int = REPEAT
    extra: dict[str, Any] = field(default_factory=dict)


def with_code(
    fn: types.FunctionType, code: types.CodeType, globals_: dict[str, Any] | None = None
) -> Any:
    new = types.FunctionType(
        code,
        fn.__globals__ if globals_ is None else globals_,
        fn.__name__,
        fn.__defaults__,
        fn.__closure__,
    )
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return WRAP[0](new) if WRAP[0] is not None else new


#: Set (by the return-probe tests) to a function that wraps each function a case calls,
#: so that what its callers see of each call can be recorded.
WRAP: list[Callable[[Any], Any] | None] = [None]


def function_case(fn: Any, drive: Callable[[Any], Any], repeat: int = REPEAT) -> Case:
    return Case(fn.__qualname__, fn.__code__, lambda code: drive(with_code(fn, code)), repeat)


def recursive_case() -> Case:
    def run(code: types.CodeType) -> Any:
        # A recursive call goes through the global name: bind it to the rebuilt function so
        # that every level runs the rebuilt code.
        namespace = dict(fib.__globals__)
        namespace["fib"] = with_code(fib, code, namespace)
        return [outcome(namespace["fib"], n) for n in (0, 1, 7)]

    return Case("fib", fib.__code__, run)


def nested_code(code: types.CodeType, name: str) -> types.CodeType:
    for const in code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == name:
            return const
    raise LookupError(name)


def class_body_case() -> Case:
    module = compile(CLASS_SOURCE, "<class-body>", "exec")
    body = nested_code(module, "Body")

    def run(code: types.CodeType) -> Any:
        patched = module.replace(
            co_consts=tuple(code if c is body else c for c in module.co_consts)
        )
        namespace: dict[str, Any] = {"__name__": "probe_class"}
        exec(patched, namespace)
        cls = namespace["Body"]
        attrs = sorted(
            (k, v if isinstance(v, (int, str, list)) else type(v).__name__)
            for k, v in vars(cls).items()
            if not k.startswith("__") or k == "__doc__"
        )
        return attrs, cls().method()

    return Case("class-body", body, run)


def module_case() -> Case:
    module = compile(MODULE_SOURCE, "<probe-module>", "exec")

    def run(code: types.CodeType) -> Any:
        namespace: dict[str, Any] = {"__name__": "probe_module"}
        exec(code, namespace)
        return sorted((k, repr(v)) for k, v in namespace.items() if k.isupper() or k == "__doc__")

    return Case("module", module, run)


def gen_drive(fn: Any) -> Any:
    return [drive_generator(fn(n), script) for n in (0, 2, 3) for script in GEN_SCRIPTS]


CASES: list[Case] = [
    function_case(loops, lambda f: [outcome(f, n) for n in (0, 4, 10)]),
    function_case(exceptions, lambda f: [outcome(f, x) for x in (0, 2, "s", None)]),
    function_case(uncaught, lambda f: [outcome(f, x) for x in (0, 1, 2)]),
    function_case(withs, lambda f: [outcome(f, x) for x in (0, 1, 2, 3)]),
    function_case(except_star, lambda f: [outcome(f, k) for k in (0, 1, 2)]),
    function_case(subgen, gen_drive),
    function_case(delegator, gen_drive),
    function_case(simple_gen, gen_drive),
    function_case(
        stopping_gen, lambda f: [drive_generator(f(m), sc) for m in range(4) for sc in GEN_SCRIPTS]
    ),
    function_case(chained, lambda f: [outcome(f, x) for x in range(6)]),
    function_case(coroutine, lambda f: [run_async(f(x)) for x in (1, 3)], repeat=4),
    function_case(stopping_coroutine, lambda f: [run_async(f(x)) for x in range(4)], repeat=4),
    function_case(stopping_agen, lambda f: [run_async(drive_stopping_agen(f))], repeat=4),
    function_case(agen, lambda f: [run_async(drive_agen(f))], repeat=4),
    function_case(comprehensions, lambda f: [outcome(f, n) for n in (0, 3, 6)]),
    function_case(closures, lambda f: [outcome(f, n) for n in (0, 4)]),
    function_case(
        matching,
        lambda f: [
            outcome(f, v)
            for v in (
                0,
                1,
                [2, 2, 3],
                [4, 5],
                {"kind": "a", "q": 1},
                Point(0, 5),
                Point(3, 0),
                "hello",
                "hi",
                500,
                50,
                2.5,
            )
        ],
    ),
    function_case(
        formatting,
        lambda f: [outcome(f, x) for x in (1, 2.5, "s", None)] + [outcome(f, 3, width=3)],
    ),
    function_case(walrus, lambda f: [outcome(f, d) for d in ([], [1, 2, 3, 4, 5], [9] * 12)]),
    function_case(
        calls,
        lambda f: [outcome(f), outcome(f, 7, 8), outcome(f, 1, e=2), outcome(f, 1, 2, 3, 4, q=1)],
    ),
    function_case(strings_and_lists, lambda f: [outcome(f, n) for n in (0, 5, 40)]),
    function_case(misc, lambda f: [outcome(f, x) for x in (0, 3, 9)]),
    function_case(annotated, lambda f: [outcome(f, 1)]),
    function_case(Derived.describe, lambda f: [outcome(f, Derived())]),
    function_case(lambdas, lambda f: [outcome(f, n) for n in (2, 5)]),
    function_case(big, lambda f: [outcome(f, x) for x in (-1, 2, 200)]),
    *(function_case(t, lambda f: [outcome(f, x) for x in (1, "s", 2.5)]) for t in TEMPLATES),
    recursive_case(),
    class_body_case(),
    module_case(),
]
CASE_IDS = [c.name for c in CASES]


# --------------------------------------------------------------------------- counting


def starts_by_unit(code: types.CodeType) -> dict[int, int]:
    """Every code unit's offset -> the start of the instruction it belongs to."""
    out = {}
    for ins in decode(code):
        for unit in range(ins.start, ins.end, 2):
            out[unit] = ins.start
    return out


ENTRY = -1  # key of the number of frames that started (the entry hit's expected count)


def count_instructions(case: Case) -> tuple[Any, collections.Counter[int]]:
    """Run the original once, counting how often each instruction (by start) executes.

    3.12+: sys.monitoring INSTRUCTION events (they fire at the first EXTENDED_ARG prefix of
    an instruction, and again at the opcode, so only the start is counted) and PY_START.
    3.11: sys.settrace opcode events (fired at the first prefix only) and one 'call' per
    new frame.
    """
    code = case.code
    unit_start = starts_by_unit(code)
    starts = {ins.start for ins in decode(code)}
    counts: collections.Counter[int] = collections.Counter()
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is not None:
        tool = next(i for i in range(6) if monitoring.get_tool(i) is None)
        events = monitoring.events
        monitoring.use_tool_id(tool, "pykprobes-test-counter")

        def on_instruction(c: types.CodeType, offset: int) -> None:
            if offset in starts:
                counts[offset] += 1

        def on_start(c: types.CodeType, offset: int) -> None:
            counts[ENTRY] += 1

        monitoring.register_callback(tool, events.INSTRUCTION, on_instruction)
        monitoring.register_callback(tool, events.PY_START, on_start)
        monitoring.set_local_events(tool, code, events.INSTRUCTION | events.PY_START)
        try:
            observed = case.run(code)
        finally:
            monitoring.set_local_events(tool, code, 0)
            monitoring.register_callback(tool, events.INSTRUCTION, None)
            monitoring.register_callback(tool, events.PY_START, None)
            monitoring.free_tool_id(tool)
        return observed, counts

    frames_seen: dict[int, types.FrameType] = {}

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "opcode" and frame.f_lasti in starts:
            counts[unit_start[frame.f_lasti]] += 1
        return local

    def global_(frame: types.FrameType, event: str, arg: Any) -> Any:
        if frame.f_code is not code:
            return None
        if id(frame) not in frames_seen:
            frames_seen[id(frame)] = frame  # kept alive: ids stay unique
            counts[ENTRY] += 1
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return local

    old = sys.gettrace()
    sys.settrace(global_)
    try:
        observed = case.run(code)
    finally:
        sys.settrace(old)
    return observed, counts


def line_events(case: Case, code: types.CodeType) -> list[int | None]:
    """The 'line' events of frames running `code`, in order."""
    lines: list[int | None] = []

    def local(frame: types.FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            lines.append(frame.f_lineno)
        return local

    def global_(frame: types.FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    old = sys.gettrace()
    sys.settrace(global_)
    try:
        case.run(code)
    finally:
        sys.settrace(old)
    return lines


def line_at(code: types.CodeType) -> dict[int, int | None]:
    out: dict[int, int | None] = {}
    for start, end, line in code.co_lines():
        for unit in range(start, end, 2):
            out[unit] = line
    return out


class Hit:
    """A counting hit that also records the probed frame's line when it runs."""

    def __init__(self) -> None:
        self.n = 0
        self.lines: set[int | None] = set()

    def make(self) -> Callable[[], None]:
        def hit() -> None:
            self.n += 1
            self.lines.add(sys._getframe(1).f_lineno)

        return hit


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module", autouse=True)
def _close_loop() -> Iterator[None]:
    yield
    while _loop:
        _loop.pop().close()


@dataclass
class Prepared:
    observed: Any
    counts: collections.Counter[int]
    instrs: tuple[Insn, ...]
    entry: int
    lines: dict[int, int | None]


_prepared: dict[str, Prepared] = {}


def prepare(case: Case) -> Prepared:
    if case.name not in _prepared:
        observed, counts = count_instructions(case)
        instrs = decode(case.code)
        entry = entry_index(instrs)
        _prepared[case.name] = Prepared(observed, counts, instrs, entry, line_at(case.code))
    return _prepared[case.name]


def expected_count(p: Prepared, index: int) -> int:
    return p.counts[ENTRY] if index <= p.entry else p.counts[p.instrs[index].start]


def expected_line(p: Prepared, index: int) -> int | None:
    # An entry hit carries the location of the first instruction after the prologue.
    target = p.instrs[p.entry + 1] if index <= p.entry else p.instrs[index]
    return p.lines[target.start]


def accepted(case: Case, p: Prepared) -> list[int]:
    return [
        i for i, ins in enumerate(p.instrs) if ARCH.check_optimizable(case.code, ins.start) is None
    ]


def traced(case: Case, p: Prepared) -> list[int]:
    """The accepted sites, for the tests that compare what a tracer sees. Not the
    END_ASYNC_FOR of 3.13, which CPython never instruments for 'line' events
    (instrumentation.c initialize_lines: it cannot start a line) while a call sequence
    before it can: once the code has grown enough for jumps near it to take an
    EXTENDED_ARG (every site of the `coroutine` case probed), a tracer sees one more
    'line' event as an `async for` ends. Found with the larger loads of callees.py; the
    hits there are still counted exactly (test_all_accepted_offsets_at_once)."""
    skip = {"END_ASYNC_FOR"} if sys.version_info >= (3, 13) else set()
    return [i for i in accepted(case, p) if p.instrs[i].opname not in skip]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_original_is_deterministic(case: Case) -> None:
    p = prepare(case)
    assert case.run(case.code) == p.observed


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_every_accepted_offset(case: Case) -> None:
    p = prepare(case)
    failures = []
    for index in accepted(case, p):
        ins = p.instrs[index]
        hit = Hit()
        new = ARCH.build(case.code, {ins.start: hit.make()}, {}).code
        for _ in range(case.repeat):
            got = case.run(new)
            if got != p.observed:
                failures.append((ins.start, ins.opname, "behaviour", got))
                break
        else:
            want = expected_count(p, index) * case.repeat
            if hit.n != want:
                failures.append((ins.start, ins.opname, f"hits {hit.n} != {want}"))
            want_line = expected_line(p, index)
            if hit.n and hit.lines != {want_line}:
                failures.append((ins.start, ins.opname, f"f_lineno {hit.lines} != {want_line}"))
    assert not failures


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_all_accepted_offsets_at_once(case: Case) -> None:
    p = prepare(case)
    chosen = accepted(case, p)
    hits = {p.instrs[i].start: Hit() for i in chosen}
    new = ARCH.build(case.code, {off: h.make() for off, h in hits.items()}, {}).code
    for _ in range(case.repeat):
        assert case.run(new) == p.observed
    # Several prologue offsets share the entry: each runs once per entry.
    wrong = {
        p.instrs[i].start: (hits[p.instrs[i].start].n, expected_count(p, i) * case.repeat)
        for i in chosen
        if hits[p.instrs[i].start].n != expected_count(p, i) * case.repeat
    }
    assert not wrong


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_line_events_unchanged(case: Case) -> None:
    p = prepare(case)
    chosen = traced(case, p)
    new = ARCH.build(case.code, {p.instrs[i].start: NOOP for i in chosen}, {}).code
    assert line_events(case, new) == line_events(case, case.code)


def assert_locations_kept(code: types.CodeType, new: types.CodeType) -> None:
    """Every original instruction keeps its positions and line in `new`; every injected
    instruction has the positions of the original instruction it precedes."""
    old_pos = list(code.co_positions())
    new_pos = list(new.co_positions())
    old_lines = line_at(code)
    new_lines = line_at(new)
    new_instrs = decode(new)
    # The hit is loaded by name (arch/rewrite/callees.py): LOAD_GLOBAL, LOAD_ATTR func.
    pattern = [name for op, _ in SEQUENCE.ops
               for name in (("LOAD_GLOBAL", "LOAD_ATTR") if op == "LOAD_CONST" else (op,))]
    width = len(pattern)

    def injected_at(j: int) -> bool:
        # A call sequence: the sequence's opnames, its LOAD_GLOBAL loading a hit's name.
        run = new_instrs[j : j + width]
        return [x.opname for x in run] == pattern and any(
            x.opname == "LOAD_GLOBAL" and new.co_names[x.arg >> 1] in callees.names_of(new)
            for x in run
        )

    j = 0
    for ins in decode(code):
        injected = []
        while injected_at(j):
            injected += new_instrs[j : j + width]
            j += width
        cand = new_instrs[j]
        assert cand.opname == ins.opname, (ins, cand)
        # The entry sequence after RESUME also precedes the first body instruction.
        for x in injected:
            for unit in range(x.start, x.end, 2):
                assert new_pos[unit // 2] == old_pos[ins.start // 2], (x, ins)
                assert new_lines[unit] == old_lines[ins.start], (x, ins)
        for unit in range(0, ins.end - ins.start, 2):
            old_unit, new_unit = ins.start + unit, cand.start + unit
            assert new_pos[new_unit // 2] == old_pos[old_unit // 2], (ins, cand)
            assert new_lines[new_unit] == old_lines[old_unit], (ins, cand)
        j += 1
    assert j == len(new_instrs) or all(injected_at(k) for k in range(j, len(new_instrs), width))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_locations_kept(case: Case) -> None:
    p = prepare(case)
    chosen = accepted(case, p)
    new = ARCH.build(case.code, {p.instrs[i].start: NOOP for i in chosen}, {}).code
    assert_locations_kept(case.code, new)


def every_code(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from every_code(const)


def test_locations_kept_in_stdlib_modules() -> None:
    import inspect
    import json.decoder
    import textwrap

    count = 0
    for module in (textwrap, json.decoder, inspect):
        assert module.__spec__ is not None and module.__spec__.loader is not None
        module_code = module.__spec__.loader.get_code(module.__name__)  # type: ignore[attr-defined]
        for code in every_code(module_code):
            ok = [
                i.start for i in decode(code) if ARCH.check_optimizable(code, i.start) is None
            ]
            assert_locations_kept(code, ARCH.build(code, {o: (lambda: None) for o in ok}, {}).code)
            count += 1
    assert count > 100


def test_locations_kept_without_debug_ranges() -> None:
    """Under -X no_debug_ranges the location table has lines but no columns."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    program = (
        "import sys\n"
        f"sys.path[:0] = [{str(root / 'src')!r}, {str(root)!r}]\n"
        "from tests.arch.test_rewrite_corpus import test_locations_kept_in_stdlib_modules as t\n"
        "t()\nprint('OK')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "no_debug_ranges", "-c", program],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.strip() == "OK", proc.stderr


def test_corpus_covers_every_version_quirk() -> None:
    """The corpus really contains the instructions the refusal rules are about."""
    seen = {ins.opname for case in CASES for ins in decode(case.code)}
    for opname in ("SEND", "YIELD_VALUE", "RESUME", "FOR_ITER", "CALL", "BINARY_OP", "STORE_FAST"):
        assert opname in seen
    if "KW_NAMES" in dis.opmap:
        assert "KW_NAMES" in seen
    if "END_FOR" in dis.opmap:
        assert "END_FOR" in seen
    if "CLEANUP_THROW" in dis.opmap:
        assert "CLEANUP_THROW" in seen
    # Those 3.14 and 3.15 brought (TEMPLATES is there wherever t-strings are).
    for opname in (
        "LOAD_FAST_BORROW",
        "LOAD_FAST_BORROW_LOAD_FAST_BORROW",
        "LOAD_SMALL_INT",
        "LOAD_SPECIAL",
        "LOAD_COMMON_CONSTANT",
        "CALL_KW",
        "NOT_TAKEN",
        "POP_ITER",
        "END_SEND",
        "END_ASYNC_FOR",
        "BUILD_TEMPLATE",
        "BUILD_INTERPOLATION",
    ):
        if opname in dis.opmap:
            assert opname in seen, opname
    if "BUILD_TEMPLATE" in dis.opmap:
        assert TEMPLATES


def iter_cases() -> Iterator[Case]:
    yield from CASES
