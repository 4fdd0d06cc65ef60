"""Port of the kernel's tools/testing/selftests/ftrace/test.d/kprobe/kprobe_syntax_errors.tc
(2025 mainline): its 58 `check_error` rows, each written to kprobe_events in its Python form,
with the kernel's error_log contract (`ftrace_errlog_check`): the write fails, the entry reads
`[ts] trace_kprobe: error: MESSAGE`, then `  Command: DEFINITION`, and the last line of
error_log is the caret line, 13 + pos characters long with its newline (11 for "  Command: ",
the caret under column `pos`, and "^\\n").

The Python form keeps the kernel's text where it can: `vfs_read` is
`tests.kselftest.targets:vfs_read`, `@11` (a memory address) becomes a parameter name, `:u8`
a Python fetch type. Rows without a Python form, and why (each is still written: pykprobes
refuses the kernel's text as a bad fetcharg at the same column, or says how it reads it):

- 18 BAD_REG_NAME `%none_reg`: no registers; the probed frame's variables are reached by name.
- 19 BAD_MEM_ADDR `@12345678abcde`, 20 FILE_ON_KPROBE `@+10`: no memory addresses.
- 23 DEREF_NEED_BRACE, 24 BAD_DEREF_OFFS, 25 DEREF_OPEN_BRACE, 28 TOO_MANY_OPS (`+OFFS(...)`):
  no memory dereference; a Python value is reached by `.attr` and `[KEY]` steps.
- 29 ARRAY_NO_CLOSE, 30 BAD_ARRAY_SUFFIX, 31 BAD_ARRAY_NUM, 32 ARRAY_TOO_BIG (`:u8[10]`): no
  array types; a sequence is a value, recorded as one (`:len` gives its length).
- 34 BAD_STRING `$stack0:string`: a string type for a register or stack slot; Python's `str`
  type converts any value (`$stack0` is the caller's `module:qualname`): accepted.
- 35 BAD_BITFIELD `@11:b10@a/16`: no bitfield types (a Python int has no width).
- 53 NOFENTRY_ARGS `r vfs_read $arg*`: the kernel refuses it only where return probes cannot
  read entry arguments; pykprobes' can (kretprobe_entry_arg.tc): accepted.
- 57 NO_RETVAL `r kfree $retval` ("This function returns 'void' type"): every Python function
  returns a value, None at least: accepted.
- 58 NOSUP_BTFARG `p vfs_read $arg*`: the kernel's row for a kernel without BTF; pykprobes
  always knows a function's parameters (the code object's): accepted.
"""

from __future__ import annotations

import errno
import re
from typing import NamedTuple

import pytest

from pykprobes.errors import ERRORS
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest.conftest import T

VFS_READ = f"{T}:vfs_read"
LONG65 = "12345678901234567890123456789012345678901234567890123456789012345"
#: A fetcharg body one character longer than grammar.MAX_ARGSTR_LEN (the kernel's is 63).
LONG_BODY = "file" + ".name" * 51


class Row(NamedTuple):
    """One check_error row: the kernel's command (`^` at the error), its expected code, and
    the Python form: the command (`^` at the error), the code it fails with (None: it is
    accepted), and setup lines written to kprobe_events first."""

    number: int
    kernel: str
    kernel_code: str
    python: str
    code: str | None
    setup: tuple[str, ...] = ()
    no_form: bool = False


EVENT = "kprobes/testevent"
FORK = f"{T}:kernel_clone"
ROWS = [
    Row(1, "p^100 vfs_read", "BAD_MAXACT_TYPE", f"p^100 {VFS_READ}", "BAD_MAXACT_TYPE"),
    Row(2, "r^1a111 vfs_read", "BAD_MAXACT", f"r^1a111 {VFS_READ}", "BAD_MAXACT"),
    Row(3, "r^100000 vfs_read", "MAXACT_TOO_BIG", f"r^100000 {VFS_READ}", "MAXACT_TOO_BIG"),
    Row(4, "p ^non_exist_func", "BAD_PROBE_ADDR", f"p ^{T}:non_exist_func", "BAD_PROBE_ADDR"),
    Row(5, "p ^hoge-fuga", "BAD_PROBE_ADDR", "p ^hoge-fuga", "BAD_PROBE_ADDR"),
    Row(6, "p ^hoge+1000-1000", "BAD_PROBE_ADDR", f"p ^{VFS_READ}+1000-1000",
        "BAD_PROBE_ADDR"),
    Row(7, "r ^vfs_read+10", "BAD_RETPROBE", f"r ^{VFS_READ}+10", "BAD_RETPROBE"),
    Row(8, "p:^/bar vfs_read", "NO_GROUP_NAME", f"p:^/bar {VFS_READ}", "NO_GROUP_NAME"),
    Row(9, f"p:^{LONG65}/bar vfs_read", "GROUP_TOO_LONG", f"p:^{LONG65}/bar {VFS_READ}",
        "GROUP_TOO_LONG"),
    Row(10, "p:^foo.1/bar vfs_read", "BAD_GROUP_NAME", f"p:^foo.1/bar {VFS_READ}",
        "BAD_GROUP_NAME"),
    Row(11, "p:^ vfs_read", "NO_EVENT_NAME", f"p:^ {VFS_READ}", "NO_EVENT_NAME"),
    Row(12, f"p:foo/^{LONG65} vfs_read", "EVENT_TOO_LONG", f"p:foo/^{LONG65} {VFS_READ}",
        "EVENT_TOO_LONG"),
    Row(13, "p:foo/^bar.1 vfs_read", "BAD_EVENT_NAME", f"p:foo/^bar.1 {VFS_READ}",
        "BAD_EVENT_NAME"),
    Row(14, "p vfs_read ^$retval", "RETVAL_ON_PROBE", f"p {VFS_READ} ^$retval",
        "RETVAL_ON_PROBE"),
    Row(15, "p vfs_read ^$stack10000", "BAD_STACK_NUM", f"p {VFS_READ} ^$stack10000",
        "BAD_STACK_NUM"),
    Row(16, "p vfs_read ^$arg10000", "BAD_ARG_NUM", f"p {VFS_READ} ^$arg10000", "BAD_ARG_NUM"),
    Row(17, "p vfs_read ^$none_var", "BAD_VAR", f"p {VFS_READ} ^$none_var", "BAD_VAR"),
    Row(18, "p vfs_read ^%none_reg", "BAD_REG_NAME", f"p {VFS_READ} ^%none_reg",
        "BAD_FETCH_ARG", no_form=True),
    Row(19, "p vfs_read ^@12345678abcde", "BAD_MEM_ADDR", f"p {VFS_READ} ^@12345678abcde",
        "BAD_FETCH_ARG", no_form=True),
    Row(20, "p vfs_read ^@+10", "FILE_ON_KPROBE", f"p {VFS_READ} ^@+10", "BAD_FETCH_ARG",
        no_form=True),
    Row(21, "p vfs_read arg1=\\^x", "BAD_IMM", f"p {VFS_READ} arg1=\\^x", "BAD_IMM"),
    Row(22, 'p vfs_read arg1=\\"abcd^', "IMMSTR_NO_CLOSE", f'p {VFS_READ} arg1=\\"abcd^',
        "IMMSTR_NO_CLOSE"),
    Row(23, "p vfs_read ^+0@0)", "DEREF_NEED_BRACE", f"p {VFS_READ} ^+0@0)", "BAD_FETCH_ARG",
        no_form=True),
    Row(24, "p vfs_read ^+0ab1(@0)", "BAD_DEREF_OFFS", f"p {VFS_READ} ^+0ab1(@0)",
        "BAD_FETCH_ARG", no_form=True),
    Row(25, "p vfs_read +0(+0(@0^)", "DEREF_OPEN_BRACE", f"p {VFS_READ} ^+0(+0(@0)",
        "BAD_FETCH_ARG", no_form=True),
    Row(26, "p vfs_read +0(^$comm)", "COMM_CANT_DEREF", f"p {VFS_READ} ^$comm.name",
        "COMM_CANT_DEREF"),
    Row(27, "p vfs_read ^&1", "BAD_FETCH_ARG", f"p {VFS_READ} ^&1", "BAD_FETCH_ARG"),
    Row(28, "p vfs_read +0(^+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(+0(@0))))))))))))))",
        "TOO_MANY_OPS", f"p {VFS_READ} ^+0(+0(+0(@0)))", "BAD_FETCH_ARG", no_form=True),
    Row(29, "p vfs_read +0(@11):u8[10^", "ARRAY_NO_CLOSE", f"p {VFS_READ} file:^int[10",
        "BAD_TYPE", no_form=True),
    Row(30, "p vfs_read +0(@11):u8[10]^a", "BAD_ARRAY_SUFFIX", f"p {VFS_READ} file:^int[10]a",
        "BAD_TYPE", no_form=True),
    Row(31, "p vfs_read +0(@11):u8[^10a]", "BAD_ARRAY_NUM", f"p {VFS_READ} file:^int[10a]",
        "BAD_TYPE", no_form=True),
    Row(32, "p vfs_read +0(@11):u8[^256]", "ARRAY_TOO_BIG", f"p {VFS_READ} file:^int[256]",
        "BAD_TYPE", no_form=True),
    Row(33, "p vfs_read @11:^unknown_type", "BAD_TYPE", f"p {VFS_READ} file:^unknown_type",
        "BAD_TYPE"),
    Row(34, "p vfs_read $stack0:^string", "BAD_STRING", f"p {VFS_READ} $stack0:string", None,
        no_form=True),
    Row(35, "p vfs_read @11:^b10@a/16", "BAD_BITFIELD", f"p {VFS_READ} file:^b10@a/16",
        "BAD_TYPE", no_form=True),
    Row(36, "p vfs_read ^arg123456789012345678901234567890=@11", "ARG_NAME_TOO_LONG",
        f"p {VFS_READ} ^arg123456789012345678901234567890=file", "ARG_NAME_TOO_LONG"),
    Row(37, "p vfs_read ^=@11", "NO_ARG_NAME", f"p {VFS_READ} ^=file", "NO_ARG_NAME"),
    Row(38, "p vfs_read ^var.1=@11", "BAD_ARG_NAME", f"p {VFS_READ} ^var.1=file",
        "BAD_ARG_NAME"),
    Row(39, "p vfs_read var1=@11 ^var1=@12", "USED_ARG_NAME",
        f"p {VFS_READ} var1=file ^var1=count", "USED_ARG_NAME"),
    Row(40, "p vfs_read ^+1234567(+1234567(+1234567(+1234567(+1234567(+1234567(@1234))))))",
        "ARG_TOO_LONG", f"p {VFS_READ} ^{LONG_BODY}", "ARG_TOO_LONG"),
    Row(41, "p vfs_read arg1=^", "NO_ARG_BODY", f"p {VFS_READ} arg1=^", "NO_ARG_BODY"),
    # CPython's code units are 2 bytes: an odd offset is never an instruction's start.
    Row(42, "p ^vfs_read+3", "BAD_INSN_BNDRY", f"p ^{VFS_READ}+3", "BAD_INSN_BNDRY"),
    # Multiprobe: appending to kprobes/testevent.
    Row(43, "^r:kprobes/testevent $FUNCTION_EXIT", "DIFF_PROBE_TYPE",
        f"^r:{EVENT} {T}:do_exit", "DIFF_PROBE_TYPE", setup=(f"p:{EVENT} {FORK}",)),
    Row(44, "p:kprobes/testevent $FUNCTION_FORK ^bcd=\\1", "DIFF_ARG_TYPE",
        f"p:{EVENT} {FORK} ^bcd=\\1", "DIFF_ARG_TYPE", setup=(f"p:{EVENT} {FORK} abcd=\\1",)),
    Row(45, "p:kprobes/testevent $FUNCTION_FORK ^abcd=\\1:u8", "DIFF_ARG_TYPE",
        f"p:{EVENT} {FORK} ^abcd=\\1:int", "DIFF_ARG_TYPE",
        setup=(f"p:{EVENT} {FORK} abcd=\\1",)),
    Row(46, 'p:kprobes/testevent $FUNCTION_FORK ^abcd=\\"foo"', "DIFF_ARG_TYPE",
        f'p:{EVENT} {FORK} ^abcd=\\"foo"', "DIFF_ARG_TYPE",
        setup=(f"p:{EVENT} {FORK} abcd=\\1",)),
    Row(47, "^p:kprobes/testevent $FUNCTION_FORK abcd=\\1", "SAME_PROBE",
        f"^p:{EVENT} {FORK} abcd=\\1", "SAME_PROBE", setup=(f"p:{EVENT} {FORK} abcd=\\1",)),
    Row(48, "p vfs_read^%hoge", "BAD_ADDR_SUFFIX", f"p {VFS_READ}^%hoge", "BAD_ADDR_SUFFIX"),
    Row(49, "p ^vfs_read+10%return", "BAD_RETPROBE", f"p ^{VFS_READ}+10%return",
        "BAD_RETPROBE"),
    # BTF arguments: a Python function's parameters are what BTF tells of a C function's.
    Row(50, "p vfs_read args=^$arg*", "BAD_VAR_ARGS", f"p {VFS_READ} args=^$arg*",
        "BAD_VAR_ARGS"),
    Row(51, "p vfs_read +0(^$arg*)", "BAD_VAR_ARGS", f"p {VFS_READ} ^$arg*.pos",
        "BAD_VAR_ARGS"),
    Row(52, "p vfs_read $arg* ^$arg*", "DOUBLE_ARGS", f"p {VFS_READ} $arg* ^$arg*",
        "DOUBLE_ARGS"),
    Row(53, "r vfs_read ^$arg*", "NOFENTRY_ARGS", f"r {VFS_READ} $arg*", None, no_form=True),
    Row(54, "p vfs_read+20 ^$arg*", "NOFENTRY_ARGS", f"p {VFS_READ}+20 ^$arg*",
        "NOFENTRY_ARGS"),
    Row(55, "p vfs_read ^hoge", "NO_BTFARG", f"p {VFS_READ} ^hoge", "NO_BTFARG"),
    Row(56, "p kfree ^$arg10", "NO_BTFARG", f"p {T}:kfree ^$arg10", "NO_BTFARG"),
    Row(57, "r kfree ^$retval", "NO_RETVAL", f"r {T}:kfree $retval", None, no_form=True),
    Row(58, "p vfs_read ^$arg*", "NOSUP_BTFARG", f"p {VFS_READ} $arg*", None, no_form=True),
]


def _split(command: str) -> tuple[str, int | None]:
    if "^" not in command:
        return command, None
    assert command.count("^") == 1, command
    return command.replace("^", ""), command.index("^")


def test_the_table_is_the_kernels() -> None:
    assert [r.number for r in ROWS] == list(range(1, 59))
    for row in ROWS:
        _, pos = _split(row.kernel)
        assert pos is not None, row
        assert (row.code is None) == (_split(row.python)[1] is None), row
        # Every code the rows with a Python form expect is the kernel's, in its words.
        if not row.no_form:
            assert row.code == row.kernel_code, row


def _check_error(fs: TraceFS, command: str, code: str) -> None:
    """ftrace_errlog_check: the write fails; error_log's last entry is the message, the
    command, and the caret line of 13 + pos characters (with its newline)."""
    text, pos = _split(command)
    assert pos is not None
    fs.write("error_log", "")
    with pytest.raises(TraceWriteError) as info:
        fs.write("kprobe_events", text, append=True)
    expected_errno = errno.EEXIST if code in ("DIFF_PROBE_TYPE", "DIFF_ARG_TYPE",
                                              "SAME_PROBE") else None
    if expected_errno is not None:
        assert info.value.errno == expected_errno
    assert (info.value.code, info.value.pos) == (code, pos)
    log = fs.read("error_log")
    lines = log.splitlines(keepends=True)
    assert len(lines) == 3, log
    assert re.fullmatch(r"\[\s*\d+\.\d{6}\] trace_kprobe: error: (.*)\n", lines[0]), lines[0]
    assert lines[0].rstrip("\n").endswith(f"trace_kprobe: error: {ERRORS[code]}"), log
    assert lines[1] == f"  Command: {text}\n"
    assert len(lines[-1]) == 13 + pos, log
    assert lines[-1] == " " * (11 + pos) + "^\n"


@pytest.mark.parametrize("row", [r for r in ROWS if r.code is not None],
                         ids=lambda r: f"{r.number}-{r.kernel_code}")
def test_check_error(fs: TraceFS, row: Row) -> None:
    for line in row.setup:
        fs.write("kprobe_events", line, append=True)
    before = fs.read("kprobe_events")
    assert row.code is not None
    _check_error(fs, row.python, row.code)
    assert fs.read("kprobe_events") == before  # a failed write changes nothing


@pytest.mark.parametrize("row", [r for r in ROWS if r.code is None],
                         ids=lambda r: f"{r.number}-{r.kernel_code}")
def test_accepted_where_python_has_it(fs: TraceFS, row: Row) -> None:
    """The rows the kernel refuses for a reason Python does not have."""
    fs.write("kprobe_events", row.python, append=True)
    (line,) = fs.read("kprobe_events").splitlines()
    assert line.split(" ", 1)[1].startswith(row.python.split(" ", 1)[1].split(" ")[0])
    assert fs.read("error_log") == ""


def test_the_rows_without_a_python_form_are_the_docstrings() -> None:
    assert __doc__ is not None
    for row in ROWS:
        if row.no_form:
            assert f"{row.number} {row.kernel_code}" in __doc__, row
