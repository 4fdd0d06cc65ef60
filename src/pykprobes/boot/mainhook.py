"""Early probes on `__main__`: the program's own code, rewritten before its first line runs.

The program's code never goes through the import system: `python script.py` and
`python -c CODE` compile it in C and run it with `PyEval_EvalCode()`, `python -m module` (and
`python DIR_OR_ZIP`) through runpy's `_run_code()`, which calls `exec()`. Both raise the
audit event `exec` with the code object just before running it (PEP 578), and an audit hook
can be installed from the boot stage. So, when a boot definition targets `__main__`, the boot
stage installs `_audit`, which waits for the first `exec` of the program's code:

* from C with no Python frame on the stack (`sys._getframe(1)` fails): `python script.py`
  and `python -c` (the `.pth` lines and `sitecustomize` are executed from Python frames);
* or from runpy's `_run_code` with the `__main__` module's namespace: `-m`, a directory or a
  zip file;
* in a multiprocessing child started by `spawn` (or the forkserver), whose `-c` program is
  multiprocessing's own: from runpy's `_run_code` running the parent's main module as
  `__mp_main__` (multiprocessing/spawn.py), which becomes the child's `__main__`. That body
  runs from its original code (the hook cannot replace what runpy's `exec` runs): the
  probes are armed on its code objects, and the functions it created are switched to the
  probed code at the first audit event after multiprocessing made it `__main__`, before the
  child calls them. multiprocessing's `-c` program itself is not the program: `__main__`
  probes are not armed on it (and do not warn that they could not be).

It hands the code to the core like the module notifier does (`module_code_loaded("__main__",
code)`), which arms the pending `__main__` probes on it, and if that gave rewritten code, it
runs that in the `__main__` namespace, in place of the original, and then ends the original's
run by raising SystemExit (which is how a program that calls `sys.exit()` ends too): the
program runs once, probed from its first line, with its own namespace, argv, sys.path, stdin
and stdout. An uncaught exception is printed as Python prints it (sys.excepthook with
runpy's frames then the program's for -m; sys.last_exc set) and the exit status is 1, or,
for KeyboardInterrupt, the process kills itself with SIGINT at the end of exit as Python
does; SystemExit from the program goes through untouched.

Limits: the program runs inside the audit hook's call, so it has the hook's frames below
its own (`sys._getframe()` depth, `inspect.stack()`); the hook is marked `__cantrace__` so
that tracers and sys.monitoring see the program. An audit hook cannot be removed: after the
program started, `_audit` costs one Python call per audit event (it returns at once). It is
installed only when a definition targets `__main__`. Not covered: the interactive
interpreter and a program read from stdin, `python -i` (the inspect prompt would follow a
program that already ended), and pykprobes' own command line (`pykprobes run` hands its
program's code to the core itself).
"""

from __future__ import annotations

import sys
from types import CodeType, FrameType, TracebackType

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: this runs at start-up
if TYPE_CHECKING:
    from pykprobes.core.modules import Loading

_mode: str | None = None
_done = False
_installed = False
#: The program ended with an uncaught KeyboardInterrupt.
_sigint = False


def install(mode: str) -> None:
    """Watch for the program's code (mode: "script", "-c" or "-m", from the boot stage)."""
    global _mode, _installed
    if _installed:
        return
    _mode = mode
    _audit.__cantrace__ = True  # type: ignore[attr-defined]
    sys.addaudithook(_audit)
    _installed = True


def _audit(event: str, args: tuple[object, ...]) -> None:
    global _done, _mp_child
    if _done:
        if _mp_main is not None:
            _mp_main_ran()
        return
    if event != "exec":
        return
    code = args[0] if args else None
    if type(code) is not CodeType or code.co_name != "<module>":
        return
    try:
        caller: FrameType | None = sys._getframe(1)
    except ValueError:
        caller = None
    if caller is None:
        if _mode not in ("script", "-c") or sys.flags.inspect:
            return
        if _mode == "-c" and _is_multiprocessing_stub(code):
            _mp_child = True  # the program is the parent's `__main__`, run as `__mp_main__`
            return
    elif _mp_child and _is_runpy_code(caller, "__mp_main__"):
        _done = True
        _mp_main_loaded(code)
        return
    elif not _is_runpy_main(caller):
        return
    _done = True
    if _own_cli(code) or not _is_named_main(code):
        return
    from pykprobes.core import registry

    loading = registry.loading("__main__", code)
    run = loading.run
    if run is loading.original or run is code:
        return  # no early probe in it: the program runs as Python runs it
    # The program runs here, in this frame (the only one of ours its traceback can show).
    try:
        exec(run, vars(sys.modules["__main__"]))
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - printed as Python prints it
        print_uncaught(exc, _program_traceback(exc.__traceback__, caller))
        if isinstance(exc, KeyboardInterrupt):
            end_by_sigint()
            raise SystemExit(130) from None
        raise SystemExit(1) from None
    finally:
        loading.executed()
    raise SystemExit  # the program ran: the original code must not run


def _is_named_main(code: CodeType) -> bool:
    """PYKPROBES_MAIN, where set, is the file of the program that `__main__:...` definitions
    mean (`pykprobes run` sets it for the children it passes its events to): another
    program, such as a subprocess the program starts, leaves them waiting, silently."""
    import os

    main = os.environ.get("PYKPROBES_MAIN")
    return not main or os.path.realpath(code.co_filename) == main


def _is_multiprocessing_stub(code: CodeType) -> bool:
    """The `-c` code multiprocessing starts its children with (spawn's spawn_main, the
    forkserver's and the resource tracker's main): not the program."""
    return code.co_filename == "<string>" and any(
        name.startswith("multiprocessing.") for name in code.co_names)


def _is_runpy_code(frame: FrameType, mod_name: str) -> bool:
    return (frame.f_code.co_name == "_run_code" and frame.f_globals.get("__name__") == "runpy"
            and frame.f_locals.get("mod_name") == mod_name)


#: In a multiprocessing child: the code of the parent's `__main__`, run as `__mp_main__`,
#: until it has run.
_mp_child = False
_mp_main: Loading | None = None


def _mp_main_loaded(code: CodeType) -> None:
    """multiprocessing runs the parent's `__main__` in its spawned child as `__mp_main__`
    (runpy.run_path or run_module, multiprocessing/spawn.py): that is the program's
    `__main__`, and its probes are armed on its code. Its body runs from the original code
    (an audit hook cannot replace what `exec` runs): the functions it creates are switched
    to the probed code once it has run (`_mp_main_ran`), before the child calls them."""
    global _mp_main
    from pykprobes.core import registry

    _mp_main = registry.loading("__main__", code)


def _mp_main_ran() -> None:
    """At each audit event after `_mp_main_loaded`: once multiprocessing has made the module
    the child's `__main__` (spawn.py `_fixup_main_from_path`), its body has run."""
    global _mp_main
    main = sys.modules.get("__main__")
    if main is None or main is not sys.modules.get("__mp_main__") or _mp_main is None:
        return
    loading, _mp_main = _mp_main, None
    loading.executed()
    from pykprobes.core import registry
    from pykprobes.core.guard import kprobe_busy

    with kprobe_busy():
        registry.wait_for_kprobe_optimizer()


def _is_runpy_main(frame: FrameType) -> bool:
    """runpy's _run_code() running the `__main__` module (python -m, a directory, a zip)."""
    if frame.f_code.co_name != "_run_code" or frame.f_globals.get("__name__") != "runpy":
        return False
    main = sys.modules.get("__main__")
    return main is not None and frame.f_locals.get("run_globals") is vars(main)


def _own_cli(code: CodeType) -> bool:
    """pykprobes' command line (its console script, `python -m pykprobes`)."""
    import os

    import pykprobes

    package = os.path.dirname(pykprobes.__file__ or "")
    return "pykprobes.cli.main" in code.co_names or (
        bool(package) and code.co_filename.startswith(package + os.sep))


def end_by_sigint() -> None:
    """The program ended with an uncaught KeyboardInterrupt: `exit_like_python()` ends the
    process by SIGINT, as Python does, once the other exit handlers ran."""
    global _sigint
    _sigint = True


def exit_like_python() -> None:
    """Called last at exit (the boot stage's atexit handler): after an uncaught
    KeyboardInterrupt, Python ends by killing itself with SIGINT once finalized (so that its
    parent sees a process interrupted); a SystemExit from an audit hook cannot ask for that,
    so do it here, after flushing what Python would have flushed."""
    if not _sigint:
        return
    import os
    import signal

    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001 - as at finalization: ignored
            pass
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def _program_traceback(tb: TracebackType | None, caller: FrameType | None) -> TracebackType | None:
    """The traceback without this module's frames, under the frames that called the program
    (runpy's, for -m), as Python would show it."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__") == __name__:
        tb = tb.tb_next
    outer: list[FrameType] = []
    frame = caller
    while frame is not None:
        outer.append(frame)
        frame = frame.f_back
    for frame in outer:  # innermost first: each one goes on top
        tb = TracebackType(tb, frame, frame.f_lasti, frame.f_lineno)
    return tb


def print_uncaught(exc: BaseException, tb: TracebackType | None) -> None:
    """What PyErr_Print() does with an uncaught exception whose traceback is `tb` (None: a
    SyntaxError of the program's source, printed without a traceback)."""
    exc = exc.with_traceback(tb)
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    sys.last_exc = exc  # 3.12+ reads it; harmless before
    try:
        sys.excepthook(type(exc), exc, tb)
    except Exception:  # noqa: BLE001 - as PyErr_Print, fall back to the default hook
        sys.__excepthook__(type(exc), exc, tb)


__all__ = ["end_by_sigint", "exit_like_python", "install", "print_uncaught"]
