"""`pykprobes run`: run a program as `python` would, with probe events enabled.

    pykprobes run -e DEF [-e DEF ...] [--filter EVENT=EXPR] [--trigger EVENT=CMD]
                  [--summary] [-o FILE] [--format text|json|perfetto] [--otlp URL]
                  [--control] -- script.py ARGS | -- DIR_OR_ZIP ARGS | -- -m module ARGS

The program is run as `python` runs it, where a program can tell: `sys.argv`, `sys.path[0]`
(the script's directory once symlinks are resolved, the directory or zip itself, or the
current directory for `-m`; nothing under `-P`), a `__main__` module holding what python puts
there (`__builtins__` the module, `__file__` absolute, `__loader__`, `__spec__`, and
`__annotations__` / `__cached__` on the versions that set them: env.py), stdin and stdout,
the exit status, an uncaught exception's traceback, a SyntaxError printed without any frame
of ours, and an uncaught KeyboardInterrupt that ends the process by SIGINT, after the trace
is written. The script is read and compiled before any event is enabled.

The events are defined before the program's code runs: those on `__main__:...` (or, with
`-m`, on the module's own name) wait for the program's code object and are armed on it
before its first line runs. The trace goes to stderr or FILE as it happens (`_Writer`),
then the `kprobe_profile`.

`--trigger EVENT=CMD` writes CMD to the event's trigger file (`hist:keys=...`, see
trace/hist.py): the event counts into its table and is not enabled, so it writes no trace
lines (hist-only). Every hist is printed at exit.
`--otlp URL` also sends every record as OpenTelemetry spans to an OTLP/HTTP collector
(trace/otel.py; the `pykprobes[otel]` extra), from the trace writer's thread.
`--summary` enables no event: it prints, at exit, every event's count and, for a return
event, a log2 histogram of its calls' durations (trace/summary.py).

Child processes: a child made by `os.fork()` (multiprocessing's fork and forkserver start
methods too) has the events and a writer of its own, which writes the child's records,
with the child's thread ids, to the same stderr or FILE (opened with O_APPEND: each batch
is one write). The records made before the fork are written once, by the parent (the
child's buffer starts empty: trace/buffer.py), and the `kprobe_profile` is the parent's.
A child writes what it recorded when it exits through Python's shutdown (threading's, which
multiprocessing runs before `os._exit()`, or atexit); what it recorded in its last moments
before an `os._exit()` of its own or a fatal signal cannot be written by a process that is
gone, nor counted by one that never saw it: that is lost, as a kernel's per-CPU buffer is
when the machine stops. A child started with `exec` (`subprocess`, multiprocessing's spawn
and forkserver) is a new interpreter: run puts its definitions in the environment the
program's children inherit (`_pass_to_children`), so that the boot stage of a Python child
arms them as early probes and appends the child's records at its exit to the same stderr or
FILE (boot/__init__.py).

With `--control` the program's tracefs is served on its control socket (control/server.py)
from the start, so that `pykprobes -p PID ...` can trace it on any Python; without `-e`,
run writes no trace of its own.
"""

from __future__ import annotations

import argparse
import atexit
import builtins
import os
import sys
import threading
import types
from _thread import allocate_lock, get_ident, start_new_thread
from collections.abc import Callable
from typing import Any

from pykprobes.cli.errors import print_write_error


def add_parser(commands: Any) -> None:
    run = commands.add_parser(
        "run", help="run a program with probe events enabled",
        description="Define and enable probe events, then run a program as `python` would "
                    "(`-- script.py ARGS` or `-- -m module ARGS`), writing the trace to stderr "
                    "or FILE as it happens and the profile at the end.")
    run.add_argument("-e", "--event", action="append", default=[], metavar="DEF",
                     help="a kprobe_events definition (repeatable)")
    run.add_argument("--filter", action="append", default=[], metavar="EVENT=EXPR",
                     help="an ftrace filter for one event (repeatable)")
    run.add_argument("--trigger", action="append", default=[], metavar="EVENT=CMD",
                     help="a hist trigger for one event, e.g. 'lat=hist:keys=d.log2' "
                          "(repeatable); an event with a trigger writes no trace lines "
                          "(hist-only); every hist is printed at exit")
    run.add_argument("--summary", action="store_true",
                     help="write no trace: print each event's count and, for return events, "
                          "a log2 latency histogram at exit")
    run.add_argument("--otlp", metavar="URL",
                     help="also send the events as OpenTelemetry spans to this OTLP/HTTP "
                          "collector (e.g. http://localhost:4318); needs pykprobes[otel]")
    run.add_argument("-o", "--output", metavar="FILE", help="write the trace here, not stderr")
    run.add_argument("--format", choices=("text", "json", "perfetto"), default="text",
                     help="trace lines as ftrace's text, JSON lines, or a Trace Event "
                          "Format file that ui.perfetto.dev opens (with -o FILE)")
    run.add_argument("--buffer-size-kb", default=None, metavar="KB",
                     help="the trace buffer's size (the buffer_size_kb file)")
    run.add_argument("--no-optimize", action="store_true",
                     help="keep every probe a breakpoint (debug.kprobes-optimization=0)")
    run.add_argument("--control", action="store_true",
                     help="serve the tracefs on a control socket: `pykprobes -p PID ...` "
                          "can then add events while the program runs")
    run.add_argument("program", nargs=argparse.REMAINDER,
                     help="-- script.py ARGS, or -- -m module ARGS")
    run.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from pykprobes.core import registry
    from pykprobes.trace.tracefs import TraceWriteError, tracefs

    program = list(args.program)
    if program and program[0] == "--":
        program = program[1:]
    if not program or (program[0] == "-m" and len(program) < 2):
        print("pykprobes run: give the program after --: script.py ARGS or -m module ARGS",
              file=sys.stderr)
        return 2
    try:
        out = _Output.open(args.output) if args.output else _Output.stderr()
    except OSError as exc:
        print(f"pykprobes: error: cannot write the trace to {args.output!r}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1

    # A script is read and compiled before anything runs, as python does. A module is found
    # once the events are enabled: finding it imports its parent packages, the program's
    # code, which python runs before the module too.
    module_name = program[1] if program[0] == "-m" else None
    target: _Program | None = None
    if module_name is None:
        loaded = _Program.from_path(program[0], program[1:])
        if isinstance(loaded, int):
            return loaded  # python's own message is printed: the file is not there
        target = loaded
        target.enter()
    elif not getattr(sys.flags, "safe_path", False):
        sys.path[0] = os.getcwd()
    registry.init_kprobes()
    if args.no_optimize:
        registry.set_optimization(False)
    registry.expect_module("__main__", path=target.script if target is not None else None)
    if module_name is not None:
        registry.expect_module(module_name)
    fs = tracefs()
    try:
        if args.buffer_size_kb is not None:
            fs.write("buffer_size_kb", args.buffer_size_kb)
        for definition in args.event:
            fs.define(definition)
        for item in args.filter:
            name, sep, expr = item.partition("=")
            if not sep:
                print(f"pykprobes run: --filter wants EVENT=EXPR, not {item!r}", file=sys.stderr)
                return 2
            fs.set_filter(fs.event(name), expr)
        triggered = set()
        for item in args.trigger:
            name, sep, command = item.partition("=")
            if not sep:
                print(f"pykprobes run: --trigger wants EVENT=CMD, not {item!r}",
                      file=sys.stderr)
                return 2
            event = fs.event(name)
            fs.write_trigger(event, command)
            triggered.add(event)
    except TraceWriteError as exc:
        print_write_error(exc)
        return 1

    otel = None
    if args.otlp:
        from pykprobes.trace import otel as otel_export

        missing = otel_export.available()
        if missing is not None:
            print(f"pykprobes: error: --otlp: {missing}", file=sys.stderr)
            return 1
        otel = otel_export.OtlpExport(args.otlp)
        for event in list(fs.events.values()):
            event.set_span_mode()
    if args.control:
        from pykprobes.control import serve

        try:
            path = serve()
        except OSError as exc:
            print(f"pykprobes run: no control socket: {exc}", file=sys.stderr)
            return 1
        print(f"pykprobes: process {os.getpid()} serves its tracefs at {path}",
              file=sys.stderr)

    from pykprobes.boot import mainhook

    # atexit runs last what was registered first: the program's own handlers, then the rest
    # of the trace and the profile, then (after an uncaught KeyboardInterrupt) the SIGINT
    # that ends the process as it ends python.
    atexit.register(mainhook.exit_like_python)
    hold: Callable[[], None] = _no_writer
    # With --control alone there is nothing of run's own to write: the records belong to
    # the clients that stream them (a second trace_pipe reader would split them).
    if args.event or not args.control:
        writer = _Writer(fs, out, args.format, args.summary)
        writer.otel = otel
        atexit.register(writer.finish)
        writer.start()
        hold = writer.hold
    else:
        out.close()
    for event in list(fs.events.values()):
        if args.summary:
            event.summarize()
        elif event not in triggered:
            event.enable()
    if target is None:
        assert module_name is not None
        loaded = _Program.from_module(module_name, program[2:], hold)
        if isinstance(loaded, int):
            return loaded
        loaded.enter()
        target = loaded
    _pass_to_children(args, target.code.co_filename)
    return _exec_main(target, registry, hold)


def _pass_to_children(args: argparse.Namespace, main: str) -> None:
    """Put the definitions where a child started by exec finds them: PYKPROBES_EVENTS (and
    PYKPROBES_OUTPUT for -o) in the environment the program's children inherit, which the
    program sees too (os.environ), as coverage.py's COVERAGE_PROCESS_START is seen.
    PYKPROBES_MAIN names the program's file: `__main__:...` means this program, which a
    multiprocessing child runs as `__mp_main__`, and not whatever a subprocess runs.

    Only what the boot stage can write the same way is passed on: trace lines, unfiltered.
    A child's records could not join the parent's hist tables, summary, Perfetto file or
    OTLP export, and the boot stage has no filters; with those options, and with a
    definition holding the boot separator `;`, children started by exec are not traced
    (README: Child processes)."""
    if (not args.event or args.format != "text" or args.filter or args.trigger
            or args.summary or args.otlp or any(";" in d for d in args.event)):
        return
    os.environ["PYKPROBES_EVENTS"] = ";".join(args.event)
    os.environ["PYKPROBES_MAIN"] = os.path.realpath(main)
    if args.output:
        os.environ["PYKPROBES_OUTPUT"] = os.path.abspath(args.output)
    else:
        os.environ.pop("PYKPROBES_OUTPUT", None)
    from pykprobes.core import early_kprobes as early

    if len(args.event) > early.NR_EARLY_KPROBES_SLOTS_DEFAULT:
        # One early slot per probe point, as far as the seed's table goes; beyond it the
        # child warns of a full slot table, in the kernel's words.
        os.environ["PYKPROBES_EARLY_SLOTS"] = str(
            min(len(args.event), early.NR_EARLY_KPROBES_SLOTS_MAX))


def _no_writer() -> None:
    pass


class _Program:
    """The program, loaded as python loads it before running it: the code object and the
    `__main__` module it runs in (`_main_module`)."""

    def __init__(self, code: types.CodeType, module: types.ModuleType, argv: list[str],
                 path0: str, real_name: str | None, script: str | None) -> None:
        self.code = code
        self.module = module
        self.argv = argv
        self.path0 = path0
        #: The name the code is found under besides `__main__` (`-m json.tool`).
        self.real_name = real_name
        #: The script's path, for line targets in it.
        self.script = script

    @classmethod
    def from_path(cls, path: str, argv: list[str]) -> _Program | int:
        """`python PATH`: a script, or a directory or zip file with a `__main__.py`."""
        import zipfile

        # Python makes the path absolute without resolving it (3.9+: `__file__`, the code's
        # file name), and puts the directory of the resolved script first on sys.path.
        full = os.path.join(os.getcwd(), path)
        if os.path.isdir(path) or (os.path.isfile(path) and zipfile.is_zipfile(path)):
            return cls._package_main(full, [path, *argv])
        try:
            with open(path, "rb") as f:
                source = f.read()
        except OSError as exc:
            print(f"{sys.executable}: can't open file {full!r}: [Errno {exc.errno}] "
                  f"{exc.strerror}", file=sys.stderr)
            return 2
        try:
            code = compile(source, full, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            _print_uncaught(exc, None)  # as python prints it: no traceback, no frame of ours
            return 1
        from importlib.machinery import SourceFileLoader

        module = _main_module()
        namespace = vars(module)
        namespace["__file__"] = full
        if _env().MAIN_CACHED:
            namespace["__cached__"] = None
        namespace["__loader__"] = SourceFileLoader("__main__", full)
        return cls(code, module, [path, *argv], os.path.dirname(os.path.realpath(path)), None,
                   full)

    @classmethod
    def _package_main(cls, full: str, argv: list[str]) -> _Program | int:
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec("__main__", [full])
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            print(f"{sys.executable}: can't find '__main__' module in {full!r}",
                  file=sys.stderr)
            return 1
        program = cls._from_spec(spec, argv, full)
        if isinstance(program, _Program) and os.path.isfile(spec.origin or ""):
            program.script = spec.origin  # a directory's __main__.py: its lines are __main__'s
        return program

    @classmethod
    def from_module(cls, name: str, argv: list[str],
                    hold: Callable[[], None]) -> _Program | int:
        """`python -m NAME` (a package runs its `__main__`). Finding it imports its parent
        packages: an exception they raise is the program's, printed as python prints it
        (after `hold`, which keeps trace lines out of the traceback)."""
        import importlib.util

        try:
            spec = importlib.util.find_spec(name)
            if spec is not None and spec.submodule_search_locations is not None:
                name = f"{name}.__main__"
                spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as exc:
            hold()
            print(f"{sys.executable}: Error while finding module specification for {name!r} "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)
            return 1
        except BaseException as exc:  # noqa: BLE001 - the program's package raised
            hold()
            tb = exc.__traceback__
            while tb is not None and tb.tb_frame.f_globals.get("__name__") in (
                    __name__, "importlib.util"):
                tb = tb.tb_next  # from the program's frames on (the import system's follow)
            _print_uncaught(exc, tb)
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            hold()
            print(f"{sys.executable}: No module named {name}", file=sys.stderr)
            return 1
        program = cls._from_spec(spec, [spec.origin or name, *argv], os.getcwd(), hold)
        if isinstance(program, _Program):
            program.real_name = name
        return program

    @classmethod
    def _from_spec(cls, spec: Any, argv: list[str], path0: str,
                   hold: Callable[[], None] | None = None) -> _Program | int:
        try:
            code = spec.loader.get_code(spec.name)
        except (SyntaxError, ValueError) as exc:
            if hold is not None:
                hold()
            _print_uncaught(exc, None)
            return 1
        module = _main_module()
        # What runpy's _run_code() puts in the namespace of `python -m` (the interpreter's
        # `__main__` module, which had the rest already).
        namespace = vars(module)
        namespace.update(__name__="__main__", __file__=spec.origin)
        if _env().MAIN_CACHED:
            namespace["__cached__"] = spec.cached
        namespace.update(__doc__=None, __loader__=spec.loader, __package__=spec.parent,
                         __spec__=spec)
        return cls(code, module, argv, path0, None, None)

    def enter(self) -> None:
        """The program's sys.argv and sys.path[0], before any event is defined: a line target
        in a module beside the script is found by the name it will be imported under. Under
        -P python puts nothing on sys.path, and our own sys.path[0] was not put there."""
        if not getattr(sys.flags, "safe_path", False):
            sys.path[0] = self.path0
        sys.argv[:] = self.argv


def _env() -> Any:
    from pykprobes import env

    return env


def _main_module() -> types.ModuleType:
    """A `__main__` module as the interpreter makes one (pylifecycle.c add_main_module):
    `__name__`, `__doc__`, `__package__`, `__loader__`, `__spec__`, then `__annotations__`
    (before 3.14) and `__builtins__`, the builtins module itself, in that order."""
    module = types.ModuleType("__main__")
    namespace = vars(module)
    if _env().MAIN_ANNOTATIONS:
        namespace["__annotations__"] = {}
    namespace["__builtins__"] = builtins
    return module


def _exec_main(program: _Program, registry: Any, hold: Callable[[], None]) -> int:
    code = program.code
    sys.modules["__main__"] = program.module
    if program.real_name is not None:
        registry.module_code_loaded(program.real_name, code)
    with registry.loading("__main__", code) as run:
        try:
            exec(run, vars(program.module))
        except SystemExit as exc:
            return _exit_code(exc)
        except BaseException as exc:  # noqa: BLE001 - reported as python reports it
            tb = exc.__traceback__
            # Drop our own frame: the traceback starts at the program's code, as under
            # python.
            if tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            hold()
            _print_uncaught(exc, tb)
            if isinstance(exc, KeyboardInterrupt):
                from pykprobes.boot import mainhook

                mainhook.end_by_sigint()  # at the very end of exit, after the trace is written
                return 130
            return 1
    return 0


def _print_uncaught(exc: BaseException, tb: types.TracebackType | None) -> None:
    from pykprobes.boot import mainhook

    mainhook.print_uncaught(exc, tb)


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- the writer


class _Output:
    """Where the trace goes: a file descriptor, written with `os.write`, one call per batch.
    No buffer is shared with the program (a batch lands between two writes of its own, never
    inside one), nothing is inherited half-written by a forked child, and a FILE is opened
    with O_APPEND so that the processes of one run append whole batches to it. Text is
    encoded with the stream's encoding and `backslashreplace`: the formats escape what is
    not printable already, this is the last guard."""

    def __init__(self, fd: int | None, stream: Any, name: str, encoding: str) -> None:
        self.fd = fd
        self.stream = stream
        self.name = name
        self.encoding = encoding
        self.owned = stream is None

    @classmethod
    def open(cls, path: str) -> _Output:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        return cls(fd, None, path, "utf-8")

    @classmethod
    def stderr(cls) -> _Output:
        stream = sys.stderr
        encoding = getattr(stream, "encoding", None) or "utf-8"
        try:
            fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # a stream without a descriptor
            fd = None
        return cls(fd, stream, "stderr", encoding)

    def write(self, text: str) -> None:
        if self.fd is None:
            self.stream.write(text)
            self.stream.flush()
            return
        data = memoryview(text.encode(self.encoding, "backslashreplace"))
        while data:
            data = data[os.write(self.fd, data):]

    def flush(self) -> None:
        """Every write is whole already (trace/perfetto.py's writer asks for a flush)."""

    def close(self) -> None:
        if self.owned and self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Writer:
    """Moves records from the trace buffer to the output as they come (the trace_pipe), in
    a thread of its own, in every process of the run (see the module docstring). Its work
    runs in `kprobe_busy` (core/site.py): a probe it hits records nothing. It never raises
    and never stops the program: a record that cannot be formatted is written as lost, and
    when the output fails (a full disk, a closed pipe), the records are counted and the
    count is reported at exit.

    The thread is a `_thread` one, not a `threading.Thread`: the program does not see it in
    `threading.enumerate()` or `active_count()`, and `os.fork()` does not warn that the
    process is multi-threaded because of it (3.12-3.14 count threading's threads; 3.15
    counts the process's)."""

    def __init__(self, fs: Any, out: _Output, form: str, summary: bool = False) -> None:
        from pykprobes.trace import format as fmt

        self.fs = fs
        self.out = out
        self.json = form == "json"
        self.summary = summary
        #: trace/otel.py's OtlpExport, when --otlp is given: it gets every batch too.
        self.otel: Any = None
        self.perfetto: Any = None
        if form == "perfetto":
            from pykprobes.trace.perfetto import PerfettoWriter

            self.perfetto = PerfettoWriter(out)
        self.fmt = fmt
        #: The process that prints the profile: the run's, not a forked child's.
        self.pid = os.getpid()
        #: Held while a batch is written, so that the last drain waits for the thread's.
        self.lock = allocate_lock()
        self.failed: OSError | None = None
        self.unwritten = 0
        self.done = False
        self._new_thread()
        os.register_at_fork(after_in_child=self._after_fork_in_child)
        # Threading's shutdown runs before atexit, and is all that a multiprocessing child
        # runs before os._exit(): write what there is then too.
        register = getattr(threading, "_register_atexit", None)  # 3.9+, private
        if register is not None:
            register(self.flush)

    def _new_thread(self) -> None:
        self.stop = False
        #: Held while the thread runs.
        self.running = allocate_lock()
        self.ident: int | None = None

    def start(self) -> None:
        if self.perfetto is not None and os.getpid() == self.pid:
            self.perfetto.start()
        self.running.acquire()
        self.ident = start_new_thread(self._loop, ())

    def _after_fork_in_child(self) -> None:
        # The child's own writer: the thread did not survive the fork, its locks may have.
        self.lock = allocate_lock()
        self._new_thread()
        if not self.done:
            self.start()

    def _loop(self) -> None:
        try:
            while not self.stop:
                self._drain(0.05)
        finally:
            self.running.release()

    def _drain(self, timeout: float) -> None:
        from pykprobes.core.guard import kprobe_busy

        batch = self.fs.buffer.read(block=timeout > 0, timeout=timeout)
        if not batch and not batch.lost_at:
            return
        with kprobe_busy():
            if self.otel is not None:
                self.otel.write(batch)
            text = "" if self.perfetto is not None else self._format(batch)
            if not self.lock.acquire(timeout=10):  # a thread stuck writing to a full pipe
                self.unwritten += len(batch)
                return
            try:
                if self.perfetto is not None:
                    self._write_perfetto(batch)
                else:
                    self._write(text, len(batch))
            finally:
                self.lock.release()

    def _write_perfetto(self, batch: Any) -> None:
        if self.failed is not None:
            self.unwritten += len(batch)
            return
        try:
            self.perfetto.write(batch)
        except (OSError, ValueError) as exc:
            self.failed = exc if isinstance(exc, OSError) else OSError(str(exc))
            self.unwritten += len(batch)

    def _format(self, batch: Any) -> str:
        fmt = self.fmt
        lost = dict(batch.lost_at)
        lines = []
        for i, record in enumerate(batch):
            if i in lost:
                lines.append(self._lost(lost.pop(i)))
            try:
                line = fmt.format_json(record) if self.json else fmt.format_line(record)
            except Exception:  # noqa: BLE001 - the formats do not raise; if one did, say so
                line = self._lost(1).rstrip("\n")
            lines.append(line + "\n")
        lines += [self._lost(n) for n in lost.values()]
        return "".join(lines)

    def _lost(self, n: int) -> str:
        return f'{{"lost": {n}}}\n' if self.json else self.fmt.format_lost(n) + "\n"

    def _write(self, text: str, records: int) -> None:
        if self.failed is not None:
            self.unwritten += records
            return
        try:
            self.out.write(text)
        except (OSError, ValueError) as exc:  # ValueError: a stream closed under us
            self.failed = exc if isinstance(exc, OSError) else OSError(str(exc))
            self.unwritten += records

    def hold(self) -> None:
        """Stop writing as records come, after writing those already there: the program is
        about to print its traceback, which must not have trace lines written into it (the
        interpreter writes a traceback line in several pieces). `finish` writes the rest."""
        self.stop = True
        if self.running.locked() and self.ident != get_ident():
            self.fs.buffer.interrupt()  # out of its wait at once
            if self.running.acquire(timeout=2):
                self.running.release()
        self._drain(0)

    def flush(self) -> None:
        """Write what the buffer holds now (threading's shutdown)."""
        if not self.done:
            self._drain(0)

    def finish(self) -> None:
        """At exit: the rest of the trace, then (in the run's own process) the profile, and
        what could not be written, if anything."""
        if self.done:
            return
        from pykprobes.core.guard import kprobe_busy

        self.hold()
        self.done = True
        with kprobe_busy():
            if os.getpid() == self.pid:
                self._exit_report()
            if self.failed is not None:
                what = "" if self.out.name == "stderr" else f" to {self.out.name}"
                try:
                    sys.stderr.write(f"pykprobes: error: the trace could not be written{what}: "
                                     f"{self.failed.strerror or self.failed}; "
                                     f"{self.unwritten} events lost\n")
                    sys.stderr.flush()
                except Exception:  # noqa: BLE001 - stderr is what failed
                    pass
            self.out.close()

    def _exit_report(self) -> None:
        """The profile and the hists (or the summary): to the trace's output, or to stderr
        when that is a Perfetto file (they are not trace events)."""
        from pykprobes.trace.summary import format_exit_report

        if self.otel is not None:
            self.otel.close()
            sys.stderr.write(self.otel.report())
        report = "" if self.summary else self.fs.read("kprobe_profile")
        report += format_exit_report(list(self.fs.events.values()), self.summary)
        if self.perfetto is not None:
            try:
                self.perfetto.close()
            except (OSError, ValueError) as exc:
                self.failed = self.failed or OSError(str(exc))
            sys.stderr.write(report)
            sys.stderr.flush()
        else:
            self._write(report, 0)
