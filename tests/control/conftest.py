"""Helpers for the control tests: real target programs in subprocesses, the `pykprobes` CLI
in subprocesses, and the client over real Unix sockets.

Every process of a test session (targets, CLIs, this one) gets one private
XDG_RUNTIME_DIR, so that its sockets never meet those of another run on the machine.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pykprobes.control import client
from tests.testenv import ARCH, OPTIMIZED

#: A trace line (trace/format.py format_line).
LINE = re.compile(r"^\s*(?P<comm>.+)-(?P<tid>\d+)\s+\[000\]\s+(?P<ts>[\d.]+): "
                  r"(?P<event>\w+): \((?P<probe>[^)]*)\)(?P<args>.*)$")


def records(text: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


#: PEP 768 (sys.remote_exec) in this interpreter: attach without the target's consent.
HAS_REMOTE_EXEC = hasattr(sys, "remote_exec")

#: Variables that would make a child something other than "this venv's python".
_STRIPPED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONSAFEPATH",
             "PYTHON_DISABLE_REMOTE_DEBUG")


@pytest.fixture(scope="session", autouse=True)
def runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("xdg")
    path.chmod(0o700)
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(path)
    yield path
    if old is None:
        del os.environ["XDG_RUNTIME_DIR"]
    else:
        os.environ["XDG_RUNTIME_DIR"] = old


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYKPROBES_") and k not in _STRIPPED}
    env["PYKPROBES_ARCH"] = ARCH
    env.update(extra)
    return env


class Target:
    """A long-running program in a subprocess; `pid`, and the words of its `ready` line."""

    def __init__(self, path: Path, argv: list[str], env: dict[str, str],
                 preexec: Any = None) -> None:
        self.path = path
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=path.parent, preexec_fn=preexec)
        line = _readline(self.proc, 60)
        if not line.startswith("ready "):
            self.kill()
            raise AssertionError(f"the target did not start: {line!r} {self.stderr()}")
        self.words = line.split()
        self.pid = int(self.words[1])

    def quit(self, timeout: float = 30) -> tuple[int, str, str]:
        """Ask it to finish (a line on stdin); (exit code, rest of stdout, stderr)."""
        out, err = self.proc.communicate("quit\n", timeout=timeout)
        return self.proc.returncode, out, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read() if self.proc.stderr else ""


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@pytest.fixture
def start_target(tmp_path: Path) -> Iterator[Any]:
    """start_target(SOURCE, serve="env"|"api"|None, python_args=(), env={}) -> Target.

    serve="env": PYKPROBES_CONTROL=1 (the boot stage serves); "api": the program calls
    pykprobes.control.serve(); None: no opt-in (PEP 768 only)."""
    targets: list[Target] = []

    def start(source: str, serve: str | None = "env", python_args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, name: str = "target.py",
              preexec: Any = None, argv0: list[str] | None = None) -> Target:
        path = tmp_path / name
        path.write_text(source.lstrip("\n"))
        extra = dict(env or {})
        if serve == "env":
            extra["PYKPROBES_CONTROL"] = "1"
        elif serve == "api":
            extra["SERVE"] = "1"
        argv = [*(argv0 or [sys.executable]), *python_args, str(path)]
        target = Target(path, argv, child_env(**extra), preexec)
        targets.append(target)
        return target

    yield start
    for target in targets:
        target.kill()


def cli(*args: str, timeout: float = 60, stdin: str | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pykprobes", *args], capture_output=True,
                          text=True, env=child_env(**(env or {})), timeout=timeout,
                          input=stdin, check=False)


def cli_popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pykprobes", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())


def connect(pid: int, attach: bool = False) -> client.Connection:
    """A connection to the target's server, set up for this run's arch."""
    conn = client.connect(pid, attach=attach, timeout=30)
    if not OPTIMIZED:
        conn.write("debug/kprobes-optimization", "0")
    return conn


def status(conn: client.Connection) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in conn.read("control/status").splitlines())


def wait_for(predicate: Any, timeout: float, what: str) -> float:
    """Poll `predicate` until true; the seconds it took (AssertionError after `timeout`,
    a liveness bound, never a speed claim)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.01)
    return time.monotonic() - t0


def interrupt(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=timeout)
