"""pykprobes.grammar on bad definitions, in the style of the kernel's selftest
tools/testing/selftests/ftrace/test.d/kprobe/kprobe_syntax_errors.tc: each row is a definition
with a `^` where the error's caret must be, and the code the error must carry."""

from __future__ import annotations

import pytest

from pykprobes import grammar
from pykprobes.errors import ERRORS, ParseError

LONG64 = "1234567890" * 6 + "1234"  # MAX_EVENT_NAME_LEN characters: one too many
MANY_ARGS = " ".join(["\\1"] * (grammar.MAX_TRACE_ARGS + 1))
LONG_BODY = "x" * (grammar.MAX_ARGSTR_LEN + 1)

# The codes of the table that only registration can find (the code must exist to resolve
# them): the grammar never raises these.
REGISTRATION_CODES = {
    "FILE_NOT_FOUND",
    "NO_REGULAR_FILE",
    "NON_UNIQ_SYMBOL",
    "EVENT_EXIST",
    "FAIL_REG_PROBE",
    "DIFF_PROBE_TYPE",
    "DIFF_ARG_TYPE",
    "SAME_PROBE",
    "NO_LINE_CODE",
    "NO_MODULE",
}

CASES = [
    # The command word.
    ("^", "BAD_PROBE_TYPE"),
    ("^x mod:f", "BAD_PROBE_TYPE"),
    ("^P mod:f", "BAD_PROBE_TYPE"),
    ("^pfoo mod:f", "BAD_PROBE_TYPE"),
    ("^# a comment", "BAD_PROBE_TYPE"),
    ("p ^", "NO_PROBE_POINT"),
    ("r5:g/e ^", "NO_PROBE_POINT"),
    # MAXACTIVE (kernel: p^100 vfs_read, r^1a111 vfs_read, r^100000 vfs_read).
    ("p^100 mod:f", "MAXACT_NO_KPROBE"),
    ("p^5 mod:f%return", "MAXACT_NO_KPROBE"),
    ("r^1a111 mod:f", "BAD_MAXACT"),
    ("r^0 mod:f", "BAD_MAXACT"),
    ("r^-1 mod:f", "BAD_MAXACT"),
    ("r^0x mod:f", "BAD_MAXACT"),
    ("r^100000 mod:f", "MAXACT_TOO_BIG"),
    ("r^4097:g/e mod:f", "MAXACT_TOO_BIG"),
    # The probe point (kernel: p ^hoge-fuga, p ^hoge+1000-1000, r ^vfs_read+10, ...).
    ("p ^hoge-fuga", "BAD_PROBE_ADDR"),
    ("p ^mod:hoge-fuga", "BAD_PROBE_ADDR"),
    ("p ^mod:f+1000-1000", "BAD_PROBE_ADDR"),
    ("p ^mod:f-4", "BAD_PROBE_ADDR"),
    ("p ^mod:f+", "BAD_PROBE_ADDR"),
    ("p ^mod:f+x", "BAD_PROBE_ADDR"),
    ("p ^mod:f+0x100000000", "BAD_PROBE_ADDR"),
    ("p ^:f", "BAD_PROBE_ADDR"),
    ("p ^mod:", "BAD_PROBE_ADDR"),
    ("p ^mod..sub:f", "BAD_PROBE_ADDR"),
    ("p ^mod:1f", "BAD_PROBE_ADDR"),
    ("p ^mod:f.<locals>", "BAD_PROBE_ADDR"),
    ("p ^mod:<locals>.f", "BAD_PROBE_ADDR"),
    ("p ^mod:f.<module>", "BAD_PROBE_ADDR"),
    ("p ^mod:<>", "BAD_PROBE_ADDR"),
    ("p ^%return", "BAD_PROBE_ADDR"),
    ("p ^.py:3", "BAD_PROBE_ADDR"),
    ("p mod:f^%hoge", "BAD_ADDR_SUFFIX"),
    ("p mod:f+2^%", "BAD_ADDR_SUFFIX"),
    ("p:/bar mod:f^%returns", "BAD_ADDR_SUFFIX"),  # the probe point before the names
    ("r ^mod:f+10", "BAD_RETPROBE"),
    ("p ^mod:f+10%return", "BAD_RETPROBE"),
    ("r ^app.py:12", "BAD_RETPROBE"),
    ("p ^app.py:12%return", "BAD_RETPROBE"),
    ("p app.py:^0", "BAD_LINE"),
    ("p app.py:^-1", "BAD_LINE"),
    ("p app.py:^", "BAD_LINE"),
    ("p app.py:^0x10", "BAD_LINE"),
    ("p dir/app.py:^main", "BAD_LINE"),
    ("p dir/app.pyw:^1_0", "BAD_LINE"),
    # Group and event names (kernel: p:^/bar, p:^123...45/bar, p:^foo.1/bar, ...).
    ("p:^/bar mod:f", "NO_GROUP_NAME"),
    (f"p:^{LONG64}/bar mod:f", "GROUP_TOO_LONG"),
    ("p:^foo.1/bar mod:f", "BAD_GROUP_NAME"),
    ("p:^1foo/bar mod:f", "BAD_GROUP_NAME"),
    ("-:^fo-o/bar", "BAD_GROUP_NAME"),
    ("p:^ mod:f", "NO_EVENT_NAME"),
    ("r:^ mod:f", "NO_EVENT_NAME"),
    ("-:^", "NO_EVENT_NAME"),
    ("-:grp/^", "NO_EVENT_NAME"),
    ("-^foo", "NO_EVENT_NAME"),
    (f"p:foo/^{LONG64} mod:f", "EVENT_TOO_LONG"),
    (f"p:^{LONG64} mod:f", "EVENT_TOO_LONG"),
    ("p:foo/^bar.1 mod:f", "BAD_EVENT_NAME"),
    ("p:^bar-1 mod:f", "BAD_EVENT_NAME"),
    ("p:g/^a/b mod:f", "BAD_EVENT_NAME"),
    ("p:^ev:x mod:f", "BAD_EVENT_NAME"),
    ("-:^1ev", "BAD_EVENT_NAME"),
    # $-variables (kernel: p vfs_read ^$retval, ^$stack10000, ^$arg10000, ^$none_var).
    ("p mod:f ^$retval", "RETVAL_ON_PROBE"),
    ("p mod:f x=^$retval.y", "RETVAL_ON_PROBE"),
    # $duration (Python's own): a return probe's, and not dereferenced.
    ("p mod:f ^$duration", "DURATION_ON_PROBE"),
    ("p mod:f d=^$duration:int", "DURATION_ON_PROBE"),
    ("r mod:f $duration^.x", "BAD_FETCH_ARG"),
    ("p mod:f ^$stack10000", "BAD_STACK_NUM"),
    ("p mod:f ^$stack-1", "BAD_STACK_NUM"),
    ("p mod:f ^$arg10000", "BAD_ARG_NUM"),
    ("p mod:f ^$arg0", "BAD_ARG_NUM"),
    ("p mod:f n=^$arg-1", "BAD_ARG_NUM"),
    ("p mod:f ^$none_var", "BAD_VAR"),
    ("p mod:f ^$", "BAD_VAR"),
    ("p mod:f ^$arg", "BAD_VAR"),
    ("p mod:f ^$argx", "BAD_VAR"),
    ("p mod:f ^$arg:", "BAD_VAR"),
    ("p mod:f ^$arg:1x", "BAD_VAR"),
    ("p mod:f ^$stackx", "BAD_VAR"),
    ("r mod:f ^$retvalue", "BAD_VAR"),
    ("p mod:f ^$comm.name", "COMM_CANT_DEREF"),
    ("p mod:f c=^$COMM[0]", "COMM_CANT_DEREF"),
    # Immediates (kernel: arg1=\^x, arg1=\"abcd^).
    ("p mod:f arg1=\\^x", "BAD_IMM"),
    ("p mod:f \\^", "BAD_IMM"),
    ("p mod:f \\^1x", "BAD_IMM"),
    ("p mod:f \\^0x", "BAD_IMM"),
    ("p mod:f \\^nan", "BAD_IMM"),
    ('p mod:f \\^"a"b"', "BAD_IMM"),
    ("p mod:f \\^1.5.5", "BAD_IMM"),
    ('p mod:f arg1=\\"abcd^', "IMMSTR_NO_CLOSE"),
    ("p mod:f \\'^", "IMMSTR_NO_CLOSE"),
    # Bodies (kernel: p vfs_read ^&1).
    ("p mod:f ^&1", "BAD_FETCH_ARG"),
    ("p mod:f ^1abc", "BAD_FETCH_ARG"),
    ("p mod:f ^:int", "BAD_FETCH_ARG"),
    ("p mod:f x^-y", "BAD_FETCH_ARG"),
    ("p mod:f x^]", "BAD_FETCH_ARG"),
    ("p mod:f x.^", "BAD_FETCH_ARG"),
    ("p mod:f x.^1a", "BAD_FETCH_ARG"),
    ("p mod:f x^[1", "BAD_FETCH_ARG"),
    ("p mod:f x^[1 y", "BAD_FETCH_ARG"),
    ('p mod:f x[^"a] y', "BAD_FETCH_ARG"),
    ("p mod:f x[^]", "BAD_FETCH_ARG"),
    ("p mod:f x[^abc]", "BAD_FETCH_ARG"),
    ("p mod:f x[^1;]", "BAD_FETCH_ARG"),
    ("p mod:f x[ 1 ^2 ]", "BAD_FETCH_ARG"),
    ("p mod:f x[1]^y", "BAD_FETCH_ARG"),
    ("p mod:f req.headers.^", "BAD_FETCH_ARG"),
    ("p mod:f req.^.x", "BAD_FETCH_ARG"),
    ("p mod:f x^[", "BAD_FETCH_ARG"),
    ("p mod:f x['a'^b]", "BAD_FETCH_ARG"),
    # A KEY is an int or a quoted string (docs/events.md: NAME[KEY], NAME[0]); no other
    # literal, though trace.safe.get_item could look such a key up.
    ("p mod:f x[^None]", "BAD_FETCH_ARG"),
    ("p mod:f x[^True]", "BAD_FETCH_ARG"),
    ("p mod:f x[ ^2.5 ]", "BAD_FETCH_ARG"),
    ("p mod:f x[^b'k']", "BAD_FETCH_ARG"),
    ("p mod:f $stack^.x", "BAD_FETCH_ARG"),
    ("p mod:f $stack3^[0]", "BAD_FETCH_ARG"),
    ("p mod:f a=b^=c", "BAD_FETCH_ARG"),
    # Types (kernel: p vfs_read @11:^unknown_type).
    ("p mod:f x:^unknown_type", "BAD_TYPE"),
    ("p mod:f x:^", "BAD_TYPE"),
    ("p mod:f x:^u32", "BAD_TYPE"),
    ("p mod:f x:^int[3]", "BAD_TYPE"),
    ("p mod:f x:^int:str", "BAD_TYPE"),
    ("p mod:f $none:^foo", "BAD_TYPE"),
    ("p mod:f $comm:^int", "BAD_TYPE"),
    ('p mod:f \\"s":^repr', "BAD_TYPE"),
    # Argument names (kernel: ^arg1234...=@11, ^=@11, ^var.1=@11, var1=@11 ^var1=@12).
    ("p mod:f ^arg123456789012345678901234567890=x", "ARG_NAME_TOO_LONG"),
    ("p mod:f ^=x", "NO_ARG_NAME"),
    ("p mod:f ^var.1=x", "BAD_ARG_NAME"),
    ("p mod:f ^1var=x", "BAD_ARG_NAME"),
    ("p mod:f ^café=x", "BAD_ARG_NAME"),
    ("p mod:f var1=x ^var1=y", "USED_ARG_NAME"),
    ("p mod:f $arg1 ^$arg1", "USED_ARG_NAME"),
    ("p mod:f $comm ^comm=x", "USED_ARG_NAME"),
    ("p mod:f x.a x.b ^arg1=\\1", "USED_ARG_NAME"),
    ("p mod:f ^common_pid=x", "USED_ARG_NAME"),
    (f"p mod:f ^{LONG_BODY}", "ARG_TOO_LONG"),
    (f"p mod:f n=^{LONG_BODY}", "ARG_TOO_LONG"),
    ("p mod:f arg1=^", "NO_ARG_BODY"),
    (f"p mod:f ^{MANY_ARGS}", "TOO_MANY_ARGS"),
    # CPython's instructions are 2-byte code units (kernel: p ^vfs_read+3).
    ("p ^mod:f+3", "BAD_INSN_BNDRY"),
    ("p:ev ^mod:<module>+0x11 x", "BAD_INSN_BNDRY"),
    # The kernel's order: the instruction boundary is checked last, at registration.
    ("p mod:f+3 ^$retval", "RETVAL_ON_PROBE"),
]


def _split(case: str) -> tuple[str, int]:
    assert case.count("^") == 1, case
    return case.replace("^", ""), case.index("^")


@pytest.mark.parametrize(("case", "code"), CASES, ids=[f"{c}:{s[:40]}" for s, c in CASES])
def test_error(case: str, code: str) -> None:
    text, pos = _split(case)
    with pytest.raises(ParseError) as info:
        grammar.parse(text)
    error = info.value
    assert (error.code, error.pos) == (code, pos), error.caret()
    assert error.text == text
    assert error.message == ERRORS[code]


# The cases that the boot form can say by turning every space into a comma: not empty, no
# comma or semicolon of their own, and no bracket or quote (whose spaces stay spaces).
BOOT_CASES = [
    (s, c) for s, c in CASES if s.strip("^ ") and not any(ch in s for ch in ",;[]'\"")
]


@pytest.mark.parametrize(("case", "code"), BOOT_CASES, ids=[s[:40] for s, _ in BOOT_CASES])
def test_error_in_boot_form(case: str, code: str) -> None:
    """The same errors through parse_boot(), where commas stand for spaces."""
    text, pos = _split(case)
    boot = text.replace(" ", ",")
    (result,) = grammar.parse_boot(boot)
    stripped = text.strip()
    assert result[0] == stripped
    error = result[1]
    assert isinstance(error, ParseError)
    assert (error.code, error.pos) == (code, pos - (len(text) - len(text.lstrip())))


def test_table_covers_every_grammar_code() -> None:
    assert len(CASES) >= 40
    # Filters (test_filter.py) and triggers (test_hist.py) have tables of their own.
    grammar_codes = {code for code in ERRORS
                     if not code.startswith(("FILTER_", "HIST_", "TRIGGER_"))}
    assert {code for _, code in CASES} == grammar_codes - REGISTRATION_CODES
    assert set(ERRORS) >= REGISTRATION_CODES


def test_error_rendering() -> None:
    with pytest.raises(ParseError) as info:
        grammar.parse("p:foo/bar.1 mod:f")
    assert str(info.value) == (
        "Event name must follow the same rules as C identifiers\n"
        "p:foo/bar.1 mod:f\n"
        "      ^"
    )


KERNEL_WORDS = {
    "BAD_RETPROBE": "Retprobe address must be an function entry",
    "BAD_VAR": "Invalid $-valiable specified",
    "IMMSTR_NO_CLOSE": "String is not closed with '\"'",
    "BAD_GROUP_NAME": "Group name must follow the same rules as C identifiers",
    "TOO_MANY_ARGS": "Too many arguments are specified",
}


@pytest.mark.parametrize(("code", "message"), KERNEL_WORDS.items())
def test_kernel_words(code: str, message: str) -> None:
    """The kernel's messages, its spelling and grammar included."""
    assert ERRORS[code] == message
