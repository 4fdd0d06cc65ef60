"""Reporting without raising: what the core tells while the program runs.

A warning or a line on stderr from inside an import, a handler or the interpreter's exit
must never become the program's exception: warnings turned into errors, a closed or missing
stderr are swallowed here.
"""

from __future__ import annotations

import sys


def warn(message: str, stacklevel: int = 2) -> None:
    """A RuntimeWarning that cannot raise (warnings as errors must not break an import)."""
    import warnings

    try:
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
    except Exception:  # noqa: BLE001 - warnings as errors must not break an import
        pass


def write_stderr(text: str) -> None:
    """Write to stderr whatever its state (None under pythonw, closed at exit)."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(text)
            sys.stderr.flush()
    except Exception:  # noqa: BLE001 - nowhere left to report it
        pass
