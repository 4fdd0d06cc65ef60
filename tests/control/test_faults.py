"""Faults around a served process: a client killed while it streams, the process exiting (or
killed) while a client streams, the process forking, two attachers at once. The process
never notices; its code objects end as they began."""

from __future__ import annotations

import http.client as http_client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pykprobes.control import protocol
from tests.control.conftest import (
    HAS_REMOTE_EXEC,
    child_env,
    cli,
    cli_popen,
    connect,
    interrupt,
    records,
    status,
    wait_for,
)
from tests.control.programs import LOOP_LINE, LOOPER, SERVICE
from tests.testenv import BREAKPOINT_CAPS

ORIGINAL = ["original", "True", "path", "True"]


def _first_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The first stdout line of a streaming CLI (liveness bound: `timeout`)."""
    import select

    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no record came"
    return proc.stdout.readline()


@pytest.mark.parametrize("command", ["trace", "pipe"])
def test_a_client_killed_mid_stream(start_target: Any, command: str) -> None:
    target = start_target(LOOPER)
    with connect(target.pid) as conn:
        before = conn.read("symbols/__main__:work")
        if command == "pipe":
            conn.write("kprobe_events", "p:w/work __main__:work i", append=True)
            conn.write("events/w/work/enable", "1")
            args = ["pipe"]
        else:
            args = ["trace", "-e", "p:w/work __main__:work i"]
        proc = cli_popen("-p", str(target.pid), *args)
        assert "work: (__main__:work+0)" in _first_line(proc)
        proc.kill()
        proc.communicate(timeout=30)
        # The server sees the connection close: a trace's events go with it.
        wait_for(lambda: status(conn)["connected"] == "1", 30, "the server dropping it")
        if command == "trace":
            assert conn.read("kprobe_events") == "" and conn.read("kprobes/list") == ""
            assert conn.read("symbols/__main__:work") == before
        else:
            assert conn.read("events/w/work/enable") == "1\n"  # a pipe owns no event
            conn.request("reset")
        # The next client streams as if nothing happened.
        res = cli("-p", str(target.pid), "trace", "-e", "p:w/again __main__:work i",
                  "--duration", "0.3")
        assert res.returncode == 0 and "again: (" in res.stdout, res.stderr
        assert conn.read("symbols/__main__:work") == before
    code, out, err = target.quit()
    assert (code, out.split()) == (0, ORIGINAL), err


def test_the_target_exits_while_a_client_streams(start_target: Any, runtime_dir: Path
                                                 ) -> None:
    target = start_target(LOOPER)
    proc = cli_popen("-p", str(target.pid), "trace", "-e", "p:w/work __main__:work i")
    assert "work:" in _first_line(proc)
    t0 = time.monotonic()
    code, out, _ = target.quit()
    exited = time.monotonic() - t0
    # (Its functions were still probed when it printed: the trace ends with the process.)
    assert code == 0 and out.startswith("original")
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.read()
    err = proc.stderr.read()
    assert proc.wait(30) == 0, err
    # The stream ended with the server's `end exit`, which carries the profile (a connection
    # that merely broke would not).
    assert f"process {target.pid} exited" in err
    assert err.splitlines()[-1].split()[0] == "work"
    assert not (runtime_dir / "pykprobes" / f"{target.pid}.sock").exists()
    print(f"\nthe target's exit with a client streaming took {exited:.3f} s")


def test_the_target_killed_while_a_client_streams(start_target: Any, runtime_dir: Path
                                                  ) -> None:
    target = start_target(LOOPER)
    sock = runtime_dir / "pykprobes" / f"{target.pid}.sock"
    proc = cli_popen("-p", str(target.pid), "pipe")
    with connect(target.pid) as conn:
        wait_for(lambda: status(conn)["connected"] == "2", 30, "the client's connection")
    target.proc.send_signal(signal.SIGKILL)
    target.proc.wait(30)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and f"process {target.pid} exited" in err, err
    # No atexit after SIGKILL: the socket file is stale, and the next client removes it.
    assert sock.exists()
    listed = cli("ls")
    assert listed.returncode == 0
    assert not sock.exists()
    gone = cli("-p", str(target.pid), "cat", "trace")
    assert gone.returncode == 1 and "no process" in gone.stderr


def test_a_forked_child_does_not_serve_the_parents_socket(start_target: Any,
                                                          tmp_path: Path) -> None:
    exit_file = tmp_path / "child-exit"
    target = start_target(LOOPER, env={"CHILD_EXIT": str(exit_file)})
    with connect(target.pid) as conn:
        conn.read("control/status")
    assert target.proc.stdin is not None and target.proc.stdout is not None
    target.proc.stdin.write("fork\n")
    target.proc.stdin.flush()
    child_line = target.proc.stdout.readline().split()
    assert child_line[0] == "child" and child_line[2] == "0", child_line  # no copy of it
    child_pid = int(child_line[1])
    serves = target.proc.stdout.readline().split()
    assert serves[0] == "child-serves" and serves[1].endswith(f"/{child_pid}.sock")
    with connect(child_pid) as conn:
        assert status(conn)["pid"] == str(child_pid)
    exit_file.touch()
    wait_for(lambda: not os.path.exists(serves[1]), 30, "the child's exit")
    # The child's exit removed its own socket, not the parent's, which still serves.
    with connect(target.pid) as conn:
        assert status(conn)["pid"] == str(target.pid)
    code, out, _ = target.quit()
    assert (code, out.split()) == (0, ORIGINAL)


def test_two_attachers_at_once(start_target: Any) -> None:
    if HAS_REMOTE_EXEC:
        target = start_target(LOOPER, serve=None, python_args=("-S",))
        cmd = [sys.executable, "-m", "pykprobes", "attach", str(target.pid)]
        attaching = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=child_env()) for _ in range(2)]
        paths = []
        for proc in attaching:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            paths.append(out.strip())
        assert paths[0] == paths[1]
    else:
        target = start_target(LOOPER)
    one = cli_popen("-p", str(target.pid), "trace", "-e", "p:a/one __main__:work i",
                    "--duration", "1")
    two = cli_popen("-p", str(target.pid), "trace", "-e", "p:b/two json:dumps obj",
                    "--duration", "1")
    out_one, err_one = one.communicate(timeout=60)
    out_two, err_two = two.communicate(timeout=60)
    assert one.returncode == 0 and two.returncode == 0, err_one + err_two
    # Each stream has its own events only, and each got records.
    assert {m["event"] for m in records(out_one)} == {"one"}
    assert {m["event"] for m in records(out_two)} == {"two"}
    with connect(target.pid) as conn:
        assert conn.read("kprobe_events") == ""
    code, out, _ = target.quit()
    assert (code, out.split()) == (0, ORIGINAL)


def test_interrupt_prints_the_profile(start_target: Any) -> None:
    target = start_target(LOOPER)
    proc = cli_popen("-p", str(target.pid), "trace", "-e", "p:w/work __main__:work i")
    assert "work:" in _first_line(proc)
    _, err = interrupt(proc)
    assert proc.returncode == 0, err
    row = err.splitlines()[-1].split()
    assert row[0] == "work" and int(row[1]) >= 1
    assert target.quit()[0] == 0


def test_a_client_that_does_not_read(start_target: Any, runtime_dir: Path) -> None:
    """A streaming client that stops reading: its records are dropped and counted once its
    backlog is full, the program goes on (its HTTP server answers), and the client is told
    how many it lost when it reads again."""
    if not BREAKPOINT_CAPS.running_frames_other_threads:
        pytest.skip("needs a breakpoint arch that reaches a loop already running in another "
                    "thread (3.11's settrace does not)")
    target = start_target(SERVICE, serve="api", env={"MAX_BACKLOG": "65536"})
    port = int(target.words[2])
    with connect(target.pid):
        pass  # (arch set up for this run)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(runtime_dir / "pykprobes" / f"{target.pid}.sock"))
    s.sendall(protocol.frame(f"trace\nevent p:w/loop {target.path}:{LOOP_LINE} i"))
    with connect(target.pid) as conn:
        wait_for(lambda: int(status(conn)["dropped"]) > 0, 60, "records dropped")
        for n in range(5):
            http = http_client.HTTPConnection("127.0.0.1", port, timeout=30)
            http.request("GET", f"/still/{n}")
            assert http.getresponse().read() == f"ok /still/{n}\n".encode()
            http.close()
    s.sendall(protocol.frame("stop"))
    buf = bytearray()
    texts = []
    while True:
        text = protocol.take_frame(buf, protocol.MAX_REPLY)
        if text is None:
            chunk = s.recv(1 << 20)
            assert chunk, "the server closed the connection"
            buf += chunk
            continue
        kind, _, body = protocol.parse_reply(text)
        texts.append(body)
        if kind == "end":
            break
    s.close()
    assert any("CPU:0 [LOST " in t for t in texts)
    code, out, _ = target.quit()
    assert (code, out.split()) == (0, ["original", "True", "True", "rounds", "True"])
