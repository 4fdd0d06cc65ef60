"""What the suite runs against: the mechanism chosen by PYKPROBES_ARCH, and capability flags.

Tests ask these flags, never the Python version (docs/architecture.md, rules 4 and 12).
`dev.py test` runs the whole suite once per arch; a plain `pytest` runs it with the default.
"""

from __future__ import annotations

import os
import subprocess
from typing import Final, Protocol

from pykprobes.core.arch import Capabilities
from pykprobes.env import HAS_SYS_MONITORING

__all__ = [
    "ARCH",
    "ARCHES",
    "BREAKPOINT_REWRITES",
    "BREAKPOINT_SEES_HANDLER_HITS",
    "HAS_SYS_MONITORING",
    "NESTED_MISS_SEEN",
    "OPTIMIZED",
    "REWRITTEN",
    "RunPython",
]

ARCHES: Final = ("breakpoint", "optimized")

_arch = os.environ.get("PYKPROBES_ARCH") or "optimized"
if _arch not in ARCHES:
    # A typo would otherwise silently test the default mechanism twice.
    raise RuntimeError(f"PYKPROBES_ARCH={_arch!r}: expected one of {', '.join(ARCHES)}")

#: "breakpoint": optimization is off, every probe stays a breakpoint (the kernel's
#: debug.kprobes-optimization=0). "optimized": probes are optimized where they can be.
ARCH: Final[str] = _arch
OPTIMIZED: Final[bool] = ARCH == "optimized"


class RunPython(Protocol):
    """The type of the `run_python` fixture, for annotating tests that use it."""

    def __call__(
        self, code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]: ...


def _breakpoint_capabilities() -> Capabilities:
    # The chosen breakpoint arch says what it can reach; tests skip on these, never on
    # the Python version.
    from pykprobes.core import registry

    registry.init_kprobes()
    caps: Capabilities = registry.table_view().mechanisms.breakpoint.capabilities
    return caps


def _breakpoint_sees_handler_hits() -> bool:
    from pykprobes.core import codestate

    return codestate.UNTRACED is not None


#: The chosen breakpoint arch's capabilities (see core/arch.py BreakpointArch).
BREAKPOINT_CAPS: Final[Capabilities] = _breakpoint_capabilities()


def _breakpoint_rewrites() -> bool:
    from pykprobes.core import registry

    m = registry.table_view().mechanisms
    return m.optimizer is not None and not m.breakpoint.capabilities.unprobed_code_untaxed


#: Breakpoints on functions are armed by a rewrite, the breakpoint arch serving only frames
#: already running the code it replaced: where that arch would tax unprobed code
#: (core/optimizer.py `rewrites_breakpoint`).
BREAKPOINT_REWRITES: Final[bool] = _breakpoint_rewrites()
#: A probed function runs rewritten code: optimized, or a breakpoint armed by a rewrite.
REWRITTEN: Final[bool] = OPTIMIZED or BREAKPOINT_REWRITES

#: A probe hit by a handler that a breakpoint runs (from a sys.monitoring or settrace
#: callback, where CPython reports no event: tstate->tracing) is seen and counted missed:
#: when the C accelerator lowers the tracing flag around the hit (core/codestate.py
#: UNTRACED). Without it (PYKPROBES_ACCELERATOR=off, or no compiler) the hit is not seen at all.
BREAKPOINT_SEES_HANDLER_HITS: Final[bool] = _breakpoint_sees_handler_hits()

#: What `nmissed` counts for one probe hit inside a handler of a pre-handler-only probe: the
#: rewritten code calls no callback, so an optimized probe's handler always counts it.
NESTED_MISS_SEEN: Final[int] = 1 if OPTIMIZED or BREAKPOINT_SEES_HANDLER_HITS else 0
