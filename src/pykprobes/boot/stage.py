"""The boot stage's work, when `PYKPROBES_EVENTS` is set (see boot/__init__.py).

The kernel's `setup_boot_kprobe_events()` + `enable_boot_kprobe_events()` over the seed's
early kprobes: the variables are read, the definitions parsed by `grammar.parse_boot`, each
one becomes an event whose probes are registered early (an early slot each) and enabled, and
its hits are recorded into the early buffer. A bad definition is one warning in the
kernel's words ("Failed to add event(%d): %s") and the next one is tried.

Then the events wait for one of two ends:

* conversion (`init_kprobes()`): `_handover()`, called by the core once the probes are normal
  ones, puts the events into the process's tracefs and moves the early buffer into its trace
  buffer, in order (`EarlyBuffer.seal`);
* exit, if the process is still early: `_write_at_exit()` appends the early events to
  `PYKPROBES_OUTPUT` (or writes them to stderr) in the trace format, with the lost count.

Each definition is registered through the tracefs file's entry
(trace/events.py `register_trace_kprobe(early=True)`), as the kernel's `kprobe_event=` goes
through trace_kprobe_create() like a write to kprobe_events, except that the probes are
registered enabled: an early probe cannot be registered DISABLED (the seed).
"""

from __future__ import annotations

import errno
import itertools
import os
import sys

from pykprobes.boot import lazy
from pykprobes.boot.buffer import EarlyBuffer
from pykprobes.core import early_kprobes, registry

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: this runs at start-up
if TYPE_CHECKING:
    from typing import Any

    from pykprobes.grammar import ProbeDef, RemoveDef
    from pykprobes.trace.events import Event

#: PYKPROBES_EARLY_BUFFER: the early buffer's entries.
EARLY_BUFFER_DEFAULT = lazy.BUFFER_DEFAULT
EARLY_BUFFER_MAX = lazy.BUFFER_MAX

#: What the boot stage did, for `status()` and the tests.
_events: dict[tuple[str, str], Event] = {}
_buffer: EarlyBuffer | None = None
_output: str | None = None
_warnings: list[str] = []
_new_id = itertools.count(1).__next__


def run(value: str, program: tuple[str | None, str | None] | None = None) -> None:
    """The stage for PYKPROBES_EVENTS=`value`; `program`: how the program is run and the
    directory Python puts first on sys.path for it (lazy.program()), as start-up saw them
    (the stage may run later: boot/lazy.py)."""
    # The boot stage's work is pykprobes' own (kprobe_busy): an early probe on a module it
    # runs (re, functools, enum, typing, os.path...) is not hit by it.
    from pykprobes.core.guard import kprobe_busy

    with kprobe_busy():
        _run(value, program or lazy.program())


def _run(value: str, program: tuple[str | None, str | None]) -> None:
    global _buffer, _output
    env = os.environ
    slots = _env_int("PYKPROBES_EARLY_SLOTS", early_kprobes.NR_EARLY_KPROBES_SLOTS_DEFAULT,
                     early_kprobes.NR_EARLY_KPROBES_SLOTS_MIN,
                     early_kprobes.NR_EARLY_KPROBES_SLOTS_MAX)
    entries = _env_int("PYKPROBES_EARLY_BUFFER", EARLY_BUFFER_DEFAULT, 1, EARLY_BUFFER_MAX)
    panic = env.get("PYKPROBES_PANIC_ON_UNSAFE", "").strip() in ("1", "y", "Y")
    _output = env.get("PYKPROBES_OUTPUT") or None
    mode, path0 = program
    if not registry.start_early_kprobes(slots, panic=panic, path0=path0):
        return  # the core is initialised already (the stage was started by hand, late)
    _buffer = EarlyBuffer(entries)

    from pykprobes import grammar

    definitions = grammar.parse_boot(value)
    probes = [d for _, d in definitions if isinstance(d, grammar.ProbeDef)]
    if probes and mode is not None and any(
            d.module == "__main__" or d.target_kind == "line" for d in probes):
        # The program's code reaches the core through the main hook, not the import system:
        # its probes wait for it even though a `__main__` module exists now (and a line of
        # the script is a line of `__main__`).
        script = os.path.realpath(sys.argv[0]) if mode == "script" else None
        registry.expect_module("__main__", script)
    for text, d in definitions:
        if isinstance(d, grammar.ProbeDef):
            _define(text, d)
        elif isinstance(d, grammar.RemoveDef):
            _remove(text, d)
        else:
            _fail(text, errno.EINVAL, f"{d.message} (column {d.pos})")
    if mode is not None and "__main__" in registry.pending_modules():
        from pykprobes.boot import mainhook

        mainhook.install(mode)
    registry.on_early_conversion(_handover)
    os.register_at_fork(after_in_child=_buffer.after_fork_in_child)
    import atexit

    atexit.register(_at_exit)  # registered first, so it runs last
    # Threading's shutdown runs before atexit, and it is all that a multiprocessing child
    # runs before os._exit(): write what there is then too (each write takes what it
    # writes, so nothing is written twice).
    register = getattr(sys.modules.get("threading"), "_register_atexit", None)  # 3.9+
    if register is not None:
        register(_write_at_exit)


def _env_int(name: str, default: int, low: int, high: int) -> int:
    value = lazy.env_int(name, default, low, high)
    if value is None:
        _warn(f"{name}={os.environ.get(name)!r} is not a number in {low}..{high}: "
              f"using {default}")
        return default
    return value


# ----------------------------------------------------------------------------- definitions


def _define(text: str, d: ProbeDef) -> None:
    """One `p`/`r` definition: an enabled event whose probes are early probes (or a probe
    point appended to the event of that name), through the tracefs file's entry."""
    from pykprobes.trace.events import DefinitionError, register_trace_kprobe

    assert _buffer is not None
    try:
        register_trace_kprobe(_events, d, _buffer, _new_id,  # type: ignore[arg-type]
                              early=True, line_symbols=_line_symbols,
                              code_before_import=_code_before_import)
    except DefinitionError as exc:
        target = exc.target_error
        _fail(text, exc.errno, f"{exc.args[0]} (column {exc.pos})" if target is None
              else str(target.args[0]))


def _line_symbols(spec: str) -> list[tuple[str, str, int]]:
    """lines.line_symbols() on the program's sys.path (_on_program_path)."""
    from pykprobes.core import lines

    return _on_program_path(lines.line_symbols, spec)  # type: ignore[no-any-return]


def _code_before_import(symbol: str) -> Any:
    """lines.code_before_import() on the program's sys.path (_on_program_path)."""
    from pykprobes.core import lines

    return _on_program_path(lines.code_before_import, symbol)


def _on_program_path(fn: Any, arg: str) -> Any:
    """fn(arg) with the directory the program will find first on sys.path: the boot stage
    runs before Python puts it there (nothing is imported meanwhile)."""
    path0 = registry.early_main_path0()
    if not path0 or path0 in sys.path:
        return fn(arg)
    sys.path.insert(0, path0)
    try:
        return fn(arg)
    finally:
        try:
            sys.path.remove(path0)
        except ValueError:
            pass


def _remove(text: str, d: RemoveDef) -> None:
    """`-:[GRP/]EVENT` (or `-:GRP/`) at boot removes the events defined before it on the
    command line that it names."""
    found = False
    for key, event in list(_events.items()):
        if (d.event is None or key[1] == d.event) and (d.group is None or key[0] == d.group):
            del _events[key]
            event.unregister()
            found = True
    if not found:
        _fail(text, errno.ENOENT, f"no event {d.event!r}")


def _fail(text: str, err: int, reason: str) -> None:
    # The kernel: pr_warn("Failed to add event(%d): %s\n", ret, cmd).
    _warn(f"Failed to add event(-{abs(err)}): {text} ({reason})")


def _warn(message: str) -> None:
    _warnings.append(message)
    try:
        if sys.stderr is not None:
            sys.stderr.write(f"pykprobes: {message}\n")
            sys.stderr.flush()
    except Exception:  # noqa: BLE001 - nowhere to report it
        pass


# ----------------------------------------------------------------------------- the two ends


def _handover() -> None:
    """Called by init_kprobes() once the early probes are normal ones: the events join the
    process's tracefs, and the early buffer moves into its trace buffer."""
    from pykprobes.core.guard import kprobe_busy

    with kprobe_busy():
        _move_to_tracefs()


def _move_to_tracefs() -> None:
    from pykprobes.trace.tracefs import tracefs

    fs = tracefs()
    for key, event in list(_events.items()):
        if not any(p.registered for p in event.probes):
            del _events[key]  # its probes were found unsafe and removed (reported)
            continue
        if fs.events.setdefault(key, event) is not event:
            _warn(f"event {key[0]}/{key[1]} exists in the trace already: the early one is "
                  "kept out of it")
    if _buffer is not None:
        _buffer.seal(fs.buffer)
    for event in _events.values():
        event.buffer = fs.buffer


def _at_exit() -> None:
    _write_at_exit()
    mainhook = sys.modules.get("pykprobes.boot.mainhook")
    if mainhook is not None:
        mainhook.exit_like_python()


def _write_at_exit() -> None:
    """A process still early at exit writes its early events where PYKPROBES_OUTPUT says
    (what it writes is taken out of the early buffer: a second call writes only what came
    after the first)."""
    if not registry.kprobes_is_early() or _buffer is None:
        return
    from pykprobes.core.guard import kprobe_busy

    with kprobe_busy():
        _write_early_events(_buffer)


def _write_early_events(buffer: EarlyBuffer) -> None:
    records, lost = buffer.snapshot(consume=True)
    if not records and not lost:
        return
    try:
        from pykprobes.trace import format as fmt

        text = "".join(fmt.format_line(r) + "\n" for r in records)
        if lost:
            text += fmt.format_lost(lost) + "\n"
        if _output:
            # One write with O_APPEND: the children of a process inherit PYKPROBES_EVENTS,
            # and each appends its own block.
            fd = os.open(_output, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, text.encode("utf-8", "backslashreplace"))
            finally:
                os.close(fd)
        elif sys.stderr is not None:
            sys.stderr.write(text)
            sys.stderr.flush()
    except Exception as exc:  # noqa: BLE001 - at exit: report, never raise
        _warn(f"the early events could not be written: {exc!r}")


def status() -> dict[str, Any]:
    """What the boot stage did: for `pykprobes` tools and the tests."""
    buf = _buffer
    early = registry.early_status
    return {
        "early": early.is_early(),
        "booted": early.was_early(),
        "slots": early.nr_slots(),
        "free_slots": early.nr_free_slots(),
        "events": [f"{g}/{n}" for g, n in _events],
        "buffer_entries": buf.entries if buf is not None else 0,
        "buffer_capacity": buf.capacity if buf is not None else 0,
        "lost": buf.lost if buf is not None else 0,
        "warnings": list(_warnings),
        "output": _output,
    }


__all__ = ["run", "status"]
