"""The sys.monitoring breakpoint arch (pykprobes.arch.monitoring), CPython 3.12+."""

from __future__ import annotations

import dis
import errno
import sys
import threading
import time
from types import CodeType, FrameType
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not hasattr(sys, "monitoring"), reason="sys.monitoring needs 3.12+")

from pykprobes.core.regs import probed_frame  # noqa: E402
from pykprobes.errors import KprobeError  # noqa: E402

if hasattr(sys, "monitoring"):
    from pykprobes.arch.monitoring import PENDING_CAP, MonitoringArch
    from pykprobes.insn import entry_offset as prologue_end

    M: Any = sys.monitoring
    E: Any = M.events


#: The instructions that return from a frame (RETURN_CONST: 3.12, 3.13).
RETURNS = ("RETURN_VALUE", "RETURN_CONST")


def return_offsets(fn: Any) -> list[int]:
    """The offsets of fn's return instructions, in order."""
    return [i.offset for i in dis.get_instructions(fn) if i.opname in RETURNS]


def binary_op(fn: Any, argrepr: str) -> int:
    """The offset of fn's first BINARY_OP `argrepr` ("+"; 3.14 made subscripts BINARY_OP
    too, so "the first BINARY_OP" is no longer the arithmetic one)."""
    ops = dis.get_instructions(fn)
    return next(i.offset for i in ops if i.opname == "BINARY_OP" and i.argrepr == argrepr)


def offset_of(fn: Any, opname: str, argval: object = ..., nth: int = 0) -> int:
    """The address (first EXTENDED_ARG prefix included) of the nth `opname` in fn."""
    code = fn if isinstance(fn, CodeType) else fn.__code__
    found = []
    prefix = None
    for ins in dis.get_instructions(code):
        if ins.opname == "EXTENDED_ARG":
            prefix = ins.offset if prefix is None else prefix
            continue
        if ins.opname == opname and (argval is ... or ins.argval == argval):
            found.append(ins.offset if prefix is None else prefix)
        prefix = None
    return found[nth]


class Recorder:
    """pre/post callbacks that record (kind, offset, a copy of the locals)."""

    def __init__(self, with_locals: bool = True) -> None:
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        self.frames: list[FrameType] = []
        self.lock = threading.Lock()
        self.with_locals = with_locals
        self.npre = 0
        self.npost = 0

    def pre(self, frame: FrameType | None, offset: int) -> None:
        frame = frame or probed_frame(sys._getframe(0))
        with self.lock:
            self.npre += 1
            if self.with_locals:
                self.events.append(("pre", offset, dict(frame.f_locals)))
                self.frames.append(frame)

    def post(self, frame: FrameType, offset: int) -> None:
        with self.lock:
            self.npost += 1
            if self.with_locals:
                self.events.append(("post", offset, dict(frame.f_locals)))


@pytest.fixture
def arch() -> Any:
    a = MonitoringArch()
    yield a
    a.close()


def fresh(src: str, name: str, filename: str = "<probed>") -> Any:
    ns: dict[str, Any] = {}
    exec(compile(src, filename, "exec"), ns)
    return ns[name]


LOOP_SRC = """
def f(n):
    t = 0
    for i in range(n):
        t += i
    return t
"""


# ---------------------------------------------------------------- tool ids


def free_tools() -> list[int]:
    return [t for t in range(6) if M.get_tool(t) is None]


def test_claims_tool_4_then_3_and_close_frees_it() -> None:
    # The core may hold one already (a live MonitoringArch of the registry): expect the
    # first free one of (4, 3).
    wanted = [t for t in (4, 3) if M.get_tool(t) is None]
    if not wanted:
        pytest.skip("capability: sys.monitoring tools 4 and 3 are both held by another tool")
    a = MonitoringArch()
    try:
        assert a.tool == wanted[0]
        assert M.get_tool(a.tool) == "pykprobes"
        if len(wanted) == 2:
            b = MonitoringArch()
            try:
                assert b.tool == 3
            finally:
                b.close()
            assert M.get_tool(3) is None
    finally:
        a.close()
    assert M.get_tool(wanted[0]) is None
    a.close()  # idempotent


def test_ebusy_when_tools_4_and_3_are_taken() -> None:
    mine = [t for t in (4, 3) if M.get_tool(t) is None]
    for t in mine:
        M.use_tool_id(t, f"someone-else-{t}")
    try:
        with pytest.raises(KprobeError) as info:
            MonitoringArch()
        assert info.value.errno == errno.EBUSY
        for t in (4, 3):
            assert repr(M.get_tool(t)) in str(info.value)
    finally:
        for t in mine:
            M.free_tool_id(t)
    if mine:
        a = MonitoringArch()  # free again
        a.close()


# ---------------------------------------------------------------- hits


def test_hit_count_equals_executions(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "BINARY_OP")  # t += i: runs once per iteration
    rec = Recorder(with_locals=False)
    arch.arm(f.__code__, off, rec.pre, None)
    expected = 0
    for n in (0, 1, 7, 100, 3):
        f(n)
        expected += n
    assert rec.npre == expected


def test_pre_gets_the_probed_frame_and_the_armed_offset(arch: Any) -> None:
    """Without a post-handler the arch passes no frame (a frame object costs as much as the
    handler call): the probed frame is the one above the arch's callback, which the core
    steps over (core/regs.py CALLBACK_CODES)."""
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)
    seen: list[tuple[bool, int, int]] = []

    def pre(frame: FrameType | None, offset: int) -> None:
        assert frame is None
        frame = probed_frame(sys._getframe(0))
        seen.append((frame.f_code is f.__code__, offset, frame.f_lasti))

    arch.arm(f.__code__, off, pre, None)
    f(2)
    assert seen == [(True, off, off), (True, off, off)]
    assert arch.nfailures == 0


def test_pre_gets_the_frame_when_a_post_handler_needs_it(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)
    seen: list[str] = []

    def pre(frame: FrameType | None, offset: int) -> None:
        assert frame is not None
        seen.append(f"pre {frame.f_code is f.__code__}")

    arch.arm(f.__code__, off, pre, lambda fr, o: seen.append(f"post {fr.f_code is f.__code__}"))
    f(1)
    assert seen == ["pre True", "post True"] and arch.nfailures == 0


def test_several_offsets_in_one_code_fire_in_order(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    offs = [
        offset_of(f, "STORE_FAST", "t", nth=0),
        offset_of(f, "BINARY_OP"),
        offset_of(f, "RETURN_VALUE"),
    ]
    order: list[int] = []
    for off in offs:
        arch.arm(f.__code__, off, lambda fr, o: order.append(o), None)
    f(2)
    assert order == [offs[0], offs[1], offs[1], offs[2]]


def test_other_code_is_not_taxed(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    g = fresh(LOOP_SRC, "f", "<other>")
    arch.arm(f.__code__, offset_of(f, "BINARY_OP"), lambda fr, o: None, None)
    assert M.get_events(arch.tool) == 0  # no global event
    assert M.get_local_events(arch.tool, g.__code__) == 0
    assert M.get_local_events(arch.tool, f.__code__) == E.INSTRUCTION


#: Statements that compile to the instructions 3.13-3.15 added or changed: LOAD_FAST_BORROW*,
#: LOAD_SMALL_INT, LOAD_SPECIAL (with), BINARY_OP subscripts, CALL_KW, NOT_TAKEN, POP_ITER,
#: inlined comprehensions, handlers, f-strings and (3.14+) t-strings.
EVERY_SRC = """
import contextlib
def every(xs, k=2):
    t = 0
    d = {"a": 1}
    for i, x in enumerate(xs):
        if x % 2:
            t += x * k
        else:
            t -= d["a"]
    ys = [y + 1 for y in xs if y]
    with contextlib.nullcontext(5) as c:
        t += c
    try:
        {}["missing"]
    except KeyError as e:
        t += len(str(e))
    s = f"{t!r}:{k:>3}" + TSTRING
    z = dict(a=t, b=k)
    while t > 100:
        t //= 2
    return t, ys, s, z["a"], (lambda q: q * 2)(3)
"""


def _every() -> Any:
    """EVERY_SRC's function, with a template string (PEP 750) where this Python has them."""
    try:
        compile('t"{1}"', "<t-string>", "eval")
    except SyntaxError:
        tstring = '""'
    else:
        tstring = 'str(list(t"<{k}>"))'
    return fresh(EVERY_SRC.replace("TSTRING", tstring), "every")


def test_every_instruction_hits_as_often_as_it_runs(arch: Any) -> None:
    """A probe on each instruction after the prologue (END_FOR excepted: never runs with an
    event) hits exactly as often as a raw INSTRUCTION tool sees the instruction run."""
    every = _every()
    code = every.__code__
    args = ([1, 2, 3, 4, 5, 0],)
    seen: dict[int, int] = {}
    tool = free_tools()[-1]
    M.use_tool_id(tool, "test-reference")
    try:
        M.register_callback(
            tool, E.INSTRUCTION, lambda c, o: seen.__setitem__(o, seen.get(o, 0) + 1)
        )
        M.set_local_events(tool, code, E.INSTRUCTION)
        want = every(*args)
    finally:
        M.set_local_events(tool, code, 0)
        M.register_callback(tool, E.INSTRUCTION, None)
        M.free_tool_id(tool)
    hits: dict[int, int] = {}
    armed = []
    for ins in dis.get_instructions(code):
        if ins.offset > prologue_end(code) and ins.opname != "END_FOR":
            arch.arm(code, ins.offset, lambda fr, o: hits.__setitem__(o, hits.get(o, 0) + 1), None)
            armed.append(ins.offset)
    assert every(*args) == want
    assert hits == {o: n for o, n in seen.items() if o in armed}
    assert set(seen) - set(armed) <= {o for o in seen if o <= prologue_end(code)}


def test_not_an_instruction_boundary_is_einval(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    with pytest.raises(KprobeError) as info:
        arch.arm(f.__code__, offset_of(f, "BINARY_OP") + 2, lambda fr, o: None, None)
    assert info.value.errno == errno.EINVAL


def test_end_for_cannot_be_probed(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    with pytest.raises(KprobeError) as info:
        arch.arm(f.__code__, offset_of(f, "END_FOR"), lambda fr, o: None, None)
    assert info.value.errno == errno.EINVAL


def test_extended_arg_prefixed_instruction(arch: Any) -> None:
    src = (
        "def big(x):\n" + "".join(f"    v{i} = x + {i}\n" for i in range(300)) + "    return v299\n"
    )
    big = fresh(src, "big")
    off = offset_of(big, "STORE_FAST", "v280")
    assert dis.Bytecode(big).codeobj.co_code[off] == dis.opmap["EXTENDED_ARG"]
    rec = Recorder()
    arch.arm(big.__code__, off, rec.pre, rec.post)
    assert big(1) == 300
    assert big(2) == 301
    assert [(k, o) for k, o, _ in rec.events] == [("pre", off), ("post", off)] * 2
    assert "v280" not in rec.events[0][2] and rec.events[1][2]["v280"] == 281
    with pytest.raises(KprobeError):  # the real opcode after the prefix is no address
        arch.arm(big.__code__, off + 2, rec.pre, None)


# ---------------------------------------------------------------- entry (PY_START)


def test_entry_probe_uses_py_start(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    assert arch.uses_entry_event(f.__code__, 0)
    assert not arch.uses_entry_event(f.__code__, offset_of(f, "BINARY_OP"))
    rec = Recorder(with_locals=False)
    arch.arm(f.__code__, 0, rec.pre, None)
    assert M.get_local_events(arch.tool, f.__code__) == E.PY_START
    for n in range(5):
        f(n)
    assert rec.npre == 5


def test_entry_probe_in_a_closure_prologue(arch: Any) -> None:
    src = "def outer(a):\n    def inner():\n        return a\n    return inner\n"
    outer = fresh(src, "outer")
    inner = outer(5)
    for fn in (outer, inner):
        code = fn.__code__
        prologue = [i.offset for i in dis.get_instructions(code) if i.offset <= prologue_end(code)]
        assert len(prologue) >= 2  # MAKE_CELL / COPY_FREE_VARS, then RESUME
        for off in prologue:
            assert arch.uses_entry_event(code, off)
    seen: list[int] = []
    code = outer.__code__
    for off in [i.offset for i in dis.get_instructions(code) if i.offset <= prologue_end(code)]:
        arch.arm(code, off, lambda fr, o: seen.append(o), None)
    outer(1)
    assert sorted(seen) == [
        i.offset for i in dis.get_instructions(code) if i.offset <= prologue_end(code)
    ]


def test_generator_entry_fires_at_first_resumption(arch: Any) -> None:
    src = "def gen(n):\n    for i in range(n):\n        x = yield i\n    return n\n"
    gen = fresh(src, "gen")
    assert dis.get_instructions(gen).__next__().opname == "RETURN_GENERATOR"
    rec = Recorder(with_locals=False)
    arch.arm(gen.__code__, 0, rec.pre, None)
    g = gen(3)
    assert rec.npre == 0  # creating the generator is not its start
    next(g)
    assert rec.npre == 1
    assert list(g) == [1, 2]
    assert rec.npre == 1  # later resumptions are not PY_START


def test_coroutine_entry_fires_at_first_resumption(arch: Any) -> None:
    src = "async def coro(x):\n    return x + 1\n"
    coro = fresh(src, "coro")
    rec = Recorder(with_locals=False)
    arch.arm(coro.__code__, 0, rec.pre, None)
    c = coro(1)
    assert rec.npre == 0  # creating the coroutine is not its start
    with pytest.raises(StopIteration):
        c.send(None)
    assert rec.npre == 1


def test_resume_after_yield_uses_py_resume(arch: Any) -> None:
    src = "def gen(n):\n    for i in range(n):\n        x = yield i\n    return n\n"
    gen = fresh(src, "gen")
    resume = [i.offset for i in dis.get_instructions(gen) if i.opname == "RESUME"][1]
    assert not arch.uses_entry_event(gen.__code__, resume)
    rec = Recorder()
    arch.arm(gen.__code__, resume, rec.pre, rec.post)
    g = gen(3)
    next(g)
    g.send("a")
    g.send("b")
    with pytest.raises(StopIteration):
        g.send("c")
    assert rec.npre == 3 and rec.npost == 3
    # post runs at the STORE_FAST after RESUME: x not bound yet... then bound.
    assert [e[2].get("x") for e in rec.events if e[0] == "pre"] == [None, "a", "b"]


def test_entry_post_runs_at_the_first_instruction_after_the_prologue(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    rec = Recorder()
    arch.arm(f.__code__, 0, rec.pre, rec.post)
    f(1)
    assert [(k, o) for k, o, _ in rec.events] == [("pre", 0), ("post", 0)]


# ---------------------------------------------------------------- post


def test_post_sees_the_effect_of_store_fast(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)  # t += i
    rec = Recorder()
    arch.arm(f.__code__, off, rec.pre, rec.post)
    f(3)
    kinds = [(k, o) for k, o, _ in rec.events]
    assert kinds == [("pre", off), ("post", off)] * 3
    values = [(k, e["t"]) for k, _, e in rec.events]
    assert values == [("pre", 0), ("post", 0), ("pre", 0), ("post", 1), ("pre", 1), ("post", 3)]


def test_post_on_return(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "RETURN_VALUE")
    rec = Recorder()
    arch.arm(f.__code__, off, rec.pre, rec.post)
    assert M.get_local_events(arch.tool, f.__code__) == E.INSTRUCTION | E.PY_RETURN
    f(2)
    f(3)
    assert [(k, o) for k, o, _ in rec.events] == [("pre", off), ("post", off)] * 2
    assert rec.events[1][2]["t"] == 1


def test_post_on_return_const_and_yield(arch: Any) -> None:
    src = "def gen():\n    x = yield 1\n    return\n"
    gen = fresh(src, "gen")
    y = offset_of(gen, "YIELD_VALUE")
    r = return_offsets(gen)[-1]  # RETURN_CONST None (3.12, 3.13), RETURN_VALUE (3.14+)
    rec = Recorder(with_locals=False)
    seen: list[str] = []
    arch.arm(
        gen.__code__,
        y,
        lambda fr, o: seen.append("pre-yield"),
        lambda fr, o: seen.append("post-yield"),
    )
    arch.arm(
        gen.__code__, r, lambda fr, o: seen.append("pre-ret"), lambda fr, o: seen.append("post-ret")
    )
    g = gen()
    next(g)
    seen.append("yielded")
    with pytest.raises(StopIteration):
        g.send(2)
    assert seen == ["pre-yield", "post-yield", "yielded", "pre-ret", "post-ret"]
    del rec


def test_post_on_branches_and_for_iter(arch: Any) -> None:
    src = """
def f(xs):
    n = 0
    for x in xs:
        if x > 1:
            n += 1
        else:
            n -= 1
    return n
"""
    f = fresh(src, "f")
    counts = {}
    for name in ("FOR_ITER", "POP_JUMP_IF_FALSE", "JUMP_BACKWARD", "COMPARE_OP"):
        off = offset_of(f, name)
        rec = Recorder(with_locals=False)
        arch.arm(f.__code__, off, rec.pre, rec.post)
        counts[name] = rec
    assert f([0, 1, 2, 3, 4]) == 1
    assert f([]) == 0
    for name, rec in counts.items():
        assert rec.npre == rec.npost, name
    assert counts["FOR_ITER"].npre == 5 + 1 + 1  # 5 items + 2 exhaustions
    assert not arch._pending


def test_no_post_when_the_instruction_raises_and_is_caught(arch: Any) -> None:
    src = """
def f(xs):
    out = 0
    for x in xs:
        try:
            out = out + 10 // x
        except ZeroDivisionError:
            out = out - 1
    return out
"""
    f = fresh(src, "f")
    off = offset_of(f, "BINARY_OP", nth=0)  # 10 // x (evaluated before the +)
    rec = Recorder(with_locals=False)
    arch.arm(f.__code__, off, rec.pre, rec.post)
    assert f([1, 0, 2, 0, 5]) == 10 - 1 + 5 - 1 + 2
    assert rec.npre == 5
    assert rec.npost == 3  # the two divisions by zero did not complete
    assert not arch._pending


def test_post_on_raise_caught_in_frame_and_unwinding(arch: Any) -> None:
    src = """
def caught():
    try:
        raise KeyError(1)
    except KeyError:
        return 1

def unwinding():
    raise KeyError(2)
"""
    caught = fresh(src, "caught")
    unwinding = fresh(src, "unwinding")
    seen: list[tuple[str, str]] = []
    for fn in (caught, unwinding):
        arch.arm(
            fn.__code__,
            offset_of(fn, "RAISE_VARARGS"),
            lambda fr, o: seen.append(("pre", fr.f_code.co_name)),
            lambda fr, o: seen.append(("post", fr.f_code.co_name)),
        )
    if arch.capabilities.local_unwind:
        # 3.15: a local event of the code whose raise leaves the frame, not global.
        assert M.get_events(arch.tool) == 0
        assert M.get_local_events(arch.tool, unwinding.__code__) & E.PY_UNWIND
        assert not M.get_local_events(arch.tool, caught.__code__) & E.PY_UNWIND
    else:
        assert M.get_events(arch.tool) == E.PY_UNWIND  # global: PY_UNWIND cannot be local
    assert caught() == 1
    with pytest.raises(KeyError):
        unwinding()
    assert seen == [
        ("pre", "caught"),
        ("post", "caught"),
        ("pre", "unwinding"),
        ("post", "unwinding"),
    ]
    arch.disarm(unwinding.__code__, offset_of(unwinding, "RAISE_VARARGS"))
    assert M.get_events(arch.tool) == 0  # the global event is gone with its last user
    assert M.get_local_events(arch.tool, unwinding.__code__) == 0


def test_pending_posts_are_capped(arch: Any) -> None:
    src = "def f(x):\n    y = 1 // x\n    return y\n"
    f = fresh(src, "f")
    off = offset_of(f, "BINARY_OP")
    rec = Recorder(with_locals=False)
    arch.arm(f.__code__, off, rec.pre, rec.post)
    for _ in range(PENDING_CAP + 50):  # each frame unwinds with a pending post
        with pytest.raises(ZeroDivisionError):
            f(0)
    assert len(arch._pending) <= PENDING_CAP
    assert arch.pending_dropped > 0
    assert rec.npost == 0
    assert f(1) == 1
    assert rec.npost == 1


# ---------------------------------------------------------------- arm / disarm


def test_arm_disarm_rearm_cycles(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "BINARY_OP")
    rec = Recorder(with_locals=False)
    for cycle in range(5):
        arch.arm(f.__code__, off, rec.pre, rec.post)
        f(4)
        assert rec.npre == 4 * (cycle + 1)
        assert rec.npost == rec.npre
        arch.disarm(f.__code__, off)
        f(4)
        assert rec.npre == 4 * (cycle + 1)
    assert M.get_local_events(arch.tool, f.__code__) == 0
    arch.disarm(f.__code__, off)  # unarmed: a no-op
    assert arch.armed_addresses() == []


def test_rearm_after_disable_without_restart_events(arch: Any) -> None:
    """An offset that returned DISABLE fires again once armed (our re-instrumentation),
    and another tool's DISABLEd events stay disabled (no restart_events())."""
    f = fresh(LOOP_SRC, "f")
    a = offset_of(f, "STORE_FAST", "t", nth=0)
    b = offset_of(f, "BINARY_OP")
    other_tool = free_tools()[-1]
    other_lines: list[int] = []
    M.use_tool_id(other_tool, "test-other")
    try:
        M.register_callback(
            other_tool, E.LINE, lambda code, line: other_lines.append(line) or M.DISABLE
        )
        M.set_local_events(other_tool, f.__code__, E.LINE)
        hits: list[int] = []
        arch.arm(f.__code__, a, lambda fr, o: hits.append(o), None)
        f(3)  # every other offset returns DISABLE now, b included; LINEs are disabled too
        assert hits == [a] and other_lines
        nlines = len(other_lines)
        f(3)
        assert hits == [a, a] and len(other_lines) == nlines
        arch.arm(f.__code__, b, lambda fr, o: hits.append(o), None)
        f(3)
        assert hits == [a, a, a, b, b, b]
        assert len(other_lines) == nlines  # the other tool's DISABLEs survived
        # Sanity check of the test: restart_events() would have re-enabled them.
        M.restart_events()
        f(1)
        assert len(other_lines) > nlines
    finally:
        M.set_local_events(other_tool, f.__code__, 0)
        M.register_callback(other_tool, E.LINE, None)
        M.free_tool_id(other_tool)


def test_rearm_after_disable_when_another_tool_has_instruction_events(arch: Any) -> None:
    """Our re-instrumentation touches only our tool's per-instruction bits: another tool's
    DISABLEd INSTRUCTION events stay disabled."""
    f = fresh(LOOP_SRC, "f")
    a = offset_of(f, "STORE_FAST", "t", nth=0)
    b = offset_of(f, "BINARY_OP")
    other_tool = free_tools()[-1]
    other: list[int] = []
    M.use_tool_id(other_tool, "test-other")
    try:
        M.register_callback(
            other_tool, E.INSTRUCTION, lambda code, off: other.append(off) or M.DISABLE
        )
        M.set_local_events(other_tool, f.__code__, E.INSTRUCTION)
        hits: list[int] = []
        # Where a second tool's INSTRUCTION events take the first's (cpython#157900), the
        # arch gives the other tool's back (test_a_second_instruction_tool_*).
        arch.arm(f.__code__, a, lambda fr, o: hits.append(o), None)
        f(3)
        assert other  # both tools see events now
        f(3)
        n_other = len(other)
        assert hits == [a, a]
        arch.arm(f.__code__, b, lambda fr, o: hits.append(o), None)
        f(3)
        assert hits == [a, a, a, b, b, b]
        assert len(other) == n_other  # their per-instruction DISABLEs are untouched
    finally:
        M.set_local_events(other_tool, f.__code__, 0)
        M.register_callback(other_tool, E.INSTRUCTION, None)
        M.free_tool_id(other_tool)


@pytest.mark.parametrize("we_first", [True, False])
def test_a_second_instruction_tool_on_one_code(arch: Any, we_first: bool) -> None:
    """CPython bug cpython#157900 (3.12.1 to 3.15.2 measured): when a second tool enables
    INSTRUCTION events on a code object, the first tool's are lost (the per-instruction tool
    bits are allocated zeroed). The capability `instruction_events_shared` says whether this
    Python has it. Where it has, the arch gives the other tool's events back when we come
    second; when the other tool comes second, ours are lost (documented in
    arch/monitoring.py, "Other tools")."""
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "BINARY_OP")
    other_tool = free_tools()[-1]
    other: list[int] = []
    ours: list[int] = []
    M.use_tool_id(other_tool, "test-other")
    try:
        M.register_callback(other_tool, E.INSTRUCTION, lambda code, o: other.append(o))
        if we_first:
            arch.arm(f.__code__, off, lambda fr, o: ours.append(o), None)
        M.set_local_events(other_tool, f.__code__, E.INSTRUCTION)
        if not we_first:
            arch.arm(f.__code__, off, lambda fr, o: ours.append(o), None)
        f(3)
        assert other  # the other tool keeps its events in both orders
        if we_first and not arch.capabilities.instruction_events_shared:
            assert ours == []
        else:
            assert ours == [off] * 3
    finally:
        M.set_local_events(other_tool, f.__code__, 0)
        M.register_callback(other_tool, E.INSTRUCTION, None)
        M.free_tool_id(other_tool)


def test_instruction_events_shared_is_what_two_raw_tools_see(arch: Any) -> None:
    """The capability against the bug itself, shown with two raw tools and no pykprobes."""
    f = fresh(LOOP_SRC, "f")
    first, second = free_tools()[:2]
    seen: list[int] = []
    M.use_tool_id(first, "test-first")
    M.use_tool_id(second, "test-second")
    try:
        M.register_callback(first, E.INSTRUCTION, lambda code, o: seen.append(o))
        M.register_callback(second, E.INSTRUCTION, lambda code, o: None)
        M.set_local_events(first, f.__code__, E.INSTRUCTION)
        M.set_local_events(second, f.__code__, E.INSTRUCTION)
        f(2)
        assert bool(seen) is arch.capabilities.instruction_events_shared
    finally:
        for tool in (first, second):
            M.set_local_events(tool, f.__code__, 0)
            M.register_callback(tool, E.INSTRUCTION, None)
            M.free_tool_id(tool)


def test_arming_an_armed_address_replaces_its_callbacks(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "BINARY_OP")
    first, second = Recorder(False), Recorder(False)
    arch.arm(f.__code__, off, first.pre, None)
    f(2)
    arch.arm(f.__code__, off, second.pre, second.post)
    f(2)
    assert (first.npre, second.npre, second.npost) == (2, 2, 2)


def test_equal_but_distinct_code_objects_are_different_addresses(arch: Any) -> None:
    f1 = fresh(LOOP_SRC, "f")
    f2 = fresh(LOOP_SRC, "f")
    c1, c2 = f1.__code__, f2.__code__
    assert c1 == c2 and c1 is not c2 and hash(c1) == hash(c2)
    off = offset_of(f1, "BINARY_OP")
    r1, r2 = Recorder(False), Recorder(False)
    arch.arm(c1, off, r1.pre, None)
    f2(3)
    assert r1.npre == 0
    f1(3)
    assert r1.npre == 3
    arch.arm(c2, off, r2.pre, None)
    f1(1)
    f2(2)
    assert (r1.npre, r2.npre) == (4, 2)
    arch.disarm(c1, off)
    f1(5)
    f2(5)
    assert (r1.npre, r2.npre) == (4, 7)


def test_many_codes_at_one_offset_each_hit_only_their_own(arch: Any) -> None:
    """Codes armed at the same offset share a table entry (a hub, by id of the code):
    arming or disarming one leaves the others' sites as they were, and the entry goes
    when the last one is disarmed."""
    fs = [fresh(LOOP_SRC, "f") for _ in range(5)]
    off = offset_of(fs[0], "BINARY_OP")
    entry = prologue_end(fs[0].__code__)
    recs = [Recorder(False) for _ in fs]
    entries = [Recorder(False) for _ in fs]
    for f, r, e in zip(fs, recs, entries, strict=True):
        arch.arm(f.__code__, off, r.pre, None)
        arch.arm(f.__code__, 0, e.pre, None)
    for i, f in enumerate(fs):
        f(i)
    assert [r.npre for r in recs] == [0, 1, 2, 3, 4]
    assert [e.npre for e in entries] == [1] * 5
    for i in (1, 3):
        arch.disarm(fs[i].__code__, off)
        arch.disarm(fs[i].__code__, 0)
    arch.arm(fs[2].__code__, off, recs[0].pre, None)  # replaces f2's callback only
    for f in fs:
        f(2)
    assert [r.npre for r in recs] == [0 + 2 + 2, 1, 2, 3, 4 + 2]
    assert [e.npre for e in entries] == [2, 1, 2, 1, 2]
    for f in fs:
        arch.disarm(f.__code__, off)
        arch.disarm(f.__code__, 0)
    assert arch.armed_addresses() == []
    assert off not in arch._ins and entry not in arch._start
    for f in fs:
        f(2)
    assert [r.npre for r in recs] == [4, 1, 2, 3, 6]


def test_armed_code_is_kept_alive(arch: Any) -> None:
    import gc
    import weakref

    f = fresh(LOOP_SRC, "f")
    code = f.__code__
    off = offset_of(f, "BINARY_OP")
    arch.arm(code, off, lambda fr, o: None, None)
    ref = weakref.ref(f)
    del f
    gc.collect()
    assert ref() is None
    assert arch.armed_addresses() == [(code, off)]
    arch.disarm(code, off)
    assert arch.armed_addresses() == []


def test_close_disarms_everything(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    rec = Recorder(False)
    arch.arm(f.__code__, offset_of(f, "BINARY_OP"), rec.pre, rec.post)
    arch.arm(f.__code__, 0, rec.pre, None)
    tool = arch.tool
    arch.close()
    assert M.get_tool(tool) is None
    f(3)
    assert rec.npre == 0
    with pytest.raises(KprobeError):
        arch.arm(f.__code__, 0, rec.pre, None)


# ---------------------------------------------------------------- failures


def test_a_raising_pre_never_reaches_the_program(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "BINARY_OP")
    calls: list[int] = []
    reported: list[tuple[CodeType, int, BaseException]] = []

    def pre(frame: FrameType, offset: int) -> None:
        calls.append(offset)
        raise RuntimeError("boom")

    arch.on_failure = lambda c, o, e: reported.append((c, o, e))
    arch.arm(f.__code__, off, pre, None)
    assert f(4) == 6
    assert f(4) == 6
    assert calls == [off]  # disarmed after the failure
    assert arch.nfailures == 1
    assert reported and reported[0][:2] == (f.__code__, off)
    assert isinstance(arch.failures[0][2], RuntimeError)
    arch.arm(f.__code__, offset_of(f, "RETURN_VALUE"), lambda fr, o: None, None)
    assert arch.armed_addresses() == [(f.__code__, offset_of(f, "RETURN_VALUE"))]
    # The failed address can be armed again.
    arch.arm(f.__code__, off, lambda fr, o: calls.append(o), None)
    f(2)
    assert calls == [off, off, off]


def test_a_raising_post_never_reaches_the_program(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)
    pres: list[int] = []

    def post(frame: FrameType, offset: int) -> None:
        raise ValueError("post boom")

    arch.arm(f.__code__, off, lambda fr, o: pres.append(o), post)
    assert f(5) == 10
    assert arch.nfailures == 1
    assert pres == [off]


def test_a_raising_entry_pre_never_reaches_the_program(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")

    def pre(frame: FrameType, offset: int) -> None:
        raise RuntimeError("entry boom")

    arch.arm(f.__code__, 0, pre, None)
    assert f(3) == 3 and f(3) == 3
    assert arch.nfailures == 1


def test_hits_inside_a_handler_are_not_seen(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    g = fresh(LOOP_SRC, "f", "<g>")
    inner = Recorder(False)
    arch.arm(g.__code__, offset_of(g, "BINARY_OP"), inner.pre, None)
    arch.arm(f.__code__, 0, lambda fr, o: g(3), None)
    f(1)
    assert inner.npre == 0  # sys.monitoring runs no callback inside a callback
    g(3)
    assert inner.npre == 3
    assert MonitoringArch.CAPABILITIES.hits_inside_handlers is False


# ---------------------------------------------------------------- threads


def test_a_loop_already_running_in_another_thread_starts_and_stops_hitting(
    arch: Any,
) -> None:
    src = """
def spin(state):
    i = 0
    while not state["stop"]:
        i = i + 1
        state["count"] = i
    return i
"""
    spin = fresh(src, "spin")
    state = {"stop": False, "count": 0}
    t = threading.Thread(target=spin, args=(state,))
    t.start()
    try:
        while state["count"] < 1000:
            time.sleep(0.001)
        rec = Recorder(False)
        arch.arm(spin.__code__, offset_of(spin, "BINARY_OP"), rec.pre, None)
        deadline = time.monotonic() + 5
        while rec.npre < 100 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert rec.npre >= 100
        arch.disarm(spin.__code__, offset_of(spin, "BINARY_OP"))
        time.sleep(0.05)
        stopped = rec.npre
        before = state["count"]
        while state["count"] < before + 1000:
            time.sleep(0.001)
        assert rec.npre <= stopped + 1  # a hit already under way may finish
    finally:
        state["stop"] = True
        t.join()
    assert MonitoringArch.CAPABILITIES.running_frames_other_threads


def test_a_running_frame_of_this_thread_hits_at_once(arch: Any) -> None:
    src = """
def walk(arm, n):
    total = 0
    for i in range(n):
        if i == 2:
            arm()
        total += i
    return total
"""
    walk = fresh(src, "walk")
    off = offset_of(walk, "BINARY_OP")
    rec = Recorder(False)
    walk(lambda: arch.arm(walk.__code__, off, rec.pre, None), 6)
    assert rec.npre == 4  # iterations 2..5, in the frame that armed the probe


def test_threads_hitting_concurrently(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)
    rec = Recorder(False)
    arch.arm(f.__code__, off, rec.pre, rec.post)
    nthreads, calls, n = 4, 200, 25

    def work() -> None:
        for _ in range(calls):
            f(n)

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.npre == rec.npost == nthreads * calls * n
    assert not arch._pending


def test_concurrent_rearm_loses_no_hit(arch: Any) -> None:
    """Re-instrumenting a code (arming another offset) while another thread runs its armed
    offset must not lose a hit: the toggle runs without a GIL switch in between."""
    src = """
def count(state):
    n = 0
    while not state["stop"]:
        n = n + 1
    return n
"""
    count = fresh(src, "count")
    hot = binary_op(count, "+")
    other = offset_of(count, "STORE_FAST", "n", nth=1)
    rec = Recorder(False)
    arch.arm(count.__code__, hot, rec.pre, None)
    state = {"stop": False}
    result: list[int] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # request GIL switches as often as possible
    t = threading.Thread(target=lambda: result.append(count(state)))
    t.start()
    try:
        for _ in range(2000):
            arch.arm(count.__code__, other, lambda fr, o: None, None)
            arch.disarm(count.__code__, other)
    finally:
        state["stop"] = True
        t.join()
        sys.setswitchinterval(interval)
    assert rec.npre == result[0]


def test_arm_and_disarm_from_several_threads(arch: Any) -> None:
    fs = [fresh(LOOP_SRC, "f", f"<f{i}>") for i in range(8)]
    errors: list[BaseException] = []

    def churn(f: Any) -> None:
        try:
            off = offset_of(f, "BINARY_OP")
            rec = Recorder(False)
            for _ in range(20):
                arch.arm(f.__code__, off, rec.pre, rec.post)
                f(3)
                arch.disarm(f.__code__, off)
                f(3)
            assert rec.npre == rec.npost == 60
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(f,)) for f in fs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert arch.armed_addresses() == []


def test_capabilities_table() -> None:
    caps = MonitoringArch.CAPABILITIES
    for key in (
        "running_frames_this_thread",
        "running_frames_other_threads",
        "threads_started_earlier",
        "threads_started_later",
        "unprobed_code_untaxed",
    ):
        assert getattr(caps, key) is True
