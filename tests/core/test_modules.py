"""The module notifier: probes on modules not imported yet, top-level code, reload and
removal (GONE)."""

from __future__ import annotations

import errno
import importlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

import pykprobes as kp

SOURCE = '''
LOG = []

def work(x):
    return x * 3

class Thing:
    def method(self):
        return "m"

LOG.append(work(2))
'''


@pytest.fixture
def fresh_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"pkfresh_{tmp_path.name.replace('-', '_')}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield f"{name}.mod"
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def test_probe_waits_for_import_and_reaches_import_time_code(fresh_module: str) -> None:
    seen: list[int] = []
    work = kp.Kprobe(symbol_name=f"{fresh_module}:work",
                     pre_handler=lambda p, r: seen.append(r.args["x"]))
    method = kp.Kprobe(symbol_name=f"{fresh_module}:Thing.method")
    top = kp.Kprobe(symbol_name=f"{fresh_module}:<module>")
    kp.register_kprobes([work, method, top])
    try:
        assert fresh_module not in sys.modules  # registering imported nothing
        assert work.addr is None or not hasattr(work.addr, "code")
        mod = importlib.import_module(fresh_module)
        assert mod.LOG == [6]
        assert seen == [2], "the call made by the module's body was probed"
        assert top.nhit == 1
        assert mod.work(5) == 15 and seen == [2, 5]
        assert mod.Thing().method() == "m" and method.nhit == 1
        kp.wait_for_kprobe_optimizer()
        assert mod.work(1) == 3 and work.nhit == 3
    finally:
        kp.unregister_kprobes([work, method, top])
    assert mod.work.__code__ is work.addr.code


def test_pending_unknown_symbol_is_gone_not_an_import_error(fresh_module: str) -> None:
    p = kp.Kprobe(symbol_name=f"{fresh_module}:nope")
    kp.register_kprobe(p)
    try:
        with pytest.warns(RuntimeWarning, match="could not be armed"):
            mod = importlib.import_module(fresh_module)
        assert mod.work(1) == 3
        assert p.flags & kp.KPROBE_FLAG_GONE
    finally:
        kp.unregister_kprobe(p)


def test_unregister_pending_probe(fresh_module: str) -> None:
    p = kp.Kprobe(symbol_name=f"{fresh_module}:work")
    kp.register_kprobe(p)
    assert "0000000000000000  k  " in kp.list_kprobes()
    kp.unregister_kprobe(p)
    mod = importlib.import_module(fresh_module)
    assert mod.work(1) == 3 and p.nhit == 0


def test_reload_marks_gone(fresh_module: str) -> None:
    mod = importlib.import_module(fresh_module)
    p = kp.Kprobe(symbol_name=f"{fresh_module}:work")
    kp.register_kprobe(p)
    try:
        mod.work(1)
        assert p.nhit == 1
        old_work = mod.work
        importlib.reload(mod)
        assert p.flags & kp.KPROBE_FLAG_GONE
        assert "[GONE]" in kp.list_kprobes()
        mod.work(1)
        old_work(1)
        assert p.nhit == 1
        with pytest.raises(kp.KprobeError) as info:
            kp.enable_kprobe(p)
        assert info.value.errno == errno.EINVAL
    finally:
        kp.unregister_kprobe(p)
    assert old_work.__code__ is p.addr.code


def test_removed_from_sys_modules_marks_gone(fresh_module: str) -> None:
    mod = importlib.import_module(fresh_module)
    p = kp.Kprobe(symbol_name=f"{fresh_module}:work")
    kp.register_kprobe(p)
    try:
        del sys.modules[fresh_module]
        assert "[GONE]" in kp.list_kprobes()
        assert p.flags & kp.KPROBE_FLAG_GONE
        mod.work(1)
        assert p.nhit == 0
    finally:
        kp.unregister_kprobe(p)


def test_optimizer_running_while_the_module_body_runs(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The optimizer may rewrite a pending module's code while its body runs (here the body
    flushes it itself, before its `def`): the body still creates its functions from the code
    it started with, and they must end up running the current version."""
    from tests.testenv import OPTIMIZED, REWRITTEN

    name = f"pkmid_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "import pykprobes\npykprobes.wait_for_kprobe_optimizer()\n"
        "def work(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = kp.Kprobe(symbol_name=f"{name}:work")
    kp.register_kprobe(p)
    try:
        mod = importlib.import_module(name)
        kp.wait_for_kprobe_optimizer()
        assert bool(p.flags & kp.KPROBE_FLAG_OPTIMIZED) == OPTIMIZED
        assert (mod.work.__code__ is not p.addr.code) == REWRITTEN
        assert mod.work(1) == 2 and mod.work(2) == 3
        assert p.nhit == 2
    finally:
        kp.unregister_kprobe(p)
        sys.modules.pop(name, None)
    assert mod.work.__code__ is p.addr.code


def test_an_imported_module_leaves_no_table_entry_behind(fresh_module: str) -> None:
    """The module body's own code state (the parent of its functions' states while it runs)
    goes when the body has run, and with it its versions."""
    from pykprobes.core import registry

    view = registry.table_view()

    def entries() -> list[object]:
        states = [*view.states.values(), *view.versions.values(), *view.retiring.values()]
        return [s for s in states if s.module == fresh_module]

    work = kp.Kprobe(symbol_name=f"{fresh_module}:work")
    method = kp.Kprobe(symbol_name=f"{fresh_module}:Thing.method")
    kp.register_kprobes([work, method])
    try:
        mod = importlib.import_module(fresh_module)
        assert work.nhit == 1
        kp.wait_for_kprobe_optimizer()
        assert mod.work(1) == 3 and work.nhit == 2
        assert entries()
    finally:
        kp.unregister_kprobes([work, method])
    kp.wait_for_kprobe_optimizer()
    assert entries() == []


@pytest.mark.parametrize("offset", [-2, "2", 2.0, None])
def test_a_waiting_probe_with_a_bad_offset_is_refused_at_registration(
    fresh_module: str, offset: object
) -> None:
    p = kp.Kprobe(symbol_name=f"{fresh_module}:work", offset=offset)  # type: ignore[arg-type]
    with pytest.raises(kp.KprobeError) as info:
        kp.register_kprobe(p)
    assert info.value.errno == errno.EINVAL
    assert not p.registered and fresh_module not in sys.modules


@pytest.mark.parametrize(("qualname", "offset", "err"), [
    ("work", 3, errno.EINVAL),  # not an instruction start
    ("work", 10_000, errno.EINVAL),  # past the end
    ("Thing", 0, errno.EINVAL),  # a class
    ("nothere", 0, errno.ENOENT),
])
def test_a_waiting_probe_is_refused_at_the_import_as_an_imported_module_refuses_it(
    fresh_module: str, qualname: str, offset: int, err: int
) -> None:
    """Accepted while waiting (only the import tells), then reported when the module is
    imported, with the error registering it on the imported module gives; never raised
    into the import, and the probe is left GONE, armed nowhere."""
    symbol = f"{fresh_module}:{qualname}"
    p = kp.Kprobe(symbol_name=symbol, offset=offset)
    kp.register_kprobe(p)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mod = importlib.import_module(fresh_module)
        assert mod.LOG == [6]
        assert p.is_gone() and not p.is_optimized() and p.nhit == 0
        assert "[GONE]" in kp.list_kprobes()
        later = kp.Kprobe(symbol_name=symbol, offset=offset)
        with pytest.raises(kp.KprobeError) as info:
            kp.register_kprobe(later)
        assert info.value.errno == err
        reported = [str(w.message) for w in caught if symbol in str(w.message)]
        assert len(reported) == 1 and str(info.value) in reported[0]
    finally:
        kp.unregister_kprobe(p)



SLOW_BODY = '''
import pykprobes as kp

kp.wait_for_kprobe_optimizer()
NAMES = sorted(k for k in globals() if k.startswith("__pykprobes"))
'''


def test_a_module_body_is_not_rewritten_while_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the early stage the optimizer leaves module bodies to the breakpoint: its
    delayed pass comes while the body runs (`pykprobes run -e 'p:t/m __main__:<module>'`),
    and a rewrite would put its call names in the namespace the body runs in, where the
    program's own `globals()` sees them."""
    name = f"pkslow_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(SLOW_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    top = kp.Kprobe(symbol_name=f"{name}:<module>")
    kp.register_kprobe(top)
    try:
        mod = importlib.import_module(name)
        assert mod.NAMES == []
        assert top.nhit == 1
        assert not top.flags & kp.KPROBE_FLAG_OPTIMIZED
    finally:
        kp.unregister_kprobe(top)
        sys.modules.pop(name, None)
