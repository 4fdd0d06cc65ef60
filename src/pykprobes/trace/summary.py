"""What `pykprobes run` prints at exit besides the profile: every event's hist triggers
(`events/GRP/EVENT/hist`), and the `--summary`: per event its hits and misses, and for a
return event a log2 histogram of its calls' durations, counted without any trigger
(events.py `summarize`) and printed as bpftrace prints `hist()`:

    pykprobes/r_loads: 120 calls, 0 missed
      latency (ns)
      [4K, 8K)               3 |@@@                                                 |
      [8K, 16K)             52 |@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@|
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from pykprobes.trace import hist

__all__ = ["format_exit_report", "format_latency", "format_summary"]

#: The width of the longest bar (bpftrace's).
BAR_WIDTH: Final = 52
_UNITS: Final = ("", "K", "M", "G", "T", "P", "E")


def _power(exponent: int) -> str:
    """2**exponent the way bpftrace labels its buckets: 1, 2, ..., 512, 1K, 2K, ... 1M."""
    unit, rest = divmod(exponent, 10)
    return f"{1 << rest}{_UNITS[unit]}"


def format_latency(buckets: list[int]) -> str:
    """The rows of a log2 histogram whose bucket N counts durations in [2^(N-1), 2^N) ns
    (bucket 0: 0 ns), from the first bucket used to the last."""
    used = [n for n, count in enumerate(buckets) if count]
    if not used:
        return "  (no call returned)\n"
    top = max(buckets)
    rows = []
    for n in range(used[0], used[-1] + 1):
        count = buckets[n]
        label = "[0]" if n == 0 else f"[{_power(n - 1)}, {_power(n)})"
        bar = "@" * (count * BAR_WIDTH // top)
        rows.append(f"  {label:<18} {count:>8} |{bar:<{BAR_WIDTH}}|\n")
    return "".join(rows)


def format_summary(events: Iterable[Any]) -> str:
    """Every event: `GRP/EVENT: N calls|hits, M missed`, and the latency histogram of a
    return event counted by `summarize`."""
    out = []
    for event in events:
        noun = "calls" if event.is_return else "hits"
        out.append(f"{event.group}/{event.name}: {event.hits} {noun}, "
                   f"{event.nmissed} missed\n")
        if event.latency is not None:
            out.append("  latency (ns)\n" + format_latency(event.latency))
    return "".join(out)


def format_exit_report(events: Iterable[Any], summary: bool) -> str:
    """The hist files of every event with a trigger, then the summary if asked."""
    events = list(events)
    parts = [f"# events/{e.group}/{e.name}/hist\n" + hist.format_hist(e.triggers)
             for e in events if e.triggers]
    if summary:
        parts.append(format_summary(events))
    return "\n".join(parts)
