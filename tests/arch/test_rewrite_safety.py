"""Where the rewrite arch refuses to insert a call sequence, and why each refusal is needed.

The refusals are listed here a second time, as the specification, independently of
safety.py's table: on every instruction of the corpus, `check_optimizable` must refuse
exactly these. Then each refusal is shown to matter: the sequence is forced in (inject.build,
bypassing the check) into a small program, run in a subprocess because some of these crash
the interpreter, and the program must crash, compute something else, or emit other trace
events.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from pykprobes.arch.rewrite import RewriteArch
from pykprobes.insn import decode, entry_index
from tests.arch.test_rewrite_corpus import CASES

ARCH = RewriteArch()
VERSION = sys.version_info[:2]
SRC = str(Path(__file__).resolve().parents[2] / "src")

#: (opname, previous opname or None for "any"): refused after the prologue, per version.
REFUSED: dict[tuple[int, int], set[tuple[str, str | None]]] = {
    (3, 11): {
        ("RESUME", None),  # resumption point: _PyGen_yf reads it
        ("CALL", "PRECALL"),  # specialized PRECALL skips its CALL
        ("PRECALL", "KW_NAMES"),  # kwnames kept for the next call
        ("YIELD_VALUE", "SEND"),  # _gen_throw reads SEND right before YIELD_VALUE
        ("SEND", None),  # a backward jump to SEND is not a new line for tracing
    },
    (3, 12): {
        ("RESUME", None),
        ("CALL", "KW_NAMES"),
        ("END_FOR", None),  # FOR_ITER exits to END_FOR + 1
    },
    (3, 13): {
        ("RESUME", None),  # gen_close's fast path reads it
        ("END_FOR", None),  # FOR_ITER exits to END_FOR + 2
        ("POP_TOP", "END_FOR"),
        ("FOR_ITER", None),  # a loop over a generator shows tracers a StopIteration
    },
    (3, 14): {
        ("RESUME", None),  # a close() shows tracers other events
        ("END_FOR", None),  # FOR_ITER exits to END_FOR + 1, the POP_ITER
        ("NOT_TAKEN", None),  # BRANCH_LEFT's source is the instruction run before it
        ("POP_ITER", None),  # so is BRANCH_RIGHT's, for a loop's exit
        ("END_SEND", None),  # an async for's exit is a branch from there
        ("FOR_ITER", None),
    },
}
REFUSED[(3, 15)] = REFUSED[(3, 14)]


def expected_refusal(opname: str, previous: str) -> bool:
    return (opname, None) in REFUSED[VERSION] or (opname, previous) in REFUSED[VERSION]


def test_every_version_has_a_specification() -> None:
    assert VERSION in REFUSED


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refusals_are_exactly_the_documented_ones(case) -> None:  # type: ignore[no-untyped-def]
    instrs = decode(case.code)
    entry = entry_index(instrs)
    wrong = []
    for index, ins in enumerate(instrs):
        reason = ARCH.check_optimizable(case.code, ins.start)
        # The prologue means the entry, never refused.
        want = index > entry and expected_refusal(ins.opname, instrs[index - 1].opname)
        if (reason is not None) != want:
            wrong.append((ins.start, ins.opname, reason))
        if reason is not None:
            assert ins.opname in reason  # a reason names what it refuses
    assert not wrong


def test_non_boundaries_are_refused() -> None:
    def target(x: int) -> int:
        return len([x] * 3) + x

    code = target.__code__
    instrs = decode(code)
    boundaries = {ins.start for ins in instrs}
    inside = [
        off for ins in instrs for off in range(ins.start + 1, ins.end) if off not in boundaries
    ]
    assert inside
    for off in inside:
        reason = ARCH.check_optimizable(code, off)
        assert reason is not None and "not an instruction boundary" in reason, off
    for off in (-2, len(code.co_code), len(code.co_code) + 10):
        assert ARCH.check_optimizable(code, off) is not None
    with pytest.raises(ValueError, match="boundary"):
        ARCH.build(code, {1: lambda: None}, {})


def test_inside_extended_arg_prefix_is_no_boundary() -> None:
    source = "def f(x):\n" + "".join(f"    v{i} = x\n" for i in range(300)) + "    return v299\n"
    namespace: dict[str, object] = {}
    exec(source, namespace)
    code = namespace["f"].__code__  # type: ignore[attr-defined]
    prefixed = [ins for ins in decode(code) if ins.offset != ins.start]
    assert prefixed
    for ins in prefixed:
        assert ARCH.check_optimizable(code, ins.start) is None
        assert "boundary" in (ARCH.check_optimizable(code, ins.offset) or "")


def test_build_refuses_a_refused_offset() -> None:
    def gen() -> object:
        yield 1

    instrs = decode(gen.__code__)
    entry = entry_index(instrs)
    resume = next(ins for i, ins in enumerate(instrs) if ins.opname == "RESUME" and i > entry)
    with pytest.raises(ValueError, match="RESUME"):
        ARCH.build(gen.__code__, {resume.start: lambda: None}, {})


# --------------------------------------------------------------------------- each one matters

#: Every demonstration prints SAME if forcing the sequence in changed nothing observable.
PRELUDE = """
import sys, types
sys.path.insert(0, {src!r})
from pykprobes import insn
from pykprobes.arch.rewrite import inject, assembly

def forced(fn, opname, previous, which=0):
    instrs = insn.decode(fn.__code__)
    entry = insn.entry_index(instrs)
    found = [ins for i, ins in enumerate(instrs) if i > entry and ins.opname == opname
             and (previous is None or instrs[i - 1].opname == previous)]
    seq = assembly.call_sequence()
    code, _ = inject.build(fn.__code__, {{found[which].start: lambda: None}}, {{}}, seq)
    new = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    globals()[fn.__name__ + "_forced"] = new
    return new

def outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:
        return repr(exc)

def branches(fn, *calls, code=None):
    # The opname each BRANCH event of a call of fn with each argument starts at.
    code = code or fn.__code__
    mon = sys.monitoring
    names = {{ins.offset: ins.opname for ins in insn.decode(code)}}
    seen = []
    def record(code, src, dest):
        seen.append(names[src])
    mon.use_tool_id(3, "demo")
    mon.register_callback(3, mon.events.BRANCH_LEFT, record)
    mon.register_callback(3, mon.events.BRANCH_RIGHT, record)
    mon.set_local_events(3, code, mon.events.BRANCH_LEFT | mon.events.BRANCH_RIGHT)
    for arg in calls:
        fn(arg)
    mon.set_local_events(3, code, 0)
    mon.free_tool_id(3)
    return seen

def report(original, changed):
    print("SAME" if original == changed else "DIFFERENT: %r != %r" % (original, changed))
"""

DEMOS: dict[tuple[str, str | None], str] = {
    ("CALL", "PRECALL"): """
def f(n):
    total = 0
    for i in range(n):
        total += len("abc") + abs(-i)
    return total
g = forced(f, "CALL", "PRECALL")
report([f(50) for _ in range(30)], [outcome(g, 50) for _ in range(30)])
""",
    ("PRECALL", "KW_NAMES"): """
def f():
    return dict(a=1, b=2)
g = forced(f, "PRECALL", "KW_NAMES")
report([f() for _ in range(30)], [outcome(g) for _ in range(30)])
""",
    ("CALL", "KW_NAMES"): """
def f():
    return dict(a=1, b=2)
g = forced(f, "CALL", "KW_NAMES")
report([f() for _ in range(30)], [outcome(g) for _ in range(30)])
""",
    ("END_FOR", None): """
def f(n):
    out = []
    for i in range(n):
        out.append(i)
    return out
g = forced(f, "END_FOR", None)
report([f(5) for _ in range(30)], [outcome(g, 5) for _ in range(30)])
""",
    ("POP_TOP", "END_FOR"): """
def f(n):
    out = []
    for i in range(n):
        out.append(i)
    return out
g = forced(f, "POP_TOP", "END_FOR")
report([f(5) for _ in range(30)], [outcome(g, 5) for _ in range(30)])
""",
    ("YIELD_VALUE", "SEND"): """
def inner():
    try:
        yield 1
    except KeyError:
        return "caught"
def outer():
    result = yield from inner()
    yield result
def run(fn):
    gen = fn()
    next(gen)
    return gen.throw(KeyError("k"))
g = forced(outer, "YIELD_VALUE", "SEND")
report(run(outer), outcome(run, g))
""",
    ("RESUME", None): """
def inner():
    try:
        yield 1
    except KeyError:
        yield "inner caught"
def outer():
    try:
        yield from inner()
    except KeyError:
        yield "outer caught"
def throw(fn):
    gen = fn()
    next(gen)
    return gen.throw(KeyError("k"))
def close_events(fn):
    def simple():
        yield 1
        yield 2
    events = []
    def trace(frame, event, arg):
        if frame.f_code is fn.__code__:
            events.append(event)
            return trace
    gen = fn()
    next(gen)
    sys.settrace(trace)
    gen.close()
    sys.settrace(None)
    return events
def plain():
    yield 1
    yield 2
# 3.11/3.12: throw() into the yield from; 3.13: the trace events of close(); 3.14 and
# 3.15: those of close() of the yield from.
g = forced(outer, "RESUME", None)
p = forced(plain, "RESUME", None)
report(
    (throw(outer), close_events(plain), close_events(outer)),
    (outcome(throw, g), close_events(p), close_events(g)),
)
""",
    ("NOT_TAKEN", None): """
def f(x):
    if x:
        return 1
    return 2
# The branch a coverage tool sees starts at the conditional jump.
report(branches(f, 1, 0), branches(forced(f, "NOT_TAKEN", None), 1, 0))
""",
    ("POP_ITER", None): """
def f(x):
    t = 0
    for i in x:
        t += i
    return t
# The loop's exit is a branch from FOR_ITER.
report(branches(f, [1, 2]), branches(forced(f, "POP_ITER", None), [1, 2]))
""",
    ("END_SEND", None): """
class Items:
    def __init__(self):
        self.n = 0
    def __aiter__(self):
        return self
    async def __anext__(self):
        self.n += 1
        if self.n > 2:
            raise StopAsyncIteration
        return self.n
async def f(items):
    t = 0
    async for i in items:
        t += i
    return t
def run(fn):
    def call(items):
        try:
            fn(items).send(None)
        except StopIteration as stop:
            return stop.value
    return call
# Where the branches of the async for start: the events, and co_branches().
def where(fn):
    names = {ins.offset: ins.opname for ins in insn.decode(fn.__code__)}
    return branches(run(fn), Items(), code=fn.__code__), [
        names[src] for src, _, _ in fn.__code__.co_branches()
    ]
report(where(f), where(forced(f, "END_SEND", None)))
""",
    ("FOR_ITER", None): """
def f(n):
    t = 0
    for v in (k * 2 for k in range(n)):
        t += v
    return t
def events(fn):
    seen = []
    def trace(frame, event, arg):
        if frame.f_code is fn.__code__:
            seen.append((event, arg[0].__name__ if event == "exception" else None))
            return trace
    sys.settrace(trace)
    fn(3)
    sys.settrace(None)
    return seen
report(events(f), events(forced(f, "FOR_ITER", None)))
""",
    ("SEND", None): """
def inner():
    yield 1
    yield 2
def outer():
    yield from inner()
def lines(fn):
    seen = []
    def trace(frame, event, arg):
        if frame.f_code is fn.__code__:
            if event == "line":
                seen.append(frame.f_lineno)
            return trace
    sys.settrace(trace)
    list(fn())
    sys.settrace(None)
    return seen
g = forced(outer, "SEND", None)
report(lines(outer), lines(g))
""",
}


def _demo_ids() -> list[tuple[str, str | None]]:
    return sorted({rule for rules in REFUSED.values() for rule in rules}, key=str)


@pytest.mark.parametrize("rule", _demo_ids(), ids=lambda r: f"{r[0]}-after-{r[1] or 'any'}")
def test_each_refusal_matters(rule: tuple[str, str | None]) -> None:
    if rule not in REFUSED[VERSION]:
        pytest.skip(f"{rule[0]} after {rule[1] or 'anything'} is not refused on this CPython")
    program = textwrap.dedent(PRELUDE.format(src=SRC)) + textwrap.dedent(DEMOS[rule])
    proc = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    if proc.returncode == 0:
        assert "DIFFERENT" in proc.stdout, proc.stdout + proc.stderr
    else:
        # Killed by a signal (SIGSEGV: -11), not a Python error in the demonstration itself.
        assert proc.returncode < 0, proc.stderr


def test_specification_matches_the_source() -> None:
    from pykprobes.arch.rewrite import safety

    table = {(rule.opname, rule.after) for rule in safety.rules()}
    assert table == REFUSED[VERSION]


def test_prologue_offsets_are_the_entry() -> None:
    def outer(a: int) -> object:
        cell = a

        def inner() -> int:
            return cell

        def gen() -> object:
            yield cell

        return inner, gen

    inner, gen = outer(1)
    for fn in (outer, inner, gen):
        code = fn.__code__
        instrs = decode(code)
        entry = entry_index(instrs)
        for ins in instrs[: entry + 1]:
            assert ARCH.check_optimizable(code, ins.start) is None
            assert isinstance(ARCH.build(code, {ins.start: lambda: None}, {}).code, types.CodeType)
