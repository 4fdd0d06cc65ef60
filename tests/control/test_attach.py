"""Attaching: PEP 768 (`sys.remote_exec`, CPython 3.14+) to a process that never asked for it
and never imported pykprobes, and every refusal as one line naming the reason and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.control.conftest import (
    HAS_REMOTE_EXEC,
    child_env,
    cli,
    connect,
    records,
    status,
    wait_for,
)
from tests.control.programs import LOOPER
from tests.control.test_security import NOBODY, needs_another_user

ORIGINAL = ["original", "True", "path", "True"]

needs_remote_exec = pytest.mark.skipif(not HAS_REMOTE_EXEC,
                                       reason="attaching without consent needs "
                                              "sys.remote_exec (PEP 768, CPython 3.14+)")

#: A main thread blocked in a system call (a read of stdin) until its first line; then
#: it loops in Python until the second.
BLOCKED = '''
import os, sys, time
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
while not sys.stdin.readline():
    pass
'''


def rows(res: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """`pykprobes ls`'s rows by pid."""
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["PID", "PYTHON", "HOW", "COMMAND"]
    return {ln.split()[0]: ln for ln in lines[1:]}


def refusal(res: subprocess.CompletedProcess[str]) -> str:
    """The one line of a refusal (exit 1, no traceback)."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("pykprobes: error: ")
    return res.stderr


@needs_remote_exec
def test_attach_to_a_process_that_never_imported_pykprobes(start_target: Any,
                                                           runtime_dir: Path) -> None:
    # -S: no site-packages, so no pykprobes and no start-up hook; no PYKPROBES_CONTROL.
    target = start_target(LOOPER, serve=None, python_args=("-S",))
    pid = str(target.pid)
    row = rows(cli("ls"))[pid]
    assert row.split()[1:4] == [f"{sys.version_info[0]}.{sys.version_info[1]}", "PEP", "768"]
    attached = cli("attach", pid)
    assert attached.returncode == 0, attached.stderr
    sock = runtime_dir / "pykprobes" / f"{pid}.sock"
    assert attached.stdout == f"{sock}\n"
    # The bootstrap removed its script and its report was read and removed.
    assert sorted(p.name for p in sock.parent.iterdir()) == [sock.name]
    assert "control socket" in rows(cli("ls"))[pid]
    res = cli("-p", pid, "trace", "-e", "p:w/work __main__:work i", "--duration", "0.3")
    assert res.returncode == 0 and records(res.stdout), res.stderr
    with connect(target.pid) as conn:
        assert conn.read("kprobe_events") == ""
    code, out, err = target.quit()
    # sys.path is the program's own again: the attacher's directories were there only
    # for the import.
    assert (code, out.split(), err) == (0, ORIGINAL, "")


@needs_remote_exec
def test_a_blocked_main_thread_runs_the_attach_when_it_wakes(start_target: Any) -> None:
    target = start_target(BLOCKED, serve=None, python_args=("-S",))
    res = cli("attach", "--attach-timeout", "0.5", str(target.pid))
    message = refusal(res)
    assert "main thread" in message and "blocked" in message and "--attach-timeout" in message
    assert "(it is in <module> (target.py:3))" in message
    # The request stays queued: the main thread runs it when its read returns.
    assert target.proc.stdin is not None
    target.proc.stdin.write("wake\n")
    target.proc.stdin.flush()
    sock = Path(os.environ["XDG_RUNTIME_DIR"]) / "pykprobes" / f"{target.pid}.sock"
    wait_for(sock.exists, 30, "the control server started late")
    with connect(target.pid) as conn:
        assert status(conn)["pid"] == str(target.pid)
    code, _, err = target.quit()
    assert code == 0 and err == ""


def test_a_process_without_a_socket_before_3_14(start_target: Any, tmp_path: Path) -> None:
    """Without PEP 768 on either side: the opt-ins are named."""
    other = _other_python(lambda v: v < (3, 14))
    if HAS_REMOTE_EXEC:
        if other is None:
            pytest.skip("needs a Python older than 3.14 to attach to")
        target = start_target(LOOPER, serve=None, argv0=[other])
    else:
        target = start_target(LOOPER, serve=None)
    message = refusal(cli("-p", str(target.pid), "cat", "trace"))
    assert "needs 3.14+ (PEP 768)" in message
    assert "PYKPROBES_CONTROL=1" in message and "pykprobes run --control" in message


@needs_remote_exec
@pytest.mark.parametrize("how", ["env", "flag"])
def test_a_process_that_turned_remote_debugging_off(start_target: Any, how: str) -> None:
    if how == "env":
        target = start_target(LOOPER, serve=None, env={"PYTHON_DISABLE_REMOTE_DEBUG": "1"})
        why = "its environment has PYTHON_DISABLE_REMOTE_DEBUG"
    else:
        target = start_target(LOOPER, serve=None, python_args=("-X", "disable-remote-debug"))
        why = "it was started with -X disable-remote-debug"
    message = refusal(cli("attach", str(target.pid)))
    assert why in message and "PYKPROBES_CONTROL=1" in message
    assert "no:" in rows(cli("ls", "--all"))[str(target.pid)]
    assert str(target.pid) not in rows(cli("ls"))


def test_a_dead_pid_and_a_non_python_pid() -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    message = refusal(cli("-p", str(dead.pid), "cat", "trace"))
    assert f"no process {dead.pid}" in message
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        message = refusal(cli("attach", str(sleeper.pid)))
        assert f"process {sleeper.pid} (sleep) is not a Python process" in message
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_remote_exec
def test_another_minor_version_is_named(start_target: Any) -> None:
    other = _other_python(lambda v: v >= (3, 14) and v != sys.version_info[:2])
    if other is None:
        pytest.skip("needs another CPython 3.14+ minor version")
    target = start_target(LOOPER, serve=None, argv0=[other, "-S"])
    message = refusal(cli("attach", str(target.pid)))
    assert "needs the same minor version" in message and "-m pykprobes" in message


@needs_remote_exec
@needs_another_user
def test_another_user_may_not_attach(start_target: Any) -> None:
    target = start_target(LOOPER, serve=None, python_args=("-S",))
    res = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", sys.executable, "-m", "pykprobes", "attach",
                          str(target.pid)], capture_output=True, text=True,
                         env=child_env(), timeout=60, check=False)
    message = refusal(res)
    assert f"belongs to uid {os.geteuid()}, not {NOBODY}" in message
    assert "CAP_SYS_PTRACE" in message
    assert target.quit()[0] == 0


@needs_remote_exec
@needs_another_user
def test_root_attaches_to_another_users_process() -> None:
    """CAP_SYS_PTRACE: root attaches to a process of uid 65534, whose control directory
    (made for it by root, owned by it) holds the bootstrap and the socket."""
    # Not under pytest's tmp_path: its parents are closed to other users.
    home = Path(tempfile.mkdtemp(prefix="pykprobes-nobody-"))
    home.chmod(0o755)
    xdg = home / "run"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, NOBODY, NOBODY)
    script = home / "target.py"
    script.write_text(LOOPER.lstrip("\n"))
    proc = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                             "--clear-groups", sys.executable, "-S", str(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=child_env(XDG_RUNTIME_DIR=str(xdg)))
    try:
        assert proc.stdout is not None
        pid = int(proc.stdout.readline().split()[1])
        res = cli("attach", str(pid))
        assert res.returncode == 0, res.stderr
        sock = xdg / "pykprobes" / f"{pid}.sock"
        assert res.stdout == f"{sock}\n"
        st = (xdg / "pykprobes").stat()
        assert (st.st_uid, st.st_mode & 0o777) == (NOBODY, 0o700)
        assert sock.stat().st_uid == NOBODY
        traced = cli("-p", str(pid), "trace", "-e", "p:w/work __main__:work i",
                     "--duration", "0.3")
        assert traced.returncode == 0 and records(traced.stdout), traced.stderr
        out, err = proc.communicate("quit\n", timeout=30)
        assert (proc.returncode, out.split(), err) == (0, ORIGINAL, "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        shutil.rmtree(home)


def _other_python(accept: Any) -> str | None:
    """An interpreter on PATH whose (major, minor) `accept` takes."""
    for minor in range(11, 21):
        exe = shutil.which(f"python3.{minor}")
        if exe and accept((3, minor)):
            return exe
    return None


def test_a_ptrace_refusal_names_yama_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The message for CPython's PermissionError, with each kernel.yama.ptrace_scope (this
    machine may have no Yama: the setting is read through one function)."""
    from pykprobes.control import attach, procs

    proc = procs.Process(os.getpid())
    proc.uid = os.geteuid() + 1
    denied = PermissionError(1, "Operation not permitted")
    for scope, fix in [(None, None), (0, None), (1, "sysctl kernel.yama.ptrace_scope=0"),
                       (2, "give CAP_SYS_PTRACE"), (3, "PYKPROBES_CONTROL=1")]:
        monkeypatch.setattr(attach, "_yama_scope", lambda scope=scope: scope)
        message = attach._permission_message(proc, denied)
        assert "\n" not in message
        assert f"belongs to uid {proc.uid}, not {os.geteuid()}" in message
        assert "CAP_SYS_PTRACE" in message and message.endswith("(Operation not permitted)")
        if fix is None:
            assert "yama" not in message
        else:
            assert f"kernel.yama.ptrace_scope={scope}" in message and fix in message
