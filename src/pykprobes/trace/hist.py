"""Hist triggers: aggregation at the hit, the kernel's Documentation/trace/histogram.rst in
Python form (kernel/trace/trace_events_hist.c).

Written to `events/GRP/EVENT/trigger` (tracefs.py):

    hist:keys=F[.MOD][,F[.MOD]...][:vals=V[,V...]][:sort=S[.ascending|.descending][,S]]
        [:size=N][:name=NAME][:pause|:cont|:continue|:clear] [if FILTER]
    !hist:...                       removes the trigger with the same keys, vals, sort, filter

F is a field of the event (a fetcharg's name) or a special field:

    common_pid        the thread's id (the trace's tid column)
    common_comm       the thread's name (a string key)
    common_timestamp  the hit's time, ns on the trace clock (`.usecs`: microseconds)
    stacktrace        the Python stack of the probed frame, `module:qualname` per frame,
                      innermost first, at most HIST_STACKTRACE_DEPTH (also common_stacktrace)
    hitcount          the implicit value (in `vals=` and `sort=` only)

Modifiers of a key: `.log2` (the kernel's ilog2(roundup_pow_of_two(v)), printed `~ 2^N`),
`.buckets=N` (v // N * N, printed `~ lo-hi`), `.usecs` (v // 1000: a $duration or a
timestamp in microseconds; the kernel's applies to common_timestamp only), `.hex`,
`.execname` (on common_pid: printed with the thread's name). Values take `.hex` only.

Every hit of the event runs its triggers, whether or not the event itself is enabled (the
kernel's soft-enabled event): a hist-only event writes no trace record. A trigger's own
`if FILTER` (trace/filter.py) chooses the hits it counts. `pause` keeps the table and stops
counting, `cont` resumes, `clear` empties the table; `name=` shares one table among the
triggers of that name whose keys, values and sort match (NAMED_MISMATCH otherwise).

`events/GRP/EVENT/hist` prints every hist trigger of the event in the kernel's format
(`format_hist`): the trigger info, one line per entry `{ key: value } hitcount: N  val: N`
sorted as `sort=` says (default: hitcount, ascending), then `Totals:` Hits, Entries and
Dropped. Errors are the kernel's, from errors.ERRORS (HIST_* codes), with the column of the
bad part; variables, expressions and actions (onmatch/onmax, synthetic events) are not
supported and say so.
"""

from __future__ import annotations

import errno
import math
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any, Final

from pykprobes.errors import ParseError
from pykprobes.trace.cmdlines import resolve
from pykprobes.trace.fetchargs import frame_name
from pykprobes.trace.format import format_value
from pykprobes.trace.histmap import DEFAULT_SIZE, LOCKED, HistMap, add_value, locked
from pykprobes.trace.safe import FAULT

__all__ = [
    "HIST_STACKTRACE_DEPTH",
    "HistField",
    "HistRecorder",
    "HistSpec",
    "HistTrigger",
    "NamedTables",
    "TriggerError",
    "format_hist",
    "format_trigger_file",
    "parse_trigger",
    "write_trigger",
]

HIST_PREFIX: Final = "hist"
#: The kernel's map_bits bounds: 128 .. 131072 entries.
MAP_BITS_MIN: Final = 7
MAP_BITS_MAX: Final = 17
#: TRACING_MAP_KEYS_MAX, TRACING_MAP_VALS_MAX, TRACING_MAP_SORT_KEYS_MAX.
KEYS_MAX: Final = 3
VALS_MAX: Final = 3
SORT_KEYS_MAX: Final = 2
#: Frames of a stacktrace key (the kernel's HIST_STACKTRACE_DEPTH).
HIST_STACKTRACE_DEPTH: Final = 16
#: The clocks `clock=` accepts: all are the trace clock here (CLOCK_MONOTONIC).
CLOCKS: Final = frozenset(("global", "local", "mono", "mono_raw", "boot", "perf"))

# Where a field's value comes from.
SRC_FIELD: Final = 0
SRC_PID: Final = 1
SRC_COMM: Final = 2
SRC_TIMESTAMP: Final = 3
SRC_STACK: Final = 4
_SPECIAL: Final = {
    "common_pid": SRC_PID,
    "common_comm": SRC_COMM,
    "common_timestamp": SRC_TIMESTAMP,
}
_STACK_NAMES: Final = frozenset(("stacktrace", "common_stacktrace"))
_STRING_TYPES: Final = frozenset(("str", "string", "repr", "type"))
_KEY_MODIFIERS: Final = frozenset(("hex", "log2", "usecs", "execname", "buckets"))


class HistField:
    """A key or value of a trigger: `name` as written (a field, or a special field),
    `modifier` (None, "hex", "log2", "usecs", "execname", "buckets"), `buckets` (the N of
    `.buckets=N`), where its value comes from (`source`, and `index` in the event's values
    for SRC_FIELD)."""

    __slots__ = ("name", "modifier", "buckets", "source", "index")

    def __init__(self, name: str, modifier: str | None, buckets: int, source: int,
                 index: int) -> None:
        self.name = name
        self.modifier = modifier
        self.buckets = buckets
        self.source = source
        self.index = index

    @property
    def text(self) -> str:
        """As the trigger file prints it (the kernel's hist_field_print)."""
        if self.source == SRC_STACK:
            return "stacktrace"
        text = self.name
        if self.modifier is not None:
            text += f".{self.modifier}"
        if self.buckets:
            text += f"={self.buckets}"
        return text

    def transform(self) -> Callable[[Any], Any] | None:
        """The key's modifier as a function of the value (None: the value as it is)."""
        mod = self.modifier
        if mod == "log2":
            return _log2
        if mod == "usecs":
            return _usecs
        if mod == "buckets":
            size = self.buckets

            def bucket(value: Any) -> Any:
                number = _as_int(value)
                return FAULT if number is None else number // size * size

            return bucket
        return None


def _as_int(value: Any) -> int | None:
    tp = type(value)
    if tp is int:
        return value  # type: ignore[no-any-return]
    if tp is float and math.isfinite(value):
        return int(value)
    if tp is bool:
        return int(value)
    return None


def _log2(value: Any) -> Any:
    """ilog2(roundup_pow_of_two(v)); 0 for 0 and 1; FAULT below 0 or for a non-number."""
    number = _as_int(value)
    if number is None or number < 0:
        return FAULT
    return (number - 1).bit_length() if number > 1 else 0


def _usecs(value: Any) -> Any:
    number = _as_int(value)
    return FAULT if number is None else number // 1000


class HistSpec:
    """A parsed hist trigger command (`parse_trigger`)."""

    __slots__ = ("text", "remove", "keys", "vals", "sort", "size", "name", "pause", "cont",
                 "clear", "filter_text", "filter_pos")

    def __init__(self, text: str) -> None:
        self.text = text
        self.remove = False
        self.keys: tuple[HistField, ...] = ()
        self.vals: tuple[HistField, ...] = ()
        #: (field or None for hitcount, descending)
        self.sort: tuple[tuple[HistField | None, bool], ...] = ((None, False),)
        self.size = DEFAULT_SIZE
        self.name: str | None = None
        self.pause = False
        self.cont = False
        self.clear = False
        self.filter_text: str | None = None
        self.filter_pos = 0

    def describe(self) -> str:
        """The trigger as the trigger file and the hist header print it, without its state
        (the kernel's event_hist_trigger_print)."""
        head = f"{HIST_PREFIX}:{self.name + ':' if self.name else ''}"
        keys = ",".join(k.text for k in self.keys)
        vals = "".join(f",{v.text}" for v in self.vals)
        sort = ",".join(("hitcount" if f is None else f.text) + (".descending" if d else "")
                        for f, d in self.sort)
        text = f"{head}keys={keys}:vals=hitcount{vals}:sort={sort}:size={self.size}"
        if self.filter_text is not None:
            text += f" if {self.filter_text}"
        return text

    def shape(self) -> tuple[Any, ...]:
        """What two triggers must share to share a named table (the kernel's
        hist_trigger_match with ignore_filter)."""
        return (tuple(k.text for k in self.keys), tuple(v.text for v in self.vals),
                tuple(("hitcount" if f is None else f.text, d) for f, d in self.sort))

    def same(self, other: HistSpec) -> bool:
        """The kernel's hist_trigger_match: same keys, values, sort, filter and name."""
        return (self.shape() == other.shape() and self.filter_text == other.filter_text
                and self.name == other.name)


# ------------------------------------------------------------------------------- parsing


def _split(text: str, sep: str, start: int) -> list[tuple[str, int]]:
    """`text` split at `sep`, each piece with its column (`start` is text's own column)."""
    out: list[tuple[str, int]] = []
    pos = 0
    for piece in text.split(sep):
        out.append((piece, start + pos))
        pos += len(piece) + 1
    return out


def parse_trigger(text: str, fields: Mapping[str, str | None]) -> HistSpec:
    """Parse one command written to a trigger file, for an event whose fields (name ->
    fetch type, None if untyped) are `fields`. Raises ParseError(code, column, text)."""
    spec = HistSpec(text)
    off = 0
    if text.startswith("!"):
        spec.remove = True
        off = 1
    word_end = off
    while word_end < len(text) and text[word_end] not in ": \t":
        word_end += 1
    if text[off:word_end] != HIST_PREFIX:
        raise ParseError("TRIGGER_UNSUPPORTED", off, text)
    # The trigger's parameter ends at the first blank; `if FILTER` may follow.
    end = word_end
    while end < len(text) and text[end] not in " \t":
        end += 1
    rest = text[end:].lstrip(" \t")
    if rest:
        rest_pos = len(text) - len(rest)
        if not (rest.startswith("if") and rest[2:3] in (" ", "\t")):
            raise ParseError("TRIGGER_BAD_FILTER", rest_pos, text)
        flt = rest[2:].strip(" \t")
        if not flt:
            raise ParseError("TRIGGER_BAD_FILTER", rest_pos, text)
        spec.filter_text = flt
        spec.filter_pos = len(text) - len(rest[2:].lstrip(" \t"))
    param = text[word_end + 1 : end] if word_end < end else ""
    keys: tuple[str, int] | None = None
    vals: tuple[str, int] | None = None
    sort: tuple[str, int, int] | None = None
    for piece, pos in (_split(param, ":", word_end + 1) if param else []):
        lhs, eq, rhs = piece.partition("=")
        if eq:
            if not rhs:
                raise ParseError("HIST_EMPTY_ASSIGNMENT", pos, text)
            rpos = pos + len(lhs) + 1
            if lhs in ("key", "keys"):
                keys = (rhs, rpos)
            elif lhs in ("val", "vals", "values"):
                vals = (rhs, rpos)
            elif lhs == "sort":
                sort = (rhs, rpos, pos)
            elif lhs == "name":
                if not all(c.isalnum() or c == "_" for c in rhs):
                    raise ParseError("HIST_BAD_NAME", rpos, text)
                spec.name = rhs
            elif lhs == "clock":
                if rhs not in CLOCKS:
                    raise ParseError("HIST_SET_CLOCK_FAIL", rpos, text)
            elif lhs == "size":
                spec.size = _map_size(rhs, rpos, text)
            elif not lhs:
                raise ParseError("HIST_MALFORMED_ASSIGNMENT", pos, text)
            else:
                # A variable (`ts0=common_timestamp`): inter-event histograms.
                raise ParseError("HIST_VARS_UNSUPPORTED", pos, text)
        elif piece == "pause":
            spec.pause = True
        elif piece in ("cont", "continue"):
            spec.cont = True
        elif piece == "clear":
            spec.clear = True
        elif piece.startswith(("onmatch(", "onmax(", "onchange(")):
            raise ParseError("HIST_ACTIONS_UNSUPPORTED", pos, text)
        else:
            raise ParseError("HIST_BAD_ATTR", pos, text)
    if keys is None:
        raise ParseError("HIST_NO_KEYS", off, text)
    spec.keys = _parse_keys(keys[0], keys[1], fields, text)
    if vals is not None:
        spec.vals = _parse_vals(vals[0], vals[1], fields, text)
    if sort is not None:
        spec.sort = _parse_sort(sort[0], sort[1], sort[2], spec, text)
    return spec


def _map_size(text: str, pos: int, whole: str) -> int:
    """size=N: rounded up to a power of two, 128..131072 (the kernel's parse_map_size)."""
    try:
        size = int(text, 0)
    except ValueError:
        raise ParseError("HIST_BAD_SIZE", pos, whole) from None
    bits = (size - 1).bit_length() if size > 1 else 0
    if not MAP_BITS_MIN <= bits <= MAP_BITS_MAX:
        raise ParseError("HIST_BAD_SIZE", pos, whole)
    return 1 << bits


def _parse_field(piece: str, pos: int, fields: Mapping[str, str | None], text: str,
                 is_key: bool) -> HistField:
    """`NAME[.MODIFIER]` (the kernel's parse_field): FIELD_NOT_FOUND at the name,
    BAD_FIELD_MODIFIER at the modifier."""
    name, dot, mod = piece.partition(".")
    mpos = pos + len(name) + 1
    ftype: str | None
    if name in _SPECIAL:
        source, index, ftype = _SPECIAL[name], -1, "str" if name == "common_comm" else "int"
    elif name in fields and name not in ("hitcount",):
        source, index, ftype = SRC_FIELD, list(fields).index(name), fields[name]
    else:
        raise ParseError("HIST_FIELD_NOT_FOUND", pos, text)
    modifier: str | None = None
    buckets = 0
    if dot:
        modifier, _, count = mod.partition("=")
        if modifier == "buckets":
            try:
                buckets = int(count, 0)
            except ValueError:
                buckets = 0
            if buckets <= 0:
                raise ParseError("HIST_BAD_FIELD_MODIFIER", mpos, text)
        elif count:
            raise ParseError("HIST_BAD_FIELD_MODIFIER", mpos, text)
        if modifier not in _KEY_MODIFIERS or (not is_key and modifier != "hex"):
            raise ParseError("HIST_BAD_FIELD_MODIFIER", mpos, text)
        if modifier == "execname" and source != SRC_PID:
            raise ParseError("HIST_BAD_FIELD_MODIFIER", mpos, text)
        if modifier in ("log2", "buckets", "usecs", "hex") and ftype in _STRING_TYPES:
            raise ParseError("HIST_BAD_FIELD_MODIFIER", mpos, text)
    if not is_key and ftype in _STRING_TYPES:
        raise ParseError("HIST_STR_VAL", pos, text)
    return HistField(name, modifier, buckets, source, index)


def _parse_keys(text: str, pos: int, fields: Mapping[str, str | None],
                whole: str) -> tuple[HistField, ...]:
    keys: list[HistField] = []
    for piece, ppos in _split(text, ",", pos):
        if len(keys) >= KEYS_MAX:
            raise ParseError("HIST_TOO_MANY_KEYS", ppos, whole)
        if piece in _STACK_NAMES:
            keys.append(HistField(piece, None, 0, SRC_STACK, -1))
        else:
            keys.append(_parse_field(piece, ppos, fields, whole, True))
    return tuple(keys)


def _parse_vals(text: str, pos: int, fields: Mapping[str, str | None],
                whole: str) -> tuple[HistField, ...]:
    vals: list[HistField] = []
    for piece, ppos in _split(text, ",", pos):
        if piece in ("hitcount", "hitcount.hex"):
            continue
        if len(vals) >= VALS_MAX:
            raise ParseError("HIST_TOO_MANY_VALS", ppos, whole)
        if piece in _STACK_NAMES or piece.partition(".")[0] == "common_comm":
            raise ParseError("HIST_STR_VAL", ppos, whole)
        vals.append(_parse_field(piece, ppos, fields, whole, False))
    return tuple(vals)


def _parse_sort(text: str, pos: int, sort_pos: int, spec: HistSpec,
                whole: str) -> tuple[tuple[HistField | None, bool], ...]:
    """The kernel's create_sort_keys: the count and empty fields are reported at `sort=`,
    a bad modifier at the modifier, an unknown field at the field."""
    out: list[tuple[HistField | None, bool]] = []
    for i, (piece, ppos) in enumerate(_split(text, ",", pos)):
        if i >= SORT_KEYS_MAX:
            raise ParseError("HIST_TOO_MANY_SORT_FIELDS", sort_pos, whole)
        if not piece:
            raise ParseError("HIST_EMPTY_SORT_FIELD", sort_pos, whole)
        name, dot, mod = piece.partition(".")
        descending = False
        if dot:
            if mod not in ("ascending", "descending"):
                raise ParseError("HIST_INVALID_SORT_MODIFIER", ppos + len(name) + 1, whole)
            descending = mod == "descending"
        if name == "hitcount":
            out.append((None, descending))
            continue
        for field in (*spec.vals, *spec.keys):
            if field.name == name or (field.source == SRC_STACK and name in _STACK_NAMES):
                out.append((field, descending))
                break
        else:
            raise ParseError("HIST_INVALID_SORT_FIELD", ppos, whole)
    return tuple(out)


# ------------------------------------------------------------------------------- the hit


def stack_names(frame: FrameType | None) -> tuple[str, ...]:
    """`module:qualname` of `frame` and its callers, innermost first, at most
    HIST_STACKTRACE_DEPTH."""
    names: list[str] = []
    while frame is not None and len(names) < HIST_STACKTRACE_DEPTH:
        names.append(frame_name(frame))
        frame = frame.f_back
    return tuple(names)


#: `getter(values, thread key, ts, regs) -> value` of one key or value.
Getter = Callable[[Sequence[Any], Any, int, Any], Any]


def _getter(field: HistField) -> Getter:
    source = field.source
    if source == SRC_FIELD:
        index = field.index

        def get_field(values: Sequence[Any], tkey: Any, ts: int, regs: Any) -> Any:
            return values[index] if index < len(values) else FAULT

        return get_field
    if source == SRC_PID:
        return lambda values, tkey, ts, regs: resolve(tkey)[0]
    if source == SRC_COMM:
        return lambda values, tkey, ts, regs: resolve(tkey)[1]
    if source == SRC_TIMESTAMP:
        return lambda values, tkey, ts, regs: ts

    def get_stack(values: Sequence[Any], tkey: Any, ts: int, regs: Any) -> Any:
        try:
            return stack_names(regs.frame)
        except Exception:  # noqa: BLE001 - no frame: the key is a fault, never an error
            return FAULT

    return get_stack


def _key_getter(field: HistField) -> Getter:
    get = _getter(field)
    transform = field.transform()
    if transform is None:
        return get

    def get_key(values: Sequence[Any], tkey: Any, ts: int, regs: Any) -> Any:
        return transform(get(values, tkey, ts, regs))

    return get_key


class HistTrigger:
    """One hist trigger of an event: its spec, its table (its own, or a named one shared),
    its filter, and whether it is paused. `hit(values, tkey, ts, regs)` counts one hit of
    the event (values in field order, the thread key, the time, the Regs for a stacktrace
    key) and never raises."""

    def __init__(self, spec: HistSpec, hist_map: HistMap,
                 predicate: Callable[[dict[str, Any]], bool] | None,
                 field_names: Sequence[str]) -> None:
        self.spec = spec
        self.map = hist_map
        self.predicate = predicate
        self.paused = spec.pause
        self.field_names = tuple(field_names)
        self.execname = any(k.modifier == "execname" for k in spec.keys)
        getters = [_key_getter(k) for k in spec.keys]
        self._vals = tuple(_getter(v) for v in spec.vals)
        if len(getters) == 1:
            (self._key,) = getters
        else:
            self._key = lambda values, tkey, ts, regs: tuple(
                [g(values, tkey, ts, regs) for g in getters])
        self.hit: Callable[[Sequence[Any], Any, int, Any], None] = self._hit
        if LOCKED:
            self.hit = locked(self._hit, hist_map.lock)

    def _hit(self, values: Sequence[Any], tkey: Any, ts: int, regs: Any) -> None:
        if self.paused:
            return
        try:
            predicate = self.predicate
            if predicate is not None:
                fields = dict(zip(self.field_names, values, strict=False))
                fields["common_pid"], fields["common_comm"] = resolve(tkey)
                if not predicate(fields):
                    return
            key = self._key(values, tkey, ts, regs)
            hist_map = self.map
            entry = hist_map.entries.get(key)
            if entry is None:
                entry = hist_map.insert(key)
                if entry is None:
                    return
                if self.execname:
                    hist_map.comms.setdefault(key, resolve(tkey)[1])
            entry[0] += 1
            for i, get in enumerate(self._vals, 1):
                add_value(entry, i, get(values, tkey, ts, regs))
        except Exception:  # noqa: BLE001 - the hot path never raises (docs/architecture.md, rule 7)
            return

    @property
    def compilable(self) -> bool:
        """Whether the rewritten code may count this trigger's hits itself
        (`compiled_hit`): active, no filter, keys and values all fields of the event."""
        return (not self.paused and self.predicate is None and not self.execname
                and all(f.source == SRC_FIELD for f in (*self.spec.keys, *self.spec.vals)))

    def describe(self) -> str:
        return self.spec.describe() + (" [paused]" if self.paused else " [active]")


# ------------------------------------------------------------------------------ printing


def _sort_value(value: Any) -> tuple[int, Any]:
    tp = type(value)
    if tp is int or tp is float or tp is bool:
        return (0, value)
    if isinstance(value, str):
        return (1, str.__str__(value))
    if tp is tuple:
        return (2, tuple(map(str, value)))
    return (3, format_value(value))


def _key_text(field: HistField, value: Any, comm: str | None) -> tuple[str, bool]:
    """One key field as the kernel's hist_trigger_print_key prints it; True if it took
    several lines (a stacktrace)."""
    name = field.name
    mod = field.modifier
    if field.source == SRC_STACK:
        frames = value if type(value) is tuple else (format_value(value),)
        return "stacktrace:\n" + "".join(f"{' ' * 9}{f}\n" for f in frames), True
    tp = type(value)
    if tp is int:
        if mod == "execname":
            return f"{name}: {comm or '<...>':<16}[{value:10d}]", False
        if mod == "hex":
            return f"{name}: {value:x}", False
        if mod == "log2":
            return f"{name}: ~ 2^{value:<2d}", False
        if mod == "buckets":
            return f"{name}: ~ {value}-{value + field.buckets - 1}", False
        return f"{name}: {value:10d}", False
    if isinstance(value, str) and type(value).__name__ != "Fault":
        return f"{name}: {str.__str__(value):<50}", False
    return f"{name}: {format_value(value):>10}", False


def _entry_line(spec: HistSpec, key: Any, entry: list[Any], comm: str | None) -> str:
    values = key if len(spec.keys) > 1 else (key,)
    parts: list[str] = []
    multiline = False
    for field, value in zip(spec.keys, values, strict=False):
        text, lines = _key_text(field, value, comm)
        parts.append(text)
        multiline = multiline or lines
    line = "{ " + ", ".join(parts) + ("}" if multiline else " }")
    line += f" hitcount: {entry[0]:10d}"
    for i, field in enumerate(spec.vals, 1):
        total = entry[i]
        if field.modifier == "hex" and type(total) is int:
            line += f"  {field.name}: {total:10x}"
        elif type(total) is int:
            line += f"  {field.name}: {total:10d}"
        else:
            line += f"  {field.name}: {format_value(total):>10}"
    return line + "\n"


def _sorted(spec: HistSpec, items: list[tuple[Any, list[Any]]]) -> list[tuple[Any, list[Any]]]:
    """Sorted as `sort=` says: by the first sort key, ties by the second (stable passes,
    the last key first)."""
    for field, descending in reversed(spec.sort):
        if field is None:
            index = 0
            items.sort(key=lambda it: _sort_value(it[1][0]), reverse=descending)
        elif field in spec.vals:
            index = spec.vals.index(field) + 1
            items.sort(key=lambda it, i=index: _sort_value(it[1][i]),  # type: ignore[misc]
                       reverse=descending)
        else:
            k = spec.keys.index(field)
            many = len(spec.keys) > 1
            items.sort(key=lambda it, k=k: _sort_value(it[0][k] if many else it[0]),  # type: ignore[misc]
                       reverse=descending)
    return items


def format_one(trigger: HistTrigger) -> str:
    """One trigger's part of the hist file (the kernel's hist_trigger_show)."""
    spec = trigger.spec
    items, hits, drops = trigger.map.snapshot()
    comms = trigger.map.comms
    out = [f"# event histogram\n#\n# trigger info: {trigger.describe()}\n#\n\n"]
    for key, entry in _sorted(spec, items):
        out.append(_entry_line(spec, key, entry, comms.get(key)))
    out.append(f"\nTotals:\n    Hits: {hits}\n    Entries: {len(items)}\n"
               f"    Dropped: {drops}\n")
    return "".join(out)


def format_hist(triggers: Sequence[HistTrigger]) -> str:
    """The `events/GRP/EVENT/hist` file: every hist trigger of the event."""
    return "\n\n".join(format_one(t) for t in triggers)


def format_trigger_file(triggers: Sequence[HistTrigger]) -> str:
    """The `events/GRP/EVENT/trigger` file: one line per trigger, or the list of
    commands when there is none."""
    if not triggers:
        return "# Available triggers:\n# hist\n"
    return "".join(t.describe() + "\n" for t in triggers)


# ------------------------------------------------------------------ the trigger file


class TriggerError(ParseError):
    """A trigger command that cannot apply: the kernel's code and column, and the errno
    the write returns (EINVAL, EEXIST, ENOENT)."""

    def __init__(self, code: str, pos: int, text: str, err: int = errno.EINVAL) -> None:
        super().__init__(code, pos, text)
        self.errno = err


class NamedTables:
    """The named tables of one tracefs (the kernel's named_triggers): name -> (the table,
    the shape every trigger of that name has, the triggers using it)."""

    def __init__(self) -> None:
        self.tables: dict[str, tuple[HistMap, tuple[Any, ...], list[HistTrigger]]] = {}

    def table(self, spec: HistSpec) -> HistMap:
        """The table for a new trigger: a named one (shared), or its own."""
        if spec.name is None:
            return HistMap(spec.size, len(spec.vals))
        found = self.tables.get(spec.name)
        if found is None:
            hist_map = HistMap(spec.size, len(spec.vals))
            self.tables[spec.name] = (hist_map, spec.shape(), [])
            return hist_map
        hist_map, shape, _ = found
        if shape != spec.shape():
            raise TriggerError("HIST_NAMED_MISMATCH", spec.text.find("name=") + 5, spec.text)
        return hist_map

    def attach(self, trigger: HistTrigger) -> None:
        name = trigger.spec.name
        if name is not None and name in self.tables:
            self.tables[name][2].append(trigger)

    def detach(self, trigger: HistTrigger) -> None:
        name = trigger.spec.name
        found = self.tables.get(name) if name is not None else None
        if found is not None:
            users = found[2]
            if trigger in users:
                users.remove(trigger)
            if not users:
                del self.tables[name]  # type: ignore[arg-type]

    def users(self, trigger: HistTrigger) -> list[HistTrigger]:
        """The triggers that share `trigger`'s table (itself only when unnamed)."""
        name = trigger.spec.name
        found = self.tables.get(name) if name is not None else None
        return list(found[2]) if found is not None else [trigger]


def write_trigger(
    triggers: list[HistTrigger],
    text: str,
    fields: Mapping[str, str | None],
    named: NamedTables,
    compile_filter: Callable[[str, Mapping[str, str | None]], Any],
) -> None:
    """Apply one command written to an event's trigger file to the event's `triggers`
    (the kernel's event_hist_trigger_parse with hist_register_trigger,
    hist_unregister_trigger and existing_hist_update_only). Raises TriggerError."""
    spec = parse_trigger(text, fields)
    predicate = None
    if spec.filter_text is not None:
        try:
            predicate = compile_filter(spec.filter_text, fields)
        except ParseError as exc:
            raise TriggerError(exc.code, spec.filter_pos + exc.pos, text) from None
    same = next((t for t in triggers if t.spec.same(spec)), None)
    if spec.remove:
        if same is None:
            raise TriggerError("HIST_NOT_FOUND", 0, text, errno.ENOENT)
        triggers.remove(same)
        named.detach(same)
        return
    if spec.pause or spec.cont or spec.clear:
        if same is not None:
            for user in named.users(same):
                if spec.pause:
                    user.paused = True
                elif spec.cont:
                    user.paused = False
            if spec.clear:
                same.map.clear()
            return
        if spec.cont or spec.clear:
            raise TriggerError("HIST_TRIGGER_ENOENT_CLEAR", 0, text, errno.ENOENT)
    elif same is not None:
        raise TriggerError("HIST_TRIGGER_EEXIST", 0, text, errno.EEXIST)
    trigger = HistTrigger(spec, named.table(spec), predicate, list(fields))
    named.attach(trigger)
    triggers.append(trigger)


# ------------------------------------------------------------------ the compiled hit


class HistRecorder:
    """The compiled hit of a hist-only event (events.py `compile_call`): the rewritten
    code calls `call(v1, v2, ...)` with the event's argument values, as it calls a
    trace/recorder.py Recorder, and it counts the hit into the trigger's table with no
    frame, Regs or record. Like a Recorder, it returns True (the careful path must run
    instead) when `fast` is off (the event was enabled, or got another trigger, a filter,
    a pause), or a probe handler runs in some thread (core/guard.py's `busy` and `held`),
    and False when it counted. A value that is not an exact int goes through its
    fetcharg's converter first, so that no object of the program is kept as a key.

    One key with no modifier but `.hex` and no values (the common case, `hist:keys=a`) is
    counted by `_histcount.HistCounter`, the C twin, when the trace core is C (backend.py);
    the rest, and that case with the Python core, by closures made here."""

    __slots__ = ("call", "_state", "_counter", "trigger")

    def __init__(self, trigger: HistTrigger, converters: Sequence[Callable[[Any], Any]],
                 busy: dict[int, Any], held: list[Any]) -> None:
        self.trigger = trigger
        #: [fast, nhit]
        state: list[Any] = [False, 0]
        self._state = state
        spec = trigger.spec
        hist_map = trigger.map
        get = hist_map.entries.get
        insert = hist_map.insert
        nargs = len(converters)
        simple = (len(spec.keys) == 1 and not spec.vals
                  and spec.keys[0].modifier in (None, "hex"))
        # A latency histogram's key (`d.log2`): the C twin counts it too.
        log2 = len(spec.keys) == 1 and not spec.vals and spec.keys[0].modifier == "log2"
        index = spec.keys[0].index
        self.call: Callable[..., bool]
        self._counter: Any = None
        counter_type = _counter_type() if simple or log2 else None
        if counter_type is not None:
            # The C twin (_histcount.c): one C call from the rewritten code.
            self._counter = counter_type(busy, held, hist_map.entries, insert,
                                         converters[index], nargs, index, log2)
            hist_map.counters.add(self._counter)
            self.call = self._counter
        elif simple and nargs == 1 and index == 0:
            (convert,) = converters

            def call_one(a: Any) -> bool:
                if not state[0] or busy or held[0] is not None:
                    return True
                if type(a) is not int:
                    a = convert(a)
                entry = get(a)
                if entry is None:
                    entry = insert(a)
                    if entry is None:
                        state[1] += 1
                        return False
                entry[0] += 1
                state[1] += 1
                return False

            self.call = call_one
        elif simple and nargs == 2:
            convert = converters[index]
            first = index == 0

            def call_two(a: Any, b: Any) -> bool:
                if not state[0] or busy or held[0] is not None:
                    return True
                v = a if first else b
                if type(v) is not int:
                    v = convert(v)
                entry = get(v)
                if entry is None:
                    entry = insert(v)
                    if entry is None:
                        state[1] += 1
                        return False
                entry[0] += 1
                state[1] += 1
                return False

            self.call = call_two
        else:
            keys = tuple((k.index, k.transform()) for k in spec.keys)
            vals = tuple(v.index for v in spec.vals)
            single = len(keys) == 1
            converts = tuple(converters)

            def call_many(*args: Any) -> bool:
                if not state[0] or busy or held[0] is not None or len(args) != nargs:
                    return True
                try:
                    values = [a if type(a) is int else c(a)
                              for a, c in zip(args, converts, strict=True)]
                    parts = [values[i] if t is None else t(values[i]) for i, t in keys]
                    key = parts[0] if single else tuple(parts)
                    entry = get(key)
                    if entry is None:
                        entry = insert(key)
                    if entry is not None:
                        entry[0] += 1
                        for n, i in enumerate(vals, 1):
                            add_value(entry, n, values[i])
                except Exception:  # noqa: BLE001 - the hot path never raises
                    return True
                state[1] += 1
                return False

            self.call = call_many
        if LOCKED and self._counter is None:
            self.call = locked(self.call, hist_map.lock)

    @property
    def fast(self) -> bool:
        if self._counter is not None:
            return bool(self._counter.fast)
        return bool(self._state[0])

    @fast.setter
    def fast(self, value: bool) -> None:
        if self._counter is not None:
            self._counter.fast = bool(value)
        self._state[0] = bool(value)

    @property
    def nhit(self) -> int:
        """Hits counted here (the event adds them to its hits)."""
        if self._counter is not None:
            return int(self._counter.nhit)
        return int(self._state[1])


def _counter_type() -> Any:
    """`_histcount.HistCounter` when the trace core is C (backend.py's choice: not forced to
    Python, not a free-threaded build) and the extension was built; else None."""
    from pykprobes.trace import backend

    if backend.NAME != "c":
        return None
    try:
        from pykprobes.trace import _histcount  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _histcount.HistCounter
