"""The seed's register_early_kprobe() through the API: slots, refusals, the early list, and
what changes at init_kprobes(). Each test is a child interpreter started with the boot
stage (PYKPROBES_EVENTS set); the API is used from a start-up hook of the test
(sitecustomize, imported by site after the .pth files) and from the program."""

from __future__ import annotations

import json
from pathlib import Path

from tests.boot.conftest import run, trace_lines, warnings_of, write

TARGET = """
def f(x):
    return x + 1

def g(x):
    return x * 2

def h(x):
    return x - 1
"""


def test_slot_exhaustion_two_work_one_warning(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "main.py", """
        import target
        print(target.f(1), target.g(2), target.h(3))
    """)
    events = "p:boot/f target:f x;p:boot/g target:g x;p:boot/h target:h x"
    traced = run(["main.py"], events=events, cwd=tmp_path, env={"PYKPROBES_EARLY_SLOTS": "2"})
    assert traced.returncode == 0 and traced.stdout == "2 4 2\n"
    assert warnings_of(traced.stderr) == [
        "pykprobes: Failed to add event(-12): p:boot/h target:h x "
        "(No enough early kprobe slots.)"]
    assert [(m["event"], m["args"]) for m in trace_lines(traced.stderr)] == \
        [("f", " x=1"), ("g", " x=2")]


SITECUSTOMIZE = """
import errno, json, sys
import pykprobes as kp
from pykprobes.core.registry import early_status as early

out = {"early": kp.kprobes_is_early(), "free_before": early.nr_free_slots()}

def attempt(name, **kw):
    p = kp.Kprobe(symbol_name="target:g", **kw)
    try:
        kp.register_kprobe(p)
    except kp.KprobeError as exc:
        out[name] = [errno.errorcode[exc.errno], str(exc), p.flags, p.registered]
    else:
        out[name] = ["registered", p.flags]
    return p

attempt("post_handler", post_handler=lambda p, regs: None)
attempt("disabled", flags=kp.KPROBE_FLAG_DISABLED)
out["free_after_refusals"] = early.nr_free_slots()
hits = []
good = attempt("good", pre_handler=lambda p, regs: hits.append(regs.args["x"]))
extra = attempt("extra")
out["free_after_two"] = early.nr_free_slots()
kp.unregister_kprobe(extra)
out["free_after_unregister"] = early.nr_free_slots()
out["extra_flags_after_unregister"] = extra.flags
sys.modules["__early_test__"] = type(sys)("__early_test__")
sys.modules["__early_test__"].__dict__.update(out=out, good=good, hits=hits, extra=extra,
                                               attempt=attempt)
"""

MAIN = """
import json, sys, warnings
import pykprobes as kp
from pykprobes.core import registry
from pykprobes.core.registry import early_status as early
import target
t = sys.modules["__early_test__"]
out = t.out
target.g(5)
out["hits"] = list(t.hits)
out["good_flags"] = t.good.flags
out["get_kprobe_early"] = kp.get_kprobe(target.g) is t.good
out["in_early_table"] = any(t.good in s.probes for s in registry.table_view().early_sites.values())
out["in_main_table"] = any(t.good in s.probes for s in registry.table_view().sites.values())
out["list"] = kp.list_kprobes()
kp.init_kprobes()
kp.init_kprobes()  # idempotent
out["early_after"] = kp.kprobes_is_early()
out["free_after_init"] = [early.nr_free_slots(), early.nr_slots()]
out["get_kprobe_after"] = kp.get_kprobe(target.g) is t.good
out["in_main_table_after"] = any(t.good in s.probes for s in registry.table_view().sites.values())
out["early_table_after"] = len(registry.table_view().early_sites)
out["good_flags_after"] = t.good.flags
target.g(6)
out["hits_after"] = list(t.hits)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kp.register_kprobe(t.extra)  # it still carries KPROBE_FLAG_EARLY
out["warn"] = [str(w.message) for w in caught]
out["extra_after"] = [t.extra.flags, t.extra.registered]
kp.unregister_kprobe(t.extra)
p = kp.Kprobe(symbol_name="target:h", post_handler=lambda p, regs: None)
kp.register_kprobe(p)  # a post_handler is fine once the core is initialised
out["post_after"] = p.registered
print(json.dumps(out))
"""


def test_refusals_slots_early_list_and_conversion_through_the_api(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "hook" / "sitecustomize.py", SITECUSTOMIZE)
    write(tmp_path / "main.py", MAIN)
    # Two slots: one for the boot definition, one left for the start-up hook.
    traced = run(["main.py"], events="p:boot/f target:f x", cwd=tmp_path,
                 env={"PYKPROBES_EARLY_SLOTS": "3", "PYTHONPATH": str(tmp_path / "hook")})
    assert traced.returncode == 0, traced.stderr
    out = json.loads(traced.stdout)
    assert out["early"] is True and out["free_before"] == 2
    # The seed: KPROBE_FLAG_EARLY (16) is set, then a post_handler or DISABLED is EINVAL.
    errno_, message, flags, registered = out["post_handler"]
    assert (errno_, flags, registered) == ("EINVAL", 16, False)
    assert "post_handler" in message
    errno_, message, flags, registered = out["disabled"]
    assert (errno_, flags, registered) == ("EINVAL", 16 | 2, False)
    assert "disabled" in message
    assert out["free_after_refusals"] == 2, "a refused probe takes no slot"
    # target is not imported yet: pending, optimized when it is imported
    assert out["good"] == ["registered", 16]
    assert out["extra"] == ["registered", 16]
    assert out["free_after_two"] == 0
    assert out["free_after_unregister"] == 1, "unregistering returns the slot"
    assert out["extra_flags_after_unregister"] & 16
    assert out["hits"] == [5]
    assert out["good_flags"] == 16 | 4  # EARLY | OPTIMIZED, since `import target`
    assert out["get_kprobe_early"] is True, "get_kprobe() searches the early list"
    assert out["in_early_table"] is True and out["in_main_table"] is False
    assert "target:g+0  [OPTIMIZED]" in out["list"] and "target:f+0" in out["list"]
    # init_kprobes(): not early, every slot free, the probe in the main table, armed and
    # optimized, its flags kept (KPROBE_FLAG_EARLY stays, as in the seed).
    assert out["early_after"] is False
    assert out["free_after_init"] == [3, 3]
    assert out["get_kprobe_after"] is True and out["in_main_table_after"] is True
    assert out["early_table_after"] == 0
    assert out["good_flags_after"] == 16 | 4
    assert out["hits_after"] == [5, 6]
    assert out["warn"] == ["register early kprobe after kprobes initialized"]
    assert out["extra_after"] == [4, True], "registered normally; EARLY masked off"
    assert out["post_after"] is True
    assert [m["args"] for m in trace_lines(traced.stderr)] == []  # converted: in the trace


def test_no_slot_through_the_api_is_enomem_with_the_seeds_words(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "main.py", """
        import errno
        import pykprobes as kp
        from pykprobes.core.registry import early_status as early
        p = kp.Kprobe(symbol_name="target:h")
        try:
            kp.register_kprobe(p)
        except kp.KprobeError as exc:
            print(errno.errorcode[exc.errno], exc.args[0], p.registered, early.nr_free_slots())
    """)
    traced = run(["main.py"], events="p:boot/f target:f x", cwd=tmp_path,
                 env={"PYKPROBES_EARLY_SLOTS": "1"})
    assert traced.stdout == "ENOMEM No enough early kprobe slots. False 0\n", traced.stderr


def test_preparation_failure_frees_the_slot(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "main.py", """
        import pykprobes as kp
        from pykprobes.core.registry import early_status as early
        import target
        free = early.nr_free_slots()
        for kwargs in ({"offset": 1}, {"offset": 10_000}):
            p = kp.Kprobe(symbol_name="target:f", **kwargs)
            try:
                kp.register_kprobe(p)
            except kp.KprobeError as exc:
                print("refused", exc.errno, p.registered, early.nr_free_slots() == free)
        q = kp.Kprobe(symbol_name="no_such_module_zz:f")
        try:
            kp.register_kprobe(q)
        except kp.KprobeError as exc:
            print("refused", exc.errno, q.registered, early.nr_free_slots() == free)
    """)
    traced = run(["main.py"], events="p:boot/g target:g x", cwd=tmp_path)
    assert traced.stdout.splitlines() == [
        "refused 22 False True", "refused 22 False True", "refused 2 False True"], \
        traced.stderr


def test_probes_on_modules_the_boot_stage_needs_wait_for_the_conversion(tmp_path: Path) -> None:
    write(tmp_path / "main.py", """
        import errno
        import pykprobes as kp
        from pykprobes.core.registry import early_status as early
        print(sorted(early.blacklisted_modules())[:1] != [], end=" ")
        p = kp.Kprobe(symbol_name="zipimport:zipimporter.get_code")
        try:
            kp.register_kprobe(p)
        except kp.KprobeError as exc:
            print(errno.errorcode[exc.errno], "early" in str(exc), end=" ")
        kp.init_kprobes()
        kp.register_kprobe(p)
        print(p.registered, early.blacklisted_modules())
    """)
    traced = run(["main.py"], events="p:boot/j json:loads", cwd=tmp_path)
    assert traced.stdout == "True EINVAL True True {}\n", traced.stderr


def test_a_process_without_the_boot_stage_is_never_early(tmp_path: Path) -> None:
    write(tmp_path / "target.py", TARGET)
    write(tmp_path / "main.py", """
        import pykprobes as kp
        from pykprobes import boot
        from pykprobes.core.registry import early_status as early
        before = kp.kprobes_is_early()
        p = kp.Kprobe(symbol_name="target:f", post_handler=lambda p, regs: None)
        kp.register_kprobe(p)  # the first use initialises the core
        boot.start_from_environ()  # too late, and the variable is unset anyway
        print(before, kp.kprobes_is_early(), p.flags & 16, early.was_early())
    """)
    traced = run(["main.py"], cwd=tmp_path)
    assert traced.stdout == "False False 0 False\n", traced.stderr
