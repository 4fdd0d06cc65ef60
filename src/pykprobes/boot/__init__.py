"""The boot stage: early probes from the environment at interpreter start-up (the kernel's
`kprobe_event=` boot parameter, feeding the seed's early kprobes).

The wheel installs `_pykprobes.pth` and, for Python 3.15+ (PEP 829), `_pykprobes.start`
(boot/pth.py): one of the two calls `start_from_environ()` at every start of an interpreter of
that environment, before the program runs; it does its work when `PYKPROBES_EVENTS` is set.

Environment:

    PYKPROBES_EVENTS            kprobe_events definitions separated by `;`, with `,` for
                                spaces if you like (the kernel's `kprobe_event=`), e.g.
                                'p:boot/top pkg.mod:<module>+12 v=VALUE;p:boot/f json:loads s'
    PYKPROBES_OUTPUT            where the early events go, in the trace format, at exit if the
                                process is still early then (appended); unset: stderr
    PYKPROBES_EARLY_SLOTS       the number of early slots (1..64, default 16: the seed's
                                CONFIG_NR_EARLY_KPROBES_SLOTS); out of range: a warning and 16
    PYKPROBES_EARLY_BUFFER      the early buffer's size in events (1..1048576, default 16384);
                                when it is full, further events are counted lost
    PYKPROBES_PANIC_ON_UNSAFE   1: an early probe found unsafe at conversion aborts the process
    PYKPROBES_MAIN              the file of the program `__main__:...` targets mean: another
                                program (a subprocess's) leaves them waiting, silently;
                                `pykprobes run` sets it for the children it traces
    PYKPROBES_CONTROL           1 (any value but 0): serve the process's tracefs on its control
                                socket from start-up (pykprobes/control/server.py), so that
                                `pykprobes -p PID ...` can reach it on any Python; its first
                                request ends the early stage

Each definition is parsed by the grammar of every other definition (`grammar.parse_boot`),
registered as an early probe (`register_kprobe()` before `init_kprobes()`: an early slot, the
optimized mechanism only) and enabled. A bad one prints one warning in the kernel's words,
`pykprobes: Failed to add event(-ERRNO): DEFINITION: REASON`, and start-up goes on: the
program's output and exit code are its own.

Targets: `pkg.mod:Qual.name[+OFFS]` and `pkg.mod:<module>[+OFFS]` in modules not imported yet
are armed when the module is imported, before its body runs, so that top-level and
import-time code is probed; modules already imported are rewritten in place. `__main__:...`
targets the program itself, before its first line, for

    python script.py   python -c CODE   python -m module   python DIR_OR_ZIP

(boot/mainhook.py: an audit hook sees the program's code object about to run and runs the
rewritten one instead). Not covered: the interactive interpreter and a program read from
stdin (their `__main__` probes stay pending), and `pykprobes run`, which hands its program's
code to the core itself. `path/to/file.py:LINE` targets in a file not imported yet wait for
its import (as symbol probes, grammar.ProbeDef -> core.lines.line_symbols), the script's own
lines included (they are lines of `__main__`).

The process stays early until `init_kprobes()` (called by the program, `pykprobes run`, or the
control socket); then the early events move into the trace buffer, in order, and the probes
become normal ones. A process that stays early writes its early events at exit (atexit, and
threading's shutdown, which is all a multiprocessing child runs before `os._exit()`; each
write takes what it writes): not after an `os._exit()` of its own or a fatal signal. Child
processes inherit the variables, so each Python child boots its own early probes and
appends its own events to the same file; a forked child starts with an empty early buffer
(the events before the fork are the parent's), and a multiprocessing `spawn` child, whose
`-c` program is multiprocessing's, arms `__main__:...` on the parent's main module, run there
as `__mp_main__` (boot/mainhook.py).

The boot stage's own work (parsing, registering, arming at import, loading the rewrite arch,
writing the events) runs in `kprobe_busy` (core/site.py): an early probe on a module it uses
(re, functools, enum, os.path...) records only the program's calls. Early probes may not
target the import machinery (core/early_kprobes.py EARLY_NEEDED) nor what no probe may target
(core/blacklist.py).

When `PYKPROBES_EVENTS` and `PYKPROBES_CONTROL` are unset, the `.pth` line imports nothing;
the `.start` entry point of 3.15+ costs `site` the import of `pkgutil` and of this package
(boot/pth.py). When `PYKPROBES_EVENTS` is set and every definition is an early probe on a
module not imported yet, start-up only parses them and installs an import hook (boot/lazy.py,
the lazy early path): the stage runs at the first import of a target's package, before its
body, or of any other pykprobes module (the API, the control server), and a program that
does neither never loads the core. Otherwise the boot stage runs at start-up and loads the
core's registry and the trace's event code (tests/boot/test_import_weight.py lists both);
the rewrite arch and `bytecode` are loaded only when a target's code has to be rewritten.
`PYKPROBES_CONTROL` loads the control server's few modules (the same test lists them), and
with them the deferred stage; the tracefs comes with its first request.
"""

from __future__ import annotations

_started = False
_control_tried = False


def start_from_environ() -> None:
    """Run the boot stage once per process (site may process a `.pth` file twice), and
    serve the control socket when asked; never raises: a failure is one warning on stderr,
    and the program runs as it would have.

    A call while `PYKPROBES_EVENTS` is unset does nothing and counts for nothing: on 3.15+
    `site` calls this at every start (the `.start` entry point, boot/pth.py), and a program
    that sets the variable later may still start the stage by hand. `serve()` is
    idempotent by itself."""
    global _started, _control_tried
    import os

    value = os.environ.get("PYKPROBES_EVENTS")
    if value and not _started:
        _started = True
        try:
            from pykprobes.boot import lazy

            lazy.start(value)
        except Exception as exc:  # noqa: BLE001 - start-up must go on
            warn(f"the boot stage failed: {exc!r}")
    control = os.environ.get("PYKPROBES_CONTROL")
    if control and control.strip() != "0" and not _control_tried:
        _control_tried = True  # once: a directory refused once is refused again
        try:
            # The one edge up the layers (docs/architecture.md, "Layers"): lazy, only when asked.
            from pykprobes.control import serve

            serve()
        except Exception as exc:  # noqa: BLE001 - start-up must go on
            warn(f"PYKPROBES_CONTROL: no control socket: {exc}")


def warn(message: str) -> None:
    """`pykprobes: MESSAGE` on stderr, for start-up and the threads that serve the program:
    never raises (there may be no stderr, or a closed one)."""
    import sys

    try:
        if sys.stderr is not None:
            sys.stderr.write(f"pykprobes: {message}\n")
    except Exception:  # noqa: BLE001 - nowhere to report it
        pass


#: The short name.
start = start_from_environ

__all__ = ["start", "start_from_environ", "warn"]
