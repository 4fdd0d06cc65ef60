"""The commands on a running process: `ls`, `attach`, and `-p PID` `trace`, `cat`, `write`,
`pipe`, `reset` (bpftrace's `-p` habits, over the target's control socket).

    pykprobes ls [-a]                                   Python processes one can attach to
    pykprobes attach PID                                start PID's control server (PEP 768)
    pykprobes -p PID trace -e DEF [-e DEF ...] [--filter EVENT=EXPR] [--format json]
                           [-o FILE] [--duration S]     define, enable, stream, remove
    pykprobes -p PID cat FILE                           read a tracefs file
    pykprobes -p PID write [-a] FILE TEXT|-             write (append) one; - reads stdin
    pykprobes -p PID pipe [--format json] [-o FILE] [--duration S]   stream trace_pipe
    pykprobes -p PID reset                              remove what the control server made

A process that serves no control socket is attached first where PEP 768 allows it (CPython
3.14+, same minor version as this one). Every refusal is one line, exit 1; a bad definition
is the kernel's message and a caret, exit 1.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from pykprobes.cli.errors import print_write_error

#: How often a stream wakes to look at the clock (--duration) when no record comes.
_TICK = 0.1
#: How long a stopping stream waits for the last records and the profile.
_STOP_WAIT = 5.0


def add_parsers(commands: Any) -> None:
    ls = commands.add_parser(
        "ls", help="list the Python processes of this user one can attach to",
        description="List this user's Python processes that pykprobes can attach to: pid, "
                    "Python version, how (a control socket, or PEP 768), command line.")
    ls.add_argument("-a", "--all", action="store_true",
                    help="also the processes one cannot attach to, with the reason")
    ls.set_defaults(func=cmd_ls)

    attach = commands.add_parser(
        "attach", help="start the control server in a running Python 3.14+ (PEP 768)",
        description="Start the control server in process PID through PEP 768 "
                    "(sys.remote_exec) and print its socket's path.")
    attach.add_argument("target_pid", type=int, metavar="PID")
    _attach_timeout(attach)
    attach.set_defaults(func=cmd_attach)

    trace = commands.add_parser(
        "trace", help="trace events in a running process (-p PID)",
        description="Define and enable events in process PID, stream their records until "
                    "Ctrl-C, the duration or the process's exit, then remove them: the "
                    "process's code objects are the originals again.")
    _pid(trace)
    trace.add_argument("-e", "--event", action="append", default=[], metavar="DEF",
                       required=True, help="a kprobe_events definition (repeatable)")
    trace.add_argument("--filter", action="append", default=[], metavar="EVENT=EXPR",
                       help="an ftrace filter for one of the events (repeatable)")
    trace.add_argument("--format", choices=("text", "json"), default="text")
    trace.add_argument("-o", "--output", metavar="FILE", help="write the records here")
    trace.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    _attach_timeout(trace)
    trace.set_defaults(func=cmd_trace)

    cat = commands.add_parser("cat", help="read a tracefs file of a running process (-p PID)",
                              description="Print a tracefs file of process PID "
                                          "(kprobe_events, trace, kprobe_profile, "
                                          "events/GRP/EVENT/format, ...).")
    _pid(cat)
    cat.add_argument("file", metavar="FILE")
    _attach_timeout(cat)
    cat.set_defaults(func=cmd_cat)

    write = commands.add_parser("write", help="write a tracefs file of a running process "
                                              "(-p PID)",
                                description="Write TEXT (stdin for -) to a tracefs file of "
                                            "process PID, as `echo TEXT > FILE` (with -a: "
                                            "`>> FILE`).")
    _pid(write)
    write.add_argument("-a", "--append", action="store_true", help="append, as >> does")
    write.add_argument("file", metavar="FILE")
    write.add_argument("text", metavar="TEXT")
    _attach_timeout(write)
    write.set_defaults(func=cmd_write)

    pipe = commands.add_parser("pipe", help="stream trace_pipe of a running process (-p PID)",
                               description="Stream process PID's trace_pipe until Ctrl-C, "
                                           "the duration or the process's exit.")
    _pid(pipe)
    pipe.add_argument("--format", choices=("text", "json"), default="text")
    pipe.add_argument("-o", "--output", metavar="FILE", help="write the records here")
    pipe.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    _attach_timeout(pipe)
    pipe.set_defaults(func=cmd_pipe)

    reset = commands.add_parser("reset", help="remove the events the control server made "
                                              "(-p PID)",
                                description="Disable and remove every event the control "
                                            "server of process PID made.")
    _pid(reset)
    _attach_timeout(reset)
    reset.set_defaults(func=cmd_reset)


def _pid(parser: argparse.ArgumentParser) -> None:
    # Also after the command (`trace -p PID`); SUPPRESS keeps the global `-p` otherwise.
    parser.add_argument("-p", "--pid", type=int, default=argparse.SUPPRESS, metavar="PID",
                        help="the process (also accepted before the command)")


def _attach_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attach-timeout", type=float, default=5.0, metavar="S",
                        help="how long to wait for a PEP 768 attach (default 5)")


def _fail(message: str) -> int:
    print(f"pykprobes: error: {message}", file=sys.stderr)
    return 1


@contextlib.contextmanager
def _connection(args: argparse.Namespace) -> Iterator[Any]:
    from pykprobes.control.client import connect

    pid = getattr(args, "pid", None)
    if pid is None:
        raise _Usage(f"{args.command} needs a process: pykprobes -p PID {args.command} ...")
    conn = connect(pid, attach_timeout=args.attach_timeout)
    try:
        yield conn
    finally:
        conn.close()


class _Usage(Exception):
    pass


def _run(args: argparse.Namespace, body: Any, streaming: bool = False) -> int:
    """Run `body(conn)` on a connection to -p PID; ControlError becomes one line (and
    the caret lines of a definition), exit 1. A stream whose process exits ends, exit 0."""
    from pykprobes.control.client import ControlError
    from pykprobes.errors import KprobeError

    try:
        with _connection(args) as conn:
            result: int = body(conn)
            return result
    except _Usage as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        # Before a stream began (attaching, defining): the connection closes, and the
        # server removes whatever a trace had made.
        return 130
    except ControlError as exc:
        if exc.errno in (errno.ECONNRESET, errno.EPIPE) and _exited(args.pid):
            print(f"pykprobes: process {args.pid} exited", file=sys.stderr)
            return 0 if streaming else 1
        print_write_error(KprobeError(exc.errno, str(exc)))
        return 1


def _exited(pid: int, wait: float = 2.0) -> bool:
    """Whether `pid` is exiting: a process's sockets close before it is a zombie (the
    kernel's do_exit closes its files first), so give it a moment."""
    from pykprobes.control.paths import alive

    deadline = time.monotonic() + wait
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---------------------------------------------------------------------- ls, attach


def cmd_ls(args: argparse.Namespace) -> int:
    from pykprobes.control import attach, client, procs

    served = client.served_pids()
    rows = []
    for proc in procs.python_processes(os.geteuid()):
        assert proc.version is not None
        how = "control socket" if proc.pid in served else None
        if how is None:
            try:
                attach.check(proc.pid)
                how = "PEP 768"
            except attach.AttachError as exc:
                if not args.all:
                    continue
                how = f"no: {str(exc).split(': ', 1)[-1].split(';')[0]}"
        rows.append((str(proc.pid), f"{proc.version[0]}.{proc.version[1]}", how,
                     proc.command))
    widths = [max([len(r[i]) for r in rows] + [len(h)])
              for i, h in enumerate(("PID", "PYTHON", "HOW"))]
    print(f"{'PID':>{widths[0]}}  {'PYTHON':<{widths[1]}}  {'HOW':<{widths[2]}}  COMMAND")
    for pid, version, how, command in rows:
        print(f"{pid:>{widths[0]}}  {version:<{widths[1]}}  {how:<{widths[2]}}  {command}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    from pykprobes.control import client
    from pykprobes.control.attach import attach
    from pykprobes.control.client import ControlError

    try:
        path = client.find_socket(args.target_pid) or attach(args.target_pid,
                                                             args.attach_timeout)
    except ControlError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130
    print(path)
    return 0


# ---------------------------------------------------------------------- -p PID commands


def cmd_cat(args: argparse.Namespace) -> int:
    if args.file.strip("/") == "trace_pipe":
        return _stream(args, "pipe", "text", None)

    def body(conn: Any) -> int:
        sys.stdout.write(conn.read(args.file))
        sys.stdout.flush()
        return 0

    return _run(args, body)


def cmd_write(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text

    def body(conn: Any) -> int:
        conn.write(args.file, text, append=args.append)
        return 0

    return _run(args, body)


def cmd_reset(args: argparse.Namespace) -> int:
    def body(conn: Any) -> int:
        n = conn.request("reset")
        print(f"removed {n} events", file=sys.stderr)
        return 0

    return _run(args, body)


def cmd_pipe(args: argparse.Namespace) -> int:
    return _stream(args, "pipe", args.format, None)


def cmd_trace(args: argparse.Namespace) -> int:
    lines = [f"event {d}" for d in args.event]
    for item in args.filter:
        name, sep, expr = item.partition("=")
        if not sep or not name.strip():
            return _fail(f"--filter wants EVENT=EXPR, not {item!r}")
        lines.append(f"filter {name.strip()} {expr}")
    return _stream(args, "trace", args.format, "\n".join(lines))


def _stream(args: argparse.Namespace, verb: str, form: str, body: str | None) -> int:
    pid: int = getattr(args, "pid", None) or 0  # (checked by _connection)
    deadline = None if getattr(args, "duration", None) is None else \
        time.monotonic() + args.duration

    def run(conn: Any) -> int:
        names = conn.request(verb, form, body)
        if verb == "trace":
            print(f"pykprobes: tracing {names} in process {pid}; Ctrl-C to stop",
                  file=sys.stderr)
        output = getattr(args, "output", None)
        out: TextIO = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115 - closed below
        try:
            return _follow(conn, out, pid, deadline)
        finally:
            if out is not sys.stdout:
                out.close()

    # SIGTERM ends the stream as Ctrl-C does: the events are removed either way (the server
    # removes a trace's events when its connection closes), but this way the last records
    # and the profile are written.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args, run, streaming=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _follow(conn: Any, out: TextIO, pid: int, deadline: float | None) -> int:
    """Write the stream's records until it ends; Ctrl-C, the deadline or a closed output
    send `stop`, and the last records and the profile follow."""
    stopping = False
    stop_by = 0.0
    while True:
        try:
            for kind, text in conn.stream(_TICK):
                if kind == "data":
                    out.write(text)
                    out.flush()
                elif kind == "end":
                    return _ended(text, pid)
                now = time.monotonic()
                if stopping and now > stop_by:
                    return 0
                if not stopping and deadline is not None and now >= deadline:
                    stopping, stop_by = True, now + _STOP_WAIT
                    conn.send("stop")
        except KeyboardInterrupt:
            if stopping:
                return 130
            stopping, stop_by = True, time.monotonic() + _STOP_WAIT
            conn.send("stop")
        except BrokenPipeError:
            # The reader of our output went away (`| head`): stop quietly.
            with contextlib.suppress(OSError):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the interpreter's exit
                conn.send("stop")
            return 0


def _ended(text: str, pid: int) -> int:
    reason, _, profile = text.partition("\n")
    if reason == "exit":
        print(f"pykprobes: process {pid} exited", file=sys.stderr)
    elif reason == "reset":
        print(f"pykprobes: the events were removed by a reset of process {pid}",
              file=sys.stderr)
    if profile:
        sys.stderr.write(profile)
    return 0
