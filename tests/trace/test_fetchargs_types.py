"""trace/types.py: every fetch type, and that none but `repr` runs the program's code."""

from __future__ import annotations

import json
import math
import sys
from collections import Counter, OrderedDict, defaultdict, deque
from enum import IntEnum, IntFlag
from typing import Any

import pytest

from pykprobes import grammar
from pykprobes.core.regs import Regs
from pykprobes.trace.fetchargs import compile_fetcharg
from pykprobes.trace.safe import FAULT, REPR_CAP, STR_CAP, Opaque
from pykprobes.trace.types import (
    DEFAULT,
    TYPES,
    Hex,
    to_bool,
    to_float,
    to_hex,
    to_int,
    to_len,
    to_repr,
    to_str,
    to_type,
)

CALLS: list[str] = []


@pytest.fixture(autouse=True)
def _no_calls() -> Any:
    CALLS.clear()
    yield
    CALLS.clear()


class Hooked:
    """Every conversion hook, each logged."""

    def __repr__(self) -> str:
        CALLS.append("__repr__")
        return "Hooked(" + "x" * 1000 + ")"

    def __str__(self) -> str:
        CALLS.append("__str__")
        return "hooked"

    def __len__(self) -> int:
        CALLS.append("__len__")
        return 3

    def __bool__(self) -> bool:
        CALLS.append("__bool__")
        return False

    def __int__(self) -> int:
        CALLS.append("__int__")
        return 1

    def __index__(self) -> int:
        CALLS.append("__index__")
        return 1

    def __float__(self) -> float:
        CALLS.append("__float__")
        return 1.0


class OnlyLen:
    def __len__(self) -> int:
        CALLS.append("__len__")
        return 0


class Nothing:
    pass


class MyInt(int):
    def __int__(self) -> int:
        CALLS.append("MyInt.__int__")
        return 0

    def __index__(self) -> int:
        CALLS.append("MyInt.__index__")
        return 0

    def __bool__(self) -> bool:
        CALLS.append("MyInt.__bool__")
        return False

    def __repr__(self) -> str:
        CALLS.append("MyInt.__repr__")
        return "lie"


class MyStr(str):
    def __str__(self) -> str:
        CALLS.append("MyStr.__str__")
        return "lie"


class MyList(list[int]):
    def __len__(self) -> int:
        CALLS.append("MyList.__len__")
        return 0


class Color(IntEnum):
    RED = 1


class Perm(IntFlag):
    R = 4
    W = 2


def test_table() -> None:
    assert set(TYPES) == {"int", "float", "str", "string", "bool", "x", "repr", "type", "len"}
    # The grammar decides which type names there are; fetchargs takes its converter by name.
    assert set(TYPES) == grammar.FETCH_TYPES
    assert TYPES["string"] is TYPES["str"]
    assert DEFAULT("x") == "x"


def test_int() -> None:
    assert to_int(5) == 5
    assert to_int(True) == 1 and type(to_int(True)) is int
    assert to_int(2.9) == 2
    assert to_int(-2.9) == -2
    assert to_int(float("inf")) is FAULT
    assert to_int(float("nan")) is FAULT
    assert to_int("12") is FAULT  # text is not parsed
    assert to_int(None) is FAULT
    assert to_int(Color.RED) == 1 and type(to_int(Color.RED)) is int
    assert to_int(MyInt(7)) == 7
    assert to_int(Hooked()) is FAULT
    assert to_int(FAULT) is FAULT
    assert CALLS == []


def test_float() -> None:
    assert to_float(1.5) == 1.5
    assert to_float(2) == 2.0 and type(to_float(2)) is float
    assert to_float(False) == 0.0
    assert to_float(10**400) is FAULT
    assert math.isnan(to_float(float("nan")))
    assert to_float("1.5") is FAULT
    assert to_float(MyInt(3)) == 3.0
    assert to_float(Hooked()) is FAULT
    assert CALLS == []


def test_str() -> None:
    assert to_str("text") == "text"
    assert to_str("y" * 1000) == "y" * STR_CAP + "..."
    assert to_str(b"caf\xc3\xa9 \xff") == "café \\xff"
    assert to_str(None) == "None"
    assert to_str(True) == "True"
    assert to_str(12) == "12"
    assert to_str(1.5) == "1.5"
    assert to_str(Color.RED) == "1"
    assert to_str(MyInt(7)) == "7"
    value = to_str(MyStr("real"))
    assert value == "real" and type(value) is str
    hooked = Hooked()
    assert to_str(hooked) == f"<Hooked at {id(hooked):#x}>"
    assert type(to_str(hooked)) is str
    # More digits than int -> str allows: hex, which has no limit (safe.int_text), capped.
    huge = to_str(10**5000)
    assert huge.startswith("0x31e208") and huge.endswith("...") and len(huge) == STR_CAP + 3
    assert to_str(FAULT) is FAULT
    assert CALLS == []


def test_bool() -> None:
    assert to_bool(True) is True
    assert to_bool(None) is False
    assert to_bool(0) is False
    assert to_bool(0.0) is False
    assert to_bool(3) is True
    assert to_bool("") is False
    assert to_bool([0]) is True
    assert to_bool({}) is False
    assert to_bool(Nothing()) is True  # no __bool__, no __len__: always true
    assert to_bool(Perm.R) is True  # int's __bool__ comes first in IntFlag's MRO
    assert to_bool(Perm(0)) is False
    assert to_bool(Hooked()) is FAULT
    assert to_bool(OnlyLen()) is FAULT
    assert to_bool(MyInt(1)) is FAULT  # its own __bool__
    assert to_bool(FAULT) is FAULT
    assert CALLS == []


def test_hex() -> None:
    value = to_hex(31)
    assert type(value) is Hex and value == 31
    assert str(value) == repr(value) == f"{value}" == "0x1f"
    assert str(to_hex(-31)) == "-0x1f"
    assert str(to_hex(True)) == "0x1"
    assert str(to_hex(MyInt(255))) == "0xff"
    assert json.dumps(value) == "31"
    assert to_hex(1.5) is FAULT
    assert to_hex("31") is FAULT
    assert to_hex(Hooked()) is FAULT
    assert to_hex(FAULT) is FAULT
    assert CALLS == []


def test_len() -> None:
    for value in ("abc", b"abc", bytearray(b"abc"), [1, 2, 3], (1, 2, 3), {1, 2, 3},
                  frozenset((1, 2, 3)), deque((1, 2, 3)), range(3), {1: 1, 2: 2, 3: 3},
                  OrderedDict.fromkeys("abc"), defaultdict(int, a=1, b=2, c=3),
                  Counter("abc"), Opaque("abc")):  # fmt: skip
        assert to_len(value) == 3, value
    assert to_len(range(sys.maxsize * 2)) is FAULT
    assert to_len(Hooked()) is FAULT
    assert to_len(MyList([1])) is FAULT
    assert to_len(5) is FAULT
    assert to_len(FAULT) is FAULT
    assert CALLS == []


def test_type() -> None:
    assert to_type(5) == "int"
    assert to_type(Hooked()) == "Hooked"
    assert to_type(Color.RED) == "Color"
    assert isinstance(to_type(5), Opaque)
    assert to_type(FAULT) is FAULT
    assert CALLS == []


def test_repr_runs_repr_capped() -> None:
    text = to_repr(Hooked())
    assert CALLS == ["__repr__"]
    assert isinstance(text, Opaque)
    assert len(text) == REPR_CAP + 3 and text.endswith("...")
    assert to_repr("s") == "'s'"
    assert to_repr([1, "a"]) == "[1, 'a']"
    assert to_repr(FAULT) is FAULT

    class Broken:
        def __repr__(self) -> str:
            raise ValueError

    assert to_repr(Broken()) is FAULT


def test_default_runs_nothing() -> None:
    for value in (Hooked(), MyInt(3), MyStr("a"), MyList([1]), OnlyLen()):
        DEFAULT(value)
    assert CALLS == []


def test_types_through_fetchargs() -> None:
    hooked = Hooked()  # noqa: F841 - read by the fetchers
    number = 255  # noqa: F841
    regs = Regs(sys._getframe(), 0)

    def fetch(type_name: str, body: str = "hooked") -> Any:
        text = f"p m:f {body}:{type_name}"
        return compile_fetcharg(body, type_name, is_return=False, text=text, pos=6)(regs)

    for type_name in ("int", "float", "bool", "x", "len"):
        assert fetch(type_name) is FAULT, type_name
    assert fetch("str").startswith("<Hooked at 0x")
    assert fetch("type") == "Hooked"
    assert CALLS == []
    assert fetch("repr").startswith("Hooked(xxx")
    assert CALLS == ["__repr__"]
    assert str(fetch("x", "number")) == "0xff"
    assert fetch("string", "number") == "255"
    assert fetch("len", "nothing") is FAULT
