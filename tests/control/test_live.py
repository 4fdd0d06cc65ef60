"""Attach to a real long-running program while it works: a standard-library
ThreadingHTTPServer answering a loopback client in a loop, with CPU-bound worker threads.

Trace events on the request handler (with `self.path`) and on a line of a loop that is
already running in the workers, then detach: every request is answered, the latency before,
during and after is measured and printed, and every probed function's `__code__` is the
original object again (read inside the target through the control server, and checked by the
program itself as it exits). On CPython 3.14+ the program has no opt-in and never imported
pykprobes (PEP 768); before 3.14 it opts in with PYKPROBES_CONTROL=1.
"""

from __future__ import annotations

import http.client
import signal
import statistics
import threading
import time
from typing import Any

from tests.control.conftest import HAS_REMOTE_EXEC, LINE, cli, cli_popen, connect
from tests.control.programs import LOOP_LINE, SERVICE
from tests.testenv import BREAKPOINT_CAPS


class LoopbackClient:
    """GET /req/N in a loop, one connection each, recording (phase, seconds, answered)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.phase = "before"
        self.results: list[tuple[str, float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            phase = self.phase
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("GET", f"/req/{n}")
                resp = conn.getresponse()
                ok = resp.status == 200 and resp.read() == f"ok /req/{n}\n".encode()
                conn.close()
            except OSError:
                ok = False
            self.results.append((phase, time.perf_counter() - t0, ok))
            time.sleep(0.002)

    def count(self, phase: str) -> int:
        return sum(1 for p, _, _ in self.results if p == phase)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def report(self) -> str:
        rows = []
        for phase in ("before", "during", "after"):
            lat = sorted(s for p, s, _ in self.results if p == phase)
            if not lat:
                continue
            p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            rows.append(f"{phase:>6}: {len(lat):4d} requests, median "
                        f"{statistics.median(lat) * 1e3:6.2f} ms, p99 {p99 * 1e3:6.2f} ms, "
                        f"max {lat[-1] * 1e3:6.2f} ms")
        return "\n".join(rows)


def _wait_requests(client: LoopbackClient, phase: str, n: int, seconds: float) -> None:
    t0 = time.monotonic()
    while client.count(phase) < n or time.monotonic() - t0 < seconds:
        assert time.monotonic() - t0 < 60, f"only {client.count(phase)} requests {phase}"
        time.sleep(0.02)


class Reader:
    """Reads a streaming CLI's output in threads: its records, and when each event first
    came after the events were enabled (the CLI's `tracing ...` line)."""

    def __init__(self, proc: Any) -> None:
        self.enabled: float | None = None
        self.first: dict[str, float] = {}
        self.lines: list[str] = []
        self.err: list[str] = []
        self._threads = [threading.Thread(target=f, args=(proc,), daemon=True)
                         for f in (self._out, self._err)]
        for t in self._threads:
            t.start()

    def _out(self, proc: Any) -> None:
        for line in proc.stdout:
            now = time.monotonic()
            self.lines.append(line)
            m = LINE.match(line)
            if m:
                self.first.setdefault(m["event"], now)

    def _err(self, proc: Any) -> None:
        for line in proc.stderr:
            if self.enabled is None and line.startswith("pykprobes: tracing "):
                self.enabled = time.monotonic()
            self.err.append(line)

    def delays(self) -> dict[str, float]:
        assert self.enabled is not None
        return {e: round(max(t - self.enabled, 0.0), 3) for e, t in self.first.items()}

    def join(self) -> None:
        for t in self._threads:
            t.join(60)


def test_trace_a_live_http_server_and_cpu_workers(start_target: Any) -> None:
    if HAS_REMOTE_EXEC:
        # -S: no site-packages, so no pykprobes; no opt-in either.
        target = start_target(SERVICE, serve=None, python_args=("-S",))
        attach = cli("attach", str(target.pid))
        assert attach.returncode == 0, attach.stderr
    else:
        target = start_target(SERVICE, serve="env")
    port = int(target.words[2])
    client = LoopbackClient(port)
    try:
        _wait_requests(client, "before", 10, 0.5)
        symbols = ("symbols/__main__:Handler.do_GET", "symbols/__main__:crunch")
        with connect(target.pid) as conn:
            before = [conn.read(s) for s in symbols]
        client.phase = "during"
        proc = cli_popen("-p", str(target.pid), "trace",
                         "-e", "p:http/get __main__:Handler.do_GET path=self.path",
                         "-e", f"p:work/loop {target.path}:{LOOP_LINE} total i",
                         "--filter", "loop=i == 0")
        reader = Reader(proc)
        # A loop already running in other threads is reached by a breakpoint arch that
        # reaches running frames there (sys.monitoring; not 3.11's settrace).
        events = {"get", "loop"} if BREAKPOINT_CAPS.running_frames_other_threads \
            else {"get"}
        t0 = time.monotonic()
        while not events <= set(reader.first):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() - t0 < 30, f"no records of {events - set(reader.first)}"
            time.sleep(0.01)
        _wait_requests(client, "during", 10, 0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        reader.join()
        err = "".join(reader.err)
        client.phase = "after"
        _wait_requests(client, "after", 10, 0.5)
    finally:
        client.stop()
    print(f"\nfirst record of each event after they were enabled: {reader.delays()} s")
    print(client.report())

    failed = [r for r in client.results if not r[2]]
    assert failed == [] and len(client.results) >= 30
    gets = [ln for ln in reader.lines if " get: " in ln]
    assert gets and all(' path="/req/' in ln for ln in gets)
    if "loop" in events:
        loops = [ln for ln in reader.lines if " loop: " in ln]
        assert loops and all(ln.lstrip().startswith("worker-") and " i=0" in ln
                             for ln in loops)
    profile = dict(ln.split()[:2] for ln in err.splitlines()[-2:])
    assert int(profile["get"]) >= len(gets)
    with connect(target.pid) as conn:
        assert [conn.read(s) for s in symbols] == before
        assert conn.read("kprobe_events") == "" and conn.read("kprobes/list") == ""
    code, out, _ = target.quit()
    assert (code, out.split()) == (0, ["original", "True", "True", "rounds", "True"])
