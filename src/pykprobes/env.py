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
