"""trace/filter.py: ftrace filter expressions. Truth tables for every operator and the logic,
what a predicate does with values of the wrong type, and every error with its column (a table
of filters with carets, as the kernel's selftests write them)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest

from pykprobes.errors import ERRORS, ParseError
from pykprobes.trace.filter import ERROR_CODES, MAX_NESTING, compile_filter

FIELDS = ("n", "f", "s", "b", "flag")


class Fault:
    """Like fetchargs' FAULT marker."""


def check(text: str, values: dict[str, Any], fields: Any = FIELDS) -> bool:
    result = compile_filter(text, fields)(values)
    assert type(result) is bool
    return result


# -- numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("n == 5", 5, True),
        ("n == 5", 6, False),
        ("n != 5", 6, True),
        ("n != 5", 5, False),
        ("n < 5", 4, True),
        ("n < 5", 5, False),
        ("n <= 5", 5, True),
        ("n <= 5", 6, False),
        ("n > 5", 6, True),
        ("n > 5", 5, False),
        ("n >= 5", 5, True),
        ("n >= 5", 4, False),
        ("n == 0x1f", 31, True),
        ("n == 0X1F", 31, True),
        ("n == 0b101", 5, True),
        ("n == -3", -3, True),
        ("n > -3", 0, True),
        ("n == +3", 3, True),
        ("n == 010", 10, True),  # decimal (the kernel would read octal 8)
        ("n == 1_000", 1000, True),
        ("n == 18446744073709551616", 2**64, True),  # no C truncation
        ("n < 1.5", 1, True),
        ("n == 1.0", 1, True),
        ("n == 1e3", 1000, True),
        ("n < 1e-3", 0, True),
        ("n == .5", 0.5, True),
        ("n == -.5", -0.5, True),
        ("n == 2", 2.0, True),  # a float value
        ("n > 2", 2.5, True),
        ("n == 1", True, True),  # a bool is a number
        ("n == 0", False, True),
        ("n & 4", 6, True),
        ("n & 4", 3, False),
        ("n & 0x10", 0x30, True),
        ("n & 1", True, True),
        ("n & 1", 1.0, False),  # & needs an int value
        ("n==5", 5, True),  # no spaces needed
        ("  n   ==   5  ", 5, True),
        ("\tn\t==\t5\n", 5, True),
    ],
)
def test_numbers(text: str, n: Any, expected: bool) -> None:
    assert check(text, {"n": n}) is expected


# -- strings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "s", "expected"),
    [
        ('s == "abc"', "abc", True),
        ('s == "abc"', "abcd", False),
        ("s == 'abc'", "abc", True),
        ('s == "it\'s"', "it's", True),
        ("s == 'say \"hi\"'", 'say "hi"', True),
        ('s == ""', "", True),
        ('s != "abc"', "abd", True),
        ('s != "abc"', "abc", False),
        ('s == "a && b || (c)"', "a && b || (c)", True),  # operators inside quotes are text
        ('s ~ "*foo*"', "xxfooyy", True),
        ('s ~ "*foo*"', "foo", True),
        ('s ~ "*foo*"', "fo", False),
        ('s ~ "foo*"', "foobar", True),
        ('s ~ "foo*"', "barfoo", False),
        ('s ~ "*foo"', "barfoo", True),
        ('s ~ "*foo"', "foobar", False),
        ('s ~ "f?o"', "fxo", True),
        ('s ~ "f?o"', "fo", False),
        ('s ~ "[abc]x"', "bx", True),
        ('s ~ "[abc]x"', "dx", False),
        ('s ~ "[!abc]x"', "dx", True),
        ('s ~ "foo"', "foo", True),  # no wildcard: the whole value
        ('s ~ "foo"', "food", False),
        ('s ~ "*"', "", True),
        ('s ~ "a.c"', "abc", False),  # a glob, not a regex
        ('s ~ "*"', "multi\nline", True),
        ('s == "abc"', b"abc", True),  # bytes compare as their UTF-8 text
        ('s == "é"', "é".encode(), True),
        ('s ~ "*x*"', b"\xffx\xfe", True),  # undecodable bytes do not raise
        ('s == "x"', b"\xff", False),
    ],
)
def test_strings(text: str, s: Any, expected: bool) -> None:
    assert check(text, {"s": s}) is expected


# -- the logic --------------------------------------------------------------------------------

BITS = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize(
    ("text", "truth"),
    [
        ("a == 1 && b == 1", lambda a, b, c: a and b),
        ("a == 1 || b == 1", lambda a, b, c: a or b),
        ("a == 1 || b == 1 && c == 1", lambda a, b, c: a or (b and c)),  # && binds tighter
        ("a == 1 && b == 1 || c == 1", lambda a, b, c: (a and b) or c),
        ("(a == 1 || b == 1) && c == 1", lambda a, b, c: (a or b) and c),
        ("a == 1 && (b == 1 || c == 1)", lambda a, b, c: a and (b or c)),
        ("!a == 1", lambda a, b, c: not a),  # ! applies to the predicate
        ("! a == 1 || b == 1", lambda a, b, c: (not a) or b),
        ("!(a == 1 || b == 1) && c == 1", lambda a, b, c: (not (a or b)) and c),
        ("!(a == 1 && !(b == 1 || !c == 1))", lambda a, b, c: not (a and not (b or not c))),
        ("!!a == 1", lambda a, b, c: a),
        ("!!!a == 1", lambda a, b, c: not a),
        ("a == 1 && b == 1 && c == 1", lambda a, b, c: a and b and c),
        ("a == 1 || b == 1 || c == 1", lambda a, b, c: a or b or c),
        ("((((a == 1))))", lambda a, b, c: a),
        ("a==1&&b==1||!(c==1)", lambda a, b, c: (a and b) or not c),
    ],
)
def test_logic_truth_tables(text: str, truth: Any) -> None:
    predicate = compile_filter(text, ("a", "b", "c"))
    for a, b, c in BITS:
        got = predicate({"a": int(a), "b": int(b), "c": int(c)})
        assert got is bool(truth(a, b, c)), (text, a, b, c)


def test_many_terms_do_not_recurse() -> None:
    text = " && ".join(["n > 0"] * 2000)
    assert compile_filter(text, ("n",))({"n": 1}) is True
    text = " || ".join(["n == 0"] * 2000 + ["n == 1"])
    assert compile_filter(text, ("n",))({"n": 1}) is True
    assert compile_filter("!" * 5001 + "n == 1", ("n",))({"n": 1}) is False


def test_nesting_up_to_the_limit() -> None:
    text = "(" * MAX_NESTING + "n == 1" + ")" * MAX_NESTING
    assert compile_filter(text, ("n",))({"n": 1}) is True


# -- common fields ------------------------------------------------------------------------


def test_common_fields() -> None:
    values = {"n": 1, "common_pid": 4321, "common_comm": "Worker-3"}
    assert check("common_pid == 4321", values)
    assert check('common_pid > 4000 && common_comm ~ "Worker*"', values)
    assert not check('common_comm == "MainThread"', values)
    assert check("common_pid == 4321", values, fields=())  # an event without fields


def test_an_event_field_shadows_a_common_field() -> None:
    # The kernel looks the event's own fields up first.
    fields = {"common_comm": "int"}
    assert check("common_comm == 3", {"common_comm": 3}, fields=fields)
    with pytest.raises(ParseError) as info:
        compile_filter('common_comm == "x"', fields)
    assert info.value.code == "FILTER_EXPECT_DIGIT"


def test_typed_fields() -> None:
    fields = {"n": "int", "h": "x", "s": "str", "r": "repr", "u": None, "o": "whatever"}
    assert check("n == 1 && h == 0x10", {"n": 1, "h": 16}, fields=fields)
    assert check('s == "a" && r ~ "<*>"', {"s": "a", "r": "<obj>"}, fields=fields)
    # Untyped (or an unknown type): a string or a number, known at hit time only.
    assert check('u == "a" || o == 1', {"u": "a", "o": 0}, fields=fields)
    assert check("u == 1", {"u": 1}, fields=fields)


def test_fields_can_be_any_iterable() -> None:
    assert compile_filter("x == 1", iter(["x"]))({"x": 1}) is True


# -- wrong types at hit time: False, never an exception -----------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("n == 5", "5"),
        ("n != 5", "5"),  # a type mismatch is False for != too
        ("n < 5", None),
        ("n != 5", None),
        ("n > 0", Fault()),
        ("n != 0", Fault()),
        ("n & 1", "1"),
        ("n == 1", b"\x01"),
        ("n == 1", [1]),
        ('n == "5"', 5),
        ('n != "5"', 5),
        ('n ~ "*"', 5),
        ('n ~ "*"', None),
        ('n != "x"', Fault()),
        ('n == "5"', ["5"]),
    ],
)
def test_a_type_mismatch_is_false(text: str, value: Any) -> None:
    assert check(text, {"n": value}) is False


def test_a_missing_value_is_false() -> None:
    assert check("n == 1", {}) is False
    assert check("n != 1", {}) is False
    assert check('s != "x"', {}) is False
    assert check("!n == 1", {}) is True  # not (False)


class HostileInt(int):
    def __eq__(self, other: object) -> bool:
        raise AssertionError("ran __eq__")

    def __lt__(self, other: object) -> bool:
        raise AssertionError("ran __lt__")

    def __and__(self, other: object) -> int:
        raise AssertionError("ran __and__")

    def __int__(self) -> int:
        raise AssertionError("ran __int__")

    def __index__(self) -> int:
        raise AssertionError("ran __index__")

    __hash__ = int.__hash__


class HostileFloat(float):
    def __lt__(self, other: object) -> bool:
        raise AssertionError("ran __lt__")

    def __float__(self) -> float:
        raise AssertionError("ran __float__")


class HostileStr(str):
    def __eq__(self, other: object) -> bool:
        raise AssertionError("ran __eq__")

    def __str__(self) -> str:
        raise AssertionError("ran __str__")

    __hash__ = str.__hash__


def test_subclasses_compare_through_the_base_type() -> None:
    # If the program's methods ran, the predicate would swallow the error and say False:
    # True here shows that they did not run.
    assert check("n == 5 && n < 6 && n & 4", {"n": HostileInt(5)})
    assert check("f < 3", {"f": HostileFloat(2.5)})
    assert check('s == "abc" && s ~ "a*"', {"s": HostileStr("abc")})
    assert check('s != "abd"', {"s": HostileStr("abc")})


def test_the_predicate_never_raises() -> None:
    class Exploding(Mapping[str, Any]):
        def __getitem__(self, key: str) -> Any:
            raise RuntimeError("boom")

        def __iter__(self) -> Any:
            raise RuntimeError("boom")

        def __len__(self) -> int:
            return 1

        def get(self, key: str, default: Any = None) -> Any:
            raise RuntimeError("boom")

    predicate = compile_filter("n == 1 || !n == 1", ("n",))
    assert predicate(Exploding()) is False
    assert predicate(None) is False  # type: ignore[arg-type]
    assert predicate(42) is False  # type: ignore[arg-type]


def test_python_is_not_a_filter() -> None:
    # Compiled to closures, never evaluated: Python syntax is just a bad filter.
    with pytest.raises(ParseError) as info:
        compile_filter("__import__('os').system('false') == 0", ("__import__",))
    assert (info.value.code, info.value.pos) == ("FILTER_INVALID_OP", 10)


# -- errors, with their columns --------------------------------------------------------------

# Each case: the filter, a caret under the column the error names, and the code.
ERROR_CASES = [
    # FILTER_INVALID_OP: at the operator (or where one should be)
    ("n = 1", "  ^", "FILTER_INVALID_OP"),
    ("n 1", "  ^", "FILTER_INVALID_OP"),
    ("n", " ^", "FILTER_INVALID_OP"),
    ("n   ", "    ^", "FILTER_INVALID_OP"),
    ("n && f == 1", "  ^", "FILTER_INVALID_OP"),
    ("n || f == 1", "  ^", "FILTER_INVALID_OP"),
    ('s =~ "x"', "  ^", "FILTER_INVALID_OP"),
    ('s !~ "x"', "  ^", "FILTER_INVALID_OP"),
    ("n => 1", "  ^", "FILTER_INVALID_OP"),
    ('f == 1 && s "x"', "            ^", "FILTER_INVALID_OP"),
    # FILTER_TOO_MANY_OPEN: at the unclosed '(' (the innermost), or one too deep
    ("(n == 1", "^", "FILTER_TOO_MANY_OPEN"),
    ("((n == 1) && (f == 2)", "^", "FILTER_TOO_MANY_OPEN"),
    ("(n == 1) && (f == 2", "            ^", "FILTER_TOO_MANY_OPEN"),
    ("(n == 1 && (f == 2)", "^", "FILTER_TOO_MANY_OPEN"),
    ('(s == ")"', "^", "FILTER_TOO_MANY_OPEN"),  # a quoted ')' closes nothing
    ("(" * 33 + "n == 1" + ")" * 33, " " * 32 + "^", "FILTER_TOO_MANY_OPEN"),
    # FILTER_TOO_MANY_CLOSE: at the extra ')'
    ("n == 1)", "      ^", "FILTER_TOO_MANY_CLOSE"),
    ("(n == 1))", "        ^", "FILTER_TOO_MANY_CLOSE"),
    (")", "^", "FILTER_TOO_MANY_CLOSE"),
    (') && (n == "x"', "^", "FILTER_TOO_MANY_CLOSE"),
    # FILTER_MISSING_QUOTE: at the opening quote
    ('s == "abc', "     ^", "FILTER_MISSING_QUOTE"),
    ("s == 'it\"s", "     ^", "FILTER_MISSING_QUOTE"),
    ('s == "a" || s == "b', "                 ^", "FILTER_MISSING_QUOTE"),
    ('(s == "a)', "      ^", "FILTER_MISSING_QUOTE"),  # before the unclosed '(', as the kernel
    # FILTER_EXPECT_STRING: at the number compared with a string field
    ("common_comm == 5", "               ^", "FILTER_EXPECT_STRING"),
    ("common_comm != 0x10", "               ^", "FILTER_EXPECT_STRING"),
    # FILTER_EXPECT_DIGIT: at the string compared with a number field
    ('common_pid == "5"', "              ^", "FILTER_EXPECT_DIGIT"),
    ('common_pid ~ "1*"', "             ^", "FILTER_EXPECT_DIGIT"),
    # FILTER_ILLEGAL_FIELD_OP: at the operator a string or a number does not take
    ('s < "abc"', "  ^", "FILTER_ILLEGAL_FIELD_OP"),
    ('s >= "abc"', "  ^", "FILTER_ILLEGAL_FIELD_OP"),
    ('s & "abc"', "  ^", "FILTER_ILLEGAL_FIELD_OP"),
    ("n ~ 5", "  ^", "FILTER_ILLEGAL_FIELD_OP"),
    ('common_comm < "x"', "            ^", "FILTER_ILLEGAL_FIELD_OP"),
    # FILTER_FIELD_NOT_FOUND: at the field name
    ("nosuch == 1", "^", "FILTER_FIELD_NOT_FOUND"),
    ("n == 1 && nosuch == 1", "          ^", "FILTER_FIELD_NOT_FOUND"),
    ("  N == 1", "  ^", "FILTER_FIELD_NOT_FOUND"),  # names are case-sensitive
    ("5 == n", "^", "FILTER_FIELD_NOT_FOUND"),
    ("common_tid == 1", "^", "FILTER_FIELD_NOT_FOUND"),
    # FILTER_ILLEGAL_INTVAL: at the number
    ("n == 12abc", "     ^", "FILTER_ILLEGAL_INTVAL"),
    ("n == 0xZZ", "     ^", "FILTER_ILLEGAL_INTVAL"),
    ("n == 0x1.5", "     ^", "FILTER_ILLEGAL_INTVAL"),
    ("n == 1.2.3", "     ^", "FILTER_ILLEGAL_INTVAL"),
    ("n < -.", "    ^", "FILTER_ILLEGAL_INTVAL"),
    ("n & 1.5", "    ^", "FILTER_ILLEGAL_INTVAL"),  # & takes an int
    # more digits than CPython converts (its int-to-str limit, 4300 digits): an error, not
    # the ValueError int() raises
    ("n == " + "9" * 5000, "     ^", "FILTER_ILLEGAL_INTVAL"),
    ("n > -" + "1" * 4301, "    ^", "FILTER_ILLEGAL_INTVAL"),
    # FILTER_INVALID_VALUE: at a value that is neither a number nor quoted
    ("s == abc", "     ^", "FILTER_INVALID_VALUE"),
    ("n == -x", "     ^", "FILTER_INVALID_VALUE"),
    ("n == true", "     ^", "FILTER_INVALID_VALUE"),
    ("n == = 1", "     ^", "FILTER_INVALID_VALUE"),
    ("n == !1", "     ^", "FILTER_INVALID_VALUE"),
    # FILTER_TOO_MANY_PREDS: at a term that is not joined by && or ||
    ("n == 1 f == 2", "       ^", "FILTER_TOO_MANY_PREDS"),
    ("n == 1 & f == 2", "       ^", "FILTER_TOO_MANY_PREDS"),
    ("n == 1 | f == 2", "       ^", "FILTER_TOO_MANY_PREDS"),
    ("(n == 1) f == 2", "         ^", "FILTER_TOO_MANY_PREDS"),
    ("(n == 1 f == 2)", "        ^", "FILTER_TOO_MANY_PREDS"),
    ('s == "x"y', "        ^", "FILTER_TOO_MANY_PREDS"),
    ("n == 1 (f == 2)", "       ^", "FILTER_TOO_MANY_PREDS"),
    # FILTER_MISSING_OPERAND: where a predicate or a value should be
    ("", "^", "FILTER_MISSING_OPERAND"),
    ("   ", "   ^", "FILTER_MISSING_OPERAND"),
    ("n == 1 &&", "         ^", "FILTER_MISSING_OPERAND"),
    ("n == 1 ||  ", "           ^", "FILTER_MISSING_OPERAND"),
    ("&& n == 1", "^", "FILTER_MISSING_OPERAND"),
    ("n == 1 && && f == 1", "          ^", "FILTER_MISSING_OPERAND"),
    ("()", " ^", "FILTER_MISSING_OPERAND"),
    ("!", " ^", "FILTER_MISSING_OPERAND"),
    ("!()", "  ^", "FILTER_MISSING_OPERAND"),
    ("n ==", "    ^", "FILTER_MISSING_OPERAND"),
    ("n == && f == 1", "     ^", "FILTER_MISSING_OPERAND"),
    ("(n ==)", "     ^", "FILTER_MISSING_OPERAND"),
    ('"x" == s', "^", "FILTER_MISSING_OPERAND"),
    ("== 1", "^", "FILTER_MISSING_OPERAND"),
]


@pytest.mark.parametrize(("text", "caret", "code"), ERROR_CASES)
def test_errors_name_the_column(text: str, caret: str, code: str) -> None:
    with pytest.raises(ParseError) as info:
        compile_filter(text, FIELDS)
    err = info.value
    assert (err.code, err.pos, err.text) == (code, caret.index("^"), text)
    assert err.caret() == f"{text}\n{caret}"


def test_every_error_code_is_tested() -> None:
    assert {code for _, _, code in ERROR_CASES} == set(ERROR_CODES)


# The messages: the kernel's FILT_ERR_* texts (kernel/trace/trace_events_filter.c), and ours
# for FILTER_MISSING_OPERAND. They belong in errors.ERRORS, the one table of messages.
MESSAGES = {
    "FILTER_INVALID_OP": "Invalid operator",
    "FILTER_TOO_MANY_OPEN": "Too many '('",
    "FILTER_TOO_MANY_CLOSE": "Too few '('",
    "FILTER_MISSING_QUOTE": "Missing matching quote",
    "FILTER_EXPECT_STRING": "Expecting string field",
    "FILTER_EXPECT_DIGIT": "Expecting numeric field",
    "FILTER_ILLEGAL_FIELD_OP": "Illegal operation for field type",
    "FILTER_FIELD_NOT_FOUND": "Field not found",
    "FILTER_ILLEGAL_INTVAL": "Illegal integer value",
    "FILTER_INVALID_VALUE": "Invalid value (did you forget quotes)?",
    "FILTER_TOO_MANY_PREDS": "Too many terms in predicate expression",
    "FILTER_MISSING_OPERAND": "Missing operand",
}


def test_messages_in_the_errors_table() -> None:
    assert set(MESSAGES) == set(ERROR_CODES)
    assert {code: ERRORS.get(code) for code in ERROR_CODES} == MESSAGES
