"""Probe every line address of real modules, run their CPython tests, print the hit counts.

    python -m tests.core.every_line breakpoint|optimized MODULE [MODULE...]

Run by tests/core/test_every_line.py once per mechanism, in a subprocess each: the two
outputs must agree address by address. Every address of every line that has code, in every
function of the module (closures, nested functions, comprehensions and generator
expressions included), as `resolve_line()` gives them, is probed, named in one of three
ways taken in turn: the `ProbeAddress`, its code object and offset, its symbol name and
offset. The symbol-named probes are registered a second time once the others are
optimized: then the functions hold pykprobes' rewritten code, and resolution must still
find the original. The workload is the module's own CPython test (`test.test_MODULE`),
deterministic under a fixed PYTHONHASHSEED. Afterwards every probe is unregistered, and
every function object of the module (looked for in the whole heap: closures the workload
made too) must hold its original code object.

Prints one JSON object: per address its hit count, the addresses registration refused
(with the errno), the test results, the faults, the probes optimized, and what went wrong
(addresses outside the original code, probes that resolved elsewhere, functions left
holding other code).
"""

from __future__ import annotations

import errno
import gc
import importlib
import json
import sys
import unittest
import warnings
from types import CodeType, FunctionType
from typing import Any

import pykprobes as kp
from pykprobes.core.resolve import iter_code_tree, iter_module_functions

#: Tests left out of the workload for time alone: test_recursion_limit makes a million
#: hits on each of a few lines of find_longest_match, which every other difflib test runs.
SLOW_TESTS = frozenset({"test.test_difflib.TestSFpatches.test_recursion_limit"})


def _tree(code: CodeType) -> list[CodeType]:
    return [code, *(t.code for t in iter_code_tree(code, ""))]


def _names(codes: list[CodeType]) -> dict[int, str]:
    """A name per code object that is the same in every process: qualname, first line and
    rank among the codes sharing both (lambdas, generator expressions on one line)."""
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for code in sorted(codes, key=lambda c: (c.co_firstlineno, c.co_qualname, c.co_code,
                                             repr(c.co_consts))):
        base = f"{code.co_qualname}@{code.co_firstlineno}"
        rank = seen.get(base, 0)
        seen[base] = rank + 1
        names[id(code)] = f"{base}#{rank}"
    return names


class Census:
    def __init__(self, modules: list[str]) -> None:
        self.mods = [importlib.import_module(name) for name in modules]
        self.files = {mod.__file__ for mod in self.mods}
        # The original code of every function, kept alive: the end check compares
        # identities. Functions are looked for in the heap too: iter_module_functions()
        # does not see every one (a method made by a factory and stored under another name).
        tops = [top for mod in self.mods for top in iter_module_functions(mod)]
        tops += [obj.__code__ for obj in gc.get_objects()
                 if type(obj) is FunctionType and obj.__code__.co_filename in self.files]
        self.originals = {id(c): c for top in tops for c in _tree(top)}
        self.names = _names(list(self.originals.values()))
        self.probes: dict[str, kp.Kprobe] = {}
        self.by_symbol: dict[str, tuple[str, kp.ProbeAddress]] = {}
        self.refused: dict[str, str] = {}
        self.wrong: list[str] = []

    def addresses(self) -> list[tuple[str, Any, kp.ProbeAddress]]:
        """(key, module, address) of every line address, in source order."""
        found = []
        seen: set[str] = set()
        for mod in self.mods:
            lines = sorted({line for top in iter_module_functions(mod) for c in _tree(top)
                            for _, _, line in c.co_lines() if line is not None})
            for line in lines:
                try:
                    addrs = kp.resolve_line(f"{mod.__file__}:{line}")
                except kp.KprobeError:
                    continue  # only the module's top-level code is on that line
                for addr in addrs:
                    if self.originals.get(id(addr.code)) is not addr.code:
                        self.wrong.append(f"resolve_line {mod.__name__}:{line}: {addr!r}")
                        continue
                    key = f"{mod.__name__}:{self.names[id(addr.code)]}+{addr.offset}"
                    if key not in seen:
                        # Two lines can give one address: the entry, for the lines of a
                        # prologue (3.15: a generator expression gets its iterator there).
                        seen.add(key)
                        found.append((key, mod, addr))
        return found

    def register(self, key: str, p: kp.Kprobe, addr: kp.ProbeAddress) -> int:
        """Register `p` for the address `key`: 0, or the errno it was refused with."""
        p.pre_handler = _count
        try:
            kp.register_kprobe(p)
        except kp.KprobeError as exc:
            return exc.errno
        if p.addr != addr:
            self.wrong.append(f"{key} registered at {p.addr!r}")
            kp.unregister_kprobe(p)
        else:
            self.probes[key] = p
        return 0

    def register_all(self) -> None:
        for n, (key, mod, addr) in enumerate(self.addresses()):
            if n % 3 == 0:
                err = self.register(key, kp.Kprobe(addr=addr), addr)
            elif n % 3 == 1:
                err = self.register(key, kp.Kprobe(addr=addr.code, offset=addr.offset), addr)
            else:
                symbol = f"{mod.__name__}:{addr.code.co_qualname}"
                err = self.register(key, kp.Kprobe(symbol_name=symbol, offset=addr.offset),
                                    addr)
                if err == errno.EADDRNOTAVAIL:
                    # Not a unique qualname (lambdas, generator expressions): its address.
                    err = self.register(key, kp.Kprobe(addr=addr), addr)
                elif not err:
                    self.by_symbol[key] = (symbol, addr)
            if err:
                self.refused[key] = errno.errorcode[err]

    def register_symbols_again(self) -> None:
        """Register the symbol-named probes anew, in one batch, while the functions may
        hold rewritten code (after the optimizer ran)."""
        kp.unregister_kprobes([self.probes.pop(key) for key in self.by_symbol])
        again = {key: kp.Kprobe(symbol_name=symbol, offset=addr.offset, pre_handler=_count)
                 for key, (symbol, addr) in self.by_symbol.items()}
        kp.register_kprobes(again.values())
        for key, p in again.items():
            if p.addr != self.by_symbol[key][1]:
                self.wrong.append(f"{key} registered again at {p.addr!r}")
        self.probes.update(again)

    def rewritten(self) -> list[str]:
        gc.collect()
        return sorted(
            f"{obj.__qualname__} holds {obj.__code__!r}"
            for obj in gc.get_objects()
            if type(obj) is FunctionType and obj.__code__.co_filename in self.files
            and self.originals.get(id(obj.__code__)) is not obj.__code__
        )


def _workload(modules: list[str]) -> list[Any]:
    results = []
    for name in modules:
        test = importlib.import_module(f"test.test_{name}")
        suite = unittest.TestSuite(
            t for t in _flatten(unittest.defaultTestLoader.loadTestsFromModule(test))
            if t.id() not in SLOW_TESTS)
        result = unittest.TestResult()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            suite.run(result)
        results.append([test.__name__, result.testsRun,
                        sorted(t.id() for t, _ in result.failures + result.errors)])
    return results


def _flatten(suite: unittest.TestSuite) -> list[unittest.TestCase]:
    out: list[unittest.TestCase] = []
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            out.extend(_flatten(t))
        else:
            out.append(t)
    return out


def main(argv: list[str]) -> None:
    mode, modules = argv[0], argv[1:]
    optimized = mode == "optimized"
    # Registered with the optimizer off, then optimized in one pass: registered one by
    # one under a running optimizer, each code would be rebuilt once per probe.
    kp.set_optimization(False)
    census = Census(modules)
    census.register_all()
    if optimized:
        kp.set_optimization(True)
        kp.wait_for_kprobe_optimizer()
    census.register_symbols_again()
    kp.wait_for_kprobe_optimizer()
    probes = census.probes
    nopt = sum(1 for p in probes.values() if p.is_optimized())
    results = _workload(modules)
    hits = {key: p.nhit for key, p in probes.items()}
    faults = sum(p.nfault for p in probes.values())
    missed = sum(p.nmissed for p in probes.values())
    kp.unregister_kprobes(probes.values())
    kp.wait_for_kprobe_optimizer()
    print(json.dumps({
        "hits": hits, "refused": census.refused, "results": results, "faults": faults,
        "missed": missed, "probes": len(probes), "optimized": nopt,
        "wrong": census.wrong, "rewritten": census.rewritten(), "left": kp.list_kprobes(),
    }))


def _count(p: kp.Kprobe, regs: kp.Regs) -> None:
    pass  # p.nhit counts


if __name__ == "__main__":
    main(sys.argv[1:])
