"""The early buffer: where early events are recorded until the trace buffer exists.

Preallocated at boot with a fixed number of entries (`PYKPROBES_EARLY_BUFFER`). A write
never blocks beyond the short hold of one lock and never raises; when the buffer is full the
*new* event is dropped and counted in `lost` (start-up tracing keeps the earliest events,
and every event is either kept or counted).

At conversion, `seal(target)` moves the events into the trace buffer in order, adds the lost
count there at its place, and from then on forwards every write to it: a thread that hits an
early probe during conversion writes either before the seal (its event is moved) or after it
(forwarded), never in between, so no event is lost and the order holds.

It has the one method of `TraceBuffer` that `trace.events.Event` writes with:
`append(ts, key, event, values, caller, size)` (the thread as a key, resolved when read:
trace/cmdlines.py), and `write(record)` for a whole record.
"""

from __future__ import annotations

from _thread import allocate_lock

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: this runs at start-up
if TYPE_CHECKING:
    from typing import Any

    from pykprobes.trace.buffer import Record, TraceBuffer

    #: What the early buffer keeps: the arguments of TraceBuffer.append.
    Entry = tuple[int, Any, Any, tuple[Any, ...], str | None, int]


class EarlyBuffer:
    __slots__ = ("_count", "_forward", "_lock", "_records", "capacity", "lost")

    def __init__(self, capacity: int) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacity must be a positive int, not {capacity!r}")
        self.capacity = capacity
        self._records: list[Entry | None] = [None] * capacity
        self._count = 0
        #: Events dropped because the buffer was full.
        self.lost = 0
        self._forward: TraceBuffer | None = None
        self._lock = allocate_lock()

    def append(
        self, ts: int, key: Any, event: Any, values: tuple[Any, ...], caller: str | None,
        size: int,
    ) -> bool:
        """Keep an event; False if it was dropped (full: counted in `lost`)."""
        lock = self._lock
        lock.acquire()
        try:
            forward = self._forward
            if forward is None:
                n = self._count
                if n < self.capacity:
                    self._records[n] = (ts, key, event, values, caller, size)
                    self._count = n + 1
                    return True
                self.lost += 1
                return False
        finally:
            lock.release()
        kept: bool = forward.append(ts, key, event, values, caller, size)
        return kept

    def write(self, record: Record) -> bool:
        """Keep a whole record (its tid and comm as given)."""
        ts, tid, comm, event, values, caller = record
        from pykprobes.trace.buffer import values_size

        return self.append(ts, (tid, comm), event, values, caller, values_size(values, caller))

    def snapshot(self, consume: bool = False) -> tuple[list[Record], int]:
        """(the events kept, in order, as records; the number lost); with `consume`, they
        are taken out (the next snapshot has only what came after)."""
        from pykprobes.trace.cmdlines import resolve

        with self._lock:
            kept = [e for e in self._records[: self._count] if e is not None]
            lost = self.lost
            if consume:
                self._clear_locked()
        out: list[Record] = []
        for ts, key, event, values, caller, _size in kept:
            tid, comm = resolve(key)
            out.append((ts, tid, comm, event, values, caller))
        return out, lost

    def _clear_locked(self) -> None:
        for i in range(self._count):
            self._records[i] = None
        self._count = 0
        self.lost = 0

    def after_fork_in_child(self) -> None:
        """A child made by os.fork() starts empty, with a lock of its own: the events kept
        before the fork are the parent's to write (written once), and another thread of the
        parent may have held the lock."""
        self._lock = allocate_lock()
        self._clear_locked()

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
            for entry in records:
                if entry is not None:
                    target.append(*entry)
            lost = self.lost
            if lost:
                add_lost(target, lost)
            self._forward = target
            self._records = []
            self._count = 0
            return len(records), lost


def add_lost(buffer: TraceBuffer, n: int) -> None:
    """Count `n` events lost at the tail of `buffer` (where trace_pipe will report them)."""
    if n > 0:
        buffer.add_lost(n)
