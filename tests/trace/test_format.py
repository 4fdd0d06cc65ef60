"""trace/format.py against the exact texts ftrace prints: trace lines, values, the trace
header, lost-events lines, JSON lines, kprobe_profile, error_log and the event format file."""

from __future__ import annotations

import enum
import json
import sys
from typing import Any

import pytest

from pykprobes.trace import format as fmt
from pykprobes.trace.buffer import ReadBatch, Record, TraceBuffer


class StandInEvent:
    """What the formats need of an event (trace/events.py's Event)."""

    def __init__(
        self,
        name: str = "myprobe",
        fields: tuple[str, ...] = (),
        *,
        types: tuple[str | None, ...] | None = None,
        group: str = "pykprobes",
        symbol: str = "pkg.mod:func",
        offset: int = 0,
        is_return: bool = False,
        event_id: int = 1001,
    ) -> None:
        self.name = name
        self.group = group
        self.fields = fields
        if types is not None:
            self.types = types
        self.symbol = symbol
        self.offset = offset
        self.is_return = is_return
        self.id = event_id


class Fault:
    """Like fetchargs' FAULT marker: a class named Fault."""

    def __repr__(self) -> str:
        raise AssertionError("the formats must not call repr() on the marker")


FAULT = Fault()


def line(
    event: StandInEvent,
    *values: Any,
    ts: int = 0,
    tid: int = 1,
    comm: str = "t",
    caller: str | None = None,
    base: int = 0,
) -> str:
    return fmt.format_line((ts, tid, comm, event, values, caller), base)


# -- trace lines ----------------------------------------------------------------------------


def test_entry_line_has_ftraces_layout() -> None:
    ev = StandInEvent("myprobe", ("a", "b"), offset=4)
    assert line(ev, 1, "x", ts=12_345_678_901_234, tid=4321, comm="MainThread") == (
        '      MainThread-4321    [000]  12345.678901: myprobe: (pkg.mod:func+4) a=1 b="x"'
    )


def test_columns() -> None:
    ev = StandInEvent("e")
    # comm right-aligned in 16, the tid left-aligned in 7, the seconds right-aligned in 5.
    assert line(ev, ts=1_000, tid=7, comm="w") == (
        "               w-7       [000]      0.000001: e: (pkg.mod:func+0)"
    )
    # Wider values push the columns, as %16s / %-7d / %5lu do; nothing is cut.
    assert line(ev, ts=123_456 * 10**9, tid=12_345_678, comm="ThreadPoolExecutor-0_0") == (
        "ThreadPoolExecutor-0_0-12345678 [000]  123456.000000: e: (pkg.mod:func+0)"
    )


def test_unknown_comm_prints_like_the_kernel() -> None:
    assert line(StandInEvent("e"), comm="").startswith("           <...>-1       [000]")


@pytest.mark.parametrize(
    ("ts", "base", "shown"),
    [
        (0, 0, "0.000000"),
        (499, 0, "0.000000"),
        (500, 0, "0.000001"),  # ns2usecs() rounds to the nearest microsecond
        (1_499, 0, "0.000001"),
        (999_999_499, 0, "0.999999"),
        (999_999_500, 0, "1.000000"),  # ... carrying into the seconds
        (5_000_000_000, 2_000_000_000, "3.000000"),  # relative to the base
        (1_000, 2_000, "0.000000"),  # before the base: zero, not negative
    ],
)
def test_timestamp(ts: int, base: int, shown: str) -> None:
    assert f"  {shown:>12}: " in line(StandInEvent("e"), ts=ts, base=base)


def test_return_line() -> None:
    ev = StandInEvent("myretprobe", ("retval",), is_return=True)
    assert line(ev, 3, caller="pkg.main:run", tid=9, comm="MainThread") == (
        "      MainThread-9       [000]      0.000000: "
        "myretprobe: (pkg.mod:func <- pkg.main:run) retval=3"
    )
    assert "(pkg.mod:func <- ?)" in line(ev, 3)


def test_fields_and_values_of_different_lengths() -> None:
    ev = StandInEvent("e", ("a", "b"))
    assert line(ev, 1).endswith(") a=1")
    assert line(ev, 1, 2, 3).endswith(") a=1 b=2")


def test_types_from_the_definition() -> None:
    class Arg:
        def __init__(self, type_: str | None) -> None:
            self.type = type_

    class Definition:
        args = (Arg(None), Arg("x"))

    ev = StandInEvent("e", ("a", "b"))
    ev.definition = Definition()  # type: ignore[attr-defined]
    assert line(ev, 31, 31).endswith(") a=31 b=0x1f")


# -- values ---------------------------------------------------------------------------------


class Color(enum.IntEnum):
    RED = 31

    def __repr__(self) -> str:
        raise AssertionError("ran __repr__")

    def __format__(self, spec: str) -> str:
        raise AssertionError("ran __format__")


class HostileStr(str):
    def __str__(self) -> str:
        raise AssertionError("ran __str__")

    def __repr__(self) -> str:
        raise AssertionError("ran __repr__")


class HostileFloat(float):
    def __repr__(self) -> str:
        raise AssertionError("ran __repr__")


class HostileBytes(bytes):
    def __bytes__(self) -> bytes:
        raise AssertionError("ran __bytes__")


class Opaque:
    def __repr__(self) -> str:
        raise AssertionError("ran __repr__")


VALUE_CASES: list[tuple[Any, str | None, str]] = [
    (0, None, "0"),
    (31, None, "31"),
    (-5, None, "-5"),
    (2**70, None, "1180591620717411303424"),
    (31, "x", "0x1f"),
    (-31, "x", "-0x1f"),
    (0, "x", "0x0"),
    (True, None, "True"),
    (False, "x", "False"),
    (None, None, "None"),
    (1.5, None, "1.5"),
    (0.1, None, "0.1"),
    (float("inf"), None, "inf"),
    (float("nan"), None, "nan"),
    ("", None, '""'),
    ("plain text", None, '"plain text"'),
    ('say "hi"', None, '"say \\"hi\\""'),
    ("back\\slash", None, '"back\\\\slash"'),
    ("a\nb\tc\rd", None, '"a\\nb\\tc\\rd"'),
    ("\x00\x01\x7f", None, '"\\x00\\x01\\x7f"'),
    ("\x85", None, '"\\x85"'),
    ("é€😀", None, '"é€😀"'),  # printable: kept as is
    ("\u2028", None, '"\\u2028"'),  # a line separator would break the line
    ("\udcff", None, '"\\udcff"'),  # a lone surrogate (surrogateescape)
    ("\U000e0001", None, '"\\U000e0001"'),
    (b"", None, 'b""'),
    (b'ab"\\\n\x00\xff', None, 'b"ab\\"\\\\\\n\\x00\\xff"'),
    (FAULT, None, "(fault)"),
    (FAULT, "x", "(fault)"),
    (Color.RED, None, "31"),
    (Color.RED, "x", "0x1f"),
    (HostileStr("s"), None, '"s"'),
    (HostileFloat(2.5), None, "2.5"),
    (HostileBytes(b"z"), None, 'b"z"'),
    ("31", "x", '"31"'),  # x applies to ints only
]


# The ids name the expected text: pytest must not call repr() on the hostile values.
@pytest.mark.parametrize(
    ("value", "type_name", "text"),
    VALUE_CASES,
    ids=[f"{text}:{type_name}" for _, type_name, text in VALUE_CASES],
)
def test_format_value(value: Any, type_name: str | None, text: str) -> None:
    assert fmt.format_value(value, type_name) == text


def test_other_objects_print_without_their_repr() -> None:
    obj = Opaque()
    assert fmt.format_value(obj) == f"<{__name__}.Opaque object at {hex(id(obj))}>"


def test_a_value_never_breaks_the_line() -> None:
    ev = StandInEvent("e", ("s",))
    assert "\n" not in line(ev, "one\ntwo\u2028three\r")


# -- trace_pipe: lost events ----------------------------------------------------------------


def test_format_lost() -> None:
    assert fmt.format_lost(5) == "CPU:0 [LOST 5 EVENTS]"


def test_format_batch_puts_the_lost_lines_in_place() -> None:
    ev = StandInEvent("e", ("n",))
    records: list[Record] = [(0, 1, "t", ev, (n,), None) for n in range(3)]
    batch = ReadBatch(records, [(0, 7), (2, 1), (3, 4)])
    lines = fmt.format_batch(batch).splitlines()
    assert [x if x.startswith("CPU") else x.split(": ")[-1] for x in lines] == [
        "CPU:0 [LOST 7 EVENTS]",
        "(pkg.mod:func+0) n=0",
        "(pkg.mod:func+0) n=1",
        "CPU:0 [LOST 1 EVENTS]",
        "(pkg.mod:func+0) n=2",
        "CPU:0 [LOST 4 EVENTS]",
    ]
    assert fmt.format_batch(batch).endswith("\n")
    assert fmt.format_batch(ReadBatch()) == ""
    assert fmt.format_batch(ReadBatch([], [(0, 2)])) == "CPU:0 [LOST 2 EVENTS]\n"


def test_format_batch_from_a_real_overflow() -> None:
    ev = StandInEvent("e", ("n",))
    buf = TraceBuffer(size_kb=1)
    for n in range(40):  # 32 fit; 8 overwritten
        buf.write((n * 1_000_000, 2, "w", ev, (n,), None))
    text = fmt.format_batch(buf.read(block=False), ts_base_ns=8_000_000)
    lines = text.splitlines()
    assert lines[0] == "CPU:0 [LOST 8 EVENTS]"
    assert lines[1] == "               w-2       [000]      0.000000: e: (pkg.mod:func+0) n=8"
    assert len(lines) == 33


# -- the trace header -----------------------------------------------------------------------

HEADER = """\
# tracer: nop
#
# entries-in-buffer/entries-written: {}/{}   #P:1
#
#           TASK-PID     CPU#     TIMESTAMP  FUNCTION
#              | |         |         |         |
"""


def test_header() -> None:
    ev = StandInEvent("e", ("n",))
    buf = TraceBuffer(size_kb=1)
    assert fmt.format_header(buf) == HEADER.format(0, 0)
    for n in range(40):
        buf.write((0, 1, "t", ev, (n,), None))
    assert fmt.format_header(buf) == HEADER.format(32, 40)


def test_header_columns_line_up_with_a_line() -> None:
    legend = HEADER.splitlines()[4]
    text = line(StandInEvent("e"), ts=12_345_678_901_234, tid=4321, comm="MainThread")
    assert legend.index("TASK-PID") + 4 == text.index("-4321")  # the dash between comm-pid
    assert legend.index("CPU#") == text.index("[000]")
    # The kernel's own legend has sat one column left of the timestamp's end and of the
    # function since the pid column grew to 7 digits; we print the kernel's text as it is.
    assert legend.index("FUNCTION") + 1 == text.index("e: ")
    assert legend.index("TIMESTAMP") + len("TIMESTAMP") + 1 == text.index(": e: ")


# -- JSON lines -----------------------------------------------------------------------------


def test_json_entry() -> None:
    ev = StandInEvent("myprobe", ("a", "s", "h"), types=(None, None, "x"), offset=4)
    text = fmt.format_json((12_000_000_123, 77, "MainThread", ev, (1, "x\ny", 31), None))
    assert "\n" not in text
    assert json.loads(text) == {
        "ts": 12_000_000_123,
        "tid": 77,
        "comm": "MainThread",
        "group": "pykprobes",
        "event": "myprobe",
        "probe": "pkg.mod:func+4",
        "caller": None,
        "fields": {"a": 1, "s": "x\ny", "h": 31},
    }


def test_json_return_and_base() -> None:
    ev = StandInEvent("r", ("retval",), is_return=True)
    obj = json.loads(fmt.format_json((5_000, 1, "t", ev, (None,), "pkg:caller"), 1_000))
    assert (obj["ts"], obj["probe"], obj["caller"], obj["fields"]) == (
        4_000,
        "pkg.mod:func",
        "pkg:caller",
        {"retval": None},
    )


def test_json_values_it_cannot_hold_are_strings() -> None:
    fields = ("b", "f", "nan", "inf", "e", "hs", "o", "t", "fl")
    ev = StandInEvent("e", fields)
    obj = Opaque()
    values = (
        b"\x00a",
        FAULT,
        float("nan"),
        float("-inf"),
        Color.RED,
        HostileStr("s"),
        obj,
        True,
        HostileFloat(float("inf")),
    )
    text = fmt.format_json((0, 1, "t", ev, values, None))
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    assert json.loads(text)["fields"] == {
        "b": 'b"\\x00a"',
        "f": "(fault)",
        "nan": "nan",
        "inf": "-inf",
        "e": 31,
        "hs": "s",
        "o": object.__repr__(obj),
        "t": True,
        "fl": "inf",
    }


# -- kprobe_profile -------------------------------------------------------------------------


def test_profile() -> None:
    text = fmt.format_profile([("myprobe", 10, 0), ("r_pkg_mod_func_0", 123456789, 7)])
    assert text == (
        "  myprobe                                                   10               0\n"
        "  r_pkg_mod_func_0                                   123456789               7\n"
    )
    # The kernel's "  %-44s %15lu %15lu": a long name pushes the columns, nothing is cut.
    long = "e" * 50
    assert fmt.format_profile([(long, 1, 2)]) == f"  {long} {1:>15} {2:>15}\n"
    assert fmt.format_profile([]) == ""


# -- error_log ------------------------------------------------------------------------------


class LogEntry:
    def __init__(self, message: str, command: str, pos: int, **time: Any) -> None:
        self.message = message
        self.command = command
        self.pos = pos
        for key, value in time.items():
            setattr(self, key, value)


def test_error_log() -> None:
    entries = [
        LogEntry(
            "Invalid fetch argument", "p:myprobe pkg.mod:func $arg0", 23, ts_ns=34_382_149_999
        ),
        LogEntry("Field not found", "nosuch == 1", 0, timestamp=123456.5, location="filter"),
    ]
    assert fmt.format_error_log(entries) == (
        "[   34.382149] pykprobes: error: Invalid fetch argument\n"
        "  Command: p:myprobe pkg.mod:func $arg0\n"
        "                                  ^\n"
        "[123456.500000] filter: error: Field not found\n"
        "  Command: nosuch == 1\n"
        "           ^\n"
    )
    assert fmt.format_error_log([]) == ""


def test_error_log_caret_is_under_the_column() -> None:
    command = "p:e pkg:f a=$arg1:nosuchtype"
    pos = command.index("nosuchtype")
    text = fmt.format_error_log([LogEntry("Unknown type is specified", command, pos, ts_ns=0)])
    command_line, caret_line = text.splitlines()[1:]
    assert command_line[caret_line.index("^") :].startswith("nosuchtype")


def test_error_log_float_timestamps_round_to_the_microsecond() -> None:
    text = fmt.format_error_log([LogEntry("m", "c", 0, timestamp=12.000123)])
    assert text.startswith("[   12.000123] ")


# -- events/GRP/EVENT/format ----------------------------------------------------------------

COMMON = """\
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

"""


def test_event_format_entry() -> None:
    ev = StandInEvent(
        "myprobe",
        ("n", "h", "f", "b", "s", "r", "any"),
        types=("int", "x", "float", "bool", "str", "repr", None),
        event_id=1234,
    )
    assert fmt.format_event_format(ev) == (
        "name: myprobe\n"
        "ID: 1234\n" + COMMON + "\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\tfield:s64 n;\toffset:16;\tsize:8;\tsigned:1;\n"
        "\tfield:u64 h;\toffset:24;\tsize:8;\tsigned:0;\n"
        "\tfield:double f;\toffset:32;\tsize:8;\tsigned:1;\n"
        "\tfield:bool b;\toffset:40;\tsize:8;\tsigned:0;\n"
        "\tfield:__data_loc char[] s;\toffset:48;\tsize:4;\tsigned:1;\n"
        "\tfield:__data_loc char[] r;\toffset:52;\tsize:4;\tsigned:1;\n"
        "\tfield:object any;\toffset:56;\tsize:8;\tsigned:0;\n"
        "\n"
        'print fmt: "(%lx) n=%Ld h=0x%Lx f=%g b=%d s=\\"%s\\" r=\\"%s\\" any=%s", '
        "REC->__probe_ip, REC->n, REC->h, REC->f, REC->b, __get_str(s), __get_str(r), "
        "REC->any\n"
    )


def test_event_format_return() -> None:
    ev = StandInEvent("myretprobe", ("retval",), is_return=True, event_id=7)
    assert fmt.format_event_format(ev) == (
        "name: myretprobe\n"
        "ID: 7\n" + COMMON + "\tfield:unsigned long __probe_func;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\tfield:unsigned long __probe_ret_ip;\toffset:16;\tsize:8;\tsigned:0;\n"
        "\tfield:object retval;\toffset:24;\tsize:8;\tsigned:0;\n"
        "\n"
        'print fmt: "(%lx <- %lx) retval=%s", REC->__probe_func, REC->__probe_ret_ip, '
        "REC->retval\n"
    )


def test_event_format_without_fields() -> None:
    ev = StandInEvent("e", event_id=3)
    text = fmt.format_event_format(ev)
    assert text.endswith(
        "\tfield:unsigned long __probe_ip;\toffset:8;\tsize:8;\tsigned:0;\n"
        "\n"
        'print fmt: "(%lx)", REC->__probe_ip\n'
    )


# -- what the program controls: long ints, text shown bare, JSON (issue 16, items 4 and 7) --


def test_ints_too_long_for_decimal_print_in_hex() -> None:
    assert fmt.format_value(10**4299) == "1" + "0" * 4299  # within the limit: decimal
    huge = fmt.format_value(10**5000)  # int() -> str would raise ValueError
    assert huge.startswith("0x31e208") and huge.endswith("...") and len(huge) == 2 + 1024 + 3
    assert fmt.format_value(-(2**20000)) == "-0x1" + "0" * 1023 + "..."
    assert fmt.format_value(2**4000, "x") == "0x1" + "0" * 1000
    assert fmt.format_value(Color.RED, "x") == "0x1f"
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)  # the program's own, lower limit
    try:
        assert fmt.format_value(10**700) == hex(10**700)
        assert json.loads(fmt.format_json((0, 1, "t", StandInEvent("e", ("n",)), (10**700,),
                                           None)))["fields"]["n"] == hex(10**700)
    finally:
        sys.set_int_max_str_digits(old)


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain text", "plain text"),
    ('say "hi"', 'say "hi"'),  # bare: a quote is no delimiter
    ("a\nb\rc\td", "a\\nb\\rc\\td"),
    ("back\\slash", "back\\\\slash"),
    ("\ud800", "\\ud800"),
    ("\u2028\x85\x00", "\\u2028\\x85\\x00"),
    ("é€😀", "é€😀"),
])
def test_bare_text_escapes_what_could_break_a_line(raw: str, shown: str) -> None:
    assert fmt.bare(raw) == shown
    opaque = type("Opaque", (str,), {})  # fetchargs' Opaque: a description shown bare
    ev = StandInEvent("e", ("r",), symbol=f"/p/{raw}.py:3")
    text = line(ev, opaque(raw), comm=raw)
    assert text.count("\n") == 0 and text.startswith(f"{shown:>16}-1 ")
    assert text.endswith(f"(/p/{shown}.py:3+0) r={shown}")
    ret = StandInEvent("r", (), is_return=True)
    assert line(ret, caller=f"m:{raw}").endswith(f"<- m:{shown})")


def test_json_is_written_without_the_json_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # `pykprobes run --format json` must not run code the program can probe (json.dumps).
    def probed(*args: Any, **kwargs: Any) -> str:
        raise AssertionError("json.dumps ran")

    monkeypatch.setattr(json, "dumps", probed)
    ev = StandInEvent("e", ("s", "n", "f", "b"))
    values = ("\ud800\n\"\\\x7f\U000e0001é", 2**70, -0.0, None)
    text = fmt.format_json((1, 2, "c\udc80", ev, values, None))
    text.encode("utf-8")
    obj = json.loads(text)
    assert obj["fields"] == {"s": values[0], "n": 2**70, "f": -0.0, "b": None}
    assert obj["comm"] == "c\udc80"


def test_error_log_escapes_the_command_and_keeps_the_caret_under_it() -> None:
    command = "p:t/a /tmp/x\x00\ud800.py:3 x:nosuchtype"
    pos = command.index("nosuchtype")
    text = fmt.format_error_log([LogEntry("Unknown type is specified", command, pos,
                                          ts_ns=0)])
    text.encode("utf-8")
    command_line, caret_line = text.splitlines()[1:]
    assert command_line == "  Command: p:t/a /tmp/x\\x00\\ud800.py:3 x:nosuchtype"
    assert command_line[caret_line.index("^"):].startswith("nosuchtype")
