"""Probing never evaluates annotations. From 3.14 (PEP 649/749) a function's annotations are
deferred: `__annotate__` runs only when someone asks for them, and may run the program's
code (or raise NameError for a forward reference). Resolving a symbol or a line, arming,
hitting, fetching arguments and listing lines and variables must not ask. Before 3.14 the
annotations ran once, at `def`: the count of their runs must not change either way.

Each case runs in a new interpreter, on a module whose every annotation records that it ran."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import testenv

ANNOTATED = """
import functools

RAN = []


def record(name):
    RAN.append(name)
    return int


def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


def plain(x: record("plain.x"), y: record("plain.y") = 1) -> record("plain.return"):
    return x + y


@logged
def decorated(x: record("decorated.x")) -> record("decorated.return"):
    return x * 2


class Klass:
    field: record("Klass.field")

    def method(self, z: record("method.z")) -> record("method.return"):
        return z - 1
"""

PROGRAM = """
import pykprobes as kp
import annotated
from pykprobes.trace.tracefs import TraceFS

ran_at_import = list(annotated.RAN)
probes = [kp.Kprobe(symbol_name=s, pre_handler=lambda p, r: dict(r.args))
          for s in ("annotated:plain", "annotated:decorated", "annotated:Klass.method")]
probes += [kp.Kprobe(addr=a, pre_handler=lambda p, r: None)
           for line in (LINES) for a in kp.resolve_line(annotated.__file__ + f":{line}")]
kp.register_kprobes(probes)
rp = kp.Kretprobe(symbol_name="annotated:plain", handler=lambda ri, r: r.retval)
kp.register_kretprobe(rp)
fs = TraceFS()
fs.write("kprobe_events", "p:t/m annotated:Klass.method z $arg1 self:type")
fs.write("events/t/m/enable", "1")
kp.wait_for_kprobe_optimizer()
values = (annotated.plain(1), annotated.decorated(2), annotated.Klass().method(3))
print(repr({"ran_at_import": ran_at_import, "ran": annotated.RAN, "values": values,
            "nhit": [p.nhit for p in probes], "returns": rp.nhit,
            "trace": fs.read("trace").count("m: (annotated:Klass.method")}))
"""


def _lines(src: str) -> list[int]:
    """Lines of the three functions: two `def` lines (their entries) and a body line."""
    return [n for n, text in enumerate(src.splitlines(), 1)
            if text.lstrip().startswith(("def plain", "def method", "return x * 2"))]


@pytest.fixture
def annotated(tmp_path: Path) -> Path:
    (tmp_path / "annotated.py").write_text(ANNOTATED)
    return tmp_path


def test_probing_never_runs_the_annotations(
    run_python: testenv.RunPython, annotated: Path
) -> None:
    lines = ", ".join(map(str, _lines(ANNOTATED)))
    proc = run_python(PROGRAM.replace("LINES", lines), env={"PYTHONPATH": str(annotated)})
    assert proc.returncode == 0, proc.stderr
    result = ast.literal_eval(proc.stdout.splitlines()[-1])
    assert result["ran"] == result["ran_at_import"]  # nothing evaluated them since
    assert result["values"] == (2, 4, 2)
    assert result["trace"] == 1 and result["returns"] == 1
    # The three symbol probes, then the line probes: each line ran once.
    assert result["nhit"] == [1] * len(result["nhit"]) and len(result["nhit"]) >= 6


@pytest.mark.parametrize("option", ["-L", "-V"])
def test_listing_lines_and_variables_never_runs_the_annotations(
    annotated: Path, option: str
) -> None:
    """`pykprobes probe -L/-V` import the module (that is their job) but then read code only."""
    code = ("import sys, annotated; n = len(annotated.RAN); "
            "from pykprobes.cli.main import main; "
            f"main(['probe', {option!r}, 'annotated:Klass.method']); "
            "assert len(annotated.RAN) == n, annotated.RAN; print('unchanged')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(annotated)}, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "unchanged"
