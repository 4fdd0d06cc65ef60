"""Real third-party code under probes: `packaging` (a dependency of pytest, so it is in
every test environment) behaves the same with an entry probe on every one of its functions,
and the probes see its calls."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.core.resolve import iter_module_functions
from tests.testenv import OPTIMIZED

MODULES = ("packaging.version", "packaging.specifiers", "packaging.requirements",
           "packaging.markers", "packaging.utils")

VERSIONS = ["1.0", "1.0.post1", "2!1.0", "1.0a1", "1.0b2.dev3", "1.0rc1+local.7", "0.9",
            "1.0.0", "10.0", "1.1.dev0", "3.11.7", "3.12.1", "3.13.0", "1!0.1", "not a version"]
SPECS = [">=1.0", "~=1.0", "==1.0.*", "!=1.0.post1,<2", ">1.0a1", "===1.0", "<=0.9"]
REQS = ['requests[security]>=2.8.1,==2.8.*; python_version < "2.7"',
        "name @ https://example.invalid/name.zip", 'pkg; os_name == "posix" and extra == "x"']


def workload() -> list[Any]:
    from packaging import markers, requirements, specifiers, utils, version

    out: list[Any] = []
    parsed = []
    for v in VERSIONS:
        try:
            parsed.append(version.Version(v))
            out.append(str(parsed[-1]))
        except version.InvalidVersion as exc:
            out.append(f"invalid: {exc}")
    out.append([str(v) for v in sorted(parsed)])
    for spec in SPECS:
        s = specifiers.SpecifierSet(spec)
        out.append((spec, [str(v) for v in s.filter(parsed, prereleases=True)]))
    for req in REQS:
        r = requirements.Requirement(req)
        out.append((r.name, sorted(r.extras), str(r.specifier), str(r.marker), r.url))
        if r.marker is not None:
            out.append(r.marker.evaluate({"extra": "x"}))
    out.append(utils.canonicalize_name("Foo.Bar_baz"))
    out.append(markers.Marker('python_version >= "3"').evaluate())
    return out


def test_packaging_under_probes() -> None:
    expected = workload()
    codes: dict[int, Any] = {}
    for name in MODULES:
        for code in iter_module_functions(importlib.import_module(name)):
            codes[id(code)] = code
    probes = [kp.Kprobe(addr=c, pre_handler=lambda p, regs: regs.args) for c in codes.values()]
    kp.register_kprobes(probes)
    try:
        kp.wait_for_kprobe_optimizer()
        assert workload() == expected
        hit = [p for p in probes if p.nhit]
        assert len(probes) > 100 and len(hit) > 30
        assert sum(p.nfault for p in probes) == 0
        if OPTIMIZED:
            optimized = [p for p in probes if p.flags & kp.KPROBE_FLAG_OPTIMIZED]
            assert len(optimized) == len(probes)
    finally:
        kp.unregister_kprobes(probes)
    assert workload() == expected
    assert all(p.addr.code is c for p, c in zip(probes, codes.values(), strict=True))


def test_packaging_functions_keep_their_code_after_unregister() -> None:
    from packaging import version

    before = version.Version.__init__.__code__
    p = kp.Kprobe(symbol_name="packaging.version:Version.__init__")
    kp.register_kprobe(p)
    kp.wait_for_kprobe_optimizer()
    version.Version("1.2.3")
    kp.unregister_kprobe(p)
    assert p.nhit == 1
    assert version.Version.__init__.__code__ is before


@pytest.fixture(autouse=True)
def _need_packaging() -> None:
    pytest.importorskip("packaging", reason="capability: packaging is not installed")
