"""Before 3.12 there is no sys.monitoring: the arch says so and selection moves on."""

from __future__ import annotations

import sys

import pytest

from pykprobes.core.arch import ArchUnavailable


@pytest.mark.skipif(hasattr(sys, "monitoring"), reason="sys.monitoring exists on 3.12+")
def test_constructor_raises_arch_unavailable_before_312() -> None:
    from pykprobes.arch.monitoring import MonitoringArch

    with pytest.raises(ArchUnavailable) as info:
        MonitoringArch()
    assert str(info.value) == "sys.monitoring does not exist before 3.12 (PEP 669)"
