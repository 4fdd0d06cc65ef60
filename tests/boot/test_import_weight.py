"""What the start-up hook costs in imports, measured in child interpreters of this venv.

Unset: the `.pth` line imports nothing (no pykprobes module at all); where `site` runs the
`.start` entry point instead (PEP 829, 3.15+), that imports the three modules it lives in and
nothing else (`site` itself imports `pkgutil` to resolve it: boot/pth.py). Set: the boot stage
loads the modules listed below and no others; the rewrite arch and `bytecode` come only
with the first import of a target module (or at registration, for a target the rewrite arch
imports itself). The modules loaded may still be probed early (tests/boot/test_reach.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pykprobes
from pykprobes.boot.pth import PTH_LINE, START_ENTRY
from pykprobes.core import early_kprobes as early_module
from tests.boot.conftest import SITE_RUNS_START_FILES, run, warnings_of

#: No import in the child's program: json is a target below.
MODULES = "import sys; print(sorted(sys.modules))"

#: The `.start` entry point's modules: all that it imports when PYKPROBES_EVENTS is unset
#: (with `__future__`, for their `from __future__ import annotations`).
ENTRY_PYKPROBES = {"pykprobes", "pykprobes._version", "pykprobes.boot"}
#: The pykprobes modules the boot stage loads when PYKPROBES_EVENTS is set (pending targets).
BOOT_PYKPROBES = {
    "pykprobes", "pykprobes._version", "pykprobes.errors", "pykprobes.grammar",
    "pykprobes.insn",  # the instruction decoder registration checks offsets with
    "pykprobes.boot", "pykprobes.boot.buffer", "pykprobes.boot.stage",
    # the seed's early registration: the core's registry and what it imports
    "pykprobes.core", "pykprobes.core.address", "pykprobes.core.arch",
    "pykprobes.core.blacklist", "pykprobes.core.codestate", "pykprobes.core.early_kprobes",
    "pykprobes.core.framecall", "pykprobes.core.rethook",
    "pykprobes.core.opthit",  # a site's inline hit (its C twin below)
    "pykprobes.core.guard", "pykprobes.core.kprobe_addr",
    "pykprobes.core.modules", "pykprobes.core.modwatch", "pykprobes.core.optimizer",
    "pykprobes.core.probe", "pykprobes.core.registry", "pykprobes.core.regs",
    "pykprobes.core.resolve", "pykprobes.core.returns", "pykprobes.core.site",
    "pykprobes.core.table",
    # who holds a code object (codestate's), and the interpreter facts it asks
    "pykprobes.core.holders", "pykprobes.env",
    # the choice of the C accelerator (codestate's Untraced; the trace backend's)
    "pykprobes.accelerator",
    # what address.py keeps per code object (a leaf: weakref only)
    "pykprobes.codecache",
    # the events the definitions become, and their fetchargs
    "pykprobes.trace", "pykprobes.trace.buffer", "pykprobes.trace.events",
    "pykprobes.trace.fetchargs", "pykprobes.trace.safe", "pykprobes.trace.types",
    # the buffer's storage, thread keys and recorders, and the choice of their backend
    "pykprobes.trace.backend", "pykprobes.trace.cmdlines",
    "pykprobes.trace.recorder", "pykprobes.trace.ring",
}
#: Loaded with the above when the trace hot path's C accelerator is built and chosen.
SPEEDUPS = {"pykprobes.trace._speedups", "pykprobes.core._rethook", "pykprobes.core._opthit"}
#: The standard library modules the above may add (the core's imports: typing, threading,
#: dis, warnings, ...; `re` comes with typing before 3.13; 3.14 moved warnings' Python code
#: to _py_warnings). A superset over 3.11-3.15. Not annotationlib and ast: on 3.14+ a
#: typing.NamedTuple class imports them (and enum) when it is made, so the boot stage's
#: modules define none (insn.Insn); CPython's own start-up imports neither.
BOOT_STDLIB = {
    "__future__", "_collections", "_contextvars", "_functools", "_opcode", "_opcode_metadata",
    "_operator", "_py_warnings", "_sre", "_types", "_typing", "_weakrefset", "atexit",
    "collections", "collections.abc", "contextlib", "copyreg", "dis", "enum", "errno",
    "functools", "gc", "importlib", "importlib._bootstrap", "importlib._bootstrap_external",
    "importlib.machinery", "io", "itertools", "keyword", "opcode", "operator", "re",
    "re._casefix", "re._compiler", "re._constants", "re._parser", "reprlib", "threading",
    "types", "typing", "typing.io", "typing.re", "warnings", "weakref",
}
#: Loaded at the first import of a target (the rewrite arch), never at start-up.
REWRITE = {"pykprobes.arch.rewrite", "pykprobes.arch.rewrite.inject", "bytecode", "inspect",
           "ast", "tokenize", "dataclasses"}
#: Never loaded by the boot stage.
NEVER = {"pykprobes.cli", "pykprobes.cli.main", "pykprobes.trace.tracefs",
         "pykprobes.trace.format", "pykprobes.trace.filter", "pykprobes.arch.monitoring",
         "pykprobes.arch.settrace", "json", "json.decoder", "logging", "inspect", "ast"}


def _modules(tmp_path: Path, events: str | None, code: str = MODULES) -> set[str]:
    res = run(["-c", code], events=events, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert warnings_of(res.stderr) == [] and "Traceback" not in res.stderr, res.stderr
    return set(ast.literal_eval(res.stdout.splitlines()[-1]))


def _pykprobes(mods: set[str]) -> set[str]:
    return {m for m in mods if m.split(".")[0] == "pykprobes"}


def test_unset_imports_no_pykprobes_module_but_the_entry_point(tmp_path: Path) -> None:
    for events in (None, ""):
        mods = _modules(tmp_path, events)
        assert _pykprobes(mods) == (ENTRY_PYKPROBES if SITE_RUNS_START_FILES else set())


def test_the_entry_point_unset_imports_nothing_else(tmp_path: Path) -> None:
    """What `site` does with `_pykprobes.start`, by hand, on any Python: resolve the entry
    point (importing its module) and call it, with the variable unset."""
    src = str(Path(pykprobes.__file__).parent.parent)
    # -S: no start-up hook of this venv runs before the measurement; what resolving any
    # entry point costs `site` (pkgutil's regular expression: `re`) is paid before it.
    code = (f"import os, sys, pkgutil; pkgutil.resolve_name('os:getcwd'); "
            f"sys.path.insert(0, {src!r}); before = set(sys.modules); "
            f"pkgutil.resolve_name({START_ENTRY!r})(); "
            "print(sorted(set(sys.modules) - before))")
    res = run(["-S", "-c", code], cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert set(ast.literal_eval(res.stdout)) == ENTRY_PYKPROBES | {"__future__"}


def test_the_pth_line_tests_the_variable_inline() -> None:
    code = compile(PTH_LINE, "_pykprobes.pth", "exec")
    # `import os` (site imported it: a sys.modules lookup), one environ lookup, and only
    # behind `and` the import of the boot stage.
    assert code.co_names == ("os", "environ", "get", "__import__", "boot",
                             "start_from_environ")
    assert PTH_LINE.index("os.environ.get") < PTH_LINE.index("and __import__")


#: What the lazy early path loads at start-up (boot/lazy.py): the parse and the import hook.
LAZY_PYKPROBES = {"pykprobes", "pykprobes._version", "pykprobes.boot", "pykprobes.boot.lazy",
                  "pykprobes.env", "pykprobes.errors", "pykprobes.grammar"}
#: What it must not load: the core, the trace, and the standard library's heavy modules.
NOT_LAZY = {"typing", "enum", "re", "dataclasses", "collections", "functools", "threading",
            "contextlib", "opcode", "dis", "weakref", "warnings"}
#: Early probes on modules the program does not import (as bench/startup.py's early16).
UNIMPORTED = "p:boot/a json.decoder:JSONDecoder.decode s:len;p:boot/b textwrap:dedent text:len"


def test_early_probes_on_unimported_modules_load_no_core_module(tmp_path: Path) -> None:
    """The lazy early path: the definitions are parsed and an import hook installed; no
    module of the core or the trace, and none of typing, enum, re... (boot/lazy.py)."""
    base = _modules(tmp_path, None)
    mods = _modules(tmp_path, UNIMPORTED)
    assert _pykprobes(mods) == LAZY_PYKPROBES
    assert not (mods - base) & (NOT_LAZY | NEVER | REWRITE)
    assert (mods - base) - LAZY_PYKPROBES <= {"__future__", "errno"}, sorted(mods - base)


def test_the_first_import_of_a_target_loads_the_core(tmp_path: Path) -> None:
    """The stage deferred by the lazy path runs at the target's import, before its body: the
    core's registry and the rewrite arch are loaded then, and the process is early."""
    code = ("import json, sys; import pykprobes; from pykprobes.boot import stage; "
            "print(pykprobes.kprobes_is_early(), stage.status()['events']);" + MODULES)
    res = run(["-c", code], events=UNIMPORTED, cwd=tmp_path)
    assert res.returncode == 0 and warnings_of(res.stderr) == [], res.stderr
    early, mods = res.stdout.splitlines()[-2:]
    assert early == "True ['boot/a', 'boot/b']"
    loaded = set(ast.literal_eval(mods))
    assert _pykprobes(loaded) - SPEEDUPS >= BOOT_PYKPROBES
    assert {"pykprobes.arch.rewrite", "bytecode"} <= loaded


def test_every_slot_constant_is_the_seeds() -> None:
    from pykprobes.boot import lazy, stage

    assert (lazy.SLOTS_DEFAULT, lazy.SLOTS_MIN, lazy.SLOTS_MAX) == (
        early_module.NR_EARLY_KPROBES_SLOTS_DEFAULT, early_module.NR_EARLY_KPROBES_SLOTS_MIN,
        early_module.NR_EARLY_KPROBES_SLOTS_MAX)
    assert (stage.EARLY_BUFFER_DEFAULT, stage.EARLY_BUFFER_MAX) == (16384, 1 << 20)


def test_loading_the_core_imports_only_what_the_lazy_path_waits_behind(tmp_path: Path) -> None:
    """An early probe on a module that loading the core (and the rewrite arch, and writing
    the events) imports is registered at start-up: deferred to that module's import, the
    core would import it again halfway through (boot/lazy.py CORE_IMPORTS)."""
    from pykprobes.boot import lazy

    code = ("import sys; before = set(sys.modules); "
            "import pykprobes; pykprobes.kprobes_is_early(); import json; json.loads('1'); "
            "from pykprobes.core.table import TABLE; TABLE.early.load_optimizer(); "
            "from pykprobes.boot import stage; stage._write_at_exit(); "
            "print(sorted({m.partition('.')[0] for m in set(sys.modules) - before}))")
    res = run(["-c", code], events="p:boot/a json:loads s", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    added = set(ast.literal_eval(res.stdout.splitlines()[-1]))
    python = {m for m in added if not _is_builtin_or_extension(m)}
    assert python - {"json"} <= lazy.CORE_IMPORTS


def test_set_loads_the_listed_modules_and_nothing_heavy(tmp_path: Path) -> None:
    """The eager path (a target that loading the core may import, boot/lazy.py CORE_IMPORTS:
    `string`) loads the core at start-up, and no more."""
    base = _modules(tmp_path, None)
    events = "p:boot/a json.decoder:JSONDecoder.decode s:len;p:boot/s string:capwords s"
    mods = _modules(tmp_path, events)
    added = mods - base
    # The C accelerator comes when it is built and chosen (trace/backend.py).
    assert _pykprobes(mods) - SPEEDUPS == BOOT_PYKPROBES | {"pykprobes.boot.lazy"}
    assert {m for m in added if m.split(".")[0] != "pykprobes"} <= BOOT_STDLIB
    assert not added & (NEVER | REWRITE)
    # The target's import brings the rewrite arch, to rewrite its code before it runs.
    after = _modules(tmp_path, events, "import json; json.loads('[1]');" + MODULES)
    assert {"pykprobes.arch.rewrite", "pykprobes.arch.rewrite.inject", "bytecode"} <= after


def test_the_optimizer_imports_only_what_early_knows(tmp_path: Path) -> None:
    """Loading the rewrite arch imports these standard library modules: an early probe
    waiting for one of them loads it at registration (core/early_kprobes.py OPTIMIZER_IMPORTS)."""
    code = ("import sys; from pykprobes.core.table import TABLE; before = set(sys.modules);"
            "TABLE.early.load_optimizer();"
            "print(sorted({m.partition('.')[0] for m in set(sys.modules) - before}))")
    added = set(ast.literal_eval(
        run(["-c", code], events="p:boot/a json:loads", cwd=tmp_path).stdout.splitlines()[-1]))
    python = {m for m in added if not _is_builtin_or_extension(m)}
    assert "bytecode" in python
    assert python - {"pykprobes", "bytecode"} <= early_module.OPTIMIZER_IMPORTS


def _is_builtin_or_extension(name: str) -> bool:
    if name in sys.builtin_module_names:
        return True
    mod = sys.modules.get(name)
    if mod is None:
        __import__(name)
        mod = sys.modules[name]
    file = getattr(mod, "__file__", None) or ""
    return not file.endswith(".py")


#: The pykprobes modules PYKPROBES_CONTROL=1 loads: the boot stage and the control server
#: (the tracefs, the core and the trace come with the server's first request, in its thread).
CONTROL_PYKPROBES = {"pykprobes", "pykprobes._version", "pykprobes.boot", "pykprobes.control",
                     "pykprobes.control.server", "pykprobes.control.paths",
                     "pykprobes.control.protocol"}
#: The standard library modules they may add (a superset over 3.11-3.15).
CONTROL_STDLIB = {"__future__", "_socket", "select", "threading", "_weakrefset", "atexit",
                  "errno", "itertools", "_collections", "collections", "keyword", "operator",
                  "reprlib", "_thread", "_functools", "functools", "types", "weakref",
                  "_threading_local", "copyreg", "enum", "_operator", "warnings",
                  "_contextvars", "contextvars", "_types"}


def test_control_loads_the_server_and_nothing_heavy(tmp_path: Path) -> None:
    code = ("import sys, threading, os; print(sorted(sys.modules)); "
            "print([t.name for t in threading.enumerate()])")
    base = _modules(tmp_path, None)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    res = run(["-c", code], cwd=tmp_path,
              env={"PYKPROBES_CONTROL": "1", "XDG_RUNTIME_DIR": str(xdg)})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    mods_line, threads_line = res.stdout.splitlines()[-2:]
    added = set(ast.literal_eval(mods_line)) - base
    # (On 3.15+ the .start entry point loads pykprobes.boot at every start: in `base`.)
    assert {m for m in added if m.split(".")[0] == "pykprobes"} == CONTROL_PYKPROBES - base
    assert {m for m in added if m.split(".")[0] != "pykprobes"} <= CONTROL_STDLIB
    assert "pykprobes-control" in ast.literal_eval(threads_line)
    # The socket was served, and removed at exit.
    assert (xdg / "pykprobes").is_dir() and list((xdg / "pykprobes").iterdir()) == []
    # "0" serves nothing: the .pth line (one truth test) loads the boot package, which
    # reads the value and stops there.
    res = run(["-c", MODULES], cwd=tmp_path, env={"PYKPROBES_CONTROL": "0"})
    loaded = {m for m in ast.literal_eval(res.stdout) if m.split(".")[0] == "pykprobes"}
    assert loaded == {"pykprobes", "pykprobes._version", "pykprobes.boot"}
