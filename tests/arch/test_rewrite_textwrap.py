"""A real module, rewritten everywhere: textwrap under CPython's own test_textwrap, and the
pure-Python parts of json.

In a subprocess (so that nothing leaks into this one), every function and method of
`textwrap`, and the pure-Python functions of `json.decoder`, `json.encoder` and
`json.scanner`, get a counting hit at every offset `check_optimizable` accepts; nested code
objects (closures, comprehensions on 3.11, lambdas) are rewritten too and handed to their
parent's build as replaced constants; each function's `__code__` is swapped in place.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")

PROGRAM = r"""
import collections, inspect, io, json, sys, types, unittest
sys.path.insert(0, SRC)
import textwrap, json.decoder, json.encoder, json.scanner
from pykprobes.arch.rewrite import RewriteArch

arch = RewriteArch()
hits = collections.Counter()
stats = collections.Counter()

def make_hit(key):
    def hit():
        hits[key] += 1
    return hit

ends = collections.defaultdict(collections.Counter)

def make_ends(name):
    counts = ends[name]
    def entry():
        counts["entries"] += 1
    def on_return(value):
        counts["returns"] += 1
    def on_unwind(exc):
        counts["unwinds"] += 1
    return entry, (on_return, on_unwind)

def rewrite_returns(code):
    # Every function (nested ones too: closures, lambdas, 3.11 comprehensions) with an
    # entry hit and return hooks, counted per code object.
    consts = {}
    for i, const in enumerate(code.co_consts):
        if isinstance(const, types.CodeType):
            consts[i] = rewrite_returns(const)
    name = f"{code.co_qualname}:{code.co_firstlineno}"
    entry, returns = make_ends(name)
    stats["codes"] += 1
    return arch.build(code, {0: entry}, consts, returns).code

def rewrite(code, key):
    if key == "returns":
        return rewrite_returns(code)
    consts = {}
    for i, const in enumerate(code.co_consts):
        if isinstance(const, types.CodeType):
            consts[i] = rewrite(const, key)
    probes = {}
    for off in range(0, len(code.co_code), 2):
        if arch.check_optimizable(code, off) is None:
            probes[off] = make_hit(key)
        else:
            stats["refused-or-inside"] += 1
    stats["codes"] += 1
    stats["probes"] += len(probes)
    return arch.build(code, probes, consts).code

def functions_of(module):
    for obj in list(vars(module).values()):
        if inspect.isfunction(obj) and obj.__module__ == module.__name__:
            yield obj
        elif inspect.isclass(obj) and obj.__module__ == module.__name__:
            for attr in vars(obj).values():
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                if isinstance(attr, property):
                    yield from (f for f in (attr.fget, attr.fset, attr.fdel) if f is not None)
                elif inspect.isfunction(attr):
                    yield attr

def swap(module, key):
    for fn in functions_of(module):
        fn.__code__ = rewrite(fn.__code__, key)
        stats["functions:" + key] += 1

def json_outputs():
    data = {"a": [1, 2.5, None, True, {"b": "caf\u00e9 \n \"q\""}], "c": []}
    text = json.dumps(data, indent=2, sort_keys=True)
    scan = json.scanner.py_make_scanner(json.JSONDecoder())
    return [
        text,
        json.encoder.py_encode_basestring_ascii("caf\u00e9\n"),
        json.decoder.py_scanstring('"x\\u00e9y\\n" tail', 1),
        repr(scan(text, 0)),
        repr(json.decoder.JSONDecoder().decode(text)),
    ]

swapping = sys.argv[1] == "swap"
before = json_outputs()
if swapping:
    swap(textwrap, "textwrap")
    for module in (json.decoder, json.encoder, json.scanner):
        swap(module, "json")
if sys.argv[1] == "returns":
    swap(textwrap, "returns")
after = json_outputs()
hits_json = hits["json"]

suite = unittest.defaultTestLoader.loadTestsFromName("test.test_textwrap")
result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
print(json.dumps({
    "run": result.testsRun,
    "ok": result.wasSuccessful(),
    "problems": [str(t) for t, _ in result.failures + result.errors][:10],
    "hits": dict(hits),
    "hits_json_outputs": hits_json,
    "json_same": before == after,
    "stats": dict(stats),
    "ends": {name: dict(c) for name, c in ends.items()},
}))
"""


def run(mode: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", f"SRC = {SRC!r}\n" + PROGRAM, mode],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def needs_test_textwrap() -> None:
    if importlib.util.find_spec("test.test_textwrap") is None:
        pytest.skip(
            "capability: CPython's own test suite (test.test_textwrap) is not installed with "
            "this interpreter"
        )


def test_textwrap_and_json_rewritten_everywhere() -> None:
    needs_test_textwrap()
    baseline = run("baseline")
    rewritten = run("swap")
    assert baseline["ok"] and baseline["run"] > 0
    assert rewritten["ok"], rewritten["problems"]
    assert rewritten["run"] == baseline["run"]
    stats = rewritten["stats"]
    assert isinstance(stats, dict)
    assert stats["functions:textwrap"] >= 10 and stats["functions:json"] >= 10
    hits = rewritten["hits"]
    assert isinstance(hits, dict)
    assert hits["textwrap"] > 0
    assert rewritten["json_same"] and isinstance(rewritten["hits_json_outputs"], int)
    assert rewritten["hits_json_outputs"] > 0


def test_textwrap_with_return_probes_everywhere() -> None:
    """Every function of textwrap (and the code nested in them) with an entry hit and
    return hooks: CPython's test_textwrap still passes, and every frame that started ended
    once, by a return or an exception (TextWrapper raises ValueError for bad widths, and
    the tests check that)."""
    needs_test_textwrap()
    baseline = run("baseline")
    rewritten = run("returns")
    assert rewritten["ok"], rewritten["problems"]
    assert rewritten["run"] == baseline["run"]
    ends = rewritten["ends"]
    assert isinstance(ends, dict)
    unbalanced = {
        name: c
        for name, c in ends.items()
        if c.get("entries", 0) != c.get("returns", 0) + c.get("unwinds", 0)
    }
    assert not unbalanced
    called = [c for c in ends.values() if c.get("entries")]
    assert len(called) >= 10
    assert sum(c.get("unwinds", 0) for c in ends.values()) > 0
    assert sum(c.get("returns", 0) for c in ends.values()) > 1000
