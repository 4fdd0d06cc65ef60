"""Fixtures of the kernel selftest ports: a tracefs of their own, and modules made for a test
(not imported yet, or to be imported again)."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pykprobes.trace.tracefs import TraceFS
from tests.trace.conftest import fs  # noqa: F401 - the same fixture: a tracefs of its own

#: The module of the targets, as a definition names it.
T = "tests.kselftest.targets"


def trace_args(tracefs: TraceFS, event: str) -> list[str]:
    """What the trace holds of `event`: each record's fields, as the line prints them."""
    return [line.split(") ", 1)[1] if ") " in line else "" for line in
            tracefs.read("trace").splitlines()
            if not line.startswith("#") and f" {event}: " in line]


#: make_module(name, source) -> the path of a module that is on sys.path, not imported.
MakeModule = Callable[[str, str], Path]


@pytest.fixture
def make_module(tmp_path: Path) -> Iterator[MakeModule]:
    """Write modules into a directory put on sys.path; forget them afterwards."""
    names: list[str] = []
    sys.path.insert(0, str(tmp_path))

    def make(name: str, source: str) -> Path:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        names.append(name)
        importlib.invalidate_caches()
        return path

    yield make
    sys.path.remove(str(tmp_path))
    for name in names:
        sys.modules.pop(name, None)
