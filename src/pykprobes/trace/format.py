"""Trace records as ftrace prints them (kernel/trace/trace_output.c, trace_kprobe.c, trace.c).

Lines (`format_line`, `format_lost`) come without their newline; whole files
(`format_header`, `format_batch`, `format_profile`, `format_error_log`,
`format_event_format`) are complete texts ending with one.

A trace line is ftrace's context followed by the kprobe event's own text:

    "{comm:>16}-{tid:<7} [000]  {secs:5d}.{usecs:06d}: {name}: ({symbol}+{offset}) a=1 b=\"x\""

which is `trace_print_context()` without the irq-info columns (Python has no irqs and one
"CPU": `[000]`, `#P:1`), then `print_kprobe_event()`. For a return probe the parenthesis is
`({symbol} <- {caller})`, the order docs/events.md fixes. The timestamp is microseconds,
rounded from nanoseconds as the kernel's `ns2usecs()` does, relative to `ts_base_ns`.

Values, as the kernel's print functions would show them (`format_value`):

- int: decimal; `0x1f` (`-0x1f` below zero) when the field's type is `x`; an int too long
  for decimal (over 4300 digits, CPython's int-to-str limit) in hex, cut after 1024 digits
  (`safe.int_text`);
- str: double-quoted, with `\\"`, `\\\\`, `\\n`, `\\t`, `\\r` and `\\xNN` / `\\uNNNN` escapes for
  what is not printable; bytes the same with a `b` prefix (`b"\\x00ab"`);
- text shown bare (a comm, a `:repr` / `:type` / `$stackN` text, a caller, a line target's
  path): the same escapes but for the double quote (`bare`), so that no text of the program
  can end a line or begin another;
- float: Python's shortest repr; bool: `True` / `False`; None: `None`;
- the FAULT marker: `(fault)`. This module imports nothing from fetchargs: a value is the
  marker when its class is named `Fault` (fetchargs: keep that class name);
- anything else: `<Type object at 0x...>` (`object.__repr__`: never the program's `__repr__`).

Subclasses of int, float and str print through the base type's own methods, so no method of
the program runs while formatting (STYLE rule 9).

Field types: an event may carry `types`, a tuple of type names parallel to `fields` (None where
untyped); without it they are read from `event.definition.args[i].type` (grammar's
FetchArgDef). Only `x` changes a text line; the format file shows every type.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, Protocol

from pykprobes.trace.safe import int_text

if TYPE_CHECKING:
    from pykprobes.trace.buffer import ReadBatch, Record, TraceBuffer

__all__ = [
    "FAULT_STRING",
    "bare",
    "format_batch",
    "format_error_log",
    "format_event_format",
    "format_header",
    "format_json",
    "format_line",
    "format_lost",
    "format_profile",
    "format_value",
    "json_string",
]

#: How the FAULT marker prints (the kernel's FAULT_STRING).
FAULT_STRING: Final = "(fault)"
#: The location error_log names when an entry names none (the kernel prints e.g. trace_kprobe).
ERROR_LOG_LOCATION: Final = "pykprobes"
#: error_log's command prefix; the caret line is indented by its width (kernel CMD_PREFIX).
CMD_PREFIX: Final = "  Command: "


# -- values -----------------------------------------------------------------------------

_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\n": "\\n",
    "\t": "\\t",
    "\r": "\\r",
}


def _escape_char(c: str) -> str:
    esc = _ESCAPES.get(c)
    if esc is not None:
        return esc
    if c.isprintable():
        return c
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _quote(s: str) -> str:
    """`s` double-quoted, with C-like escapes for quotes, backslashes and unprintables."""
    if s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'
    return '"' + "".join(map(_escape_char, s)) + '"'


def _bare_char(c: str) -> str:
    return c if c == '"' else _escape_char(c)


def bare(value: object) -> str:
    """Text of the program's shown bare (a comm, a `:repr` or `:type` text, a `$stackN` or
    caller name, a line target's path): backslashes and every character that is not
    printable escaped as in a quoted string (`\\\\`, `\\n`, `\\xNN`, `\\uNNNN`), so that
    no text can end a trace line or forge another (the kernel's escaping of a comm in
    /proc/PID/status, `\\n` and `\\\\`, extended to every unprintable character). A value
    that is not a str is shown by `format_value`."""
    t = type(value)
    if t is not str:
        if not issubclass(t, str):
            return format_value(value)
        value = str.__str__(value)
    s: str = value  # type: ignore[assignment]
    if s.isprintable() and "\\" not in s:
        return s
    return "".join(map(_bare_char, s))


def _printable(s: str) -> str:
    """`s` with only its unprintable characters escaped (`\\n`, `\\xNN`, `\\uNNNN`): one
    line, backslashes as they are."""
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else _escape_char(c) for c in s)


def _quote_bytes(b: bytes) -> str:
    chars = []
    for code in b:
        c = chr(code)
        esc = _ESCAPES.get(c)
        if esc is not None:
            chars.append(esc)
        elif 0x20 <= code < 0x7F:
            chars.append(c)
        else:
            chars.append(f"\\x{code:02x}")
    return 'b"' + "".join(chars) + '"'


def is_fault(value: object) -> bool:
    """Whether `value` is fetchargs' FAULT marker (its class is named `Fault`)."""
    return type(value).__name__ == "Fault"


def format_value(value: object, type_name: str | None = None) -> str:
    """One value as a trace line shows it (see the module docstring). Never raises."""
    t = type(value)
    if t is int:
        return int_text(value, type_name == "x")  # type: ignore[arg-type]
    if t is str:
        return _quote(value)  # type: ignore[arg-type]
    if t is bool:
        return "True" if value else "False"
    if t is float:
        return float.__repr__(value)
    if value is None:
        return "None"
    if t is bytes:
        return _quote_bytes(value)  # type: ignore[arg-type]
    if is_fault(value):
        return FAULT_STRING
    # Subclasses (IntEnum, a str subclass...): the base type's methods, never the program's.
    if issubclass(t, int):
        return int_text(int.__int__(value), type_name == "x")  # type: ignore[arg-type]
    if issubclass(t, str):
        # fetchargs' Opaque: the description of an object recorded without a type
        # (`<Type at 0x...>`), a `:repr` or `:type` text, printed bare as the kernel prints
        # a symbol; any other str subclass is a string.
        return bare(value) if t.__name__ == "Opaque" else _quote(str.__str__(value))
    if issubclass(t, float):
        return float.__repr__(value)
    if issubclass(t, bytes):
        return _quote_bytes(bytes.__bytes__(value))  # type: ignore[arg-type]
    # `<module.Qualname object at 0x...>`: a class's names are the program's text.
    return bare(object.__repr__(value))


# -- JSON ---------------------------------------------------------------------------------
#
# Written here, not with the json module: the writer of `pykprobes run` must run none of the
# code a program can probe (an event on json:dumps would record the writer's own calls).

_JSON_ESCAPES: Final = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t",
                        "\b": "\\b", "\f": "\\f"}


def _json_char(c: str) -> str:
    esc = _JSON_ESCAPES.get(c)
    if esc is not None:
        return esc
    if c.isprintable():
        return c
    code = ord(c)
    if code < 0x10000:
        return f"\\u{code:04x}"  # a lone surrogate too: JSON can only escape it
    code -= 0x10000
    return f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}"


def json_string(s: str) -> str:
    """`s` as a JSON string: printable characters as they are, the others escaped
    (`\\uXXXX`, surrogate pairs beyond the BMP), so that the text encodes in UTF-8 whatever
    the string holds (a lone surrogate included) and never breaks the line."""
    if s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'
    return '"' + "".join(map(_json_char, s)) + '"'


def _json_value(value: object) -> str:
    t = type(value)
    if t is bool:
        return "true" if value else "false"
    if value is None:
        return "null"
    if t is str:
        return json_string(value)  # type: ignore[arg-type]
    if t is float or (issubclass(t, float) and not is_fault(value)):
        number = float.__float__(value)  # type: ignore[arg-type]
        text = float.__repr__(number)
        return text if math.isfinite(number) else json_string(text)
    if issubclass(t, int) and not is_fault(value):
        number = int.__int__(value)  # type: ignore[arg-type]
        text = int_text(number)
        return json_string(text) if "x" in text else text  # too long for decimal: hex
    if issubclass(t, str):
        return json_string(str.__str__(value))
    return json_string(format_value(value))


def _field_types(event: Any) -> tuple[str | None, ...]:
    types = getattr(event, "types", None)
    if types is not None:
        return tuple(types)
    args = getattr(getattr(event, "definition", None), "args", None)
    if args is None:
        return ()
    return tuple(getattr(a, "type", None) for a in args)


# -- trace and trace_pipe ---------------------------------------------------------------


def _probe_text(event: Any, caller: str | None) -> str:
    if event.is_return:
        return f"{bare(event.symbol)} <- {bare(caller) if caller is not None else '?'}"
    return f"{bare(event.symbol)}+{event.offset}"


def format_line(record: Record, ts_base_ns: int = 0) -> str:
    """One record as a line of ftrace's `trace` / `trace_pipe` (no newline)."""
    ts_ns, tid, comm, event, values, caller = record
    usecs = (ts_ns - ts_base_ns + 500) // 1000  # ns2usecs(): rounded to the microsecond
    secs, usecs = divmod(max(usecs, 0), 1_000_000)
    # The kernel prints "<...>" for a task whose comm it did not save.
    parts = [
        f"{bare(comm) or '<...>':>16}-{tid:<7} [000]  {secs:5d}.{usecs:06d}: "
        f"{event.name}: ({_probe_text(event, caller)})"
    ]
    types = _field_types(event)
    for i, (name, value) in enumerate(zip(event.fields, values, strict=False)):
        type_name = types[i] if i < len(types) else None
        parts.append(f" {name}={format_value(value, type_name)}")
    return "".join(parts)


def format_lost(n: int) -> str:
    """The line trace_pipe prints where `n` events were lost (no newline)."""
    return f"CPU:0 [LOST {n} EVENTS]"


def format_batch(batch: ReadBatch, ts_base_ns: int = 0) -> str:
    """What one trace_pipe read shows: the batch's lines, with a lost-events line at each
    place the batch says events were lost."""
    out: list[str] = []
    lost = iter(batch.lost_at)
    index, count = next(lost, (-1, 0))
    for i, record in enumerate(batch):
        while index == i:
            out.append(format_lost(count) + "\n")
            index, count = next(lost, (-1, 0))
        out.append(format_line(record, ts_base_ns) + "\n")
    while index != -1:
        out.append(format_lost(count) + "\n")
        index, count = next(lost, (-1, 0))
    return "".join(out)


def format_header(buffer: TraceBuffer) -> str:
    """The comment block at the top of the `trace` file (tracer nop, no irq-info)."""
    entries, written = buffer.counts()
    return (
        "# tracer: nop\n"
        "#\n"
        f"# entries-in-buffer/entries-written: {entries}/{written}   #P:1\n"
        "#\n"
        "#           TASK-PID     CPU#     TIMESTAMP  FUNCTION\n"
        "#              | |         |         |         |\n"
    )


def format_json(record: Record, ts_base_ns: int = 0) -> str:
    """One record as a JSON object on one line (no newline).

    Keys: `ts` (nanoseconds, relative to `ts_base_ns`, an int), `tid`, `comm`, `group`,
    `event`, `probe` (`symbol+offset`, or `symbol` for a return probe), `caller` (null for
    an entry probe) and `fields` (name -> value). Values that JSON cannot hold (bytes, FAULT,
    other objects, non-finite floats) are given as strings in their text-line form.
    """
    ts_ns, tid, comm, event, values, caller = record
    probe = event.symbol if event.is_return else f"{event.symbol}+{event.offset}"
    fields = ",".join(f"{json_string(name)}:{_json_value(v)}"
                      for name, v in zip(event.fields, values, strict=False))
    return (
        f'{{"ts":{_json_value(ts_ns - ts_base_ns)},"tid":{_json_value(tid)},'
        f'"comm":{_json_value(comm)},"group":{json_string(event.group)},'
        f'"event":{json_string(event.name)},"probe":{_json_value(probe)},'
        f'"caller":{_json_value(caller)},"fields":{{{fields}}}}}'
    )


# -- kprobe_profile, error_log ----------------------------------------------------------


def format_profile(rows: Iterable[tuple[str, int, int]]) -> str:
    """The `kprobe_profile` file from `(event name, hits, misses)` rows: the kernel's
    `"  %-44s %15lu %15lu"`."""
    return "".join(f"  {name:<44} {hits:>15} {misses:>15}\n" for name, hits, misses in rows)


class ErrorLogEntryLike(Protocol):
    """What `format_error_log` reads from an entry: `message`, `command`, `pos`, and the
    time, as `ts_ns` (int nanoseconds) or `timestamp` (float seconds); optionally
    `location` (default "pykprobes")."""

    message: str
    command: str
    pos: int


def _error_time(entry: Any) -> tuple[int, int]:
    ts_ns = getattr(entry, "ts_ns", None)
    if ts_ns is not None:
        usecs = int(ts_ns) // 1000  # the kernel truncates: nsec / 1000
    else:
        usecs = round(float(getattr(entry, "timestamp", 0.0)) * 1_000_000)
    return divmod(max(usecs, 0), 1_000_000)


def format_error_log(entries: Iterable[ErrorLogEntryLike]) -> str:
    """The `error_log` file, the kernel's layout:

    [   12.345678] pykprobes: error: MESSAGE
      Command: DEFINITION
                    ^
    """
    out = []
    for entry in entries:
        secs, usecs = _error_time(entry)
        location = getattr(entry, "location", None) or ERROR_LOG_LOCATION
        # The command as the user typed it (a backslash as typed, as the kernel shows it:
        # the kselftests' `\\x` immediates), only what is not printable escaped (a NUL or
        # a lone surrogate in a path), the caret under the same character.
        command = entry.command
        caret = " " * (len(CMD_PREFIX) + len(_printable(command[: max(entry.pos, 0)]))) + "^"
        out.append(
            f"[{secs:5d}.{usecs:06d}] {location}: error: {bare(entry.message)}\n"
            f"{CMD_PREFIX}{_printable(command)}\n"
            f"{caret}\n"
        )
    return "".join(out)


# -- events/GRP/EVENT/format ------------------------------------------------------------

# Fetch type -> (C type, size, signed, printf format). Scalars take one 8-byte slot and
# strings a 4-byte __data_loc word, as in buffer.record_size().
_SCALAR: Final = ("object", 8, 0, "%s")
_STRING: Final = ("__data_loc char[]", 4, 1, '\\"%s\\"')
_FIELD_TYPES: Final = {
    "int": ("s64", 8, 1, "%Ld"),
    "len": ("s64", 8, 1, "%Ld"),
    "x": ("u64", 8, 0, "0x%Lx"),
    "float": ("double", 8, 1, "%g"),
    "bool": ("bool", 8, 0, "%d"),
    "str": _STRING,
    "string": _STRING,
    "repr": _STRING,
    "type": _STRING,
    "qualname": _STRING,
}


def format_event_format(event: Any) -> str:
    """The `events/GRP/EVENT/format` file, the kernel's layout for a kprobe event: name,
    ID, the common fields, the probe's address field(s), one line per fetched field, and
    the print format. Field types come from the fetch types (untyped: `object`)."""
    lines = [
        f"name: {event.name}",
        f"ID: {getattr(event, 'id', 0)}",
        "format:",
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;",
        "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;",
        "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;",
        "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;",
        "",
    ]
    if event.is_return:
        lines.append("\tfield:unsigned long __probe_func;\toffset:8;\tsize:8;\tsigned:0;")
        lines.append("\tfield:unsigned long __probe_ret_ip;\toffset:16;\tsize:8;\tsigned:0;")
        offset = 24
        fmt = "(%lx <- %lx)"
        args = ["REC->__probe_func", "REC->__probe_ret_ip"]
    else:
        lines.append("\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;")
        offset = 16
        fmt = "(%lx)"
        args = ["REC->__probe_ip"]
    types = _field_types(event)
    for i, name in enumerate(event.fields):
        type_name = types[i] if i < len(types) else None
        ctype, size, signed, conv = _FIELD_TYPES.get(type_name or "", _SCALAR)
        lines.append(f"\tfield:{ctype} {name};\toffset:{offset};\tsize:{size};\tsigned:{signed};")
        offset += size
        fmt += f" {name}={conv}"
        args.append(f"__get_str({name})" if ctype == _STRING[0] else f"REC->{name}")
    lines.append("")
    lines.append(f'print fmt: "{fmt}", {", ".join(args)}')
    return "\n".join(lines) + "\n"
