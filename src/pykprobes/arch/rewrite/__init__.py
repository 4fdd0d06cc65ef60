"""The rewrite arch: optimized probes by bytecode rewriting (the kernel's optprobe).

`RewriteArch` implements `pykprobes.core.arch.OptimizerArch`:

* `check_optimizable` (safety.py) says where a call sequence may go;
* `build` (inject.py) makes a new code object with the per-version call sequence
  (assembly.py) before each probed instruction, using the `bytecode` library;
* `frames_running` (frames.py) tells whether a frame still runs a replaced code object.

Only this package imports `bytecode`, and only when the arch is constructed, so that
importing it to read its name costs nothing and a missing `bytecode` is a reason shown by
`pykprobes info`, not an ImportError.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import CodeType
from typing import Final

from pykprobes import env
from pykprobes.arch.rewrite import assembly, frames, safety
from pykprobes.core.arch import ArchUnavailable, OptHit

#: The `bytecode` releases inject.py was tested with (a version prefix).
TESTED_BYTECODE: Final = "0.19."


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
            if not bytecode.__version__.startswith(TESTED_BYTECODE):
                raise ArchUnavailable(
                    f"bytecode {bytecode.__version__} is not a tested release ({TESTED_BYTECODE}x)"
                )
            from pykprobes.arch.rewrite import inject
        except ImportError as exc:
            raise ArchUnavailable(f"the bytecode library is not importable: {exc}") from exc
        except AttributeError as exc:
            # inject.py subclasses a private class of bytecode 0.19.
            raise ArchUnavailable(f"unsupported version of the bytecode library: {exc}") from exc
        self._inject = inject
        self._sequence = sequence

    def check_optimizable(self, code: CodeType, offset: int) -> str | None:
        return safety.check_optimizable(code, offset)

    def build(
        self, code: CodeType, hits: Mapping[int, OptHit], consts: Mapping[int, CodeType]
    ) -> CodeType:
        for offset in hits:
            reason = safety.check_optimizable(code, offset)
            if reason is not None:
                raise ValueError(f"{code.co_qualname}+{offset}: {reason}")
        return self._inject.build(code, hits, consts, self._sequence)

    def frames_running(self, code: CodeType) -> bool:
        return frames.frames_running(code)
