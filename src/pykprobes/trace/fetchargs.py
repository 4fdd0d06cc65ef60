"""Fetch arguments: a FETCHARG compiled once, then fetched on every hit (the kernel's
traceprobe_parse_probe_arg() and process_fetch_insn()).

Compiling takes the fetcharg as the grammar parsed it (grammar.FetchArgDef: `kind`, `root`,
`chain`, `type` and their columns; the grammar is the one parser of the syntax), checks it
against the probed code when that is known, picks the type's converter, and builds a closure;
everything that can be wrong is a ParseError then, with the column of the bad part. Fetching
never raises: what cannot be read is FAULT. Nothing is ever evaluated (no `eval`, `exec` or
`compile`): the grammar is small and parsed by hand.

| form              | fetched                                                                |
|-------------------|------------------------------------------------------------------------|
| `$argN`           | the Nth argument, 1-based, in the code's order: positional, keyword-only, |
|                   | `*args`, `**kwargs` (co_varnames); its value now (it may be rebound)    |
| `$arg:NAME`, NAME | the argument or local NAME (a cell or free variable too); unbound: FAULT |
| `.attr`, `[KEY]`  | after any of the above or `$retval`, chained freely: safe.get_attr and  |
|                   | safe.get_item (KEY an int or a quoted string); a step that cannot be    |
|                   | read without running the program's code is a FAULT                     |
| `$retval`         | the returned value (return probes; FAULT when an exception left)        |
| `$duration`       | nanoseconds from this call's entry to its return (return probes): not   |
|                   | fetched from the frame but supplied by the hit path (events.py, from the |
|                   | kretprobe instance's entry time); FAULT here                            |
| `$comm`           | the thread's name (`threading.Thread.name`), `<...>` for a thread that  |
|                   | threading does not know (the kernel's unknown comm)                     |
| `$stack`          | the depth of the stack: the probed frame and all its callers (a walk   |
|                   | of f_back, as long as the stack is deep)                                |
| `$stackN`         | `module:qualname` of the Nth frame up; `$stack0` is the probed function |
| `\\IMM`           | a constant: an int (decimal, 0x-hex, signed), a float or a quoted string |

With `code` given (the probed code object), `$argN` is resolved to its name at compile time
and a NAME must be one of the code's variables (co_varnames, co_cellvars, co_freevars), except
in module and class bodies, whose locals are a namespace that any name may join: else
NO_BTFARG "This variable is not found at this probe point", as the kernel says of a name or
an $argN that the function's BTF does not have. Without it both are resolved at the hit. A
NAME is never looked up in the globals or builtins of a function (the kernel's variables are
its registers and stack; a module-level probe reads globals as its locals). `$arg*` is
expanded by the grammar (grammar.expand_args) before it comes here.

A return event reads its function's arguments as they were at entry (the kernel's
kretprobe_entry_arg): its caller captures them at entry (`entry_arguments()`) and passes
them, over the frame's variables at exit, as the `f_locals` of `fetch_all(regs, f_locals)`.

How locals are read: `frame.f_locals`, once per hit for all the fetchargs of an event
(compile_fetchargs), and only when one of them reads a variable. From 3.13 that is a
FrameLocalsProxy (PEP 667): a small object that reads the frame's variables in place, no side
effect. Before 3.13 it is PyFrame_FastToLocalsWithError(): it copies every variable of the frame
into the frame's locals dict, the very dict `locals()` returns in that function, so a program
that keeps a `locals()` dict and reads it later sees it refreshed, as under any debugger
(nothing is ever written back to the variables). That copy grows with the frame: two locals
of a 4-variable frame cost ~0.4-0.5 us a hit, of a 32-variable frame ~0.8-1 us before 3.13
and ~0.4 us from it (bench/, steps). From Python there is no other way to read one fast local
before 3.13 (PyFrame_GetVar is C API, from 3.12). Events on arguments at a function's entry
avoid it: the rewrite arch passes them to a compiled recorder (trace/recorder.py).
"""

from __future__ import annotations

import sys
import threading
from _thread import get_ident
from collections.abc import Callable, Sequence
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from pykprobes.errors import ParseError
from pykprobes.grammar import FetchArgDef, parse_fetcharg
from pykprobes.trace.safe import FAULT, STR_CAP, Fault, Opaque, describe, get_attr, get_item
from pykprobes.trace.types import TYPES, Converter

if TYPE_CHECKING:
    from pykprobes import Regs

__all__ = [
    "FAULT",
    "UNKNOWN_COMM",
    "Fault",
    "FetchArgSpec",
    "Fetcher",
    "argument_fetch",
    "compile_fetcharg",
    "compile_fetchargs",
    "entry_arguments",
    "frame_name",
    "parameters",
    "thread_name",
]

#: `$comm` of a thread that the threading module does not know (started by _thread): what
#: ftrace prints for a comm it has not saved.
UNKNOWN_COMM: Final = "<...>"

# Code flags (Include/cpython/code.h), spelled out rather than importing inspect.
_CO_OPTIMIZED: Final = 0x01
_CO_VARARGS: Final = 0x04
_CO_VARKEYWORDS: Final = 0x08

_dict_get: Final = dict.get


def _locals_type() -> type:
    # What frame.f_locals is for a function's frame: dict before PEP 667 (3.13), a
    # FrameLocalsProxy from it. Asked of a frame, not of the version (docs/architecture.md, rule 4).
    return type(sys._getframe().f_locals)


_LOCALS_TYPE: Final = _locals_type()

# threading's table of the threads it knows, by ident: a dict read, where current_thread()
# is Python code (that may be probed) and makes a _DummyThread for an unknown thread.
_THREADS: Final[dict[int, Any]] = getattr(threading, "_active", {})


def thread_name() -> str:
    """The name of the calling thread, as threading knows it, or UNKNOWN_COMM; reads the
    Thread's `_name` without running code (a Thread subclass's `name` property is not called)."""
    thread = _THREADS.get(get_ident())
    if thread is None:
        return UNKNOWN_COMM
    name = get_attr(thread, "_name")
    if type(name) is not str:
        return UNKNOWN_COMM
    return name if len(name) <= STR_CAP else name[:STR_CAP] + "..."  # capped as a str value


def frame_name(frame: FrameType) -> str:
    """`module:qualname` of a frame: its globals' `__name__` (`?` if that is not a str) and its
    code's qualname (`<module>` for module code)."""
    namespace = frame.f_globals
    module = _dict_get(namespace, "__name__") if issubclass(type(namespace), dict) else None
    if type(module) is not str:
        module = "?"
    return f"{module}:{frame.f_code.co_qualname}"


def parameters(code: CodeType) -> tuple[str, ...]:
    """The parameter names of `code` in $argN order (co_varnames starts with them):
    positional (positional-only first), keyword-only, `*args`, `**kwargs`. None for module
    and class bodies."""
    flags = code.co_flags
    if not flags & _CO_OPTIMIZED:
        return ()
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(flags & _CO_VARARGS) + bool(flags & _CO_VARKEYWORDS)
    return code.co_varnames[:count]


def entry_arguments(frame: FrameType) -> dict[str, Any]:
    """The bound parameters of `frame`, by name (read at a function's entry, for its return
    event). Never raises: what cannot be read is left out (read as at exit)."""
    try:
        f_locals = frame.f_locals
        out: dict[str, Any] = {}
        for name in parameters(frame.f_code):
            value = _read_local(f_locals, name)
            if value is not FAULT:
                out[name] = value
        return out
    except Exception:  # noqa: BLE001 - the hot path never raises (docs/architecture.md, rule 7)
        return {}


def _read_local(f_locals: Any, name: str) -> Any:
    """The variable `name` from a frame's f_locals, or FAULT (unbound, or not there)."""
    tp = type(f_locals)
    if tp is dict or tp is _LOCALS_TYPE:
        return f_locals.get(name, FAULT)  # dict.get / FrameLocalsProxy.get: C
    if issubclass(tp, dict):
        # A module or class namespace of a dict subclass: its storage, not its __getitem__.
        return _dict_get(f_locals, name, FAULT)
    return FAULT  # a class body under a metaclass's __prepare__ mapping: its code, not ours


# ----------------------------------------------------------------------------- fetchers

#: A compiled fetch: (the hit's Regs, the frame's f_locals or None) -> value or FAULT.
FetchFn = Callable[["Regs", Any], Any]


class Fetcher:
    """One compiled fetcharg. `fetcher(regs)` is the value to record for a hit, or FAULT: it
    never raises an Exception. `fetch(regs, f_locals)` is the same with the frame's f_locals
    read by the caller (compile_fetchargs reads it once for all the args of an event);
    `needs_locals` says whether it reads it at all; `constant` is set for an immediate."""

    __slots__ = ("body", "type", "kind", "needs_locals", "fetch", "constant")

    def __init__(
        self,
        body: str,
        type_name: str | None,
        kind: str,
        needs_locals: bool,
        fetch: FetchFn,
        constant: Any = None,
    ) -> None:
        self.body = body
        self.type = type_name
        self.kind = kind
        self.needs_locals = needs_locals
        self.fetch = fetch
        self.constant = constant

    def __call__(self, regs: Regs) -> Any:
        f_locals = None
        if self.needs_locals:
            try:
                f_locals = regs.frame.f_locals
            except Exception:  # noqa: BLE001 - the fetch of a variable is then a FAULT
                pass
        return self.fetch(regs, f_locals)

    def __repr__(self) -> str:
        typ = f":{self.type}" if self.type else ""
        return f"<Fetcher {self.body}{typ}>"


def _root_fetch(kind: str, root: object) -> FetchFn:
    """The function that fetches the root of a chain."""
    if kind == "local" or kind == "argname":
        name = root

        def fetch_local(regs: Regs, f_locals: Any) -> Any:
            return _read_local(f_locals, name)  # type: ignore[arg-type]

        return fetch_local
    if kind == "arg":
        index = root - 1  # type: ignore[operator]
        # The name of the Nth argument of the last code seen: one entry, replaced whole.
        last: tuple[CodeType | None, str | None] = (None, None)

        def fetch_arg(regs: Regs, f_locals: Any) -> Any:
            nonlocal last
            code = regs.frame.f_code
            seen, name = last
            if code is not seen:
                names = parameters(code)
                if index >= len(names):
                    return FAULT
                name = names[index]
                last = (code, name)
            return _read_local(f_locals, name)  # type: ignore[arg-type]

        return fetch_arg
    if kind == "retval":

        def fetch_retval(regs: Regs, f_locals: Any) -> Any:
            return regs.retval if regs.exception is None else FAULT

        return fetch_retval
    if kind == "duration":
        # Supplied by the event from the call's entry time (events.py); nothing in the
        # frame or the Regs says it.
        return lambda regs, f_locals: FAULT
    if kind == "comm":
        return lambda regs, f_locals: thread_name()
    if kind == "stack":

        def fetch_depth(regs: Regs, f_locals: Any) -> Any:
            frame: FrameType | None = regs.frame
            depth = 0
            while frame is not None:
                depth += 1
                frame = frame.f_back
            return depth

        return fetch_depth
    if kind == "stackn":
        count: int = root  # type: ignore[assignment]

        def fetch_caller(regs: Regs, f_locals: Any) -> Any:
            frame: FrameType | None = regs.frame
            for _ in range(count):
                frame = frame.f_back  # type: ignore[union-attr]
                if frame is None:
                    return FAULT
            return Opaque(frame_name(frame))  # type: ignore[arg-type]

        return fetch_caller
    raise AssertionError(kind)


def _chain_fetch(
    root_fetch: FetchFn, chain: tuple[tuple[str, object], ...], convert: Converter
) -> FetchFn:
    """root, then each step, then the type's conversion; any exception is a FAULT."""
    steps: tuple[tuple[Callable[[Any, Any], Any], object], ...] = tuple(
        # Names and string keys interned, as the program's own are: a hit compares identities.
        (get_attr if op == "attr" else get_item, sys.intern(arg) if type(arg) is str else arg)
        for op, arg in chain
    )
    if not steps:

        def fetch(regs: Regs, f_locals: Any) -> Any:
            try:
                value = root_fetch(regs, f_locals)
                return FAULT if value is FAULT else convert(value)
            except Exception:  # noqa: BLE001 - the hot path never raises (docs/architecture.md, rule 7)
                return FAULT

        return fetch

    def fetch_chain(regs: Regs, f_locals: Any) -> Any:
        try:
            value = root_fetch(regs, f_locals)
            for step, arg in steps:
                if value is FAULT:
                    return FAULT
                value = step(value, arg)
            return FAULT if value is FAULT else convert(value)
        except Exception:  # noqa: BLE001 - the hot path never raises (docs/architecture.md, rule 7)
            return FAULT

    return fetch_chain


def _arg_fetch(number: int, convert: Converter) -> FetchFn:
    """`$argN` without chain, the code not known at compile time: the name of the Nth
    argument of the last code seen is kept (one entry, replaced whole)."""
    index = number - 1
    last: tuple[CodeType | None, str] = (None, "")

    def fetch(regs: Regs, f_locals: Any) -> Any:
        nonlocal last
        try:
            code = regs.frame.f_code
            seen, name = last
            if code is not seen:
                names = parameters(code)
                if index >= len(names):
                    return FAULT
                name = names[index]
                last = (code, name)
            tp = type(f_locals)
            if tp is dict or tp is _LOCALS_TYPE:
                value = f_locals.get(name, FAULT)
            else:
                value = _read_local(f_locals, name)
            return FAULT if value is FAULT else convert(value)
        except Exception:  # noqa: BLE001 - the hot path never raises (docs/architecture.md, rule 7)
            return FAULT

    return fetch


def _local_fetch(name: str, convert: Converter) -> FetchFn:
    """A bare variable without chain: the commonest fetcharg, one call less."""

    def fetch(regs: Regs, f_locals: Any) -> Any:
        try:
            tp = type(f_locals)
            if tp is dict or tp is _LOCALS_TYPE:
                value = f_locals.get(name, FAULT)
            else:
                value = _read_local(f_locals, name)
            return FAULT if value is FAULT else convert(value)
        except Exception:  # noqa: BLE001 - the hot path never raises (docs/architecture.md, rule 7)
            return FAULT

    return fetch


# What each kind of root that is not an object of the program is, to check its type at
# compile time: a type that could never convert it is a BAD_TYPE.
_SAMPLES: Final[dict[str, object]] = {
    "stack": 1, "stackn": Opaque("module:qualname"), "duration": 1}


def compile_fetcharg(
    body: str,
    type_name: str | None,
    *,
    is_return: bool,
    text: str,
    pos: int,
    code: CodeType | None = None,
) -> Fetcher:
    """Compile the fetcharg at column `pos` of `text` (the whole definition), whose body
    (without `NAME=` and `:TYPE`) and type (None: the default, describe()) are `body` and
    `type_name`, for a return probe or not, `code` the probed code object if known. The
    grammar parses it (grammar.parse_fetcharg). Raises ParseError (see the module docstring),
    ValueError if `text` holds another fetcharg at `pos`; the Fetcher never raises."""
    d = parse_fetcharg(text, pos, is_return=is_return)
    if d.body != body or d.type != type_name:
        raise ValueError(f"column {pos} of {text!r} holds {d.body!r}:{d.type}, not {body!r}")
    return _compile(d, text, code)


def _compile(d: FetchArgDef, text: str, code: CodeType | None) -> Fetcher:
    """A Fetcher for the grammar's record `d` of a fetcharg of `text`: its syntax, type name
    and use of $retval and $comm are the grammar's to check, and checked; what is left is
    what needs the types' converters or the probed code."""
    kind, root, chain, type_name = d.kind, d.root, d.chain, d.type
    if type_name is None:
        convert: Converter = describe
    else:
        convert = TYPES[type_name]  # the grammar took a name of FETCH_TYPES: each is in TYPES
        # A type that can never convert $stack or $stackN or an immediate is refused, rather
        # than record FAULT on every hit. (The grammar refused a type other than a string for
        # $comm and an immediate string: the kernel's rule.)
        if kind == "imm" or kind in _SAMPLES:
            sample = root if kind == "imm" else _SAMPLES[kind]
            if convert(sample) is FAULT:
                raise ParseError("BAD_TYPE", d.type_pos or d.body_pos, text)

    if kind == "args":
        raise ValueError(f"{text!r}: $arg* is expanded first (grammar.expand_args)")
    if code is not None:
        if kind == "arg":
            names = parameters(code)
            if root > len(names):  # type: ignore[operator]
                raise ParseError("NO_BTFARG", d.body_pos, text)
            kind, root = "argname", names[root - 1]  # type: ignore[operator]
        elif (
            (kind == "local" or kind == "argname")
            and code.co_flags & _CO_OPTIMIZED
            and root not in code.co_varnames
            and root not in code.co_cellvars
            and root not in code.co_freevars
        ):
            raise ParseError("NO_BTFARG", d.body_pos, text)

    if kind == "imm":
        value = convert(root)
        return Fetcher(d.body, type_name, kind, False, lambda regs, f_locals: value, value)
    needs_locals = kind in ("local", "argname", "arg")
    if kind == "local" or kind == "argname":
        root = sys.intern(cast(str, root))  # as in _chain_fetch
    if (kind == "local" or kind == "argname") and not chain:
        fetch = _local_fetch(root, convert)  # type: ignore[arg-type]
    elif kind == "arg" and not chain:
        fetch = _arg_fetch(root, convert)  # type: ignore[arg-type]
    else:
        fetch = _chain_fetch(_root_fetch(kind, root), chain, convert)
    return Fetcher(d.body, type_name, kind, needs_locals, fetch)


def argument_fetch(
    d: FetchArgDef, code: CodeType
) -> tuple[str, Converter, bool] | None:
    """For a fetcharg rooted at an argument of `code` (`$argN`, `$arg:NAME` or a bare NAME
    that is an argument, with or without a chain): `(the argument's name, convert, chained)`
    where `convert(value)` turns the argument's value into what to record (the chain's
    steps, then the type's conversion; never raises) and `chained` says whether there are
    steps. None for any other fetcharg. For the compiled recorder (events.py): the value
    is loaded by the injected code, not read from f_locals."""
    if not code.co_flags & _CO_OPTIMIZED:
        return None
    names = parameters(code)
    if d.kind == "arg":
        if not 1 <= d.root <= len(names):  # type: ignore[operator]
            return None
        name: str = names[d.root - 1]  # type: ignore[operator]
    elif d.kind in ("local", "argname") and d.root in names:
        name = d.root
    else:
        return None
    convert: Converter = describe if d.type is None else TYPES[d.type]
    if not d.chain:
        return name, convert, False
    # _chain_fetch's root is the value itself here (passed where it expects the Regs).
    fetch = _chain_fetch(lambda value, f_locals: value, d.chain, convert)
    return name, lambda value: fetch(value, None), True


class FetchArgSpec(Protocol):
    """A fetcharg for compile_fetchargs that is not the grammar's FetchArgDef: its body and
    type as written and its column in the definition, where the grammar parses it."""

    @property
    def body(self) -> str: ...
    @property
    def type(self) -> str | None: ...
    @property
    def pos(self) -> int: ...


#: A compiled event's fetch: `fetch_all(regs)`, or `fetch_all(regs, f_locals)` with the
#: variables given (a return event's entry arguments over its frame's variables).
FetchAll = Callable[..., tuple[Any, ...]]

_READ: Final = object()  # fetch_all's default: read the frame's f_locals


def compile_fetchargs(
    defs: Sequence[FetchArgDef | FetchArgSpec],
    *,
    is_return: bool,
    text: str,
    code: CodeType | None = None,
) -> FetchAll:
    """Compile the fetchargs of one event, the grammar's records of definition `text` (or
    FetchArgSpecs, parsed from `text` by compile_fetcharg), into `fetch_all(regs) -> tuple`
    (one value or FAULT per fetcharg, in order). It reads the frame's f_locals at most once
    per hit, shared by all the fetchargs (see the module docstring), unless given as
    `fetch_all(regs, f_locals)`, and never raises an Exception."""
    fetchers = [
        _compile(d, text, code)
        if isinstance(d, FetchArgDef)
        else compile_fetcharg(d.body, d.type, is_return=is_return, text=text, pos=d.pos, code=code)
        for d in defs
    ]
    fns = tuple(f.fetch for f in fetchers)
    if not any(f.needs_locals for f in fetchers):
        if not fns:
            return lambda regs, f_locals=None: ()

        def fetch_all_plain(regs: Regs, f_locals: Any = None) -> tuple[Any, ...]:
            return tuple([fn(regs, None) for fn in fns])

        return fetch_all_plain

    if len(fns) == 1:
        (first,) = fns

        def fetch_one(regs: Regs, f_locals: Any = _READ) -> tuple[Any, ...]:
            if f_locals is _READ:
                try:
                    f_locals = regs.frame.f_locals
                except Exception:  # noqa: BLE001
                    f_locals = None
            return (first(regs, f_locals),)

        return fetch_one

    if len(fns) == 2:
        first, second = fns

        def fetch_two(regs: Regs, f_locals: Any = _READ) -> tuple[Any, ...]:
            if f_locals is _READ:
                try:
                    f_locals = regs.frame.f_locals
                except Exception:  # noqa: BLE001
                    f_locals = None
            return (first(regs, f_locals), second(regs, f_locals))

        return fetch_two

    def fetch_all(regs: Regs, f_locals: Any = _READ) -> tuple[Any, ...]:
        if f_locals is _READ:
            try:
                f_locals = regs.frame.f_locals
            except Exception:  # noqa: BLE001
                f_locals = None
        return tuple([fn(regs, f_locals) for fn in fns])

    return fetch_all
