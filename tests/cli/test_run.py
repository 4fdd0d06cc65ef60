"""`pykprobes run`, `probe` and `check` as a person uses them: real programs in
subprocesses, their output and exit code compared with a plain `python` run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from tests.testenv import ARCH

ENV = {**os.environ, "PYKPROBES_ARCH": ARCH}
RUN = [sys.executable, "-m", "pykprobes", "run"]
LINE = re.compile(r"^\s*(?P<comm>.+)-(?P<tid>\d+)\s+\[000\]\s+(?P<ts>[\d.]+): "
                  r"(?P<event>\w+): \((?P<probe>[^)]*)\)(?P<args>.*)$")


def _optimization_args() -> list[str]:
    return [] if ARCH == "optimized" else ["--no-optimize"]


def run(*args: str, cwd: Path | None = None, timeout: float = 120,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RUN, *_optimization_args(), *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=timeout, input=stdin)


def trace_lines(stderr: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m]


def test_json_tool_on_a_real_file(tmp_path: Path) -> None:
    data = {"name": "pykprobes", "probes": [1, 2, 3], "nested": {"a": None, "b": [True]}}
    src = tmp_path / "in.json"
    src.write_text(json.dumps(data))
    plain = subprocess.run([sys.executable, "-m", "json.tool", str(src)], capture_output=True,
                           text=True, env=ENV, timeout=60)
    traced = run("-e", "p:json/decode json.decoder:JSONDecoder.decode s:len",
                 "-e", "r:json/raw json.decoder:JSONDecoder.raw_decode $retval:type",
                 "--", "-m", "json.tool", str(src))
    assert traced.returncode == plain.returncode == 0, traced.stderr
    assert traced.stdout == plain.stdout
    lines = trace_lines(traced.stderr)
    decode = [m for m in lines if m["event"] == "decode"]
    raw = [m for m in lines if m["event"] == "raw"]
    assert len(decode) == 1 and decode[0]["args"] == f" s={len(src.read_text())}"
    assert decode[0]["probe"] == "json.decoder:JSONDecoder.decode+0"
    assert len(raw) == 1 and raw[0]["args"] == " retval=tuple"
    assert raw[0]["probe"] == "json.decoder:JSONDecoder.raw_decode <- " \
                              "json.decoder:JSONDecoder.decode"
    profile = [ln.split() for ln in traced.stderr.splitlines() if not LINE.match(ln)]
    assert ["decode", "1", "0"] in profile and ["raw", "1", "0"] in profile


SERVER = '''
import http.server, sys, threading

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        sys.stdout.write("served %s\\n" % (args[0],))

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() waits for the request threads

def main():
    server = Server(("127.0.0.1", 0), Handler)
    print("port", server.server_address[1], flush=True)
    for _ in range(3):
        server.handle_request()
    server.server_close()
    print("done", flush=True)
    return 0

if __name__ == "__main__":
    sys.exit(main())
'''


def _serve_and_query(cmd: list[str], tmp_path: Path) -> tuple[str, str, int, list[int]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=tmp_path)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("port "), line + (proc.stderr.read() if proc.stderr else "")
    port = int(line.split()[1])
    statuses = []
    for path in ("/", "/hello.txt", "/missing"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                statuses.append(r.status)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
    out, err = proc.communicate(timeout=60)
    return line + out, err, proc.returncode, statuses


def test_http_server_answering_real_requests(tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text(SERVER)
    (tmp_path / "hello.txt").write_text("hello\n")
    plain = _serve_and_query([sys.executable, "server.py"], tmp_path)
    traced = _serve_and_query(
        [*RUN, *_optimization_args(),
         "-e", "p:http/get http.server:SimpleHTTPRequestHandler.do_GET path=self.path "
               "cmd=self.command",
         "-e", "p:http/resp http.server:BaseHTTPRequestHandler.send_response code=$arg2",
         "-e", "p:http/main __main__:main",
         "--filter", "resp=code >= 400",
         "--", "server.py"], tmp_path)
    out, err, code, statuses = traced
    assert code == plain[2] == 0, err
    assert statuses == plain[3] == [200, 200, 404]
    assert re.sub(r"port \d+", "port N", out) == re.sub(r"port \d+", "port N", plain[0])
    lines = trace_lines(err)
    gets = [m["args"] for m in lines if m["event"] == "get"]
    assert gets == [' path="/" cmd="GET"', ' path="/hello.txt" cmd="GET"',
                    ' path="/missing" cmd="GET"']
    resp = [m["args"] for m in lines if m["event"] == "resp"]
    assert resp == [" code=404"], "the filter kept only the error response"
    assert [m["event"] for m in lines if m["event"] == "main"] == ["main"]
    assert all(int(m["tid"]) > 0 for m in lines)


def test_script_semantics_are_pythons(tmp_path: Path) -> None:
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent('''
        import sys
        def work(n):
            return n * 2
        print(sys.argv[1:], __name__, sys.path[0] == __import__("os").path.dirname(
            __import__("os").path.abspath(__file__)), sys.modules["__main__"].__dict__ is globals())
        print(work(int(sys.stdin.readline())))
        raise SystemExit(int(sys.argv[1]))
    '''))
    plain = subprocess.run([sys.executable, str(script), "3", "x"], capture_output=True,
                           text=True, env=ENV, input="21\n", timeout=60)
    traced = run("-e", "p:t/work __main__:work n", "--", str(script), "3", "x", stdin="21\n")
    assert plain.returncode == traced.returncode == 3
    assert traced.stdout == plain.stdout == "['3', 'x'] __main__ True True\n42\n"
    assert [m["args"] for m in trace_lines(traced.stderr)] == [" n=21"]


def test_uncaught_exception_traceback_is_the_programs(tmp_path: Path) -> None:
    script = tmp_path / "boom.py"
    script.write_text("def f():\n    raise ValueError('boom')\n\nf()\n")
    plain = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                           env=ENV, timeout=60)
    traced = run("-e", "p:t/f __main__:f", "--", str(script))
    assert plain.returncode == traced.returncode == 1
    tb_plain = plain.stderr[plain.stderr.index("Traceback"):]
    tb_traced = traced.stderr[traced.stderr.index("Traceback"):]
    assert tb_traced.startswith(tb_plain.strip().splitlines()[0])
    assert tb_plain.strip().splitlines() == \
        [ln for ln in tb_traced.strip().splitlines() if not LINE.match(ln)][:len(
            tb_plain.strip().splitlines())]


def test_json_output_and_file(tmp_path: Path) -> None:
    script = tmp_path / "p.py"
    script.write_text("def g(a, b):\n    return f'{a}{b}'\n\nfor i in range(3):\n    g(i, 'x')\n")
    out = tmp_path / "trace.jsonl"
    traced = run("-e", "p:t/g __main__:g a b", "--format", "json", "-o", str(out), "--",
                 str(script))
    assert traced.returncode == 0, traced.stderr
    assert traced.stderr == ""
    records = [json.loads(line) for line in out.read_text().splitlines()
               if line.startswith("{")]
    assert [r["fields"] for r in records] == [{"a": i, "b": "x"} for i in range(3)]
    assert all(r["event"] == "g" and r["group"] == "t" for r in records)


@pytest.mark.parametrize(("definition", "code_text", "column"), [
    ("p:t/x no_such_module_zz:f", "Invalid probed address or symbol", 6),
    ("p:t/ev json:loads $retval", "$retval is not available on probe", 18),
    ("r5:t/ev json:loads+4", "Retprobe address must be an function entry", 8),
    ("p:t/ev json:loads x:wat", "Unknown type is specified", 20),
])
def test_bad_definition_prints_caret_and_exits_1(definition: str, code_text: str,
                                                 column: int, tmp_path: Path) -> None:
    (tmp_path / "p.py").write_text("print('never')\n")
    res = run("-e", definition, "--", str(tmp_path / "p.py"))
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and res.stdout == ""
    lines = res.stderr.splitlines()
    assert lines[0].startswith("pykprobes: error: ")
    assert code_text in lines[0]
    assert lines[1] == f"  {definition}"
    assert lines[2] == "  " + " " * column + "^"


def test_check_and_probe_commands() -> None:
    ok = subprocess.run([sys.executable, "-m", "pykprobes", "check",
                         "p:t/a textwrap:TextWrapper.wrap text", "r:t/b json:dumps $retval"],
                        capture_output=True, text=True, env=ENV, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "ok: t/a" in ok.stdout and "ok: t/b" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "pykprobes", "check", "p:t/a json:nope"],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert bad.returncode == 1 and "^" in bad.stderr and "Traceback" not in bad.stderr
    lines = subprocess.run([sys.executable, "-m", "pykprobes", "probe", "-L",
                            "textwrap:dedent"], capture_output=True, text=True, env=ENV,
                           timeout=60)
    assert lines.returncode == 0
    assert lines.stdout.startswith("<textwrap:dedent@")
    assert re.search(r"^\s+\d+\s+def dedent\(text\):.*\+0", lines.stdout, re.M)
    vars_ = subprocess.run([sys.executable, "-m", "pykprobes", "probe", "-V",
                            "textwrap:TextWrapper.wrap"], capture_output=True, text=True,
                           env=ENV, timeout=60)
    assert vars_.returncode == 0
    assert "argument  self  ($arg1)" in vars_.stdout and "argument  text  ($arg2)" in vars_.stdout



def test_line_targets_in_the_script_and_a_module_not_imported_yet(tmp_path: Path) -> None:
    (tmp_path / "helper_mod_x.py").write_text("def double(v):\n    w = v * 2\n    return w\n")
    script = tmp_path / "lines.py"
    script.write_text("import helper_mod_x\n"
                      "total = 0\n"
                      "for i in range(3):\n"
                      "    total += helper_mod_x.double(i)\n"
                      "print(total)\n")
    traced = run("-e", f"p:t/body {script}:4 i total",
                 "-e", f"p:t/dbl {tmp_path / 'helper_mod_x.py'}:3 w",
                 "--", str(script))
    assert traced.returncode == 0, traced.stderr
    assert traced.stdout == "6\n"
    lines = trace_lines(traced.stderr)
    assert [m["args"] for m in lines if m["event"] == "body"] == \
        [" i=0 total=0", " i=1 total=0", " i=2 total=2"]
    assert [m["args"] for m in lines if m["event"] == "dbl"] == [" w=0", " w=2", " w=4"]
