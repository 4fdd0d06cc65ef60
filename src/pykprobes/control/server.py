"""The control server: this process's tracefs, served on an owner-only Unix socket.

`serve()` binds `DIR/PID.sock` (paths.py: directory 0700, socket 0600) and starts one daemon
thread, `pykprobes-control`, which answers the requests of protocol.py. Nothing else of the
program changes until a request arrives; the first one ends the early stage
(`init_kprobes()`), as the seed's init_kprobes() ends early kprobes.

The thread, and what it promises the program:

* **It is NOPROBE.** Its loop runs pykprobes code (blacklisted) and C functions only: the
  `_socket` type rather than `socket.socket` (whose Python methods a user may trace), `poll`,
  `os`, and a C JSON encoder (stream.py). A probe on the standard library therefore never
  records the server's own work, and a stream can never feed itself. (Defining an event runs
  the same resolution code as any definition, in this thread.)
* **It never holds the GIL while it waits**: it sleeps in `poll()`, for ever when no client
  streams, else for STREAM_TICK seconds between two looks at the trace buffer.
* **It never blocks the program's threads**: its sockets are non-blocking, a slow client's
  stream backlog is bounded (MAX_BACKLOG; beyond it the client's records are dropped and
  counted, and it is told with a lost-events line), and it takes no lock of the program's.
* **It never delays the exit by more than EXIT_DELAY seconds**: an atexit handler sends each
  streaming client the last records and `end exit`, waits at most that long for the thread,
  and removes the socket.
* **Peers are checked**: each connection's SO_PEERCRED uid must be this process's user or
  root; others are refused (`error 13`) and counted (`control/status`).
* **A forked child serves nothing**: it closes its copies of the server's sockets at once
  (os.register_at_fork), never removes the parent's socket file, and may call `serve()`
  for its own.

The server's own files, beside the tracefs's:

    control/status      pid, versions, the socket, and the counters: clients, requests,
                        errors, refused (other users), busy (over MAX_CLIENTS), dropped
    kprobes/list        the debugfs file: every probe, its address and state
    debug/kprobes-optimization
                        the sysctl: 1 optimizes probes, 0 keeps (and makes) them
                        breakpoints (set_optimization); read and write
    symbols/SYMBOL      `ADDRESS  SYMBOL`: the code object `pkg.mod:Qual.name` runs now,
                        its address as kprobes/list prints addresses (the function's
                        `__code__` is the original again once its probes are gone)

`reset` disables and removes every event the server made: those written to kprobe_events
through it and those of running `trace` sessions (whose streams end with `end reset`).
"""

from __future__ import annotations

import _socket
import atexit
import errno
import os
import select
import sys
import threading
import time

from pykprobes.boot import warn
from pykprobes.control import paths, protocol
from pykprobes.control.protocol import ProtocolError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the boot stage may serve
if TYPE_CHECKING:
    from typing import Any

THREAD_NAME = "pykprobes-control"
#: The longest the server delays the process's exit.
EXIT_DELAY = 0.5
#: How often a streaming server takes the trace buffer's records.
STREAM_TICK = 0.05
#: A streaming client's unsent bytes beyond which its records are dropped (and counted).
MAX_BACKLOG = 4 * 1024 * 1024
LISTEN_BACKLOG = 128
#: Turns in a row that fail before the server gives up (and removes its socket).
MAX_FAILED_TURNS = 100
#: The sysctl debug.kprobes-optimization, as a file of the server's.
OPTIMIZATION = "debug/kprobes-optimization"
#: The partial-request clock's resolution.
_PARTIAL_TICK = 1.0

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
_POLLERR = select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Client:
    __slots__ = ("sock", "fd", "inbuf", "out", "partial_since", "stream", "as_json",
                 "session", "dropped", "closing", "mask", "uid")

    def __init__(self, sock: Any, uid: int) -> None:
        self.sock = sock
        self.fd: int = sock.fileno()
        self.uid = uid
        self.inbuf = bytearray()
        self.out = bytearray()
        self.partial_since: float | None = None
        #: "pipe" or "trace" while streaming, else None.
        self.stream: str | None = None
        self.as_json = False
        self.session: Any = None
        #: Records not sent because the client did not read them (said with a lost line).
        self.dropped = 0
        #: Close once `out` is sent.
        self.closing = False
        self.mask = 0


class Server:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.pid = os.getpid()
        self.path = paths.socket_path(directory, self.pid)
        self.clients: dict[int, _Client] = {}
        self.counters = {"clients": 0, "requests": 0, "errors": 0, "refused": 0,
                         "busy": 0, "dropped": 0}
        #: kprobe_events keys made through this server (for `reset`).
        self.made: set[tuple[str, str]] = set()
        self.fs: Any = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._listener: Any = None
        self._wake_r = self._wake_w = -1
        self._inode: tuple[int, int] | None = None
        self._poll = select.poll()

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Bind and listen at `self.path`, atomically: the socket gets its mode under a
        temporary name, then replaces whatever stale file had the name."""
        paths.remove_stale(self.directory)
        tmp = os.path.join(self.directory, f".{self.pid}.{os.urandom(4).hex()}.tmp")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            try:
                os.chmod(tmp, 0o600)
                # A backlog well above MAX_CLIENTS: a burst of connections is accepted and
                # told EBUSY, rather than refused EAGAIN by the kernel.
                sock.listen(LISTEN_BACKLOG)
                os.rename(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except BaseException:
            sock.close()
            raise
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        self._listener = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def start(self) -> None:
        self._poll.register(self._listener.fileno(), _POLLIN)
        self._poll.register(self._wake_r, _POLLIN)
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = EXIT_DELAY) -> None:
        """Stop serving (from any thread but the server's): the streams get their last
        records and `end exit`, the socket file is removed. Waits at most `timeout`."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._unlink()

    def _unlink(self) -> None:
        """Remove the socket file if it is still the one this server bound."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    def forget_in_child(self) -> None:
        """After fork(), in the child: close the copies of the server's descriptors, never
        touching the socket file (the parent's)."""
        self._stopping = True
        self._thread = None
        for fd in [c.fd for c in self.clients.values()]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.clients.clear()
        if self._listener is not None:
            self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        # The optimizer's thread does the same (core/optimizer.py): a trace function a
        # debugger or the 3.11 breakpoint arch installs for new threads has nothing to do
        # in NOPROBE code.
        sys.settrace(None)
        failures = 0
        try:
            while not self._stopping:
                try:
                    self._turn()
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - the program must not see it
                    # A bug of ours: counted and reported once; the server goes on unless
                    # it cannot get through a turn at all.
                    self.counters["errors"] += 1
                    failures += 1
                    if self.counters["errors"] == 1 or failures == MAX_FAILED_TURNS:
                        warn(f"the control server failed: {exc!r}")
                    if failures >= MAX_FAILED_TURNS:
                        break
        except BaseException as exc:  # noqa: BLE001 - the program must not see it
            warn(f"the control server stopped: {exc!r}")
        finally:
            self._finish()

    def _timeout(self) -> float | None:
        if any(c.stream for c in self.clients.values()):
            return STREAM_TICK
        if any(c.partial_since is not None for c in self.clients.values()):
            return _PARTIAL_TICK
        return None

    def _turn(self) -> None:
        timeout = self._timeout()
        try:
            ready = self._poll.poll(None if timeout is None else timeout * 1000)
        except InterruptedError:
            return
        listener = self._listener.fileno()
        for fd, mask in ready:
            if fd == self._wake_r:
                return
            if fd == listener:
                self._accept()
                continue
            c = self.clients.get(fd)
            if c is None:
                continue
            if mask & _POLLOUT:
                self._flush(c)
            if mask & (_POLLIN | _POLLERR) and fd in self.clients:
                self._receive(c)
        if any(c.stream for c in self.clients.values()):
            self._pump()
        self._expire()

    def _accept(self) -> None:
        try:
            fd, _ = self._listener._accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # EMFILE, ECONNABORTED: the peer tries again
        sock = _socket.socket(fileno=fd)
        sock.setblocking(False)
        try:
            cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
            uid = int.from_bytes(cred[4:8], sys.byteorder)
        except OSError:
            uid = -1
        if uid not in (os.geteuid(), 0):
            self.counters["refused"] += 1
            self._refuse(sock, errno.EACCES, f"uid {uid} may not use the control socket "
                                             f"of process {self.pid} (uid {os.geteuid()})")
            return
        if len(self.clients) >= protocol.MAX_CLIENTS:
            self.counters["busy"] += 1
            self._refuse(sock, errno.EBUSY, f"{protocol.MAX_CLIENTS} clients already: try "
                                            "again later")
            return
        c = _Client(sock, uid)
        self.clients[c.fd] = c
        self.counters["clients"] += 1
        self._watch(c)

    def _refuse(self, sock: Any, err: int, message: str) -> None:
        try:
            sock.send(protocol.error(err, message))
        except OSError:
            pass
        sock.close()

    def _watch(self, c: _Client) -> None:
        mask = _POLLIN | (_POLLOUT if c.out else 0)
        if mask == c.mask:
            return
        if c.mask:
            self._poll.modify(c.fd, mask)
        else:
            self._poll.register(c.fd, mask)
        c.mask = mask

    def _drop(self, c: _Client) -> None:
        """Close a client; a trace session's events go with it."""
        self.clients.pop(c.fd, None)
        if c.mask:
            try:
                self._poll.unregister(c.fd)
            except (KeyError, ValueError):
                pass
        if c.session is not None:
            self._end_session(c)
        c.sock.close()

    def _receive(self, c: _Client) -> None:
        try:
            chunk = c.sock.recv(protocol.MAX_REQUEST + protocol.HEADER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)
            return
        if not chunk:
            self._drop(c)
            return
        if c.closing:
            return  # an error reply is on its way out: nothing more is read
        c.inbuf += chunk
        while c.fd in self.clients and not c.closing:
            try:
                text = protocol.take_frame(c.inbuf, protocol.MAX_REQUEST)
            except ProtocolError as exc:
                self._protocol_error(c, exc)
                break
            if text is None:
                break
            self._request(c, text)
        c.partial_since = time.monotonic() if c.inbuf and not c.closing else None
        if c.fd in self.clients:
            self._flush(c)

    def _protocol_error(self, c: _Client, exc: ProtocolError) -> None:
        self.counters["errors"] += 1
        c.out += protocol.error(exc.errno, str(exc))
        if exc.fatal:
            c.closing = True
            c.inbuf.clear()

    def _expire(self) -> None:
        if not any(c.partial_since is not None for c in self.clients.values()):
            return
        now = time.monotonic()
        for c in list(self.clients.values()):
            if c.partial_since is not None and now - c.partial_since > protocol.PARTIAL_TIMEOUT:
                c.partial_since = None
                self._protocol_error(c, ProtocolError(
                    errno.ETIMEDOUT, f"an incomplete request for {protocol.PARTIAL_TIMEOUT:g} s",
                    fatal=True))
                self._flush(c)

    def _send(self, c: _Client, data: bytes) -> None:
        c.out += data
        self._flush(c)

    def _flush(self, c: _Client) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(c)
                return
            del c.out[:n]
        if not c.out and c.closing:
            self._drop(c)
            return
        self._watch(c)

    # ------------------------------------------------------------------ requests

    def _request(self, c: _Client, text: str) -> None:
        self.counters["requests"] += 1
        try:
            verb, arg, body = protocol.parse_request(text)
            self._first_request()
            if c.stream is not None and verb != "stop":
                raise ProtocolError(errno.EBUSY, f"a stream is running: send stop before "
                                                 f"{verb}")
            reply = self._dispatch(c, verb, arg, body)
        except ProtocolError as exc:
            self._protocol_error(c, exc)
            return
        except Exception as exc:  # noqa: BLE001 - an error reply, never the program's
            from pykprobes.errors import KprobeError

            self.counters["errors"] += 1
            if isinstance(exc, KprobeError):
                message = str(exc.args[0]) if exc.args else str(exc)
                c.out += protocol.error(exc.errno, message)
            else:
                c.out += protocol.error(errno.EIO, f"internal error: {exc!r}")
            return
        finally:
            # The 3.11 breakpoint arch arms with sys.settrace in the thread that registers:
            # this one runs no probe-able code, and must not pay for tracing.
            sys.settrace(None)
        if reply is not None:
            c.out += reply

    def _first_request(self) -> None:
        if self.fs is not None:
            return
        from pykprobes.core import registry
        from pykprobes.trace.tracefs import tracefs

        registry.init_kprobes()  # ends the early stage, as the seed's init_kprobes()
        self.fs = tracefs()

    def _dispatch(self, c: _Client, verb: str, arg: str, body: str) -> bytes | None:
        if verb == "read":
            if arg.strip("/") == "trace_pipe":
                # A blocking read has no place in the loop: the stream is `pipe`.
                return protocol.ok(self.fs.read_pipe(0))
            return protocol.ok(self._read(arg))
        if verb in ("write", "append"):
            if arg.strip("/") == OPTIMIZATION:
                _write_optimization(body)
                return protocol.ok()
            before = set(self.fs.events)
            try:
                self.fs.write(arg, body, append=verb == "append")
            finally:
                self.made |= set(self.fs.events) - before
                self.made &= set(self.fs.events)
            return protocol.ok()
        if verb == "pipe":
            c.stream, c.as_json = "pipe", arg == "json"
            return protocol.ok()
        if verb == "trace":
            from pykprobes.control.session import TraceSession

            session = TraceSession(self.fs)
            session.start(body)
            c.session, c.stream, c.as_json = session, "trace", arg == "json"
            return protocol.ok(session.names())
        if verb == "stop":
            if c.stream is None:
                raise ProtocolError(errno.EINVAL, "no stream to stop")
            self._pump()
            c.out += self._end_stream(c, "stop")
            return None
        if verb == "reset":
            return protocol.ok(str(self._reset()))
        raise ProtocolError(errno.EINVAL, f"unknown request {verb!r}")  # pragma: no cover

    def _read(self, path: str) -> str:
        name = path.strip("/")
        if name == "control/status":
            return self._status()
        if name == "kprobes/list":
            from pykprobes.core import registry

            return registry.list_kprobes()
        if name == OPTIMIZATION:
            from pykprobes.core import registry

            return f"{int(registry.optimization_enabled())}\n"
        if name.startswith("symbols/"):
            return _symbol_address(name[len("symbols/"):])
        return str(self.fs.read(name, timeout=0))

    def _status(self) -> str:
        from pykprobes._version import __version__
        from pykprobes.core import registry

        python = ".".join(map(str, sys.version_info[:3]))
        lines = [f"pid {self.pid}", f"python {python}",
                 f"pykprobes {__version__}", f"protocol {protocol.VERSION}",
                 f"socket {self.path}", f"early {int(registry.kprobes_is_early())}",
                 f"connected {len(self.clients)}", f"max_clients {protocol.MAX_CLIENTS}"]
        lines += [f"{k} {v}" for k, v in self.counters.items()]
        lines.append(f"events_made {len(self.made)}")
        return "\n".join(lines) + "\n"

    def _reset(self) -> int:
        """Disable and remove the events made through the server; end trace sessions."""
        n = 0
        for c in list(self.clients.values()):
            if c.session is not None:
                n += len(c.session.events)
                self._pump()
                c.out += self._end_stream(c, "reset")
                self._flush(c)
        for group, name in sorted(self.made):
            event = self.fs.find(name, group)
            if event is None:
                continue
            event.disable()
            self.fs.remove(name, group)
            n += 1
        self.made.clear()
        return n

    # ------------------------------------------------------------------ streams

    def _pump(self) -> None:
        """Take the buffer's records and queue each streaming client its part."""
        from pykprobes.control import stream

        batch = self.fs.buffer.read(block=False)
        if not batch and not batch.lost_at:
            return
        cache: dict[bool, str] = {}
        for c in list(self.clients.values()):
            if c.stream is None:
                continue
            events = None if c.session is None else c.session.events
            if len(c.out) > MAX_BACKLOG:
                # It does not read: its records are counted, not even formatted.
                dropped = stream.count(batch, events)
                c.dropped += dropped
                self.counters["dropped"] += dropped
                continue
            if events is None:
                text = cache.get(c.as_json)
                if text is None:
                    text = cache[c.as_json] = stream.render(batch, None, c.as_json)
            else:
                text = stream.render(batch, events, c.as_json)
            if not text:
                continue
            if c.dropped:
                text = stream.lost_line(c.dropped, c.as_json) + text
                c.dropped = 0
            self._send(c, protocol.data(text))

    def _end_stream(self, c: _Client, reason: str) -> bytes:
        """The `end` frame of a client's stream; a session's events are removed."""
        profile = ""
        if c.session is not None:
            profile = c.session.profile()
            self._end_session(c)
        c.stream = None
        if c.dropped:
            from pykprobes.control import stream

            c.out += protocol.data(stream.lost_line(c.dropped, c.as_json))
            c.dropped = 0
        return protocol.end(reason, profile)

    def _end_session(self, c: _Client) -> None:
        session, c.session = c.session, None
        try:
            session.close()
        except Exception as exc:  # noqa: BLE001 - counted; the program never sees it
            self.counters["errors"] += 1
            warn(f"removing a trace session's events failed: {exc!r}")

    def _finish(self) -> None:
        """The thread's last work: the streams' last records and `end exit`, sent within
        the exit delay; then every connection closed and the socket file removed."""
        deadline = time.monotonic() + EXIT_DELAY * 0.8
        try:
            if self.fs is not None and any(c.stream for c in self.clients.values()):
                self._pump()
                for c in list(self.clients.values()):
                    if c.stream is not None:
                        c.out += self._end_stream(c, "exit")
                        self._flush(c)
            while any(c.out for c in self.clients.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                for fd, _ in self._poll.poll(left * 1000):
                    waiting = self.clients.get(fd)
                    if waiting is not None:
                        self._flush(waiting)
        except Exception as exc:  # noqa: BLE001 - at exit: report, never raise
            warn(f"the control server's last streams failed: {exc!r}")
        for c in list(self.clients.values()):
            self._drop(c)
        self._listener.close()
        self._unlink()


def _write_optimization(text: str) -> None:
    from pykprobes.core import registry
    from pykprobes.errors import KprobeError

    value = text.strip()
    if value not in ("0", "1"):
        raise KprobeError(errno.EINVAL, f"expected 0 or 1, not {text!r}")
    registry.set_optimization(value == "1")


def _symbol_address(symbol: str) -> str:
    """`ADDRESS  SYMBOL` for the code a function of an imported module runs now, found as
    a probe's target is (core/resolve.py: no property or __getattr__ of the program runs)."""
    from pykprobes.core import resolve
    from pykprobes.errors import KprobeError

    module, qualname = resolve.split_symbol(symbol)
    mod = sys.modules.get(module)
    if mod is None:
        raise KprobeError(errno.ENOENT, f"module {module!r} is not imported")
    code = resolve.resolve_imported(mod, qualname).code
    return f"{id(code):016x}  {symbol}\n"


# ---------------------------------------------------------------------- the process's server

_server: Server | None = None
_lock = threading.Lock()
_hooks_installed = False


def serve() -> str:
    """Serve this process's tracefs on its control socket (once: later calls return the
    same path). Returns the socket's path; raises OSError (paths.UnsafeDirectory for a
    directory that is not private) when it cannot."""
    global _server, _hooks_installed
    with _lock:
        server = _server
        if server is not None and server.pid == os.getpid() and not server._stopping:
            return server.path
        server = Server(paths.control_dir())
        server.bind()
        server.start()
        _server = server
        if not _hooks_installed:
            _hooks_installed = True
            atexit.register(_at_exit)
            os.register_at_fork(after_in_child=_after_fork_in_child)
        return server.path


def serving() -> str | None:
    """The socket path this process serves, or None."""
    server = _server
    if server is None or server._stopping or server.pid != os.getpid():
        return None
    return server.path


def stop() -> None:
    """Stop serving (the socket file is removed); `serve()` may start again."""
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None and server.pid == os.getpid():
        server.stop()


def _at_exit() -> None:
    server = _server
    if server is not None and server.pid == os.getpid():
        server.stop()


def _after_fork_in_child() -> None:
    global _server, _lock
    # The parent's server thread may have held the lock at fork(): a new one.
    _lock = threading.Lock()
    server, _server = _server, None
    if server is not None:
        server.forget_in_child()
