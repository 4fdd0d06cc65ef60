"""The trace ring buffer: ftrace's ring buffer for probe-event records.

A record is the tuple `(ts_ns, tid, comm, event, values, caller)` of docs/events.md, as the
readers get it. The buffer stores records, bounded by `size_kb` (the `buffer_size_kb` file)
through a per-record size estimate, and serves the two ways ftrace reads its buffer:

- `snapshot()` is the `trace` file: a copy of what is in the buffer, nothing consumed.
- `read()` is the `trace_pipe` file: it consumes what it returns, blocks until something is
  written, and tells the reader where events were lost (ftrace's "CPU:0 [LOST n EVENTS]").

What is stored is not the record but an entry of the ring (ring.py, or the C ring of
`_speedups.c`, chosen by backend.py): `(seq, ts, key, event, values, caller, size)`. The
thread is a key resolved to its id and name when the buffer is read (cmdlines.py, ftrace's
saved_cmdlines): a hit does no system call for it. The sequence number makes the lost
counts exact at read time (see ring.py).

Size estimate (`record_size`), in the spirit of what the kernel stores per kprobe event:

    24 bytes fixed     ring-buffer event header (8) + common fields (8) + probe ip (8)
    + 8                a return probe (a record whose `caller` is not None): the kernel's
                       second ip (`__probe_ret_ip`)
    + per value:       str and bytes: 4 + len(value) (the kernel's `__data_loc` word plus the
                       characters, counted in code points for str); anything else (int,
                       float, bool, None, FAULT, ...): 8

An event whose fetch types all have a fixed size (int, float, bool, x, len) computes its
records' size once, at definition (`fixed_size`); the others per record (`values_size`).
The buffer holds references, not copies, and only to values that keep nothing else alive
(fetchargs convert every other object to text): the estimate stands for that memory.

When a record does not fit, the buffer either overwrites the oldest records (`overwrite`, the
default, ftrace's `options/overwrite`) or drops the new one. Either way the lost events are
counted: `overrun` (overwritten, and evicted by a shrinking `resize`), `dropped` (refused), and
`lost` (both). A record bigger than the whole buffer is always dropped. Each loss is also
handed, exactly once, to the next consuming `read()`, at its place in the stream
(`ReadBatch.lost_at`), so that every record written is either read once or reported lost.
While `tracing_on` is false, writes are dropped without counting them (tracing is off:
nothing is lost).

A child made by `os.fork()` starts with an empty buffer and locks of its own: the records
made before the fork are the parent's to read (read there once, not twice), and a lock
that another thread of the parent held at the fork would never be released in the child.

Concurrency: the ring makes each of its operations atomic (a lock in Python, the GIL in C);
a write never waits for a reader and never raises. A reader blocked in `read()` waits on a
condition; it tells the ring it waits (`waiting`), and the next write calls `_wake()`.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeAlias
from weakref import WeakSet

from pykprobes.errors import KprobeError
from pykprobes.trace import backend
from pykprobes.trace.cmdlines import resolve

__all__ = [
    "DEFAULT_SIZE_KB",
    "MAX_SIZE_KB",
    "ReadBatch",
    "Record",
    "TraceBuffer",
    "fixed_size",
    "record_size",
    "values_size",
]

#: A trace record: (ts_ns, tid, comm, event, values, caller) (docs/events.md).
Record: TypeAlias = tuple[int, int, str, Any, tuple[Any, ...], str | None]

#: ftrace's default per-CPU buffer_size_kb on a machine with enough memory.
DEFAULT_SIZE_KB: Final = 1408
#: The largest buffer_size_kb (1 TiB): the ring's byte counts must stay far from the C
#: ring's Py_ssize_t. The buffer holds what is written, never preallocates its size.
MAX_SIZE_KB: Final = 1 << 30

#: Fixed part of the estimate: ring-buffer event header + common fields + probe ip.
RECORD_OVERHEAD: Final = 24
#: A return probe stores a second ip (the kernel's __probe_func and __probe_ret_ip).
RETURN_OVERHEAD: Final = 8
#: Any value that is not a str or bytes: one 64-bit slot.
SCALAR_SIZE: Final = 8
#: A str or bytes value: the kernel's __data_loc word, plus its length.
DATA_LOC_SIZE: Final = 4

_VARLEN: Final = frozenset((str, bytes))


def values_size(values: Sequence[Any], caller: str | None) -> int:
    """The size estimate of a record of these values (see the module docstring)."""
    size = RECORD_OVERHEAD + SCALAR_SIZE * len(values)
    for v in values:
        if type(v) in _VARLEN:
            size += DATA_LOC_SIZE - SCALAR_SIZE + len(v)
    if caller is not None:
        size += RETURN_OVERHEAD
    return size


def record_size(record: Record) -> int:
    """The size estimate of `record`, in bytes (see the module docstring)."""
    return values_size(record[4], record[5])


#: The fetch types whose value is never a str or bytes (or FAULT): 8 bytes each.
FIXED_TYPES: Final = frozenset(("int", "float", "bool", "x", "len"))


def fixed_size(types: Iterable[str | None], is_return: bool) -> int | None:
    """The size of every record of an event with fetchargs of these types (None: the
    default type), or None when it depends on the values."""
    types = list(types)
    if not all(t in FIXED_TYPES for t in types):
        return None
    return RECORD_OVERHEAD + SCALAR_SIZE * len(types) + (RETURN_OVERHEAD if is_return else 0)


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

    `append(ts, key, event, values, caller, size)` is the write path of events (the ring's
    own method: no Python call in between); `write(record)` stores a whole record.
    """

    __slots__ = ("__weakref__", "append", "ring", "_cond", "_interrupts", "_nwaiting")

    def __init__(self, size_kb: int = DEFAULT_SIZE_KB, overwrite: bool = True) -> None:
        _check_size_kb(size_kb)
        #: The storage (backend.Ring): the compiled recorders write into it directly.
        self.ring: Any = backend.Ring(size_kb * 1024, overwrite)
        self.ring.wake = self._wake
        self.append = self.ring.append
        self._cond = threading.Condition(threading.Lock())
        self._interrupts = 0
        #: Readers blocked in read() (tests look at it).
        self._nwaiting = 0
        _buffers.add(self)

    def _after_fork_in_child(self) -> None:
        # See the module docstring: empty, and new locks (the Python ring's too).
        self._cond = threading.Condition(threading.Lock())
        self._nwaiting = 0
        after_fork = getattr(self.ring, "after_fork", None)
        if after_fork is not None:
            after_fork()
        self.ring.waiting = False
        self.ring.clear()

    @property
    def tracing_on(self) -> bool:
        """The `tracing_on` switch: while False, writes are dropped, uncounted."""
        return bool(self.ring.tracing_on)

    @tracing_on.setter
    def tracing_on(self, value: bool) -> None:
        self.ring.tracing_on = bool(value)

    @property
    def overwrite(self) -> bool:
        """ftrace's `options/overwrite`: overwrite the oldest (True) or drop the newest."""
        return bool(self.ring.overwrite)

    @overwrite.setter
    def overwrite(self, value: bool) -> None:
        self.ring.overwrite = bool(value)

    # -- the write path ------------------------------------------------------------------

    def write(self, record: Record) -> bool:
        """Store a whole record (its tid and comm as given); True if it was stored, False if
        it was dropped. Never blocks beyond the ring's operation, never raises. A dropped
        record is counted lost (`dropped`), except while `tracing_on` is False."""
        try:
            ts, tid, comm, event, values, caller = record
            size = values_size(values, caller)
        except Exception:  # noqa: BLE001 - not a record: the hot path never raises
            return False
        return bool(self.ring.append(ts, (tid, comm), event, values, caller, size))

    def add_lost(self, n: int) -> None:
        """Count `n` events lost before they reached the buffer (the early buffer's), after
        the newest record."""
        self.ring.add_lost(n)

    def _wake(self) -> None:
        # Called by the ring after a write or loss, when a reader said it waits.
        with self._cond:
            self._cond.notify_all()

    # -- the read side ---------------------------------------------------------------------

    def snapshot(self) -> list[Record]:
        """The `trace` file: a copy of the records in the buffer, oldest first; consumes
        nothing."""
        return _records(self.ring.snapshot())

    def read(self, block: bool = True, timeout: float | None = None) -> ReadBatch:
        """The `trace_pipe` file: take every record in the buffer, and the losses since the
        previous consuming read.

        With `block`, waits until something is written or lost (or `timeout` seconds pass,
        or `interrupt()` is called), and returns an empty batch if nothing came. Safe to call
        from any thread while writers write; concurrent readers share the stream, each
        record going to exactly one of them (as with ftrace's trace_pipe).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ring = self.ring
        with self._cond:
            interrupts = self._interrupts
            while not ring.pending():
                if not block or self._interrupts != interrupts:
                    return ReadBatch()
                if deadline is None:
                    remaining = None
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return ReadBatch()
                # Say we wait, then look again: a write in between either saw the flag (and
                # waits for our lock to notify) or is in the ring already.
                ring.waiting = True
                if ring.pending():
                    break
                self._nwaiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._nwaiting -= 1
            entries, start, end = ring.take()
        records = _records(entries)
        lost_at: list[tuple[int, int]] = []
        expected = start
        for i, entry in enumerate(entries):
            seq = entry[0]
            if seq != expected:
                lost_at.append((i, seq - expected))
            expected = seq + 1
        if end != expected:
            lost_at.append((len(entries), end - expected))
        return ReadBatch(records, lost_at)

    def interrupt(self) -> None:
        """Wake every reader blocked in `read()`; each returns what there is (maybe nothing).
        For a server shutting down a trace_pipe."""
        with self._cond:
            self._interrupts += 1
            self._cond.notify_all()

    # -- control files ---------------------------------------------------------------------

    def clear(self) -> None:
        """Empty the buffer and reset its counters (writing to the `trace` file). Pending
        losses are forgotten with the records: clearing is not losing."""
        self.ring.clear()

    def resize(self, size_kb: int) -> None:
        """The `buffer_size_kb` file. Shrinking below what is stored evicts the oldest
        records, counted as overrun (as the kernel counts the entries of removed pages)."""
        _check_size_kb(size_kb)
        self.ring.resize(size_kb * 1024)

    @property
    def size_kb(self) -> int:
        return int(self.ring.limit) // 1024

    @property
    def bytes_used(self) -> int:
        """The sum of the size estimates of the records in the buffer."""
        return int(self.ring.bytes_used)

    @property
    def entries(self) -> int:
        """The number of records in the buffer (ftrace's entries-in-buffer)."""
        return int(self.ring.entries)

    @property
    def overrun(self) -> int:
        """Records overwritten (or evicted by `resize`) since the last `clear()`."""
        return int(self.ring.overrun)

    @property
    def dropped(self) -> int:
        """Records refused (full buffer without overwrite, or too big) since `clear()`."""
        return int(self.ring.dropped)

    @property
    def lost(self) -> int:
        """Events lost since the last `clear()`: overrun + dropped."""
        ring = self.ring
        return int(ring.overrun + ring.dropped)

    def counts(self) -> tuple[int, int]:
        """`(entries-in-buffer, entries-written)` as ftrace's `trace` header prints them,
        read together: entries written counts what is in the buffer plus what was
        overwritten (records consumed by trace_pipe count in neither)."""
        entries, written = self.ring.counts()
        return int(entries), int(written)

    def __repr__(self) -> str:
        return (
            f"<TraceBuffer {self.size_kb} KB, {self.entries} entries, "
            f"{self.bytes_used} bytes used, lost {self.overrun + self.dropped}, "
            f"{'overwrite' if self.overwrite else 'drop newest'}"
            f"{'' if self.tracing_on else ', tracing off'}>"
        )


def _records(entries: list[Any]) -> list[Record]:
    """The ring's entries as records, each thread key resolved (cmdlines.py)."""
    out: list[Record] = []
    for _seq, ts, key, event, values, caller, _size in entries:
        tid, comm = resolve(key)
        out.append((ts, tid, comm, event, values, caller))
    return out


def _check_size_kb(size_kb: int) -> None:
    # The kernel refuses 0 for buffer_size_kb (-EINVAL); so do we, and anything not an int,
    # and a size beyond what the ring can count.
    if type(size_kb) is not int or not 1 <= size_kb <= MAX_SIZE_KB:
        raise KprobeError(errno.EINVAL, f"buffer size must be a number of KB in "
                                        f"1..{MAX_SIZE_KB}, not {size_kb!r}")


#: Every trace buffer of the process, for the fork handler.
_buffers: WeakSet[TraceBuffer] = WeakSet()


def _after_fork_in_child() -> None:
    for buffer in list(_buffers):
        buffer._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
