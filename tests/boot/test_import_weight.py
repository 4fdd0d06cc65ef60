"""What the start-up hook costs in imports, measured in child interpreters of this venv.

Unset: the `.pth` line imports nothing (no pykprobes module at all). Set: the boot stage
loads the modules listed below and no others; the rewrite arch and `bytecode` come only
with the first import of a target module. Every module whose Python code the early path runs
is on the blacklist while early (the early blacklist, or the core's)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from pykprobes.boot.pth import PTH_LINE
from tests.boot.conftest import run, warnings_of

#: No import in the child's program: json is a target below.
MODULES = "import sys; print(sorted(sys.modules))"

#: The pykprobes modules the boot stage loads when PYKPROBES_EVENTS is set (pending targets).
BOOT_PYKPROBES = {
    "pykprobes", "pykprobes._version", "pykprobes.errors", "pykprobes.grammar",
    "pykprobes.insn",  # the instruction decoder registration checks offsets with
    "pykprobes.boot", "pykprobes.boot.buffer", "pykprobes.boot.stage",
    # the seed's early registration: the core's registry and what it imports
    "pykprobes.core", "pykprobes.core.address", "pykprobes.core.arch",
    "pykprobes.core.blacklist", "pykprobes.core.codestate", "pykprobes.core.early",
    "pykprobes.core.kretprobe", "pykprobes.core.modwatch", "pykprobes.core.probe",
    "pykprobes.core.registry", "pykprobes.core.regs", "pykprobes.core.resolve",
    "pykprobes.core.returns", "pykprobes.core.site",
    # who holds a code object (codestate's), and the interpreter facts it asks
    "pykprobes.core.holders", "pykprobes.env",
    # the events the definitions become, and their fetchargs
    "pykprobes.trace", "pykprobes.trace.buffer", "pykprobes.trace.events",
    "pykprobes.trace.fetchargs", "pykprobes.trace.safe", "pykprobes.trace.types",
    # the buffer's storage, thread keys and recorders, and the choice of their backend
    "pykprobes.trace.backend", "pykprobes.trace.cmdlines",
    "pykprobes.trace.recorder", "pykprobes.trace.ring",
}
#: Loaded with the above when the trace hot path's C accelerator is built and chosen.
SPEEDUPS = {"pykprobes.trace._speedups"}
#: The standard library modules the above may add (the core's imports: typing, threading,
#: dis, warnings, ...; `re` comes with typing before 3.13). A superset over 3.11-3.13.
BOOT_STDLIB = {
    "__future__", "_collections", "_functools", "_opcode", "_opcode_metadata", "_operator",
    "_sre", "_typing", "_weakrefset", "atexit", "collections", "collections.abc",
    "contextlib", "copyreg", "dis", "enum", "errno", "functools", "gc", "importlib",
    "importlib._bootstrap", "importlib._bootstrap_external", "importlib.machinery",
    "itertools", "keyword", "opcode", "operator", "re", "re._casefix", "re._compiler",
    "re._constants", "re._parser", "reprlib", "threading", "types", "typing", "typing.io",
    "typing.re", "warnings", "weakref",
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


def test_unset_imports_no_pykprobes_module(tmp_path: Path) -> None:
    for events in (None, ""):
        mods = _modules(tmp_path, events)
        assert not {m for m in mods if m.split(".")[0] == "pykprobes"}


def test_the_pth_line_tests_the_variable_inline() -> None:
    code = compile(PTH_LINE, "_pykprobes.pth", "exec")
    # `import os` (site imported it: a sys.modules lookup), one environ lookup, and only
    # behind `and` the import of the boot stage.
    assert code.co_names == ("os", "environ", "get", "__import__", "boot",
                             "start_from_environ")
    assert PTH_LINE.index("os.environ.get") < PTH_LINE.index("and __import__")


def test_set_loads_the_listed_modules_and_nothing_heavy(tmp_path: Path) -> None:
    base = _modules(tmp_path, None)
    mods = _modules(tmp_path, "p:boot/a json.decoder:JSONDecoder.decode s:len")
    added = mods - base
    # The C accelerator comes when it is built and chosen (trace/backend.py).
    assert {m for m in added if m.split(".")[0] == "pykprobes"} - SPEEDUPS == BOOT_PYKPROBES
    assert {m for m in added if m.split(".")[0] != "pykprobes"} <= BOOT_STDLIB
    assert not added & (NEVER | REWRITE)
    # The target's import brings the rewrite arch, to rewrite its code before it runs.
    after = _modules(tmp_path, "p:boot/a json.decoder:JSONDecoder.decode s:len",
                     "import json; json.loads('[1]');" + MODULES)
    assert {"pykprobes.arch.rewrite", "pykprobes.arch.rewrite.inject", "bytecode"} <= after


PROFILE = """
import os, sys
called = set()

def profile(frame, event, arg):
    if event == "call":
        called.add(frame.f_globals.get("__name__") or "?")

before = set(sys.modules)
# Other meta path finders of this environment (setuptools' _distutils_hack) run on every
# import, ours or not: they are the import system here, not the early path.
finders = {type(f).__module__ for f in sys.meta_path} - {"_frozen_importlib",
                                                          "_frozen_importlib_external"}
sys.setprofile(profile)
os.environ["PYKPROBES_EVENTS"] = @EVENTS@
import pykprobes.boot
pykprobes.boot.start_from_environ()     # the boot stage, as the .pth line calls it
import json as target                   # the target's import: rewrite before its body
target.loads("[1]")                     # a hit: the event recorded into the early buffer
from pykprobes.boot import stage
stage._write_at_exit()                  # what a process still early does at exit
sys.setprofile(None)
from pykprobes.core import blacklist, early
loaded = set(sys.modules) - before

def allowed(name):
    return (blacklist.blacklist_reason(name, None) is not None
            or early.blacklist_reason(name) is not None)

print(repr({
    "ran_unlisted": sorted(m for m in called if not allowed(m) and m not in finders),
    "loaded_unlisted": sorted(m for m in loaded if not allowed(m)),
}))
"""


def test_what_the_early_path_runs_is_blacklisted_while_early(tmp_path: Path) -> None:
    """An early probe on a module whose code the early machinery itself runs would be hit
    by the machinery arming it: every such module is refused while early."""
    events = "p:boot/a json.decoder:JSONDecoder.decode s:len;r:boot/r json:loads $retval"
    # Started without the variable (the .pth does nothing), the child sets it and calls the
    # boot stage itself, under a profile function.
    res = run(["-c", PROFILE.replace("@EVENTS@", repr(events))], cwd=tmp_path,
              env={"PYKPROBES_OUTPUT": str(tmp_path / "out")})
    assert res.returncode == 0, res.stderr
    out = ast.literal_eval(res.stdout)
    # The target (json), the program, and code Python makes on the fly (namedtuple's
    # `namedtuple_X` namespaces, which hold no probe-able module code).
    program = {"__main__", "?", "json", "json.decoder", "json.scanner", "json.encoder"}
    ran = [m for m in out["ran_unlisted"]
           if m not in program and not m.startswith("namedtuple_")]
    assert ran == []
    loaded = [m for m in out["loaded_unlisted"] if m not in program and m != "_json"]
    # C modules cannot be probed (no code objects): only Python ones matter here.
    assert [m for m in loaded if not _is_builtin_or_extension(m)] == []
    assert "JSONDecoder.decode+0" in (tmp_path / "out").read_text()


def _is_builtin_or_extension(name: str) -> bool:
    if name in sys.builtin_module_names:
        return True
    mod = sys.modules.get(name)
    if mod is None:
        __import__(name)
        mod = sys.modules[name]
    file = getattr(mod, "__file__", None) or ""
    return not file.endswith(".py")
