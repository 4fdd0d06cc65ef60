"""Which implementation of the trace hot path runs: the C accelerator or pure Python
(coverage.py's CTracer / PyTracer choice, made once, here, with its reason).

The two implement the same three things, with the same behaviour (tests/trace run against
both: `dev.py test` runs the suite once more per Python with PYKPROBES_CORE=python):

- `Ring`: the trace buffer's storage (ring.py / `_speedups.Ring`);
- `thread_key()`: the calling thread's key (cmdlines.py / `_speedups.thread_key`);
- `Recorder`: the compiled record of an event (recorder.py / `_speedups.Recorder`).

Choice, in order:

1. `PYKPROBES_CORE=python` forces the fallback (`=c` insists on C: the reason says why it
   is not there when it is not);
2. a free-threaded build takes the fallback: the C ring relies on the GIL to make each of
   its operations atomic;
3. the C accelerator when its extension was built (`setup.py` builds it as an optional
   extension: a machine without a compiler gets the fallback);
4. else the fallback.

`pykprobes info` prints `NAME` and `REASON`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Final

from pykprobes import env
from pykprobes.trace import cmdlines, recorder, ring

__all__ = ["NAME", "REASON", "Recorder", "Ring", "thread_key"]


def _select() -> tuple[str, str, Any]:
    wanted = os.environ.get("PYKPROBES_CORE", "").strip().lower()
    if wanted == "python":
        return "python", "forced by PYKPROBES_CORE=python", None
    if env.FREE_THREADED:
        return "python", "free-threaded build: the C ring relies on the GIL", None
    try:
        from pykprobes.trace import _speedups  # type: ignore[attr-defined]
    except ImportError as exc:
        return "python", f"the C accelerator is not built ({exc})", None
    why = "forced by PYKPROBES_CORE=c" if wanted == "c" else "the C accelerator is built"
    return "c", why, _speedups


NAME, REASON, _c = _select()
NAME: Final[str]  # type: ignore[misc]
REASON: Final[str]  # type: ignore[misc]

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
