"""The trace ring buffer: ftrace's ring buffer for probe-event records.

A record is the tuple `(ts_ns, tid, comm, event, values, caller)` of docs/events.md. The buffer
stores records, bounded by `size_kb` (the `buffer_size_kb` file) through a per-record size
estimate, and serves the two ways ftrace reads its buffer:

- `snapshot()` is the `trace` file: a copy of what is in the buffer, nothing consumed.
- `read()` is the `trace_pipe` file: it consumes what it returns, blocks until something is
  written, and tells the reader where events were lost (ftrace's "CPU:0 [LOST n EVENTS]").

Size estimate (`record_size`), in the spirit of what the kernel stores per kprobe event:

    24 bytes fixed     ring-buffer event header (8) + common fields (8) + probe ip (8)
    + 8                a return probe (a record whose `caller` is not None): the kernel's
                       second ip (`__probe_ret_ip`)
    + per value:       str and bytes: 4 + len(value) (the kernel's `__data_loc` word plus the
                       characters, counted in code points for str); anything else (int,
                       float, bool, None, FAULT, ...): 8

The buffer holds references, not copies: the estimate stands for the memory a record keeps
alive (fetchargs cap the strings they record; ints are counted as 8 whatever their size).

When a record does not fit, the buffer either overwrites the oldest records (`overwrite`, the
default, ftrace's `options/overwrite`) or drops the new one. Either way the lost events are
counted: `overrun` (overwritten, and evicted by a shrinking `resize`), `dropped` (refused), and
`lost` (both). A record bigger than the whole buffer is always dropped. Each loss is also
handed, exactly once, to the next consuming `read()`, at its place in the stream
(`ReadBatch.lost_at`), so that every record written is either read once or reported lost.
While `tracing_on` is false, `write()` drops records without counting them (tracing is off:
nothing is lost).

Concurrency: one lock guards the ring (STYLE rule 8: it guards the table, never a callback).
`write()` computes the size estimate before taking it, then holds it for two deque appends
(plus, when full, one eviction per record overwritten: a big record may overwrite several
small ones). It never waits for a reader and never raises. A reader blocked in `read()`
waits on a condition of the same lock; a writer notifies only when a reader is waiting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Final, TypeAlias

__all__ = [
    "DEFAULT_SIZE_KB",
    "ReadBatch",
    "Record",
    "TraceBuffer",
    "record_size",
]

#: A trace record: (ts_ns, tid, comm, event, values, caller) (docs/events.md).
Record: TypeAlias = tuple[int, int, str, Any, tuple[Any, ...], str | None]

#: ftrace's default per-CPU buffer_size_kb on a machine with enough memory.
DEFAULT_SIZE_KB: Final = 1408

#: Fixed part of the estimate: ring-buffer event header + common fields + probe ip.
RECORD_OVERHEAD: Final = 24
#: A return probe stores a second ip (the kernel's __probe_func and __probe_ret_ip).
RETURN_OVERHEAD: Final = 8
#: Any value that is not a str or bytes: one 64-bit slot.
SCALAR_SIZE: Final = 8
#: A str or bytes value: the kernel's __data_loc word, plus its length.
DATA_LOC_SIZE: Final = 4

_VARLEN: Final = frozenset((str, bytes))


def record_size(record: Record) -> int:
    """The size estimate of `record`, in bytes (see the module docstring)."""
    values = record[4]
    size = RECORD_OVERHEAD + SCALAR_SIZE * len(values)
    for v in values:
        if type(v) in _VARLEN:
            size += DATA_LOC_SIZE - SCALAR_SIZE + len(v)
    if record[5] is not None:
        size += RETURN_OVERHEAD
    return size


class ReadBatch(list[Record]):
    """What one consuming `read()` returns: the records, in order, and where events were lost.

    `lost_at` lists `(index, count)` pairs, by increasing index: `count` events were lost
    just before `self[index]` (`index == len(self)`: after the last record of the batch).
    trace_pipe prints "CPU:0 [LOST count EVENTS]" at those places (`format.format_batch`).
    """

    __slots__ = ("lost_at",)

    def __init__(
        self, records: list[Record] | None = None, lost_at: list[tuple[int, int]] | None = None
    ) -> None:
        super().__init__(records or ())
        self.lost_at: list[tuple[int, int]] = lost_at or []

    @property
    def lost(self) -> int:
        """The number of events lost in this batch's stretch of the stream."""
        return sum(count for _, count in self.lost_at)


class TraceBuffer:
    """ftrace's ring buffer for trace records; see the module docstring.

    `size_kb` bounds the sum of the records' size estimates (`record_size`) to
    `size_kb * 1024` bytes. `overwrite` chooses what happens when a record does not fit:
    the oldest records are overwritten (True, the default) or the new one is dropped.
    """

    __slots__ = (
        # The write path's attributes first (STYLE: the fields read together sit together).
        "tracing_on",
        "_lock",
        "_ring",
        "_sizes",
        "_bytes",
        "_limit",
        "_nwaiting",
        "overwrite",
        "_cond",
        "_head_seq",
        "_gaps",
        "_overrun",
        "_dropped",
        "_interrupts",
    )

    def __init__(self, size_kb: int = DEFAULT_SIZE_KB, overwrite: bool = True) -> None:
        _check_size_kb(size_kb)
        #: The `tracing_on` switch: while False, `write()` drops records, uncounted.
        self.tracing_on: bool = True
        #: ftrace's `options/overwrite`: overwrite the oldest (True) or drop the newest.
        self.overwrite: bool = overwrite
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # The records, oldest first, and their size estimates, in step.
        self._ring: deque[Record] = deque()
        self._sizes: deque[int] = deque()
        self._bytes = 0
        self._limit = size_kb * 1024
        # Every record that entered the ring has a sequence number: the oldest in the ring
        # has _head_seq, the next to enter will have _head_seq + len(_ring).
        self._head_seq = 0
        # Losses not yet handed to a reader: [seq, count] pairs by increasing seq, `count`
        # events lost just before the record numbered `seq`. Overwrites add to a gap at the
        # head and drops to a gap at the tail, so there is at most one gap per record in the
        # ring, plus one: the list is bounded by the ring.
        self._gaps: deque[list[int]] = deque()
        self._overrun = 0
        self._dropped = 0
        self._nwaiting = 0
        self._interrupts = 0

    # -- the write path ------------------------------------------------------------------

    def write(self, record: Record) -> bool:
        """Store `record`; True if it was stored, False if it was dropped.

        Never blocks beyond the short hold of the buffer's lock, never raises. A dropped
        record is counted lost (`dropped`), except while `tracing_on` is False.
        """
        if not self.tracing_on:
            return False
        try:
            # record_size(), inlined: a call costs as much as the rest of the estimate.
            values = record[4]
            size = RECORD_OVERHEAD + SCALAR_SIZE * len(values)
            for v in values:
                if type(v) in _VARLEN:
                    size += DATA_LOC_SIZE - SCALAR_SIZE + len(v)
            if record[5] is not None:
                size += RETURN_OVERHEAD
        except Exception:  # noqa: BLE001 - not a record: the hot path never raises
            return False
        lock = self._lock
        lock.acquire()
        try:
            used = self._bytes + size
            limit = self._limit
            if used <= limit:
                self._ring.append(record)
                self._sizes.append(size)
                self._bytes = used
                if self._nwaiting:
                    self._wake_locked()
                return True
            if not self.overwrite or size > limit:
                return self._drop_locked()
            # Overwrite: the steady state of a full buffer nobody reads, so _evict_locked()
            # is inlined here (a call costs as much as the evictions).
            ring = self._ring
            sizes = self._sizes
            n = 0
            while used > limit:
                ring.popleft()
                used -= sizes.popleft()
                n += 1
            ring.append(record)
            sizes.append(size)
            self._bytes = used
            self._overrun += n
            head = self._head_seq = self._head_seq + n
            gaps = self._gaps
            if gaps and gaps[0][0] <= head:
                first = gaps[0]
                first[0] = head
                first[1] += n
                if len(gaps) > 1 and gaps[1][0] <= head:
                    self._merge_head_gaps_locked()
            else:
                gaps.appendleft([head, n])
            if self._nwaiting:
                self._wake_locked()
            return True
        finally:
            lock.release()

    def _drop_locked(self) -> bool:
        """Refuse a record: count it dropped, as a gap after the newest record."""
        self._dropped += 1
        tail = self._head_seq + len(self._ring)
        gaps = self._gaps
        if gaps and gaps[-1][0] == tail:
            gaps[-1][1] += 1
        else:
            gaps.append([tail, 1])
        if self._nwaiting:
            self._wake_locked()
        return False

    def _evict_locked(self, limit: int) -> None:
        """Drop the oldest records until at most `limit` bytes are used; count them
        overwritten (ftrace's overrun) and as one gap before the new oldest record."""
        ring = self._ring
        sizes = self._sizes
        used = self._bytes
        n = 0
        while used > limit:
            ring.popleft()
            used -= sizes.popleft()
            n += 1
        if not n:
            return
        self._bytes = used
        self._overrun += n
        head = self._head_seq = self._head_seq + n
        gaps = self._gaps
        if gaps and gaps[0][0] <= head:
            first = gaps[0]
            first[0] = head
            first[1] += n
            self._merge_head_gaps_locked()
        else:
            gaps.appendleft([head, n])

    def _merge_head_gaps_locked(self) -> None:
        """After an eviction moved the first gap up to the new head: fold into it every gap
        that sat among the evicted records (they are all before the new head now)."""
        gaps = self._gaps
        first = gaps[0]
        head = first[0]
        while len(gaps) > 1 and gaps[1][0] <= head:
            first[1] += gaps[1][1]
            del gaps[1]

    def _wake_locked(self) -> None:
        self._nwaiting = 0
        self._cond.notify_all()

    # -- the read side ---------------------------------------------------------------------

    def snapshot(self) -> list[Record]:
        """The `trace` file: a copy of the records in the buffer, oldest first; consumes
        nothing. Holds the lock for the copy (a C-level copy of the deque)."""
        with self._lock:
            return list(self._ring)

    def read(self, block: bool = True, timeout: float | None = None) -> ReadBatch:
        """The `trace_pipe` file: take every record in the buffer, and the losses since the
        previous consuming read.

        With `block`, waits until something is written or lost (or `timeout` seconds pass,
        or `interrupt()` is called), and returns an empty batch if nothing came. Safe to call
        from any thread while writers write; concurrent readers share the stream, each
        record going to exactly one of them (as with ftrace's trace_pipe).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            interrupts = self._interrupts
            while not self._ring and not self._gaps:
                if not block or self._interrupts != interrupts:
                    return ReadBatch()
                if deadline is None:
                    remaining = None
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return ReadBatch()
                self._nwaiting += 1
                self._cond.wait(remaining)
            return self._take_locked()

    def _take_locked(self) -> ReadBatch:
        head = self._head_seq
        records = list(self._ring)
        self._ring.clear()
        self._sizes.clear()
        self._bytes = 0
        self._head_seq = head + len(records)
        lost_at = [(seq - head, count) for seq, count in self._gaps]
        self._gaps.clear()
        return ReadBatch(records, lost_at)

    def interrupt(self) -> None:
        """Wake every reader blocked in `read()`; each returns what there is (maybe nothing).
        For a server shutting down a trace_pipe."""
        with self._lock:
            self._interrupts += 1
            self._cond.notify_all()

    # -- control files ---------------------------------------------------------------------

    def clear(self) -> None:
        """Empty the buffer and reset its counters (writing to the `trace` file). Pending
        losses are forgotten with the records: clearing is not losing."""
        with self._lock:
            self._head_seq += len(self._ring)
            self._ring.clear()
            self._sizes.clear()
            self._bytes = 0
            self._gaps.clear()
            self._overrun = 0
            self._dropped = 0

    def resize(self, size_kb: int) -> None:
        """The `buffer_size_kb` file. Shrinking below what is stored evicts the oldest
        records, counted as overrun (as the kernel counts the entries of removed pages)."""
        _check_size_kb(size_kb)
        with self._lock:
            self._limit = size_kb * 1024
            # No reader to wake: one waits only while the buffer is empty.
            self._evict_locked(self._limit)

    @property
    def size_kb(self) -> int:
        return self._limit // 1024

    @property
    def bytes_used(self) -> int:
        """The sum of the size estimates of the records in the buffer."""
        return self._bytes

    @property
    def entries(self) -> int:
        """The number of records in the buffer (ftrace's entries-in-buffer)."""
        return len(self._ring)

    @property
    def overrun(self) -> int:
        """Records overwritten (or evicted by `resize`) since the last `clear()`."""
        return self._overrun

    @property
    def dropped(self) -> int:
        """Records refused (full buffer without overwrite, or too big) since `clear()`."""
        return self._dropped

    @property
    def lost(self) -> int:
        """Events lost since the last `clear()`: overrun + dropped."""
        with self._lock:
            return self._overrun + self._dropped

    def counts(self) -> tuple[int, int]:
        """`(entries-in-buffer, entries-written)` as ftrace's `trace` header prints them,
        read together: entries written counts what is in the buffer plus what was
        overwritten (records consumed by trace_pipe count in neither)."""
        with self._lock:
            entries = len(self._ring)
            return entries, entries + self._overrun

    def __repr__(self) -> str:
        return (
            f"<TraceBuffer {self.size_kb} KB, {self.entries} entries, "
            f"{self._bytes} bytes used, lost {self._overrun + self._dropped}, "
            f"{'overwrite' if self.overwrite else 'drop newest'}"
            f"{'' if self.tracing_on else ', tracing off'}>"
        )


def _check_size_kb(size_kb: int) -> None:
    # The kernel refuses 0 for buffer_size_kb (-EINVAL); so do we, and anything not an int.
    if type(size_kb) is not int or size_kb < 1:
        raise ValueError(f"buffer size must be a positive number of KB, not {size_kb!r}")
