"""The `pykprobes` command line.

Subcommands import what they need inside their own function (docs/architecture.md, "Layers"), so
that `pykprobes --help` loads neither the core nor a mechanism.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

from pykprobes._version import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    """Print the interpreter, its capabilities and the mechanisms that would be chosen."""
    from pykprobes import env
    from pykprobes.core.arch import (
        ArchUnavailable,
        Capabilities,
        select_breakpoint,
        select_optimizer,
    )
    from pykprobes.errors import KprobeError

    print(f"pykprobes {__version__}")
    print(f"python: {platform.python_version()} ({platform.python_implementation()})")
    print(f"executable: {sys.executable}")
    print(f"sys.monitoring: {'yes' if env.HAS_SYS_MONITORING else 'no'}")
    if env.JIT_ENABLED:
        print("jit: on")
    elif env.JIT_AVAILABLE:
        print("jit: off (built in: PYTHON_JIT=1 turns it on)")
    else:
        print("jit: not built in")

    selectors: list[tuple[str, Callable[[], tuple[object, dict[str, str]]]]] = [
        ("breakpoint", select_breakpoint),
        ("optimizer", select_optimizer),
    ]
    for kind, select in selectors:
        try:
            arch, rejected = select()
        except (ArchUnavailable, KprobeError) as exc:
            # Every mechanism of this kind refused (or one is busy: EBUSY when another
            # tool holds both sys.monitoring ids); the message says why.
            print(f"{kind}: none available")
            print(f"  rejected: {exc}")
            continue
        except ImportError as exc:
            # A mechanism that cannot even be imported (a missing module, a missing
            # dependency such as `bytecode`) is reported, not raised: `info` is the command
            # people run to find out why things do not work.
            print(f"{kind}: none available")
            print(f"  cannot load: {exc}")
            continue
        print(f"{kind}: {getattr(arch, 'name', type(arch).__name__)}")
        for name, reason in rejected.items():
            print(f"  rejected {name}: {reason}")
        capabilities: Capabilities | None = getattr(arch, "capabilities", None)
        for cap, value in (capabilities.as_dict() if capabilities is not None else {}).items():
            print(f"  {cap}: {'yes' if value else 'no'}")
        # Selecting instantiates the mechanism, which may claim something (a sys.monitoring
        # tool id); give it back, since `info` only looks.
        close = getattr(arch, "close", None)
        if close is not None:
            close()
    from pykprobes.trace import backend

    # The trace hot path's implementation, with its reason (coverage's CTracer/PyTracer).
    print(f"accelerator: {backend.NAME} ({backend.REASON})")
    from pykprobes.core import codestate

    # Whether a probe hit inside a handler run by a breakpoint is seen (README, Known limits).
    seen = "counted" if codestate.UNTRACED is not None else "not seen (no C accelerator)"
    print(f"hits inside breakpoint handlers: {seen}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    # prog is fixed: under `python -m pykprobes`, argv[0] would be ".../__main__.py".
    parser = argparse.ArgumentParser(
        prog="pykprobes", description="kprobes for the CPython virtual machine."
    )
    parser.add_argument("--version", action="version", version=f"pykprobes {__version__}")
    parser.add_argument("-p", "--pid", type=int, metavar="PID",
                        help="the running process the command works on (trace, cat, write, "
                             "pipe, reset)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    info = commands.add_parser(
        "info",
        help="show the Python, its capabilities and the chosen mechanisms",
        description="Show the Python, its capabilities, the breakpoint and optimizer "
        "mechanisms that would be chosen, and why each other one was rejected.",
    )
    info.set_defaults(func=_cmd_info)
    # Each subcommand module imports the engine inside its command function only.
    from pykprobes.cli import attach, probe, run

    run.add_parser(commands)
    probe.add_parsers(commands)
    attach.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from pykprobes import env

    if env.FREE_THREADED:
        # Every command needs the core, which refuses this build (core/__init__.py).
        print(f"pykprobes: {env.FREE_THREADED_REFUSAL}", file=sys.stderr)
        return 1
    func: Callable[[argparse.Namespace], int] = args.func
    if args.command == "run":
        return func(args)  # stdout is the program's: what happens to it is the program's
    try:
        status = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the flush at exit
    except BrokenPipeError:
        # The reader went away (`pykprobes probe -L mod:f | head`): end quietly with 1, as
        # the signal module's "Note on SIGPIPE" does, stdout pointed at /dev/null so that
        # the interpreter's own flush at exit does not fail again.
        _stdout_to_devnull()
        return 1
    return status


def _stdout_to_devnull() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
