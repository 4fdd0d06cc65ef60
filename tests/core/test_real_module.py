"""A real module under probes behaves the same: an entry probe on every function of a
standard-library module, and that module's own CPython tests run with the probes armed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.testenv import ARCH, OPTIMIZED

RUNNER = r'''
import json, os, sys, unittest, warnings
import pykprobes as kp
from pykprobes.core.resolve import iter_module_functions

module_name, test_name, mode = sys.argv[1:4]
kp.set_optimization(os.environ["PYKPROBES_ARCH"] == "optimized")
module = __import__(module_name, fromlist=["_"])
probes = []
entries, ends = {}, {}
def on_entry(ri, regs):
    entries[ri.rp] = entries.get(ri.rp, 0) + 1
def on_end(ri, regs):
    ends[ri.rp] = ends.get(ri.rp, 0) + 1
codes = {id(c): c for c in iter_module_functions(module)}
if mode == "probed":
    probes = [kp.Kprobe(addr=c, pre_handler=lambda p, regs: regs.args) for c in codes.values()]
    kp.register_kprobes(probes)
    kp.wait_for_kprobe_optimizer()
elif mode == "retprobed":
    probes = [kp.Kretprobe(addr=c, entry_handler=on_entry, handler=on_end, maxactive=4096)
              for c in codes.values()]
    kp.register_kretprobes(probes)
    kp.wait_for_kprobe_optimizer()
suite = unittest.defaultTestLoader.loadTestsFromName(test_name)
result = unittest.TestResult()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    suite.run(result)
if probes:
    kp.wait_for_kprobe_optimizer()
print(json.dumps({
    "run": result.testsRun,
    "failed": sorted(t.id() for t, _ in result.failures + result.errors),
    "probes": len(probes),
    "hit": sum(1 for p in probes if p.nhit),
    "hits": sum(p.nhit for p in probes),
    "faults": sum(p.nfault for p in probes),
    "missed": sum(p.nmissed for p in probes),
    "optimized": sum(1 for p in probes if p.flags & kp.KPROBE_FLAG_OPTIMIZED),
    "unbalanced": sorted(rp.symbol for rp in entries if entries[rp] != ends.get(rp, 0)),
    "entries": sum(entries.values()),
}))
if mode == "retprobed":
    kp.unregister_kretprobes(probes)
else:
    kp.unregister_kprobes(probes)
'''


def _run(module: str, test: str, mode: str) -> dict[str, object]:
    env = {**os.environ, "PYKPROBES_ARCH": ARCH}
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", RUNNER, module, test,
                           mode], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("module", "test"), [("textwrap", "test.test_textwrap"),
                                              ("difflib", "test.test_difflib")])
def test_stdlib_module_tests_pass_under_probes(module: str, test: str) -> None:
    if importlib.util.find_spec("test") is None or \
            importlib.util.find_spec(test) is None:
        pytest.skip(f"capability: this interpreter does not ship {test} (Lib/test)")
    plain = _run(module, test, "plain")
    probed = _run(module, test, "probed")
    assert probed["run"] == plain["run"]
    assert set(probed["failed"]) <= set(plain["failed"])  # type: ignore[arg-type]
    assert probed["probes"] and probed["hit"] and probed["hits"]
    assert probed["faults"] == 0
    if OPTIMIZED:
        assert probed["optimized"] == probed["probes"]


@pytest.mark.parametrize(("module", "test"), [("textwrap", "test.test_textwrap"),
                                              ("difflib", "test.test_difflib")])
def test_stdlib_module_tests_pass_under_return_probes(module: str, test: str) -> None:
    """A return probe on every function: the tests pass, and for every function the number
    of entries equals the number of returns plus exception exits."""
    if importlib.util.find_spec("test") is None or \
            importlib.util.find_spec(test) is None:
        pytest.skip(f"capability: this interpreter does not ship {test} (Lib/test)")
    plain = _run(module, test, "plain")
    probed = _run(module, test, "retprobed")
    assert probed["run"] == plain["run"]
    assert set(probed["failed"]) <= set(plain["failed"])  # type: ignore[arg-type]
    assert probed["hit"] and probed["entries"]
    assert probed["unbalanced"] == []
    assert probed["faults"] == 0 and probed["missed"] == 0
    if OPTIMIZED:
        assert probed["optimized"] == probed["probes"]
