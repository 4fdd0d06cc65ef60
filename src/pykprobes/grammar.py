"""The kprobe_events grammar, for Python: one definition of text -> a plain record.

    p[:[GRP/][EVENT]] TARGET [FETCHARGS]              probe
    r[MAXACTIVE][:[GRP/][EVENT]] TARGET [FETCHARGS]   return probe;  also  p... TARGET%return
    -:[GRP/]EVENT [TARGET [FETCHARGS]]                remove (the probe points that match)
    -:GRP/                                            remove every event of GRP
    TARGET:  pkg.mod:Qual.name[+OFFS]   path/to/file.py:LINE   pkg.mod:<module>[+OFFS]

Shaped on the kernel's parser (kernel/trace/trace_kprobe.c `__trace_kprobe_create`,
kernel/trace/trace_probe.c `traceprobe_parse_event_name`, `traceprobe_parse_probe_arg`): the
same checks in the same order, the same error codes (`errors.ERRORS`) and the caret at the
column where the kernel puts it. This is the one parser of fetchargs: it checks their syntax and
returns them parsed (`FetchArgDef.kind`, `root`, `chain`); trace.fetchargs compiles those records
and checks only what needs the probed code. docs/events.md is the contract.

This module is a leaf that the boot stage runs at interpreter start-up: standard library only,
and at run time it imports neither `re` nor `dataclasses` nor `typing` (plain `__slots__`
records, hand-written scanning, annotations never evaluated).
"""

from __future__ import annotations

from pykprobes.errors import ParseError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the boot stage imports this at start-up
if TYPE_CHECKING:
    from collections.abc import Sequence

#: The group of an event defined without one (the kernel's is "kprobes").
DEFAULT_GROUP = "pykprobes"
#: Group and event names are shorter than this (kernel MAX_EVENT_NAME_LEN).
MAX_EVENT_NAME_LEN = 64
#: An argument name is at most this long (kernel MAX_ARG_NAME_LEN).
MAX_ARG_NAME_LEN = 32
#: A fetcharg expression (after NAME=) is at most this long. The kernel's MAX_ARGSTR_LEN is 63,
#: too short for Python attribute chains; ours still bounds the boot stage's table.
MAX_ARGSTR_LEN = 255
#: At most this many fetchargs per definition (kernel MAX_TRACE_ARGS).
MAX_TRACE_ARGS = 128
#: The largest MAXACTIVE (kernel KRETPROBE_MAXACTIVE_MAX).
KRETPROBE_MAXACTIVE_MAX = 4096
#: The largest N in $stackN (the kernel's PARAM_MAX_STACK on x86_64, 16 KiB / 8).
MAX_PARAM_NUM = 2048
#: The largest N in $argN: an event records at most MAX_TRACE_ARGS values, and the kernel's
#: $argN reaches no further than its fetchargs can (a function may have more parameters:
#: `$arg:NAME` and NAME reach them).
MAX_ARG_NUM = MAX_TRACE_ARGS
#: An offset fits in 32 bits (the kernel rejects offsets above UINT_MAX).
MAX_OFFSET = 0xFFFFFFFF

#: The fetch types (docs/events.md): `str` and `string` are one type, `x` is a hex int.
FETCH_TYPES = frozenset(("int", "float", "str", "string", "bool", "x", "repr", "type", "len"))
#: The only types $comm and an immediate string accept.
STRING_TYPES = frozenset(("str", "string"))
#: Field names no argument may take: the common fields of every event (filters use them) and
#: the kernel's reserved probe fields (trace_probe.c `reserved_field_names`).
RESERVED_FIELD_NAMES = frozenset(
    (
        "common_type",
        "common_flags",
        "common_preempt_count",
        "common_pid",
        "common_tgid",
        "__probe_ip",
        "__probe_ret_ip",
        "__probe_func",
    )
)

_SPACES = " \t\n\r\f\v"  # the kernel's isspace(), which argv_split() splits on
_DIGITS = frozenset("0123456789")
_HEXDIGITS = frozenset("0123456789abcdefABCDEF")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_QUOTES = frozenset("\"'")  # a set: `"" in` a str would be True


class FetchArgDef:
    """One fetcharg, checked for syntax: `[NAME=]BODY[:TYPE]`.

    `name` is the field name (explicit, or derived as docs/events.md says), `body` the text
    without `NAME=` and `:TYPE`, `type` the type as written (or None), `pos`, `body_pos` and
    `type_pos` columns in the definition's text. The parsed body: `kind` is one of "arg"
    ($argN: `root` is N), "argname" ($arg:NAME: `root` is NAME), "retval", "duration",
    "comm", "stack" ($stack), "stackn" ($stackN: `root` is N), "local" (NAME: `root` is NAME),
    "imm" (\\IMM: `root` is the int, float or str) or "args" ($arg*, nameless: `expand_args()`
    turns it into one "local" per parameter once the function is known); `chain` is the
    attribute/subscript steps after the root, a tuple of ("attr", name) and ("item", int | str).
    """

    __slots__ = ("name", "body", "type", "pos", "type_pos", "body_pos", "kind", "root", "chain")

    def __init__(
        self,
        name: str,
        body: str,
        type: str | None,
        pos: int,
        type_pos: int | None,
        body_pos: int,
        kind: str,
        root: object,
        chain: tuple[tuple[str, object], ...],
    ) -> None:
        self.name = name
        self.body = body
        self.type = type
        self.pos = pos
        self.type_pos = type_pos
        self.body_pos = body_pos
        self.kind = kind
        self.root = root
        self.chain = chain

    def __repr__(self) -> str:
        typ = f":{self.type}" if self.type else ""
        return f"<FetchArgDef {self.name}={self.body}{typ} @{self.pos}>"


class ProbeDef:
    """A probe definition (`p`/`r`): see docs/events.md for every field.

    `target` is the probe point as written without `%return`; `target_pos` its column.
    `target_kind` is "symbol" (`module`, `qualname`, `offset`), "module" (the same, `qualname`
    being "<module>") or "line" (`path`, `line`; `offset` 0). `maxactive` is 0 when not given.
    """

    __slots__ = (
        "kind",
        "group",
        "event",
        "maxactive",
        "target",
        "target_kind",
        "module",
        "qualname",
        "offset",
        "path",
        "line",
        "args",
        "text",
        "target_pos",
    )

    def __init__(
        self,
        kind: str,
        group: str,
        event: str,
        maxactive: int,
        target: str,
        target_kind: str,
        module: str | None,
        qualname: str | None,
        offset: int,
        path: str | None,
        line: int | None,
        args: list[FetchArgDef],
        text: str,
        target_pos: int,
    ) -> None:
        self.kind = kind
        self.group = group
        self.event = event
        self.maxactive = maxactive
        self.target = target
        self.target_kind = target_kind
        self.module = module
        self.qualname = qualname
        self.offset = offset
        self.path = path
        self.line = line
        self.args = args
        self.text = text
        self.target_pos = target_pos

    def __repr__(self) -> str:
        return f"<ProbeDef {self.kind}:{self.group}/{self.event} {self.target!r}>"


class RemoveDef:
    """`-:[GRP/]EVENT [ARGS...]`: `group` is None when not given (the kernel then removes the
    event of that name in any group); `event` is None for `-:GRP/`, every event of the group
    (kernel dyn_event_release()); `args`, the words after the event, are kept as text (the
    kernel removes only the probe points whose target, then fetchargs, they match).
    `-:EVENT` (`kind` "-") is kprobe_events' form; `!p:EVENT ...` (`kind` "!") is
    dynamic_events' (the same removal, the probe type not compared)."""

    __slots__ = ("kind", "group", "event", "args", "text")

    def __init__(
        self, group: str | None, event: str | None, args: list[str], text: str, kind: str = "-"
    ) -> None:
        self.kind = kind
        self.group = group
        self.event = event
        self.args = args
        self.text = text

    def __repr__(self) -> str:
        return f"<RemoveDef {self.group or '*'}/{self.event}>"


# --------------------------------------------------------------------------------- helpers


def _is_good_name(name: str) -> bool:
    """A C identifier, as the kernel's is_good_name(): [A-Za-z_][A-Za-z0-9_]*."""
    return name.isascii() and name.isidentifier()


def _parse_uint(text: str) -> int | None:
    """Decimal or 0x-hex digits -> int; anything else (sign, octal, `_`, non-ASCII digits,
    more digits than any sane number: int() limits its input length) -> None."""
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
    """An optionally signed _parse_uint()."""
    if text[:1] in ("-", "+"):
        value = _parse_uint(text[1:])
        return None if value is None else (-value if text[0] == "-" else value)
    return _parse_uint(text)


def _parse_float(text: str) -> float | None:
    """[sign] digits [. digits] [e [sign] digits], or [sign] . digits ...; no nan/inf/`_`."""
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


def _is_dotted_name(text: str) -> bool:
    """A module name: identifiers joined by dots (Python identifiers, so Unicode too)."""
    return all(part.isidentifier() for part in text.split("."))


def _is_qualname(text: str) -> bool:
    """Identifiers or `<name>` parts (`<locals>`, `<lambda>`, `<genexpr>`, `<listcomp>`, ...)
    joined by dots. `<locals>` stands between a function and what it defines; `<module>` is
    a target of its own, never part of a qualname."""
    parts = text.split(".")
    last = len(parts) - 1
    for i, part in enumerate(parts):
        if part.isidentifier():
            continue
        if len(part) < 3 or part[0] != "<" or part[-1] != ">":
            return False
        inner = part[1:-1]
        if not inner.isidentifier() or inner == "module":
            return False
        if inner == "locals" and (i == 0 or i == last):
            return False
    return True


def _is_path(text: str) -> bool:
    """A source file's path: ends with .py or .pyw after a non-empty file name."""
    if text.endswith(".py"):
        stem = text[:-3]
    elif text.endswith(".pyw"):
        stem = text[:-4]
    else:
        return False
    return bool(stem) and not stem.endswith("/")


def _scan_word(text: str, i: int) -> int:
    """The end of the run of identifier characters (ASCII word characters, or any non-ASCII
    alphanumeric: Python identifiers may be Unicode) that starts at `i`."""
    n = len(text)
    while i < n:
        c = text[i]
        if c in _WORD or (c > "\x7f" and c.isalnum()):
            i += 1
        else:
            break
    return i


def _find_top(text: str, char: str, start: int = 0) -> int:
    """The index of the first `char` outside quotes and brackets, or -1."""
    quote = ""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
        elif c == char and not depth:
            return i
        elif c in _QUOTES:
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
    return -1


def _tokenize(text: str) -> list[tuple[int, str]]:
    """Split a definition into (column, word) on whitespace, as the kernel's argv_split(). From
    the third word on (the fetchargs), whitespace inside quotes or brackets does not split:
    `kw["a b"]` is one word."""
    words: list[tuple[int, str]] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in _SPACES:
            i += 1
            continue
        start = i
        if len(words) < 2:
            while i < n and text[i] not in _SPACES:
                i += 1
        else:
            i = _arg_end(text, i)
        words.append((start, text[start:i]))
    return words


def _arg_end(text: str, i: int) -> int:
    """The end of the fetcharg that starts at `i`: the next whitespace outside quotes and
    brackets, or the end of `text`."""
    quote = ""
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        if quote:
            if c == quote:
                quote = ""
        elif c in _SPACES:
            if not depth:
                break
        elif c in _QUOTES:
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        i += 1
    return i


def _sanitize(text: str) -> str:
    return "".join(c if c in _WORD else "_" for c in text)


def derive_event_name(
    kind: str,
    *,
    module: str | None = None,
    qualname: str | None = None,
    offset: int = 0,
    path: str | None = None,
    line: int | None = None,
) -> str:
    """The default event name, as the kernel makes one (`p_vfs_read_0`): `p_`/`r_`, the target
    with every character outside [A-Za-z0-9_] replaced by `_`, then `_<OFFS>` in decimal for a
    symbol or module target (a line target ends with its line); cut to MAX_EVENT_NAME_LEN - 1
    characters as the kernel's snprintf() cuts it.

    >>> derive_event_name("p", module="json.decoder", qualname="JSONDecoder.decode")
    'p_json_decoder_JSONDecoder_decode_0'
    >>> derive_event_name("r", path="app/main.py", line=12)
    'r_app_main_py_12'
    """
    raw = f"{path}:{line}" if path is not None else f"{module}:{qualname}_{offset}"
    return f"{kind}_{_sanitize(raw)}"[: MAX_EVENT_NAME_LEN - 1]


def _parse_event_name(
    text: str, spec: str, pos: int, need_event: bool
) -> tuple[str | None, str | None]:
    """`[GRP/][EVENT]` at column `pos` -> (group or None, event or None); kernel
    traceprobe_parse_event_name(): the group's errors point at the group, the event's at the
    event. An empty EVENT is allowed after `GRP/` (a default name), not alone."""
    group = None
    slash = spec.find("/")
    if slash >= 0:
        group = spec[:slash]
        if not group:
            raise ParseError("NO_GROUP_NAME", pos, text)
        if len(group) >= MAX_EVENT_NAME_LEN:
            raise ParseError("GROUP_TOO_LONG", pos, text)
        if not _is_good_name(group):
            raise ParseError("BAD_GROUP_NAME", pos, text)
        pos += slash + 1
        spec = spec[slash + 1 :]
    if not spec:
        if group is not None and not need_event:
            return group, None
        raise ParseError("NO_EVENT_NAME", pos, text)
    if len(spec) >= MAX_EVENT_NAME_LEN:
        raise ParseError("EVENT_TOO_LONG", pos, text)
    if not _is_good_name(spec):
        raise ParseError("BAD_EVENT_NAME", pos, text)
    return group, spec


# --------------------------------------------------------------------------------- fetchargs


def _candidate_name(word: str) -> str | None:
    """The name an argument would take if nothing else claimed it, without checking anything:
    what the uniqueness of a derived root name is decided against."""
    eq = _find_top(word, "=")
    if eq >= 0:
        return word[:eq]
    if word[:1] == "$":
        if word.startswith("$arg:"):
            return word[5 : _scan_word(word, 5)]
        var = word[1 : _scan_word(word, 1)]
        if var in ("comm", "COMM"):
            return "comm"
        if var.startswith("arg"):
            number = _parse_uint(var[3:])
            return None if number is None else f"arg{number}"
        return var or None
    end = _scan_word(word, 0)
    return word[:end] if end and word[:end].isidentifier() else None


def _parse_chain(text: str, expr: str, i: int, bpos: int) -> tuple[tuple[str, object], ...]:
    """The `.attr` and `[KEY]` steps of `expr` from index `i` on (KEY: an int, decimal or 0x-hex
    and signed, or a string quoted with ' or " and taken as written; spaces allowed around it).
    Any other character -> BAD_FETCH_ARG at it: a KEY written None, True, False, 2.5 or b'k'
    too (docs/events.md shows `NAME[KEY]` and `NAME[0]`: an index or a key, not any literal).
    An unclosed `[` or quote -> BAD_FETCH_ARG at the opener."""
    steps: list[tuple[str, object]] = []
    n = len(expr)
    while i < n:
        c = expr[i]
        if c == ".":
            end = _scan_word(expr, i + 1)
            name = expr[i + 1 : end]
            if not name.isidentifier():
                raise ParseError("BAD_FETCH_ARG", bpos + i + 1, text)
            steps.append(("attr", name))
            i = end
        elif c == "[":
            opener = i
            # An unclosed quote or bracket is the error, wherever the parse below would stop.
            quote = -1
            j = i + 1
            while j < n and (quote >= 0 or expr[j] != "]"):
                if quote >= 0:
                    if expr[j] == expr[quote]:
                        quote = -1
                elif expr[j] in _QUOTES:
                    quote = j
                j += 1
            if quote >= 0:
                raise ParseError("BAD_FETCH_ARG", bpos + quote, text)
            if j >= n:
                raise ParseError("BAD_FETCH_ARG", bpos + opener, text)
            i += 1
            while i < n and expr[i] in _SPACES:
                i += 1
            if i < n and expr[i] in _QUOTES:
                close = expr.find(expr[i], i + 1)
                if close < 0:
                    raise ParseError("BAD_FETCH_ARG", bpos + i, text)
                key: object = expr[i + 1 : close]
                i = close + 1
            else:
                start = i
                while i < n and expr[i] != "]" and expr[i] not in _SPACES:
                    i += 1
                key = _parse_int(expr[start:i])
                if key is None:
                    raise ParseError("BAD_FETCH_ARG", bpos + start, text)
            while i < n and expr[i] in _SPACES:
                i += 1
            if expr[i] != "]":
                raise ParseError("BAD_FETCH_ARG", bpos + i, text)
            steps.append(("item", key))
            i += 1
        else:
            raise ParseError("BAD_FETCH_ARG", bpos + i, text)
    return tuple(steps)


def _parse_var(text: str, expr: str, bpos: int, is_return: bool) -> tuple[str, object, int]:
    """`$...` at the start of `expr` -> (kind, root, index after it); kernel
    parse_probe_vars(), whose errors all point at the `$`."""
    if expr.startswith("$arg:"):
        end = _scan_word(expr, 5)
        name = expr[5:end]
        if not name.isidentifier():
            raise ParseError("BAD_VAR", bpos, text)
        return "argname", name, end
    if expr.startswith("$arg*"):
        return "args", None, 5
    # A sign is part of the word, so that `$arg-1` and `$stack-1` are bad numbers, not a
    # variable followed by garbage.
    end = 1
    while end < len(expr) and (expr[end] in _WORD or expr[end] in "+-"):
        end += 1
    var = expr[1:end]
    if var == "retval":
        if not is_return:
            raise ParseError("RETVAL_ON_PROBE", bpos, text)
        return "retval", None, end
    if var == "duration":
        # Python's own: the call's time from entry to return, so a return probe only.
        if not is_return:
            raise ParseError("DURATION_ON_PROBE", bpos, text)
        return "duration", None, end
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
        if not 1 <= number <= MAX_ARG_NUM:
            raise ParseError("BAD_ARG_NUM", bpos, text)
        return "arg", number, end
    raise ParseError("BAD_VAR", bpos, text)


def _parse_imm(text: str, expr: str, bpos: int) -> object:
    """`\\IMM`: an int (decimal or 0x-hex, signed), a float, or a quoted string. Kernel
    `str_to_immediate()` / `__parse_imm_string()`: a bad value points after the backslash, an
    unclosed string at its end."""
    value = expr[1:]
    if value[:1] in _QUOTES:
        quote = value[0]
        if len(value) < 2 or value[-1] != quote:
            raise ParseError("IMMSTR_NO_CLOSE", bpos + len(expr), text)
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


def _parse_fetcharg(
    text: str,
    pos: int,
    word: str,
    index: int,
    is_return: bool,
    taken: set[str],
    candidates: dict[str, int],
) -> FetchArgDef:
    """One fetcharg at column `pos`, the `index`th (1-based); kernel
    traceprobe_parse_probe_arg(). `taken` holds the names of the arguments before it."""
    eq = _find_top(word, "=")
    name: str | None = None
    if eq >= 0:
        # Errors of an explicit name point at the argument's start, as the kernel's do.
        name = word[:eq]
        if len(name) > MAX_ARG_NAME_LEN:
            raise ParseError("ARG_NAME_TOO_LONG", pos, text)
        if not name:
            raise ParseError("NO_ARG_NAME", pos, text)
        if not _is_good_name(name):
            raise ParseError("BAD_ARG_NAME", pos, text)
        if name in taken or name in RESERVED_FIELD_NAMES:
            raise ParseError("USED_ARG_NAME", pos, text)
        body = word[eq + 1 :]
        bpos = pos + eq + 1
    else:
        body = word
        bpos = pos
    if len(body) > MAX_ARGSTR_LEN:
        raise ParseError("ARG_TOO_LONG", bpos, text)
    if not body:
        raise ParseError("NO_ARG_BODY", bpos, text)

    # The type first, as the kernel's parse_probe_arg_type() runs before the body's parser.
    # Its colon is the first one outside quotes and brackets, but not the one of `$arg:NAME`.
    colon = _find_top(body, ":", 5 if body.startswith("$arg:") else 0)
    typ: str | None = None
    type_pos: int | None = None
    expr = body
    if colon >= 0:
        expr = body[:colon]
        typ = body[colon + 1 :]
        type_pos = bpos + colon + 1
        if typ not in FETCH_TYPES:
            raise ParseError("BAD_TYPE", type_pos, text)
        # $comm and an immediate string are strings: no other type for them (older kernels
        # said BAD_TYPE for this, newer ones NEED_STRING_TYPE).
        if typ not in STRING_TYPES and (expr in ("$comm", "$COMM") or expr[:2] in ('\\"', "\\'")):
            raise ParseError("NEED_STRING_TYPE", type_pos, text)

    first = expr[:1]
    root: object = None
    chain: tuple[tuple[str, object], ...] = ()
    if first == "$":
        kind, root, end = _parse_var(text, expr, bpos, is_return)
        # $arg* stands alone: no NAME=, no step, no type (kernel: "+0($arg*)", "args=$arg*").
        if kind == "args" and (name is not None or end < len(expr) or typ is not None):
            raise ParseError("BAD_VAR_ARGS", bpos, text)
        if end < len(expr):
            if kind == "comm":
                raise ParseError("COMM_CANT_DEREF", bpos, text)
            if kind in ("stack", "stackn", "duration"):
                raise ParseError("BAD_FETCH_ARG", bpos + end, text)
            chain = _parse_chain(text, expr, end, bpos)
    elif first == "\\":
        kind = "imm"
        root = _parse_imm(text, expr, bpos)
    elif first.isidentifier():
        kind = "local"
        end = _scan_word(expr, 0)
        root = expr[:end]
        if not root.isidentifier():
            raise ParseError("BAD_FETCH_ARG", bpos, text)
        chain = _parse_chain(text, expr, end, bpos)
    else:
        raise ParseError("BAD_FETCH_ARG", bpos, text)

    if name is None:
        name = "" if kind == "args" else _derived_name(kind, root, index, candidates)
        if name in taken or name in RESERVED_FIELD_NAMES:
            raise ParseError("USED_ARG_NAME", pos, text)
    return FetchArgDef(name, expr, typ, pos, type_pos, bpos, kind, root, chain)


def _derived_name(kind: str, root: object, index: int, candidates: dict[str, int]) -> str:
    """docs/events.md: `$argN` -> argN, `$arg:NAME` -> NAME, `$retval` -> retval, `$comm` ->
    comm, `$stack`/`$stackN` -> stack/stackN, a local or a chain rooted at one -> its root name
    when no other argument claims that name, else argN with N the argument's position (so for
    an immediate). A name that is no C identifier, too long or reserved falls back to argN, as
    the kernel's generate_probe_arg_name() does for a name that is no C identifier."""
    if kind == "arg":
        return f"arg{root}"
    if kind == "stackn":
        return f"stack{root}"
    if kind in ("retval", "comm", "stack", "duration"):
        return kind
    if (
        isinstance(root, str)
        and (kind == "argname" or (kind == "local" and candidates.get(root) == 1))
        and _is_good_name(root)
        and len(root) <= MAX_ARG_NAME_LEN
        and root not in RESERVED_FIELD_NAMES
    ):
        return root
    return f"arg{index}"


def parse_fetcharg(text: str, pos: int, *, is_return: bool) -> FetchArgDef:
    """The fetcharg at column `pos` of `text` (up to the next whitespace outside quotes and
    brackets), checked as parse() checks a definition's first fetcharg, for a return probe or
    not; errors point into `text`. For callers that hold one fetcharg rather than a whole
    definition (trace.fetchargs.compile_fetcharg)."""
    word = text[pos : _arg_end(text, pos)]
    candidate = _candidate_name(word)
    candidates = {candidate: 1} if candidate else {}
    return _parse_fetcharg(text, pos, word, 1, is_return, set(), candidates)


def expand_args(d: ProbeDef, params: Sequence[str]) -> list[FetchArgDef]:
    """The fetchargs of `d` with `$arg*` expanded: one bare NAME per parameter of the probed
    function, in `params`' order (positional, keyword-only, `*args`, `**kwargs`), each named
    after its parameter (or argN when the name cannot be a field's: not a C identifier, too
    long, reserved), at the column of `$arg*`; the other fetchargs named again as parse()
    names them, among the expanded ones (kernel traceprobe_expand_meta_args(), which rewrites
    argv before any fetcharg is parsed). `d.args` itself when there is no `$arg*`. Raises
    ParseError: ARGS_2LONG when the expansion passes MAX_TRACE_ARGS, USED_ARG_NAME when a
    name comes twice (at the later one)."""
    star = next((a for a in d.args if a.kind == "args"), None)
    if star is None:
        return d.args
    text = d.text
    count = len(d.args) - 1 + len(params)
    if count > MAX_TRACE_ARGS:
        raise ParseError("ARGS_2LONG", star.pos, text)
    words: list[tuple[int, str] | None] = []  # None stands for $arg*
    candidates: dict[str, int] = {}
    for a in d.args:
        if a is star:
            words.append(None)
            for name in params:
                candidates[name] = candidates.get(name, 0) + 1
            continue
        word = text[a.pos : _arg_end(text, a.pos)]
        words.append((a.pos, word))
        candidate = _candidate_name(word)
        if candidate:
            candidates[candidate] = candidates.get(candidate, 0) + 1
    out: list[FetchArgDef] = []
    taken: set[str] = set()
    for item in words:
        if item is None:
            for name in params:
                field = _derived_name("local", name, len(out) + 1, {name: 1})
                if field in taken:
                    raise ParseError("USED_ARG_NAME", star.pos, text)
                taken.add(field)
                out.append(FetchArgDef(field, name, None, star.pos, None, star.pos, "local",
                                       name, ()))
            continue
        apos, word = item
        arg = _parse_fetcharg(text, apos, word, len(out) + 1, d.kind == "r", taken, candidates)
        taken.add(arg.name)
        out.append(arg)
    return out


# --------------------------------------------------------------------------------- parse


def parse(line: str) -> ProbeDef | RemoveDef:
    """Parse one definition; raise ParseError(code, pos, line) at the first error, checking in
    the kernel's order: the command word, MAXACTIVE, the probe point, the group/event names,
    the number of fetchargs, each fetcharg, and last the instruction boundary (which the
    kernel learns at registration). Columns are indexes into `line` as given."""
    text = line
    words = _tokenize(text)
    if not words:
        raise ParseError("BAD_PROBE_TYPE", 0, text)
    hpos, head = words[0]
    command = head[0]

    if command == "-":
        if head[1:2] != ":":
            raise ParseError("NO_EVENT_NAME", hpos + 1, text)
        # `-:GRP/` names a group and no event: every event of the group (not `-:` alone).
        group, event = _parse_event_name(text, head[2:], hpos + 2, need_event=False)
        return RemoveDef(group, event, [w for _, w in words[1:]], text)

    if command not in ("p", "r"):
        raise ParseError("BAD_PROBE_TYPE", hpos, text)
    if len(words) < 2:
        # The kernel's column for "after the last word" (trace_probe_log index >= argc).
        raise ParseError("NO_PROBE_POINT", hpos + len(head) + 1, text)

    colon = head.find(":")
    middle = head[1:colon] if colon >= 0 else head[1:]
    maxactive = 0
    if middle:
        if command == "p":
            if middle[0] in _DIGITS:
                raise ParseError("BAD_MAXACT_TYPE", hpos + 1, text)
            raise ParseError("BAD_PROBE_TYPE", hpos, text)
        number = _parse_uint(middle) if len(middle) < MAX_EVENT_NAME_LEN else None
        if not number:
            raise ParseError("BAD_MAXACT", hpos + 1, text)
        if number > KRETPROBE_MAXACTIVE_MAX:
            raise ParseError("MAXACT_TOO_BIG", hpos + 1, text)
        maxactive = number

    # The probe point. Like the kernel's, its errors point at its start, but for the suffix.
    tpos, target = words[1]
    is_return = command == "r"
    percent = target.find("%")
    if percent >= 0:
        if target[percent:] != "%return":
            raise ParseError("BAD_ADDR_SUFFIX", tpos + percent, text)
        target = target[:percent]
        is_return = True
    kind = "r" if is_return else "p"
    split = target.rfind(":")
    if split <= 0:
        raise ParseError("BAD_PROBE_ADDR", tpos, text)
    left, right = target[:split], target[split + 1 :]
    module: str | None = None
    qualname: str | None = None
    path: str | None = None
    line_no: int | None = None
    offset = 0
    # `pkg.py:func` is function `func` of a module named `pkg.py`; `pkg.py:12`, `dir/x.py:...`
    # and `pkg.py:-1` are line targets.
    if _is_path(left) and (
        not _is_dotted_name(left) or not (right[:1].isidentifier() or right[:1] == "<")
    ):
        target_kind = "line"
        line_no = _parse_uint(right) if right[:2] not in ("0x", "0X") else None
        if not line_no:
            raise ParseError("BAD_LINE", tpos + split + 1, text)
        if is_return:
            raise ParseError("BAD_RETPROBE", tpos, text)
        path = left
    else:
        if not _is_dotted_name(left):
            raise ParseError("BAD_PROBE_ADDR", tpos, text)
        plus = right.find("+")
        qualname = right if plus < 0 else right[:plus]
        if plus >= 0:
            number = _parse_uint(right[plus + 1 :])
            if number is None or number > MAX_OFFSET:
                raise ParseError("BAD_PROBE_ADDR", tpos, text)
            offset = number
        if qualname == "<module>":
            target_kind = "module"
        elif _is_qualname(qualname):
            target_kind = "symbol"
        else:
            raise ParseError("BAD_PROBE_ADDR", tpos, text)
        if is_return and offset:
            raise ParseError("BAD_RETPROBE", tpos, text)
        module = left

    group = event = None
    if colon >= 0:
        group, event = _parse_event_name(text, head[colon + 1 :], hpos + colon + 1, False)
    if event is None:
        event = derive_event_name(
            kind, module=module, qualname=qualname, offset=offset, path=path, line=line_no
        )

    argwords = words[2:]
    if len(argwords) > MAX_TRACE_ARGS:
        raise ParseError("TOO_MANY_ARGS", argwords[0][0], text)
    # $arg* before any fetcharg is parsed (kernel argv_has_var_arg()): the parameters are
    # those of a function's entry or exit, and it is used once.
    star = -1
    for apos, word in argwords:
        if word.startswith("$arg*"):
            if target_kind != "symbol" or not (is_return or offset == 0):
                raise ParseError("NOFENTRY_ARGS", apos, text)
            if star >= 0:
                raise ParseError("DOUBLE_ARGS", apos, text)
            star = apos
    args: list[FetchArgDef] = []
    if argwords:
        candidates: dict[str, int] = {}
        for _, word in argwords:
            candidate = _candidate_name(word)
            if candidate:
                candidates[candidate] = candidates.get(candidate, 0) + 1
        taken: set[str] = set()
        for index, (apos, word) in enumerate(argwords, 1):
            arg = _parse_fetcharg(text, apos, word, index, is_return, taken, candidates)
            taken.add(arg.name)
            args.append(arg)

    # CPython's instructions are 2-byte code units (wordcode, 3.6+): an odd offset is never an
    # instruction's start. The resolver finds the rest (an offset inside an instruction's
    # CACHE entries) once it has the code.
    if offset % 2:
        raise ParseError("BAD_INSN_BNDRY", tpos, text)

    return ProbeDef(
        kind,
        group or DEFAULT_GROUP,
        event,
        maxactive,
        target,
        target_kind,
        module,
        qualname,
        offset,
        path,
        line_no,
        args,
        text,
        tpos,
    )


def parse_dynamic_event(line: str) -> ProbeDef | RemoveDef:
    """A line of `dynamic_events`: what parse() takes, and `!p:[GRP/]EVENT [TARGET [ARGS]]`,
    which removes what it names as `-:` does (kernel dyn_event_release(): the event after the
    first colon of the first word; the probe type is not compared)."""
    text = line
    words = _tokenize(text)
    if not words or words[0][1][:1] != "!":
        return parse(line)
    hpos, head = words[0]
    colon = head.find(":")
    if colon < 0:
        raise ParseError("NO_EVENT_NAME", hpos + len(head), text)
    group, event = _parse_event_name(text, head[colon + 1 :], hpos + colon + 1, False)
    return RemoveDef(group, event, [w for _, w in words[1:]], text, kind="!")


def _split_boot(value: str) -> list[str]:
    """Split `value` on `;` and turn `,` into spaces, both outside quotes and brackets (kernel
    setup_boot_kprobe_events() replaces every comma and splits on every semicolon)."""
    parts: list[str] = []
    chars: list[str] = []
    quote = ""
    depth = 0
    for c in value:
        if quote:
            if c == quote:
                quote = ""
        elif c in _QUOTES:
            quote = c
        elif c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        elif not depth:
            if c == ";":
                parts.append("".join(chars))
                chars = []
                continue
            if c == ",":
                c = " "
        chars.append(c)
    parts.append("".join(chars))
    return parts


def parse_boot(value: str) -> list[tuple[str, ProbeDef | RemoveDef | ParseError]]:
    """The `kprobe_event=` form (`PYKPROBES_EVENTS`): definitions separated by `;`, with commas
    for spaces. Returns each non-empty definition's text (commas turned to spaces, stripped:
    the text that the record's `text` and the error's `pos` refer to) with its record or its
    ParseError. Never raises: the boot stage warns and goes on."""
    results: list[tuple[str, ProbeDef | RemoveDef | ParseError]] = []
    for part in _split_boot(value):
        text = part.strip(_SPACES)
        if not text:
            continue
        try:
            results.append((text, parse(text)))
        except ParseError as exc:
            results.append((text, exc))
    return results


__all__ = [
    "DEFAULT_GROUP",
    "FETCH_TYPES",
    "KRETPROBE_MAXACTIVE_MAX",
    "MAX_ARGSTR_LEN",
    "MAX_ARG_NAME_LEN",
    "MAX_EVENT_NAME_LEN",
    "MAX_TRACE_ARGS",
    "FetchArgDef",
    "ParseError",
    "ProbeDef",
    "RemoveDef",
    "derive_event_name",
    "expand_args",
    "parse",
    "parse_boot",
    "parse_dynamic_event",
    "parse_fetcharg",
]
