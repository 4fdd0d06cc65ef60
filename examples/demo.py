"""pykprobes demo: probe a real program without changing it, then leave no trace.

The program is the standard library doing real work: `difflib` computes a unified diff of
two versions of a text that `textwrap` has wrapped, and `fractions` (not imported when the
probes are registered) sums the diff's statistics. The demo runs it once bare and once
under probes, checks that its output is identical, and prints what the probes saw.

    python3 dev.py demo
"""

from __future__ import annotations

import dis
import inspect
import sys
import textwrap
from collections import Counter

import pykprobes as kp

TEXT = """kprobes let you set a probe on almost any instruction of a running kernel, run a
handler there, and remove it without a trace. pykprobes does the same for the CPython
virtual machine: a probe on any function, bytecode offset or source line, in code that is
already running or not imported yet."""


def program() -> str:
    """The program under probes. It knows nothing about them."""
    import difflib

    old = textwrap.wrap(TEXT, width=60)
    new = textwrap.wrap(TEXT.replace("almost any", "nearly every"), width=52)
    diff = list(difflib.unified_diff(old, new, "before", "after", lineterm=""))
    from fractions import Fraction  # imported only now: its probe was waiting for it

    changed = sum(Fraction(1, len(old)) for line in diff
                  if line.startswith("-") and not line.startswith("---"))
    return "\n".join(diff) + f"\nshare of lines changed: {changed} of the original"


def main() -> int:
    print(f"pykprobes {kp.__version__} on Python {sys.version.split()[0]}")
    bare = program()

    seen: Counter[str] = Counter()
    widths: list[int] = []
    matches: list[tuple[int, int, int]] = []

    def on_wrap(p: kp.Kprobe, regs: kp.Regs) -> None:
        widths.append(regs.args["self"].width)

    def on_match(p: kp.Kprobe, regs: kp.Regs) -> None:
        # A probe in the middle of find_longest_match: the locals it computed so far.
        f_locals = regs.frame.f_locals
        matches.append((f_locals["besti"], f_locals["bestj"], f_locals["bestsize"]))

    def on_fraction(p: kp.Kprobe, regs: kp.Regs) -> None:
        seen[f"Fraction({regs.args['numerator']}, {regs.args['denominator']})"] += 1

    import difflib

    # An offset probe: the instruction right after the matching loop, found with dis.
    code = difflib.SequenceMatcher.find_longest_match.__code__
    src, first = inspect.getsourcelines(code)
    line = first + next(i for i, s in enumerate(src) if "while besti > alo" in s)
    offset = next(ins.offset for ins in dis.get_instructions(code)
                  if ins.positions and ins.positions.lineno == line)

    probes = [
        kp.Kprobe(symbol_name="textwrap:TextWrapper._wrap_chunks", pre_handler=on_wrap),
        kp.Kprobe(symbol_name="difflib:SequenceMatcher.find_longest_match", offset=offset,
                  pre_handler=on_match),
        kp.Kprobe(symbol_name="fractions:Fraction.__new__", pre_handler=on_fraction),
        # Every address of one source line, through the line resolver:
        *[kp.Kprobe(addr=a) for a in kp.resolve_line(f"{difflib.__file__}:{line}")],
    ]
    sys.modules.pop("fractions", None)  # so that its probe has to wait for the import
    kp.register_kprobes(probes)
    kp.wait_for_kprobe_optimizer()
    print("\nkprobes/list after registration (fractions is not imported yet):")
    print(textwrap.indent(kp.list_kprobes(), "  "), end="")

    probed = program()
    kp.wait_for_kprobe_optimizer()
    print("\nkprobes/list after the run:")
    print(textwrap.indent(kp.list_kprobes(), "  "), end="")

    print("\nwhat the probes saw:")
    print(f"  TextWrapper._wrap_chunks: {probes[0].nhit} calls, widths {widths}")
    print(f"  find_longest_match+{offset} (line {line}): {probes[1].nhit} hits, "
          f"first (besti, bestj, bestsize) = {matches[:3]}")
    print(f"  Fraction.__new__: {probes[2].nhit} calls, e.g. {seen.most_common(2)}")
    print(f"  {difflib.__file__}:{line}: "
          f"{sum(p.nhit for p in probes[3:])} hits at {len(probes) - 3} address(es)")

    kp.unregister_kprobes(probes)
    restored = (difflib.SequenceMatcher.find_longest_match.__code__ is code
                and textwrap.TextWrapper._wrap_chunks.__code__ is probes[0].addr.code)
    same = bare == probed
    print(f"\nprogram output identical under probes: {same}")
    print(f"code objects restored after unregister: {restored}")
    print("\nthe program's output:")
    print(textwrap.indent(probed, "  "))
    ok = same and restored and all(p.nhit for p in probes[:3])
    return 0 if run_demo() and ok else 1


def run_demo() -> bool:
    """The same from the shell: `pykprobes run` traces `python -m json.tool` on a real file,
    with events that fetch arguments and a return value, and changes nothing of its output."""
    import json
    import shlex
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/kernel.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"kprobes": ["register", "unregister"], "optprobe": True,
                       "early": {"slots": 16, "seed": "2015"}}, f)
        events = ["p:demo/decode json.decoder:JSONDecoder.decode s:len",
                  "r:demo/raw json.decoder:JSONDecoder.raw_decode $retval:type",
                  "p:demo/dump json:dump obj:type indent"]
        program = ["-m", "json.tool", "--indent", "2", path]
        cmd = [sys.executable, "-m", "pykprobes", "run"]
        for event in events:
            cmd += ["-e", event]
        cmd += ["--", *program]
        plain = subprocess.run([sys.executable, *program], capture_output=True, text=True,
                               check=False)
        traced = subprocess.run(cmd, capture_output=True, text=True, check=False)
    shown = ["pykprobes", "run", *cmd[4:]]
    print("\n$ " + shlex.join(shown).replace(tmp, "/tmp"))
    print(textwrap.indent(traced.stderr, "  "), end="")
    same = (traced.stdout, traced.returncode) == (plain.stdout, plain.returncode)
    print(f"json.tool's own output and exit code identical under pykprobes run: {same}")
    return same and traced.returncode == 0 and "demo/decode" not in traced.stderr


if __name__ == "__main__":
    sys.exit(main())
