"""The start-up hook: the two files the wheel (and the editable install) puts in site-packages.

`_pykprobes.pth` (every Python): `site` runs each `.pth` line that starts with `import` at
every interpreter start, before the program. Ours costs two dictionary lookups when
`PYKPROBES_EVENTS` and `PYKPROBES_CONTROL` are unset: `site` has imported `os` already, so
`import os` is a lookup in `sys.modules`, and no pykprobes module is imported. Only when one
is set does it import the boot stage (`pykprobes.boot.start_from_environ()`, which never
raises).

`_pykprobes.start` (PEP 829, Python 3.15+): `site` calls each `pkg.mod:callable` line of a
`NAME.start` file, resolved by `pkgutil.resolve_name()`, after every `.pth` file has extended
`sys.path`; and a `NAME.start` file *suppresses the import lines of `NAME.pth`*. Import lines
are deprecated from 3.15, silently ignored from 3.18 (CPython's Lib/site.py, 3.15.2:
`StartupState._exec_imports`). Hence the same name for both files: on 3.15+ the `.start`
entry point runs and the `.pth` line does not, before 3.15 the `.pth` line runs and the
`.start` file is not read, so the boot stage runs once on every Python (and
`start_from_environ()` is idempotent besides, for a `site.addsitedir()` of the same directory
later on).

What the `.start` route costs when `PYKPROBES_EVENTS` is unset is not nothing: `site` imports
`pkgutil` to resolve an entry point (its first `.start` entry point in this environment; any
other distribution's `.start` file costs the same), then `pykprobes`, `pykprobes._version` and
`pykprobes.boot`, which import nothing else; `start_from_environ()` then returns at its one
`os.environ` lookup (bench/startup.py measures it; tests/boot/test_import_weight.py lists the
modules).

The `.pth` name sorts after setuptools' `__editable__.pykprobes-*.pth` (which puts `src/` on
sys.path in the project's editable install) and before the `.pth` files of most other
distributions (`site` processes them in sorted order), so that the boot stage runs as early
as a `.pth` file can and can still import the package. `.start` entry points run after every
`.pth` file's path lines whatever the names.

Standard library only, and importable on its own: setup.py reads this file by path.
"""

PTH_NAME = "_pykprobes.pth"

PTH_LINE = (
    'import os; (os.environ.get("PYKPROBES_EVENTS") or os.environ.get("PYKPROBES_CONTROL"))'
    ' and __import__("pykprobes.boot").boot.start_from_environ()'
)

#: The file's whole text.
PTH_TEXT = (
    PTH_LINE + "\n"
    "# pykprobes: early probes at interpreter start-up when PYKPROBES_EVENTS is set, the\n"
    "# control socket when PYKPROBES_CONTROL is; nothing is imported when neither is.\n"
    "# See pykprobes/boot/__init__.py.\n"
)

#: The PEP 829 twin of PTH_NAME: the same name, so that it suppresses the `.pth` line.
START_NAME = PTH_NAME[: -len(".pth")] + ".start"

#: The entry point (`pkgutil.resolve_name(..., strict=True)` form).
START_ENTRY = "pykprobes.boot:start_from_environ"

START_TEXT = (
    "# pykprobes: early probes at interpreter start-up when PYKPROBES_EVENTS is set, the\n"
    "# control socket when PYKPROBES_CONTROL is (PEP 829; it replaces the import line of\n"
    "# _pykprobes.pth). See pykprobes/boot/__init__.py.\n"
    + START_ENTRY + "\n"
)

#: Every start-up file: name -> text.
HOOK_FILES = {PTH_NAME: PTH_TEXT, START_NAME: START_TEXT}
