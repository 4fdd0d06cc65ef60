"""The control socket's defences: private directories only, other users refused (by the
file system, and by SO_PEERCRED where the file system would let them in), and a protocol
that answers garbage, truncated, oversized and unknown requests with an error and nothing
else, with 50 clients at once, while the program goes on undisturbed."""

from __future__ import annotations

import errno
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pykprobes.control import protocol
from pykprobes.control.client import ControlError
from tests.control.conftest import child_env, cli, connect, records, status, wait_for
from tests.control.programs import LOOPER

ORIGINAL = ["original", "True", "path", "True"]


def _as_another_user() -> str | None:
    """Why this run cannot act as another user, or None: it needs root, setpriv
    (util-linux), and an interpreter that user can run (not one in a 0700 home)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return "acting as another user needs root and setpriv"
    res = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", sys.executable, "-c", "import pykprobes"],
                         capture_output=True, timeout=60, check=False)
    if res.returncode != 0:
        return f"uid {NOBODY} cannot run {sys.executable} with pykprobes (its directories " \
               "are closed to other users)"
    return None


NOBODY = 65534
_WHY_NOT = _as_another_user()
needs_another_user = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


def _raw(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def _reply(s: socket.socket) -> tuple[str, int, str] | None:
    """The next reply frame, or None when the server closed the connection first."""
    buf = bytearray()
    while True:
        text = protocol.take_frame(buf, protocol.MAX_REPLY)
        if text is not None:
            return protocol.parse_reply(text)
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        buf += chunk


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("problem", ["mode", "owner"])
def test_a_directory_that_is_not_private_is_refused(start_target: Any, tmp_path: Path,
                                                    problem: str) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "pykprobes").mkdir(parents=True)
    xdg.chmod(0o700)
    if problem == "mode":
        (xdg / "pykprobes").chmod(0o755)
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        os.chown(xdg / "pykprobes", NOBODY, -1)
    target = start_target(LOOPER, env={"XDG_RUNTIME_DIR": str(xdg)})
    assert list((xdg / "pykprobes").iterdir()) == []
    code, out, err = target.quit()
    # The program ran as it would have; one warning says why there is no socket.
    assert (code, out.split()) == (0, ORIGINAL)
    assert err.startswith("pykprobes: PYKPROBES_CONTROL: no control socket: ")
    assert ("mode 0755" if problem == "mode" else f"belongs to uid {NOBODY}") in err
    assert err.count("\n") == 1


@needs_another_user
def test_another_user_is_refused(start_target: Any, runtime_dir: Path) -> None:
    target = start_target(LOOPER)
    path = str(runtime_dir / "pykprobes" / f"{target.pid}.sock")
    wait_for(lambda: os.path.exists(path), 30, "the socket")
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    # Without privileges, the file system keeps them out (a 0700 directory)...
    res = subprocess.run([*drop, sys.executable, "-m", "pykprobes", "-p", str(target.pid),
                          "cat", "control/status"], capture_output=True, text=True,
                         env=child_env(), timeout=60, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and f"uid {os.geteuid()}" in res.stderr
    # ... and one that can pass the file system (CAP_DAC_OVERRIDE) meets SO_PEERCRED.
    probe = ("import socket, sys\n"
             "s = socket.socket(socket.AF_UNIX)\n"
             "s.connect(sys.argv[1])\n"
             "s.settimeout(30)\n"
             "try:\n"
             "    s.sendall(b'\\x00\\x00\\x00\\x14read control/status')\n"
             "except BrokenPipeError:\n"
             "    pass  # refused at accept already\n"
             "data = b''\n"
             "while True:\n"
             "    try:\n"
             "        chunk = s.recv(4096)\n"
             "    except ConnectionResetError:\n"
             "        break  # closed with our request unread: after its reply\n"
             "    if not chunk:\n"
             "        break\n"
             "    data += chunk\n"
             "print(data[4:].decode())\n")
    res = subprocess.run([*drop, "--inh-caps=+dac_override", "--ambient-caps=+dac_override",
                          sys.executable, "-c", probe, path], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"error {errno.EACCES}\nuid {NOBODY} may not use")
    with connect(target.pid) as conn:
        info = status(conn)
    assert info["refused"] == "1" and info["requests"] != "0"
    code, out, _ = target.quit()
    assert (code, out.split()) == (0, ORIGINAL)


def test_the_protocol_fuzzed(start_target: Any, runtime_dir: Path) -> None:
    target = start_target(LOOPER, serve="api", env={"PARTIAL_TIMEOUT": "0.3"})
    path = str(runtime_dir / "pykprobes" / f"{target.pid}.sock")
    wait_for(lambda: os.path.exists(path), 30, "the socket")
    with connect(target.pid) as conn:
        before = conn.read("symbols/__main__:work")

    # Oversized: the length alone is refused, and the connection closed.
    s = _raw(path)
    s.sendall((protocol.MAX_REQUEST + 1).to_bytes(4, "big") + b"read trace")
    assert _reply(s) == ("error", errno.E2BIG, f"a frame of {protocol.MAX_REQUEST + 1} "
                                               f"bytes: the limit is {protocol.MAX_REQUEST}")
    assert _closed(s)
    s = _raw(path)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a length of 1.2 GB
    assert _reply(s)[:2] == ("error", errno.E2BIG)  # type: ignore[index]
    assert _closed(s)

    # At the limit exactly: served.
    body = ("#" * 99 + "\n") * ((protocol.MAX_REQUEST - 30) // 100)
    text = f"append kprobe_events\n{body}"
    text += "#" * (protocol.MAX_REQUEST - len(text.encode()))
    s = _raw(path)
    s.sendall(protocol.frame(text))
    assert _reply(s) == ("ok", 0, "")

    # Malformed on a good connection: an error each, and the connection still serves.
    for bad, err in [(b"\xff\xfe read", errno.EINVAL), (b"", errno.EINVAL),
                     (b"frobnicate trace", errno.EINVAL), (b"read", errno.EINVAL),
                     (b"pipe yaml", errno.EINVAL), (b"stop", errno.EINVAL),
                     (b"read no/such/file", errno.ENOENT),
                     (b"write events/x/y/enable\n1", errno.ENOENT),
                     (b"append kprobe_events\np:x/y nosuchmodule:f", errno.ENOENT)]:
        s.sendall(len(bad).to_bytes(4, "big") + bad)
        kind, code, message = _reply(s)  # type: ignore[misc]
        assert (kind, code) == ("error", err), (bad, message)
    s.sendall(protocol.frame("read kprobe_events"))
    assert _reply(s) == ("ok", 0, "")
    # A request while streaming: refused, and the stream goes on.
    s.sendall(protocol.frame("pipe"))
    assert _reply(s) == ("ok", 0, "")
    s.sendall(protocol.frame("read trace"))
    assert _reply(s)[:2] == ("error", errno.EBUSY)  # type: ignore[index]
    s.sendall(protocol.frame("stop"))
    assert _reply(s) == ("end", 0, "stop")
    s.close()

    # Truncated: a header cut short, a body cut short, then the client goes away.
    for cut in (b"\x00\x00", b"\x00\x00\x00\x20read kprobe"):
        s = _raw(path)
        s.sendall(cut)
        s.close()
    # Truncated and left open: the server gives up after PARTIAL_TIMEOUT.
    s = _raw(path)
    s.sendall(b"\x00\x00\x00\x20read kprobe")
    assert _reply(s)[:2] == ("error", errno.ETIMEDOUT)  # type: ignore[index]
    assert _closed(s)

    # Garbage: random bytes on many connections.
    rng = random.Random(768)
    for _ in range(30):
        s = _raw(path)
        try:
            s.sendall(rng.randbytes(rng.choice([1, 3, 4, 5, 17, 300, 5000])))
        except OSError:
            pass
        s.settimeout(0.05)
        try:
            s.recv(65536)
        except OSError:
            pass
        s.close()

    # 50 clients at once: MAX_CLIENTS are served, the others told EBUSY and closed.
    clients = [_raw(path) for _ in range(50)]
    replies = []
    for c in clients:
        try:
            c.sendall(protocol.frame("read control/status"))
        except OSError:
            pass  # refused and closed already: its reply is waiting
        replies.append(_reply(c))
    kinds = [(r[0], r[1]) if r else None for r in replies]
    assert kinds.count(("ok", 0)) == protocol.MAX_CLIENTS, kinds
    busy = kinds.count(("error", errno.EBUSY))
    assert busy == 50 - protocol.MAX_CLIENTS, kinds
    for c in clients:
        c.close()

    # The program never noticed, and tracing still works.
    wait_for(lambda: _connected(target.pid) == 1, 30, "the 50 leaving")
    res = cli("-p", str(target.pid), "trace", "-e", "p:w/work __main__:work i",
              "--duration", "0.3")
    assert res.returncode == 0 and records(res.stdout), res.stderr
    with connect(target.pid) as conn:
        info = status(conn)
        assert conn.read("symbols/__main__:work") == before
        assert conn.read("kprobe_events") == ""
    assert int(info["busy"]) >= busy and int(info["errors"]) >= 13
    code, out, err = target.quit()
    assert (code, out.split(), err) == (0, ORIGINAL, "")


def _connected(pid: int) -> int:
    try:
        with connect(pid) as conn:
            return int(status(conn)["connected"])
    except ControlError as exc:
        assert exc.errno == errno.EBUSY  # the slots are not free yet
        return -1
