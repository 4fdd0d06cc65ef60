"""The package's C accelerator (src/pykprobes/trace/_speedups.c): whether it runs, chosen once
per process with its reason (coverage.py's CTracer / PyTracer choice), for its two users:

- the trace hot path (trace/backend.py): the ring, thread keys and compiled recorders;
- the core's breakpoint hits (core/codestate.py): `Untraced`, which lets a probe hit by a
  handler that a breakpoint runs be seen and counted, as the kernel counts it (README,
  "Known limits": without it, such a hit is not seen at all).

Choice, in order:

1. `PYKPROBES_ACCELERATOR=off` forces the pure-Python side (`=on` insists on C: the reason
   says why it is not there when it is not);
2. a free-threaded build takes the Python side: the C ring relies on the GIL to make each of
   its operations atomic;
3. the C accelerator when its extension was built (`setup.py` builds it as an optional
   extension: a machine without a compiler gets the fallback);
4. else the Python side.

A leaf: the standard library, env, and the extension itself (which imports nothing).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Final

from pykprobes import env

__all__ = ["MODULE", "NAME", "REASON"]


def _select() -> tuple[str, str, ModuleType | None]:
    wanted = os.environ.get("PYKPROBES_ACCELERATOR", "").strip().lower()
    if wanted == "off":
        return "python", "forced by PYKPROBES_ACCELERATOR=off", None
    if env.FREE_THREADED:
        return "python", "free-threaded build: the C ring relies on the GIL", None
    try:
        from pykprobes.trace import _speedups  # type: ignore[attr-defined]
    except ImportError as exc:
        return "python", f"the C accelerator is not built ({exc})", None
    why = "forced by PYKPROBES_ACCELERATOR=on" if wanted == "on" else "the C accelerator is built"
    return "c", why, _speedups


_name, _reason, _module = _select()
#: "c" or "python".
NAME: Final[str] = _name
#: Why, as `pykprobes info` prints it.
REASON: Final[str] = _reason
#: The extension module when NAME is "c", else None.
MODULE: Final[ModuleType | None] = _module
