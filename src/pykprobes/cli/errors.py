"""How the CLI reports a bad definition: the kernel's message and a caret, no traceback."""

from __future__ import annotations

import sys

from pykprobes.errors import KprobeError


def print_write_error(exc: KprobeError) -> None:
    """`pykprobes: error: MESSAGE`, then the definition with a caret under the bad column."""
    message, _, rest = str(exc.args[0] if exc.args else exc).partition("\n")
    print(f"pykprobes: error: {message}", file=sys.stderr)
    for line in rest.splitlines():
        print(f"  {line}", file=sys.stderr)
