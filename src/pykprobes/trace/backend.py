"""Which implementation of the trace hot path runs: the C accelerator or pure Python.

The two implement the same three things, with the same behaviour (tests/trace run against
both: `dev.py test` runs the suite once more per Python with PYKPROBES_ACCELERATOR=off):

- `Ring`: the trace buffer's storage (ring.py / `_speedups.Ring`);
- `thread_key()`: the calling thread's key (cmdlines.py / `_speedups.thread_key`);
- `Recorder`: the compiled record of an event (recorder.py / `_speedups.Recorder`).

The choice is accelerator.py's, made once for the package (`PYKPROBES_ACCELERATOR=off` forces
the fallback). `pykprobes info` prints `NAME` and `REASON`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

from pykprobes import accelerator
from pykprobes.trace import cmdlines, recorder, ring

__all__ = ["NAME", "REASON", "Recorder", "Ring", "thread_key"]

NAME: Final[str] = accelerator.NAME
REASON: Final[str] = accelerator.REASON
_c: Any = accelerator.MODULE

if _c is not None:
    _c.set_note(cmdlines.note, cmdlines.saved)
    # A forked child's thread ids are its own: the C key cache must look in `saved` again
    # (cmdlines empties it in the child).
    os.register_at_fork(after_in_child=lambda: _c.set_note(cmdlines.note, cmdlines.saved))
    Ring: Any = _c.Ring
    thread_key: Callable[[], int] = _c.thread_key
    Recorder: Any = _c.Recorder
else:
    Ring = ring.Ring
    thread_key = cmdlines.py_thread_key
    Recorder = recorder.Recorder
