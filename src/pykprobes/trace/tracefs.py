"""The virtual tracefs: the kernel's tracing files, as text, for one process.

`read(path)` and `write(path, text)` serve the same names and formats as
/sys/kernel/tracing, so that the CLI and the control socket can pass them through unchanged;
the methods beside them are the Pythonic API over the same objects.

    kprobe_events                  definitions (append one; `-:EVENT` removes; truncate clears)
    events/GRP/EVENT/enable        0 or 1
    events/GRP/EVENT/filter        an ftrace filter expression, or "none"
    events/GRP/EVENT/format        the event's fields
    events/GRP/EVENT/trigger       hist triggers (trace/hist.py): `hist:keys=...`, `!hist:...`
    events/GRP/EVENT/hist          the event's histograms, in the kernel's format
    trace                          the buffer (a snapshot); writing empties it
    trace_pipe                     the buffer, consumed as read (blocking)
    trace.json                     the buffer (a snapshot) as Perfetto's JSON (trace/perfetto.py)
    kprobe_profile                 EVENT  HITS  MISSES
    error_log                      the last errors, with a caret; writing empties it
    buffer_size_kb                 the buffer's size
    tracing_on                     0 or 1
    options/overwrite              1: a full buffer overwrites the oldest; 0: drops the newest

A write that fails raises `TraceWriteError` (the kernel's -EINVAL / -EBUSY / -ENOENT) and, for
a bad definition or filter, appends an entry to `error_log` with a caret under the column.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from typing import Final

from pykprobes import grammar
from pykprobes.errors import ERRORS, KprobeError, ParseError
from pykprobes.trace import format as fmt
from pykprobes.trace import hist
from pykprobes.trace.buffer import TraceBuffer
from pykprobes.trace.events import Event

#: The kernel keeps the last TRACING_LOG_ERRS_MAX (16) errors.
ERROR_LOG_MAX: Final = 16


class TraceWriteError(KprobeError):
    """A write to a tracefs file failed; `.errno` is what the kernel's write returns."""


class ErrorLogEntry:
    __slots__ = ("command", "location", "message", "pos", "timestamp")

    def __init__(self, message: str, command: str, pos: int,
                 location: str | None = None) -> None:
        self.timestamp = time.monotonic()
        self.message = message
        self.command = command
        self.pos = pos
        #: Where the error arose, as the kernel names it (`hist:GRP:EVENT`); None: ours.
        self.location = location


class TraceFS:
    def __init__(self, buffer_size_kb: int = 1408) -> None:
        self.buffer = TraceBuffer(buffer_size_kb)
        self.events: dict[tuple[str, str], Event] = {}
        self.error_log: deque[ErrorLogEntry] = deque(maxlen=ERROR_LOG_MAX)
        self._lock = threading.RLock()
        self._next_id = 1000
        #: The named hist tables (`hist:name=...`), shared across events.
        self.named = hist.NamedTables()

    # ------------------------------------------------------------------ API

    def define(self, text: str) -> Event | None:
        """Apply one line appended to kprobe_events: a definition (returns the new event,
        disabled) or a `-:EVENT` removal (returns None). Raises TraceWriteError after
        logging the error."""
        text = text.strip()
        try:
            definition = grammar.parse(text)
        except ParseError as exc:
            raise self._fail(exc.code, exc.pos, text, errno.EINVAL) from exc
        if isinstance(definition, grammar.RemoveDef):
            self.remove(definition.event, definition.group)
            return None
        key = (definition.group, definition.event)
        with self._lock:
            if key in self.events:
                raise self._fail("EVENT_EXIST", _event_pos(text), text, errno.EEXIST)
            self._next_id += 1
            event = Event(definition, self.buffer, self._next_id)
            try:
                event.prepare()
            except ParseError as exc:
                raise self._fail(exc.code, exc.pos, text, errno.EINVAL) from exc
            except KprobeError as exc:
                raise self._fail("BAD_PROBE_ADDR", _target_pos(text), text, exc.errno,
                                 detail=str(exc)) from exc
            self.events[key] = event
        return event

    def remove(self, name: str, group: str | None = None) -> None:
        event = self.find(name, group)
        if event is None:
            raise TraceWriteError(errno.ENOENT, f"no event {name!r}")
        if event.enabled:
            raise TraceWriteError(errno.EBUSY, f"event {event.group}/{event.name} is enabled")
        with self._lock:
            del self.events[(event.group, event.name)]
            event.clear_triggers(self.named)
        event.release()

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
            event.release()

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
            raise self._fail(exc.code, exc.pos, text, errno.EINVAL) from exc

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

    def _fail(self, code: str, pos: int, text: str, err: int,
              detail: str | None = None, location: str | None = None) -> TraceWriteError:
        message = ERRORS.get(code, code)
        self.error_log.append(ErrorLogEntry(message, text, pos, location))
        return TraceWriteError(err, f"{message}{f' ({detail})' if detail else ''}\n"
                                    f"{text}\n{' ' * pos}^")

    # ------------------------------------------------------------------ files

    def read(self, path: str, timeout: float | None = None) -> str:
        path = path.strip("/")
        if path == "kprobe_events":
            return "".join(f"{_definition_line(e)}\n" for e in self._events())
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
            return fmt.format_profile([(e.name, e.hits, e.nmissed) for e in self._events()])
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
        raise TraceWriteError(errno.ENOENT, f"no such file: {path}")

    def read_pipe(self, timeout: float | None = None) -> str:
        """Consume what the buffer holds (waiting up to `timeout` for something)."""
        batch = self.buffer.read(block=timeout is None or timeout > 0, timeout=timeout)
        return fmt.format_batch(batch)

    def write(self, path: str, text: str, append: bool = False) -> None:
        path = path.strip("/")
        if path == "kprobe_events":
            if not append:
                self.clear()
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    self.define(line)
            return
        if path == "trace":
            self.buffer.clear()
            return
        if path == "error_log":
            self.error_log.clear()
            return
        if path == "buffer_size_kb":
            try:
                size = int(text.strip())
            except ValueError:
                raise TraceWriteError(errno.EINVAL, f"not a size: {text!r}") from None
            if size <= 0:
                raise TraceWriteError(errno.EINVAL, f"not a size: {text!r}")
            self.buffer.resize(size)
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
        raise TraceWriteError(errno.ENOENT, f"no such writable file: {path}")

    def _events(self) -> list[Event]:
        with self._lock:
            return list(self.events.values())


def _bool(text: str) -> bool:
    value = text.strip()
    if value in ("1", "y", "Y"):
        return True
    if value in ("0", "n", "N"):
        return False
    raise TraceWriteError(errno.EINVAL, f"expected 0 or 1, not {text!r}")


def _definition_line(event: Event) -> str:
    d = event.definition
    head = "r" if event.is_return else "p"
    if event.is_return and d.maxactive:
        head += str(d.maxactive)
    args = "".join(f" {a.name}={a.body}{':' + a.type if a.type else ''}" for a in d.args)
    return f"{head}:{event.group}/{event.name} {d.target}{args}"


def _event_pos(text: str) -> int:
    colon = text.find(":")
    return colon + 1 if 0 <= colon < text.find(" ") else 0


def _target_pos(text: str) -> int:
    space = text.find(" ")
    return space + 1 if space >= 0 else 0


_default: TraceFS | None = None
_default_lock = threading.Lock()


def tracefs() -> TraceFS:
    """The process's tracefs (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = TraceFS()
        return _default
