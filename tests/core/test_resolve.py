"""Symbol resolution: every kind of function a user names, and source lines."""

from __future__ import annotations

import errno
import inspect
from typing import Any

import pytest

import pykprobes as kp
from tests.core import targets


def _probe(symbol: str, call: Any, *args: Any) -> kp.Kprobe:
    seen: list[dict[str, Any]] = []
    p = kp.Kprobe(symbol_name=symbol, pre_handler=lambda p, r: seen.append(dict(r.args)))
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        call(*args)
        call(*args)
        assert p.nhit == 2, (symbol, p)
        assert seen and all(isinstance(s, dict) for s in seen)
    finally:
        kp.unregister_kprobe(p)
    return p


@pytest.mark.parametrize(
    ("symbol", "call", "args"),
    [
        ("tests.core.targets:add", targets.add, (1, 2)),
        ("tests.core.targets:Widget.grow", lambda: targets.Widget(1).grow(2), ()),
        ("tests.core.targets:Widget.__init__", targets.Widget, (3,)),
        ("tests.core.targets:Widget.make", targets.Widget.make, (4,)),
        ("tests.core.targets:Widget.unit", targets.Widget.unit, ()),
        ("tests.core.targets:Widget.size", lambda: targets.Widget(1).size, ()),
        ("tests.core.targets:Widget.size.fget", lambda: targets.Widget(1).size, ()),
        ("tests.core.targets:Widget.size.fset",
         lambda: setattr(targets.Widget(1), "size", 5), ()),
        ("tests.core.targets:decorated", targets.decorated, (5,)),
        ("tests.core.targets:logged.<locals>.wrapper", targets.decorated, (5,)),
        ("tests.core.targets:<lambda>", targets.square, (3,)),
        ("tests.core.targets:outer.<locals>.inner", targets.outer, (2,)),
        ("tests.core.targets:make_adder.<locals>.adder", lambda: targets.make_adder(1)(2), ()),
    ],
)
def test_symbol_kinds(symbol: str, call: Any, args: tuple[Any, ...]) -> None:
    _probe(symbol, call, *args)


def test_decorated_resolves_to_the_wrapped_function() -> None:
    p = kp.Kprobe(symbol_name="tests.core.targets:decorated")
    kp.register_kprobe(p)
    try:
        assert p.addr.code.co_qualname == "decorated"
    finally:
        kp.unregister_kprobe(p)


def test_existing_closures_are_probed_too() -> None:
    """A closure created before registration shares the code: it is probed (both mechanisms:
    the optimizer switches every function holding the code)."""
    early = targets.make_adder(10)
    p = kp.Kprobe(symbol_name="tests.core.targets:make_adder.<locals>.adder")
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        late = targets.make_adder(20)
        assert early(1) == 11 and late(1) == 21
        assert p.nhit == 2
    finally:
        kp.unregister_kprobe(p)
    assert early.__code__ is late.__code__ is p.addr.code


def test_nested_function_probe_and_outer_probe_together() -> None:
    outer = kp.Kprobe(symbol_name="tests.core.targets:outer")
    inner = kp.Kprobe(symbol_name="tests.core.targets:outer.<locals>.inner")
    kp.register_kprobes([outer, inner])
    try:
        kp.wait_for_kprobe_optimizer()
        assert targets.outer(3) == 7
        assert (outer.nhit, inner.nhit) == (1, 1)
        kp.unregister_kprobe(outer)
        assert targets.outer(3) == 7
        assert inner.nhit == 2
    finally:
        kp.unregister_kprobes([outer, inner])


def test_ambiguous_lambda_is_not_unique(tmp_path: Any, monkeypatch: Any) -> None:
    (tmp_path / "twolambdas.py").write_text("a = lambda: 1\nb = lambda: 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import twolambdas  # noqa: F401

    with pytest.raises(kp.KprobeError) as info:
        kp.register_kprobe(kp.Kprobe(symbol_name="twolambdas:<lambda>"))
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_offset_probe_sees_computed_local() -> None:
    import dis

    code = targets.add.__code__
    store = next(i for i in dis.get_instructions(code) if i.opname == "STORE_FAST")
    after = next(i for i in dis.get_instructions(code) if i.offset > store.offset)
    seen: list[int] = []
    p = kp.Kprobe(symbol_name="tests.core.targets:add", offset=after.offset,
                  pre_handler=lambda p, r: seen.append(r.frame.f_locals["c"]))
    kp.register_kprobe(p)
    try:
        kp.wait_for_kprobe_optimizer()
        assert targets.add(20, 22) == 42
        assert seen == [42]
        assert p.addr.offset == after.offset
    finally:
        kp.unregister_kprobe(p)


def test_resolve_line_gives_every_address() -> None:
    src, first = inspect.getsourcelines(targets.loop_sum)
    lineno = first + next(i for i, line in enumerate(src) if "LOOP-BODY" in line)
    addrs = kp.resolve_line(f"{targets.__file__}:{lineno}")
    assert addrs and all(a.code is targets.loop_sum.__code__ for a in addrs)
    probes = [kp.Kprobe(addr=a, pre_handler=lambda p, r: None) for a in addrs]
    kp.register_kprobes(probes)
    try:
        kp.wait_for_kprobe_optimizer()
        assert targets.loop_sum(5) == 10
        assert sum(p.nhit for p in probes) == 5
        for p in probes:
            assert kp.get_kprobe(p.addr) is p
    finally:
        kp.unregister_kprobes(probes)


@pytest.mark.parametrize("spec", ["nofile.py:3", "x", "file.py:0", "file.py:abc"])
def test_resolve_line_errors(spec: str) -> None:
    with pytest.raises(kp.KprobeError):
        kp.resolve_line(spec)


def test_resolve_line_without_code() -> None:
    with pytest.raises(kp.KprobeError) as info:
        kp.resolve_line(f"{targets.__file__}:1")  # the module docstring
    assert info.value.errno == errno.ENOENT


def test_a_body_on_the_def_line_is_probed_by_line_and_by_offset(
    tmp_path: Any, monkeypatch: Any, request: Any
) -> None:
    """cpython#155992 (3.13+, open): the LINE event does not fire for a statement on the same
    line as `def`/`lambda` unless PY_START is set too. Probes never ride on LINE (a line is
    resolved to addresses: INSTRUCTION/PY_START events or rewritten code), so such a body
    is hit like any other."""
    import dis
    import importlib
    import sys

    (tmp_path / "pykprobes_defline.py").write_text(
        "def f(x): return x * 3\nlam = lambda y: y - 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("pykprobes_defline")
    request.addfinalizer(lambda: sys.modules.pop("pykprobes_defline", None))
    mul = next(i.offset for i in dis.get_instructions(mod.f) if i.opname == "BINARY_OP")
    probes = [
        kp.Kprobe(addr=a, pre_handler=lambda p, r: None)
        for line in (1, 2)
        for a in kp.resolve_line(f"{mod.__file__}:{line}")
    ]
    probes.append(kp.Kprobe(addr=kp.ProbeAddress(mod.f.__code__, mul),
                            pre_handler=lambda p, r: None))
    kp.register_kprobes(probes)
    try:
        kp.wait_for_kprobe_optimizer()
        assert (mod.f(2), mod.lam(2)) == (6, 1)
        assert (mod.f(3), mod.lam(3)) == (9, 2)
        assert {p.addr.code.co_name for p in probes} == {"f", "<lambda>"}
        assert [p.nhit for p in probes] == [2] * len(probes)
    finally:
        kp.unregister_kprobes(probes)
