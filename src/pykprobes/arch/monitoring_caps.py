"""What this interpreter's `sys.monitoring` does, measured rather than assumed by version.

Each function runs the event in question on a throwaway code object, once, when the
monitoring arch starts (tens of microseconds), with our tool id claimed and none of our
callbacks installed yet.

* `local_unwind`: PY_UNWIND can be a *local* event (3.15: gh-142186, "all-local PEP 669
  events"; before, `set_local_events` refuses it: "invalid local event set"). With it, the
  return hooks of a code object and the posts of its raises cost nothing to frames of other
  code; without it, PY_UNWIND is global while one is armed.
* `instruction_events_shared`: two tools can both have INSTRUCTION events on one code object.
  On every CPython measured (3.12.1, 3.13.0, 3.14.10, 3.15.2; cpython#157900, open), the tool
  that was there first loses its INSTRUCTION events on that code when a second one enables
  them: the per-instruction tool bits are allocated zeroed when a second tool appears. Once
  both are there, either may toggle its events without harm. The arch then re-arms the other
  tools' INSTRUCTION events when it comes second (monitoring.py, "Other tools"); when another
  tool comes second, our probes on that code stop firing, and nothing tells us.

`free_tool_id` frees a tool id the way every interpreter survives: on 3.14.10 with the JIT
on (PYTHON_JIT=1), `sys.monitoring.free_tool_id` can hang for good in a PyMutex wait under
`_Py_Dealloc`, single-threaded, while it re-instruments the code objects still executing
(seen in the suite's first test under pytest --junitxml, every time; not on 3.15.2; no CPython
issue found yet). Dropping the JIT's executors first (`sys._clear_internal_caches()`, 3.13+)
avoids it; the JIT compiles the hot code again.

`jit_records_instrumented`: on 3.15.2 with the JIT on, a loop of a code that has INSTRUCTION
events on some offsets (the others DISABLEd) still starts the JIT's trace recording at its
JUMP_BACKWARD, and an instrumented instruction reached while recording fires its INSTRUCTION
event twice for one execution (a probe on the POP_ITER after a `for` loop of difflib's
find_longest_match counted 16706 exhaustions for 16705; tests/core/test_every_line.py; no
CPython issue found yet; 3.14.10 does not). A JUMP_BACKWARD that keeps its INSTRUCTION event
never starts a recording, so the arch keeps those of the codes it instruments.
"""

from __future__ import annotations

import sys
from typing import Any

from pykprobes import env

__all__ = ["free_tool_id", "instruction_events_shared", "jit_records_instrumented", "local_unwind"]

_SRC = (
    "def boom():\n"
    "    raise KeyError(0)\n"
    "def count(n):\n"
    "    t = 0\n"
    "    for i in range(n):\n"
    "        t = t + i\n"
    "    return t\n"
)


def _fresh() -> dict[str, Any]:
    """New code objects, never seen by any tool: a probe of another tool cannot be on them."""
    namespace: dict[str, Any] = {}
    exec(compile(_SRC, "<pykprobes monitoring probe>", "exec"), namespace)
    return namespace


def local_unwind(mon: Any, tool: int) -> bool:
    """True when PY_UNWIND is a local event: set on one code, it fires for frames of that code
    only."""
    E = mon.events
    fns = _fresh()
    ours, other = fns["boom"], _fresh()["boom"]
    seen: list[object] = []
    mon.register_callback(tool, E.PY_UNWIND, lambda code, off, exc: seen.append(code))
    try:
        try:
            mon.set_local_events(tool, ours.__code__, E.PY_UNWIND)
        except ValueError:  # "invalid local event set" (3.12-3.14)
            return False
        for fn in (ours, other):
            try:
                fn()
            except KeyError:
                pass
        return seen == [ours.__code__]
    finally:
        mon.set_local_events(tool, ours.__code__, 0)
        mon.register_callback(tool, E.PY_UNWIND, None)


def instruction_events_shared(mon: Any, tool: int) -> bool:
    """True when our INSTRUCTION events on a code survive a second tool enabling its own
    there. Measured with a free tool id held for the measurement; with none free, False (what
    every CPython measured does)."""
    E = mon.events
    free = [t for t in range(6) if t != tool and mon.get_tool(t) is None]
    if not free:
        return False
    second = free[-1]
    try:
        mon.use_tool_id(second, "pykprobes (measuring)")
    except ValueError:  # claimed meanwhile by someone else
        return False
    count = _fresh()["count"]
    code = count.__code__
    ours: list[int] = []
    try:
        mon.register_callback(tool, E.INSTRUCTION, lambda c, o: ours.append(o))
        mon.register_callback(second, E.INSTRUCTION, lambda c, o: None)
        mon.set_local_events(tool, code, E.INSTRUCTION)
        mon.set_local_events(second, code, E.INSTRUCTION)
        count(2)
        return bool(ours)
    finally:
        mon.set_local_events(tool, code, 0)
        mon.set_local_events(second, code, 0)
        mon.register_callback(tool, E.INSTRUCTION, None)
        mon.register_callback(second, E.INSTRUCTION, None)
        free_tool_id(mon, second)


def free_tool_id(mon: Any, tool: int) -> None:
    """`mon.free_tool_id(tool)`, with the JIT's executors dropped first where it is on (see
    the module's docstring: a hang on 3.14.10 with PYTHON_JIT=1)."""
    clear_caches = getattr(sys, "_clear_internal_caches", None)
    if env.JIT_ENABLED and clear_caches is not None:
        clear_caches()
    mon.free_tool_id(tool)


def jit_records_instrumented() -> bool:
    """True where the JIT's trace recording doubles INSTRUCTION events (module docstring):
    3.15 with the JIT on. By version: the doubling needs hundreds of loop iterations to show."""
    return env.JIT_ENABLED and sys.version_info >= (3, 15)
