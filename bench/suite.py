"""The benchmark worker: runs in one interpreter (CPython >= 3.11) and writes one JSON file.

    python bench/suite.py --json OUT.json [--quick]            everything, for this Python
    python bench/suite.py --part memory --json OUT.json ...    one part (run.py starts the
                                                               scale, memory and early parts
                                                               in fresh processes)
    python bench/suite.py --part scale --json OUT.json ...     the scale steps of both modes
                                                               and the memory part, each in a
                                                               fresh process

Method (docs/architecture.md, "Costs"): the target is `def f(a, b): return a + b`, called as
`fn(1, 2)` in `for _ in range(n)` inside a function. Every technique calls the same handler,
which counts its calls. Each timed run uses fresh code objects for f and the loop, warms up,
runs with gc disabled, and is preceded by a timed run of the unprobed call (row A) with its
own fresh code: ratio = median over rounds of T / A_adjacent, +ns = median of T - A_adjacent.
The order of the rows is shuffled every round. After every run the hits are compared with
the exact expected count, and the probe's own counters too: a row whose probe did not fire
exactly as expected is an error, not a number.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402 - bench/ is not a package: found through the path set above

import pykprobes as kp  # noqa: E402

perf_ns = time.perf_counter_ns

# --------------------------------------------------------------------------- targets

TARGET_SRC = """\
def f(a, b):
    return a + b


def g(a, b):
    return a + b
"""
#: The line of `return a + b` in f (the line probe's line).
F_BODY_LINE = 2

LOOP_SRC = """\
def loop(fn, n):
    for _ in range(n):
        fn(1, 2)
"""
EMPTY_LOOP_SRC = """\
def loop(fn, n):
    for _ in range(n):
        pass
"""


class Targets:
    """Modules written to a temporary folder and imported, so that pykprobes resolves their
    functions by name and by line (`resolve_line` needs a module's source file)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="pykprobes-bench-")
        sys.path.insert(0, self.dir)
        self.count = 0
        self.main = self.module("pkb_target", TARGET_SRC)

    def module(self, name: str, source: str) -> ModuleType:
        path = Path(self.dir) / f"{name}.py"
        path.write_text(source)
        importlib.invalidate_caches()
        return importlib.import_module(name)

    def generated(self, count: int) -> tuple[ModuleType, list[FunctionType]]:
        """A new module of `count` distinct functions (each its own code object)."""
        self.count += 1
        name = f"pkb_gen{self.count}_{count}"
        src = "".join(f"def h{i}(a, b):\n    return a + b + {i}\n\n\n" for i in range(count))
        mod = self.module(name, src)
        return mod, [vars(mod)[f"h{i}"] for i in range(count)]

    def fresh(self, name: str = "f") -> FunctionType:
        """New code objects for f and g, compiled from the module's file and put in its
        namespace (where pykprobes looks them up)."""
        mod = self.main
        exec(compile(TARGET_SRC, mod.__file__, "exec"), vars(mod))
        fn: FunctionType = vars(mod)[name]
        return fn

    @property
    def file(self) -> str:
        return str(self.main.__file__)


def fresh_loop(empty: bool = False) -> Callable[[Any, int], None]:
    ns: dict[str, Any] = {}
    exec(compile(EMPTY_LOOP_SRC if empty else LOOP_SRC, "<bench loop>", "exec"), ns)
    loop: Callable[[Any, int], None] = ns["loop"]
    return loop


# --------------------------------------------------------------------------- cases


class CaseError(Exception):
    """The case did not behave as labelled (not optimized, wrong hit count, ...)."""


class Armed:
    """One installed technique: what the loop calls, how to check and remove it."""

    def __init__(
        self,
        fn: Callable[..., Any],
        teardown: Callable[[], None],
        check: Callable[[int], list[str]] | None = None,
        note: str = "",
    ) -> None:
        self.fn = fn
        self.teardown = teardown
        self.check = check or (lambda calls: [])
        self.note = note


class Case:
    """A row: a technique installed on a fresh f, timed, checked, removed."""

    key = ""
    label = ""
    group = ""  # "ref", "pykprobes", "peer", "proto", "ladder"
    kind = ""  # "entry", "offset", "line", "return", "entry+return", "event", "-"
    per_call = 1  # handler calls per call of f
    #: The shared handler counts the hits (events and the compiled-event prototype record
    #: instead; their own check counts the records).
    checks_handler = True
    empty_loop = False

    def unavailable(self) -> str | None:
        return None

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        raise NotImplementedError


class Plain(Case):
    def __init__(self, key: str, label: str, empty: bool = False) -> None:
        self.key, self.label, self.group, self.kind = key, label, "ref", "-"
        self.per_call = 0
        self.empty_loop = empty

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        return Armed(f, lambda: None)


class Peer(Case):
    def __init__(
        self,
        key: str,
        label: str,
        kind: str,
        install: peers.Install,
        needs: str | None = None,
        group: str = "peer",
        per_call: int = 1,
    ) -> None:
        self.key, self.label, self.kind, self.group = key, label, kind, group
        self.per_call = per_call
        self.install = install
        self.needs = needs

    def unavailable(self) -> str | None:
        if self.needs == "monitoring" and not hasattr(sys, "monitoring"):
            return "sys.monitoring does not exist before 3.12 (PEP 669)"
        if self.needs == "wrapt":
            try:
                import wrapt  # noqa: F401
            except ImportError:
                return "wrapt is not installed here (run.py installs it in the bench venvs)"
        if self.needs == "bytecode":
            try:
                import bytecode  # noqa: F401
            except ImportError:
                return "bytecode is not installed"
        return None

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        fn, teardown = self.install(f)
        return Armed(fn, teardown)


def _mode_check(probe: Any, optimized: bool, what: str) -> None:
    if probe.is_optimized() != optimized:
        listing = kp.list_kprobes().strip()
        raise CaseError(
            f"{what} is {'not ' if optimized else ''}optimized, expected "
            f"{'optimized' if optimized else 'breakpoint'} ({listing})"
        )


def _counter_check(name: str, got: int, want: int) -> list[str]:
    return [] if got == want else [f"{name} {got}, expected {want}"]


def _return_side(f: FunctionType) -> str:
    """Which mechanism serves the return side, as far as the interpreter shows it."""
    if sys.gettrace() is not None:
        return "return side: sys.settrace"
    mon = getattr(sys, "monitoring", None)
    if mon is not None:
        for tool in range(6):
            if mon.get_tool(tool) and mon.get_local_events(tool, f.__code__):
                return "return side: sys.monitoring"
    return "return side: in the rewritten code"


class KprobeCase(Case):
    """A kprobe at entry, at the offset of BINARY_OP, or on the line `return a + b`."""

    group = "pykprobes"

    def __init__(self, key: str, where: str, optimized: bool) -> None:
        self.key, self.kind, self.optimized = key, where, optimized
        how = "optimized" if optimized else "breakpoint"
        place = {"entry": "at entry", "offset": "at an offset (BINARY_OP)",
                 "line": "on a line (`return a + b`)"}[where]
        self.label = f"kprobe {place}, {how}"

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        kp.set_optimization(self.optimized)
        if self.kind == "entry":
            p = kp.Kprobe(addr=f, pre_handler=peers.handler)
        elif self.kind == "offset":
            p = kp.Kprobe(addr=f, offset=peers.offset_of(f.__code__, "BINARY_OP"),
                          pre_handler=peers.handler)
        else:
            addrs = [a for a in kp.resolve_line(f"{targets.file}:{F_BODY_LINE}")
                     if a.code is f.__code__]
            if len(addrs) != 1:
                raise CaseError(f"resolve_line gave {len(addrs)} addresses in f, expected 1")
            p = kp.Kprobe(addr=addrs[0], pre_handler=peers.handler)
        kp.register_kprobe(p)
        try:
            if self.optimized:
                kp.wait_for_kprobe_optimizer()
            _mode_check(p, self.optimized, "the kprobe")
        except BaseException:
            kp.unregister_kprobe(p)
            kp.set_optimization(True)
            raise

        def check(calls: int) -> list[str]:
            return (_counter_check("nhit", p.nhit, calls)
                    + _counter_check("nmissed", p.nmissed, 0)
                    + _counter_check("nfault", p.nfault, 0))

        def teardown() -> None:
            kp.unregister_kprobe(p)
            kp.set_optimization(True)

        return Armed(f, teardown, check)


class KretprobeCase(Case):
    """A kretprobe (return handler), alone or with a kprobe at the same entry."""

    group = "pykprobes"

    def __init__(self, key: str, optimized: bool, with_kprobe: bool) -> None:
        self.key, self.optimized, self.with_kprobe = key, optimized, with_kprobe
        how = "optimized" if optimized else "breakpoint"
        if with_kprobe:
            self.label, self.kind, self.per_call = f"kprobe + kretprobe, {how}", "entry+return", 2
        else:
            self.label, self.kind = f"kretprobe, {how}", "return"

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        kp.set_optimization(self.optimized)
        rp = kp.Kretprobe(addr=f, handler=peers.handler)
        p = kp.Kprobe(addr=f, pre_handler=peers.handler) if self.with_kprobe else None
        registered: list[Callable[[], None]] = []
        try:
            kp.register_kretprobe(rp)
            registered.append(lambda: kp.unregister_kretprobe(rp))
            if p is not None:
                kp.register_kprobe(p)
                registered.append(lambda: kp.unregister_kprobe(p))
            if self.optimized:
                kp.wait_for_kprobe_optimizer()
            if rp.flags & kp.KPROBE_FLAG_OPTIMIZED != (
                    kp.KPROBE_FLAG_OPTIMIZED if self.optimized else 0):
                raise CaseError(f"the kretprobe's entry is not "
                                f"{'optimized' if self.optimized else 'a breakpoint'} "
                                f"({kp.list_kprobes().strip()})")
            if p is not None:
                _mode_check(p, self.optimized, "the kprobe")
        except BaseException:
            for undo in reversed(registered):
                undo()
            kp.set_optimization(True)
            raise
        note = _return_side(f)

        def check(calls: int) -> list[str]:
            errors = (_counter_check("kretprobe nhit", rp.nhit, calls)
                      + _counter_check("kretprobe nmissed", rp.nmissed, 0)
                      + _counter_check("kretprobe nfault", rp.nfault, 0))
            if p is not None:
                errors += _counter_check("kprobe nhit", p.nhit, calls)
            return errors

        def teardown() -> None:
            for undo in reversed(registered):
                undo()
            kp.set_optimization(True)

        return Armed(f, teardown, check, note)


class EventCase(Case):
    """`p:bench/evN pkb_target:f a=$arg1 b=$arg2`, enabled, recorded into the trace buffer
    with its timestamp and thread (the tracefs API). The buffer is small and overwrites its
    oldest records, as ftrace's does by default: the steady state of a trace buffer, whose
    memory is reused. (A buffer that only fills pays for fresh memory on every record as
    well: page faults and allocator arenas, measured +40-60 ns here; see ANALYSIS.md.)
    Every hit is still accounted for exactly: records kept + records overwritten."""

    group = "pykprobes"
    kind = "event"
    checks_handler = False
    serial = 0

    def __init__(self, key: str, optimized: bool, is_return: bool = False) -> None:
        self.key, self.optimized, self.is_return = key, optimized, is_return
        how = "optimized" if optimized else "breakpoint"
        if is_return:
            # Issue 13: `r:... a=$arg1 r=$retval`, the return side compiled as the entry's.
            self.label = (f"return event, $arg1 (kept at entry) + $retval, into a 64 KB "
                          f"trace buffer (overwriting), {how}")
        else:
            self.label = f"event, 2 fetchargs, into a 64 KB trace buffer (overwriting), {how}"
        self.size_kb = 64

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("pykprobes.trace.tracefs")
        except ImportError as exc:
            return f"pykprobes.trace.tracefs is not importable: {exc}"
        return None

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        from pykprobes.trace.tracefs import TraceFS

        kp.set_optimization(self.optimized)
        fs = TraceFS(buffer_size_kb=self.size_kb)
        EventCase.serial += 1
        name = f"ev{EventCase.serial}"
        try:
            fetch = "r=$retval" if self.is_return else "b=$arg2"
            event = fs.define(f"{'r' if self.is_return else 'p'}:bench/{name} "
                              f"{targets.main.__name__}:f a=$arg1 {fetch}")
            assert event is not None
            fs.write(f"events/bench/{name}/enable", "1")
            if self.optimized:
                kp.wait_for_kprobe_optimizer()
            probe = event.probes[0]
            _mode_check(getattr(probe, "kp", probe), self.optimized, "the event's probe")
        except BaseException:
            fs.write(f"events/bench/{name}/enable", "0")
            fs.clear()
            kp.set_optimization(True)
            raise

        def check(calls: int) -> list[str]:
            buf = fs.buffer
            errors = (_counter_check("event hits", event.hits, calls)
                      + _counter_check("records written", event.nhit, calls)
                      + _counter_check("records kept + overwritten",
                                       buf.entries + buf.overrun, calls)
                      + _counter_check("records dropped", buf.dropped, 0)
                      + _counter_check("nmissed", event.nmissed, 0))
            last = buf.snapshot()[-1:] if buf.entries else []
            want = (1, 3) if self.is_return else (1, 2)
            if last and tuple(last[0][4]) != want:
                errors.append(f"last record's values {last[0][4]!r}, expected {want}")
            return errors

        def teardown() -> None:
            fs.write(f"events/bench/{name}/enable", "0")
            fs.clear()
            kp.set_optimization(True)

        # The handler counter is not used by events: count with the records instead.
        armed = Armed(f, teardown, check)
        return armed


class HistCase(Case):
    """Issue 14's answers at the hit: a hist-only event (a trigger, the event not enabled:
    no trace record), counted into its table.

    - `E2o`: `p:bench/hN pkb_target:f a=$arg1 b=$arg2` with `hist:keys=a` (the same event
      as E1o, keys = one int field): the compiled hist recorder (trace/hist.py
      HistRecorder) counts it. Goal: at most E1o's cost, same rounds.
    - `E3o`: `r:bench/dN pkb_target:f d=$duration` with `hist:keys=d.log2`: a latency
      histogram (the kretprobe's entry stamps the call, the return hit computes the
      duration and counts it). Goal: at most 4x the unprobed call.
    Every hit is accounted for: the event's hits, and the table's Hits, equal the calls."""

    group = "pykprobes"
    kind = "event"
    checks_handler = False
    serial = 0

    def __init__(self, key: str, optimized: bool, duration: bool) -> None:
        self.key, self.optimized, self.duration = key, optimized, duration
        how = "optimized" if optimized else "breakpoint"
        if duration:
            self.label = f"hist-only return event, $duration with keys=d.log2, {how}"
        else:
            self.label = f"hist-only event (E1o's, keys=a: one int field), {how}"

    def unavailable(self) -> str | None:
        try:
            importlib.import_module("pykprobes.trace.hist")
        except ImportError as exc:
            return f"pykprobes.trace.hist is not importable: {exc}"
        return None

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        from pykprobes.trace.tracefs import TraceFS

        kp.set_optimization(self.optimized)
        fs = TraceFS(buffer_size_kb=64)
        HistCase.serial += 1
        name = f"h{HistCase.serial}"
        module = targets.main.__name__
        if self.duration:
            definition, trigger = f"r:bench/{name} {module}:f d=$duration", "hist:keys=d.log2"
        else:
            definition, trigger = f"p:bench/{name} {module}:f a=$arg1 b=$arg2", "hist:keys=a"
        try:
            event = fs.define(definition)
            assert event is not None
            fs.write(f"events/bench/{name}/trigger", trigger)
            if self.optimized:
                kp.wait_for_kprobe_optimizer()
            probe = event.probes[0]
            _mode_check(getattr(probe, "kp", probe), self.optimized, "the event's probe")
        except BaseException:
            fs.clear()
            kp.set_optimization(True)
            raise

        def check(calls: int) -> list[str]:
            hits = event.triggers[0].map.hits if event.triggers else -1
            return (_counter_check("event hits", event.hits, calls)
                    + _counter_check("hist table hits", hits, calls)
                    + _counter_check("records written", fs.buffer.entries, 0)
                    + _counter_check("nmissed", event.nmissed, 0))

        def teardown() -> None:
            fs.clear()
            kp.set_optimization(True)

        return Armed(f, teardown, check)


# --------------------------------------------------------------------------- prototypes


class ProtoInlineHit(Case):
    """Bench-only prototype (not pykprobes code): the fast path of core/site.py's trampoline
    written into the injected code itself, so that the handler is the only Python call
    left: read the site's (probe, handler, regs) from a box, test the marks (`_held`,
    `_busy`), mark, count, call, unmark. No fault isolation (an exception-table entry,
    free when nothing raises) and no careful path: what it measures is the floor of the
    kernel's bookkeeping in bytecode (ANALYSIS.md)."""

    key, group, kind = "X1", "proto", "entry"
    label = "PROTOTYPE fast path inlined into the injected code (no trampoline call)"

    def unavailable(self) -> str | None:
        return Peer("", "", "", peers.install_closure, "bytecode").unavailable()

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        import opcode

        from bytecode import BinaryOp, Instr, Label

        class P:
            __slots__ = ("nhit",)

        p = P()
        p.nhit = 0
        busy: dict[int, Any] = {}
        held: list[Any] = [None]
        regs = object()
        box = [(peers.handler, p, regs)]  # (handler, p, regs), as the trampoline's cell
        version = sys.version_info[:2]
        to_bool = [Instr("TO_BOOL")] if version >= (3, 13) else []
        if_true, if_none, if_not_none = (
            ("POP_JUMP_FORWARD_IF_TRUE", "POP_JUMP_FORWARD_IF_NONE",
             "POP_JUMP_FORWARD_IF_NOT_NONE") if version == (3, 11)
            else ("POP_JUMP_IF_TRUE", "POP_JUMP_IF_NONE", "POP_JUMP_IF_NOT_NONE"))
        nhit = "nhit" if version == (3, 11) else (False, "nhit")
        call = [Instr("PRECALL", 1), Instr("CALL", 1)] if version == (3, 11) else \
            [Instr("CALL", 1)]
        # 3.14 folded BINARY_SUBSCR into BINARY_OP (its NB_SUBSCR operator).
        old_subscr = "BINARY_SUBSCR" in opcode.opmap

        def subscr() -> Any:
            return Instr("BINARY_SUBSCR") if old_subscr else Instr("BINARY_OP", BinaryOp.SUBSCR)

        def make(location: Any) -> list[Any]:
            skip_pop, done = Label(), Label()
            ops = [
                Instr("LOAD_CONST", box), Instr("LOAD_CONST", 0), subscr(),
                Instr("COPY", 1), Instr(if_none, skip_pop),
                Instr("LOAD_CONST", held), Instr("LOAD_CONST", 0), subscr(),
                Instr(if_not_none, skip_pop),
                Instr("LOAD_CONST", busy), *to_bool, Instr(if_true, skip_pop),
                Instr("UNPACK_SEQUENCE", 3),  # regs, p, handler (top)
                Instr("COPY", 3), Instr("LOAD_CONST", held), Instr("LOAD_CONST", 0),
                Instr("STORE_SUBSCR"),  # held[0] = regs
                Instr("COPY", 2), Instr("COPY", 1), Instr("LOAD_ATTR", nhit),
                Instr("LOAD_CONST", 1), Instr("BINARY_OP", 13), Instr("SWAP", 2),
                Instr("STORE_ATTR", "nhit"),  # p.nhit += 1
                Instr("SWAP", 3), *call, Instr("POP_TOP"),  # handler(p, regs), method-style
                Instr("LOAD_CONST", None), Instr("LOAD_CONST", held), Instr("LOAD_CONST", 0),
                Instr("STORE_SUBSCR"),  # held[0] = None
                Instr("JUMP_FORWARD", done),
                skip_pop, Instr("POP_TOP"), done,
            ]
            for op in ops:
                if isinstance(op, Instr):
                    op.location = location
            return ops

        original = f.__code__
        f.__code__ = peers.inject(f, "entry", make)

        def check(calls: int) -> list[str]:
            return _counter_check("nhit", p.nhit, calls) + (["left marked"] if held[0] else [])

        def teardown() -> None:
            f.__code__ = original

        return Armed(f, teardown, check)


# --------------------------------------------------------------------------- ladder


def ladder_cases() -> list[Case]:
    """Where the optimized hit's nanoseconds go: core/site.py's trampoline (its fast path)
    rebuilt one step at a time, each rung injected as raw bytecode in place of Site.hit
    (the difference between two rungs is the cost of the step added)."""

    class P:
        __slots__ = ("nhit", "pre_handler")

    p = P()
    p.nhit = 0
    p.pre_handler = peers.handler
    busy: dict[int, Any] = {}
    held: list[Any] = [None]
    regs = object()

    def rung(step: int) -> Callable[[], None]:
        fast: tuple[Any, Any, Any] | None = (p, peers.handler, regs)

        def l2() -> None:
            if busy or fast is None:
                return
            _q, _handler, _r = fast  # the unpacking is what is measured

        def l3() -> None:
            if fast is None or held[0] is not None or busy:
                return
            _q, _handler, r = fast
            held[0] = r
            try:
                pass
            finally:
                held[0] = None

        def l4() -> None:
            if fast is None or held[0] is not None or busy:
                return
            q, _handler, r = fast
            held[0] = r
            try:
                q.nhit += 1
            finally:
                held[0] = None

        def l5() -> None:
            if fast is None or held[0] is not None or busy:
                return
            q, handler, r = fast
            held[0] = r
            try:
                q.nhit += 1
                handler(q, r)
            except KeyboardInterrupt:
                raise
            except BaseException:  # noqa: BLE001
                pass
            finally:
                held[0] = None

        return (l2, l3, l4, l5)[step - 2]

    def nop() -> None:
        pass

    rungs: list[tuple[str, str, Callable[[], None]]] = [
        ("L1", "inject: call an empty Python function", nop),
        ("L2", "+ the trampoline's test of `_busy` and its (probe, handler, regs) cell",
         rung(2)),
        ("L3", "+ `_held[0] = regs`, try/finally `_held[0] = None`", rung(3)),
        ("L4", "+ `p.nhit += 1`", rung(4)),
        ("L5", "+ `handler(p, regs)` in try/except = the whole fast path", rung(5)),
    ]
    cases: list[Case] = []
    for key, label, func in rungs:
        case = Peer(key, label, "entry", peers.install_inject("entry", func), "bytecode",
                    group="ladder")
        # L1..L4 run no handler: their check is the injected call itself (see Rung).
        cases.append(case if key == "L5" else Rung(case, func))
    return cases


class Rung(Case):
    """A ladder rung that runs no handler: checked by counting its calls with a profile of
    one warm-up call (sys.setprofile sees the injected call), then timed without it."""

    group, kind, checks_handler = "ladder", "entry", False

    def __init__(self, peer: Peer, func: Callable[[], None]) -> None:
        self.peer, self.func = peer, func
        self.key, self.label = peer.key, peer.label

    def unavailable(self) -> str | None:
        return self.peer.unavailable()

    def setup(self, f: FunctionType, targets: Targets) -> Armed:
        fn, teardown = self.peer.install(f)
        target = getattr(self.func, "__func__", self.func).__code__
        seen = []

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code is target:
                seen.append(1)

        sys.setprofile(profile)
        try:
            fn(1, 2)
        finally:
            sys.setprofile(None)

        def check(calls: int) -> list[str]:
            return [] if len(seen) == 1 else [f"the injected call ran {len(seen)} times, not 1"]

        return Armed(fn, teardown, check)


# --------------------------------------------------------------------------- the rows


def hit_cases() -> list[Case]:
    inject = peers.install_inject
    return [
        Plain("A", "baseline: unprobed call"),
        Plain("A0", "ref: empty loop body (loop overhead only)", empty=True),
        KprobeCase("K1o", "entry", True),
        KprobeCase("K1b", "entry", False),
        KprobeCase("K2o", "offset", True),
        KprobeCase("K2b", "offset", False),
        KprobeCase("K3o", "line", True),
        KprobeCase("K3b", "line", False),
        KretprobeCase("R1o", True, False),
        KretprobeCase("R1b", False, False),
        KretprobeCase("R2o", True, True),
        KretprobeCase("R2b", False, True),
        EventCase("E1o", True),
        EventCase("E1b", False),
        EventCase("E4o", True, is_return=True),
        HistCase("E2o", True, False),
        HistCase("E3o", True, True),
        Peer("B", "closure decorator (*args, **kwargs), handler(args) then fn", "entry",
             peers.install_closure),
        Peer("B1", "closure, exact signature (a, b)", "entry", peers.install_closure_exact),
        Peer("C", "wrapt.FunctionWrapper, handler(args)", "entry", peers.install_wrapt, "wrapt"),
        Peer("D", "sys.setprofile, filter f_code, handler", "entry", peers.install_setprofile),
        Peer("E", "sys.settrace global 'call', filter f_code", "entry", peers.install_settrace),
        Peer("F", "raw sys.monitoring PY_START local, cb -> handler", "entry",
             peers.install_monitoring_start, "monitoring"),
        Peer("G", "raw sys.monitoring INSTRUCTION local, DISABLE others", "offset",
             peers.install_monitoring_instruction, "monitoring"),
        Peer("G1", "raw sys.monitoring LINE local, DISABLE others", "line",
             peers.install_monitoring_line, "monitoring"),
        Peer("I", "raw sys.monitoring PY_RETURN local, cb -> handler(rv)", "return",
             peers.install_monitoring_return, "monitoring"),
        Peer("H", "raw injected bytecode: handler() after RESUME", "entry",
             inject("entry"), "bytecode"),
        Peer("H1", "raw injected bytecode: handler() before BINARY_OP", "offset",
             inject("offset"), "bytecode"),
        Peer("I1", "raw injected bytecode: handler(rv) before RETURN_VALUE", "return",
             inject("return"), "bytecode"),
        Peer("HI1", "raw injected bytecode: handler() after RESUME + handler(rv) at return",
             "entry+return", peers.install_inject_entry_return, "bytecode", per_call=2),
        ProtoInlineHit(),
    ]


#: (case, reference, goal ratio or None): the comparisons the issue's goals are about,
#: each computed per round from the two rows measured in that round.
COMPARISONS: list[tuple[str, str, float | None]] = [
    # Issue 13 moved the optimized kprobe's goal from 1.10x to 1.5x raw injection (the
    # kernel's bookkeeping does not fit in 1.1x in CPython: ANALYSIS.md).
    ("K1o", "H", 1.50), ("K2o", "H1", 1.50), ("K3o", "H", 1.50),
    ("K1b", "F", 1.15), ("K2b", "G", 1.15), ("K3b", "G1", 1.15), ("K3b", "G", 1.15),
    ("R1o", "I1", None), ("R1b", "I", None), ("K1b", "E", None),
    # Issue 13: a kretprobe (empty handlers) at most 2x raw entry + return injection, a
    # kprobe + kretprobe at most 2.5x.
    ("R1o", "HI1", 2.00), ("R2o", "HI1", 2.50),
    ("X1", "H", 1.10),
    # Issue 14: a hist-only event costs at most the optimized event; a $duration return
    # event with a .log2 hist at most 4x the unprobed call.
    ("E2o", "E1o", 1.00), ("E3o", "A", 4.00),
    # Issue 13: a return event ($retval + one entry argument) at most 4x the unprobed call;
    # an event served by the breakpoint at most 2x a breakpoint kprobe (empty handler).
    ("E4o", "A", 4.00), ("E1b", "K1b", 2.00),
]

# --------------------------------------------------------------------------- timing


class Config:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.n = 4_000 if quick else 100_000
        self.warm = 400 if quick else 2_000
        self.rounds = 2 if quick else 11
        self.ladder_rounds = 1 if quick else 7
        self.elsewhere = 100 if quick else 1_000
        self.elsewhere_cycles = 1 if quick else 3
        self.scale = (1, 100) if quick else (1, 100, 10_000)
        # Wall-clock budgets of one scale step (register, unregister), in seconds: beyond
        # it the step stops and reports how far it got (the machine has 15 minutes for the
        # three Pythons).
        self.scale_budget = 5.0 if quick else 25.0
        self.memory_probes = 50 if quick else 1_000
        self.early_runs = 2 if quick else 9


def residue() -> str | None:
    """Something a case left behind that would tax the next one."""
    if sys.gettrace() is not None:
        return f"a trace function is still set: {sys.gettrace()!r}"
    if sys.getprofile() is not None:
        return f"a profile function is still set: {sys.getprofile()!r}"
    if "pykprobes.core.registry" in sys.modules and kp.list_kprobes():
        return f"probes still registered: {kp.list_kprobes().strip()}"
    return None


def timed(fn: Callable[..., Any], cfg: Config, empty: bool = False) -> float:
    loop = fresh_loop(empty)
    gc.disable()
    try:
        loop(fn, cfg.warm)
        t0 = perf_ns()
        loop(fn, cfg.n)
        t1 = perf_ns()
    finally:
        gc.enable()
    return (t1 - t0) / cfg.n


def run_case(case: Case, targets: Targets, cfg: Config) -> tuple[float, list[str], str]:
    """One timed run of `case`: (ns per call, errors, note)."""
    f = targets.fresh("f")
    armed = case.setup(f, targets)
    errors: list[str] = []
    try:
        peers.reset_hits()
        ns = timed(armed.fn, cfg, case.empty_loop)
        calls = cfg.warm + cfg.n
        if case.checks_handler:
            want = case.per_call * calls
            if peers.hits() != want:
                errors.append(f"handler ran {peers.hits()} times, expected {want}")
        errors += armed.check(calls)
    finally:
        armed.teardown()
    left = residue()
    if left:
        errors.append(left)
    return ns, errors, armed.note


class Row:
    def __init__(self, case: Case) -> None:
        self.case = case
        self.ns: list[float] = []
        self.base: list[float] = []
        self.errors: list[str] = []
        self.reason = case.unavailable()
        self.notes: set[str] = set()
        self.round_ns: dict[int, float] = {}
        self.expected = 0

    @property
    def ok(self) -> bool:
        return self.reason is None and not self.errors

    def as_json(self, cfg: Config) -> dict[str, Any]:
        c = self.case
        out: dict[str, Any] = {
            "key": c.key, "label": c.label, "group": c.group, "kind": c.kind,
        }
        if self.reason is not None:
            out["status"] = "n/a"
            out["reason"] = self.reason
            return out
        if self.errors:
            out["status"] = "error"
            out["errors"] = sorted(set(self.errors))[:5]
            return out
        ratios = [t / a for t, a in zip(self.ns, self.base, strict=True)]
        plus = [t - a for t, a in zip(self.ns, self.base, strict=True)]
        calls = (cfg.warm + cfg.n) * len(self.ns)
        out.update({
            "status": "ok",
            "median_ns": statistics.median(self.ns),
            "min_ns": min(self.ns),
            "max_ns": max(self.ns),
            "ratio": statistics.median(ratios),
            "plus_ns": statistics.median(plus),
            "repeats": len(self.ns),
            "ns": self.ns,
            "base_ns": self.base,
            "hits": f"ok {c.per_call * calls}/{c.per_call * calls}" if c.checks_handler
                    else f"ok {calls}/{calls} records",
            "note": "; ".join(sorted(self.notes)),
        })
        return out


def run_rounds(cases: list[Case], targets: Targets, cfg: Config, rounds: int,
               baseline: Case, log: Callable[[str], None]) -> list[Row]:
    rows = [Row(c) for c in cases]
    live = [r for r in rows if r.reason is None]
    rng = random.Random(1234)
    for rnd in range(rounds):
        order = live[:]
        rng.shuffle(order)
        for row in order:
            if row.errors:
                continue
            try:
                base_ns, base_err, _ = run_case(baseline, targets, cfg)
                ns, errors, note = run_case(row.case, targets, cfg)
            except CaseError as exc:
                row.errors.append(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - reported as the row's error
                row.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if base_err:
                row.errors.append(f"baseline: {base_err[0]}")
            if errors:
                row.errors.extend(errors)
                continue
            row.ns.append(ns)
            row.base.append(base_ns)
            row.round_ns[rnd] = ns
            if note:
                row.notes.add(note)
        log(f"  round {rnd + 1}/{rounds} done")
    return rows


def comparisons(rows: list[Row]) -> list[dict[str, Any]]:
    by_key = {r.case.key: r for r in rows}
    out = []
    for key, ref, goal in COMPARISONS:
        a, b = by_key.get(key), by_key.get(ref)
        item: dict[str, Any] = {"case": key, "ref": ref, "goal": goal}
        if a is None or b is None or not a.ok or not b.ok:
            why = [f"{r.case.key}: {r.reason or (r.errors[:1] or ['missing'])[0]}"
                   for r in (a, b) if r is not None and not r.ok]
            item["status"] = "n/a"
            item["reason"] = "; ".join(why) or "row missing"
        else:
            common = sorted(set(a.round_ns) & set(b.round_ns))
            ratios = [a.round_ns[i] / b.round_ns[i] for i in common]
            item["status"] = "ok"
            item["ratio"] = statistics.median(ratios)
            item["min"] = min(ratios)
            item["max"] = max(ratios)
            item["met"] = None if goal is None else item["ratio"] <= goal
        out.append(item)
    return out


def event_vs_peers(rows: list[Row]) -> dict[str, Any]:
    """Goal 2: the optimized event against the unprobed call (<= 3x) and against every
    peer's handler (cheaper than each, raw injection excepted)."""
    by_key = {r.case.key: r for r in rows}
    ev = by_key.get("E1o")
    if ev is None or not ev.ok:
        return {"status": "n/a", "reason": ev.reason or ev.errors[0] if ev else "missing"}
    versus = {}
    for r in rows:
        if r.case.group != "peer" or not r.ok or r.case.key.startswith(("H", "I1")):
            continue
        common = sorted(set(ev.round_ns) & set(r.round_ns))
        versus[r.case.key] = statistics.median(ev.round_ns[i] / r.round_ns[i] for i in common)
    ratio = statistics.median(t / a for t, a in zip(ev.ns, ev.base, strict=True))
    return {"status": "ok", "ratio_to_unprobed": ratio, "met_3x": ratio <= 3.0,
            "versus_peers": versus,
            "cheaper_than_all": all(v < 1.0 for v in versus.values())}


# --------------------------------------------------------------------------- elsewhere


def run_elsewhere(targets: Targets, cfg: Config, log: Callable[[str], None]) -> list[dict]:
    """The unprobed g while `cfg.elsewhere` probes are armed on other functions. Each cycle
    times g three times unarmed, arms the probes, times g three times, disarms, and times it
    three times again: the cycle's ratio is median(armed) / median(unarmed, both sides).
    Every armed probe is checked to fire exactly once afterwards, g's loops zero times."""
    out = []
    plain = Plain("A", "")
    for optimized in (True, False):
        key = "J1o" if optimized else "J1b"
        how = "optimized" if optimized else "breakpoint"
        item: dict[str, Any] = {
            "key": key, "group": "pykprobes", "kind": "elsewhere",
            "label": f"unprobed call, {cfg.elsewhere:,} probes armed elsewhere ({how})",
        }
        ratios, armed_ns, base_ns, errors = [], [], [], []
        for _ in range(cfg.elsewhere_cycles):
            _, fns = targets.generated(cfg.elsewhere)
            before = [run_case(plain, targets, cfg)[0] for _ in range(3)]
            kp.set_optimization(optimized)
            probes = [kp.Kprobe(addr=fn, pre_handler=peers.handler) for fn in fns]
            kp.register_kprobes(probes)
            try:
                if optimized:
                    kp.wait_for_kprobe_optimizer()
                nopt = sum(p.is_optimized() for p in probes)
                if nopt != (len(probes) if optimized else 0):
                    errors.append(f"{nopt} of {len(probes)} probes optimized")
                peers.reset_hits()
                during = [timed(targets.fresh("g"), cfg) for _ in range(3)]
                if peers.hits():
                    errors.append(f"{peers.hits()} hits during the unprobed loop")
                for fn in fns:
                    fn(1, 2)
                bad = [p for p in probes if p.nhit != 1]
                if bad:
                    errors.append(f"{len(bad)} armed probes did not fire exactly once")
                tax = sys.gettrace()
            finally:
                kp.unregister_kprobes(probes)
                kp.set_optimization(True)
            after = [run_case(plain, targets, cfg)[0] for _ in range(3)]
            base = statistics.median(before + after)
            armed = statistics.median(during)
            ratios.append(armed / base)
            armed_ns += during
            base_ns.append(base)
        if errors:
            item.update(status="error", errors=sorted(set(errors)))
        else:
            item.update(status="ok", median_ns=statistics.median(armed_ns),
                        min_ns=min(armed_ns), max_ns=max(armed_ns),
                        ratio=statistics.median(ratios),
                        plus_ns=statistics.median(armed_ns) - statistics.median(base_ns),
                        repeats=len(ratios), ns=armed_ns, base_ns=base_ns,
                        hits=f"ok 0 in g; {cfg.elsewhere}/{cfg.elsewhere} armed fired once",
                        note="a global trace function was set while armed"
                        if tax is not None else "")
        out.append(item)
        log(f"  {key} done")
    return out


# --------------------------------------------------------------------------- scale


def _project(checkpoints: list[tuple[int, float]], total: int) -> float | None:
    """Seconds for `total` probes, from (count, elapsed) checkpoints: the per-probe cost
    is fitted as growing linearly with the count (what the measured blocks show)."""
    if len(checkpoints) < 3:
        return None
    xs, ys = [], []
    prev_n, prev_t = 0, 0.0
    for n, t in checkpoints:
        if n > prev_n:
            xs.append((n + prev_n) / 2)
            ys.append((t - prev_t) / (n - prev_n))
        prev_n, prev_t = n, t
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    intercept = my - slope * mx
    # integral of (intercept + slope * x) dx from 0 to total
    return intercept * total + slope * total * total / 2


def _timed_steps(items: list[Any], step: Callable[[Any], None], budget: float,
                 every: int) -> tuple[int, float, list[tuple[int, float]]]:
    t0 = time.perf_counter()
    done = 0
    checkpoints: list[tuple[int, float]] = []
    for item in items:
        step(item)
        done += 1
        if done % every == 0:
            elapsed = time.perf_counter() - t0
            checkpoints.append((done, elapsed))
            if elapsed > budget:
                break
    elapsed = time.perf_counter() - t0
    if not checkpoints or checkpoints[-1][0] != done:
        checkpoints.append((done, elapsed))
    return done, elapsed, checkpoints


def _heap_walks() -> int | None:
    """How many times the core walked the heap for the holders of code objects so far, or
    None if this pykprobes does not count them (--src of an older commit)."""
    from pykprobes.core import registry

    view = getattr(registry, "table_view", None)
    mech = view().mechanisms if view is not None else registry._m()  # older commits: _m()
    walks = getattr(mech, "walks", None)
    return walks if isinstance(walks, int) else None


def _since(before: int | None) -> int | None:
    now = _heap_walks()
    return None if now is None or before is None else now - before


def run_scale(targets: Targets, cfg: Config, log: Callable[[str], None],
              optimized: bool) -> list[dict]:
    """Register + arm, optimize (wait_for_kprobe_optimizer) and unregister N probes on N
    distinct functions, for each N of the config, in one mode. A step that passes its
    budget stops there and reports how far it got and a projection; the probes it leaves
    registered are left to the process's exit (run in a process of its own: see main)."""
    out = []
    how = "optimized" if optimized else "breakpoint"
    for count in cfg.scale:
        _, fns = targets.generated(count)
        item: dict[str, Any] = {"count": count, "mode": how}
        g = targets.fresh("g")
        if count == max(cfg.scale):
            timed(g, cfg)  # the process's first timed loop runs cold: not counted
            item["unprobed_ns"] = statistics.median(timed(g, cfg) for _ in range(3))
        kp.set_optimization(optimized)
        probes = [kp.Kprobe(addr=fn, pre_handler=peers.handler) for fn in fns]
        every = max(1, count // 20)
        gc.collect()
        walks = _heap_walks()
        done, reg_s, reg_cp = _timed_steps(probes, kp.register_kprobe, cfg.scale_budget, every)
        item.update(registered=done, register_s=reg_s, register_checkpoints=reg_cp,
                    optimized_while_registering=sum(p.is_optimized() for p in probes[:done]))
        if done < count:
            item["register_projected_s"] = _project(reg_cp, count)
        if optimized:
            t0 = time.perf_counter()
            kp.wait_for_kprobe_optimizer()
            item["optimize_s"] = time.perf_counter() - t0
        item["heap_walks_registering"] = _since(walks)
        nopt = sum(p.is_optimized() for p in probes[:done])
        errors = []
        if nopt != (done if optimized else 0):
            errors.append(f"{nopt} of {done} optimized")
        if "unprobed_ns" in item:
            peers.reset_hits()
            item["unprobed_armed_ns"] = statistics.median(timed(g, cfg) for _ in range(3))
            if peers.hits():
                errors.append(f"{peers.hits()} hits in the unprobed function")
        peers.reset_hits()
        for fn in fns[:done]:
            fn(1, 2)
        bad = sum(p.nhit != 1 for p in probes[:done])
        if bad or peers.hits() != done:
            errors.append(f"{bad} probes did not fire exactly once")
        item["hits"] = f"ok {done}/{done}" if not errors else "error"
        item["errors"] = errors
        registered = probes[:done]
        walks = _heap_walks()
        done_u, un_s, un_cp = _timed_steps(registered, kp.unregister_kprobe, cfg.scale_budget,
                                           every)
        item.update(unregistered=done_u, unregister_s=un_s, unregister_checkpoints=un_cp,
                    heap_walks_unregistering=_since(walks))
        if done_u < len(registered):
            item["unregister_projected_s"] = _project(un_cp, len(registered))
        kp.set_optimization(True)
        out.append(item)
        log(f"  scale {count} {how}: register {reg_s:.2f}s ({done}/{count}), "
            f"optimize {item.get('optimize_s', 0):.2f}s, unregister {un_s:.2f}s "
            f"({done_u}/{done}); heap walks {item['heap_walks_registering']} + "
            f"{item['heap_walks_unregistering']}")
        if done < count or done_u < len(registered):
            break  # what is left registered would distort any further step
    return out


# --------------------------------------------------------------------------- memory


def run_memory(targets: Targets, cfg: Config, log: Callable[[str], None]) -> list[dict]:
    """tracemalloc: memory allocated per probe by register (+ optimize), and what is left
    after unregistering (should be 0)."""
    out = []
    for optimized in (True, False):
        count = cfg.memory_probes
        _, fns = targets.generated(count)
        kp.set_optimization(optimized)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.take_snapshot()
        m0 = tracemalloc.get_traced_memory()[0]
        probes = [kp.Kprobe(addr=fn, pre_handler=peers.handler) for fn in fns]
        kp.register_kprobes(probes)
        if optimized:
            kp.wait_for_kprobe_optimizer()
        gc.collect()
        m1 = tracemalloc.get_traced_memory()[0]
        snap = tracemalloc.take_snapshot()
        top = snap.compare_to(base, "filename")[:6]
        kp.unregister_kprobes(probes)
        del probes
        kp.set_optimization(True)
        gc.collect()
        m2 = tracemalloc.get_traced_memory()[0]
        # The optimizer forgets replaced code in its next pass: run one, then look again.
        kp.wait_for_kprobe_optimizer()
        gc.collect()
        m3 = tracemalloc.get_traced_memory()[0]
        after = tracemalloc.take_snapshot()
        left_top = after.compare_to(base, "filename")[:4]
        tracemalloc.stop()
        how = "optimized" if optimized else "breakpoint"
        out.append({
            "mode": how, "count": count,
            "bytes_per_probe": (m1 - m0) / count,
            "left_per_probe": (m2 - m0) / count,
            "left_after_pass_per_probe": (m3 - m0) / count,
            "top": [(_short(s.traceback[0].filename), s.size_diff // count) for s in top],
            "left_top": [(_short(s.traceback[0].filename), s.size_diff // count)
                         for s in left_top],
        })
        log(f"  memory {how}: {(m1 - m0) / count:.0f} B/probe, left {(m2 - m0) / count:.0f}")
    return out


def _short(path: str) -> str:
    for marker in ("/src/", "/site-packages/", "/lib/python"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path)


# --------------------------------------------------------------------------- early


INIT_CHILD = r"""
import time, json, pykprobes
t0 = time.perf_counter_ns()
pykprobes.init_kprobes()
print(json.dumps({"ns": time.perf_counter_ns() - t0}))
"""

EARLY_CHILD = r"""
import os, sys, time, json
t = {}
try:
    import pykprobes
    boot = __import__("pykprobes.boot", fromlist=["x"])
except ImportError as exc:
    print(json.dumps({"status": "n/a", "reason": f"pykprobes.boot does not exist ({exc})"}))
    raise SystemExit(0)
start = getattr(boot, "start_from_environ", None)
is_early = getattr(pykprobes, "kprobes_is_early", None)
if start is None or is_early is None:
    print(json.dumps({"status": "n/a",
                      "reason": "no boot.start_from_environ() or kprobes_is_early()"}))
    raise SystemExit(0)
start()
import MODULE
if not is_early():
    print(json.dumps({"status": "error", "reason": "not early after the boot stage"}))
    raise SystemExit(0)
t0 = time.perf_counter_ns()
pykprobes.init_kprobes()
t1 = time.perf_counter_ns()
lines = [l for l in pykprobes.list_kprobes().splitlines() if "MODULE:" in l]
for i in range(COUNT):
    getattr(MODULE, f"h{i}")(1, 2)
print(json.dumps({"status": "ok", "ns": t1 - t0, "early_after": is_early(),
                  "probes": len(lines), "optimized": sum("[OPTIMIZED]" in l for l in lines)}))
"""


def run_early(targets: Targets, cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """One init_kprobes() converting 16 early probes, each sample a fresh interpreter
    (the conversion happens once per process)."""
    count = 16
    mod, _ = targets.generated(count)
    name = mod.__name__
    defs = ";".join(f"p:early/e{i},{name}:h{i},a=$arg1" for i in range(count))
    code = EARLY_CHILD.replace("MODULE", name).replace("COUNT", str(count))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYKPROBES"))}
    env["PYKPROBES_EVENTS"] = defs
    env["PYKPROBES_OUTPUT"] = os.devnull
    # The targets, and the pykprobes being measured when run.py --src put it on the path.
    env["PYTHONPATH"] = os.pathsep.join([targets.dir, *filter(None, [
        os.environ.get("PYTHONPATH")])])
    samples = []
    for _ in range(cfg.early_runs):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        try:
            answer = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"status": "error",
                    "reason": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        if answer["status"] != "ok":
            return answer
        if answer["probes"] != count or answer["early_after"] or answer["optimized"] != count:
            return {"status": "error", "reason": f"after init_kprobes(): {answer}"}
        samples.append(answer["ns"])
    # The same call in a process that was never early: the core's own initialisation.
    del env["PYKPROBES_EVENTS"]
    plain = []
    for _ in range(cfg.early_runs):
        proc = subprocess.run([sys.executable, "-c", INIT_CHILD], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        plain.append(json.loads(proc.stdout.strip().splitlines()[-1])["ns"])
    log(f"  early: {statistics.median(samples) / 1e3:.0f} us")
    return {"status": "ok", "count": count, "median_us": statistics.median(samples) / 1e3,
            "min_us": min(samples) / 1e3, "max_us": max(samples) / 1e3, "runs": len(samples),
            "init_only_us": statistics.median(plain) / 1e3}


# --------------------------------------------------------------------------- steps


def run_steps(cfg: Config, log: Callable[[str], None]) -> list[dict]:
    """Each step of the event's hit path, alone (ns per call, loop overhead removed): the
    pieces Event._record does after the kprobe's own hit path."""
    from _thread import get_native_id

    from pykprobes.core.regs import Regs
    from pykprobes.trace.backend import thread_key
    from pykprobes.trace.buffer import TraceBuffer
    from pykprobes.trace.fetchargs import compile_fetchargs

    class Arg:
        def __init__(self, body: str, pos: int) -> None:
            self.body, self.type, self.pos = body, None, pos

    def probed(a: int, b: int) -> Any:
        return sys._getframe()

    frame = probed(1, 2)  # a finished frame: f_locals still reads its variables
    fetch = compile_fetchargs([Arg("$arg1", 0), Arg("$arg2", 6)], is_return=False,
                              text="$arg1 $arg2", code=probed.__code__)
    regs = Regs(frame, 0)
    buf = TraceBuffer(1 << 20)
    record = (1, 2, "x", None, (1, 2), None)
    tid = get_native_id()

    def live_locals(a: int, b: int) -> Any:
        return sys._getframe().f_locals

    steps: list[tuple[str, str]] = [
        ("loop", "pass"),
        ("Regs(frame, 0)", "Regs(frame, 0)"),
        ("sys._getframe()", "getframe()"),
        ("get_ident()", "get_ident()"),
        ("frame.f_locals (a finished 2-argument frame)", "frame.f_locals"),
        ("f_locals of a running 2-argument frame (call included)", "live_locals(1, 2)"),
        ("a 2-argument call, for the row above", "probed(1, 2)"),
        ("fetch_two(regs): both fetchargs", "fetch(regs)"),
        ("get_native_id()", "get_native_id()"),
        ("time.monotonic_ns()", "monotonic_ns()"),
        ("thread_key() (resolved to tid and comm when read)", "thread_key()"),
        ("record tuple (6 fields)", "(1, tid, 'x', None, (1, 2), None)"),
        ("TraceBuffer.write(record)", "write(record)"),
        ("TraceBuffer.append(ts, key, event, values, caller, size)",
         "append(1, 2, None, (1, 2), None, 40)"),
    ]
    ns = {
        "Regs": Regs, "frame": frame, "getframe": sys._getframe,
        "get_ident": threading.get_ident, "fetch": fetch, "regs": regs,
        "get_native_id": get_native_id, "monotonic_ns": time.monotonic_ns,
        "thread_key": thread_key, "tid": tid, "write": buf.write, "append": buf.append,
        "record": record, "live_locals": live_locals,
        "probed": probed,
    }
    n = 20_000 if cfg.quick else 200_000
    reps = 3 if cfg.quick else 9
    results: dict[str, list[float]] = {label: [] for label, _ in steps}
    for _ in range(reps):
        for label, expr in steps:
            src = f"def run(n):\n    for _ in range(n):\n        {expr}\n"
            local: dict[str, Any] = {}
            exec(compile(src, "<step>", "exec"), ns, local)
            run = local["run"]
            run(1000)
            buf.clear()
            gc.disable()
            t0 = perf_ns()
            run(n)
            t1 = perf_ns()
            gc.enable()
            results[label].append((t1 - t0) / n)
    loop = statistics.median(results.pop("loop"))
    out = [{"step": label, "ns": statistics.median(v) - loop} for label, v in results.items()]
    log("  steps done")
    return out


# --------------------------------------------------------------------------- main


def libs() -> dict[str, str]:
    out = {}
    for name in ("bytecode", "wrapt"):
        try:
            mod = importlib.import_module(name)
            version = getattr(mod, "__version__", None) or getattr(mod, "version", "?")
            if name == "wrapt":
                try:
                    importlib.import_module("wrapt._wrappers")
                    version = f"{version} (_wrappers)"
                except ImportError:
                    version = f"{version} (pure Python)"
            out[name] = str(version) if not isinstance(version, tuple) else ".".join(
                map(str, version))
        except ImportError:
            out[name] = "not installed"
    out["pykprobes"] = f"{kp.__version__} from {Path(kp.__file__).parent.parent}"
    return out


def _run_child(part: str, args: argparse.Namespace, result: dict[str, Any],
               log: Callable[[str], None]) -> int:
    """Run one part in a fresh interpreter and merge its results; 1 if it failed."""
    with tempfile.TemporaryDirectory(prefix="pykprobes-bench-part-") as tmp:
        out = Path(tmp) / "part.json"
        cmd = [sys.executable, __file__, "--part", part, "--json", str(out)]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0 or not out.exists():
            log(f"  {part}: the child process exited {proc.returncode}")
            result.setdefault("failures", []).append(f"{part}: exit {proc.returncode}")
            return 1
        child = json.loads(out.read_text())
    for key, value in child.items():
        if key == "scale":
            result.setdefault("scale", []).extend(value)
        elif key in ("memory", "early", "elsewhere"):
            result[key] = value
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, help="rounds of the hit-cost table")
    parser.add_argument("--n", type=int, help="timed calls per run")
    parser.add_argument("--rows", metavar="KEY,KEY", help="with --part hits: only these rows "
                        "of the hit-cost table (e.g. A,E1o,E1b,B1,H,X1)")
    parser.add_argument("--part", default="all",
                        choices=["all", "scale", "hits", "ladder", "elsewhere", "steps",
                                 "scale-optimized", "scale-breakpoint", "memory", "early"])
    args = parser.parse_args(argv)
    cfg = Config(args.quick)
    if args.rounds:
        cfg.rounds = cfg.ladder_rounds = args.rounds
    if args.n:
        cfg.n = args.n
    start = time.monotonic()

    def log(text: str) -> None:
        print(f"[{sys.version_info[0]}.{sys.version_info[1]} "
              f"{time.monotonic() - start:6.1f}s] {text}", file=sys.stderr, flush=True)

    targets = Targets()
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "executable": sys.executable,
        "libs": libs(),
        "config": {"n": cfg.n, "warm": cfg.warm, "rounds": cfg.rounds,
                   "ladder_rounds": cfg.ladder_rounds, "quick": cfg.quick,
                   "elsewhere": cfg.elsewhere, "elsewhere_cycles": cfg.elsewhere_cycles,
                   "scale_budget_s": cfg.scale_budget, "memory_probes": cfg.memory_probes},
    }
    # The parts that register many probes run each in a fresh process: what one leaves
    # behind (a budget-stopped scale step, a fuller heap) must not weigh on another.
    isolated = ["elsewhere", "scale-optimized", "scale-breakpoint", "memory", "early"]
    groups = {"all": ["hits", "ladder", "steps", *isolated],
              "scale": ["scale-optimized", "scale-breakpoint", "memory"]}
    parts = groups.get(args.part, [args.part])
    failed = 0
    for part in parts:
        log(f"{part} ...")
        t0 = time.monotonic()
        if args.part in groups and part in isolated:
            failed += _run_child(part, args, result, log)
        elif part == "hits":
            cases = hit_cases()
            if args.rows:
                keys = set(args.rows.split(","))
                cases = [c for c in cases if c.key in keys]
            rows = run_rounds(cases, targets, cfg, cfg.rounds, Plain("A", ""), log)
            result["rows"] = [r.as_json(cfg) for r in rows]
            result["comparisons"] = comparisons(rows)
            result["event_goal"] = event_vs_peers(rows)
        elif part == "ladder":
            cases = [Plain("A", "baseline: unprobed call"), *ladder_cases(),
                     KprobeCase("K1o", "entry", True), ProtoInlineHit()]
            rows = run_rounds(cases, targets, cfg, cfg.ladder_rounds, Plain("A", ""), log)
            result["ladder"] = [r.as_json(cfg) for r in rows]
        elif part == "elsewhere":
            result["elsewhere"] = run_elsewhere(targets, cfg, log)
        elif part.startswith("scale-"):
            result.setdefault("scale", []).extend(
                run_scale(targets, cfg, log, part == "scale-optimized"))
        elif part == "memory":
            result["memory"] = run_memory(targets, cfg, log)
        elif part == "early":
            result["early"] = run_early(targets, cfg, log)
        elif part == "steps":
            result["steps"] = run_steps(cfg, log)
        result.setdefault("seconds", {})[part] = time.monotonic() - t0
    if failed:
        result["child_failures"] = failed
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    log("done")
    sys.stdout.flush()
    # A scale step that ran out of budget leaves probes registered: exit without the
    # interpreter's teardown of them.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
