"""The client side of the control socket: find a process's socket, connect, and speak
protocol.py.

Before it speaks, a client checks whom it speaks to: the socket's directory must be private
to the process's user (paths.check_private: a socket planted by someone else is never used),
and the server's SO_PEERCRED pid must be the process asked for. A socket file whose process
is dead, or that nobody listens on any more, is removed (stale).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import sys
import time
from collections.abc import Iterator

from pykprobes.control import paths, procs, protocol


class ControlError(Exception):
    """A request the server refused (`errno` from its reply), or a connection that failed:
    the message is one line for the user (more lines for a definition and its caret)."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


def socket_candidates(pid: int) -> list[str]:
    """Where process `pid` would have put its socket."""
    uid = procs.uid_of(pid)
    if uid is None:
        return []
    environ = procs.Process(pid).environ or {}
    found = [paths.socket_path(d, pid) for d in paths.candidate_dirs(uid, environ)]
    # The same user's runtime directory even when the process's environment does not name
    # it (a service started without XDG_RUNTIME_DIR may still have been given one later).
    runtime = f"/run/user/{uid}/pykprobes"
    if paths.runtime_base({"XDG_RUNTIME_DIR": f"/run/user/{uid}"}, uid) is not None:
        found.insert(0, paths.socket_path(runtime, pid))
    return list(dict.fromkeys(found))


def find_socket(pid: int) -> str | None:
    """The control socket process `pid` serves, or None (stale files are removed)."""
    uid = procs.uid_of(pid)
    for path in socket_candidates(pid):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            continue
        try:
            paths.check_private(os.path.dirname(path), uid if uid is not None else -1)
        except (paths.UnsafeDirectory, OSError):
            continue
        if paths.remove_if_stale(path, pid):
            continue
        return path
    return None


def served_pids() -> dict[int, str]:
    """pid -> socket path of every live control socket this user can see."""
    uid = os.geteuid()
    found: dict[int, str] = {}
    for directory in paths.candidate_dirs(uid, os.environ):
        try:
            paths.check_private(directory, uid)
            names = os.listdir(directory)
        except (OSError, paths.UnsafeDirectory):
            continue
        for name in names:
            pid = paths.pid_of(name)
            path = os.path.join(directory, name)
            if pid is not None and not paths.remove_if_stale(path, pid):
                found.setdefault(pid, path)
    return found


class Connection:
    """One connection to a control server."""

    def __init__(self, path: str, pid: int | None = None, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._buf = bytearray()
        try:
            sock = _connect(path, timeout)
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED and pid is not None:
                # Nobody listens: the server is gone (its process died without cleaning up,
                # or it stopped).
                paths.remove_if_stale(path, pid)
            raise ControlError(exc.errno or errno.EIO,
                               f"cannot connect to {path}: {exc.strerror or exc}") from None
        self.sock = sock
        if pid is not None:
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            server_pid = int.from_bytes(cred[0:4], sys.byteorder)  # struct ucred, native
            if server_pid != pid:
                self.close()
                raise ControlError(errno.EPERM, f"{path} is served by process {server_pid}, "
                                                f"not {pid}: not using it")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ frames

    def send(self, text: str) -> None:
        try:
            self.sock.sendall(protocol.frame(text))
        except OSError as exc:
            # A server that refused us (too many clients, another user) said why before it
            # closed: that reason, rather than EPIPE.
            try:
                reply = self.receive(0.0)
            except ControlError:
                reply = None
            if reply is not None and reply[0] == "error":
                raise ControlError(reply[1], reply[2]) from None
            raise ControlError(exc.errno or errno.EPIPE,
                               f"the target closed the connection ({exc.strerror or exc})"
                               ) from None

    def receive(self, timeout: float | None = -1.0) -> tuple[str, int, str] | None:
        """The next reply frame as (kind, errno, body); None when `timeout` passed first
        (-1: the connection's timeout, then ControlError). ControlError when the server
        closed the connection."""
        wait = self.timeout if timeout is not None and timeout < 0 else timeout
        while True:
            text = protocol.take_frame(self._buf, protocol.MAX_REPLY)
            if text is not None:
                return protocol.parse_reply(text)
            ready, _, _ = select.select([self.sock], [], [], wait)
            if not ready:
                if timeout is not None and timeout < 0:
                    raise ControlError(errno.ETIMEDOUT, f"no reply from {self.path} in "
                                                        f"{self.timeout:g} s")
                return None
            try:
                chunk = self.sock.recv(1 << 20)
            except OSError as exc:
                chunk = b""
                if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                    raise ControlError(exc.errno or errno.EIO, str(exc)) from None
            if not chunk:
                raise ControlError(errno.ECONNRESET, "the target closed the connection")
            self._buf += chunk

    def request(self, verb: str, arg: str = "", body: str | None = None) -> str:
        """Send one request; its `ok` body, or ControlError for an `error` reply."""
        head = f"{verb} {arg}".rstrip()
        self.send(head if body is None else f"{head}\n{body}")
        reply = self.receive()
        assert reply is not None
        kind, err, text = reply
        if kind == "error":
            raise ControlError(err, text)
        if kind != "ok":
            raise ControlError(errno.EPROTO, f"unexpected {kind!r} reply to {verb}")
        return text

    # ------------------------------------------------------------------ files

    def read(self, path: str) -> str:
        return self.request("read", path)

    def write(self, path: str, text: str, append: bool = False) -> None:
        self.request("append" if append else "write", path, text)

    def stream(self, tick: float) -> Iterator[tuple[str, str]]:
        """After `pipe` or `trace`: yields ("data", TEXT) as records come, ("tick", "")
        every `tick` seconds without any, and ("end", REASON LF PROFILE) last."""
        while True:
            reply = self.receive(tick)
            if reply is None:
                yield "tick", ""
                continue
            kind, err, text = reply
            if kind == "error":
                raise ControlError(err, text)
            yield kind, text
            if kind == "end":
                return


def _connect(path: str, timeout: float) -> socket.socket:
    """A connected socket; a full listen backlog (EAGAIN: the server is busy accepting) is
    tried again until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        except OSError:
            sock.close()
            raise


def connect(pid: int, attach: bool = True, timeout: float = 30.0,
            attach_timeout: float = 5.0) -> Connection:
    """A connection to process `pid`'s control server; with `attach`, the server is started
    through PEP 768 (attach.py) when the process serves none. ControlError (and
    attach.AttachError, a subclass) say why not, in one line."""
    from pykprobes.control import attach as pep768

    path = find_socket(pid)
    if path is not None:
        try:
            return Connection(path, pid, timeout)
        except ControlError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise
    if not attach:
        raise ControlError(errno.ENOENT, f"process {pid} has no control socket")
    path = pep768.attach(pid, attach_timeout)
    return Connection(path, pid, timeout)
