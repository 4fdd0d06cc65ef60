"""Port of the kernel's test.d/kprobe/kprobe_module.tc: events on a module's functions, which
outlive the module's unloading and are armed again when it loads. A Python module "unloads"
when it leaves sys.modules or is reloaded (importlib.reload), and "loads" when it is imported
again (the kernel's trace_kprobe_module_callback(), here `register_module_notifier`); the
new code is probed before its body runs.

Without a Python form: "Add an event on a module function without module name"
(`p:event0 trace_printk_irq_work`): a Python function is found by `module:qualname` only
(functions of different modules share names freely); the bare name is refused as a bad
probe point. The raw `Kprobe` API keeps the kernel's GONE rule (a kprobe on a module that
went away stays gone); only events come back.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS, TraceWriteError
from tests.kselftest.conftest import MakeModule, trace_args

MOD = "trace_printk_mod"
FUNC = "trace_printk_irq_work"
SOURCE = f"""
def {FUNC}(n):
    return n + 1

{FUNC}(-1)  # called at import: probed before the body runs
"""



def _call(n: int) -> Any:
    return getattr(sys.modules[MOD], FUNC)(n)


@pytest.fixture
def module(make_module: MakeModule) -> Path:
    return make_module(MOD, SOURCE)


def test_kprobe_module(fs: TraceFS, module: Path) -> None:
    importlib.import_module(MOD)

    # Add an event on a module function without module name: no Python form.
    with pytest.raises(TraceWriteError):
        fs.write("kprobe_events", f"p:event0 {FUNC}")

    # Add an event on a module function without specifying event name.
    fs.write("kprobe_events", f"p {MOD}:{FUNC}")
    probe_name = f"p_{MOD}_{FUNC}_0"
    assert fs.read(f"events/pykprobes/{probe_name}/enable") == "0\n"

    # Add an event on a module function with new event name.
    fs.write("kprobe_events", f"p:event1 {MOD}:{FUNC}")
    assert fs.read("events/pykprobes/event1/enable") == "0\n"

    # Add an event on a module function with new event and group name.
    fs.write("kprobe_events", f"p:kprobes1/event1 {MOD}:{FUNC} n")
    assert fs.read("events/kprobes1/event1/enable") == "0\n"

    # Remove target module, but event still be there.
    del sys.modules[MOD]
    assert fs.read("events/kprobes1/event1/enable") == "0\n"

    # Check possibility to defining events on unloaded module.
    fs.write("kprobe_events", f"p:event2 {MOD}:{FUNC}", append=True)

    # Target is gone, but we can prepare for next time.
    fs.write("events/kprobes1/event1/enable", "1")

    # Load module again, which means the event1 should be recorded (also what the body runs).
    importlib.import_module(MOD)
    _call(7)
    assert trace_args(fs, "event1") == ["n=-1", "n=7"]

    # Remove the module again and check the event is not locked.
    del sys.modules[MOD]
    fs.write("events/kprobes1/event1/enable", "0")
    fs.write("kprobe_events", "-:kprobes1/event1", append=True)
    assert "event1" not in fs.read("kprobe_events")


def test_an_event_on_a_reloaded_module_records_again(fs: TraceFS, module: Path) -> None:
    """importlib.reload(): the event stays enabled and records the new code's calls, from the
    body's own on (issue 16, item 9)."""
    mod = importlib.import_module(MOD)
    fs.write("kprobe_events", f"p:mod/work {MOD}:{FUNC} n")
    fs.write("kprobe_events", f"r:mod/ret {MOD}:{FUNC} n $retval", append=True)
    fs.write("events/mod/enable", "1")
    _call(1)
    for round_ in range(2):
        importlib.reload(mod)
        _call(10 + round_)
    assert trace_args(fs, "work") == ["n=1", "n=-1", "n=10", "n=-1", "n=11"]
    assert trace_args(fs, "ret") == ["n=1 retval=2", "n=-1 retval=0", "n=10 retval=11",
                                 "n=-1 retval=0", "n=11 retval=12"]
    assert fs.read("events/mod/work/enable") == "1\n"
    assert "[GONE]" not in kp.list_kprobes()


def test_an_event_defined_before_the_first_import(fs: TraceFS, module: Path) -> None:
    fs.write("kprobe_events", f"p:mod/work {MOD}:{FUNC} n")
    fs.write("events/mod/work/enable", "1")
    importlib.import_module(MOD)
    _call(5)
    del sys.modules[MOD]
    importlib.import_module(MOD)
    _call(6)
    assert trace_args(fs, "work") == ["n=-1", "n=5", "n=-1", "n=6"]


def test_a_disabled_event_comes_back_disabled(fs: TraceFS, module: Path) -> None:
    mod = importlib.import_module(MOD)
    fs.write("kprobe_events", f"p:mod/work {MOD}:{FUNC} n")
    importlib.reload(mod)
    _call(1)
    assert trace_args(fs, "work") == []
    fs.write("events/mod/work/enable", "1")
    _call(2)
    assert trace_args(fs, "work") == ["n=2"]


def test_a_line_event_comes_back(fs: TraceFS, module: Path) -> None:
    mod = importlib.import_module(MOD)
    line = SOURCE.splitlines().index("    return n + 1") + 1
    fs.write("kprobe_events", f"p:mod/line {module}:{line} n")
    fs.write("events/mod/line/enable", "1")
    importlib.reload(mod)
    _call(4)
    assert trace_args(fs, "line") == ["n=-1", "n=4"]


def test_the_raw_kprobe_api_keeps_the_gone_rule(module: Path) -> None:
    mod = importlib.import_module(MOD)
    hits: list[int] = []
    p = kp.Kprobe(symbol_name=f"{MOD}:{FUNC}", pre_handler=lambda p, r: hits.append(1))
    kp.register_kprobe(p)
    try:
        _call(1)
        importlib.reload(mod)
        _call(2)
        assert hits == [1]
        assert p.flags & kp.KPROBE_FLAG_GONE
        with pytest.raises(kp.KprobeError):
            kp.enable_kprobe(p)
    finally:
        kp.unregister_kprobe(p)


def test_a_module_notifier_hears_each_import(module: Path) -> None:
    heard: list[str] = []

    def notifier(name: str) -> None:
        heard.append(name)

    p = kp.Kprobe(symbol_name=f"{MOD}:{FUNC}")  # watches the module
    kp.register_kprobe(p)
    kp.register_module_notifier(notifier)
    try:
        mod = importlib.import_module(MOD)
        importlib.reload(mod)
        importlib.import_module("json.tool")  # not watched: not heard
        assert heard == [MOD, MOD]
    finally:
        kp.unregister_module_notifier(notifier)
        kp.unregister_kprobe(p)


def test_a_failing_module_notifier_never_breaks_the_import(module: Path) -> None:
    def notifier(name: str) -> None:
        raise RuntimeError("boom")

    p = kp.Kprobe(symbol_name=f"{MOD}:{FUNC}")
    kp.register_kprobe(p)
    kp.register_module_notifier(notifier)
    try:
        with pytest.warns(RuntimeWarning, match="module notifier failed"):
            mod = importlib.import_module(MOD)
        assert mod.trace_printk_irq_work(1) == 2
    finally:
        kp.unregister_module_notifier(notifier)
        kp.unregister_kprobe(p)
