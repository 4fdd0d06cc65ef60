"""Switching the functions that hold one version of a probed code object to another.

A function holds its code in `__code__`, and nothing in CPython lists the functions of a
code object: finding them all means walking the whole heap (`gc.get_referrers`), about a
millisecond per 100,000 objects. Doing that once per code object made 10,000 probes
quadratic (bench/results/ANALYSIS.md, "Scale"). So:

* Switches are batched: `Switches` collects, for each code state, the versions its holders
  must leave; `flush()` points them at the state's current version with one heap walk for
  the whole batch, at most. A batch is flushed before the table lock is released and
  before any retired version is forgotten: until then the versions being left stay covered
  (their call sequences, or breakpoints armed on them as on any retired version).
* A walk's result is kept (weak references to the functions found) and reused without a
  walk when it is *proven* complete. The proof is a reference count, for a version we built
  (never the original: the program and our own tables hold it in ways we cannot count): if
  `sys.getrefcount(code)` equals the references we can see one by one, each checked by
  identity (the Version objects, the breakpoint table entries of the state, the known
  functions whose `__code__` it is, the parent versions' `co_consts`), there is no other
  reference, hence no other holder. Anything else that holds it (a closure made since from
  the parent's constants, a copy made with `FunctionType(f.__code__, ...)`, a running frame,
  a traceback, a breakpoint arch's own table) makes the count larger, and we walk, as
  before. Extra references can only make us walk; the one way to be wrong would be to
  count a reference that is not there, so each one is checked, and what `getrefcount`
  itself adds is measured once, at import, on a code object with a single known reference.

Every function here expects the table lock to be held.
"""

from __future__ import annotations

import gc
import sys
import weakref
from types import CodeType, FunctionType
from typing import TYPE_CHECKING, Final

from pykprobes import env

if TYPE_CHECKING:
    from pykprobes.core.codestate import CodeState, Version


class Switches:
    """The holder switches of one batch: per code state, the versions being left."""

    __slots__ = ("leaving", "walks")

    def __init__(self) -> None:
        #: id(state) -> (state, [versions its holders may still hold]).
        self.leaving: dict[int, tuple[CodeState, list[Version]]] = {}
        #: Heap walks done by this batch's flushes (0 or 1 each; for tests and the bench).
        self.walks = 0

    def add(self, state: CodeState, old: Version) -> None:
        entry = self.leaving.get(id(state))
        if entry is None:
            self.leaving[id(state)] = (state, [old])
        elif all(v is not old for v in entry[1]):
            entry[1].append(old)

    def flush(self) -> None:
        """Point every holder of a version being left at its state's current version."""
        leaving, self.leaving = self.leaving, {}
        walk: dict[int, CodeState] = {}  # id(old code) -> its state
        olds: list[CodeType] = []
        for state, versions in leaving.values():
            current = state.current.code
            for old in versions:
                if old.code is current or id(old.code) in walk:
                    continue
                known = known_holders(state, old, versions)
                if known is None:
                    walk[id(old.code)] = state
                    olds.append(old.code)
                    continue
                for func in known:
                    func.__code__ = current
        if not olds:
            return
        self.walks += 1
        for obj in gc.get_referrers(*olds):
            if type(obj) is FunctionType:
                held = walk.get(id(obj.__code__))
                if held is not None:
                    obj.__code__ = held.current.code
                    remember(held, obj)
        del olds
        for state in {id(s): s for s in walk.values()}.values():
            _forget_dead(state)


def remember(state: CodeState, func: FunctionType) -> None:
    """`func` holds a version of `state`'s code."""
    state.holders[id(func)] = weakref.ref(func)


def _forget_dead(state: CodeState) -> None:
    dead = [key for key, ref in state.holders.items() if ref() is None]
    for key in dead:
        del state.holders[key]


def known_holders(
    state: CodeState, old: Version, batch: list[Version]
) -> list[FunctionType] | None:
    """The functions holding `old.code`, if every reference to it is accounted for (see the
    module docstring); None when a heap walk is needed. `batch`: the state's versions
    being left in this batch (Version objects that may have left the state already).

    The caller must not keep `old.code` in a variable of its own: that would only make the
    count larger (and the proof fail), never wrong."""
    if _CALL_REFS is None or old.code is state.original:
        return None
    refs = _refcount(old)
    code = old.code
    counted = 0
    seen_versions: dict[int, Version] = {}
    for v in (state.current, *state.retired, *batch):
        if v.code is code:
            seen_versions[id(v)] = v
    counted += len(seen_versions)
    counted += sum(1 for entry in state.armed.values() if entry[0] is code)
    counted += sum(1 for c in state.ret_armed.values() if c is code)
    funcs: dict[int, FunctionType] = {}
    for ref in state.holders.values():
        func = ref()
        if func is not None and func.__code__ is code:
            funcs[id(func)] = func
    counted += len(funcs)
    parent = state.parent
    if parent is not None:
        tuples: dict[int, tuple[object, ...]] = {}
        for v in (parent.current, *parent.retired):
            tuples[id(v.code.co_consts)] = v.code.co_consts
        tuples[id(parent.original.co_consts)] = parent.original.co_consts
        counted += sum(1 for consts in tuples.values() for c in consts if c is code)
    # `code` above is one more reference, made after `refs` was taken.
    del code
    return list(funcs.values()) if refs == counted else None


def _refcount(version: Version) -> int:
    """References to `version.code`, less the ones this call makes."""
    assert _CALL_REFS is not None
    return _getrefcount(version) - _CALL_REFS


def _getrefcount(holder: Version | _Holder) -> int:
    return sys.getrefcount(holder.code)


class _Holder:
    """Holds `code` in a slot, as Version does."""

    __slots__ = ("code",)
    code: CodeType


def _call_refs() -> int | None:
    """What `_getrefcount` counts beyond the real references, measured on a fresh code
    object whose only reference is a slot; None when reference counts cannot serve as a
    proof here."""
    if env.FREE_THREADED:
        # PEP 703 builds defer and split reference counts: getrefcount is not exact there.
        return None
    holder = _Holder()
    holder.code = compile("None", "<pykprobes refcount probe>", "eval")
    extra = _getrefcount(holder) - 1
    # 1 on 3.11-3.13 (getrefcount's argument); anything else is not understood: then we
    # walk the heap every time.
    return extra if extra in (1, 2) else None


_CALL_REFS: Final = _call_refs()
