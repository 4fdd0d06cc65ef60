"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest

import pykprobes
from tests import testenv


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pykprobes import env

    return [
        f"pykprobes arch: {testenv.ARCH} (PYKPROBES_ARCH), "
        f"sys.monitoring: {'yes' if testenv.HAS_SYS_MONITORING else 'no'}, "
        f"jit: {'on' if env.JIT_ENABLED else 'off' if env.JIT_AVAILABLE else 'not built in'}"
    ]


def pytest_configure(config: pytest.Config) -> None:
    """A suite started from a background job (`cmd &` in a script, nohup) inherits SIGINT
    ignored, and so would every child it runs: the tests of Ctrl-C (KeyboardInterrupt in
    this process, a child killed by SIGINT, the -p PID client's interrupt) need the default
    Python disposition, as the terminal gives it."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _arch_for_session() -> None:
    """With PYKPROBES_ARCH=breakpoint, turn optimization off for the whole session, so every
    probe the suite registers stays a breakpoint."""
    # The engine is written alongside this suite: until the package exposes
    # set_optimization(), there is nothing to switch off.
    set_optimization = getattr(pykprobes, "set_optimization", None)
    if not testenv.OPTIMIZED and set_optimization is not None:
        set_optimization(False)


@pytest.fixture
def kp() -> ModuleType:
    """The pykprobes package (`kp` as in the docs' `import pykprobes as kp`)."""
    return pykprobes


@pytest.fixture
def run_python() -> testenv.RunPython:
    """Run `code` (dedented) in a new interpreter: `python -X faulthandler -c code *args`.

    `env` is added to this process's environment (so PYKPROBES_ARCH carries over); a child
    that crashes prints its traceback through faulthandler, and one that hangs is killed
    after `timeout` seconds (subprocess.TimeoutExpired).
    """

    def run(
        code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code), *args],
            env={**os.environ, **(env or {})},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return run
