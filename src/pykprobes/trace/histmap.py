"""The table of a hist trigger: the kernel's tracing_map (kernel/trace/tracing_map.c), for
Python values.

A `HistMap` maps a key (one value, or a tuple of values for a compound key) to an entry, a
list `[hitcount, sum1, sum2, ...]`. It holds at most `size` entries: a hit whose key is new
when the table is full is *dropped* and counted (`drops`), never stored. `hits` is the sum
of the entries' hitcounts (the kernel counts the hits that found or made an entry; a drop
is not a hit), so the hot path keeps one counter less.

Concurrency (the kernel's map is lock-free with atomics): under the GIL, `entry[0] += 1`
on a list of exact ints runs no eval-breaker check between its load and its store (CPython
checks for a thread switch at calls, RESUME and backward jumps only), so no increment is
lost; a new key is inserted with `dict.setdefault`, one C call, so two threads inserting
the same key share one entry. Two threads racing for the last free entry may both insert
(the table then holds `size + 1`). A free-threaded build has no GIL: there the hit paths
take the map's lock (env.FREE_THREADED).

Values are summed as Python numbers (no overflow, unlike the kernel's u64); a value that
is not an int, float or bool (FAULT, None, a string) adds nothing.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

from pykprobes import env

__all__ = ["DEFAULT_SIZE", "HistMap", "add_value"]

#: The kernel's default table size (TRACING_MAP_BITS_DEFAULT = 11).
DEFAULT_SIZE: Final = 2048

_NUMBERS: Final = (int, float, bool)


def add_value(entry: list[Any], index: int, value: Any) -> None:
    """Add `value` to the sum at `entry[index]` when it is a number (bool counts 0 or 1)."""
    tp = type(value)
    if tp is int or tp is float:
        entry[index] += value
    elif tp is bool:
        entry[index] += int(value)


class HistMap:
    """One table (see the module docstring). `nvals` is the number of summed values besides
    the hitcount; `comms` keeps, for a `.execname` key, the thread name seen at the entry's
    first hit (the kernel's elt_data->comm)."""

    __slots__ = ("size", "nvals", "entries", "drops", "comms", "lock", "counters", "_blank")

    def __init__(self, size: int = DEFAULT_SIZE, nvals: int = 0) -> None:
        self.size = size
        self.nvals = nvals
        #: key -> [hitcount, sums...]
        self.entries: dict[Any, list[Any]] = {}
        #: Hits whose new key found the table full.
        self.drops = 0
        self.comms: dict[Any, str] = {}
        #: Taken by the hit paths only in a free-threaded build; by readers always.
        self.lock = threading.Lock()
        #: The C counters of latency histograms (hist.py HistRecorder, _histcount.c) count a
        #: known entry's hits apart, without an int object: added to the entries (`flush`)
        #: before the table is read, forgotten when it is cleared.
        self.counters: weakref.WeakSet[Any] = weakref.WeakSet()
        self._blank = [0] * (1 + nvals)

    def _flush(self) -> None:
        for counter in list(self.counters):
            counter.flush()

    @property
    def hits(self) -> int:
        """Hits that found or made an entry (the kernel's map->hits)."""
        self._flush()
        return sum(entry[0] for entry in list(self.entries.values()))

    def insert(self, key: Any) -> list[Any] | None:
        """The entry of a key not found by the caller: made (zeroed), or None when the table
        is full (counted in `drops`)."""
        entries = self.entries
        if len(entries) >= self.size:
            entry = entries.get(key)
            if entry is None:
                self.drops += 1
            return entry
        return entries.setdefault(key, self._blank[:])

    def entry(self, key: Any) -> list[Any] | None:
        entry = self.entries.get(key)
        if entry is None:
            entry = self.insert(key)
        return entry

    def clear(self) -> None:
        """The trigger's `:clear` (and `> trigger` of a named table's last user): empty it."""
        with self.lock:
            self.entries.clear()
            for counter in list(self.counters):
                counter.forget()
            self.comms.clear()
            self.drops = 0

    def snapshot(self) -> tuple[list[tuple[Any, list[Any]]], int, int]:
        """`(entries as (key, a copy of the entry), hits, drops)`, read together."""
        with self.lock:
            self._flush()
            items = [(key, entry[:]) for key, entry in list(self.entries.items())]
            return items, sum(e[0] for _, e in items), self.drops


#: Whether the hit paths must lock (no GIL to make them atomic).
LOCKED: Final = bool(env.FREE_THREADED)


def locked(fn: Callable[..., Any], lock: Any) -> Callable[..., Any]:
    """`fn` under `lock` (the hit paths of a free-threaded build)."""

    def call(*args: Any) -> Any:
        with lock:
            return fn(*args)

    return call
