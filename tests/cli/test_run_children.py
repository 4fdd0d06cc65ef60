"""Child processes under `pykprobes run` and under PYKPROBES_EVENTS (issue 16, item 8): each
child records its own events with its own pid, nothing is written twice, the profile is the
parent's, and a spawned child prints nothing of pykprobes' into the program's stderr.

The program forks with os.fork() (the child ends by returning through the program), and
starts a multiprocessing Process and a Pool of two (closed and joined: the workers end by
multiprocessing's own shutdown, then os._exit()), with the `fork` and `spawn` start
methods."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.cli.test_run import run, trace_lines

CHILDREN = textwrap.dedent('''
    import multiprocessing as mp, os, sys, textwrap

    def work(n):
        return textwrap.dedent("  x%d" % n)

    def main():
        work(0)                      # the parent's, before any fork
        pid = os.fork()
        if pid == 0:
            work(1)                  # the forked child's
            sys.exit(0)
        os.waitpid(pid, 0)
        ctx = mp.get_context(sys.argv[1])
        p = ctx.Process(target=work, args=(2,))
        p.start()
        p.join()
        with ctx.Pool(2) as pool:
            pool.map(work, [3, 4], chunksize=1)
            pool.close()
            pool.join()
        work(5)                      # the parent's, after
        print("pid", os.getpid(), flush=True)

    if __name__ == "__main__":
        main()
''')


def _records(text: str) -> list[tuple[int, int]]:
    """(n, tid) of each `w` record, in the order written."""
    return [(int(m["args"].split("=")[1]), int(m["tid"])) for m in trace_lines(text)
            if m["event"] == "w"]


def _check(records: list[tuple[int, int]], parent: int) -> None:
    assert sorted(n for n, _ in records) == [0, 1, 2, 3, 4, 5], "a record lost or written twice"
    tid = dict(records)
    assert tid[0] == tid[5] == parent
    assert len({tid[1], tid[2], parent}) == 3, "a child's records carry another pid"
    assert tid[3] != parent and tid[4] != parent


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_run_children_write_their_own_records(tmp_path: Path, method: str) -> None:
    """Forked children write through their own writer; children started by exec (spawn,
    forkserver) through the boot stage, from the definitions run passes in the environment."""
    (tmp_path / "kids.py").write_text(CHILDREN)
    out = tmp_path / "trace.txt"
    for args in ([], ["-o", str(out)]):
        res = run("-e", "p:t/w __main__:work n", *args, "--", "kids.py", method, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        parent = int(res.stdout.split()[-1])
        text = out.read_text() if args else res.stderr
        _check(_records(text), parent)
        profile = [ln.split() for ln in text.splitlines() if re.match(r"^  w\s+\d", ln)]
        assert profile == [["w", "2", "0"]], "one profile, the parent's hits"
        if args:
            assert "pykprobes" not in res.stderr, "a child printed into the program's stderr"


def test_run_passes_its_events_to_a_python_subprocess(tmp_path: Path) -> None:
    """A child started with subprocess runs another program: an event on one of its modules
    records there, one on `__main__:work` (the parent's) waits and prints nothing."""
    (tmp_path / "parent.py").write_text(textwrap.dedent('''
        import os, subprocess, sys, textwrap
        def work(n):
            return n
        work(1)
        code = ("import textwrap, os; textwrap.dedent('  a'); "
                "print('env', 'PYKPROBES_EVENTS' in os.environ)")
        subprocess.run([sys.executable, "-c", code], check=True)
    '''))
    out = tmp_path / "trace.txt"
    res = run("-e", "p:t/w __main__:work n", "-e", "p:t/d textwrap:dedent text",
              "-o", str(out), "--", "parent.py", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "env True\n"
    assert res.stderr == ""
    events = sorted((m["event"], m["args"].strip()) for m in trace_lines(out.read_text()))
    assert events == [("d", "text=\"  a\""), ("w", "n=1")]


@pytest.mark.parametrize("option", [["--format", "json"], ["--summary"],
                                    ["--trigger", "w=hist:keys=n"]])
def test_run_traces_no_exec_child_where_its_records_could_not_join(
        tmp_path: Path, option: list[str]) -> None:
    """JSON lines, a summary or a hist table cannot be made by a child's boot stage: run
    passes nothing on, and a spawned child records nothing and prints nothing."""
    (tmp_path / "kids.py").write_text(CHILDREN)
    out = tmp_path / "t"
    res = run("-e", "p:t/w __main__:work n", *option, "-o", str(out), "--",
              "kids.py", "spawn", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "pykprobes" not in res.stderr  # (3.12+ warns of the fork in a threaded process)
    text = out.read_text()
    # The forked child (n=1) has the events and writer of its own; the spawned ones, 2 to 4,
    # have nothing.
    if option[0] == "--format":
        assert sorted(json.loads(ln)["fields"]["n"] for ln in text.splitlines()
                      if ln.startswith("{")) == [0, 1, 5]
    elif option[0] == "--summary":
        assert "t/w: 2 hits, 0 missed" in text
    else:
        assert set(re.findall(r"\{ n: +(\d+) \}", text)) <= {"0", "1", "5"}
        assert {"0", "5"} <= set(re.findall(r"\{ n: +(\d+) \}", text))
    assert not trace_lines(text)


def test_os_exit_in_a_forked_child_loses_only_that_childs_last_records(tmp_path: Path) -> None:
    """A child that ends with os._exit() of its own cannot have written what it recorded in
    its last moments (run.py): that is lost; nothing else is, nothing is written twice."""
    program = CHILDREN.replace("sys.exit(0)", "os._exit(0)")
    (tmp_path / "kids.py").write_text(program)
    res = run("-e", "p:t/w __main__:work n", "--", "kids.py", "fork", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ns = sorted(n for n, _ in _records(res.stderr))
    assert ns in ([0, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5])


def test_a_forked_child_drops_the_brackets_of_threads_it_does_not_have(tmp_path: Path) -> None:
    """The writer's and other threads' brackets do not follow a child: its hits take the fast
    path again (core/guard.py `busy` is emptied of the threads the child does not have)."""
    (tmp_path / "f.py").write_text(textwrap.dedent('''
        import os, threading
        from pykprobes.core import guard
        inside = threading.Event(); release = threading.Event()
        def hold():
            with guard.kprobe_busy():
                inside.set(); release.wait()
        t = threading.Thread(target=hold); t.start(); inside.wait()
        pid = os.fork()
        if pid == 0:
            os.write(1, f"child busy={len(guard.busy)}\\n".encode()); os._exit(0)
        os.waitpid(pid, 0)
        release.set(); t.join()
        print("parent busy", len(guard.busy))
    '''))
    res = subprocess.run([sys.executable, "f.py"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60, env={**os.environ})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["child busy=0", "parent busy 0"]
