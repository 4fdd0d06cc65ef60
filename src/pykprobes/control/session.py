"""A `trace` session: the events one client defined, filtered and enabled together, and
removes together when its stream ends, whatever ends it (`stop`, the client closing or dying,
`reset`, the server stopping). `pykprobes -p PID trace` is one.

The session is all or nothing: a definition or filter that fails removes the events made
before it, and the error (the kernel's message, the definition and a caret) is the reply.
"""

from __future__ import annotations

import errno
from typing import Any

from pykprobes.errors import KprobeError
from pykprobes.trace import format as fmt
from pykprobes.trace.tracefs import TraceFS, TraceWriteError


class TraceSession:
    def __init__(self, fs: TraceFS) -> None:
        self.fs = fs
        #: The session's events, in definition order (trace.events.Event).
        self.events: list[Any] = []

    def start(self, body: str) -> None:
        """Apply the request's lines (`event DEF`, `filter GRP/EVENT EXPR`), then enable
        the events. Raises TraceWriteError after removing what it made."""
        try:
            for line in body.splitlines():
                kind, _, rest = line.strip().partition(" ")
                rest = rest.strip()
                if not kind:
                    continue
                if kind == "event":
                    event = self.fs.define(rest)
                    if event is None:
                        raise TraceWriteError(errno.EINVAL, "a trace defines events: "
                                                            f"{rest!r} removes one")
                    if event not in self.events:  # a point appended to one of ours
                        self.events.append(event)
                elif kind == "filter":
                    name, _, expr = rest.partition(" ")
                    self.fs.set_filter(self._own(name), expr)
                else:
                    raise TraceWriteError(errno.EINVAL, f"a trace line is `event DEF` or "
                                                        f"`filter EVENT EXPR`, not {line!r}")
            if not self.events:
                raise TraceWriteError(errno.EINVAL, "a trace needs at least one event")
            for event in self.events:
                event.enable()
        except BaseException:
            self.close()
            raise

    def _own(self, name: str) -> Any:
        group, _, event_name = name.rpartition("/")
        for event in self.events:
            if event.name == event_name and (not group or event.group == group):
                return event
        raise TraceWriteError(errno.ENOENT, f"no event {name!r} in this trace")

    def names(self) -> str:
        return " ".join(f"{e.group}/{e.name}" for e in self.events)

    def profile(self) -> str:
        """The kprobe_profile lines of the session's events."""
        return fmt.format_profile([(e.name, e.hits, e.nmissed) for e in self.events])

    def close(self) -> None:
        """Disable and remove the session's events (never raises: an event someone else
        removed meanwhile is gone already)."""
        events, self.events = self.events, []
        for event in events:
            name, group = event.name, event.group
            try:
                event.disable()
                if self.fs.find(name, group) is event:
                    self.fs.remove(name, group)
            except KprobeError:
                pass
