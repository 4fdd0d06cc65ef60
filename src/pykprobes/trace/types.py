"""The fetch types: what `FETCHARG:TYPE` records in place of the fetched value.

The kernel's types (u32, x64, string, ...) are casts of the fetched bytes; ours are
conversions of the fetched Python value, with the same rule as every fetch: no code of the
program runs (trace/safe.py), but for `repr`, which exists to run `__repr__` under a cap. A
value a type cannot convert is recorded as FAULT; a FAULT stays a FAULT.

Numbers are converted, text is not parsed: `:int` of `"12"` is a FAULT, as a kernel cast of a
string would not give its number either, and a value that is sometimes text and sometimes a
number would otherwise print the same. An instance of a subclass of a builtin (an IntEnum
member, a str subclass) converts as its builtin value, read with the builtin's C method,
never through the subclass's `__int__`, `__str__`, `__index__` or `__float__`.

| type          | records                                                                  |
|---------------|--------------------------------------------------------------------------|
| (none)        | `safe.describe()`: None/bool/int/float/str/bytes as is, else `<T at 0x..>` |
| int           | an int: ints and bools as ints, floats truncated (inf/nan: FAULT)         |
| float         | a float: floats, ints (too big: FAULT), bools                             |
| str, string   | text: a str (capped), bytes decoded as UTF-8 with backslash escapes, the   |
|               | repr of None/bool/int/float (an int past 4300 digits: hex, int_text),    |
|               | else the describe() text; never `str()`                                   |
| bool          | truthiness where it is the interpreter's: bool, None, numbers, builtin    |
|               | containers/str/bytes, objects defining neither `__bool__` nor `__len__`   |
| x             | an int shown in hex (`Hex`): ints and bools                               |
| repr          | `safe.capped_repr()`: the program's `__repr__`, capped at REPR_CAP        |
| type          | the qualname of the value's class (as stored, whatever its metaclass says)|
| len           | the length of an exact builtin container, str or bytes (never `__len__`)  |
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable
from typing import Any, Final

from pykprobes.trace.safe import (
    FAULT,
    REPR_CAP,
    STR_CAP,
    Fault,
    Opaque,
    capped_repr,
    class_lookup,
    describe,
    int_text,
    type_qualname,
)

__all__ = [
    "DEFAULT",
    "TYPES",
    "Converter",
    "Hex",
    "to_bool",
    "to_float",
    "to_hex",
    "to_int",
    "to_len",
    "to_repr",
    "to_str",
    "to_type",
]

#: value -> recorded value or FAULT; never raises.
Converter = Callable[[Any], Any]

_int_value: Final = int.__int__
_float_value: Final = float.__float__
_str_value: Final = str.__str__
_bytes_value: Final = bytes.__bytes__
_float_repr: Final = float.__repr__
_INT_BOOL: Final = int.__dict__["__bool__"]
_FLOAT_BOOL: Final = float.__dict__["__bool__"]
_ABSENT: Final = object()


class Hex(int):
    """An int recorded by the `x` type: compares, filters and serializes (JSON) as the int,
    prints as hex (`0x1f`, `-0x1f`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return hex(self)

    __str__ = __repr__


def _cap(text: str) -> str:
    return text if len(text) <= STR_CAP else text[:STR_CAP] + "..."


def to_int(value: Any) -> Any:
    """`int`: an int or bool as an int (True -> 1), a float truncated toward zero as `int()`
    does (inf and nan: FAULT), an int/float subclass by its builtin value; anything else
    (str included: not parsed) FAULT."""
    tp = type(value)
    if tp is int:
        return value
    if tp is bool:
        return 1 if value else 0
    try:
        if tp is float:
            return int(value)
        if issubclass(tp, int):
            return _int_value(value)
        if issubclass(tp, float):
            return int(_float_value(value))
    except (OverflowError, ValueError):
        return FAULT
    return FAULT


def to_float(value: Any) -> Any:
    """`float`: a float as is, an int or bool converted (an int too big for a float: FAULT),
    an int/float subclass by its builtin value; anything else FAULT."""
    tp = type(value)
    if tp is float:
        return value
    try:
        if tp is int or tp is bool:
            return float(value)
        if issubclass(tp, float):
            return _float_value(value)
        if issubclass(tp, int):
            return float(_int_value(value))
    except OverflowError:
        return FAULT
    return FAULT


def to_str(value: Any) -> Any:
    """`str` (alias `string`): a str capped at STR_CAP, bytes decoded as UTF-8 with invalid
    bytes as `\\xNN` (the first STR_CAP bytes), None/bool/int/float as their repr text, any
    other value as its describe() text (`<Foo at 0x...>`): `str()` of the program's objects
    would run their `__str__`."""
    tp = type(value)
    if tp is str:
        return _cap(value)
    if tp is Fault:
        return FAULT
    try:
        if value is None or tp is bool:
            return "True" if value is True else "False" if value is False else "None"
        if issubclass(tp, str):
            return _cap(_str_value(value))  # Opaque (describe text, a repr) included
        if issubclass(tp, bytes):
            return _cap(_bytes_value(value)[:STR_CAP].decode("utf-8", "backslashreplace"))
        if issubclass(tp, int):
            return _cap(int_text(_int_value(value)))
        if issubclass(tp, float):
            return _float_repr(_float_value(value))
        return _str_value(describe(value))
    except Exception:  # noqa: BLE001
        return FAULT


# The C __len__ of each exact type `len` accepts (and `bool` uses).
_LENS: Final[dict[int, Callable[[Any], int]]] = {
    id(str): str.__len__,
    id(Opaque): str.__len__,  # $stackN, a :type or :repr text: ours
    id(bytes): bytes.__len__,
    id(bytearray): bytearray.__len__,
    id(list): list.__len__,
    id(tuple): tuple.__len__,
    id(dict): dict.__len__,
    id(OrderedDict): dict.__len__,
    id(defaultdict): dict.__len__,
    id(Counter): dict.__len__,
    id(set): set.__len__,
    id(frozenset): frozenset.__len__,
    id(deque): deque.__len__,
    id(range): range.__len__,
}


def to_len(value: Any) -> Any:
    """`len`: the length of an exact str, bytes, bytearray, list, tuple, dict (and
    OrderedDict/defaultdict/Counter), set, frozenset, deque or range; anything else FAULT
    (its `__len__` would be the program's code)."""
    length = _LENS.get(id(type(value)))
    if length is None:
        return FAULT
    try:
        return length(value)
    except OverflowError:  # a range longer than sys.maxsize
        return FAULT


def to_bool(value: Any) -> Any:
    """`bool`: the value's truth where the interpreter decides it: a bool as is, None False, a
    number (an int/float subclass whose `__bool__` is the builtin's too) nonzero, an exact
    builtin container/str/bytes non-empty, an object whose class defines neither `__bool__`
    nor `__len__` True; FAULT where the program's `__bool__`/`__len__` would decide."""
    tp = type(value)
    if tp is bool:
        return value
    if value is None:
        return False
    if tp is int or tp is float:
        return value != 0
    length = _LENS.get(id(tp))
    if length is not None:
        return length(value) != 0
    if tp is Fault:
        return FAULT
    try:
        hook = class_lookup(tp, "__bool__", _ABSENT)
        if hook is _INT_BOOL:
            return _int_value(value) != 0
        if hook is _FLOAT_BOOL:
            return _float_value(value) != 0
        if hook is _ABSENT and class_lookup(tp, "__len__", _ABSENT) is _ABSENT:
            return True
    except Exception:  # noqa: BLE001
        return FAULT
    return FAULT


def to_hex(value: Any) -> Any:
    """`x`: an int (bool, int subclass: its int value) as Hex; anything else FAULT."""
    tp = type(value)
    if tp is int or tp is bool:
        return Hex(value)
    if tp is not Fault and issubclass(tp, int):
        return Hex(_int_value(value))
    return FAULT


def to_repr(value: Any) -> Any:
    """`repr`: the program's `__repr__`, bounded (safe.capped_repr, REPR_CAP characters), as
    Opaque text; an exception in it is a FAULT. The one type that runs the program's code."""
    if type(value) is Fault:
        return FAULT
    text = capped_repr(value, REPR_CAP)
    return FAULT if text is FAULT else Opaque(text)


def to_type(value: Any) -> Any:
    """`type`: the `__qualname__` of the value's class as Opaque text (read from the type
    object, so a metaclass's `__qualname__` property does not run)."""
    if type(value) is Fault:
        return FAULT
    return Opaque(type_qualname(type(value)))


#: What a fetcharg without a type records.
DEFAULT: Final[Converter] = describe

#: The fetch types by name (docs/events.md); `string` is `str`.
TYPES: Final[dict[str, Converter]] = {
    "int": to_int,
    "float": to_float,
    "str": to_str,
    "string": to_str,
    "bool": to_bool,
    "x": to_hex,
    "repr": to_repr,
    "type": to_type,
    "len": to_len,
}
