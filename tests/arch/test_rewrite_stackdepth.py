"""arch/rewrite/stackdepth.py: the stack depth before each instruction, which an inline hit's
exception-table entry is built on, agrees with what the compiler recorded of the same code:
its exception-table entries and its co_stacksize."""

from __future__ import annotations

import dis
import importlib
from types import CodeType

import pytest

from pykprobes import insn
from pykprobes.arch.rewrite import stackdepth
from pykprobes.core.resolve import iter_code_tree

MODULES = ("textwrap", "difflib", "json.decoder", "asyncio.locks", "contextlib", "argparse")


def _codes(name: str) -> list[CodeType]:
    module = importlib.import_module(name)
    assert module.__spec__ is not None and module.__spec__.loader is not None
    top = module.__spec__.loader.get_code(name)  # type: ignore[attr-defined]
    return [top, *(t.code for t in iter_code_tree(top, ""))]


@pytest.mark.parametrize("name", MODULES)
def test_depths_agree_with_the_compilers_records(name: str) -> None:
    checked = 0
    for code in _codes(name):
        depths = stackdepth.depths(code)
        instrs = insn.decode(code)
        assert depths[instrs[insn.entry_index(instrs)].start] == stackdepth.entry_depth(code)
        for ins in instrs:
            depth = depths.get(ins.start)
            if depth is None:
                continue
            assert 0 <= depth <= code.co_stacksize, (code.co_qualname, ins)
            checked += 1
        # The first instruction an exception-table entry covers has at least the entry's
        # depth on the stack (the unwinding cuts it down to that; later ones may have less
        # where they cannot raise: 3.15's generator expressions), and the handler starts
        # with that depth, lasti and the exception.
        for entry in dis._parse_exception_table(code):  # type: ignore[attr-defined]
            first = next(i for i in instrs if i.offset >= entry.start)
            if first.start in depths:
                assert depths[first.start] >= entry.depth, (code.co_qualname, entry)
            if entry.target in depths:
                assert depths[entry.target] == entry.depth + entry.lasti + 1
    assert checked > 100


def test_a_generator_expression_starts_with_its_iterator() -> None:
    """3.15 gets a generator expression's iterator before RETURN_GENERATOR: an entry hit's
    exception-table entry must keep it on the stack."""
    code = next(c for c in (lambda xs: list(x + 1 for x in xs)).__code__.co_consts
                if isinstance(c, CodeType))
    instrs = insn.decode(code)
    depths = stackdepth.depths(code)
    at_entry = depths[instrs[insn.entry_index(instrs)].start]
    # The iterator's slots are what the implicit StopIteration handler keeps (3.12+; 3.11
    # converts in C and gets the iterator as an argument, as 3.12-3.14 do).
    entries = dis._parse_exception_table(code)  # type: ignore[attr-defined]
    assert at_entry == (entries[0].depth if entries else 0)


def test_a_generator_starts_at_depth_zero_after_its_prologue() -> None:
    def gen(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield i + n

    code = gen.__code__
    instrs = insn.decode(code)
    entry = insn.entry_index(instrs)
    depths = stackdepth.depths(code)
    assert depths[instrs[entry].start] == 0
    # The prologue (RETURN_GENERATOR, POP_TOP) is in no count.
    assert all(ins.start not in depths for ins in instrs[:entry])
    plus = next(i for i in instrs if i.opname == "BINARY_OP")
    assert depths[plus.start] >= 2
