"""The rewrite arch: optimized probes by bytecode rewriting (the kernel's optprobe).

`RewriteArch` implements `pykprobes.core.arch.OptimizerArch`:

* `check_optimizable` (safety.py) says where a call sequence may go;
* `build` (inject.py) makes a new code object with the per-version call sequence
  (assembly.py) before each probed instruction, and, for return probes, the return
  sequences (retprobe.py), using the `bytecode` library; it says where each original
  instruction went;
* `frames_running` (frames.py) tells whether a frame still runs a replaced code object.

Only this package imports `bytecode`, and only when the arch is constructed, so that
importing it to read its name costs nothing and a missing `bytecode` is a reason shown by
`pykprobes info`, not an ImportError.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from types import CodeType
from typing import Any, Final

from pykprobes import env, insn
from pykprobes.arch.rewrite import assembly, callees, frames, safety
from pykprobes.core.arch import (
    ArchUnavailable,
    Built,
    CompiledCall,
    InlineHit,
    OptHit,
    OptReturns,
)

#: The instructions a frame returns by (3.12 added RETURN_CONST).
RETURNS: Final = frozenset({"RETURN_VALUE", "RETURN_CONST"})

#: The `bytecode` release inject.py was tested with, on every supported CPython (pinned in
#: pyproject.toml): inject.py seeds a private class of it and works around its reading of
#: 3.14's BUILD_INTERPOLATION, both of which another release may change.
TESTED_BYTECODE: Final = "0.19.1"


class RewriteArch:
    """Inserts `hit()` calls into copies of code objects."""

    name = "rewrite"

    def __init__(self) -> None:
        sequence = assembly.call_sequence()
        if sequence is None:
            version = ".".join(map(str, env.PYVERSION))
            raise ArchUnavailable(f"no call sequence written and tested for CPython {version}")
        try:
            import bytecode

            # inject.py seeds a private class of bytecode (see there): only the releases it
            # was tested with are trusted; any other leaves probes to the breakpoint arch.
            if bytecode.__version__ != TESTED_BYTECODE:
                raise ArchUnavailable(
                    f"bytecode {bytecode.__version__} is not the tested release ({TESTED_BYTECODE})"
                )
            from pykprobes.arch.rewrite import inject
        except ImportError as exc:
            raise ArchUnavailable(f"the bytecode library is not importable: {exc}") from exc
        except AttributeError as exc:
            # inject.py subclasses a private class of bytecode 0.19.
            raise ArchUnavailable(f"unsupported version of the bytecode library: {exc}") from exc
        self._inject = inject
        self._sequence = sequence
        # None on a Python with call sequences but no return sequences: build() then
        # refuses `returns` (ValueError) and the core keeps return probes on breakpoints.
        self._returns = assembly.return_sequences()
        # None on a Python without one: compiled calls are then served as plain hits.
        self._compiled = assembly.compiled_call_sequence()
        # None on a Python without one: inline hits are then served by their trampoline.
        self._inline = assembly.inline_sequence()
        #: Compiled calls at a function's entry are built as such (core/arch.py).
        self.compiles_calls = self._compiled is not None

    def check_optimizable(self, code: CodeType, offset: int) -> str | None:
        return safety.check_optimizable(code, offset)

    def build(
        self,
        code: CodeType,
        hits: Mapping[int, OptHit | CompiledCall | InlineHit],
        consts: Mapping[int, CodeType],
        returns: OptReturns | None = None,
    ) -> Built:
        for offset in hits:
            reason = safety.check_optimizable(code, offset)
            if reason is not None:
                raise ValueError(f"{code.co_qualname}+{offset}: {reason}")
        if returns is not None:
            # The hooks of a return probe go before each return instruction: the same
            # rules hold there (none refuses a return on 3.11-3.13).
            for ins in insn.decode(code):
                if ins.opname in RETURNS:
                    reason = safety.check_optimizable(code, ins.start)
                    if reason is not None:
                        raise ValueError(f"{code.co_qualname}+{ins.start}: {reason}")
        new, offsets = self._inject.build(
            code, hits, consts, self._sequence, returns, self._returns, self._compiled,
            self._inline,
        )
        return Built(new, offsets)

    def frames_running(self, code: CodeType) -> bool:
        return frames.frames_running(code)

    def share(self, code: CodeType, namespace: MutableMapping[str, Any]) -> None:
        callees.share(code, namespace)
