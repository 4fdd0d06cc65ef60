"""The early buffer: where early events are recorded until the trace buffer exists.

Preallocated at boot with a fixed number of entries (`PYKPROBES_EARLY_BUFFER`). A write
never blocks beyond the short hold of one lock and never raises; when the buffer is full the
*new* event is dropped and counted in `lost` (start-up tracing keeps the earliest events,
and every event is either kept or counted).

At conversion, `seal(target)` moves the events into the trace buffer in order, adds the lost
count there at its place, and from then on forwards every write to it: a thread that hits an
early probe during conversion writes either before the seal (its event is moved) or after it
(forwarded), never in between, so no event is lost and the order holds.

It has the one method of `TraceBuffer` that `trace.events.Event` writes with: `write(record)`.
"""

from __future__ import annotations

from _thread import allocate_lock

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: this runs at start-up
if TYPE_CHECKING:
    from pykprobes.trace.buffer import Record, TraceBuffer


class EarlyBuffer:
    __slots__ = ("_count", "_forward", "_lock", "_records", "capacity", "lost")

    def __init__(self, capacity: int) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacity must be a positive int, not {capacity!r}")
        self.capacity = capacity
        self._records: list[Record | None] = [None] * capacity
        self._count = 0
        #: Events dropped because the buffer was full.
        self.lost = 0
        self._forward: TraceBuffer | None = None
        self._lock = allocate_lock()

    def write(self, record: Record) -> bool:
        """Keep `record`; False if it was dropped (full: counted in `lost`)."""
        lock = self._lock
        lock.acquire()
        try:
            forward = self._forward
            if forward is None:
                n = self._count
                if n < self.capacity:
                    self._records[n] = record
                    self._count = n + 1
                    return True
                self.lost += 1
                return False
        finally:
            lock.release()
        return forward.write(record)

    def snapshot(self) -> tuple[list[Record], int]:
        """(the events kept, in order; the number lost), consuming nothing."""
        with self._lock:
            return [r for r in self._records[: self._count] if r is not None], self.lost

    @property
    def entries(self) -> int:
        return self._count

    @property
    def sealed(self) -> bool:
        return self._forward is not None

    def seal(self, target: TraceBuffer) -> tuple[int, int]:
        """Move every event into `target` in order, then the lost count, and forward every
        later write there. Returns (events moved, events lost). Writers wait while it runs."""
        with self._lock:
            if self._forward is not None:
                return 0, 0
            records = self._records[: self._count]
            for record in records:
                if record is not None:
                    target.write(record)
            lost = self.lost
            if lost:
                add_lost(target, lost)
            self._forward = target
            self._records = []
            self._count = 0
            return len(records), lost


def add_lost(buffer: TraceBuffer, n: int) -> None:
    """Count `n` events lost at the tail of `buffer` (where trace_pipe will report them).

    TraceBuffer has no public way to add losses that happened elsewhere; this uses its drop
    path once and adds the rest to the same gap (see trace/buffer.py `_drop_locked`)."""
    if n <= 0:
        return
    note = getattr(buffer, "add_lost", None)
    if note is not None:
        note(n)
        return
    with buffer._lock:
        buffer._drop_locked()
        if n > 1:
            buffer._dropped += n - 1
            buffer._gaps[-1][1] += n - 1
