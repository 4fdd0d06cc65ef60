"""Build a code object with call sequences inserted before chosen instructions.

The `bytecode` library does the assembling: it turns the code into abstract instructions
whose jumps point at `Label`s and whose exception-table ranges are `TryBegin`/`TryEnd`
markers, we insert our instructions, and it resolves labels (adding EXTENDED_ARG where a
jump grows), rebuilds the exception table and the location table.

Where an instruction X gets a call sequence, the sequence goes *after* the markers that
precede X and right before X itself, so

* a Label on X (X was a jump target or an exception handler) now marks the sequence's first
  instruction: every path that reached X runs the sequence first;
* the sequence lies inside exactly the exception-table ranges X lies in;
* each injected instruction carries X's location, so `co_lines()`, `co_positions()`,
  tracebacks and `frame.f_lineno` show X's line while the hit runs.

An entry hit (an offset in the prologue, up to and including the first RESUME) goes right
after that RESUME and before any marker, so a loop whose head is the first instruction of
the body does not run it again on each iteration; it carries the location of the first body
instruction, as a sequence before that instruction would (the prologue's own location is the
`def` line, which 3.12+ would otherwise report as an extra LINE event).

Two things `bytecode` would change on its own and we keep instead (see `_Converter`):
the order of `co_varnames`, `co_names` and `co_consts` (it renumbers them by first use and
drops unused ones) and the identity of code constants (it deduplicates constants by their
marshal form, which would merge two distinct but equal nested code objects).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import CodeType
from typing import Any

import bytecode as _bc
from bytecode import Bytecode, ConcreteBytecode, Instr
from bytecode.instr import InstrLocation

from pykprobes.arch.rewrite.assembly import HIT, CallSequence
from pykprobes.arch.rewrite.decode import Instruction, entry_index, instructions

OptHit = Callable[[], None]

# `bytecode`'s abstract-to-concrete converter: a private class of bytecode 0.19 that we
# subclass to seed its tables. If it moves, the import of this module fails and the arch
# reports itself unavailable instead of building wrong code.
_BaseConverter: Any = _bc._ConvertBytecodeToConcrete  # type: ignore[attr-defined]


class _Converter(_BaseConverter):  # type: ignore[misc]
    """`bytecode`'s converter with its name, local and constant tables seeded from the
    original code, so that every original instruction keeps its argument (and size) and the
    code object keeps `co_varnames`, `co_names` and `co_consts` as they were (the new
    constants, the hit callables, come after them)."""

    def __init__(self, abstract: Bytecode, code: CodeType, consts: list[object]) -> None:
        super().__init__(abstract)
        for name in code.co_varnames:
            self.add_varname(name)
        for name in code.co_names:
            self.add_name(name)
        # Constants are found by identity: `Bytecode.from_code` hands the very objects of
        # co_consts to the instructions, and a replaced nested code object must take the
        # slot of the one it replaces. The table keys must stay distinct from `bytecode`'s
        # own keys (marshal bytes or (type, id)), hence the string tag.
        self._const_by_id: dict[int, int] = {}
        for index, original in enumerate(code.co_consts):
            self.consts_indices[("pykprobes-const", index)] = index
            self.consts_list.append(consts[index])
            self._const_by_id.setdefault(id(original), index)

    def add_const(self, value: object) -> int:
        index = self._const_by_id.get(id(value))
        if index is not None:
            return index
        index = len(self.consts_list)
        # An unmarshallable callable would get a (type, id) key anyway; this avoids trying
        # to marshal it, and keeps two hits that compare equal apart.
        self.consts_indices[("pykprobes-new", id(value))] = index
        self.consts_list.append(value)
        self._const_by_id[id(value)] = index
        return index


def _sequence(
    seq: CallSequence, hits: Iterable[OptHit], location: InstrLocation | None
) -> list[Instr]:
    out: list[Instr] = []
    for hit in hits:
        for opname, arg in seq.ops:
            if arg is None:
                out.append(Instr(opname, location=location))
            else:
                out.append(Instr(opname, hit if arg is HIT else arg, location=location))
    return out


def plan(
    code: CodeType, hits: Mapping[int, OptHit]
) -> tuple[list[Instruction], int, list[OptHit], dict[int, list[OptHit]]]:
    """Where each hit goes: (instructions, index of the first RESUME, entry hits, {instruction
    index: hits before it}). Raises ValueError for an offset that is no instruction start."""
    instrs = instructions(code)
    entry = entry_index(instrs)
    if entry is None:
        raise ValueError(f"{code.co_name}: no RESUME, not a CPython 3.11+ code object")
    index_of = {ins.start: i for i, ins in enumerate(instrs)}
    at_entry: list[OptHit] = []
    before: dict[int, list[OptHit]] = {}
    for offset in sorted(hits):
        i = index_of.get(offset)
        if i is None:
            raise ValueError(f"{code.co_name}: offset {offset} is not an instruction start")
        if i <= entry:
            at_entry.append(hits[offset])
        else:
            before.setdefault(i, []).append(hits[offset])
    return instrs, entry, at_entry, before


def build(
    code: CodeType,
    hits: Mapping[int, OptHit],
    consts: Mapping[int, CodeType],
    seq: CallSequence,
) -> CodeType:
    """`code` with `hits[offset]()` called before each offset and `consts` swapped in."""
    new_consts = list(code.co_consts)
    for index, replacement in consts.items():
        new_consts[index] = replacement
    if not hits:
        # Nothing moves: no need to reassemble.
        return code.replace(co_consts=tuple(new_consts))

    instrs, entry, at_entry, before = plan(code, hits)
    abstract = Bytecode.from_code(code, conserve_exception_block_stackdepth=True)
    items: list[Any] = list(abstract)
    originals = [item for item in items if isinstance(item, Instr)]
    if len(originals) != len(instrs):
        # `bytecode` merged or split an instruction: our offsets would not match its list.
        raise ValueError(
            f"{code.co_name}: bytecode decoded {len(originals)} instructions, "
            f"expected {len(instrs)}"
        )

    out: list[Any] = []
    k = 0
    for item in items:
        if not isinstance(item, Instr):
            # Label, TryBegin, TryEnd: they stay before a sequence that precedes the next
            # instruction (see the module docstring).
            out.append(item)
            continue
        pending = before.get(k)
        if pending:
            out.extend(_sequence(seq, pending, item.location))
        out.append(item)
        if k == entry and at_entry:
            following = originals[k + 1].location if k + 1 < len(originals) else item.location
            out.extend(_sequence(seq, at_entry, following))
        k += 1

    abstract.clear()
    abstract.extend(out)
    converter = _Converter(abstract, code, new_consts)
    # The exception table keeps its original stack depths (conserved above): a call
    # sequence is stack-neutral, so no depth at any original boundary changes, and the
    # code's stack only needs room for the sequence on top of its old maximum. Skipping
    # `bytecode`'s stack analysis keeps build fast and free of its opinions.
    concrete: ConcreteBytecode = converter.to_concrete_bytecode(
        compute_exception_stack_depths=False
    )
    new: CodeType = concrete.to_code(
        stacksize=code.co_stacksize + seq.depth, compute_exception_stack_depths=False
    )
    _check_same_frame(code, new, new_consts)
    return new


def _check_same_frame(code: CodeType, new: CodeType, consts: list[object]) -> None:
    """The rewrite must not change what a frame of the code looks like from outside: a
    cheap guard against a `bytecode` release whose converter no longer takes our seeds."""
    kept = new.co_consts[: len(consts)]
    if len(kept) != len(consts) or any(a is not b for a, b in zip(kept, consts, strict=True)):
        raise ValueError(f"{code.co_name}: rewrite moved constants")
    for attr in (
        "co_argcount",
        "co_posonlyargcount",
        "co_kwonlyargcount",
        "co_nlocals",
        "co_flags",
        "co_varnames",
        "co_cellvars",
        "co_freevars",
        "co_names",
        "co_name",
        "co_qualname",
        "co_filename",
        "co_firstlineno",
    ):
        if getattr(code, attr) != getattr(new, attr):
            raise ValueError(
                f"{code.co_name}: rewrite changed {attr}: {getattr(code, attr)!r} -> "
                f"{getattr(new, attr)!r}"
            )
