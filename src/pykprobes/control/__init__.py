"""The control layer: a running process's tracefs, served over a Unix socket, its client,
and the attach that starts the server in a process that did not ask for it.

    server.py     the control server (one daemon thread, NOPROBE) and `serve()`
    protocol.py   the frames and requests it answers
    session.py    a `trace` request: events made, enabled and removed together
    stream.py     trace_pipe records rendered for each streaming client
    paths.py      where sockets live ($XDG_RUNTIME_DIR/pykprobes or /tmp/pykprobes-UID)
    client.py     the client: find a process's socket, connect, request, stream
    procs.py      the Python processes of this machine, read from /proc
    attach.py     PEP 768 (3.14+): `sys.remote_exec` of bootstrap.py's script

A process is served when it asks: `PYKPROBES_CONTROL=1` (the boot stage starts the server),
`pykprobes run --control`, or `pykprobes.control.serve()`; or, on CPython 3.14 and later,
when `pykprobes attach PID` (or any `pykprobes -p PID ...`) runs the bootstrap in it.

Importing this package imports nothing else: the attach bootstrap and the boot stage import
it in the program's main thread.
"""

from __future__ import annotations


def serve() -> str:
    """Serve this process's tracefs on its control socket (idempotent); returns the
    socket's path. Raises OSError when no private directory can hold it."""
    from pykprobes.control import server

    return server.serve()


def stop() -> None:
    """Stop serving and remove the socket file."""
    from pykprobes.control import server

    server.stop()


__all__ = ["serve", "stop"]
