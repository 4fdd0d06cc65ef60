"""The rewrite tests need the optimizer to exist on this interpreter: they build a
RewriteArch at import. Where it cannot be built (a CPython with no call sequence written for
it yet) they are not collected, and the report header says why: a capability of this
interpreter, never a version check."""

from __future__ import annotations

import pytest

from pykprobes.core.arch import ArchUnavailable, select_optimizer

try:
    select_optimizer()
except ArchUnavailable as exc:
    OPTIMIZER_UNAVAILABLE: str | None = str(exc)
else:
    OPTIMIZER_UNAVAILABLE = None

collect_ignore_glob = ["test_rewrite_*.py"] if OPTIMIZER_UNAVAILABLE else []


def pytest_report_header(config: pytest.Config) -> list[str]:
    if OPTIMIZER_UNAVAILABLE is None:
        return []
    return [f"capability: no optimizer ({OPTIMIZER_UNAVAILABLE}): tests/arch/test_rewrite_* "
            "not collected"]
