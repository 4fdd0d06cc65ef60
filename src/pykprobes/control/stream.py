"""What a streaming client is sent: trace_pipe records, as text lines or JSON lines.

The server is the one reader of the trace buffer while clients stream (ftrace's trace_pipe
readers would split the records between them): it takes each batch once and renders it for
each client, every record for a `pipe`, a `trace` session's own events for the session. The
places where events were lost go to every client (a loss is the buffer's, not an event's).

JSON lines are `trace.format.format_json`'s, which writes them itself rather than through the
`json` module: the control thread runs no probe-able Python code while it streams
(`json.dumps` is a Python function a user may well trace, and each record sent would then
record another).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from pykprobes.trace import format as fmt
from pykprobes.trace.buffer import ReadBatch, Record

json_line: Callable[[Record], str] = fmt.format_json


def lost_line(count: int, as_json: bool) -> str:
    return f'{{"lost": {count}}}\n' if as_json else fmt.format_lost(count) + "\n"


def render(batch: ReadBatch, events: Collection[Any] | None, as_json: bool) -> str:
    """The text for one client: the batch's records of `events` (None: all), with the
    lost-event lines at their places."""
    line = json_line if as_json else fmt.format_line
    out: list[str] = []
    lost = dict(batch.lost_at)
    for i, record in enumerate(batch):
        n = lost.pop(i, 0)
        if n:
            out.append(lost_line(n, as_json))
        if events is None or record[3].event in events:
            out.append(line(record) + "\n")
    out += [lost_line(n, as_json) for n in lost.values()]
    return "".join(out)


def count(batch: ReadBatch, events: Collection[Any] | None) -> int:
    """How many of the batch's records `render` would send (for a client whose records are
    dropped: they are counted, not formatted)."""
    if events is None:
        return len(batch)
    return sum(1 for record in batch if record[3].event in events)
