"""Fetch arguments: a FETCHARG compiled once, then fetched on every hit (the kernel's
traceprobe_parse_probe_arg() and process_fetch_insn()).

Compiling parses the body, checks it against the probed code when that is known, picks the
type's converter, and builds a closure; everything that can be wrong is a ParseError then,
with the column of the bad part. Fetching never raises: what cannot be read is FAULT. Nothing
is ever evaluated (no `eval`, `exec` or `compile`): the grammar is small and parsed by hand.

| form              | fetched                                                                |
|-------------------|------------------------------------------------------------------------|
| `$argN`           | the Nth argument, 1-based, in the code's order: positional, keyword-only, |
|                   | `*args`, `**kwargs` (co_varnames); its value now (it may be rebound)    |
| `$arg:NAME`, NAME | the argument or local NAME (a cell or free variable too); unbound: FAULT |
| `.attr`, `[KEY]`  | after any of the above or `$retval`, chained freely: safe.get_attr and  |
|                   | safe.get_item (KEY an int or a quoted string; bytes, None, True, False  |
|                   | and floats too); a step that cannot be read without running the         |
|                   | program's code is a FAULT                                              |
| `$retval`         | the returned value (return probes; FAULT when an exception left)        |
| `$comm`           | the thread's name (`threading.Thread.name`), `<...>` for a thread that  |
|                   | threading does not know (the kernel's unknown comm)                     |
| `$stack`          | the depth of the stack: the probed frame and all its callers (a walk   |
|                   | of f_back, as long as the stack is deep)                                |
| `$stackN`         | `module:qualname` of the Nth frame up; `$stack0` is the probed function |
| `\\IMM`           | a constant: an int (decimal, 0x-hex, signed), a float or a quoted string |

With `code` given (the probed code object), `$argN` is resolved to its name at compile time
(N beyond the arguments: BAD_ARG_NUM) and a NAME must be one of the code's variables
(co_varnames, co_cellvars, co_freevars: else BAD_VAR), except in module and class bodies, whose
locals are a namespace that any name may join. Without it both are resolved at the hit. A
NAME is never looked up in the globals or builtins of a function (the kernel's variables are
its registers and stack; a module-level probe reads globals as its locals).

How locals are read: `frame.f_locals`, once per hit for all the fetchargs of an event
(compile_fetchargs), and only when one of them reads a variable. From 3.13 that is a
FrameLocalsProxy (PEP 667): a small object that reads the frame's variables in place, no side
effect. Before 3.13 it is PyFrame_FastToLocalsWithError(): it copies every variable of the frame
into the frame's locals dict, the very dict `locals()` returns in that function, so a program
that keeps a `locals()` dict and reads it later sees it refreshed, as under any debugger
(nothing is ever written back to the variables). That copy grows with the frame: two locals
of a 4-variable frame cost ~0.4-0.5 us a hit, of a 32-variable frame ~0.8-1 us before 3.13
and ~0.4 us from it (tests/trace/test_fetchargs_cost.py). From Python there is no other way to
read one fast local before 3.13 (PyFrame_GetVar is C API, from 3.12).
"""

from __future__ import annotations

import sys
import threading
from _thread import get_ident
from collections.abc import Callable, Sequence
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, Final, Protocol

from pykprobes.errors import ParseError
from pykprobes.grammar import MAX_PARAM_NUM, STRING_TYPES
from pykprobes.trace.safe import FAULT, Fault, Opaque, describe, get_attr, get_item
from pykprobes.trace.types import TYPES, Converter

if TYPE_CHECKING:
    from pykprobes.core.regs import Regs

__all__ = [
    "FAULT",
    "UNKNOWN_COMM",
    "Fault",
    "FetchArgSpec",
    "Fetcher",
    "compile_fetcharg",
    "compile_fetchargs",
    "frame_name",
    "parse_body",
    "thread_name",
]

#: `$comm` of a thread that the threading module does not know (started by _thread): what
#: ftrace prints for a comm it has not saved.
UNKNOWN_COMM: Final = "<...>"

# Code flags (Include/cpython/code.h), spelled out rather than importing inspect.
_CO_OPTIMIZED: Final = 0x01
_CO_VARARGS: Final = 0x04
_CO_VARKEYWORDS: Final = 0x08

_WORD: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGITS: Final = frozenset("0123456789")
_HEXDIGITS: Final = frozenset("0123456789abcdefABCDEF")
_QUOTES: Final = frozenset("\"'")
_SPACES: Final = " \t\n\r\f\v"

_dict_get: Final = dict.get


def _locals_type() -> type:
    # What frame.f_locals is for a function's frame: dict before PEP 667 (3.13), a
    # FrameLocalsProxy from it. Asked of a frame, not of the version (STYLE.md rule 4).
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
    return name if type(name) is str else UNKNOWN_COMM


def frame_name(frame: FrameType) -> str:
    """`module:qualname` of a frame: its globals' `__name__` (`?` if that is not a str) and its
    code's qualname (`<module>` for module code)."""
    namespace = frame.f_globals
    module = _dict_get(namespace, "__name__") if issubclass(type(namespace), dict) else None
    if type(module) is not str:
        module = "?"
    return f"{module}:{frame.f_code.co_qualname}"


def _arg_names(code: CodeType) -> tuple[str, ...]:
    """The argument names of `code` in $argN order (co_varnames starts with them)."""
    flags = code.co_flags
    if not flags & _CO_OPTIMIZED:
        return ()
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(flags & _CO_VARARGS) + bool(flags & _CO_VARKEYWORDS)
    return code.co_varnames[:count]


def _read_local(f_locals: Any, name: str) -> Any:
    """The variable `name` from a frame's f_locals, or FAULT (unbound, or not there)."""
    tp = type(f_locals)
    if tp is dict or tp is _LOCALS_TYPE:
        return f_locals.get(name, FAULT)  # dict.get / FrameLocalsProxy.get: C
    if issubclass(tp, dict):
        # A module or class namespace of a dict subclass: its storage, not its __getitem__.
        return _dict_get(f_locals, name, FAULT)
    return FAULT  # a class body under a metaclass's __prepare__ mapping: its code, not ours


# ----------------------------------------------------------------------------- parsing


def _scan_word(text: str, i: int) -> int:
    """The end of the run of identifier characters at `i` (as the grammar scans them)."""
    n = len(text)
    while i < n:
        c = text[i]
        if c in _WORD or (c > "\x7f" and c.isalnum()):
            i += 1
        else:
            break
    return i


def _parse_uint(text: str) -> int | None:
    """Decimal or 0x-hex digits (the grammar's numbers); anything else None."""
    if not text or len(text) > 24:
        return None
    if text[:2] in ("0x", "0X"):
        digits = text[2:]
        if digits and all(c in _HEXDIGITS for c in digits):
            return int(digits, 16)
        return None
    if all(c in _DIGITS for c in text):
        return int(text)
    return None


def _parse_int(text: str) -> int | None:
    if text[:1] in ("-", "+"):
        value = _parse_uint(text[1:])
        return None if value is None else (-value if text[0] == "-" else value)
    return _parse_uint(text)


def _parse_float(text: str) -> float | None:
    """[sign] digits [. digits] [e [sign] digits] (or a leading `.`): no nan, inf or `_`."""
    i, n = 0, len(text)
    if n > 64:
        return None
    if i < n and text[i] in "+-":
        i += 1
    mantissa = 0
    while i < n and text[i] in _DIGITS:
        i += 1
        mantissa += 1
    if i < n and text[i] == ".":
        i += 1
        while i < n and text[i] in _DIGITS:
            i += 1
            mantissa += 1
    if not mantissa:
        return None
    if i < n and text[i] in "eE":
        i += 1
        if i < n and text[i] in "+-":
            i += 1
        exponent = i
        while i < n and text[i] in _DIGITS:
            i += 1
        if i == exponent:
            return None
    return float(text) if i == n else None


_Chain = tuple[tuple[str, object], ...]


def _parse_key(token: str) -> object:
    """An unquoted subscript key: an int, None/True/False, a float; else _BAD."""
    number = _parse_int(token)
    if number is not None:
        return number
    if token in _CONSTANTS:
        return _CONSTANTS[token]
    value = _parse_float(token)
    return _BAD if value is None else value


_BAD: Final = object()
_CONSTANTS: Final[dict[str, object]] = {"None": None, "True": True, "False": False}


def _parse_chain(body: str, i: int, text: str, bpos: int) -> _Chain:
    """The `.attr` and `[KEY]` steps from index `i` of `body` (KEY: an int, a string quoted
    with ' or " taken as written, b'...' bytes, None, True, False or a float; spaces around it
    allowed). Errors as the grammar's: a bad name at the name, an unclosed quote at the quote,
    an unclosed bracket at the bracket, a bad key at the key, anything else at itself."""
    steps: list[tuple[str, object]] = []
    n = len(body)
    while i < n:
        c = body[i]
        if c == ".":
            end = _scan_word(body, i + 1)
            name = body[i + 1 : end]
            if not name.isidentifier():
                raise ParseError("BAD_FETCH_ARG", bpos + i + 1, text)
            steps.append(("attr", sys.intern(name)))
            i = end
        elif c == "[":
            opener = i
            quote = -1
            j = i + 1
            while j < n and (quote >= 0 or body[j] != "]"):
                if quote >= 0:
                    if body[j] == body[quote]:
                        quote = -1
                elif body[j] in _QUOTES:
                    quote = j
                j += 1
            if quote >= 0:
                raise ParseError("BAD_FETCH_ARG", bpos + quote, text)
            if j >= n:
                raise ParseError("BAD_FETCH_ARG", bpos + opener, text)
            i += 1
            while i < n and body[i] in _SPACES:
                i += 1
            is_bytes = body[i] == "b" and i + 1 < n and body[i + 1] in _QUOTES
            if body[i] in _QUOTES or is_bytes:
                start = i
                q = i + 1 if is_bytes else i
                close = body.find(body[q], q + 1)
                key: object = body[q + 1 : close]
                if is_bytes:
                    if not key.isascii():  # type: ignore[attr-defined]
                        raise ParseError("BAD_FETCH_ARG", bpos + start, text)
                    key = key.encode("ascii")  # type: ignore[attr-defined]
                elif type(key) is str:
                    key = sys.intern(key)
                i = close + 1
            else:
                start = i
                while i < n and body[i] != "]" and body[i] not in _SPACES:
                    i += 1
                key = _parse_key(body[start:i])
                if key is _BAD:
                    raise ParseError("BAD_FETCH_ARG", bpos + start, text)
            while i < n and body[i] in _SPACES:
                i += 1
            if body[i] != "]":
                raise ParseError("BAD_FETCH_ARG", bpos + i, text)
            steps.append(("item", key))
            i += 1
        else:
            raise ParseError("BAD_FETCH_ARG", bpos + i, text)
    return tuple(steps)


def _parse_var(body: str, text: str, bpos: int, is_return: bool) -> tuple[str, object, int]:
    """`$...` -> (kind, root, end); every error points at the `$`, as the kernel's do."""
    if body.startswith("$arg:"):
        end = _scan_word(body, 5)
        name = body[5:end]
        if not name.isidentifier():
            raise ParseError("BAD_VAR", bpos, text)
        return "argname", sys.intern(name), end
    # A sign belongs to the word: `$arg-1` is a bad number, not `$arg` and garbage.
    end = 1
    while end < len(body) and (body[end] in _WORD or body[end] in "+-"):
        end += 1
    var = body[1:end]
    if var == "retval":
        if not is_return:
            raise ParseError("RETVAL_ON_PROBE", bpos, text)
        return "retval", None, end
    if var in ("comm", "COMM"):
        return "comm", None, end
    if var == "stack":
        return "stack", None, end
    if var.startswith("stack"):
        number = _parse_int(var[5:])
        if number is None:
            raise ParseError("BAD_VAR", bpos, text)
        if not 0 <= number <= MAX_PARAM_NUM:
            raise ParseError("BAD_STACK_NUM", bpos, text)
        return "stackn", number, end
    if var.startswith("arg"):
        number = _parse_int(var[3:])
        if number is None:
            raise ParseError("BAD_VAR", bpos, text)
        if not 1 <= number <= MAX_PARAM_NUM:
            raise ParseError("BAD_ARG_NUM", bpos, text)
        return "arg", number, end
    raise ParseError("BAD_VAR", bpos, text)


def _parse_imm(body: str, text: str, bpos: int) -> object:
    """`\\IMM`: a quoted string taken as written (no escapes, as the kernel's), an int or a
    float. A bad value points after the backslash, an unclosed string at its end."""
    value = body[1:]
    if value[:1] in _QUOTES:
        quote = value[0]
        if len(value) < 2 or value[-1] != quote:
            raise ParseError("IMMSTR_NO_CLOSE", bpos + len(body), text)
        content = value[1:-1]
        if quote in content:
            raise ParseError("BAD_IMM", bpos + 1, text)
        return content
    number: object = _parse_int(value)
    if number is None:
        number = _parse_float(value)
        if number is None:
            raise ParseError("BAD_IMM", bpos + 1, text)
    return number


def parse_body(
    body: str, *, is_return: bool, text: str, body_pos: int
) -> tuple[str, object, _Chain]:
    """The body of a fetcharg (no `NAME=`, no `:TYPE`) -> (kind, root, chain), the grammar's
    FetchArgDef fields: kind "arg" (root N), "argname" (NAME), "retval", "comm", "stack",
    "stackn" (N), "local" (NAME) or "imm" (the constant); chain ("attr", name) and ("item",
    key) steps. Raises ParseError with columns in `text`, the body starting at `body_pos`."""
    bpos = body_pos
    if not body:
        raise ParseError("NO_ARG_BODY", bpos, text)
    first = body[0]
    chain: _Chain = ()
    if first == "$":
        kind, root, end = _parse_var(body, text, bpos, is_return)
        if end < len(body):
            if kind == "comm":
                raise ParseError("COMM_CANT_DEREF", bpos, text)
            if kind in ("stack", "stackn"):
                raise ParseError("BAD_FETCH_ARG", bpos + end, text)
            chain = _parse_chain(body, end, text, bpos)
        return kind, root, chain
    if first == "\\":
        return "imm", _parse_imm(body, text, bpos), ()
    if first.isidentifier():
        end = _scan_word(body, 0)
        name = body[:end]
        if not name.isidentifier():
            raise ParseError("BAD_FETCH_ARG", bpos, text)
        return "local", sys.intern(name), _parse_chain(body, end, text, bpos)
    raise ParseError("BAD_FETCH_ARG", bpos, text)


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


def _body_pos(text: str, pos: int, body: str) -> int:
    """The column of `body` in `text`, the fetcharg starting at `pos` (after a `NAME=`)."""
    end = _scan_word(text, pos)
    if end > pos and text[end : end + 1] == "=" and text.startswith(body, end + 1):
        return end + 1
    return pos


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
                names = _arg_names(code)
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


def _chain_fetch(root_fetch: FetchFn, chain: _Chain, convert: Converter) -> FetchFn:
    """root, then each step, then the type's conversion; any exception is a FAULT."""
    steps: tuple[tuple[Callable[[Any, Any], Any], object], ...] = tuple(
        (get_attr if op == "attr" else get_item, arg) for op, arg in chain
    )
    if not steps:

        def fetch(regs: Regs, f_locals: Any) -> Any:
            try:
                value = root_fetch(regs, f_locals)
                return FAULT if value is FAULT else convert(value)
            except Exception:  # noqa: BLE001 - the hot path never raises (STYLE.md rule 7)
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
        except Exception:  # noqa: BLE001 - the hot path never raises (STYLE.md rule 7)
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
                names = _arg_names(code)
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
        except Exception:  # noqa: BLE001 - the hot path never raises (STYLE.md rule 7)
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
        except Exception:  # noqa: BLE001 - the hot path never raises (STYLE.md rule 7)
            return FAULT

    return fetch


# What each kind of root that is not an object of the program is, to check its type at
# compile time: a type that could never convert it is a BAD_TYPE.
_SAMPLES: Final[dict[str, object]] = {"stack": 1, "stackn": Opaque("module:qualname")}


def compile_fetcharg(
    body: str,
    type_name: str | None,
    *,
    is_return: bool,
    text: str,
    pos: int,
    code: CodeType | None = None,
    body_pos: int | None = None,
    type_pos: int | None = None,
) -> Fetcher:
    """Compile one fetcharg: `body` (without `NAME=` and `:TYPE`) and its type (None: the
    default, describe()), for a return probe or not, `text` the whole definition and `pos`
    the fetcharg's column in it (the body's and the type's columns are found from it unless
    given), `code` the probed code object if known. Raises ParseError (see the module
    docstring); the Fetcher never raises."""
    bpos = _body_pos(text, pos, body) if body_pos is None else body_pos
    if type_pos is None:
        after = bpos + len(body)
        type_pos = after + 1 if text[after : after + 1] == ":" else bpos
    kind, root, chain = parse_body(body, is_return=is_return, text=text, body_pos=bpos)

    if type_name is None:
        convert: Converter = describe
    else:
        converter = TYPES.get(type_name)
        if converter is None:
            raise ParseError("BAD_TYPE", type_pos, text)
        convert = converter
        # $comm and an immediate string are strings, and only string types take them (the
        # grammar's and the kernel's rule); a type that can never convert $stack or $stackN
        # or an immediate number is refused too, rather than record FAULT on every hit.
        if kind == "comm" or (kind == "imm" and type(root) is str):
            if type_name not in STRING_TYPES:
                raise ParseError("BAD_TYPE", type_pos, text)
        elif kind == "imm" or kind in _SAMPLES:
            sample = root if kind == "imm" else _SAMPLES[kind]
            if convert(sample) is FAULT:
                raise ParseError("BAD_TYPE", type_pos, text)

    if code is not None:
        if kind == "arg":
            names = _arg_names(code)
            if root > len(names):  # type: ignore[operator]
                raise ParseError("BAD_ARG_NUM", bpos, text)
            kind, root = "argname", sys.intern(names[root - 1])  # type: ignore[operator]
        elif (
            (kind == "local" or kind == "argname")
            and code.co_flags & _CO_OPTIMIZED
            and root not in code.co_varnames
            and root not in code.co_cellvars
            and root not in code.co_freevars
        ):
            raise ParseError("BAD_VAR", bpos, text)

    if kind == "imm":
        value = convert(root)
        return Fetcher(body, type_name, kind, False, lambda regs, f_locals: value, value)
    needs_locals = kind in ("local", "argname", "arg")
    if (kind == "local" or kind == "argname") and not chain:
        fetch = _local_fetch(root, convert)  # type: ignore[arg-type]
    elif kind == "arg" and not chain:
        fetch = _arg_fetch(root, convert)  # type: ignore[arg-type]
    else:
        fetch = _chain_fetch(_root_fetch(kind, root), chain, convert)
    return Fetcher(body, type_name, kind, needs_locals, fetch)


class FetchArgSpec(Protocol):
    """What compile_fetchargs needs of a fetcharg (grammar.FetchArgDef has it; `body_pos` and
    `type_pos` are used when present)."""

    @property
    def body(self) -> str: ...
    @property
    def type(self) -> str | None: ...
    @property
    def pos(self) -> int: ...


def compile_fetchargs(
    defs: Sequence[FetchArgSpec],
    *,
    is_return: bool,
    text: str,
    code: CodeType | None = None,
) -> Callable[[Regs], tuple[Any, ...]]:
    """Compile the fetchargs of one event into `fetch_all(regs) -> tuple` (one value or FAULT
    per fetcharg, in order). It reads the frame's f_locals at most once per hit, shared by
    all the fetchargs (see the module docstring), and never raises an Exception."""
    fetchers = [
        compile_fetcharg(
            d.body,
            d.type,
            is_return=is_return,
            text=text,
            pos=d.pos,
            code=code,
            body_pos=getattr(d, "body_pos", None),
            type_pos=getattr(d, "type_pos", None),
        )
        for d in defs
    ]
    fns = tuple(f.fetch for f in fetchers)
    if not any(f.needs_locals for f in fetchers):
        if not fns:
            return lambda regs: ()

        def fetch_all_plain(regs: Regs) -> tuple[Any, ...]:
            return tuple([fn(regs, None) for fn in fns])

        return fetch_all_plain

    if len(fns) == 1:
        (first,) = fns

        def fetch_one(regs: Regs) -> tuple[Any, ...]:
            try:
                f_locals = regs.frame.f_locals
            except Exception:  # noqa: BLE001
                f_locals = None
            return (first(regs, f_locals),)

        return fetch_one

    if len(fns) == 2:
        first, second = fns

        def fetch_two(regs: Regs) -> tuple[Any, ...]:
            try:
                f_locals = regs.frame.f_locals
            except Exception:  # noqa: BLE001
                f_locals = None
            return (first(regs, f_locals), second(regs, f_locals))

        return fetch_two

    def fetch_all(regs: Regs) -> tuple[Any, ...]:
        try:
            f_locals = regs.frame.f_locals
        except Exception:  # noqa: BLE001
            f_locals = None
        return tuple([fn(regs, f_locals) for fn in fns])

    return fetch_all
