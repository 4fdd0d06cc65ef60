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

# The instructions an exhausted FOR_ITER jumps over, from the END_FOR its argument names:
# they never run as themselves, so no probe can be there and a `for` line's exit run starts
# after them. 3.12 skips END_FOR (bytecodes.c FOR_ITER: JUMPBY(oparg + 1)); 3.13 END_FOR and
# the POP_TOP after it (JUMPBY(oparg + 2)); 3.14 and 3.15 END_FOR again, landing on
# POP_ITER (measured: tests/core/test_lines.py). 3.11 has no END_FOR: the loop exits to
# the target itself.
FOR_ITER_EXIT_SKIPS: Final[tuple[str, ...]] = (
    () if PYVERSION < (3, 12) else ("END_FOR", "POP_TOP") if PYVERSION == (3, 13) else ("END_FOR",)
)

# A free-threaded build (PEP 703, 3.13t) has no GIL: our tables are still lock-guarded, but
# the counters' increments are not atomic there.
FREE_THREADED: Final = bool(getattr(sys, "_is_gil_enabled", lambda: True)() is False)
