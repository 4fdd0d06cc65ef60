"""Interpreter facts, each with the reason it matters.

Only this module and the arch layer look at the Python version; everything else asks
for a capability (STYLE.md rule 4).
"""

from __future__ import annotations

import sys
from typing import Final

PYVERSION: Final = sys.version_info[:2]

# PEP 669: sys.monitoring exists from 3.12. Before it, the breakpoint mechanism has to
# fall back to sys.settrace with opcode events.
HAS_SYS_MONITORING: Final = hasattr(sys, "monitoring")

# 3.11 calls are PRECALL + CALL; 3.12 dropped PRECALL (gh-92925). The rewrite arch keys its
# trampolines on these.
PY311: Final = PYVERSION == (3, 11)
PY312: Final = PYVERSION == (3, 12)
PY313_PLUS: Final = PYVERSION >= (3, 13)

# A free-threaded build (PEP 703, 3.13t) has no GIL: our tables are still lock-guarded, but
# the counters' increments are not atomic there.
FREE_THREADED: Final = bool(getattr(sys, "_is_gil_enabled", lambda: True)() is False)

# What the interpreter puts in `__main__` before a program's first line, besides `__name__`,
# `__doc__`, `__package__`, `__loader__`, `__spec__`, `__builtins__` and `__file__` (`pykprobes
# run` makes the same module): an empty `__annotations__` dict before 3.14 (gh-119180, PEP
# 649 made module annotations lazy), and `__cached__` (None for a script, the spec's for -m)
# before 3.15 (gh-65961: no longer set).
MAIN_ANNOTATIONS: Final = PYVERSION < (3, 14)
MAIN_CACHED: Final = PYVERSION < (3, 15)
