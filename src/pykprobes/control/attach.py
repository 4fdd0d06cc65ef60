"""Attach to a running Python 3.14+ that did not opt in: PEP 768's `sys.remote_exec`.

`attach(pid)` writes the bootstrap (bootstrap.py) to `DIR/attach-PID.py` in the target's
control directory (private to the target's user: paths.py), asks CPython to run it in the
target, and waits for its report, `DIR/attach-PID.out`: the control socket's path, or why
the server could not start; then it removes both. Every refusal is one line naming the
reason and the fix. Attachers take turns (flock on the directory): a process has one slot
for a pending script, and a script must still exist when the process runs it (CPython
prints "Can't open debugger script" on the target's stderr otherwise), so a script is
removed only once it ran, or when CPython refused to queue it.

Checked before asking CPython, so that the message names the real reason (CPython's own
errors are "PyRuntime address lookup failed" for a dead process and a non-Python one alike):
the process exists; it runs Python; that Python is 3.14 or later and the same minor version
as this one (sys.remote_exec's rule); neither `-X disable-remote-debug` nor
`PYTHON_DISABLE_REMOTE_DEBUG` turned PEP 768 off. The kernel's ptrace rules (same user or
CAP_SYS_PTRACE; kernel.yama.ptrace_scope) are CPython's to apply: its PermissionError is
explained with the process's owner and the Yama setting.

When the script runs (CPython 3.14 and 3.15 alike, measured by tests/control): in the
target's **main thread**, at its next eval-breaker check. A main thread that runs Python code
(a loop, a server polling with a timeout, as `serve_forever` does every 0.5 s) runs it at
once; a main thread blocked in a system call (`time.sleep`, `accept`, `select` without a
timeout, `Thread.join`, `Event.wait`) runs it only when the call returns, whatever the other
threads do; no signal helps (a signal Python does not handle never interrupts the call).
`attach()` waits `timeout` seconds, then says where the main thread is blocked (from
`_remote_debugging`, where available); the request stays queued in the target, and the
script stays in place: the control server starts when the main thread wakes, and a later
`pykprobes -p PID ...` finds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import pykprobes
from pykprobes import env
from pykprobes.control import paths, procs
from pykprobes.control.client import ControlError

#: sys.remote_exec copies the script's path into a 512-byte buffer (Include/cpython/pystate.h
#: _Py_MAX_SCRIPT_PATH_SIZE, 3.14), NUL included.
MAX_SCRIPT_PATH = 511
#: How often the report file is looked for.
_POLL = 0.02


class AttachError(ControlError):
    """Attaching is not possible: the message says why and what to do."""


def _version(v: tuple[int, int]) -> str:
    return f"{v[0]}.{v[1]}"


def check(pid: int) -> procs.Process:
    """Everything that can be known before asking CPython; the process, or AttachError."""
    if pid <= 0 or not paths.alive(pid):
        raise AttachError(errno.ESRCH, f"no process {pid} (it exited, or never existed)")
    proc = procs.Process(pid)
    me = os.geteuid()
    if proc.version is None and proc.exe is None and proc.uid not in (None, me) and me != 0:
        # /proc/PID/exe and maps are closed to us: the kernel's ptrace access check.
        raise AttachError(errno.EPERM, (
            f"process {pid} belongs to uid {proc.uid}, not {me}: attach as that user, or "
            "with CAP_SYS_PTRACE"))
    if proc.version is None:
        raise AttachError(errno.EINVAL, f"process {pid} ({procs.comm(pid)}) is not a Python "
                                        "process")
    here = env.PYVERSION
    if proc.version < procs.REMOTE_EXEC_SINCE:
        raise AttachError(errno.EOPNOTSUPP, (
            f"process {pid} runs Python {_version(proc.version)}: attaching without its "
            "consent needs 3.14+ (PEP 768); start it with PYKPROBES_CONTROL=1 or `pykprobes "
            "run --control`, or call pykprobes.control.serve() in it"))
    if getattr(sys, "remote_exec", None) is None:
        raise AttachError(errno.EOPNOTSUPP, (
            f"this pykprobes runs on Python {_version(here)}, which cannot attach "
            f"(sys.remote_exec is 3.14+): use python{_version(proc.version)} -m pykprobes"))
    if proc.version != here:
        raise AttachError(errno.EOPNOTSUPP, (
            f"process {pid} runs Python {_version(proc.version)} and this pykprobes runs on "
            f"{_version(here)}: sys.remote_exec needs the same minor version; use "
            f"python{_version(proc.version)} -m pykprobes"))
    off = proc.remote_debug_off()
    if off is not None:
        raise AttachError(errno.EPERM, (
            f"process {pid} turned remote debugging off ({off}): restart it without that, "
            "or with PYKPROBES_CONTROL=1"))
    return proc


def attach(pid: int, timeout: float = 5.0) -> str:
    """Start the control server in process `pid` through PEP 768; its socket's path."""
    proc = check(pid)
    assert proc.uid is not None
    directory = _directory(proc)
    script = os.path.join(directory, f"attach-{pid}.py")
    report = os.path.join(directory, f"attach-{pid}.out")
    if len(os.fsencode(script)) > MAX_SCRIPT_PATH:
        raise AttachError(errno.ENAMETOOLONG, f"{script} is longer than the {MAX_SCRIPT_PATH} "
                                              "bytes CPython takes: set XDG_RUNTIME_DIR to a "
                                              "shorter directory")
    deadline = time.monotonic() + timeout
    # One attacher at a time: a process has one pending script (a second remote_exec
    # replaces the first's path before it runs), and its file must be there when it runs.
    with _locked(directory, pid, deadline):
        served = _served(pid)
        if served is not None:  # an earlier attach's script ran meanwhile
            _remove(script, report)
            return served
        # A script still there was queued by an attach that timed out: it is pending in the
        # process, and must stay where it is until it runs.
        queued = os.path.exists(script)
        _remove(report, report + ".tmp")
        _write_script(script, report, proc.uid)
        try:
            sys.remote_exec(pid, script)  # type: ignore[attr-defined]
        except PermissionError as exc:
            if not queued:
                _remove(script)
            raise AttachError(errno.EPERM, _permission_message(proc, exc)) from None
        except (RuntimeError, OSError) as exc:
            if not queued:
                _remove(script)
            raise AttachError(errno.EIO, _remote_exec_message(proc, exc)) from None
        path = _wait(proc, report, deadline, timeout)
        _remove(script)  # it ran: nothing queued names it any more
        return path


@contextlib.contextmanager
def _locked(directory: str, pid: int, deadline: float) -> Iterator[None]:
    """flock() on the control directory until `deadline`."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise AttachError(errno.EBUSY, f"another attach to process {pid} is "
                                                   "under way: try again") from None
                time.sleep(_POLL)
        yield
    finally:
        os.close(fd)  # releases the lock


def _served(pid: int) -> str | None:
    from pykprobes.control.client import find_socket

    return find_socket(pid)


def _remove(*files: str) -> None:
    for name in files:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass


def _directory(proc: procs.Process) -> str:
    """The target's control directory (made for it, owned by its user, when missing)."""
    assert proc.uid is not None
    errors = []
    for path in paths.candidate_dirs(proc.uid, proc.environ or {}):
        try:
            return paths.make_private_dir(path, proc.uid)
        except paths.UnsafeDirectory as exc:
            raise AttachError(errno.EPERM, str(exc)) from None
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    raise AttachError(errno.EACCES, f"no directory for process {proc.pid}'s socket: "
                                    f"{'; '.join(errors)}")


def install_paths() -> list[str]:
    """The directories this pykprobes and its dependency are imported from."""
    found = [os.path.dirname(os.path.dirname(os.path.abspath(pykprobes.__file__)))]
    try:
        import bytecode
    except ImportError:
        pass
    else:
        found.append(os.path.dirname(os.path.dirname(os.path.abspath(bytecode.__file__))))
    return list(dict.fromkeys(found))


def _write_script(script: str, report: str, uid: int) -> None:
    from pykprobes.control import bootstrap

    with open(bootstrap.__file__, encoding="utf-8") as f:
        source = f.read()
    call = f"\n_pykprobes_attach({report!r}, {install_paths()!r}, {tuple(env.PYVERSION)!r})\n"
    tmp = f"{script}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, (source + call).encode("utf-8"))
        if uid != os.geteuid():
            os.fchown(fd, uid, -1)  # root attaching another user's process
    finally:
        os.close(fd)
    os.replace(tmp, script)


def _permission_message(proc: procs.Process, exc: OSError) -> str:
    me = os.geteuid()
    if proc.uid != me:
        why = (f"process {proc.pid} belongs to uid {proc.uid}, not {me}: attach as that user, "
               "or with CAP_SYS_PTRACE")
    else:
        why = f"the kernel refused to let this process trace {proc.pid}"
    scope = _yama_scope()
    if scope is not None and scope > 0:
        fixes = {1: "only a parent may trace its children: run as root, give CAP_SYS_PTRACE, "
                    "or `sysctl kernel.yama.ptrace_scope=0`",
                 2: "only CAP_SYS_PTRACE may trace: run as root or give CAP_SYS_PTRACE",
                 3: "no process may trace another: start the target with "
                    "PYKPROBES_CONTROL=1 instead"}
        why += f"; kernel.yama.ptrace_scope={scope}: {fixes.get(scope, fixes[3])}"
    return f"cannot attach to process {proc.pid}: {why} ({exc.strerror or exc})"


def _yama_scope() -> int | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _remote_exec_message(proc: procs.Process, exc: BaseException) -> str:
    text = str(exc)
    if not paths.alive(proc.pid):
        return f"process {proc.pid} exited"
    if "not enabled" in text:
        return (f"process {proc.pid} has remote debugging off (a Python built "
                "--without-remote-debug, or an opt-out set after start-up): start it with "
                "PYKPROBES_CONTROL=1 instead")
    return f"cannot attach to process {proc.pid}: {text}"


def _wait(proc: procs.Process, report: str, deadline: float, timeout: float) -> str:
    while True:
        try:
            with open(report, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        if text is not None:
            _remove(report)
            kind, _, rest = text.partition(" ")
            if kind == "ok" and rest:
                return rest.strip()
            raise AttachError(errno.EIO, f"process {proc.pid} could not start its control "
                                         f"server: {rest.strip() or text!r}")
        if not paths.alive(proc.pid):
            raise AttachError(errno.ESRCH, f"process {proc.pid} exited before it ran the "
                                           "attach script")
        if time.monotonic() >= deadline:
            raise AttachError(errno.ETIMEDOUT, _blocked_message(proc, timeout))
        time.sleep(_POLL)


def _blocked_message(proc: procs.Process, timeout: float) -> str:
    where = main_thread_location(proc.pid)
    at = f" (it is in {where})" if where else ""
    return (f"process {proc.pid} did not run the attach script within {timeout:g} s: CPython "
            f"runs it in the main thread only, at its next bytecode, and the main thread is "
            f"blocked{at}; the request stays queued and the control server will start when "
            "that call returns: try again then, or raise --attach-timeout")


def main_thread_location(pid: int) -> str | None:
    """`func (file:line)` of the innermost frame of the main thread of `pid`, read from
    outside by CPython's private `_remote_debugging` (3.14+); None where it cannot say."""
    try:
        import _remote_debugging  # type: ignore[import-not-found]

        trace: Any = _remote_debugging.RemoteUnwinder(pid).get_stack_trace()
        frames = _first_frames(trace)
        if not frames:
            return None
        f = frames[0]
        line = getattr(f, "lineno", None) or getattr(getattr(f, "location", None), "lineno",
                                                     None)
        return f"{f.funcname} ({os.path.basename(f.filename)}:{line})"
    except Exception:  # noqa: BLE001 - a private module whose shape changes: no location
        return None


def _first_frames(obj: Any, depth: int = 0) -> list[Any] | None:
    """The first `frame_info` list in what RemoteUnwinder returned (3.14: a list of
    ThreadInfo; 3.15: a list of InterpreterInfo holding ThreadInfo)."""
    if depth > 4:
        return None
    frames = getattr(obj, "frame_info", None)
    if isinstance(frames, list):
        return frames
    for child in (obj if isinstance(obj, (list, tuple)) else getattr(obj, "threads", ())):
        found = _first_frames(child, depth + 1)
        if found is not None:
            return found
    return None
