"""Render the suite's JSON results as Markdown (bench/results/RESULTS.md).

Standard library only, and Python 3.8 syntax: run.py imports it on whatever python3 starts
the suite.
"""

from __future__ import annotations

from typing import Any, Dict  # noqa: UP035 - Python 3.8 runs this module

# Evaluated at run time: typing's spelling, which Python 3.8 has.
Result = Dict[str, Any]  # noqa: UP006


def _ns(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x"


def _plus(value: float) -> str:
    return f"{value:+.0f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def hit_table(rows: list[Result]) -> list[str]:
    lines = [
        "| key | technique (probe hit: the loop calls probed f) | ns/call median | min..max "
        "| ratio | +ns | hits |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        label = r["label"]
        if r.get("note"):
            label = f"{label} ({r['note']})"
        if r["status"] == "n/a":
            lines.append(f"| {r['key']} | {_cell(label)} | n/a: {_cell(r['reason'])} | | | | |")
        elif r["status"] == "error":
            errors = "; ".join(r.get("errors", []))
            lines.append(f"| {r['key']} | {_cell(label)} | **ERROR**: {_cell(errors)} "
                         "| | | | error |")
        else:
            lines.append(
                f"| {r['key']} | {_cell(label)} | {_ns(r['median_ns'])} | "
                f"{_ns(r['min_ns'])}..{_ns(r['max_ns'])} | {_ratio(r['ratio'])} | "
                f"{_plus(r['plus_ns']) if r['key'] != 'A' else ''} | {r['hits']} |"
            )
    return lines


def comparison_table(items: list[Result]) -> list[str]:
    lines = [
        "| case | against | ratio (paired, median) | min..max | goal | met |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in items:
        goal = f"<= {c['goal']:.2f}x" if c.get("goal") else "-"
        if c["status"] != "ok":
            lines.append(f"| {c['case']} | {c['ref']} | n/a: {_cell(c['reason'])} | | {goal} | |")
            continue
        met = "-" if c.get("met") is None else ("yes" if c["met"] else "**no**")
        lines.append(f"| {c['case']} | {c['ref']} | {_ratio(c['ratio'])} | "
                     f"{_ratio(c['min'])}..{_ratio(c['max'])} | {goal} | {met} |")
    return lines


def elsewhere_table(items: list[Result]) -> list[str]:
    lines = [
        "| key | case | ns/call median | min..max | ratio to unarmed | +ns | check |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in items:
        if r["status"] != "ok":
            lines.append(f"| {r['key']} | {_cell(r['label'])} | **ERROR**: "
                         f"{_cell('; '.join(r.get('errors', [])))} | | | | error |")
            continue
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        lines.append(f"| {r['key']} | {_cell(label)} | {_ns(r['median_ns'])} | "
                     f"{_ns(r['min_ns'])}..{_ns(r['max_ns'])} | {_ratio(r['ratio'])} | "
                     f"{_plus(r['plus_ns'])} | {r['hits']} |")
    return lines


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 0.1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"


def scale_table(items: list[Result]) -> list[str]:
    lines = [
        "| probes | mode | register + arm | per probe | optimize (wait) | unregister "
        "| per probe | unprobed call with them armed | hits |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in items:
        count = s["count"]
        reg = _seconds(s["register_s"])
        if s["registered"] < count:
            proj = s.get("register_projected_s")
            reg = (f"stopped at the {_seconds(s['register_s'])} budget: "
                   f"{s['registered']:,}/{count:,}"
                   + (f"; projected {proj:.0f} s for {count:,}" if proj else ""))
        per_reg = s["register_s"] / max(1, s["registered"]) * 1000
        unreg = _seconds(s["unregister_s"])
        if s["unregistered"] < s["registered"]:
            proj = s.get("unregister_projected_s")
            unreg = (f"stopped at the {_seconds(s['unregister_s'])} budget: "
                     f"{s['unregistered']:,}/{s['registered']:,}"
                     + (f"; projected {proj:.0f} s for {s['registered']:,}" if proj else ""))
        per_unreg = s["unregister_s"] / max(1, s["unregistered"]) * 1000
        opt = _seconds(s.get("optimize_s")) if "optimize_s" in s else "-"
        if s["mode"] == "optimized" and s.get("optimized_while_registering"):
            opt += f" ({s['optimized_while_registering']:,} optimized while registering)"
        armed = ""
        if s.get("unprobed_armed_ns") is not None and s.get("unprobed_ns"):
            armed = (f"{_ns(s['unprobed_armed_ns'])} ns vs {_ns(s['unprobed_ns'])} ns "
                     f"({s['unprobed_armed_ns'] / s['unprobed_ns']:.2f}x)")
        hits = s["hits"] if not s.get("errors") else "**ERROR**: " + "; ".join(s["errors"])
        lines.append(f"| {count:,} | {s['mode']} | {reg} | {per_reg:.2f} ms | {opt} | {unreg} "
                     f"| {per_unreg:.2f} ms | {armed} | {hits} |")
    return lines


def memory_table(items: list[Result]) -> list[str]:
    lines = [
        "| mode | probes | bytes per probe | left after unregister (+ an optimizer pass) "
        "| biggest allocators (bytes per probe) |",
        "|---|---:|---:|---:|---|",
    ]
    for m in items:
        top = ", ".join(f"{name} {size}" for name, size in m["top"][:4])
        left = m.get("left_after_pass_per_probe", m["left_per_probe"])
        lines.append(f"| {m['mode']} | {m['count']:,} | {m['bytes_per_probe']:.0f} | "
                     f"{left:.0f} | {_cell(top)} |")
    return lines


def ladder_table(rows: list[Result]) -> list[str]:
    lines = [
        "| key | step added (injected in place of Site.hit) | ns/call median "
        "| +ns over unprobed | step's own ns |",
        "|---|---|---:|---:|---:|",
    ]
    prev = 0.0
    for r in rows:
        if r["status"] != "ok":
            reason = r.get("reason") or "; ".join(r.get("errors", []))
            lines.append(f"| {r['key']} | {_cell(r['label'])} | {r['status']}: {_cell(reason)} "
                         "| | |")
            continue
        own = ""
        if r["key"].startswith("L"):
            own = _plus(r["plus_ns"] - prev)
            prev = r["plus_ns"]
        lines.append(f"| {r['key']} | {_cell(r['label'])} | {_ns(r['median_ns'])} | "
                     f"{_plus(r['plus_ns']) if r['key'] != 'A' else ''} | {own} |")
    return lines


def steps_table(items: list[Result]) -> list[str]:
    lines = ["| step of the event's hit path (alone, loop overhead removed) | ns |",
             "|---|---:|"]
    for s in items:
        lines.append(f"| {_cell(s['step'])} | {_ns(s['ns'])} |")
    return lines


def version_section(tag: str, data: Result) -> list[str]:
    cfg = data.get("config", {})
    libs = ", ".join(f"{k} {v}" for k, v in sorted(data.get("libs", {}).items()))
    out = [f"## Python {data.get('python', tag)}", ""]
    quick = " (QUICK smoke run)" if cfg.get("quick") else ""
    out.append(f"n = {cfg.get('n', '?'):,} timed calls (+ {cfg.get('warm', '?'):,} warm-up) x "
               f"{cfg.get('rounds', '?')} rounds{quick}; {libs}.")
    out.append("")
    if "rows" in data:
        out += ["### Probe hit cost", "", *hit_table(data["rows"]), ""]
    if "comparisons" in data:
        out += ["### Goals: paired ratios between two rows of the same rounds", ""]
        out += [*comparison_table(data["comparisons"]), ""]
        ev = data.get("event_goal", {})
        if ev.get("status") == "ok":
            versus = ", ".join(f"{k} {v:.2f}x" for k, v in sorted(ev["versus_peers"].items()))
            out.append(f"Optimized event (E1o): {ev['ratio_to_unprobed']:.2f}x the unprobed call "
                       f"(goal <= 3x: {'met' if ev['met_3x'] else 'not met'}); against each "
                       f"peer's handler (goal < 1x each): {versus}.")
        elif ev:
            out.append(f"Optimized event (E1o): n/a ({ev.get('reason')}).")
        out.append("")
    if "elsewhere" in data:
        out += ["### Unprobed code while probes are armed elsewhere", ""]
        out += [*elsewhere_table(data["elsewhere"]), ""]
    if "scale" in data:
        out += ["### Scale: N probes on N distinct functions", "", *scale_table(data["scale"])]
        out.append("")
    if "memory" in data:
        out += ["### Memory per probe (tracemalloc)", "", *memory_table(data["memory"]), ""]
    early = data.get("early")
    if early:
        out += ["### init_kprobes() converting 16 early probes", ""]
        if early.get("status") == "ok":
            out.append(f"{early['median_us']:.0f} us median ({early['min_us']:.0f}.."
                       f"{early['max_us']:.0f} us, {early['runs']} fresh processes; each run "
                       "checks that the 16 probes are listed, [OPTIMIZED], and the process no "
                       "longer early). The same call in a process that was never early (the "
                       f"core's own initialisation): {early.get('init_only_us', 0):.0f} us.")
        else:
            out.append(f"{early.get('status')}: {early.get('reason')}")
        out.append("")
    if "ladder" in data:
        out += ["### Where the optimized hit's nanoseconds go (ladder, paired like the "
                "table above)", ""]
        out += [*ladder_table(data["ladder"]), ""]
    if "steps" in data:
        out += ["### Steps of the event's hit path", "", *steps_table(data["steps"]), ""]
    if data.get("failures"):
        out += [f"Failures: {'; '.join(data['failures'])}", ""]
    secs = data.get("seconds", {})
    if secs:
        out.append("Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in secs.items())
                   + f"; wall {data.get('wall_s', 0):.0f} s.")
        out.append("")
    return out


def goals_summary(versions: dict[str, Result]) -> list[str]:
    tags = sorted(versions, key=lambda t: [int(x) for x in t.split(".")])
    head = "| goal | " + " | ".join(tags) + " |"
    lines = [head, "|---|" + "---|" * len(tags)]

    def comp(data: Result, case: str, ref: str) -> str:
        for c in data.get("comparisons", []):
            if c["case"] == case and c["ref"] == ref:
                if c["status"] != "ok":
                    return "n/a"
                mark = "" if c.get("met") is None else (" met" if c["met"] else " not met")
                return f"{c['ratio']:.2f}x{mark}"
        return "n/a"

    def row(label: str, fn: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(versions[t]) for t in tags) + " |")

    row("optimized kprobe at entry / raw injection (<= 1.5x since issue 13; was 1.10x)",
        lambda d: comp(d, "K1o", "H"))
    row("optimized kprobe at an offset / raw injection (<= 1.5x since issue 13)",
        lambda d: comp(d, "K2o", "H1"))
    row("optimized kprobe on a line / raw injection (<= 1.5x since issue 13)",
        lambda d: comp(d, "K3o", "H"))
    row("breakpoint kprobe at entry / raw monitoring PY_START (<= 1.15x)",
        lambda d: comp(d, "K1b", "F"))
    row("breakpoint kprobe at an offset / raw monitoring INSTRUCTION (<= 1.15x)",
        lambda d: comp(d, "K2b", "G"))
    row("breakpoint kprobe on a line / raw monitoring LINE (<= 1.15x)",
        lambda d: comp(d, "K3b", "G1"))

    def event(d: Result) -> str:
        ev = d.get("event_goal", {})
        if ev.get("status") != "ok":
            return "n/a"
        return f"{ev['ratio_to_unprobed']:.2f}x {'met' if ev['met_3x'] else 'not met'}"

    def event_peers(d: Result) -> str:
        ev = d.get("event_goal", {})
        if ev.get("status") != "ok":
            return "n/a"
        worst = [k for k, v in ev["versus_peers"].items() if v >= 1.0]
        return "met" if not worst else f"not met ({len(worst)}/{len(ev['versus_peers'])} " \
            "peers cheaper)"

    row("optimized event, 2 fetchargs / unprobed call (<= 3x)", event)
    row("optimized event cheaper than every peer but raw injection", event_peers)

    def elsewhere(d: Result, key: str) -> str:
        for r in d.get("elsewhere", []):
            if r["key"] == key:
                return f"{r['ratio']:.2f}x" if r["status"] == "ok" else "ERROR"
        return "n/a"

    row("unprobed call, 1,000 optimized probes elsewhere (1.00x)", lambda d: elsewhere(d, "J1o"))
    row("unprobed call, 1,000 breakpoint probes elsewhere (1.00x)", lambda d: elsewhere(d, "J1b"))

    def big(d: Result, mode: str) -> str:
        for s in d.get("scale", []):
            if s["mode"] == mode and s.get("unprobed_armed_ns") and s.get("unprobed_ns"):
                ratio = s["unprobed_armed_ns"] / s["unprobed_ns"]
                return f"{ratio:.2f}x ({s['registered']:,} armed)"
        return "n/a"

    row("unprobed call, largest scale step armed elsewhere (optimized; unpaired)",
        lambda d: big(d, "optimized"))
    row("unprobed call, largest scale step armed elsewhere (breakpoint; unpaired)",
        lambda d: big(d, "breakpoint"))
    # Issue 13: return probes and return events as cheap as entry events.
    row("issue 13: kretprobe, empty handlers, optimized / raw entry + return injection "
        "(<= 2x)", lambda d: comp(d, "R1o", "HI1"))
    row("issue 13: kprobe + kretprobe, optimized / raw entry + return injection (<= 2.5x)",
        lambda d: comp(d, "R2o", "HI1"))
    row("issue 13: return event, $arg1 + $retval, optimized / unprobed call (<= 4x)",
        lambda d: comp(d, "E4o", "A"))
    row("issue 13/14: latency event, $duration + hist d.log2, optimized / unprobed call "
        "(<= 4x)", lambda d: comp(d, "E3o", "A"))
    row("issue 13: event served by the breakpoint / breakpoint kprobe, empty handler (<= 2x)",
        lambda d: comp(d, "E1b", "K1b"))
    return lines


def render(results: Result) -> str:
    versions: dict[str, Result] = results.get("versions", {})
    out = ["# pykprobes benchmark results", ""]
    out.append(results.get("preamble", ""))
    out.append("")
    if versions:
        out += ["## Goals of issues 6 and 13, per Python version", "",
                *goals_summary(versions), ""]
    for tag in sorted(versions, key=lambda t: [int(x) for x in t.split(".")]):
        out += version_section(tag, versions[tag])
    startup = results.get("startup")
    if startup:
        out += ["## Start-up", "", startup, ""]
    return "\n".join(out).rstrip() + "\n"
