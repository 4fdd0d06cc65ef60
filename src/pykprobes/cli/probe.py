"""`pykprobes probe -L/-V TARGET` and `pykprobes check DEF...` (perf probe's -L and -V)."""

from __future__ import annotations

import argparse
import dis
import errno
import importlib
import linecache
import sys
from types import CodeType
from typing import Any

from pykprobes.cli.errors import print_write_error


def add_parsers(commands: Any) -> None:
    probe = commands.add_parser(
        "probe", help="show where a function can be probed (-L) and what it can fetch (-V)",
        description="Like perf probe -L / -V: the probe-able lines of TARGET "
                    "(pkg.mod:Qual.name) with their offsets and source, or the variables "
                    "available there. Imports TARGET's module.")
    what = probe.add_mutually_exclusive_group(required=True)
    what.add_argument("-L", "--line", metavar="TARGET", help="list lines and offsets")
    what.add_argument("-V", "--vars", metavar="TARGET", help="list available variables")
    probe.set_defaults(func=cmd_probe)
    check = commands.add_parser(
        "check", help="validate definitions without running anything",
        description="Parse each definition and resolve its target (modules not imported "
                    "are found without being imported); print the error with a caret.")
    check.add_argument("definitions", nargs="+", metavar="DEF")
    check.set_defaults(func=cmd_check)


def _resolve(target: str) -> tuple[str, CodeType, int]:
    from pykprobes.core import resolve

    spec, _, offs = target.partition("+")
    module, qualname = resolve.split_symbol(spec)
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise
    except Exception as exc:
        raise ImportError(f"importing {module} raised {type(exc).__name__}: {exc}") from exc
    found = resolve.resolve_imported(mod, qualname)
    return module, found.code, int(offs, 0) if offs else 0


def cmd_probe(args: argparse.Namespace) -> int:
    from pykprobes.errors import KprobeError

    target: str = args.line if args.line is not None else args.vars
    try:
        module, code, offset = _resolve(target)
    except (KprobeError, ImportError, ValueError) as exc:
        print(f"pykprobes: error: {target}: {exc}", file=sys.stderr)
        return 1
    if args.line:
        _list_lines(module, code)
    else:
        _list_vars(module, code, offset)
    return 0


def _list_lines(module: str, code: CodeType) -> None:
    from pykprobes import insn

    starts = set(insn.starts(code))
    by_line: dict[int, list[int]] = {}
    for start, end, line in code.co_lines():
        if line is None:
            continue
        for off in range(start, end, 2):
            if off in starts:
                by_line.setdefault(line, []).append(off)
    print(f"<{module}:{code.co_qualname}@{code.co_filename}:{code.co_firstlineno}>")
    last = max([code.co_firstlineno, *by_line])
    for lineno in range(code.co_firstlineno, last + 1):
        source = linecache.getline(code.co_filename, lineno).rstrip("\n")
        offsets = by_line.get(lineno)
        if offsets:
            print(f"  {lineno:>5}  {source:<60} +{','.join(map(str, offsets))}")
        else:
            print(f"         {source}")


def _list_vars(module: str, code: CodeType, offset: int) -> None:
    nargs = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04) + \
        bool(code.co_flags & 0x08)
    args = code.co_varnames[:nargs]
    local = code.co_varnames[nargs:]
    print(f"Available variables at {module}:{code.co_qualname}+{offset}")
    print(f"        @<{code.co_qualname}+{offset}>")
    for n, name in enumerate(args, 1):
        print(f"                argument  {name}  ($arg{n})")
    for name in local:
        print(f"                local     {name}")
    for name in code.co_cellvars:
        print(f"                cell      {name}")
    for name in code.co_freevars:
        print(f"                free      {name}")
    loads = sorted({i.argval for i in dis.get_instructions(code)
                    if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")})
    if loads:
        print(f"        globals read: {', '.join(map(str, loads))}")


def cmd_check(args: argparse.Namespace) -> int:
    from pykprobes.trace.tracefs import TraceFS, TraceWriteError

    fs = TraceFS(buffer_size_kb=4)
    status = 0
    for definition in args.definitions:
        try:
            event = fs.define(definition)
            if event is not None:
                _check_waiting(event)
        except TraceWriteError as exc:
            print_write_error(exc)
            status = 1
            continue
        if event is not None:
            print(f"ok: {event.group}/{event.name}: {definition}")
    fs.clear()
    return status


def _check_waiting(event: Any) -> None:
    """An event on a module not imported yet registers probes that wait for the import,
    which alone would find a missing symbol, a bad offset, an unknown variable or $argN:
    find them now as the import will, from the module's compiled source (core/modules.py
    check_waiting_target). Raises TraceWriteError as a bad definition does."""
    from pykprobes import errors
    from pykprobes.core import registry, resolve
    from pykprobes.core.address import ProbeAddress
    from pykprobes.errors import KprobeError, ParseError
    from pykprobes.trace import fetchargs
    from pykprobes.trace.tracefs import TraceWriteError

    d = event.definition
    text = d.text
    for probe in event.probes:
        if isinstance(getattr(probe, "addr", None), ProbeAddress) or probe.symbol_name is None:
            continue  # resolved on an imported module by the definition itself
        try:
            module, qualname = resolve.split_symbol(probe.symbol_name)
            code = registry.check_waiting_target(module, qualname, probe.offset)
        except KprobeError as exc:
            pos = text.find(" ") + 1
            raise TraceWriteError(
                exc.errno, f"{errors.ERRORS['BAD_PROBE_ADDR']} ({exc})\n{text}\n{' ' * pos}^"
            ) from exc
        if code is None:
            continue
        try:
            fetchargs.compile_fetchargs(d.args, is_return=event.is_return, text=text, code=code)
        except ParseError as exc:
            raise TraceWriteError(errno.EINVAL, str(exc)) from exc
