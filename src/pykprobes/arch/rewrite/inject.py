"""Build a code object with call sequences inserted before chosen instructions, and the
return sequences of a return probe (retprobe.py).

The `bytecode` library does the assembling: it turns the code into abstract instructions
whose jumps point at `Label`s and whose exception-table ranges are `TryBegin`/`TryEnd`
markers, we insert our instructions, and it resolves labels (adding EXTENDED_ARG where a
jump grows), rebuilds the exception table and the location table.

Where an instruction X gets a call sequence, the sequence goes right before X, so

* a Label on X (X was a jump target or an exception handler) now marks the sequence's first
  instruction: every path that reached X runs the sequence first;
* the sequence is covered by the exception-table entry that covers X;
* each injected instruction carries X's location, so `co_lines()`, `co_positions()`,
  tracebacks and `frame.f_lineno` show X's line while the hit runs.

An entry hit (an offset in the prologue, up to and including its RESUME: insn.entry_index)
goes right after that RESUME, so a loop whose head is the first instruction of the body does
not run it again on each iteration; it carries the location of the first body instruction,
as a sequence before that instruction would (the prologue's own location is the `def` line,
which 3.12+ would otherwise report as an extra LINE event).

The exception table is flat: each instruction has one handler at most, the innermost
(CPython's InternalDocs/exception_handling.md). So the original TryBegin/TryEnd markers are
read into "the entry covering each instruction" and written again around each run of
instructions with the same entry (`_flatten`); a return probe's own entries then simply
take the instructions no entry covered (the outermost handler) or their own few (the calls
of the hooks).

`build` also returns where each original instruction went: `bytecode` assembles each
abstract instruction into exactly one instruction, in order, so the n-th abstract
instruction is the n-th decoded one; each is checked to be the same opcode.

Nothing injected sits in `co_consts` that marshal cannot write: a LOAD_CONST of a callable
(or of the `Exception` class a handler matches) in a sequence is assembled as a load by
name (callees.py), so that the rewritten code marshals and pickles as the original does.

Two things `bytecode` would change on its own and we keep instead (see `_Converter`):
the order of `co_varnames`, `co_names` and `co_consts` (it renumbers them by first use and
drops unused ones) and the identity of code constants (it deduplicates constants by their
marshal form, which would merge two distinct but equal nested code objects).
"""

from __future__ import annotations

import marshal
from collections.abc import Iterable, Mapping
from types import CodeType
from typing import Any, Final

import bytecode as _bc
from bytecode import Bytecode, ConcreteBytecode, ConcreteInstr, Instr, Label
from bytecode.instr import CellVar, InstrLocation, TryBegin, TryEnd

from pykprobes import env, insn
from pykprobes.arch.rewrite import callees, stackdepth
from pykprobes.arch.rewrite.assembly import (
    CONST,
    CONVERT,
    FAULT,
    GATE,
    HIT,
    NARGS,
    NOTHING,
    ON_RETURN,
    ON_UNWIND,
    RECORD,
    UNWIND_ENTRY,
    CallSequence,
    Handler,
    Mark,
    Op,
    Placeholder,
    ReturnSequences,
)
from pykprobes.arch.rewrite.retprobe import GENERATOR_LIKE, refuse_returns, stop_iteration_error
from pykprobes.core.arch import CompiledCall, InlineHit, OptHit, OptReturns
from pykprobes.core.regs import register_inline_calls

#: What a call sequence calls: a plain hit, a compiled call (at the entry only), or an
#: inline hit (where the inline sequence can go: else its plain hit).
Hit = OptHit | CompiledCall | InlineHit

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


def _abstract(code: CodeType) -> Bytecode:
    """`Bytecode.from_code(code)` (with the exception table's stack depths as they are),
    and BUILD_INTERPOLATION (3.14 t-strings) kept as it is.

    bytecode 0.19.1 reads BUILD_INTERPOLATION's argument as (has a format spec,
    FormatValue(arg >> 1)), where 3.14 puts the conversion in arg >> 2 (and sets bit 1):
    t"{x!r}" (arg 10) fails to decode, t"{x}" decodes to a wrong conversion, and no tuple
    encodes again. So each one is decoded as a harmless stand-in, and its abstract
    instruction then given the original argument as a plain int, which the converter
    writes back as it is (its last branch: `c_arg = arg`). The n-th abstract instruction
    is the n-th concrete one, as `_offsets` relies on too."""
    concrete = ConcreteBytecode.from_code(code)
    raw: list[int] = []
    for c_instr in concrete:
        if isinstance(c_instr, ConcreteInstr) and c_instr.name == "BUILD_INTERPOLATION":
            raw.append(c_instr.arg)
            c_instr.arg = c_instr.arg & 1 | 2  # decodes as (bool, FormatValue.STR)
    abstract = concrete.to_bytecode(conserve_exception_block_stackdepth=True)
    if raw:
        found = [i for i in abstract if isinstance(i, Instr) and i.name == "BUILD_INTERPOLATION"]
        if len(found) != len(raw):
            raise ValueError(f"{code.co_name}: lost track of BUILD_INTERPOLATION")
        for instr, arg in zip(found, raw, strict=True):
            instr._arg = arg  # past Instr's check, which wants the tuple
    return abstract


_NO_LOCATION: Final = InstrLocation(None, None, None, None)

#: An exception-table entry as inject.py tracks it: (handler label, stack depth, lasti).
Spec = tuple[Label, int, bool]


#: What a call of each placeholder's value becomes in a function unpickled elsewhere.
_STAND_INS: Final[dict[Placeholder, object]] = {
    HIT: callees.DROP, RECORD: callees.DROP, ON_RETURN: callees.DROP,
    ON_UNWIND: callees.DROP, CONVERT: callees.SAME, GATE: callees.NONE, FAULT: callees.DROP,
}
#: LOAD_ATTR's argument for a plain attribute: 3.12 folded a method flag into it.
_FUNC_ATTR: Final[object] = "func" if env.PY311 else (False, "func")


def _marshallable(value: Any) -> bool:
    try:
        marshal.dumps(value)
    except ValueError:
        return False
    return True


def _load_const(
    value: object, stand_in: object, location: InstrLocation | None,
    named: dict[str, callees.Callee],
) -> list[Instr]:
    """LOAD_CONST `value`, or its load by name when marshal cannot write it (callees.py)."""
    if _marshallable(value):
        return [Instr("LOAD_CONST", value, location=location)]
    # The same callable at two places is one name, as it would be one constant.
    name = next((n for n, c in named.items() if c.func is value), None)
    if name is None:
        name = callees.new_name()
        named[name] = callees.Callee(value, value if stand_in is None else stand_in)
    return [Instr("LOAD_GLOBAL", (False, name), location=location),
            Instr("LOAD_ATTR", _FUNC_ATTR, location=location)]


class _Assembler:
    """Turns assembly.py sequences into `bytecode` instructions, each with the
    exception-table entry that covers it (a Spec, or None)."""

    def __init__(
        self, values: dict[object, object], named: dict[str, callees.Callee]
    ) -> None:
        #: Placeholder -> value (ON_RETURN, ON_UNWIND, CONST, CONVERT).
        self.values = values
        #: The names the code loads its callables by (callees.py).
        self.named = named
        #: The instructions between HIT_CALL and END_HIT_CALL, per such run.
        self.hit_calls: list[list[Instr]] = []

    def assemble(
        self,
        ops: Iterable[Op],
        location: InstrLocation,
        outer: Spec | None,
        marks: dict[Mark, Label],
        base: int = 0,
    ) -> list[tuple[Instr | Label, Spec | None]]:
        """The instructions of `ops`; a TRY's depth counts from `base`."""
        out: list[tuple[Instr | Label, Spec | None]] = []
        spec = outer
        calls: list[Instr] | None = None
        recorded = 0
        for opname, arg in ops:
            if calls is not None:
                calls.extend(i for i, _ in out[recorded:] if isinstance(i, Instr))
            recorded = len(out)
            if opname == "TRY":
                assert isinstance(arg, Handler)
                spec = (_label(marks, arg.mark), base + arg.depth, arg.lasti)
            elif opname == "END_TRY":
                spec = outer
            elif opname == "HIT_CALL":
                calls = []
                self.hit_calls.append(calls)
            elif opname == "END_HIT_CALL":
                calls = None
            elif opname == "LABEL":
                assert isinstance(arg, Mark)
                out.append((_label(marks, arg), None))
            elif arg is None:
                out.append((Instr(opname, location=location), spec))
            else:
                if isinstance(arg, Mark):
                    arg = _label(marks, arg)
                elif opname == "LOAD_CONST":
                    stand_in = _STAND_INS.get(arg) if isinstance(arg, Placeholder) else None
                    value = self.values.get(arg, arg) if isinstance(arg, Placeholder) else arg
                    out.extend((i, spec) for i in
                               _load_const(value, stand_in, location, self.named))
                    continue
                else:
                    arg = self.values.get(arg, arg) if isinstance(arg, Placeholder) else arg
                out.append((Instr(opname, arg, location=location), spec))
        return out


def _label(marks: dict[Mark, Label], mark: Mark) -> Label:
    label = marks.get(mark)
    if label is None:
        label = marks[mark] = Label()
    return label


class _Inline:
    """What the inline hits of one build need: the sequence, the stack depths of the code
    (computed when a hit needs them), and each hit's calls (registered once built)."""

    def __init__(self, code: CodeType, iseq: CallSequence | None) -> None:
        self.code = code
        self.iseq = iseq
        self._depths: dict[int, int] | None = None
        #: (the instructions of a call in flight during a hit, the hit's gate)
        self.calls: list[tuple[list[Instr], Any]] = []

    def entry_depth(self) -> int | None:
        """The stack depth after the prologue (an entry hit's), or None if unknown."""
        try:
            return stackdepth.entry_depth(self.code)
        except (ValueError, KeyError):
            return None

    def depth(self, start: int) -> int | None:
        """The stack depth before the instruction at `start`, or None if unknown."""
        if self._depths is None:
            try:
                self._depths = stackdepth.depths(self.code)
            except (ValueError, AttributeError, KeyError):
                self._depths = {}
        return self._depths.get(start)


def _sequence(
    seq: CallSequence,
    hits: Iterable[Hit],
    location: InstrLocation | None,
    code: CodeType,
    cseq: CallSequence | None,
    named: dict[str, callees.Callee],
    spec: Spec | None,
    inline: _Inline,
    depth: int | None,
) -> list[tuple[Instr | Label, Spec | None]]:
    """The call sequences of `hits`, in order, each instruction with the entry that covers
    it (`spec`, or an inline hit's own); `depth` is the stack depth where they go, None if
    unknown (an inline hit is then its plain hit). A CompiledCall only ever comes here when
    `_compilable` said yes."""
    out: list[tuple[Instr | Label, Spec | None]] = []
    for hit in hits:
        if isinstance(hit, CompiledCall):
            assert cseq is not None
            out.extend((i, spec) for i in _compiled(cseq, hit, location, code, named))
            continue
        if isinstance(hit, InlineHit):
            if inline.iseq is not None and depth is not None:
                asm = _Assembler({GATE: hit.enter, FAULT: hit.fault, NOTHING: None}, named)
                out.extend(asm.assemble(inline.iseq.ops, location or _NO_LOCATION, spec, {},
                                        depth))
                inline.calls.extend((run, hit.gate) for run in asm.hit_calls)
                continue
            hit = hit.hit
        for opname, arg in seq.ops:
            if arg is None:
                out.append((Instr(opname, location=location), spec))
            elif arg is HIT:
                out.extend((i, spec) for i in _load_const(hit, callees.DROP, location, named))
            else:
                out.append((Instr(opname, arg, location=location), spec))
    return out


def _compiled(
    cseq: CallSequence,
    call: CompiledCall,
    location: InstrLocation | None,
    code: CodeType,
    named: dict[str, callees.Callee],
) -> list[Instr | Label]:
    """`if record(*variables): hit()`: the sequence with its VARS expanded."""
    asm = _Assembler({RECORD: call.record, HIT: call.hit, NARGS: len(call.variables)}, named)
    loc = location or _NO_LOCATION
    marks: dict[Mark, Label] = {}
    cut = [opname for opname, _ in cseq.ops].index("VARS")
    out: list[Instr | Label] = [i for i, _ in asm.assemble(cseq.ops[:cut], loc, None, marks)]
    for name in call.variables:
        if name in code.co_cellvars:
            out.append(Instr("LOAD_DEREF", CellVar(name), location=loc))
        else:
            out.append(Instr("LOAD_FAST", name, location=loc))
    out.extend(i for i, _ in asm.assemble(cseq.ops[cut + 1 :], loc, None, marks))
    return out


# Code flags (Include/cpython/code.h), as fetchargs spells them.
_CO_OPTIMIZED: Final = 0x01
_CO_VARARGS: Final = 0x04
_CO_VARKEYWORDS: Final = 0x08


def _compilable(code: CodeType, call: CompiledCall, cseq: CallSequence | None) -> bool:
    """A compiled call can load its variables at the entry of `code`: each is an argument
    (bound there, whatever the body does later) of a function's code."""
    if cseq is None or not code.co_flags & _CO_OPTIMIZED:
        return False
    flags = code.co_flags
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(flags & _CO_VARARGS) + bool(flags & _CO_VARKEYWORDS)
    arguments = code.co_varnames[:count]
    return all(type(name) is str and name in arguments for name in call.variables)


def _depth(
    seq: CallSequence, cseq: CallSequence | None, iseq: CallSequence | None, hits: Iterable[Hit]
) -> int:
    """The stack slots the deepest of these call sequences needs."""
    deepest = 0
    for hit in hits:
        if isinstance(hit, CompiledCall) and cseq is not None:
            deepest = max(deepest, cseq.depth + len(hit.variables))
        elif isinstance(hit, InlineHit) and iseq is not None:
            deepest = max(deepest, iseq.depth)
        else:
            deepest = max(deepest, seq.depth)
    return deepest


def plan(
    code: CodeType, hits: Mapping[int, Hit], cseq: CallSequence | None = None
) -> tuple[tuple[insn.Insn, ...], int, list[Hit], dict[int, list[Hit]]]:
    """Where each hit goes: (instructions, index of the prologue's RESUME, entry hits, {instruction
    index: hits before it}). A compiled call stays one at the entry when `_compilable`, and
    is its plain `hit` anywhere else. Raises ValueError for an offset that is no instruction
    start."""
    instrs = insn.decode(code)
    try:
        entry = insn.entry_index(instrs)
    except ValueError as exc:
        raise ValueError(f"{code.co_name}: {exc}") from exc
    index_of = {ins.start: i for i, ins in enumerate(instrs)}
    at_entry: list[Hit] = []
    before: dict[int, list[Hit]] = {}
    for offset in sorted(hits):
        i = index_of.get(offset)
        if i is None:
            raise ValueError(f"{code.co_name}: offset {offset} is not an instruction start")
        hit = hits[offset]
        if isinstance(hit, CompiledCall) and not (i <= entry and _compilable(code, hit, cseq)):
            hit = hit.hit
        if i <= entry:
            at_entry.append(hit)
        else:
            before.setdefault(i, []).append(hit)
    return instrs, entry, at_entry, before


def build(
    code: CodeType,
    hits: Mapping[int, Hit],
    consts: Mapping[int, CodeType],
    seq: CallSequence,
    returns: OptReturns | None = None,
    rseq: ReturnSequences | None = None,
    cseq: CallSequence | None = None,
    iseq: CallSequence | None = None,
) -> tuple[CodeType, dict[int, int]]:
    """`code` with `hits[offset]()` called before each offset (a CompiledCall at the entry
    with the compiled call sequence `cseq`, an InlineHit with the inline sequence `iseq`),
    `consts` swapped in and, with `returns`, the return sequences `rseq` (see retprobe.py);
    and where each instruction start of `code` is in the new code."""
    new_consts = list(code.co_consts)
    for index, replacement in consts.items():
        new_consts[index] = replacement
    if not hits and returns is None:
        # Nothing moves: no need to reassemble.
        same = code.replace(co_consts=tuple(new_consts))
        return same, {ins.start: ins.start for ins in insn.decode(code)}
    if returns is not None:
        if rseq is None:
            raise ValueError("no return sequences for this Python")
        reason = refuse_returns(code)
        if reason is not None:
            raise ValueError(reason)

    instrs, entry, at_entry, before = plan(code, hits, cseq)
    abstract = _abstract(code)
    items: list[Any] = list(abstract)
    originals = [item for item in items if isinstance(item, Instr)]
    if len(originals) != len(instrs):
        # `bytecode` merged or split an instruction: our offsets would not match its list.
        raise ValueError(
            f"{code.co_name}: bytecode decoded {len(originals)} instructions, "
            f"expected {len(instrs)}"
        )

    generator_like = bool(code.co_flags & GENERATOR_LIKE)
    values: dict[object, object] = {}
    if returns is not None:
        values[ON_RETURN], values[ON_UNWIND] = returns
    named: dict[str, callees.Callee] = {}
    asm = _Assembler(values, named)
    unwind_label = Label()
    unwind: Spec | None = None
    if returns is not None:
        unwind = (unwind_label, UNWIND_ENTRY.depth, UNWIND_ENTRY.lasti)
    tails: list[tuple[Instr | Label, Spec | None]] = []
    prologue = 0  # how many items of `body` are the prologue
    inline = _Inline(code, iseq)

    # The body, each instruction with the entry that covers it. The original TryBegin and
    # TryEnd markers are dropped and made again at the end from these (`_flatten`), because
    # the table must stay flat while entries are added inside the code's own ones.
    body: list[tuple[Instr | Label, Spec | None]] = []
    current: Spec | None = None
    k = 0
    for item in items:
        if isinstance(item, TryBegin):
            assert isinstance(item.target, Label) and isinstance(item.stack_depth, int)
            current = (item.target, item.stack_depth, item.push_lasti)
            continue
        if isinstance(item, TryEnd):
            current = None
            continue
        if not isinstance(item, Instr):
            body.append((item, None))  # a Label (SetLineno does not occur: 3.11+ locations)
            continue
        spec = current
        if k > entry and spec is None:
            spec = unwind  # a gap: only our handler (if any) covers it
        pending = before.get(k)
        if pending:
            depth = inline.depth(instrs[k].start) if any(
                isinstance(h, InlineHit) for h in pending) else None
            body.extend(_sequence(seq, pending, item.location, code, cseq, named, spec,
                                  inline, depth))
        if returns is not None and rseq is not None:
            if item.name in ("RETURN_VALUE", "RETURN_CONST"):
                tails.extend(_return_hook(asm, rseq, item, spec, body))
            elif generator_like and rseq.fix is not None and item.name == rseq.fix.opname:
                assert isinstance(item.arg, int)
                item.arg = (item.arg + rseq.fix.add) & ~rseq.fix.clear
        body.append((item, spec))
        if k == entry:
            prologue = len(body)
        if k == entry and at_entry:
            following = originals[k + 1].location if k + 1 < len(originals) else item.location
            body.extend(_sequence(seq, at_entry, following, code, cseq, named, spec or unwind,
                                  inline, inline.entry_depth()))
        k += 1

    if returns is not None and rseq is not None:
        tails.extend(_own_prologue_handlers(code, body, prologue, unwind))
        ops = rseq.unwind_generator if generator_like and rseq.unwind_generator else rseq.unwind
        if generator_like:
            values[CONVERT] = stop_iteration_error(code)
        marks: dict[Mark, Label] = {UNWIND_ENTRY.mark: unwind_label}
        tails.append((unwind_label, None))
        # The handler has no location: it is no line of the source, so tracers see no
        # 'line' event for it, and a hook that asks the frame for f_lineno gets None (the
        # line of the raise is exc.__traceback__.tb_lineno).
        tails.extend(asm.assemble(ops, _NO_LOCATION, None, marks))

    abstract.clear()
    abstract.extend(_flatten(body + tails))
    converter = _Converter(abstract, code, new_consts)
    # The exception table keeps its original stack depths (conserved above): every
    # injected sequence is stack-neutral, so no depth at any original boundary changes,
    # and the code's stack only needs room for the sequences on top of its old maximum
    # (and for the unwind handler, which starts from an empty stack). Skipping `bytecode`'s
    # stack analysis keeps build fast and free of its opinions.
    concrete: ConcreteBytecode = converter.to_concrete_bytecode(
        compute_exception_stack_depths=False
    )
    placed = [*at_entry, *(h for hs in before.values() for h in hs)]
    stacksize = code.co_stacksize + _depth(seq, cseq, iseq, placed)
    if returns is not None and rseq is not None:
        stacksize = max(stacksize, code.co_stacksize + rseq.depth, rseq.handler_depth)
    new: CodeType = concrete.to_code(stacksize=stacksize, compute_exception_stack_depths=False)
    _check_same_frame(code, new, new_consts)
    callees.publish(new, named)
    offsets = _offsets(code, instrs, originals, new, body)
    register_inline_calls(new, _inline_calls(new, body, inline))
    return new, offsets


def _inline_calls(
    new: CodeType, body: list[tuple[Instr | Label, Spec | None]], inline: _Inline
) -> dict[int, Any]:
    """Every offset a frame of `new` is at while an inline hit's call runs (the CALL and
    its caches; on 3.11 the PRECALL too, which calls a builtin itself) -> that hit's gate."""
    if not inline.calls:
        return {}
    new_instrs = insn.decode(new)
    position = {id(item): n for n, item in
                enumerate(item for item, _ in body if isinstance(item, Instr))}
    out: dict[int, Any] = {}
    for run, gate in inline.calls:
        first = new_instrs[position[id(run[0])]]
        last = new_instrs[position[id(run[-1])]]
        for offset in range(first.start, last.end, 2):
            out[offset] = gate
    return out


def _own_prologue_handlers(
    code: CodeType,
    body: list[tuple[Instr | Label, Spec | None]],
    prologue: int,
    unwind: Spec | None,
) -> list[tuple[Instr | Label, Spec | None]]:
    """Give the prologue (the first `prologue` items of `body`) handlers that UNWIND does
    not cover, and return them, to go after the code.

    From 3.12 the implicit StopIteration handler of generator-like code also covers the
    prologue's RESUME, so an exception raised there (by a PY_START callback or a signal
    handler) goes through that handler, whose final RERAISE lies in a gap that UNWIND
    covers: the frame, which never started, would be reported ended. So the prologue gets
    a copy of each handler that covers it: the same instructions (this handler has no
    jump: CALL_INTRINSIC_1 INTRINSIC_STOPITERATION_ERROR, RERAISE 1), in no entry. (3.12
    and 3.13 could tell by comparing lasti with the RESUME's offset, but from 3.14 lasti
    is a tagged int that no instruction but RERAISE may read.)"""
    copies: dict[Spec, Spec] = {}
    out: list[tuple[Instr | Label, Spec | None]] = []
    for n in range(prologue):
        item, spec = body[n]
        if spec is None:
            continue
        if spec not in copies:
            label = Label()
            copies[spec] = (label, spec[1], spec[2])
            out.append((label, None))
            out.extend((i, None) for i in _handler_copy(code, body, spec[0], unwind))
        body[n] = (item, copies[spec])
    return out


def _handler_copy(
    code: CodeType,
    body: list[tuple[Instr | Label, Spec | None]],
    label: Label,
    unwind: Spec | None,
) -> list[Instr]:
    """A copy of the instructions of the handler at `label`, up to its final one; a
    handler with a jump, or covered by an entry of the code, is refused."""
    start = next(n for n, (item, _) in enumerate(body) if item is label)
    out: list[Instr] = []
    for item, spec in body[start + 1 :]:
        if not isinstance(item, Instr):
            continue
        if item.has_jump() or spec not in (None, unwind):
            break
        out.append(item.copy())
        if item.is_final():
            return out
    raise ValueError(
        f"{code.co_name}: the exception handler that covers the prologue is not a "
        "straight run of instructions ending the frame"
    )


def _return_hook(
    asm: _Assembler,
    rseq: ReturnSequences,
    ret: Instr,
    spec: Spec | None,
    body: list[tuple[Instr | Label, Spec | None]],
) -> list[tuple[Instr | Label, Spec | None]]:
    """Append to `body` the call of on_return before `ret`; return its out-of-line tail."""
    location = ret.location or _NO_LOCATION
    marks: dict[Mark, Label] = {}
    if ret.name == "RETURN_VALUE":
        ops, tail = rseq.value, rseq.value_tail
    else:
        if rseq.const is None or rseq.const_tail is None:
            raise ValueError(f"no return sequence for {ret.name} on this Python")
        ops, tail = rseq.const, rseq.const_tail
        asm.values[CONST] = ret.arg
    body.extend(asm.assemble(ops, location, spec, marks))
    # The tail returns from the frame when on_return raised: it keeps the return's location.
    return asm.assemble(tail, location, None, marks)


def _flatten(
    items: list[tuple[Instr | Label, Spec | None]],
) -> list[Instr | Label | TryBegin | TryEnd]:
    """The instructions with TryBegin/TryEnd markers around each run covered by one entry."""
    out: list[Instr | Label | TryBegin | TryEnd] = []
    open_: TryBegin | None = None
    current: Spec | None = None
    for item, spec in items:
        if isinstance(item, Instr) and spec != current:
            if open_ is not None:
                out.append(TryEnd(open_))
                open_ = None
            if spec is not None:
                open_ = TryBegin(spec[0], spec[2], spec[1])
                out.append(open_)
            current = spec
        out.append(item)
    if open_ is not None:
        out.append(TryEnd(open_))
    return out


def _offsets(
    code: CodeType,
    instrs: tuple[insn.Insn, ...],
    originals: list[Instr],
    new: CodeType,
    body: list[tuple[Instr | Label, Spec | None]],
) -> dict[int, int]:
    """Original instruction start -> the start of the same instruction in `new`. `bytecode`
    assembles each abstract instruction into one instruction (with its EXTENDED_ARG
    prefixes and CACHE entries), in order, and the body comes first."""
    new_instrs = insn.decode(new)
    ids = {id(i) for i in originals}
    emitted = [item for item, _ in body if isinstance(item, Instr)]
    positions = [n for n, item in enumerate(emitted) if id(item) in ids]
    if len(positions) != len(instrs):
        raise ValueError(f"{code.co_name}: lost track of the original instructions")
    out: dict[int, int] = {}
    for ins, position in zip(instrs, positions, strict=True):
        moved = new_instrs[position]
        if moved.opname != ins.opname:
            raise ValueError(
                f"{code.co_name}: {ins.opname} at {ins.start} became {moved.opname} "
                f"at {moved.start}"
            )
        out[ins.start] = moved.start
    return out


def _check_same_frame(code: CodeType, new: CodeType, consts: list[object]) -> None:
    """The rewrite must not change what a frame of the code looks like from outside: a
    cheap guard against a `bytecode` release whose converter no longer takes our seeds."""
    kept = new.co_consts[: len(consts)]
    if len(kept) != len(consts) or any(a is not b for a, b in zip(kept, consts, strict=True)):
        raise ValueError(f"{code.co_name}: rewrite moved constants")
    # The names the callables are loaded by (callees.py) come after the code's own.
    if new.co_names[: len(code.co_names)] != code.co_names:
        raise ValueError(f"{code.co_name}: rewrite moved names")
    for attr in (
        "co_argcount",
        "co_posonlyargcount",
        "co_kwonlyargcount",
        "co_nlocals",
        "co_flags",
        "co_varnames",
        "co_cellvars",
        "co_freevars",
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
