"""trace/fetchargs.py: every fetcharg form, compiled once, fetched from real frames.

A fetch is given a `Regs` of a live frame: the test's own helper functions build one with
`sys._getframe()` where the probe would fire, and the last tests register real probes.
"""

from __future__ import annotations

import _thread
import builtins
import sys
import threading
from types import CodeType, FrameType
from typing import Any

import pytest

import pykprobes as kp  # the API the probes use, served lazily (PEP 562)
from pykprobes import grammar
from pykprobes.core.regs import Regs
from pykprobes.errors import ParseError
from pykprobes.trace.fetchargs import (
    FAULT,
    UNKNOWN_COMM,
    Fetcher,
    compile_fetcharg,
    compile_fetchargs,
    frame_name,
    thread_name,
)
from pykprobes.trace.safe import Opaque
from tests.trace.test_grammar_errors import CASES

CALLS: list[str] = []


@pytest.fixture(autouse=True)
def _no_calls() -> Any:
    CALLS.clear()
    yield
    CALLS.clear()


def regs_of(frame: FrameType, retval: Any = None, exc: BaseException | None = None) -> Regs:
    regs = Regs(frame, 0)
    regs.retval = retval
    regs.exception = exc
    return regs


def fetcher(
    arg: str, *, is_return: bool = False, code: CodeType | None = None, type_name: str | None = None
) -> Fetcher:
    """Compile `arg` (a body) as the third word of a definition."""
    text = f"p mod:func {arg}" + (f":{type_name}" if type_name else "")
    return compile_fetcharg(arg, type_name, is_return=is_return, text=text, pos=11, code=code)


def parse_error(
    arg: str, *, is_return: bool = False, code: CodeType | None = None, type_name: str | None = None
) -> tuple[str, int]:
    with pytest.raises(ParseError) as info:
        fetcher(arg, is_return=is_return, code=code, type_name=type_name)
    return info.value.code, info.value.pos - 11


# ------------------------------------------------------------------------------ targets


class Request:
    def __init__(self) -> None:
        self.headers = {"Host": "example.org", "Accept": "*/*"}
        self.items = [Item("first"), Item("second")]
        self.meta = {"ids": (7, 8, 9), 3: "three"}

    @property
    def url(self) -> str:
        CALLS.append("url property")
        return "http://example.org/"


class Item:
    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, name: str) -> Any:
        CALLS.append(f"__getattr__ {name}")
        return 0


def handler_like(req: Request, count: int, *rest: Any, flag: bool = True, **options: Any) -> Regs:
    """A probed function: the Regs as a probe at its current line would see it."""
    total = count * 2
    captured = "cell"

    def inner() -> str:
        return captured

    assert total and inner()
    return regs_of(sys._getframe())


def before_binding(value: int) -> tuple[Any, ...]:
    regs = regs_of(sys._getframe())
    before = fetcher("later")(regs), fetcher("value")(regs)
    later = value
    return (*before, fetcher("later")(regs)) if later else ()


HANDLER_CODE = handler_like.__code__


@pytest.fixture
def regs() -> Regs:
    return handler_like(Request(), 21, "extra", flag=False, opt=1)


# -------------------------------------------------------------------------------- forms


def test_locals_and_arguments(regs: Regs) -> None:
    assert fetcher("count")(regs) == 21
    assert fetcher("total")(regs) == 42
    assert fetcher("$arg:count")(regs) == 21
    assert fetcher("flag")(regs) is False
    assert fetcher("rest")(regs).startswith("<tuple at 0x")
    assert fetcher("captured")(regs) == "cell"  # a cell variable
    assert fetcher("nothing")(regs) is FAULT


def test_argn_in_code_order(regs: Regs) -> None:
    # co_varnames order: positional, keyword-only, *args, **kwargs.
    assert fetcher("$arg1")(regs).startswith("<Request at 0x")
    assert fetcher("$arg2")(regs) == 21
    assert fetcher("$arg3")(regs) is False  # flag
    assert fetcher("$arg4")(regs).startswith("<tuple at")  # *rest
    assert fetcher("$arg5")(regs).startswith("<dict at")  # **options
    assert fetcher("$arg6")(regs) is FAULT  # beyond, found at the hit
    # With the code known, resolved at compile time.
    assert fetcher("$arg2", code=HANDLER_CODE)(regs) == 21
    assert fetcher("$arg5", code=HANDLER_CODE, type_name="len")(regs) == 1


def test_argn_follows_the_frame_code() -> None:
    f = fetcher("$arg1")

    def one(a: int) -> Regs:
        return regs_of(sys._getframe())

    def two(b: str) -> Regs:
        return regs_of(sys._getframe())

    assert f(one(1)) == 1
    assert f(two("b")) == "b"
    assert f(one(3)) == 3


def test_unbound_local_is_a_fault() -> None:
    assert before_binding(5) == (FAULT, 5, 5)


def test_chains(regs: Regs) -> None:
    assert fetcher('req.headers["Host"]')(regs) == "example.org"
    assert fetcher("req.headers['Accept']")(regs) == "*/*"
    assert fetcher("req.items[0].name")(regs) == "first"
    assert fetcher("req.items[-1].name")(regs) == "second"
    assert fetcher('req.meta["ids"][2]')(regs) == 9
    assert fetcher("req.meta[3]")(regs) == "three"
    assert fetcher("$arg1.headers[ 'Host' ]")(regs) == "example.org"
    assert fetcher("$arg:req.items[1].name", type_name="len")(regs) == 6


def test_chain_faults_without_running_code(regs: Regs) -> None:
    assert fetcher("req.url")(regs) is FAULT  # a property
    assert fetcher("req.items[0].missing")(regs) is FAULT  # __getattr__ not called
    assert fetcher('req.headers["Nope"]')(regs) is FAULT
    assert fetcher("req.items[5].name")(regs) is FAULT
    assert fetcher("req.items.name")(regs) is FAULT
    assert fetcher("count.real.imag")(regs) == 0
    assert fetcher("nothing.at.all")(regs) is FAULT
    assert CALLS == []


def test_retval() -> None:
    frame = sys._getframe()
    f = fetcher("$retval", is_return=True)
    assert f(regs_of(frame, retval=5)) == 5
    assert f(regs_of(frame, retval=None)) is None
    assert f(regs_of(frame, exc=ValueError())) is FAULT  # the call raised: no value
    chained = fetcher("$retval.headers['Host']", is_return=True)
    assert chained(regs_of(frame, retval=Request())) == "example.org"
    assert parse_error("$retval") == ("RETVAL_ON_PROBE", 0)


def outer() -> tuple[Regs, int]:
    return middle()


def middle() -> tuple[Regs, int]:
    return inner()


def inner() -> tuple[Regs, int]:
    frame: FrameType | None = sys._getframe()
    depth = 0
    while frame is not None:
        depth += 1
        frame = frame.f_back
    return regs_of(sys._getframe()), depth


def test_stack_on_a_call_chain() -> None:
    regs, depth = outer()
    assert fetcher("$stack0")(regs) == f"{__name__}:inner"
    assert fetcher("$stack1")(regs) == f"{__name__}:middle"
    assert fetcher("$stack2")(regs) == f"{__name__}:outer"
    assert fetcher("$stack3")(regs) == f"{__name__}:test_stack_on_a_call_chain"
    assert isinstance(fetcher("$stack1")(regs), Opaque)
    assert fetcher("$stack")(regs) == depth
    assert fetcher(f"$stack{depth - 1}")(regs) is not FAULT
    assert fetcher(f"$stack{depth}")(regs) is FAULT
    assert fetcher("$stack", type_name="x")(regs) == depth
    assert fetcher("$stack1", type_name="len")(regs) == len(f"{__name__}:middle")


def test_frame_name_of_module_code() -> None:
    namespace: dict[str, Any] = {"__name__": "made.up", "sys": sys}
    exec(compile("frame = sys._getframe()", "<made-up>", "exec"), namespace)
    assert frame_name(namespace["frame"]) == "made.up:<module>"
    namespace = {"sys": sys}
    exec(compile("frame = sys._getframe()", "<made-up>", "exec"), namespace)
    assert frame_name(namespace["frame"]) == "?:<module>"  # exec adds __builtins__ only
    namespace = {"__name__": 5, "sys": sys}
    exec(compile("frame = sys._getframe()", "<made-up>", "exec"), namespace)
    assert frame_name(namespace["frame"]) == "?:<module>"


def test_module_and_class_bodies_read_their_namespace() -> None:
    namespace: dict[str, Any] = {"sys": sys}
    exec(compile("value = 3\nframe = sys._getframe()", "<m>", "exec"), namespace)
    code = namespace["frame"].f_code
    f = compile_fetcharg("value", None, is_return=False, text="p m:<module> value", pos=13,
                         code=code)  # fmt: skip
    assert f(regs_of(namespace["frame"])) == 3
    assert parse_error("$arg1", code=code) == ("NO_BTFARG", 0)

    class Prepared(type):
        @classmethod
        def __prepare__(mcs, name: str, bases: tuple[type, ...], /, **kw: Any) -> Any:
            class Namespace(dict[str, Any]):
                pass

            return Namespace()

    seen: list[Regs] = []

    class Body(metaclass=Prepared):
        attr = 5
        seen.append(regs_of(sys._getframe()))

    assert Body.attr == 5
    assert fetcher("attr")(seen[0]) == 5  # a dict subclass namespace: its storage


def test_comm_in_named_threads() -> None:
    assert fetcher("$comm")(regs_of(sys._getframe())) == threading.current_thread().name
    results: list[Any] = []

    def work() -> None:
        results.append(fetcher("$comm")(regs_of(sys._getframe())))
        results.append(fetcher("$COMM", type_name="string")(regs_of(sys._getframe())))

    thread = threading.Thread(target=work, name="worker-7")
    thread.start()
    thread.join()
    assert results == ["worker-7", "worker-7"]


def test_comm_does_not_run_a_thread_subclass_name_property() -> None:
    class Named(threading.Thread):
        @property
        def name(self) -> str:
            CALLS.append("name property")
            return "lie"

        @name.setter
        def name(self, value: str) -> None:
            self._name = value

    results: list[str] = []
    thread = Named(target=lambda: results.append(thread_name()), name="real")
    thread.start()
    thread.join()
    assert results == ["real"]
    assert CALLS == []


def test_comm_of_a_thread_threading_does_not_know() -> None:
    done = threading.Event()
    results: list[Any] = []

    def work() -> None:
        results.append(fetcher("$comm")(regs_of(sys._getframe())))
        results.append(_thread.get_ident() in threading._active)  # type: ignore[attr-defined]
        done.set()

    _thread.start_new_thread(work, ())
    assert done.wait(10)
    # No _DummyThread was made for it (current_thread() would).
    assert results == [UNKNOWN_COMM, False]


def test_immediates() -> None:
    frame = regs_of(sys._getframe())
    assert fetcher("\\123")(frame) == 123
    assert fetcher("\\-5")(frame) == -5
    assert fetcher("\\0x1f")(frame) == 31
    assert fetcher("\\1.5")(frame) == 1.5
    assert fetcher('\\"some text"')(frame) == "some text"
    assert fetcher("\\'single'")(frame) == "single"
    assert fetcher("\\0x1f", type_name="x")(frame) == 31
    assert str(fetcher("\\0x1f", type_name="x")(frame)) == "0x1f"
    assert fetcher("\\1.9", type_name="int")(frame) == 1
    assert fetcher("\\5").constant == 5
    assert not fetcher("\\5").needs_locals


def test_fetcher_never_raises() -> None:
    class Broken:
        @property
        def f_locals(self) -> Any:
            raise RuntimeError("no locals")

        @property
        def f_back(self) -> Any:
            raise RuntimeError("no back")

        @property
        def f_code(self) -> Any:
            raise RuntimeError("no code")

    regs = Regs(Broken(), 0)  # type: ignore[arg-type]
    for arg in ("x", "x.y", "$arg1", "$stack", "$stack2"):
        assert fetcher(arg)(regs) is FAULT
    assert fetcher("$comm")(regs) == threading.current_thread().name
    definition = grammar.parse("p m:f x y")
    assert isinstance(definition, grammar.ProbeDef)
    fetch_all = compile_fetchargs(definition.args, is_return=False, text=definition.text)
    assert fetch_all(regs) == (FAULT, FAULT)


# -------------------------------------------------------------------------- validation


def test_names_checked_against_the_code() -> None:
    # The kernel's NO_BTFARG "This variable is not found at this probe point": a name the
    # code does not have, an $argN beyond its parameters (BAD_ARG_NUM is for N outside
    # 1..128, found without the code).
    assert parse_error("nothing", code=HANDLER_CODE) == ("NO_BTFARG", 0)
    assert parse_error("$arg:nothing", code=HANDLER_CODE) == ("NO_BTFARG", 0)
    assert parse_error("$arg6", code=HANDLER_CODE) == ("NO_BTFARG", 0)
    assert parse_error("nothing.attr", code=HANDLER_CODE) == ("NO_BTFARG", 0)
    for name in ("req", "total", "captured", "rest", "options", "inner"):
        fetcher(name, code=HANDLER_CODE)

    def closure() -> Any:
        return HANDLER_CODE, fetcher  # free variables? no: globals

    captured = 1

    def uses_free() -> int:
        return captured

    fetcher("captured", code=uses_free.__code__)  # a free variable
    assert parse_error("HANDLER_CODE", code=closure.__code__) == ("NO_BTFARG", 0)


# The rows of the grammar's error table that are about one fetcharg, the first of the
# definition (its other rows need the whole definition).
ONE_ARG_CASES = [
    (case, code)
    for case, code in CASES
    if case[:8] in ("p mod:f ", "r mod:f ")
    and "^" in case[8:]
    and code not in ("TOO_MANY_ARGS", "DOUBLE_ARGS")
    and not (code == "USED_ARG_NAME" and " " in case[8:])
]


@pytest.mark.parametrize(("case", "code"), ONE_ARG_CASES)
def test_compile_reports_the_grammars_errors(case: str, code: str) -> None:
    """compile_fetcharg has the grammar parse the fetcharg (there is no other parser): the
    grammar's error, at the column of the grammar's table."""
    text, pos = case.replace("^", ""), case.index("^")
    with pytest.raises(ParseError) as info:
        compile_fetcharg(text[8:], None, is_return=case[0] == "r", text=text, pos=8)
    assert (info.value.code, info.value.pos, info.value.text) == (code, pos, text)


def test_bad_bodies_through_the_helper() -> None:
    """Columns are those of `text`, the body at 11 here."""
    assert parse_error("x.1bad") == ("BAD_FETCH_ARG", 2)
    assert parse_error("$arg0") == ("BAD_ARG_NUM", 0)
    assert parse_error('\\"open') == ("IMMSTR_NO_CLOSE", 6)
    assert parse_error("") == ("NO_ARG_BODY", 0)
    # A colon in the body is the grammar's type separator, as in any definition: `y` is an
    # unknown type (fetchargs' own parser used to call this a bad body at the colon).
    assert parse_error("x:y") == ("BAD_TYPE", 2)


def test_body_and_type_must_be_those_of_the_text() -> None:
    with pytest.raises(ValueError, match="holds 'x':int"):
        compile_fetcharg("y", None, is_return=False, text="p m:f x:int", pos=6)
    with pytest.raises(ValueError):
        compile_fetcharg("x", "str", is_return=False, text="p m:f x:int", pos=6)


BAD_TYPES = [
    ("x", "number", "BAD_TYPE"),
    ("x", "u32", "BAD_TYPE"),
    ("$comm", "int", "NEED_STRING_TYPE"),
    ("$comm", "len", "NEED_STRING_TYPE"),
    ('\\"text"', "int", "NEED_STRING_TYPE"),
    ("\\1.5", "x", "BAD_TYPE"),
    ("\\5", "len", "BAD_TYPE"),
    ("$stack", "len", "BAD_TYPE"),
    ("$stack1", "int", "BAD_TYPE"),
]


@pytest.mark.parametrize(("body", "type_name", "code"), BAD_TYPES)
def test_bad_types(body: str, type_name: str, code: str) -> None:
    # The error points at the type, after the colon.
    assert parse_error(body, type_name=type_name) == (code, len(body) + 1)


def test_positions_with_a_name() -> None:
    text = "p mod:func first=x second=req.1bad:int"
    with pytest.raises(ParseError) as info:
        compile_fetcharg("req.1bad", "int", is_return=False, text=text, pos=19)
    assert info.value.code == "BAD_FETCH_ARG"
    assert info.value.pos == text.index("1bad")
    with pytest.raises(ParseError) as info:
        compile_fetcharg("x", "nope", is_return=False, text="p m:f n=x:nope", pos=6)
    assert info.value.pos == len("p m:f n=x:")


def test_keys_are_ints_and_quoted_strings() -> None:
    """The grammar's KEY (test_grammar_errors: None, True, 2.5 and b'k' are BAD_FETCH_ARG)."""
    frame = regs_of(sys._getframe())
    table = {"a b": "space", 0x10: "hex", -2: "negative", None: "none"}  # noqa: F841
    assert fetcher("table['a b']")(frame) == "space"
    assert fetcher('table[ "a b" ]')(frame) == "space"
    assert fetcher("table[0x10]")(frame) == "hex"
    assert fetcher("table[-2]")(frame) == "negative"
    assert parse_error("table[None]") == ("BAD_FETCH_ARG", 6)
    assert parse_error("table[b'\u00e9']") == ("BAD_FETCH_ARG", 6)


# ------------------------------------------------------------------------- consistency


def test_compile_fetchargs_from_grammar_records(regs: Regs) -> None:
    definition = grammar.parse(
        "p tests.trace.test_fetchargs:handler_like req.headers['Host'] n=count:x "
        "$arg1:type total:str \\7 $stack0"
    )
    assert isinstance(definition, grammar.ProbeDef)
    fetch_all = compile_fetchargs(definition.args, is_return=False, text=definition.text)
    values = fetch_all(regs)
    assert values == ("example.org", 21, "Request", "42", 7, f"{__name__}:handler_like")
    assert str(values[1]) == "0x15"


def test_compile_fetchargs_errors_carry_the_columns() -> None:
    definition = grammar.parse("p tests.trace.test_fetchargs:handler_like count nothing")
    assert isinstance(definition, grammar.ProbeDef)
    with pytest.raises(ParseError) as info:
        compile_fetchargs(definition.args, is_return=False, text=definition.text,
                          code=HANDLER_CODE)  # fmt: skip
    assert info.value.code == "NO_BTFARG"
    assert info.value.pos == definition.text.index("nothing")


class _Spec:
    """A FetchArgSpec that is not the grammar's record: body, type and column only."""

    def __init__(self, body: str, pos: int, type_name: str | None = None) -> None:
        self.body = body
        self.pos = pos
        self.type = type_name


@pytest.mark.parametrize("count", [0, 1, 2, 3, 5])
def test_compile_fetchargs_any_count(regs: Regs, count: int) -> None:
    bodies = ["count", "total", "$stack0", "\\1", "flag"][:count]
    text = "p m:f " + " ".join(bodies)
    definition = grammar.parse(text)
    assert isinstance(definition, grammar.ProbeDef)
    specs, pos = [], 6
    for body in bodies:
        specs.append(_Spec(body, pos))
        pos += len(body) + 1
    expected = (21, 42, f"{__name__}:handler_like", 1, False)[:count]
    assert compile_fetchargs(definition.args, is_return=False, text=text)(regs) == expected
    # Specs are parsed by the grammar at their column, to the same fetchers.
    assert compile_fetchargs(specs, is_return=False, text=text)(regs) == expected
    if count:
        with pytest.raises(ValueError):
            compile_fetchargs([_Spec("other", 6)], is_return=False, text=text)


def test_compile_fetchargs_reads_f_locals_once(regs: Regs) -> None:
    reads: list[int] = []

    class Frame:
        f_code = regs.frame.f_code
        f_back = None

        @property
        def f_locals(self) -> Any:
            reads.append(1)
            return {"count": 1, "total": 2, "flag": 3}

    fake = Regs(Frame(), 0)  # type: ignore[arg-type]
    for text, values, expected_reads in [
        ("p m:f count", (1,), [1]),
        ("p m:f count total", (1, 2), [1]),
        ("p m:f count total flag", (1, 2, 3), [1]),
        ("p m:f \\1", (1,), []),  # nothing to read: f_locals untouched
    ]:
        definition = grammar.parse(text)
        assert isinstance(definition, grammar.ProbeDef)
        reads.clear()
        assert compile_fetchargs(definition.args, is_return=False, text=text)(fake) == values
        assert reads == expected_reads


# ----------------------------------------------------------------------- never evaluated


def test_no_eval_exec_or_compile(regs: Regs, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("evaluated")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    monkeypatch.setattr(builtins, "compile", forbidden)
    args = [
        "count",
        "$arg1.headers['Host']",
        "req.items[0].name",
        "\\1.5",
        "\\'t'",
        "$stack1",
        "$comm",
        "req.meta[3]",
        "$arg:count",
    ]
    fetchers = [fetcher(a) for a in args]
    fetchers += [fetcher("count", type_name=t) for t in ("int", "float", "str", "bool", "x")]
    fetchers += [fetcher("req", type_name=t) for t in ("repr", "type", "len")]
    values = [f(regs) for f in fetchers]
    assert values[:3] == [21, "example.org", "first"]
    assert FAULT not in values[:9]


# ------------------------------------------------------------------------- real probes


def probed(req: Request, count: int) -> int:
    local = count + 1
    return local * 2


def test_with_a_real_probe() -> None:
    definition = grammar.parse(
        "p tests.trace.test_fetchargs:probed req.headers['Host'] count req.url $stack1 $comm"
    )
    assert isinstance(definition, grammar.ProbeDef)
    code = probed.__code__
    fetch_all = compile_fetchargs(definition.args, is_return=False, text=definition.text,
                                  code=code)  # fmt: skip
    records: list[tuple[Any, ...]] = []
    probe = kp.Kprobe(
        symbol_name="tests.trace.test_fetchargs:probed",
        pre_handler=lambda p, regs: records.append(fetch_all(regs)),
    )
    kp.register_kprobe(probe)
    try:
        kp.wait_for_kprobe_optimizer()
        assert probed(Request(), 4) == 10
    finally:
        kp.unregister_kprobe(probe)
    assert records == [
        ("example.org", 4, FAULT, f"{__name__}:test_with_a_real_probe", "MainThread")
    ]
    assert CALLS == []


def test_with_a_real_return_probe() -> None:
    definition = grammar.parse("r tests.trace.test_fetchargs:probed $retval local:x $arg2")
    assert isinstance(definition, grammar.ProbeDef)
    fetch_all = compile_fetchargs(definition.args, is_return=True, text=definition.text,
                                  code=probed.__code__)  # fmt: skip
    records: list[tuple[Any, ...]] = []
    probe = kp.Kretprobe(
        symbol_name="tests.trace.test_fetchargs:probed",
        handler=lambda ri, regs: records.append(fetch_all(regs)),
    )
    kp.register_kretprobe(probe)
    try:
        kp.wait_for_kprobe_optimizer()
        assert probed(Request(), 4) == 10
        with pytest.raises(TypeError):
            probed(Request(), "4")  # type: ignore[arg-type]
    finally:
        kp.unregister_kretprobe(probe)
    assert records[0] == (10, 5, 4)
    assert str(records[0][1]) == "0x5"
    assert records[1] == (FAULT, FAULT, "4")  # raised: no retval; `local` never bound
