"""The start-up hook: the `.pth` file the wheel (and the editable install) puts in site-packages.

`site` runs each `.pth` line that starts with `import` at every interpreter start, before the
program. Ours costs two dictionary lookups when `PYKPROBES_EVENTS` and `PYKPROBES_CONTROL`
are unset: `site` has imported `os` already, so `import os` is a lookup in `sys.modules`, and
no pykprobes module is imported. Only when one is set does it import the boot stage
(`pykprobes.boot.start_from_environ()`, which never raises).

The name sorts after setuptools' `__editable__.pykprobes-*.pth` (which puts `src/` on sys.path
in the project's editable install) and before the `.pth` files of most other distributions
(`site` processes them in sorted order), so that the boot stage runs as early as a `.pth`
file can and can still import the package.

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
