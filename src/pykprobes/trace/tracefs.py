"""The virtual tracefs: the kernel's tracing files, as text, for one process.

`read(path)` and `write(path, text)` serve the same names and formats as
/sys/kernel/tracing, so that the CLI and the control socket can pass them through unchanged;
the methods beside them are the Pythonic API over the same objects.

    kprobe_events                  definitions, one line per probe point (append one: a new
                                   event, or a point appended to the event of that name;
                                   `-:[GRP/]EVENT [TARGET [ARGS]]` and `-:GRP/` remove;
                                   truncate clears)
    dynamic_events                 the same events (all are kprobe events), and the same
                                   writes, plus `!p:[GRP/]EVENT ...` (remove what it names)
    events/GRP/EVENT/enable        0 or 1
    events/GRP/enable, events/enable   every event of the group, or every event (X: mixed)
    events/GRP/EVENT/filter        an ftrace filter expression, or "none"
    events/GRP/EVENT/format        the event's fields
    events/GRP/EVENT/trigger       hist triggers (trace/hist.py): `hist:keys=...`, `!hist:...`
    events/GRP/EVENT/hist          the event's histograms, in the kernel's format
    trace                          the buffer (a snapshot); writing empties it
    trace_pipe                     the buffer, consumed as read (blocking)
    trace.json                     the buffer (a snapshot) as Perfetto's JSON (trace/perfetto.py)
    kprobe_profile                 EVENT  HITS  MISSES, one line per probe point
    error_log                      the last errors, with a caret; writing empties it
    buffer_size_kb                 the buffer's size
    tracing_on                     0 or 1
    options/overwrite              1: a full buffer overwrites the oldest; 0: drops the newest

A write that fails raises `TraceWriteError` (the kernel's -EINVAL / -EBUSY / -ENOENT /
-EEXIST) and, for a bad definition or filter, appends an entry to `error_log` with a caret
under the column (a definition's entry is the kernel's `trace_kprobe: error: MESSAGE`).

A definition whose GRP/EVENT exists appends a probe point to that event (kernel
append_trace_kprobe()): another kind of probe is DIFF_PROBE_TYPE (caret at column 0), other
argument names or types DIFF_ARG_TYPE (caret at the first that differs, or past the end when
there are fewer), the very same target and arguments SAME_PROBE (column 0), all -EEXIST.
"""

from __future__ import annotations

import errno
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from pykprobes import grammar
from pykprobes.errors import ERRORS, KprobeError, ParseError
from pykprobes.trace import format as fmt
from pykprobes.trace import hist
from pykprobes.trace.buffer import TraceBuffer
from pykprobes.trace.events import DefinitionError, Event, ProbePoint, register_trace_kprobe

#: The kernel keeps the last TRACING_LOG_ERRS_MAX (16) errors.
ERROR_LOG_MAX: Final = 16
#: What error_log names as the place of a definition's error (the kernel's subsystem).
DEFINITION_ERROR_LOCATION: Final = "trace_kprobe"


class TraceWriteError(KprobeError):
    """A write to a tracefs file failed; `.errno` is what the kernel's write returns. For a
    bad definition or filter, `.code` is its error code (errors.ERRORS) and `.pos` the column
    error_log puts the caret under; None otherwise."""

    code: str | None = None
    pos: int | None = None


class ErrorLogEntry:
    __slots__ = ("command", "location", "message", "pos", "timestamp")

    def __init__(self, message: str, command: str, pos: int,
                 location: str | None = None) -> None:
        self.timestamp = time.monotonic()
        self.message = message
        self.command = command
        self.pos = pos
        #: Where the error arose, as the kernel names it (`trace_kprobe`, `hist:GRP:EVENT`);
        #: None: ours (`pykprobes`).
        self.location = location


class TraceFS:
    def __init__(self, buffer_size_kb: int = 1408) -> None:
        self.buffer = TraceBuffer(buffer_size_kb)
        self.events: dict[tuple[str, str], Event] = {}
        self.error_log: deque[ErrorLogEntry] = deque(maxlen=ERROR_LOG_MAX)
        self._lock = threading.RLock()
        #: The events' numbers (their format's ID).
        self._new_id = itertools.count(1001).__next__
        #: The named hist tables (`hist:name=...`), shared across events.
        self.named = hist.NamedTables()

    # ------------------------------------------------------------------ API

    def define(self, text: str) -> Event | None:
        """Apply one line appended to kprobe_events: a definition (returns its event: new
        and disabled, or the existing one with the point appended) or a removal (returns
        None). Raises TraceWriteError after logging the error."""
        return self._apply(text, grammar.parse)

    def _apply(self, text: str, parse: Callable[[str], Any]) -> Event | None:
        text = text.strip()
        try:
            definition = parse(text)
        except ParseError as exc:
            raise self._fail(exc.code, exc.pos, text, errno.EINVAL) from exc
        if isinstance(definition, grammar.RemoveDef):
            self._remove_matching(definition)
            return None
        with self._lock:
            try:
                return register_trace_kprobe(self.events, definition, self.buffer,
                                             self._new_id)
            except DefinitionError as exc:
                target = exc.target_error
                raise self._fail(exc.code, exc.pos, text, exc.errno,
                                 detail=None if target is None else str(target)) from exc

    def remove(self, name: str | None, group: str | None = None) -> None:
        """`-:[GRP/]EVENT` (every point of the event), or `-:GRP/` (name None: every event
        of the group). ENOENT if nothing matches; EBUSY for an enabled event (the ones
        before it are removed, as the kernel's loop does)."""
        self._remove_matching(grammar.RemoveDef(group, name, [], f"-:{group or ''}/{name}"))

    def _remove_matching(self, d: grammar.RemoveDef) -> None:
        """The kernel's dyn_event_release(): every event that `d` names, or, with words
        after the event, only its probe points whose target and then fetchargs they match
        (trace_kprobe_match_command_head()); an event left without points is gone."""
        with self._lock:
            matched = [(e, [p for p in e.points if _matches(p, d.args)])
                       for (g, n), e in list(self.events.items())
                       if (d.group is None or g == d.group) and (d.event is None or n == d.event)]
            if not any(points for _, points in matched):
                raise TraceWriteError(errno.ENOENT, f"no event matches {d.text!r}")
            for event, points in matched:
                if not points:
                    continue
                if event.enabled and len(points) == len(event.points):
                    raise TraceWriteError(errno.EBUSY,
                                          f"event {event.group}/{event.name} is enabled")
                for point in points:
                    event.points.remove(point)
                    point.unregister()
                if not event.points:
                    del self.events[(event.group, event.name)]
                    event.clear_triggers(self.named)
                    event.unregister()

    def clear(self) -> None:
        """`echo > kprobe_events`: remove every event (EBUSY if one is enabled)."""
        with self._lock:
            busy = [e for e in self.events.values() if e.enabled]
            if busy:
                raise TraceWriteError(errno.EBUSY, f"event {busy[0].name} is enabled")
            events, self.events = list(self.events.values()), {}
            for event in events:
                event.clear_triggers(self.named)
        for event in events:
            event.unregister()

    def find(self, name: str, group: str | None = None) -> Event | None:
        with self._lock:
            for (g, n), event in self.events.items():
                if n == name and (group is None or g == group):
                    return event
        return None

    def event(self, path_name: str) -> Event:
        """`GRP/EVENT` or `EVENT` -> the event (TraceWriteError ENOENT)."""
        group, _, name = path_name.rpartition("/")
        event = self.find(name, group or None)
        if event is None:
            raise TraceWriteError(errno.ENOENT, f"no event {path_name!r}")
        return event

    def set_filter(self, event: Event, text: str) -> None:
        try:
            event.set_filter(text)
        except ParseError as exc:
            raise self._fail(exc.code, exc.pos, text, errno.EINVAL, location=None) from exc

    def write_trigger(self, event: Event, text: str, append: bool = True) -> None:
        """Write one command to `events/GRP/EVENT/trigger` (see trace/hist.py)."""
        try:
            with self._lock:
                event.write_trigger(text.strip(), self.named, append)
        except hist.TriggerError as exc:
            raise self._fail(exc.code, exc.pos, exc.text, exc.errno,
                             location=f"hist:{event.group}:{event.name}") from exc
        except ParseError as exc:
            raise self._fail(exc.code, exc.pos, exc.text, errno.EINVAL,
                             location=f"hist:{event.group}:{event.name}") from exc

    def _fail(self, code: str, pos: int, text: str, err: int, detail: str | None = None,
              location: str | None = DEFINITION_ERROR_LOCATION) -> TraceWriteError:
        message = ERRORS.get(code, code)
        self.error_log.append(ErrorLogEntry(message, text, pos, location))
        error = TraceWriteError(err, f"{message}{f' ({detail})' if detail else ''}\n"
                                     f"{text}\n{' ' * pos}^")
        error.code, error.pos = code, pos
        return error

    # ------------------------------------------------------------------ files

    def read(self, path: str, timeout: float | None = None) -> str:
        path = path.strip("/")
        if path in ("kprobe_events", "dynamic_events"):
            return "".join(f"{_definition_line(p)}\n" for e in self._events() for p in e.points)
        if path == "trace":
            records = self.buffer.snapshot()
            return fmt.format_header(self.buffer) + "".join(
                fmt.format_line(r) + "\n" for r in records)
        if path == "trace_pipe":
            return self.read_pipe(timeout)
        if path == "trace.json":
            from pykprobes.trace.perfetto import format_trace_json

            return format_trace_json(self.buffer.snapshot())
        if path == "kprobe_profile":
            return fmt.format_profile([(e.name, p.hits, p.nmissed) for e in self._events()
                                       for p in e.points])
        if path == "error_log":
            return fmt.format_error_log(list(self.error_log))
        if path == "buffer_size_kb":
            return f"{self.buffer.size_kb}\n"
        if path == "tracing_on":
            return f"{int(self.buffer.tracing_on)}\n"
        if path == "options/overwrite":
            return f"{int(self.buffer.overwrite)}\n"
        parts = path.split("/")
        if len(parts) == 4 and parts[0] == "events":
            event = self.event(f"{parts[1]}/{parts[2]}")
            if parts[3] == "enable":
                return f"{int(event.enabled)}\n"
            if parts[3] == "filter":
                return f"{event.filter_text}\n"
            if parts[3] == "format":
                return fmt.format_event_format(event)
            if parts[3] == "id":
                return f"{event.id}\n"
            if parts[3] == "trigger":
                return hist.format_trigger_file(event.triggers)
            if parts[3] == "hist":
                return hist.format_hist(event.triggers)
        if parts[-1] == "enable" and len(parts) in (2, 3) and parts[0] == "events":
            # The kernel's system (and top-level) enable file: 0, 1, or X when mixed.
            states = {e.enabled for e in self._group(parts[1] if len(parts) == 3 else None)}
            return "X\n" if len(states) > 1 else f"{int(True in states)}\n"
        raise TraceWriteError(errno.ENOENT, f"no such file: {path}")

    def read_pipe(self, timeout: float | None = None) -> str:
        """Consume what the buffer holds (waiting up to `timeout` for something)."""
        batch = self.buffer.read(block=timeout is None or timeout > 0, timeout=timeout)
        return fmt.format_batch(batch)

    def write(self, path: str, text: str, append: bool = False) -> None:
        path = path.strip("/")
        if path in ("kprobe_events", "dynamic_events"):
            parse = grammar.parse if path == "kprobe_events" else grammar.parse_dynamic_event
            if not append:
                self.clear()
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    self._apply(line, parse)
            return
        if path == "trace":
            self.buffer.clear()
            return
        if path == "error_log":
            self.error_log.clear()
            return
        if path == "buffer_size_kb":
            try:
                self.buffer.resize(int(text.strip()))
            except (ValueError, KprobeError):  # not a number, or not a size (1e30, -5)
                raise TraceWriteError(errno.EINVAL, f"not a size: {text!r}") from None
            return
        if path == "tracing_on":
            self.buffer.tracing_on = _bool(text)
            return
        if path == "options/overwrite":
            self.buffer.overwrite = _bool(text)
            return
        parts = path.split("/")
        if len(parts) == 4 and parts[0] == "events":
            event = self.event(f"{parts[1]}/{parts[2]}")
            if parts[3] == "enable":
                if _bool(text):
                    event.enable()
                else:
                    event.disable()
                return
            if parts[3] == "filter":
                self.set_filter(event, text)
                return
            if parts[3] == "trigger":
                if not append:
                    with self._lock:
                        event.clear_triggers(self.named)
                for line in text.splitlines():
                    line = line.split("#", 1)[0].strip()
                    if line:
                        self.write_trigger(event, line)
                return
        if parts[-1] == "enable" and len(parts) in (2, 3) and parts[0] == "events":
            on = _bool(text)
            for event in self._group(parts[1] if len(parts) == 3 else None):
                if on:
                    event.enable()
                else:
                    event.disable()
            return
        raise TraceWriteError(errno.ENOENT, f"no such writable file: {path}")

    def _events(self) -> list[Event]:
        with self._lock:
            return list(self.events.values())

    def _group(self, group: str | None) -> list[Event]:
        """The events of `group` (None: every event); ENOENT for a group without events."""
        events = [e for e in self._events() if group is None or e.group == group]
        if group is not None and not events:
            raise TraceWriteError(errno.ENOENT, f"no such group: {group}")
        return events


def _bool(text: str) -> bool:
    value = text.strip()
    if value in ("1", "y", "Y"):
        return True
    if value in ("0", "n", "N"):
        return False
    raise TraceWriteError(errno.EINVAL, f"expected 0 or 1, not {text!r}")


def _definition_line(point: ProbePoint) -> str:
    """A point as kprobe_events lists it (kernel trace_kprobe_show()): the event's name, the
    target without `+0`, and each argument as NAME=BODY[:TYPE], `$arg*` expanded."""
    d = point.definition
    head = "r" if point.is_return else "p"
    if point.is_return and d.maxactive:
        head += str(d.maxactive)
    return f"{head}:{point.group}/{point.name} {point.target}{_args_text(point.args)}"


def _args_text(args: list[grammar.FetchArgDef]) -> str:
    return "".join(f" {a.name}={a.body}{':' + a.type if a.type else ''}" for a in args)


def _matches(point: ProbePoint, words: list[str]) -> bool:
    """Whether the words after `-:EVENT` name `point`: none, or its target (as listed) and
    then a prefix of its arguments as listed (kernel trace_probe_match_command_args())."""
    if not words:
        return True
    if words[0] != point.target:
        return False
    listed = _args_text(point.args).split(" ")[1:]
    return len(words) - 1 <= len(listed) and listed[: len(words) - 1] == words[1:]


_default: TraceFS | None = None
_default_lock = threading.Lock()


def tracefs() -> TraceFS:
    """The process's tracefs (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TraceFS()
        return _default
