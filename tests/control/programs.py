"""The long-running programs the control tests attach to (written to a file and run by a
real interpreter in a subprocess)."""

from __future__ import annotations

#: A standard-library HTTP server answering on a loopback port, with CPU-bound worker
#: threads. The main thread runs serve_forever (it polls: PEP 768 reaches it within
#: POLL seconds). One line on stdin ("quit") shuts it down; it then says whether its
#: functions run their original code objects, and exits 0.
#:
#: Prints `ready PID PORT` once serving. SERVE=1 in the environment: it calls
#: pykprobes.control.serve() itself (the API route), with the server's MAX_BACKLOG set to
#: MAX_BACKLOG bytes when that is set too.
SERVICE = '''
import http.server, os, sys, threading

POLL = 0.1


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = ("ok " + self.path + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


stop = threading.Event()
rounds = [0, 0]


def crunch(n):
    total = 0
    while not stop.is_set():
        for i in range(2000):
            total += i * i  # LOOP LINE
        rounds[n] += 1
    return total


ORIGINAL = {"do_GET": Handler.do_GET.__code__, "crunch": crunch.__code__}


def quit_on_stdin(server):
    sys.stdin.readline()
    server.shutdown()


def main():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    workers = [threading.Thread(target=crunch, args=(n,), name="worker-%d" % n)
               for n in range(2)]
    for w in workers:
        w.start()
    if os.environ.get("SERVE"):
        import pykprobes.control
        from pykprobes.control import server as control_server
        if os.environ.get("MAX_BACKLOG"):
            control_server.MAX_BACKLOG = int(os.environ["MAX_BACKLOG"])
        pykprobes.control.serve()
    threading.Thread(target=quit_on_stdin, args=(server,), daemon=True).start()
    print("ready", os.getpid(), server.server_address[1], flush=True)
    server.serve_forever(poll_interval=POLL)
    stop.set()
    for w in workers:
        w.join()
    server.server_close()
    print("original", Handler.do_GET.__code__ is ORIGINAL["do_GET"],
          crunch.__code__ is ORIGINAL["crunch"], "rounds", min(rounds) > 0, flush=True)


if __name__ == "__main__":
    main()
'''

#: The line of SERVICE's loop (`total += i * i`), 1-based.
LOOP_LINE = SERVICE.lstrip("\n").splitlines().index(
    "            total += i * i  # LOOP LINE") + 1

#: A small program whose main thread loops in Python, running `work(i)` (which calls
#: json.dumps) in a new thread named `work` every TICK seconds, as a server starts a thread
#: per request (a breakpoint arch that reaches only threads started after the probe, 3.11's
#: settrace, sees these calls too). Prints `ready PID`. Lines on stdin: `fork` makes the main thread
#: fork a child (below); `quit` ends it: it prints whether `work` runs its original code and
#: whether sys.path is what it was, and exits 0.
#:
#: SERVE=1 in the environment: it serves its control socket itself (pykprobes.control);
#: PARTIAL_TIMEOUT=S sets the server's incomplete-request timeout first.
#:
#: The child of `fork` prints `child PID FDS` (FDS: how many of its descriptors are the
#: parent's listening socket), serves its own socket, prints `child-serves PATH`, and exits
#: (normally: atexit runs) when the file named by CHILD_EXIT exists.
LOOPER = '''
import json, os, sys, threading, time, warnings

TICK = 0.005
done = threading.Event()
fork = threading.Event()
PATH0 = list(sys.path)


def work(i):
    return json.dumps({"i": i})


ORIGINAL = work.__code__


def commands():
    for line in sys.stdin:
        if line.strip() == "fork":
            fork.set()
        else:
            break
    done.set()


def socket_inode(path):
    return "socket:[%d]" % os.stat(path).st_ino


def child(listening):
    fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds += os.readlink("/proc/self/fd/" + fd) == listening
        except OSError:
            pass
    print("child", os.getpid(), fds, flush=True)
    import pykprobes.control
    print("child-serves", pykprobes.control.serve(), flush=True)
    while not os.path.exists(os.environ["CHILD_EXIT"]):
        time.sleep(0.01)
    sys.exit(0)


def main():
    if os.environ.get("PARTIAL_TIMEOUT"):
        from pykprobes.control import protocol
        protocol.PARTIAL_TIMEOUT = float(os.environ["PARTIAL_TIMEOUT"])
    if os.environ.get("SERVE"):
        import pykprobes.control
        pykprobes.control.serve()
    threading.Thread(target=commands, daemon=True).start()
    print("ready", os.getpid(), flush=True)
    i = 0
    while not done.is_set():
        i += 1
        t = threading.Thread(target=work, args=(i,), name="work")
        t.start()
        t.join()
        time.sleep(TICK)
        if fork.is_set():
            fork.clear()
            from pykprobes.control import server
            listening = socket_inode(server.serving())
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads
            if os.fork() == 0:
                child(listening)
    print("original", work.__code__ is ORIGINAL, "path", sys.path == PATH0, flush=True)


if __name__ == "__main__":
    main()
'''
