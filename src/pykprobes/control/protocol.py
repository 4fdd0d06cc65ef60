"""The control socket's protocol: frames carrying requests on the tracefs files.

Every message, either way, is one **frame**: a 4-byte big-endian unsigned length N, then N
bytes of UTF-8. The first line of a frame (up to the first LF, or all of it) is its head;
what follows the LF is its body.

Requests (client -> server), one reply each unless said otherwise:

    read PATH                       ok LF CONTENT            (`cat PATH`)
    write PATH LF TEXT              ok                       (`echo TEXT > PATH`)
    append PATH LF TEXT             ok                       (`echo TEXT >> PATH`)
    pipe [text|json]                a stream (below)         (`cat trace_pipe`)
    trace [text|json] LF LINES      ok LF NAMES, a stream    define, filter, enable; removed
                                                             when the stream ends
    stop                            (ends a stream: below)
    reset                           ok LF N                  remove what this server made

`PATH` is a tracefs file (trace/tracefs.py: kprobe_events, events/GRP/EVENT/enable, trace,
...) or one of the server's own (server.py: control/status, kprobes/list, symbols/SYMBOL).
The LINES of `trace` are `event DEFINITION` and `filter GRP/EVENT EXPRESSION`, one a line;
NAMES are the events it made, `GRP/EVENT` separated by spaces.

Replies (server -> client):

    ok [LF BODY]
    error ERRNO LF MESSAGE          ERRNO as the kernel's write would return it (22: EINVAL);
                                    MESSAGE may span lines (a definition and a caret)
    data LF TEXT                    stream records (trace_pipe lines, or JSON lines)
    end LF REASON                   the stream is over: `stop` (the client asked; the body
                                    then has the kprobe_profile of a trace's events after
                                    the REASON line) or `exit` (the process is exiting)

A stream sends `data` frames until the client sends `stop` (answered by `end`, after the
last records) or the process exits (`end` with `exit`); the connection then takes requests
again. A client that closes its connection ends its stream too, and the events its `trace`
made are removed all the same.

Limits: a request frame holds at most MAX_REQUEST bytes; at most MAX_CLIENTS connections are
served at a time; a request must arrive whole within PARTIAL_TIMEOUT seconds of its first
byte. A request over the limit, malformed (not UTF-8, empty, unknown verb) or incomplete in
time is answered `error` and changes nothing; an oversized or incomplete frame also closes
the connection (the stream cannot be resynchronised), and so does a connection beyond the
limit (`error 16` EBUSY) or from another user (`error 13` EACCES). Replies may be large (a
`read trace` of a big buffer); clients accept up to MAX_REPLY bytes.

Standard library only.
"""

from __future__ import annotations

import errno

#: The protocol's version, in `control/status` (`protocol 1`).
VERSION = 1

HEADER = 4
MAX_REQUEST = 64 * 1024
MAX_REPLY = 256 * 1024 * 1024
MAX_CLIENTS = 16
PARTIAL_TIMEOUT = 10.0

#: The requests a server knows.
VERBS = frozenset(("read", "write", "append", "pipe", "trace", "stop", "reset"))
#: The stream formats.
FORMATS = ("text", "json")


class ProtocolError(Exception):
    """A frame or request that breaks the protocol: `errno` for the error reply."""

    def __init__(self, err: int, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.errno = err
        #: The connection cannot go on (the frame boundaries are lost).
        self.fatal = fatal


def frame(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    return len(data).to_bytes(HEADER, "big") + data


def split(text: str) -> tuple[str, str]:
    """A frame's (head, body)."""
    head, _, body = text.partition("\n")
    return head, body


def ok(body: str | None = None) -> bytes:
    return frame("ok" if body is None else f"ok\n{body}")


def error(err: int, message: str) -> bytes:
    return frame(f"error {err}\n{message}")


def data(text: str) -> bytes:
    return frame(f"data\n{text}")


def end(reason: str, body: str = "") -> bytes:
    return frame(f"end\n{reason}\n{body}" if body else f"end\n{reason}")


def take_frame(buf: bytearray, limit: int) -> str | None:
    """Take one whole frame from the front of `buf` (None: not all there yet). Raises
    ProtocolError for a frame over `limit` (fatal) or that is not UTF-8."""
    if len(buf) < HEADER:
        return None
    n = int.from_bytes(buf[:HEADER], "big")
    if n > limit:
        raise ProtocolError(errno.E2BIG, f"a frame of {n} bytes: the limit is {limit}",
                            fatal=True)
    if len(buf) < HEADER + n:
        return None
    raw = bytes(buf[HEADER:HEADER + n])
    del buf[:HEADER + n]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(errno.EINVAL, f"the request is not UTF-8 ({exc.reason} at byte "
                                          f"{exc.start})") from None


def parse_request(text: str) -> tuple[str, str, str]:
    """A request's (verb, argument, body); ProtocolError for a malformed or unknown one."""
    head, body = split(text)
    verb, _, arg = head.strip().partition(" ")
    if not verb:
        raise ProtocolError(errno.EINVAL, "an empty request")
    if verb not in VERBS:
        raise ProtocolError(errno.EINVAL, f"unknown request {verb[:40]!r}: one of "
                                          f"{', '.join(sorted(VERBS))}")
    arg = arg.strip()
    if verb in ("read", "write", "append") and not arg:
        raise ProtocolError(errno.EINVAL, f"{verb} needs a file")
    if verb in ("pipe", "trace") and arg not in ("", *FORMATS):
        raise ProtocolError(errno.EINVAL, f"{verb}: the format is text or json, not "
                                          f"{arg[:40]!r}")
    return verb, arg, body


def parse_reply(text: str) -> tuple[str, int, str]:
    """A reply's (kind, errno, body): kind is ok, error, data or end."""
    head, body = split(text)
    kind, _, rest = head.partition(" ")
    if kind == "error":
        try:
            return kind, int(rest), body
        except ValueError:
            return kind, 5, body  # EIO: a reply we cannot read
    return kind, 0, body
