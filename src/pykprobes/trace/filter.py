"""Event filters: ftrace's filter expressions (Documentation/trace/events.rst, "Event
filtering"; kernel/trace/trace_events_filter.c), compiled to Python closures.

    compile_filter('common_comm ~ "Worker*" && (n > 0x10 || !(name == "x"))', fields)

- Predicates: `FIELD OP VALUE`. Numbers (decimal, `0x` hex, a sign, and, for Python's
  floats, `1.5` / `1e3`) take `== != < <= > >=` and `&` (bitwise and, true when not zero:
  an int only). Quoted strings (`"..."` or `'...'`, no escapes, as in the kernel) take
  `==`, `!=` and `~`, a glob (`*`, `?`, `[...]`, `[!...]`) matched against the whole value.
- Logic: `&&` (binds tighter), `||`, `!` before a predicate or a parenthesis, parentheses
  (nested at most MAX_NESTING deep, so that neither compiling nor a hit can recurse far).
- Fields: the event's fields, then the common fields `common_pid` (the thread id the record
  carries) and `common_comm` (the thread's name). `fields` is the event's field names, or a
  mapping from name to fetch type (`"int"`, `"x"`, `"str"`, ...; None when untyped): with a
  known type, comparing a number field with a string or a string field with a number is an
  error at compile time (the kernel's EXPECT_DIGIT / EXPECT_STRING), as it always is for the
  common fields.

`compile_filter(text, fields)` returns `predicate(values_by_name) -> bool`, where
`values_by_name` maps every field name, `common_pid` and `common_comm` to its value. The
predicate never raises and runs no code of the program: a value of the wrong type (a string
where a number is compared, FAULT, None, a missing field) makes its comparison False, `!=`
included. Numbers compare as Python numbers (no C integer truncation); bytes values compare
as their UTF-8 text (undecodable bytes as surrogate escapes); subclasses of int, float and
str compare through the base type.

A bad filter raises `ParseError(code, pos, text)` with `pos` the column of the bad part
(ERROR_CODES lists the codes; the messages are the kernel's, in errors.ERRORS):

    FILTER_INVALID_OP         Invalid operator                     at the operator
    FILTER_TOO_MANY_OPEN      Too many '('                         at the unclosed '('
    FILTER_TOO_MANY_CLOSE     Too few '('                          at the extra ')'
    FILTER_MISSING_QUOTE      Missing matching quote               at the opening quote
    FILTER_EXPECT_STRING      Expecting string field               at the number
    FILTER_EXPECT_DIGIT       Expecting numeric field              at the string
    FILTER_ILLEGAL_FIELD_OP   Illegal operation for field type     at the operator
    FILTER_FIELD_NOT_FOUND    Field not found                      at the field name
    FILTER_ILLEGAL_INTVAL     Illegal integer value                at the number
    FILTER_INVALID_VALUE      Invalid value (did you forget quotes)?  at the value
    FILTER_TOO_MANY_PREDS     Too many terms in predicate expression  at the extra term
    FILTER_MISSING_OPERAND    Missing operand                      where one was expected

The first eleven are the kernel's FILT_ERR_* codes and messages; the kernel reports a missing
operand as INVALID_VALUE after an operator and with no message elsewhere, hence the last one.
Quotes and parentheses are checked over the whole text before anything else, as the kernel's
calc_stack() does. Unlike the kernel, a number with leading zeros is decimal, not octal.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeAlias

from pykprobes.errors import ParseError

__all__ = ["COMMON_FIELDS", "ERROR_CODES", "MAX_NESTING", "Predicate", "compile_filter"]

#: A compiled filter: values by field name -> whether the record passes.
Predicate: TypeAlias = Callable[[Mapping[str, Any]], bool]

#: The common fields every event has, and their kinds.
COMMON_FIELDS: Final = {"common_pid": "num", "common_comm": "str"}

#: How deep parentheses may nest.
MAX_NESTING: Final = 32

ERROR_CODES: Final = (
    "FILTER_INVALID_OP",
    "FILTER_TOO_MANY_OPEN",
    "FILTER_TOO_MANY_CLOSE",
    "FILTER_MISSING_QUOTE",
    "FILTER_EXPECT_STRING",
    "FILTER_EXPECT_DIGIT",
    "FILTER_ILLEGAL_FIELD_OP",
    "FILTER_FIELD_NOT_FOUND",
    "FILTER_ILLEGAL_INTVAL",
    "FILTER_INVALID_VALUE",
    "FILTER_TOO_MANY_PREDS",
    "FILTER_MISSING_OPERAND",
)

# Fetch types whose values are numbers or strings (anything else: known at hit time only).
_NUMERIC_TYPES: Final = frozenset({"int", "x", "float", "bool", "len"})
_STRING_TYPES: Final = frozenset({"str", "string", "repr", "type", "qualname"})

# Longest first, so that "<=" is not read as "<" (the kernel's ops[] order, for the same
# reason).
_OPS: Final = ("==", "!=", "<=", ">=", "<", ">", "~", "&")
_STRING_OPS: Final = frozenset({"==", "!=", "~"})
_COMPARE: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGITS: Final = frozenset("0123456789")


def compile_filter(text: str, fields: Iterable[str] | Mapping[str, str | None]) -> Predicate:
    """Compile the filter `text` over `fields` (see the module docstring); raises ParseError."""
    kinds: dict[str, str | None] = dict(COMMON_FIELDS)
    if isinstance(fields, Mapping):
        for name, type_name in fields.items():
            kinds[name] = _kind_of(type_name)
    else:
        for name in fields:
            kinds[name] = None
    test = _Parser(text, kinds).parse()

    def predicate(values: Mapping[str, Any]) -> bool:
        try:
            return test(values)
        except Exception:  # noqa: BLE001 - a filter never raises into the probed program
            return False

    return predicate


def _kind_of(type_name: str | None) -> str | None:
    if type_name in _NUMERIC_TYPES:
        return "num"
    if type_name in _STRING_TYPES:
        return "str"
    return None


# -- the parser -----------------------------------------------------------------------


class _Parser:
    """Recursive descent over the text, building the closures as it goes:

    or    := and ("||" and)*
    and   := unary ("&&" unary)*
    unary := "!"* ( "(" or ")" | FIELD OP VALUE )
    """

    __slots__ = ("depth", "i", "kinds", "n", "text")

    def __init__(self, text: str, kinds: dict[str, str | None]) -> None:
        self.text = text
        self.n = len(text)
        self.i = 0
        self.kinds = kinds
        self.depth = 0

    def error(self, code: str, pos: int) -> ParseError:
        return ParseError(code, pos, self.text)

    def parse(self) -> Callable[[Mapping[str, Any]], bool]:
        self.check_quotes_and_parens()
        test = self.parse_or()
        self.skip_space()
        if self.i < self.n:
            raise self.error("FILTER_TOO_MANY_PREDS", self.i)
        return test

    def check_quotes_and_parens(self) -> None:
        """Before parsing, as the kernel's calc_stack(): an unclosed quote, an unmatched ')'
        or an unclosed '(' (the innermost one) is reported first, wherever it is."""
        opened: list[int] = []
        quote = ""
        quote_at = 0
        for i, c in enumerate(self.text):
            if quote:
                if c == quote:
                    quote = ""
            elif c in "\"'":
                quote, quote_at = c, i
            elif c == "(":
                opened.append(i)
            elif c == ")":
                if not opened:
                    raise self.error("FILTER_TOO_MANY_CLOSE", i)
                opened.pop()
        if quote:
            raise self.error("FILTER_MISSING_QUOTE", quote_at)
        if opened:
            raise self.error("FILTER_TOO_MANY_OPEN", opened[-1])

    def skip_space(self) -> None:
        text, n, i = self.text, self.n, self.i
        while i < n and text[i].isspace():
            i += 1
        self.i = i

    def at(self, token: str) -> bool:
        return self.text.startswith(token, self.i)

    def parse_or(self) -> Callable[[Mapping[str, Any]], bool]:
        terms = [self.parse_and()]
        while self.at("||"):
            self.i += 2
            terms.append(self.parse_and())
        return _any(terms)

    def parse_and(self) -> Callable[[Mapping[str, Any]], bool]:
        terms = [self.parse_unary()]
        self.skip_space()
        while self.at("&&"):
            self.i += 2
            terms.append(self.parse_unary())
            self.skip_space()
        return _all(terms)

    def parse_unary(self) -> Callable[[Mapping[str, Any]], bool]:
        # `!` in a row toggle one flag: no recursion however many there are.
        invert = False
        self.skip_space()
        while self.at("!"):
            invert = not invert
            self.i += 1
            self.skip_space()
        if self.at("("):
            if self.depth == MAX_NESTING:
                raise self.error("FILTER_TOO_MANY_OPEN", self.i)
            self.depth += 1
            self.i += 1
            test = self.parse_or()
            self.skip_space()
            if not self.at(")"):
                raise self.error("FILTER_TOO_MANY_PREDS", self.i)
            self.i += 1
            self.depth -= 1
        else:
            test = self.parse_predicate()
        return _not(test) if invert else test

    def parse_predicate(self) -> Callable[[Mapping[str, Any]], bool]:
        text, n = self.text, self.n
        self.skip_space()
        start = i = self.i
        while i < n and text[i] in _NAME_CHARS:
            i += 1
        if i == start:
            raise self.error("FILTER_MISSING_OPERAND", start)
        name = text[start:i]
        if name not in self.kinds:
            raise self.error("FILTER_FIELD_NOT_FOUND", start)
        kind = self.kinds[name]
        self.i = i
        self.skip_space()
        op_pos = self.i
        op = self.read_operator()
        self.skip_space()
        value_pos = self.i
        value = self.read_value()
        if isinstance(value, str):
            if op not in _STRING_OPS:
                raise self.error("FILTER_ILLEGAL_FIELD_OP", op_pos)
            if kind == "num":
                raise self.error("FILTER_EXPECT_DIGIT", value_pos)
            return _string_test(name, op, value)
        if op == "~":
            raise self.error("FILTER_ILLEGAL_FIELD_OP", op_pos)
        if op == "&" and type(value) is not int:
            raise self.error("FILTER_ILLEGAL_INTVAL", value_pos)
        if kind == "str":
            raise self.error("FILTER_EXPECT_STRING", value_pos)
        return _number_test(name, op, value)

    def read_operator(self) -> str:
        # "&&" and "||" where an operator should be: the operator is missing.
        if not self.at("&&") and not self.at("||"):
            for op in _OPS:
                if self.at(op):
                    self.i += len(op)
                    return op
        raise self.error("FILTER_INVALID_OP", self.i)

    def read_value(self) -> int | float | str:
        text, n, i = self.text, self.n, self.i
        if i == n or self.at("&&") or self.at("||") or self.at(")"):
            raise self.error("FILTER_MISSING_OPERAND", i)
        c = text[i]
        if c in "\"'":
            end = text.index(c, i + 1)  # check_quotes_and_parens() saw it closed
            self.i = end + 1
            return text[i + 1 : end]
        sign = 1 if c in "+-" else 0
        if not (
            c in _DIGITS
            or (c in "+-." and i + 1 < n and (text[i + 1] in _DIGITS or text[i + 1] == "."))
        ):
            raise self.error("FILTER_INVALID_VALUE", i)
        j = i + sign
        is_radix = text[j : j + 2].lower() in ("0x", "0b", "0o")
        while j < n:
            d = text[j]
            if d.isalnum() or d in "._" or (d in "+-" and text[j - 1] in "eE" and not is_radix):
                j += 1
            else:
                break
        self.i = j
        token = text[i:j]
        try:
            return int(token, 0)
        except ValueError:
            pass
        digits = token[sign:]
        if digits.isdigit() and digits.isascii():
            try:
                return int(token, 10)  # leading zeros: decimal, where the kernel reads octal
            except ValueError:  # more digits than CPython's int-to-str limit (4300)
                raise self.error("FILTER_ILLEGAL_INTVAL", i) from None
        if not is_radix and any(e in digits for e in ".eE"):
            try:
                return float(token)
            except ValueError:
                pass
        raise self.error("FILTER_ILLEGAL_INTVAL", i)


# -- the closures -----------------------------------------------------------------------
#
# Each test takes the values by name and returns a bool; only exact ints, floats, bools and
# strs meet an operator, so that no __eq__/__lt__ of the program ever runs.


def _as_number(x: object) -> int | float | None:
    """The exact int or float of `x` if it is a number, through the base type's own method
    for a subclass (never the program's); else None."""
    t = type(x)
    if issubclass(t, int):
        return int.__int__(x)  # type: ignore[arg-type]
    if issubclass(t, float):
        return float.__float__(x)  # type: ignore[arg-type]
    return None


def _as_text(x: object) -> str | None:
    """The exact str of `x` if it is text (bytes as UTF-8, surrogate-escaped), else None."""
    t = type(x)
    if issubclass(t, str):
        return str.__str__(x)
    if issubclass(t, bytes):
        return bytes.__bytes__(x).decode("utf-8", "surrogateescape")  # type: ignore[arg-type]
    return None


def _number_test(name: str, op: str, literal: int | float) -> Callable[[Mapping[str, Any]], bool]:
    if op == "&":
        mask = int(literal)

        def test_mask(values: Mapping[str, Any]) -> bool:
            x = values.get(name)
            if type(x) is not int and type(x) is not bool:
                x = _as_number(x)
                if type(x) is not int:
                    return False
            return (x & mask) != 0

        return test_mask

    compare = _COMPARE[op]

    def test(values: Mapping[str, Any]) -> bool:
        x = values.get(name)
        t = type(x)
        if t is int or t is float or t is bool:
            return compare(x, literal)
        number = _as_number(x)
        if number is None:
            return False
        return compare(number, literal)

    return test


def _string_test(name: str, op: str, literal: str) -> Callable[[Mapping[str, Any]], bool]:
    if op == "~":
        match = re.compile(fnmatch.translate(literal)).match

        def test_glob(values: Mapping[str, Any]) -> bool:
            x = values.get(name)
            if type(x) is not str:
                x = _as_text(x)
                if x is None:
                    return False
            return match(x) is not None

        return test_glob

    equal = op == "=="

    def test(values: Mapping[str, Any]) -> bool:
        x = values.get(name)
        if type(x) is not str:
            x = _as_text(x)
            if x is None:
                return False
        return (x == literal) is equal

    return test


def _not(test: Callable[[Mapping[str, Any]], bool]) -> Callable[[Mapping[str, Any]], bool]:
    def negated(values: Mapping[str, Any]) -> bool:
        return not test(values)

    return negated


def _all(
    terms: list[Callable[[Mapping[str, Any]], bool]],
) -> Callable[[Mapping[str, Any]], bool]:
    if len(terms) == 1:
        return terms[0]
    if len(terms) == 2:
        a, b = terms

        def both(values: Mapping[str, Any]) -> bool:
            return a(values) and b(values)

        return both
    chain = tuple(terms)

    # A plain loop: all() over a generator costs a generator per hit.
    def every(values: Mapping[str, Any]) -> bool:
        for term in chain:  # noqa: SIM110
            if not term(values):
                return False
        return True

    return every


def _any(
    terms: list[Callable[[Mapping[str, Any]], bool]],
) -> Callable[[Mapping[str, Any]], bool]:
    if len(terms) == 1:
        return terms[0]
    if len(terms) == 2:
        a, b = terms

        def either(values: Mapping[str, Any]) -> bool:
            return a(values) or b(values)

        return either
    chain = tuple(terms)

    def some(values: Mapping[str, Any]) -> bool:
        for term in chain:  # noqa: SIM110
            if term(values):
                return True
        return False

    return some
