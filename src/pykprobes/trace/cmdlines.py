"""Which thread wrote a record: a cheap key at hit time, its id and name at read time
(ftrace's saved_cmdlines).

The kernel records the pid in each event and keeps the comm of the pids it saw in a small
table (saved_cmdlines), read when the trace is printed. Here a hit records a *thread key*
and `saved` maps the key to `(native thread id, name)`, filled at the thread's first record:
`threading.get_native_id()` is a system call (~200 ns, ANALYSIS.md) and the name a lookup in
threading's table, too dear for every hit.

Why a key and not `_thread.get_ident()`: an ident is reused as soon as its thread has ended
(it is the address of the thread's pthread structure), so a record of a finished thread
would be printed with the id and name of a later thread. A key is never reused:

- the C backend's key is the thread state's id (`PyThreadState_GetID`), unique for the
  interpreter's life; the C recorder keeps the last key it saw and asks `saved` only when
  the thread changed;
- the Python fallback's key is a counter value kept in a `_thread._local`, which dies with
  its thread.

The name is the one the thread had at its first record (as saved_cmdlines holds the comm at
the time it was saved): a thread renamed later keeps its first name in the trace.

The table is bounded (SAVED_MAX, as saved_cmdlines_size bounds the kernel's): when it is
full, the older half is forgotten. A live thread whose key was forgotten is saved again at
its next record (each thread checks that its key is in the table); a record whose thread
was forgotten prints as the kernel prints an unknown comm: `<...>`, with tid 0.

A child made by `os.fork()` forgets the table: its threads have ids of their own (the one
thread it has keeps its key, not its id), saved again at their next record.
"""

from __future__ import annotations

import itertools
import os
from _thread import _local, get_native_id
from typing import Any, Final

from pykprobes.trace.fetchargs import UNKNOWN_COMM, thread_name

__all__ = ["SAVED_MAX", "UNKNOWN", "note", "py_thread_key", "resolve", "saved"]

#: Threads remembered at most (the kernel's saved_cmdlines_size defaults to 128).
SAVED_MAX: Final = 1024
#: What a forgotten thread resolves to.
UNKNOWN: Final = (0, UNKNOWN_COMM)

#: thread key -> (native thread id, name at its first record).
saved: Final[dict[int, tuple[int, str]]] = {}


def note(key: int) -> None:
    """Save the calling thread under `key` (called at its first record)."""
    if len(saved) >= SAVED_MAX:
        for old in list(saved)[: SAVED_MAX // 2]:
            saved.pop(old, None)
    saved[key] = (get_native_id(), thread_name())


_tls: Final = _local()
# Far from the C backend's keys (thread state ids count from 1): a process that runs both
# (the suite does: tests/trace run each backend) never takes a key of one for the other's.
_keys: Final = itertools.count(1 << 62)


def py_thread_key() -> int:
    """The calling thread's key (the Python fallback of `_speedups.thread_key`)."""
    try:
        key: int = _tls.key
    except AttributeError:
        key = _tls.key = next(_keys)  # itertools.count: atomic under the GIL
    if key not in saved:
        note(key)
    return key


os.register_at_fork(after_in_child=saved.clear)


def resolve(key: Any) -> tuple[int, str]:
    """`(tid, comm)` of a record's key; a `(tid, comm)` pair stands for itself."""
    if type(key) is tuple:
        return key
    return saved.get(key, UNKNOWN)
