"""`pykprobes run`: run a program as `python` would, with probe events enabled.

    pykprobes run -e DEF [-e DEF ...] [--filter EVENT=EXPR] [--trigger EVENT=CMD]
                  [--summary] [-o FILE] [--format text|json|perfetto] [--otlp URL]
                  [--control] -- script.py ARGS | -- -m module ARGS

The events are defined before the program's code runs: those on `__main__:...` (or, with
`-m`, on the module's own name) wait for the program's code object and are armed on it
before its first line runs. The program gets its own `sys.argv`, `sys.path[0]`,
`__main__` module, stdin and stdout; the trace goes to stderr or FILE as it happens, then
the profile. The exit code and an uncaught exception's traceback are the program's.

`--trigger EVENT=CMD` writes CMD to the event's trigger file (`hist:keys=...`, see
trace/hist.py): the event counts into its table and is not enabled, so it writes no trace
lines (hist-only). Every hist is printed at exit.
`--otlp URL` also sends every record as OpenTelemetry spans to an OTLP/HTTP collector
(trace/otel.py; the `pykprobes[otel]` extra), from the trace writer's thread.
`--summary` enables no event: it prints, at exit, every event's count and, for a return
event, a log2 histogram of its calls' durations (trace/summary.py).
With `--control` the program's tracefs is served on its control socket (control/server.py)
from the start, so that `pykprobes -p PID ...` can trace it on any Python; without `-e`,
run writes no trace of its own.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any, TextIO

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
    run.add_argument("--buffer-size-kb", type=int, default=None, metavar="KB")
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
    module_name = program[1] if program[0] == "-m" else None

    # sys.path[0] is the program's from the start, as under python: a line target in a
    # module beside the script is found by the name it will be imported under.
    sys.path[0] = os.getcwd() if module_name else os.path.dirname(os.path.abspath(program[0]))
    registry.init_kprobes()
    if args.no_optimize:
        registry.set_optimization(False)
    registry.expect_module("__main__", path=None if module_name else program[0])
    if module_name is not None:
        registry.expect_module(module_name)
    fs = tracefs()
    if args.buffer_size_kb:
        fs.buffer.resize(args.buffer_size_kb)
    try:
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
        for event in list(fs.events.values()):
            if args.summary:
                event.summarize()
            elif event not in triggered:
                event.enable()
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
    hold: Callable[[], None] = _no_writer
    # With --control alone there is nothing of run's own to write: the records belong to
    # the clients that stream them (a second trace_pipe reader would split them).
    if args.event or not args.control:
        out: TextIO = open(args.output, "w", encoding="utf-8") if args.output else sys.stderr  # noqa: SIM115 - closed at exit
        writer = _Writer(fs, out, args.format, args.summary)
        writer.otel = otel
        writer.start()
        # Threads the program leaves running finish before atexit handlers run: drain then.
        atexit.register(writer.finish)
        hold = writer.hold
    if module_name is not None:
        return _run_module(module_name, program[2:], registry, hold)
    return _run_script(program[0], program[1:], registry, hold)


def _no_writer() -> None:
    pass


class _Writer:
    """Moves records from the trace buffer to the output as they come (the trace_pipe)."""

    def __init__(self, fs: Any, out: TextIO, form: str, summary: bool = False) -> None:
        from pykprobes.trace import format as fmt

        self.fs = fs
        self.summary = summary
        self.out = out
        self.json = form == "json"
        #: trace/otel.py's OtlpExport, when --otlp is given: it gets every batch too.
        self.otel: Any = None
        self.perfetto: Any = None
        if form == "perfetto":
            from pykprobes.trace.perfetto import PerfettoWriter

            self.perfetto = PerfettoWriter(out)
        self.fmt = fmt
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="pykprobes-trace", daemon=True)
        self.done = False

    def start(self) -> None:
        if self.perfetto is not None:
            self.perfetto.start()
        self.thread.start()

    def _drain(self, timeout: float) -> None:
        batch = self.fs.buffer.read(block=timeout > 0, timeout=timeout)
        if not batch and not batch.lost_at:
            return
        if self.otel is not None:
            self.otel.write(batch)
        if self.perfetto is not None:
            self.perfetto.write(batch)
            return
        if self.json:
            lost = dict(batch.lost_at)
            lines = []
            for i, record in enumerate(batch):
                if i in lost:
                    lines.append(f'{{"lost": {lost.pop(i)}}}\n')
                lines.append(self.fmt.format_json(record) + "\n")
            lines += [f'{{"lost": {n}}}\n' for n in lost.values()]
            self.out.write("".join(lines))
        else:
            self.out.write(self.fmt.format_batch(batch))
        self.out.flush()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self._drain(0.05)

    def hold(self) -> None:
        """Stop writing as records come, after writing those already there: the program is
        about to print its traceback, which must not have trace lines written into it (the
        interpreter writes a traceback line in several pieces). `finish` writes the rest."""
        self.stop.set()
        self.thread.join(2)
        self._drain(0)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.hold()
        from pykprobes.trace.summary import format_exit_report

        report = sys.stderr if self.perfetto is not None else self.out
        if self.otel is not None:
            self.otel.close()
            sys.stderr.write(self.otel.report())
        if self.perfetto is not None:
            self.perfetto.close()  # the profile and hists are not trace events: stderr
        if not self.summary:
            report.write(self.fs.read("kprobe_profile"))
        report.write(format_exit_report(list(self.fs.events.values()), self.summary))
        report.flush()
        if self.out is not sys.stderr:
            self.out.close()


def _run_script(path: str, argv: list[str], registry: Any, hold: Callable[[], None]) -> int:
    import tokenize

    try:
        with tokenize.open(path) as f:
            source = f.read()
    except OSError as exc:
        print(f"{sys.executable}: can't open file {path!r}: [Errno {exc.errno}] "
              f"{exc.strerror}", file=sys.stderr)
        return 2
    code = compile(source, path, "exec")
    sys.argv[:] = [path, *argv]
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=path, __cached__=None, __builtins__=__builtins__)
    return _exec_main(module, code, None, registry, hold)


def _run_module(name: str, argv: list[str], registry: Any, hold: Callable[[], None]) -> int:
    try:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations is not None:
            name = f"{name}.__main__"  # a package runs its __main__, as python -m does
            spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        print(f"{sys.executable}: Error while finding module specification for {name!r} "
              f"({type(exc).__name__}: {exc})", file=sys.stderr)
        return 1
    if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
        print(f"{sys.executable}: No module named {name}", file=sys.stderr)
        return 1
    code = spec.loader.get_code(name)
    sys.argv[:] = [spec.origin or name, *argv]
    module = types.ModuleType("__main__")
    module.__dict__.update(__file__=spec.origin, __cached__=spec.cached, __spec__=spec,
                           __loader__=spec.loader, __package__=spec.parent,
                           __builtins__=__builtins__)
    return _exec_main(module, code, name, registry, hold)


def _exec_main(module: types.ModuleType, code: types.CodeType, real_name: str | None,
               registry: Any, hold: Callable[[], None]) -> int:
    sys.modules["__main__"] = module
    if real_name is not None:
        registry.module_code_loaded(real_name, code)
    run = registry.module_code_loaded("__main__", code)
    try:
        exec(run, module.__dict__)
    except SystemExit as exc:
        return _exit_code(exc)
    except BaseException as exc:  # noqa: BLE001 - reported as python reports it
        tb = exc.__traceback__
        # Drop our own frame: the traceback starts at the program's code, as under python.
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        hold()
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        registry.module_executed("__main__", code)
    return 0


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
