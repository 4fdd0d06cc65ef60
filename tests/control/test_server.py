"""The control server as a user meets it: a real program in a subprocess serving its
tracefs, and `pykprobes -p PID ...` (or the client) speaking to it over the real socket."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pykprobes.control import stream
from pykprobes.trace import format as fmt
from pykprobes.trace.tracefs import TraceFS
from tests.control.conftest import child_env, cli, connect, records, status, wait_for
from tests.control.programs import LOOPER


@pytest.mark.parametrize("serve", ["env", "api"])
def test_socket_is_private_and_answers(start_target: Any, runtime_dir: Path,
                                       serve: str) -> None:
    target = start_target(LOOPER, serve=serve)
    directory = runtime_dir / "pykprobes"
    sock = directory / f"{target.pid}.sock"
    wait_for(sock.exists, 30, "the socket file")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    st = sock.lstat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    with connect(target.pid) as conn:
        info = status(conn)
    assert info["pid"] == str(target.pid) and info["protocol"] == "1"
    assert info["socket"] == str(sock) and info["early"] == "0"
    code, out, err = target.quit()
    assert (code, out.split(), err) == (0, ["original", "True", "path", "True"], "")
    assert not sock.exists()  # removed at exit


def test_files_through_the_cli(start_target: Any) -> None:
    target = start_target(LOOPER)
    pid = str(target.pid)
    with connect(target.pid) as conn:
        before = conn.read("symbols/__main__:work")
        define = cli("-p", pid, "write", "-a", "kprobe_events", "p:loop/work __main__:work i")
        assert define.returncode == 0, define.stderr
        assert cli("-p", pid, "cat", "kprobe_events").stdout == \
            "p:loop/work __main__:work i=i\n"
        assert cli("-p", pid, "write", "events/loop/work/enable", "1").returncode == 0
        wait_for(lambda: "work:" in conn.read("trace"), 30, "a record in trace")
        assert records(conn.read("trace"))[0]["comm"].strip() == "work"
        filt = cli("-p", pid, "write", "events/loop/work/filter", "-", stdin="i < 0\n")
        assert filt.returncode == 0, filt.stderr
        assert conn.read("events/loop/work/filter") == "i < 0\n"
        assert "loop/work" in cli("-p", pid, "cat", "kprobe_profile").stdout.replace(
            "  work", "  loop/work")
        busy = cli("-p", pid, "write", "kprobe_events", "")
        assert busy.returncode == 1 and "enabled" in busy.stderr  # EBUSY, as the kernel
        reset = cli("-p", pid, "reset")
        assert reset.returncode == 0 and "removed 1 events" in reset.stderr
        assert conn.read("kprobe_events") == "" and conn.read("kprobes/list") == ""
        assert conn.read("symbols/__main__:work") == before
    code, out, _ = target.quit()
    assert (code, out.split()) == (0, ["original", "True", "path", "True"])


def test_a_bad_definition_is_the_kernels_message_and_a_caret(start_target: Any) -> None:
    target = start_target(LOOPER)
    res = cli("-p", str(target.pid), "trace", "-e", "p:t/ok __main__:work i",
              "-e", "p:t/bad __main__:work i $nosuch")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0].startswith("pykprobes: error: ")
    assert lines[1] == "  p:t/bad __main__:work i $nosuch"
    assert lines[2] == "  " + " " * lines[1][2:].index("$nosuch") + "^"
    with connect(target.pid) as conn:
        # All or nothing: the good definition before it was removed too.
        assert conn.read("kprobe_events") == ""
        assert "$nosuch" in conn.read("error_log")
    missing = cli("-p", str(target.pid), "cat", "events/t/nope/enable")
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    unknown = cli("-p", str(target.pid), "write", "tracing_on", "maybe")
    assert unknown.returncode == 1 and "expected 0 or 1" in unknown.stderr


def test_trace_streams_then_removes_its_events(start_target: Any, tmp_path: Path) -> None:
    target = start_target(LOOPER, serve="api")
    out = tmp_path / "trace.json"
    with connect(target.pid) as conn:
        before = conn.read("symbols/__main__:work")
        res = cli("-p", str(target.pid), "trace", "-e", "p:loop/work __main__:work i",
                  "--filter", "work=i > 0", "--format", "json", "-o", str(out),
                  "--duration", "0.5")
        assert res.returncode == 0, res.stderr
        assert "tracing loop/work in process" in res.stderr
        profile = res.stderr.splitlines()[-1].split()
        assert profile[0] == "work" and int(profile[1]) > 0
        lines = out.read_text().splitlines()
        assert lines and all(line.startswith('{"ts":') for line in lines)
        assert '"event":"work"' in lines[0] and '"fields":{"i":' in lines[0]
        assert conn.read("kprobe_events") == "" and conn.read("kprobes/list") == ""
        assert conn.read("symbols/__main__:work") == before
    code, out_text, _ = target.quit()
    assert (code, out_text.split()) == (0, ["original", "True", "path", "True"])


def test_the_first_request_ends_the_early_stage(start_target: Any) -> None:
    target = start_target(LOOPER, env={"PYKPROBES_EVENTS": "p:boot/work __main__:work i"})
    with connect(target.pid) as conn:
        assert status(conn)["early"] == "0"
        # The early events moved into the trace (init_kprobes converted them).
        assert "p:boot/work __main__:work" in conn.read("kprobe_events")
        wait_for(lambda: "work: (__main__:work+0) i=" in conn.read("trace"), 30,
                 "the early event's records")
    code, out, _ = target.quit()
    # (The boot event is the program's own: still there at its exit, optimized or not.)
    assert code == 0 and out.split()[2:] == ["path", "True"]


def test_the_server_thread_records_nothing(start_target: Any) -> None:
    """Events on the standard library functions a server would naturally run (sockets,
    selectors, JSON encoding, paths): the program's own calls are recorded, the server's
    work never is, even while it streams JSON."""
    target = start_target(LOOPER)
    pid = str(target.pid)
    defs = ["p:lib/dumps json:dumps", "p:lib/encode json.encoder:JSONEncoder.encode",
            "p:lib/iterencode json.encoder:JSONEncoder.iterencode",
            "p:lib/sockinit socket:socket.__init__", "p:lib/accept socket:socket.accept",
            "p:lib/select selectors:_PollLikeSelector.select", "p:lib/join posixpath:join",
            "p:lib/pyver platform:python_version"]
    with connect(target.pid) as conn:
        for d in defs:
            conn.write("kprobe_events", d, append=True)
        for d in defs:
            conn.write(f"events/lib/{d.split()[0].split('/')[1]}/enable", "1")
        piped = cli("-p", pid, "pipe", "--format", "json", "--duration", "0.5")
        assert piped.returncode == 0, piped.stderr
        traced = cli("-p", pid, "trace", "-e", "p:t/w __main__:work i", "--format", "json",
                     "--duration", "0.5")
        assert traced.returncode == 0, traced.stderr
        conn.read("control/status")
        trace = conn.read("trace")
        conn.request("reset")
    streamed = [r for r in map(json.loads, (piped.stdout + traced.stdout).splitlines())
                if "lost" not in r]
    events = {r["event"] for r in streamed} | {m["event"] for m in records(trace)}
    assert {"dumps", "encode", "w"} <= events  # the program's own calls
    comms = {r["comm"] for r in streamed} | {m["comm"].strip() for m in records(trace)}
    assert comms == {"work"}, comms
    assert target.quit()[0] == 0


def test_json_lines_are_format_json(tmp_path: Path) -> None:
    """The server's C-encoded JSON lines are trace.format's, value for value."""
    src = tmp_path / "jsonmod.py"
    src.write_text("def f(a, b, c, d, e):\n    return a\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("jsonmod_ctl", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["jsonmod_ctl"] = mod
    spec.loader.exec_module(mod)
    fs = TraceFS()
    event = fs.define("p:j/f jsonmod_ctl:f a b c d e:repr")
    assert event is not None
    event.enable()
    try:
        mod.f("é\n\"x", 2**70, float("inf"), b"\x00\xff", [1, {"k": None}])
        mod.f(None, True, -0.0, "", object())
    finally:
        event.disable()
        fs.remove("f", "j")
        del sys.modules["jsonmod_ctl"]
    recs = fs.buffer.snapshot()
    assert len(recs) == 2
    for record in recs:
        assert stream.json_line(record) == fmt.format_json(record)


def test_run_control_serves_the_program(tmp_path: Path) -> None:
    """`pykprobes run --control`: the program runs as under python, and `-p PID` reaches
    it (the run's own pid: it runs the program in-process)."""
    program = tmp_path / "looper.py"
    program.write_text(LOOPER.lstrip("\n"))
    proc = subprocess.Popen([sys.executable, "-m", "pykprobes", "run", "--control", "--",
                             str(program)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), cwd=tmp_path)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        pid = proc.stdout.readline().split()[1]
        assert proc.stderr.readline().startswith(f"pykprobes: process {pid} serves its "
                                                 "tracefs at ")
        res = cli("-p", pid, "trace", "-e", "p:w/work __main__:work i", "--duration", "0.3")
        assert res.returncode == 0 and records(res.stdout), res.stderr
        out, err = proc.communicate("quit\n", timeout=60)
        # Without -e, run writes no trace of its own: the program's output is all there is.
        assert (proc.returncode, out.split(), err) == (0, ["original", "True", "path",
                                                           "True"], "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
