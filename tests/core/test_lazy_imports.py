"""Lazy imports (PEP 810, 3.15): a probe waiting for a module arms when the module is really
loaded, at its first use, before its body runs; resolving a probe never loads a lazy module.
Both forms (`lazy import mod`, and `import mod` with `mod` in `__lazy_modules__`), and the
global mode (`-X lazy_imports=all`), each in a new interpreter."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests import testenv


def _has_lazy_imports() -> bool:
    try:
        compile("lazy import json", "<lazy>", "exec")
    except SyntaxError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _has_lazy_imports(), reason="capability: no lazy imports (PEP 810) in this Python"
)

#: The module imported lazily: it calls f at import time, so a probe armed after its body
#: started would miss that call.
LAZY_MOD = """
def f(x):
    return x + 1

AT_IMPORT = f(1)

class C:
    def m(self):
        return 2
"""

#: The program: registers a probe on lazymod:f while lazymod is lazily imported, and reports
#: whether lazymod was loaded before its first use.
PROGRAM = """
import sys
import pykprobes as kp
IMPORT_LINES
hits = []
p = kp.Kprobe(symbol_name="lazymod:f", pre_handler=lambda p, r: hits.append(r.args["x"]))
kp.register_kprobe(p)
kp.wait_for_kprobe_optimizer()
loaded_at_register = "lazymod" in sys.modules
value = lazymod.f(5)
print(repr({"loaded_at_register": loaded_at_register, "value": value, "hits": hits,
            "nhit": p.nhit, "waiting": p.addr is None}))
"""

FORMS = {
    "lazy import": "lazy import lazymod",
    "__lazy_modules__": "__lazy_modules__ = ['lazymod']\nimport lazymod",
}


@pytest.fixture
def lazymod(tmp_path: Path) -> Path:
    (tmp_path / "lazymod.py").write_text(LAZY_MOD)
    return tmp_path


def _run(
    run_python: testenv.RunPython, path: Path, code: str, lazy_all: bool = False
) -> dict[str, object]:
    script = path / "program.py"
    script.write_text(code)
    # The program as a file: a lazy import must be a module-level statement of the program.
    proc = run_python(
        f"import runpy, sys; sys.argv = [{str(script)!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')",
        env={"PYTHONPATH": str(path), "PYTHON_LAZY_IMPORTS": "all" if lazy_all else "normal"},
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = ast.literal_eval(proc.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_waiting_probe_arms_when_the_lazy_module_is_really_loaded(
    run_python: testenv.RunPython, lazymod: Path, form: str
) -> None:
    result = _run(run_python, lazymod, PROGRAM.replace("IMPORT_LINES", FORMS[form]))
    # Registering did not load it (the probe waited), its first use did, and the probe was
    # armed before the body ran: the import-time call is seen.
    assert result == {"loaded_at_register": False, "value": 6, "hits": [1, 5], "nhit": 2,
                      "waiting": False}


def test_the_global_lazy_mode(run_python: testenv.RunPython, lazymod: Path) -> None:
    """`-X lazy_imports=all` (PYTHON_LAZY_IMPORTS=all) makes every import lazy, pykprobes'
    own included: the probe still waits and arms at the first use."""
    result = _run(run_python, lazymod, PROGRAM.replace("IMPORT_LINES", "import lazymod"), True)
    assert result == {"loaded_at_register": False, "value": 6, "hits": [1, 5], "nhit": 2,
                      "waiting": False}


RESOLVE = """
import sys
import pykprobes as kp
lazy import lazymod
lazy from lazymod import C
errors = {}
for symbol in ("__main__:C.m", "__main__:lazymod.f"):
    try:
        kp.register_kprobe(kp.Kprobe(symbol_name=symbol, pre_handler=lambda p, r: None))
    except kp.KprobeError as exc:
        errors[symbol] = (exc.errno, str(exc))
print(repr({"errors": errors, "loaded": "lazymod" in sys.modules}))
"""


def test_resolving_through_a_lazy_name_refuses_and_loads_nothing(
    run_python: testenv.RunPython, lazymod: Path
) -> None:
    import errno

    result = _run(run_python, lazymod, RESOLVE)
    assert result["loaded"] is False
    errors = result["errors"]
    assert isinstance(errors, dict) and sorted(errors) == ["__main__:C.m", "__main__:lazymod.f"]
    for code, message in errors.values():
        assert code == errno.ENOENT
        assert "lazy import (PEP 810)" in message, message
