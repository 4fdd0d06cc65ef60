"""The storage of the trace buffer, in pure Python: the fallback of the C ring
(`_speedups.c`), with the very same behaviour (`tests/trace/test_ring.py` runs the same
tests on both).

A ring holds *entries*, `(seq, ts, key, event, values, caller, size)`, oldest first, and
bounds the sum of their `size` estimates by `limit` bytes (see buffer.py). Every write
attempted while `tracing_on` takes the next sequence number, whether the entry is stored
or lost, so the losses are the gaps in the sequence, and a reader that remembers where it
stopped (`read_seq`) finds them at their place without any bookkeeping on the write path:

- overwrite (`overwrite` true): the oldest entries are evicted until the new one fits,
  counted in `overrun`: a gap at the head;
- drop newest (`overwrite` false), or an entry bigger than the whole ring: the new entry is
  refused, counted in `dropped`: a gap at the tail, or before the next entry stored.

`take()` consumes everything and moves `read_seq` to the end; `clear()` forgets pending
losses (clearing is not losing). While `tracing_on` is false, writes are refused uncounted
and take no number (tracing is off: nothing is lost).

`key` is a thread key (cmdlines.py) or, for records written whole, `(tid, comm)`; the ring
does not look at it, nor at `event`, `values`, `caller`.

A reader that waits sets `waiting` and the ring calls `wake()` once after the next write
or loss (outside its lock: the reader holds its own condition's lock while it checks).

Concurrency: one lock around each operation (the C ring needs none: each of its operations
runs without releasing the GIL and without running Python code, until it calls `wake`). A
write made while its own thread holds the lock -- a finalizer run by a collection that one
of the ring's allocations started -- is dropped and counted, as the kernel's ring buffer
drops a recursive write, instead of waiting for itself.
"""

from __future__ import annotations

import threading
from _thread import get_ident
from collections import deque
from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = ["Entry", "Ring"]

#: (seq, ts_ns, key, event, values, caller, size)
Entry: TypeAlias = tuple[int, int, Any, Any, tuple[Any, ...], str | None, int]


class _RingLock:
    """The ring's lock, knowing which thread holds it (see the module docstring)."""

    __slots__ = ("_lock", "owner")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def __enter__(self) -> None:
        self._lock.acquire()
        self.owner = get_ident()

    def __exit__(self, *exc: object) -> None:
        self.owner = None
        self._lock.release()


class Ring:
    """The trace buffer's storage; see the module docstring."""

    __slots__ = (
        "tracing_on",
        "overwrite",
        "waiting",
        "wake",
        "_lock",
        "_entries",
        "_bytes",
        "_limit",
        "_next_seq",
        "_read_seq",
        "_overrun",
        "_dropped",
    )

    def __init__(self, limit: int, overwrite: bool = True) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        self.tracing_on: bool = True
        self.overwrite: bool = bool(overwrite)
        self.waiting: bool = False
        self.wake: Callable[[], object] | None = None
        self._lock = _RingLock()
        self._entries: deque[Entry] = deque()
        self._bytes = 0
        self._limit = limit
        self._next_seq = 0
        self._read_seq = 0
        self._overrun = 0
        self._dropped = 0

    def append(
        self, ts: int, key: Any, event: Any, values: tuple[Any, ...], caller: str | None, size: int
    ) -> bool:
        """Store an entry; True if stored, False if refused (counted, unless tracing is off)."""
        if not self.tracing_on:
            return False
        wake = None
        lock = self._lock
        if lock.owner == get_ident():
            # Written from inside this thread's own ring operation: lost, counted.
            self._next_seq += 1
            self._dropped += 1
            return False
        with lock:
            seq = self._next_seq
            self._next_seq = seq + 1
            used = self._bytes + size
            limit = self._limit
            stored = True
            if used > limit:
                if not self.overwrite or size > limit:
                    self._dropped += 1
                    stored = False
                else:
                    entries = self._entries
                    n = 0
                    while used > limit:
                        used -= entries.popleft()[6]
                        n += 1
                    self._overrun += n
            if stored:
                self._entries.append((seq, ts, key, event, values, caller, size))
                self._bytes = used
            if self.waiting:
                self.waiting = False
                wake = self.wake
        if wake is not None:
            _call(wake)
        return stored

    def add_lost(self, n: int) -> None:
        """Count `n` events lost elsewhere (the early buffer's), at the tail."""
        if n <= 0:
            return
        wake = None
        with self._lock:
            self._next_seq += n
            self._dropped += n
            if self.waiting:
                self.waiting = False
                wake = self.wake
        if wake is not None:
            _call(wake)

    def take(self) -> tuple[list[Entry], int, int]:
        """Consume everything: (the entries, read_seq before, read_seq after). Every number in
        between that is not an entry's was lost."""
        with self._lock:
            entries = list(self._entries)
            self._entries.clear()
            self._bytes = 0
            start, self._read_seq = self._read_seq, self._next_seq
            return entries, start, self._next_seq

    def snapshot(self) -> list[Entry]:
        with self._lock:
            return list(self._entries)

    def pending(self) -> bool:
        """Something for a consuming reader: an entry, or a loss not yet reported."""
        return bool(self._entries) or self._next_seq != self._read_seq

    def after_fork(self) -> None:
        """In a child just forked: a new lock (another thread of the parent may have held
        the old one at the fork, and it does not exist here to release it)."""
        self._lock = _RingLock()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._read_seq = self._next_seq
            self._overrun = 0
            self._dropped = 0

    def resize(self, limit: int) -> None:
        """A new limit; entries over it are evicted, counted as overrun."""
        if type(limit) is not int or limit < 1:
            raise ValueError(f"limit must be a positive int, not {limit!r}")
        with self._lock:
            self._limit = limit
            entries = self._entries
            used = self._bytes
            while used > limit:
                used -= entries.popleft()[6]
                self._overrun += 1
            self._bytes = used

    def counts(self) -> tuple[int, int]:
        """(entries, entries + overrun), read together."""
        with self._lock:
            n = len(self._entries)
            return n, n + self._overrun

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def overrun(self) -> int:
        return self._overrun

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def read_seq(self) -> int:
        return self._read_seq


def _call(wake: Callable[[], object]) -> None:
    try:
        wake()
    except Exception:  # noqa: BLE001 - a write never raises (docs/architecture.md, rule 7)
        pass
