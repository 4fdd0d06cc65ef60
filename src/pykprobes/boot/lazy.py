"""The lazy early path: the boot stage deferred to the first import of a target (issue 13).

At start-up the definitions are parsed (grammar.py, a standard-library-only leaf) and, when
every one of them is an early probe on a module that nothing has imported yet, nothing else
is done but putting `ImportHook` at the front of `sys.meta_path`: the core is not loaded, so
`python -c pass` with early probes on modules it never imports pays for the parse only.

The boot stage proper (boot/stage.py: the core, the early slots, the events) runs at the
first of

* the first import of a target module's top-level package, before that import goes on:
  the stage registers the probes as pending and installs the core's module watch, which
  this very import then goes through, so the target's body runs rewritten (import-time
  code is probed, as at start-up);
* the first import of any other pykprobes module (the API, `stage.status()`, the control
  server...), once the outermost such import is done: the process is early, with its
  early probes registered, before any part of the core can be used.

What the deferred stage cannot keep to itself runs at start-up as before (the eager
path): a definition that does not parse (its one warning belongs to start-up), a removal,
a `__main__` or `FILE:LINE` target (the main hook must be in place before the program),
a target module imported already, not found on `sys.path`, or one that the core itself
imports when it is loaded (its import would run the module twice: CORE_IMPORTS), more
definitions than early slots (the full-table error), and a PYKPROBES_EARLY_SLOTS or
PYKPROBES_EARLY_BUFFER that is not a number in range (its warning).

Standard library only, and nothing of it but `sys`, `os` and `_thread` (all loaded by the
interpreter before `site`), with the leaves env.py, grammar.py and errors.py: no `typing`,
`enum`, `re` or `dataclasses` at run time.
"""

from __future__ import annotations

import _thread
import os
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: this runs at start-up
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

#: The top-level modules that loading the core, its trace events, the rewrite arch
#: (`bytecode`) and writing the events import (the union over 3.11-3.15, measured by
#: tests/boot/test_import_weight.py; a superset), and those no early probe may target
#: (core/blacklist.py, core/early_kprobes.py EARLY_NEEDED): an early probe on one of them is
#: registered at start-up.
CORE_IMPORTS = frozenset((
    "__future__", "_collections", "_contextvars", "_functools", "_opcode", "_opcode_metadata",
    "_operator", "_py_warnings", "_sre", "_types", "_typing", "_weakrefset", "annotationlib",
    "ast", "atexit", "bytecode", "collections", "contextlib", "copy", "copyreg",
    "dataclasses", "dis", "enum", "errno", "functools", "gc", "importlib", "inspect", "io",
    "itertools", "keyword", "linecache", "opcode", "operator", "pykprobes", "re", "reprlib",
    "string", "struct", "threading", "token", "tokenize", "types", "typing", "warnings",
    "weakref", "zipimport",
))

#: The slots and buffer variables' ranges (core/early_kprobes.py, boot/stage.py check them).
SLOTS_DEFAULT, SLOTS_MIN, SLOTS_MAX = 16, 1, 64
BUFFER_DEFAULT, BUFFER_MAX = 16384, 1 << 20

#: The deferred stage: (PYKPROBES_EVENTS, the program as start-up saw it), until it runs.
_pending: tuple[str, tuple[str | None, str | None]] | None = None
_lock = _thread.RLock()
#: Per thread: how deep in imports of pykprobes modules it is (ImportHook._resuming_spec).
_imports = _thread._local()

#: The modules of the lazy path: imported at start-up, and by anything, without the stage.
LAZY_MODULES = frozenset(("pykprobes._version", "pykprobes.boot", "pykprobes.boot.lazy",
                          "pykprobes.boot.pth", "pykprobes.env", "pykprobes.errors",
                          "pykprobes.grammar"))


def start(value: str) -> None:
    """The boot stage for PYKPROBES_EVENTS=`value`: deferred when it can be, run now else."""
    global _pending
    program_now = program()
    tops = _deferrable(value, program_now[1])
    if tops is None:
        from pykprobes.boot import stage

        stage.run(value, program_now)
        return
    _pending = (value, program_now)
    sys.meta_path.insert(0, ImportHook(tops))


def resume() -> None:
    """Run the deferred boot stage, once (a no-op when there is none, or while it runs)."""
    global _pending
    with _lock:
        pending = _pending
        if pending is None:
            return
        _pending = None
        try:
            from pykprobes.boot import stage

            stage.run(*pending)
        except Exception as exc:  # noqa: BLE001 - the program must go on
            from pykprobes.boot import warn

            warn(f"the boot stage failed: {exc!r}")


def _deferrable(value: str, path0: str | None) -> frozenset[str] | None:
    """The top-level packages to wait for, or None if the stage must run now. `path0`: the
    directory the program will find first on sys.path, not there yet."""
    if "pykprobes.core" in sys.modules:
        return None  # started by hand, late: the stage decides
    from pykprobes import env

    if env.FREE_THREADED:
        return None  # the core refuses the build: its one line belongs to start-up
    slots = env_int("PYKPROBES_EARLY_SLOTS", SLOTS_DEFAULT, SLOTS_MIN, SLOTS_MAX)
    if slots is None or env_int("PYKPROBES_EARLY_BUFFER", BUFFER_DEFAULT, 1, BUFFER_MAX) is None:
        return None
    from pykprobes import grammar

    definitions = grammar.parse_boot(value)
    if not definitions or len(definitions) > slots:
        return None
    tops: set[str] = set()
    for _, d in definitions:
        if not isinstance(d, grammar.ProbeDef) or d.target_kind == "line" or not d.module:
            return None
        top = d.module.partition(".")[0]
        if top == "__main__" or top in CORE_IMPORTS or top in sys.modules:
            return None
        tops.add(top)
    path_finder = _path_finder()
    if path_finder is None:
        return None
    for top in tops:
        if top in sys.builtin_module_names:
            return None  # no code to rewrite: warned now
        if path_finder.find_spec(top) is None and (
                not path0 or path_finder.find_spec(top, [path0]) is None):
            return None  # not found: warned now
    return frozenset(tops)


def _path_finder() -> Any:
    """importlib's PathFinder without importing `importlib.machinery` (the frozen module
    the interpreter imported at its start)."""
    external = sys.modules.get("_frozen_importlib_external")
    return getattr(external, "PathFinder", None)


class ImportHook:
    """A meta path finder that finds nothing itself: the first import of one of `tops` (or of
    `pykprobes.core`) runs the deferred boot stage."""

    def __init__(self, tops: frozenset[str]) -> None:
        self.tops = tops

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if _pending is None:
            return None
        if name.startswith("pykprobes."):
            return None if name in LAZY_MODULES else self._resuming_spec(name, path, target)
        if name.partition(".")[0] not in self.tops:
            return None
        resume()
        # The finders the stage put in front of this one (the core's module watch) have not
        # seen this import yet: the import system is past them.
        for finder in list(sys.meta_path):
            if finder is self:
                break
            spec = _find(finder, name, path, target)
            if spec is not None:
                return spec
        return None

    def _resuming_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        """A pykprobes module's own spec, whose loader runs the stage once the outermost
        pykprobes import of this thread is done: then every module it imported is whole,
        those the stage imports too (run earlier, the stage would find them half-made)."""
        meta_path = list(sys.meta_path)
        for finder in meta_path[meta_path.index(self) + 1:] if self in meta_path else ():
            spec = _find(finder, name, path, target)
            if spec is not None:
                _resume_after_exec(spec.loader)
                return spec
        return None

    def invalidate_caches(self) -> None:
        pass


def _find(
    finder: object, name: str, path: Sequence[str] | None, target: ModuleType | None
) -> ModuleSpec | None:
    find = getattr(finder, "find_spec", None)
    return find(name, path, target) if find is not None else None


def _resume_after_exec(loader: Any) -> None:
    exec_module = getattr(loader, "exec_module", None)
    if exec_module is None:
        return

    def exec_then_resume(module: ModuleType) -> None:
        depth = getattr(_imports, "depth", 0)
        _imports.depth = depth + 1
        try:
            exec_module(module)
        finally:
            _imports.depth = depth
        if depth == 0:
            resume()

    loader.exec_module = exec_then_resume


def env_int(name: str, default: int, low: int, high: int) -> int | None:
    """The integer variable `name` (`default` when unset or blank), None if it is not a
    number in low..high."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = int(text.strip(), 0)
    except ValueError:
        return None
    return value if low <= value <= high else None


def program() -> tuple[str | None, str | None]:
    """How the program will be run, from sys.argv as `site` sees it ("script", "-c", "-m",
    or None: interactive or stdin), and the directory Python will put first on sys.path for
    it (the boot stage runs before it does; runpy changes sys.argv[0] later)."""
    argv0 = sys.argv[0] if sys.argv else ""
    safe = getattr(sys.flags, "safe_path", False)
    if argv0 == "-c":
        return "-c", None if safe else os.getcwd()
    if argv0 == "-m":
        return "-m", None if safe else os.getcwd()
    if not argv0 or argv0 == "-":
        return None, None
    if safe:
        return "script", None
    if os.path.isdir(argv0) or (os.path.isfile(argv0) and
                                not argv0.endswith((".py", ".pyw", ".pyc"))):
        return "script", os.path.abspath(argv0)  # a directory or a zip with __main__.py
    return "script", os.path.dirname(os.path.realpath(argv0))


__all__ = ["CORE_IMPORTS", "LAZY_MODULES", "ImportHook", "env_int", "program", "resume", "start"]
