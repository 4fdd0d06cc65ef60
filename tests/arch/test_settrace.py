"""The sys.settrace breakpoint arch (pykprobes.arch.settrace), every CPython version."""

from __future__ import annotations

import dis
import errno
import sys
import threading
import time
from types import CodeType, FrameType
from typing import Any

import pytest

from pykprobes.arch.settrace import SettraceArch
from pykprobes.errors import KprobeError


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


def resumes(fn: Any) -> list[int]:
    return [i.offset for i in dis.get_instructions(fn) if i.opname == "RESUME"]


class Recorder:
    def __init__(self, with_locals: bool = True) -> None:
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.with_locals = with_locals
        self.npre = 0
        self.npost = 0

    def pre(self, frame: FrameType, offset: int) -> None:
        with self.lock:
            self.npre += 1
            if self.with_locals:
                self.events.append(("pre", offset, dict(frame.f_locals)))

    def post(self, frame: FrameType, offset: int) -> None:
        with self.lock:
            self.npost += 1
            if self.with_locals:
                self.events.append(("post", offset, dict(frame.f_locals)))


@pytest.fixture
def arch() -> Any:
    assert sys.gettrace() is None, "a trace function (coverage? a debugger?) is installed"
    a = SettraceArch()
    yield a
    a.close()
    assert sys.gettrace() is None and threading.gettrace() is None


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


# ---------------------------------------------------------------- hits


def test_hit_count_equals_executions(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    rec = Recorder(with_locals=False)
    arch.arm(f.__code__, offset_of(f, "BINARY_OP"), rec.pre, None)
    expected = 0
    for n in (0, 1, 7, 100, 3):
        f(n)
        expected += n
    assert rec.npre == expected


def test_pre_gets_the_probed_frame_and_the_armed_offset(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)
    seen: list[tuple[bool, int, int]] = []
    arch.arm(
        f.__code__,
        off,
        lambda fr, o: seen.append((fr.f_code is f.__code__, o, fr.f_lasti)),
        None,
    )
    f(2)
    assert seen == [(True, off, off), (True, off, off)]


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


def test_not_an_instruction_boundary_is_einval(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    with pytest.raises(KprobeError) as info:
        arch.arm(f.__code__, offset_of(f, "BINARY_OP") + 2, lambda fr, o: None, None)
    assert info.value.errno == errno.EINVAL


def test_extended_arg_prefixed_instruction(arch: Any) -> None:
    src = (
        "def big(x):\n" + "".join(f"    v{i} = x + {i}\n" for i in range(300)) + "    return v299\n"
    )
    big = fresh(src, "big")
    off = offset_of(big, "STORE_FAST", "v280")
    assert big.__code__.co_code[off] == dis.opmap["EXTENDED_ARG"]
    rec = Recorder()
    arch.arm(big.__code__, off, rec.pre, rec.post)
    assert big(1) == 300
    assert big(2) == 301
    # 3.12+ also report the real opcode after the prefix: neither a second hit nor the post.
    assert [(k, o) for k, o, _ in rec.events] == [("pre", off), ("post", off)] * 2
    assert "v280" not in rec.events[0][2] and rec.events[1][2]["v280"] == 281


# ---------------------------------------------------------------- entry ('call')


def test_entry_probe_uses_the_call_event(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    assert arch.uses_entry_event(f.__code__, 0)
    assert not arch.uses_entry_event(f.__code__, offset_of(f, "BINARY_OP"))
    rec = Recorder()
    arch.arm(f.__code__, 0, rec.pre, rec.post)
    for n in range(5):
        f(n)
    assert rec.npre == rec.npost == 5
    assert [k for k, _, _ in rec.events[:2]] == ["pre", "post"]


def test_generator_entry_fires_at_first_resumption(arch: Any) -> None:
    src = "def gen(n):\n    for i in range(n):\n        x = yield i\n    return n\n"
    gen = fresh(src, "gen")
    rec = Recorder(with_locals=False)
    arch.arm(gen.__code__, 0, rec.pre, None)
    g = gen(3)
    assert rec.npre == 0
    next(g)
    assert rec.npre == 1
    assert list(g) == [1, 2]
    assert rec.npre == 1


def test_resume_after_yield(arch: Any) -> None:
    src = "def gen(n):\n    for i in range(n):\n        x = yield i\n    return n\n"
    gen = fresh(src, "gen")
    resume = resumes(gen)[1]
    assert not arch.uses_entry_event(gen.__code__, resume)
    rec = Recorder()
    arch.arm(gen.__code__, resume, rec.pre, rec.post)
    g = gen(3)
    next(g)
    g.send("a")
    g.send("b")
    with pytest.raises(StopIteration):
        g.send("c")
    assert rec.npre == rec.npost == 3


# ---------------------------------------------------------------- post


def test_post_sees_the_effect_of_store_fast(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)
    rec = Recorder()
    arch.arm(f.__code__, off, rec.pre, rec.post)
    f(3)
    assert [(k, o) for k, o, _ in rec.events] == [("pre", off), ("post", off)] * 3
    values = [(k, e["t"]) for k, _, e in rec.events]
    assert values == [("pre", 0), ("post", 0), ("pre", 0), ("post", 1), ("pre", 1), ("post", 3)]


def test_post_on_return_and_yield(arch: Any) -> None:
    src = "def gen():\n    x = yield 1\n    return x\n"
    gen = fresh(src, "gen")
    seen: list[str] = []
    arch.arm(
        gen.__code__,
        offset_of(gen, "YIELD_VALUE"),
        lambda fr, o: seen.append("pre-yield"),
        lambda fr, o: seen.append("post-yield"),
    )
    arch.arm(
        gen.__code__,
        offset_of(gen, "RETURN_VALUE"),
        lambda fr, o: seen.append("pre-ret"),
        lambda fr, o: seen.append("post-ret"),
    )
    g = gen()
    next(g)
    seen.append("yielded")
    with pytest.raises(StopIteration):
        g.send(2)
    assert seen == ["pre-yield", "post-yield", "yielded", "pre-ret", "post-ret"]


def test_post_on_for_iter_over_a_python_iterator(arch: Any) -> None:
    """An exhausted FOR_ITER reports an 'exception' event (StopIteration) although it
    completes: its post still runs."""
    src = """
class It:
    def __init__(self): self.n = 0
    def __iter__(self): return self
    def __next__(self):
        self.n += 1
        if self.n > 3:
            raise StopIteration
        return self.n

def f():
    t = 0
    for v in It():
        t += v
    return t
"""
    f = fresh(src, "f")
    rec = Recorder(with_locals=False)
    arch.arm(f.__code__, offset_of(f, "FOR_ITER"), rec.pre, rec.post)
    assert f() == 6
    assert rec.npre == rec.npost == 4


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
    rec = Recorder(with_locals=False)
    arch.arm(f.__code__, offset_of(f, "BINARY_OP", nth=0), rec.pre, rec.post)
    assert f([1, 0, 2, 0, 5]) == 10 - 1 + 5 - 1 + 2
    assert rec.npre == 5
    assert rec.npost == 3


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
    assert caught() == 1
    with pytest.raises(KeyError):
        unwinding()
    assert seen == [
        ("pre", "caught"),
        ("post", "caught"),
        ("pre", "unwinding"),
        ("post", "unwinding"),
    ]


# ---------------------------------------------------------------- arm / disarm


def test_arm_disarm_rearm_cycles_and_uninstall(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "BINARY_OP")
    rec = Recorder(with_locals=False)
    for cycle in range(5):
        arch.arm(f.__code__, off, rec.pre, rec.post)
        assert arch.installed() and threading.gettrace() is not None
        f(4)
        assert rec.npre == rec.npost == 4 * (cycle + 1)
        arch.disarm(f.__code__, off)
        # Nothing armed: the trace function is gone, unprobed code pays nothing.
        assert sys.gettrace() is None and threading.gettrace() is None
        f(4)
        assert rec.npre == 4 * (cycle + 1)
    arch.disarm(f.__code__, off)
    assert arch.armed_addresses() == []


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
    assert c1 == c2 and c1 is not c2
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


def test_ebusy_when_another_trace_function_is_installed() -> None:
    def someone_elses_tracer(frame: FrameType, event: str, arg: Any) -> None:
        return None

    f = fresh(LOOP_SRC, "f")
    a = SettraceArch()
    sys.settrace(someone_elses_tracer)
    try:
        with pytest.raises(KprobeError) as info:
            a.arm(f.__code__, 0, lambda fr, o: None, None)
    finally:
        sys.settrace(None)
    assert info.value.errno == errno.EBUSY
    assert "someone_elses_tracer" in str(info.value)
    threading.settrace(someone_elses_tracer)
    try:
        with pytest.raises(KprobeError) as info:
            a.arm(f.__code__, 0, lambda fr, o: None, None)
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
    assert info.value.errno == errno.EBUSY
    assert sys.gettrace() is None
    a.close()


def test_close_disarms_everything(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    rec = Recorder(False)
    arch.arm(f.__code__, offset_of(f, "BINARY_OP"), rec.pre, rec.post)
    arch.close()
    assert sys.gettrace() is None and threading.gettrace() is None
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
    assert calls == [off]
    assert arch.nfailures == 1 and reported[0][:2] == (f.__code__, off)
    arch.arm(f.__code__, off, lambda fr, o: calls.append(o), None)
    f(2)
    assert calls == [off, off, off]


def test_a_raising_post_never_reaches_the_program(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)

    def post(frame: FrameType, offset: int) -> None:
        raise ValueError("post boom")

    pres: list[int] = []
    arch.arm(f.__code__, off, lambda fr, o: pres.append(o), post)
    assert f(5) == 10
    assert arch.nfailures == 1 and pres == [off]


def test_hits_inside_a_handler_are_not_seen(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    g = fresh(LOOP_SRC, "f", "<g>")
    inner = Recorder(False)
    arch.arm(g.__code__, offset_of(g, "BINARY_OP"), inner.pre, None)
    arch.arm(f.__code__, 0, lambda fr, o: g(3), None)
    f(1)
    assert inner.npre == 0  # no tracing inside a trace function
    g(3)
    assert inner.npre == 3
    assert SettraceArch.CAPABILITIES.hits_inside_handlers is False


# ---------------------------------------------------------------- frames and threads


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
    assert rec.npre == 4  # iterations 2..5, in the frame that was already running
    assert SettraceArch.CAPABILITIES.running_frames_this_thread


def test_threads_started_later_hit_concurrently(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "STORE_FAST", "t", nth=1)
    rec = Recorder(False)
    arch.arm(f.__code__, off, rec.pre, rec.post)
    nthreads, calls, n = 4, 50, 25

    def work() -> None:
        for _ in range(calls):
            f(n)

    threads = [threading.Thread(target=work) for _ in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec.npre == rec.npost == nthreads * calls * n
    assert SettraceArch.CAPABILITIES.threads_started_later


def _thread_running(target: Any, *args: Any) -> tuple[threading.Thread, threading.Event]:
    started = threading.Event()
    t = threading.Thread(target=target, args=(started, *args))
    t.start()
    assert started.wait(5)
    return t, started


def test_threads_started_earlier_are_not_reached(arch: Any) -> None:
    """Measured limit: a thread already running when the probe is armed has no trace
    function, so neither its running frame nor its new calls hit."""
    f = fresh(LOOP_SRC, "f")
    src = """
def spin(started, state, f):
    started.set()
    i = 0
    while not state["stop"]:
        i = i + 1
        f(2)
        state["count"] = i
"""
    spin = fresh(src, "spin")
    state = {"stop": False, "count": 0}
    t, _ = _thread_running(spin, state, f)
    try:
        in_loop, in_call = Recorder(False), Recorder(False)
        arch.arm(spin.__code__, offset_of(spin, "BINARY_OP"), in_loop.pre, None)
        arch.arm(f.__code__, offset_of(f, "BINARY_OP"), in_call.pre, None)
        before = state["count"]
        deadline = time.monotonic() + 5
        while state["count"] < before + 200 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert state["count"] >= before + 200
        assert in_loop.npre == 0  # running frame of another thread
        assert in_call.npre == 0  # new calls in a thread started earlier
    finally:
        state["stop"] = True
        t.join()
    caps = SettraceArch.CAPABILITIES
    assert not caps.running_frames_other_threads and not caps.threads_started_earlier


def test_other_threads_drop_the_trace_function_at_their_next_call(arch: Any) -> None:
    f = fresh(LOOP_SRC, "f")
    off = offset_of(f, "BINARY_OP")
    arch.arm(f.__code__, off, lambda fr, o: None, None)
    results: list[object] = []
    go = threading.Event()

    def worker() -> None:
        results.append(sys.gettrace())
        go.wait(5)
        f(1)  # a call: our global trace function sees nothing armed and removes itself
        results.append(sys.gettrace())

    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.05)
    arch.disarm(f.__code__, off)
    go.set()
    t.join()
    assert results[0] is not None and results[1] is None


def test_unprobed_code_is_taxed_while_armed(arch: Any) -> None:
    """Measured limit: the global trace function sees every call while a probe is armed."""
    f = fresh(LOOP_SRC, "f")
    arch.arm(f.__code__, offset_of(f, "BINARY_OP"), lambda fr, o: None, None)
    assert sys.gettrace() is not None
    assert SettraceArch.CAPABILITIES.unprobed_code_untaxed is False


# ---------------------------------------------------------------- interpreter crashes

CRASH_SEQUENCE = """
import sys, threading, time, dis
from pykprobes.arch.settrace import SettraceArch

def fresh(src, name):
    ns = {}
    exec(compile(src, "<probed>", "exec"), ns)
    return ns[name]

LOOP = "def f(n):\\n    t = 0\\n    for i in range(n):\\n        t += i\\n    return t\\n"
def off(fn, op):
    return [i.offset for i in dis.get_instructions(fn) if i.opname == op][0]

hits = []
a = SettraceArch()
f = fresh(LOOP, "f")
a.arm(f.__code__, off(f, "BINARY_OP"), lambda fr, o: hits.append(o), lambda fr, o: None)
# Threads started later trace f with opcode events and exit with the trace installed.
ts = [threading.Thread(target=lambda: [f(5) for _ in range(20)]) for _ in range(3)]
for t in ts: t.start()
for t in ts: t.join()
a.disarm(f.__code__, off(f, "BINARY_OP"))
assert sys.gettrace() is None
state = {"stop": False}
def spin():
    while not state["stop"]:
        f(2)
t = threading.Thread(target=spin)
t.start()
time.sleep(0.02)
for _ in range(3):  # install and uninstall again, while a thread runs
    a.arm(f.__code__, off(f, "BINARY_OP"), lambda fr, o: hits.append(o), None)
    f(3)
    a.disarm(f.__code__, off(f, "BINARY_OP"))
state["stop"] = True
t.join()
b = SettraceArch()  # a second instance after traced threads exited
b.arm(f.__code__, off(f, "BINARY_OP"), lambda fr, o: hits.append(o), None)
f(1)
b.close()
a.close()
print("hits", len(hits))
"""


def test_no_crash_when_reinstalling_after_traced_threads_exited(run_python: Any) -> None:
    """3.12.1 segfaults in sys.settrace after this sequence unless f_trace_opcodes is only
    ever assigned in a thread that has a trace function (see the module docstring)."""
    proc = run_python(CRASH_SEQUENCE, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"hits {3 * 20 * 5 + 3 * 3 + 1}"


OTHER_TOOLS_THREAD_EXITED = """
import sys, threading, dis
def f(n):
    t = 0
    for i in range(n):
        t += i
    return t
# Someone else's opcode tracer (3.12 needs f_trace_opcodes set before sys.settrace) in a
# thread that exits with it still installed.
def local(frame, event, arg):
    return local
def other(frame, event, arg):
    if frame.f_code is f.__code__:
        frame.f_trace_lines = False
        frame.f_trace = local
        frame.f_trace_opcodes = True
        return local
sys._getframe().f_trace_opcodes = True
sys._getframe().f_trace_opcodes = False
threading.settrace(other)
t = threading.Thread(target=lambda: f(3))
t.start()
t.join()
threading.settrace(None)
%s
print("survived")
"""


def test_no_crash_after_another_tools_traced_thread_exited(run_python: Any) -> None:
    """3.12.1 segfaulted in our sys.settrace when we set the opcode flag in a thread
    without a trace function at this point; we set it under a temporary one."""
    arm = (
        "from pykprobes.arch.settrace import SettraceArch\n"
        "a = SettraceArch()\n"
        "hits = []\n"
        "off = [i.offset for i in dis.get_instructions(f) if i.opname == 'BINARY_OP'][0]\n"
        "a.arm(f.__code__, off, lambda fr, o: hits.append(o), None)\n"
        "f(4)\n"
        "a.close()\n"
        "assert len(hits) == 4, hits\n"
    )
    proc = run_python(OTHER_TOOLS_THREAD_EXITED % arm)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "survived"


@pytest.mark.skipif(sys.version_info[:3] != (3, 12, 1), reason="characterizes CPython 3.12.1")
def test_cpython_3121_crash_that_the_arch_avoids(run_python: Any) -> None:
    """The interpreter bug itself, without pykprobes: assigning f_trace_opcodes in a thread
    with no trace function, then sys.settrace(), after a traced thread exited. If this
    stops crashing, `_set_opcode_trace_flag`'s detour may go."""
    trigger = (
        "sys._getframe().f_trace_opcodes = True\nsys.settrace(other)\nf(2)\nsys.settrace(None)\n"
    )
    proc = run_python(OTHER_TOOLS_THREAD_EXITED % trigger)
    assert proc.returncode != 0 and "Segmentation fault" in proc.stderr
