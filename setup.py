"""What pyproject.toml cannot say: install the start-up hook files `_pykprobes.pth` and
`_pykprobes.start` (PEP 829) at the top of site-packages (the boot stage,
src/pykprobes/boot/), and build the C accelerator of the trace
hot path (src/pykprobes/trace/_speedups.c) as an *optional* extension: a build that fails (no
compiler, no Python headers) leaves the pure-Python fallback, which trace/backend.py then
chooses and `pykprobes info` names. Everything else is in pyproject.toml.

An editable install (`pip install -e .`) builds the extension into the source tree
(src/pykprobes/trace/_speedups.*.so and _histcount.*.so, ignored by git).

A wheel gets the hook files at its root (build_lib); an editable install (PEP 660,
`pip install -e .`, which dev.py uses) gets them in its wheel too: setuptools' editable_wheel
runs build_py with `editable_mode` set and packs whatever is in the `install` command's
install_lib directory. The files' text comes from src/pykprobes/boot/pth.py, read by path (no
import of the package).
"""

from __future__ import annotations

import os
import runpy

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK_FILES: dict[str, str] = runpy.run_path(
    os.path.join(HERE, "src", "pykprobes", "boot", "pth.py")
)["HOOK_FILES"]


class BuildPyWithPth(build_py):
    """build_py, plus the start-up hook files at the top of the built tree."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            # The editable wheel is packed from install_lib, not build_lib.
            target = self.get_finalized_command("install").install_lib
        else:
            target = self.build_lib
        os.makedirs(target, exist_ok=True)
        for name, text in HOOK_FILES.items():
            # UTF-8 without a BOM: what PEP 829 requires of both (site reads `utf-8-sig`).
            with open(os.path.join(target, name), "w", encoding="utf-8") as f:
                f.write(text)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            outputs.extend(os.path.join(self.build_lib, name) for name in HOOK_FILES)
        return outputs


SPEEDUPS = Extension(
    "pykprobes.trace._speedups",
    sources=["src/pykprobes/trace/_speedups.c"],
    optional=True,
)

# The C twin of trace/hist.py's compiled hit: optional as well (hist.py falls back).
HISTCOUNT = Extension(
    "pykprobes.trace._histcount",
    sources=["src/pykprobes/trace/_histcount.c"],
    optional=True,
)

# The C twin of core/rethook.py, the kretprobe fast path: optional (rethook.py falls back).
RETHOOK = Extension(
    "pykprobes.core._rethook",
    sources=["src/pykprobes/core/_rethook.c"],
    optional=True,
)

# The C twin of core/opthit.py, the optimized kprobe's inline hit: optional (opthit.py falls
# back).
OPTHIT = Extension(
    "pykprobes.core._opthit",
    sources=["src/pykprobes/core/_opthit.c"],
    optional=True,
)

setup(
    cmdclass={"build_py": BuildPyWithPth},
    ext_modules=[SPEEDUPS, HISTCOUNT, RETHOOK, OPTHIT],
)
