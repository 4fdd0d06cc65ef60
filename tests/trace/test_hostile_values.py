"""Values and names of the program that once broke the trace (issue 16, items 4 and 7): an
int too long for decimal, huge containers, lone surrogates, a thread name or a `__repr__`
with a newline. Recorded by real events on a real function (both mechanisms), then read
back as `trace`, `trace_pipe` and JSON: reading never raises, every record is one line
that encodes in UTF-8, and no text of the program forges a line."""

from __future__ import annotations

import json
import re
import sys
import threading
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.trace import format as fmt
from pykprobes.trace.tracefs import TraceFS

LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<tid>\d+)\s+\[000\]\s+(?P<ts>[\d.]+): "
                  r"(?P<event>\w+): \((?P<probe>[^)]*)\)(?P<args>.*)$")

#: What a forged trace line would look like if a text of the program were printed raw.
FORGED = "      MainThread-1       [000]      0.000001: forged: (x:y+0) a=1"


def sink(a: object, b: object) -> None:
    """The probed function."""


class Forger:
    """A `__repr__` (run by the `:repr` type only) that tries to start a trace line, and a
    class whose qualname does (shown by `:type` and by the default `<Type at 0x...>`)."""

    def __repr__(self) -> str:
        return "1\n" + FORGED


Forger.__qualname__ = "Forger\n" + FORGED


class Ordered:
    """Counts the comparisons that sorting a container of it would make."""

    compared = 0

    def __lt__(self, other: object) -> bool:
        Ordered.compared += 1
        return id(self) < id(other)

    def __repr__(self) -> str:
        return "o"


TYPES = ("", ":repr", ":str", ":type", ":len", ":x", ":int", ":float", ":bool")
HOSTILE: list[Any] = [
    10**5000, -(10**5000), 2**70000, "\ud800lone", "a\nb", b"\xff\n",
    set(range(100_000)), {i: str(i) for i in range(100_000)}, frozenset(range(100_000)),
    list(range(100_000)), [[[[[[[1]]]]]]], Forger(), {Ordered() for _ in range(300)},
]


def _define_all(fs: TraceFS) -> None:
    for t in TYPES:
        fs.define(f"p:h/e{t[1:] or 'plain'} {__name__}:sink a{t} b{t}")
    for event in fs.events.values():
        event.enable()
    kp.wait_for_kprobe_optimizer()


def _check_lines(text: str, records: int) -> list[re.Match[str]]:
    text.encode("utf-8")  # no lone surrogate reaches the output
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert len(lines) == records, "one line per record, no line broken or forged"
    matches = [LINE.match(ln) for ln in lines]
    assert all(matches), [ln for ln, m in zip(lines, matches, strict=True) if not m][:3]
    assert all(m["event"] != "forged" for m in matches if m)  # type: ignore[index]
    return matches  # type: ignore[return-value]


def test_every_value_and_type_reads_back_as_lines(fs: TraceFS) -> None:
    _define_all(fs)
    old_limit = sys.get_int_max_str_digits()
    Ordered.compared = 0
    try:
        for value in HOSTILE:
            sink(value, value)
        # A program may lower the int-to-str limit: formatting must not trip on it either.
        sys.set_int_max_str_digits(640)
        sink(10**1000, 10**1000)
    finally:
        sys.set_int_max_str_digits(old_limit)
    assert Ordered.compared == 0, ":repr sorted a set to show its first items"
    nrecords = (len(HOSTILE) + 1) * len(TYPES)
    lines = _check_lines(fs.read("trace"), nrecords)
    by_event = {}
    for m in lines:
        by_event.setdefault(m["event"], []).append(m["args"])
    assert by_event["eplain"][0].startswith(" a=0x")  # 10**5000: hex, never a ValueError
    assert by_event["eplain"][0].endswith("... b=" + by_event["eplain"][0][3:].split(" b=")[1])
    assert by_event["eplain"][3] == ' a="\\ud800lone" b="\\ud800lone"'
    assert by_event["eplain"][4] == ' a="a\\nb" b="a\\nb"'
    assert by_event["erepr"][11] == f" a=1\\n{FORGED} b=1\\n{FORGED}"
    assert by_event["etype"][11].startswith(" a=Forger\\n ")
    assert by_event["erepr"][6].startswith(" a={0, 1, 2, ") and "..." in by_event["erepr"][6]
    assert by_event["erepr"][12].startswith(" a={o, o, o, ")
    # JSON: every record on one line, read back with the values it holds.
    for record in fs.buffer.snapshot():
        obj = json.loads(fmt.format_json(record))
        fmt.format_json(record).encode("utf-8")
        assert obj["event"] == record[3].name
    # trace_pipe reads the same records.
    _check_lines(fs.read("trace_pipe", timeout=0), nrecords)


@pytest.mark.parametrize(("name", "shown"), [
    ("bad\nname", "bad\\nname"),
    ("sur\udc80rogate\ud800", "sur\\udc80rogate\\ud800"),
    ("x" * 100_000, "x" * 256 + "..."),  # capped as a str value is
    ("back\\slash", "back\\\\slash"),
])
def test_a_thread_name_never_breaks_the_trace(fs: TraceFS, name: str, shown: str) -> None:
    _define_all(fs)
    thread = threading.Thread(target=sink, args=(1, "s"), name=name)
    thread.start()
    thread.join()
    lines = _check_lines(fs.read("trace"), len(TYPES))
    assert {m["comm"].strip() for m in lines} == {shown}
    for record in fs.buffer.snapshot():
        assert json.loads(fmt.format_json(record))["comm"] == name[:256] + "..." * (
            len(name) > 256)
