"""Probed code serializes as the program's own (issue 16, item 2): while optimized probes
are on a function, `marshal.dumps(f.__code__)` works, and cloudpickle (how joblib, dask
and ray ship functions) pickles it with nothing of pykprobes in it: the function rebuilt
in a process where pykprobes cannot even be imported behaves as the original."""

from __future__ import annotations

import builtins
import copy
import marshal
import pickle
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from types import FunctionType
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.arch.rewrite import callees
from pykprobes.trace.tracefs import TraceFS
from tests.core import targets
from tests.testenv import OPTIMIZED, REWRITTEN

cloudpickle = pytest.importorskip("cloudpickle")

#: Runs a pickled call in a new interpreter where importing pykprobes fails.
ELSEWHERE = textwrap.dedent("""
    import sys
    # Any import of pykprobes raises ImportError; what site imported at start-up (3.15's
    # _pykprobes.start, PEP 829, imports pykprobes.boot) is made unimportable too.
    for name in ["pykprobes", *(m for m in sys.modules if m.startswith("pykprobes."))]:
        sys.modules[name] = None
    import pickle
    func, args = pickle.loads(sys.stdin.buffer.read())
    result = func(*args)
    print(repr(list(result) if hasattr(result, "__next__") else result))
    assert not [m for m, mod in sys.modules.items() if m.startswith("pykprobes") and mod]
""")


def _elsewhere(func: Any, *args: Any) -> str:
    data = cloudpickle.dumps((func, args))
    proc = subprocess.run([sys.executable, "-c", ELSEWHERE], input=data,
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    return proc.stdout.decode().strip()


@pytest.fixture
def by_value() -> Iterator[None]:
    """Pickle the targets' functions by value, as cloudpickle does for `__main__`'s."""
    cloudpickle.register_pickle_by_value(targets)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(targets)


def test_a_probed_function_marshals_and_pickles(by_value: None) -> None:
    closure = targets.make_adder(5)
    probes = [kp.Kprobe(symbol_name="tests.core.targets:add", pre_handler=lambda p, r: None),
              kp.Kprobe(symbol_name="tests.core.targets:make_adder.<locals>.adder",
                        pre_handler=lambda p, r: None)]
    kp.register_kprobes(probes)
    try:
        kp.wait_for_kprobe_optimizer()
        assert all(p.is_optimized() == OPTIMIZED for p in probes)
        for func, args, result in ((targets.add, (2, 3), 5), (closure, (1,), 6)):
            assert func(*args) == result
            # marshal writes it, and the copy runs here as the function does.
            data = marshal.dumps(func.__code__)
            again = FunctionType(marshal.loads(data), vars(targets), None, None,
                                 func.__closure__)
            assert again(*args) == result
            # By value, with the globals its code names: nothing of pykprobes in it.
            assert _elsewhere(func, *args) == repr(result)
            # Code objects copy as themselves; plain pickle takes a module function by
            # name, and refuses a code object, probed or not.
            assert copy.copy(func.__code__) is func.__code__
            assert copy.deepcopy(func) is func
        read = [*callees.names_of(targets.add.__code__), *callees.names_of(closure.__code__)]
        assert bool(read) == REWRITTEN
        assert pickle.loads(pickle.dumps(targets.add)) is targets.add
        with pytest.raises(TypeError):
            pickle.dumps(targets.add.__code__)
        assert probes[0].nhit >= 1 and probes[1].nhit >= 1
    finally:
        kp.unregister_kprobes(probes)
    kp.wait_for_kprobe_optimizer()
    # The names the rewritten code read are gone with it (the fixture checks the code).
    assert not set(read) & {*vars(targets), *vars(builtins)}


def test_return_probes_and_compiled_events_pickle(by_value: None) -> None:
    """The return hooks of a kretprobe (on a generator: 3.11's StopIteration converter
    too) and the recorder of a compiled event are loaded by name as well."""
    rp = kp.Kretprobe(symbol_name="tests.core.targets:counter", handler=lambda ri, r: None)
    kp.register_kretprobe(rp)
    fs = TraceFS()
    try:
        event = fs.define("p:ser/add tests.core.targets:add a b")
        assert event is not None
        event.enable()
        kp.wait_for_kprobe_optimizer()
        assert list(targets.counter(3)) == [0, 1, 2]
        assert targets.add(1, 2) == 3
        marshal.dumps(targets.counter.__code__)
        marshal.dumps(targets.add.__code__)
        assert _elsewhere(targets.counter, 3) == "[0, 1, 2]"
        assert _elsewhere(targets.add, 4, 5) == "9"
        assert rp.nhit == 1
        assert "a=1 b=2" in fs.read("trace")
    finally:
        for ev in list(fs.events.values()):
            ev.disable()
        fs.clear()
        kp.unregister_kretprobe(rp)
