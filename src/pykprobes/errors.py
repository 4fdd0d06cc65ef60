"""The one error hierarchy of pykprobes.

A `KprobeError` carries the errno the kernel would return (`-EINVAL`, `-ENOENT`, ...), so that
callers can branch on `.errno` exactly as kernel code branches on the return value.
"""

from __future__ import annotations

import errno as _errno
import os


class KprobeError(Exception):
    """A registration-time error, with the kernel's errno (`errno.EINVAL`, ...)."""

    errno: int

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"[{name}] {self.args[0]}" if self.args else f"[{name}] {os.strerror(self.errno)}"


def einval(message: str) -> KprobeError:
    return KprobeError(_errno.EINVAL, message)


def enoent(message: str) -> KprobeError:
    return KprobeError(_errno.ENOENT, message)


#: The error codes and messages of probe definitions, one table for the whole package (every
#: ParseError names one of these codes). The kernel's own codes come first, in the order and the
#: words of kernel/trace/trace_probe.h ERRORS, its spelling and grammar kept ("an function
#: entry", "valiable"), restricted to those that mean something for Python: no registers, memory
#: addresses, dereference offsets, arrays, bitfields, BTF, uprobes, eprobes or tracepoints.
#: MAXACT_NO_KPROBE is the older kernels' name (newer ones say BAD_MAXACT_TYPE). Ours follow, in
#: the same style; where an older kernel said it in a pr_info(), those are its words.
ERRORS: dict[str, str] = {
    # kernel/trace/trace_probe.h
    "FILE_NOT_FOUND": "Failed to find the given file",
    "NO_REGULAR_FILE": "Not a regular file",
    "MAXACT_NO_KPROBE": "Maxactive is not for kprobe",
    "BAD_MAXACT": "Invalid maxactive number",
    "MAXACT_TOO_BIG": "Maxactive is too big",
    "BAD_PROBE_ADDR": "Invalid probed address or symbol",
    "NON_UNIQ_SYMBOL": "The symbol is not unique",
    "BAD_RETPROBE": "Retprobe address must be an function entry",
    "BAD_ADDR_SUFFIX": "Invalid probed address suffix",
    "NO_GROUP_NAME": "Group name is not specified",
    "GROUP_TOO_LONG": "Group name is too long",
    "BAD_GROUP_NAME": "Group name must follow the same rules as C identifiers",
    "NO_EVENT_NAME": "Event name is not specified",
    "EVENT_TOO_LONG": "Event name is too long",
    "BAD_EVENT_NAME": "Event name must follow the same rules as C identifiers",
    "EVENT_EXIST": "Given group/event name is already used by another event",
    "RETVAL_ON_PROBE": "$retval is not available on probe",
    "BAD_STACK_NUM": "Invalid stack number",
    "BAD_ARG_NUM": "Invalid argument number",
    "BAD_VAR": "Invalid $-valiable specified",
    "BAD_IMM": "Invalid immediate value",
    "IMMSTR_NO_CLOSE": "String is not closed with '\"'",
    "COMM_CANT_DEREF": "$comm can not be dereferenced",
    "BAD_FETCH_ARG": "Invalid fetch argument",
    "BAD_TYPE": "Unknown type is specified",
    "ARG_NAME_TOO_LONG": "Argument name is too long",
    "NO_ARG_NAME": "Argument name is not specified",
    "BAD_ARG_NAME": "Argument name must follow the same rules as C identifiers",
    "USED_ARG_NAME": "This argument name is already used",
    "ARG_TOO_LONG": "Argument expression is too long",
    "NO_ARG_BODY": "No argument expression",
    "BAD_INSN_BNDRY": "Probe point is not an instruction boundary",
    "FAIL_REG_PROBE": "Failed to register probe event",
    "DIFF_PROBE_TYPE": "Probe type is different from existing probe",
    "DIFF_ARG_TYPE": "Argument type or name is different from existing probe",
    "SAME_PROBE": "There is already the exact same probe event",
    "TOO_MANY_ARGS": "Too many arguments are specified",
    # pykprobes' own
    "BAD_PROBE_TYPE": "Probe definition must be started with 'p', 'r' or '-'",
    "NO_PROBE_POINT": "Probe point is not specified",
    "BAD_LINE": "Invalid line number",
    "NO_LINE_CODE": "No code is found at the given line",
    "NO_MODULE": "Module is not found",
    "DURATION_ON_PROBE": "$duration is not available on probe",
    # Event filters (kernel/trace/trace_events_filter.c FILT_ERR_*), and one of ours.
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
    # Hist triggers (kernel/trace/trace_events_hist.c ERRORS, there HIST_ERR_*), then ours.
    "HIST_MALFORMED_ASSIGNMENT": "Malformed assignment",
    "HIST_NAMED_MISMATCH": "Named hist trigger doesn't match existing named trigger "
                           "(includes variables)",
    "HIST_TRIGGER_EEXIST": "Hist trigger already exists",
    "HIST_TRIGGER_ENOENT_CLEAR": "Can't clear or continue a nonexistent hist trigger",
    "HIST_SET_CLOCK_FAIL": "Couldn't set trace_clock",
    "HIST_BAD_FIELD_MODIFIER": "Invalid field modifier",
    "HIST_NOT_FOUND": "Matching event histogram not found",
    "HIST_FIELD_NOT_FOUND": "Couldn't find field",
    "HIST_EMPTY_ASSIGNMENT": "Empty assignment",
    "HIST_INVALID_SORT_MODIFIER": "Invalid sort modifier",
    "HIST_EMPTY_SORT_FIELD": "Empty sort field",
    "HIST_TOO_MANY_SORT_FIELDS": "Too many sort fields (Max = 2)",
    "HIST_INVALID_SORT_FIELD": "Sort field must be a key or a val",
    "HIST_NO_KEYS": "Hist trigger must have keys",
    "HIST_BAD_SIZE": "Invalid map size (128..131072)",
    "HIST_TOO_MANY_KEYS": "Too many keys (Max = 3)",
    "HIST_TOO_MANY_VALS": "Too many values (Max = 3)",
    "HIST_STR_VAL": "String field can not be a value",
    "HIST_BAD_NAME": "Hist name must follow the same rules as C identifiers",
    "HIST_BAD_ATTR": "Invalid hist trigger attribute",
    "HIST_VARS_UNSUPPORTED": "Variables are not supported",
    "HIST_ACTIONS_UNSUPPORTED": "Actions are not supported",
    "TRIGGER_UNSUPPORTED": "Only the hist trigger is supported",
    "TRIGGER_BAD_FILTER": "Trigger filter must follow 'if'",
}


class ParseError(Exception):
    """A bad definition: the code from ERRORS, the column of the bad part, and the text."""

    def __init__(self, code: str, pos: int, text: str) -> None:
        super().__init__(ERRORS.get(code, code))
        self.code = code
        self.pos = pos
        self.text = text

    @property
    def message(self) -> str:
        return ERRORS.get(self.code, self.code)

    def caret(self) -> str:
        """The definition and a caret under the bad column, as error_log shows them."""
        return f"{self.text}\n{' ' * self.pos}^"

    def __str__(self) -> str:
        return f"{self.message}\n{self.caret()}"
