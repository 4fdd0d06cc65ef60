"""Fixtures shared by the tracefs tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS


@pytest.fixture
def fs() -> Iterator[TraceFS]:
    """A tracefs of its own; its events disabled and removed afterwards."""
    fs = TraceFS()
    yield fs
    for event in list(fs.events.values()):
        event.disable()
    fs.clear()
    kp.wait_for_kprobe_optimizer()
