"""The implementations of the trace hot path that the tests run against: the pure-Python
fallback always, the C accelerator when it is built (backend.py chooses one per process;
these tests check both, whichever was chosen)."""

from __future__ import annotations

from typing import Any

import pytest

from pykprobes.trace import cmdlines, recorder, ring

try:
    from pykprobes.trace import _speedups  # type: ignore[attr-defined]
except ImportError:
    _speedups = None

if _speedups is not None:
    # backend.py hands it the table on import; importing it here must not depend on that.
    _speedups.set_note(cmdlines.note, cmdlines.saved)


def _backends() -> list[Any]:
    out: list[Any] = [pytest.param((ring.Ring, recorder.Recorder, cmdlines.py_thread_key),
                                   id="python")]
    if _speedups is not None:
        out.append(pytest.param((_speedups.Ring, _speedups.Recorder, _speedups.thread_key),
                                id="c"))
    return out


#: (Ring, Recorder, thread_key) of each backend.
BACKENDS = _backends()
