"""Interpreter facts, each with the reason it matters.

Only this module and the arch layer look at the Python version; everything else asks
for a capability (docs/architecture.md, rule 4).
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the lazy early path imports this at start-up
if TYPE_CHECKING:
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

# A free-threaded build (PEP 703, 3.13t; "t" in sys.abiflags) is refused by the core until it
# is supported (docs/pythons.md, "Free-threaded builds"): the hit path's counters and
# slots rely on the GIL, and so do the breakpoint arch's re-arm toggle and the C ring. A GIL
# re-enabled at run time (PYTHON_GIL=1) does not make the build's other differences go away.
FREE_THREADED: Final = "t" in getattr(sys, "abiflags", "") or (
    getattr(sys, "_is_gil_enabled", lambda: True)() is False
)
FREE_THREADED_REFUSAL: Final = (
    "pykprobes does not support free-threaded CPython builds yet (PEP 703): use the "
    "default build of this Python"
)

# The JIT (PEP 744; sys._jit from 3.14): built in (`PYTHON_JIT=1` turns it on) and on.
_jit = getattr(sys, "_jit", None)
JIT_AVAILABLE: Final = bool(_jit is not None and _jit.is_available())
JIT_ENABLED: Final = bool(_jit is not None and _jit.is_enabled())

# What the interpreter puts in `__main__` before a program's first line, besides `__name__`,
# `__doc__`, `__package__`, `__loader__`, `__spec__`, `__builtins__` and `__file__` (`pykprobes
# run` makes the same module): an empty `__annotations__` dict before 3.14 (gh-119180, PEP
# 649 made module annotations lazy), and `__cached__` (None for a script, the spec's for -m)
# before 3.15 (gh-65961: no longer set).
MAIN_ANNOTATIONS: Final = PYVERSION < (3, 14)
MAIN_CACHED: Final = PYVERSION < (3, 15)
