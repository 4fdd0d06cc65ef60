"""The Python processes of this machine, as /proc shows them: who owns one, which Python
it runs, whether PEP 768 may reach it, and its command line.

Which Python: the interpreter's file name (`/proc/PID/exe`, `python3.12`), else the
`libpython3.N` it maps (an embedding program), else, for an executable named `python...`
with no version in its name, what that executable says when asked (`-I -S -c`; cached).

PEP 768's opt-outs, read as CPython reads them at start-up: `-X disable-remote-debug` on the
command line, or `PYTHON_DISABLE_REMOTE_DEBUG` in the environment (any value, even empty),
unless `-E` or `-I` made the interpreter ignore its environment. The environment is the one
the process started with (/proc/PID/environ), which is the one CPython read.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Final

from pykprobes.control import paths

#: PEP 768 (`sys.remote_exec`) exists from CPython 3.14.
REMOTE_EXEC_SINCE: Final = (3, 14)

_EXE_VERSION = re.compile(r"^python(\d+)\.(\d+)")
_LIB_VERSION = re.compile(rb"libpython(\d+)\.(\d+)")
_asked: dict[str, tuple[int, int] | None] = {}


class Process:
    """What /proc says about one process (fields are None where it would not say)."""

    __slots__ = ("cmdline", "environ", "exe", "pid", "uid", "version")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.uid = uid_of(pid)
        self.cmdline = _read_list(pid, "cmdline") or []
        env = _read_list(pid, "environ")
        self.environ: dict[str, str] | None = None if env is None else dict(
            item.partition("=")[::2] for item in env)
        try:
            self.exe: str | None = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            self.exe = None
        self.version = python_version(pid, self.exe)

    @property
    def command(self) -> str:
        """The command line on one line (`-c` programs have newlines: shown as \\n)."""
        if not self.cmdline:
            return f"[{comm(self.pid)}]"
        return " ".join(self.cmdline).replace("\\", "\\\\").replace("\n", "\\n")

    def remote_debug_off(self) -> str | None:
        """Why PEP 768 cannot reach this process's interpreter, from its command line and
        environment; None if nothing says so."""
        flags = interpreter_flags(self.cmdline)
        if "disable-remote-debug" in flags["X"]:
            return "it was started with -X disable-remote-debug"
        ignore_env = flags["E"] or flags["I"]
        if not ignore_env and self.environ is not None and \
                "PYTHON_DISABLE_REMOTE_DEBUG" in self.environ:
            return "its environment has PYTHON_DISABLE_REMOTE_DEBUG"
        return None


def uid_of(pid: int) -> int | None:
    """The process's effective uid (/proc/PID/status `Uid:` real, effective, ...)."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _read_list(pid: int, name: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [s.decode("utf-8", "surrogateescape") for s in raw.split(b"\0") if s]


def python_version(pid: int, exe: str | None) -> tuple[int, int] | None:
    """The (major, minor) of the Python process `pid` runs, or None: not Python (or not
    ours to look at)."""
    name = os.path.basename(exe or "")
    m = _EXE_VERSION.match(name)
    if m:
        return int(m[1]), int(m[2])
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            found = _LIB_VERSION.search(f.read())
    except OSError:
        found = None
    if found:
        return int(found[1]), int(found[2])
    if exe and name.startswith("python") and not exe.endswith(" (deleted)"):
        return _ask(exe)
    return None


def _ask(exe: str) -> tuple[int, int] | None:
    if exe not in _asked:
        try:
            out = subprocess.run([exe, "-I", "-S", "-c",
                                  "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=10, check=False,
                                 env={}).stdout.split()
            _asked[exe] = (int(out[0]), int(out[1])) if len(out) == 2 else None
        except (OSError, ValueError, subprocess.SubprocessError):
            _asked[exe] = None
    return _asked[exe]


def interpreter_flags(cmdline: list[str]) -> dict[str, set[str]]:
    """The interpreter options before the program (`-X` values, and single-letter flags as
    keys with a truthy set), e.g. {"X": {"dev"}, "E": {"E"}, "I": set()}."""
    flags: dict[str, set[str]] = {"X": set(), "E": set(), "I": set()}
    args = iter(cmdline[1:])
    for arg in args:
        if arg in ("-c", "-m", "-", "--") or not arg.startswith("-"):
            break  # the program, its arguments are its own
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in "XW":
                value = letters or next(args, "")
                if letter == "X":
                    flags["X"].add(value.partition("=")[0])
                break
            if letter in ("c", "m"):
                return flags  # -Ic CODE
            if letter in flags:
                flags[letter].add(letter)
    return flags


def python_processes(uid: int | None = None) -> list[Process]:
    """The Python processes of user `uid` (every user's for None), this one excepted."""
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        owner = uid_of(pid)
        if owner is None or (uid is not None and owner != uid):
            continue
        proc = Process(pid)
        if proc.version is not None and paths.alive(pid):
            found.append(proc)
    return sorted(found, key=lambda p: p.pid)
