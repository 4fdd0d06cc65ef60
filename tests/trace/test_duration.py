"""`$duration` on return events: nanoseconds from this call's entry to its return, per call
instance (recursion, threads, generators, coroutines), as a field and as a hist key.

The durations are checked against lower bounds the program itself guarantees (it sleeps),
and against the other calls' durations where mixing two instances would show; never
against an upper bound of the machine's speed."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS

MS = 1_000_000


def nest(n: int) -> int:
    if n:
        nest(n - 1)
    time.sleep(0.002)
    return n


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def gen(pause: float) -> Iterator[int]:
    yield 1
    time.sleep(pause)
    yield 2


async def coro(pause: float) -> float:
    await asyncio.sleep(pause)
    return pause


def blocker(gate: threading.Event) -> int:
    gate.wait(10)
    return 1


def _records(fs: TraceFS) -> list[dict[str, str]]:
    return [dict(re.findall(r"(\w+)=(\S+)", line.split(")", 1)[1]))
            for line in fs.read("trace").splitlines() if not line.startswith("#")]


def _define(fs: TraceFS, text: str) -> Any:
    event = fs.define(text)
    assert event is not None
    event.enable()
    kp.wait_for_kprobe_optimizer()
    return event


def test_recursion_each_call_its_own_duration(fs: TraceFS) -> None:
    _define(fs, f"r:t/nest {__name__}:nest d=$duration n=$retval")
    nest(4)
    records = _records(fs)
    assert [int(r["n"]) for r in records] == [0, 1, 2, 3, 4]  # innermost returns first
    durations = [int(r["d"]) for r in records]
    for n, d in enumerate(durations):
        assert d >= (n + 1) * 2 * MS
    assert durations == sorted(durations) and len(set(durations)) == 5


def test_threads_each_call_its_own_duration(fs: TraceFS) -> None:
    _define(fs, f"r:t/nap {__name__}:nap d=$duration s=$retval")
    slow = threading.Thread(target=nap, args=(0.3,))
    slow.start()
    time.sleep(0.05)  # the slow call is in flight while the quick one runs
    nap(0.005)
    slow.join()
    by_sleep = {r["s"]: int(r["d"]) for r in _records(fs)}
    assert by_sleep["0.3"] >= 300 * MS
    assert 5 * MS <= by_sleep["0.005"] < 250 * MS


def test_generators_from_first_resumption_to_end(fs: TraceFS) -> None:
    _define(fs, f"r:t/gen {__name__}:gen d=$duration")
    first, second = gen(0.0), gen(0.0)
    next(first)
    time.sleep(0.1)
    next(second)
    assert list(second) == [2]  # ends quickly: between its own resumptions only
    time.sleep(0.05)
    assert list(first) == [2]
    quick, slow = (int(r["d"]) for r in _records(fs))
    assert quick < 100 * MS <= 150 * MS <= slow


def test_coroutines_interleaved_on_one_thread(fs: TraceFS) -> None:
    _define(fs, f"r:t/coro {__name__}:coro d=$duration p=$retval")

    async def main() -> None:
        await asyncio.gather(coro(0.2), coro(0.02))

    asyncio.run(main())
    by_pause = {r["p"]: int(r["d"]) for r in _records(fs)}
    assert by_pause["0.2"] >= 200 * MS
    assert 20 * MS <= by_pause["0.02"] < 180 * MS


def test_a_call_entered_before_arming_records_a_fault(fs: TraceFS) -> None:
    """Its return is seen (every mechanism's breakpoint sees the frame's return), its entry
    was not: no entry time, so `$duration` records (fault), never a wrong duration."""
    event = fs.define(f"r:t/blocker {__name__}:blocker d=$duration r=$retval")
    assert event is not None
    gate = threading.Event()
    early = threading.Thread(target=blocker, args=(gate,))
    early.start()
    time.sleep(0.05)
    event.enable()  # the call in flight has no instance, so no entry time
    kp.wait_for_kprobe_optimizer()
    gate.set()
    early.join()
    assert _records(fs) == [{"d": "(fault)", "r": "1"}]
    blocker(gate)
    _, second = _records(fs)
    assert second["d"] != "(fault)" and int(second["d"]) > 0
    assert event.hits == 2 and event.nmissed == 0


def test_a_missed_call_records_nothing(fs: TraceFS) -> None:
    """A call beyond maxactive was entered while armed: missed (nmissed), not unentered."""
    event = fs.define(f"r1:t/nest {__name__}:nest d=$duration n=$retval")
    assert event is not None
    event.enable()
    kp.wait_for_kprobe_optimizer()
    nest(1)
    (record,) = _records(fs)
    assert record["n"] == "1" and int(record["d"]) > 0
    assert event.nmissed == 1


def test_duration_as_a_log2_hist_key(fs: TraceFS) -> None:
    event = fs.define(f"r:t/nap {__name__}:nap d=$duration")
    assert event is not None
    fs.write("events/t/nap/trigger", "hist:keys=d.log2")
    for _ in range(3):
        nap(0.001)
    text = fs.read("events/t/nap/hist")
    exponents = [int(e) for e in re.findall(r"d: ~ 2\^(\d+)", text)]
    assert exponents and all(e >= 20 for e in exponents)  # 2^20 ns ~ 1 ms
    assert "Hits: 3\n" in text
    assert "nap:" not in fs.read("trace")  # hist-only: no record


def _naps_timed_around(pauses: tuple[float, ...]) -> list[int]:
    outer = []
    for pause in pauses:
        start = time.monotonic_ns()
        nap(pause)
        outer.append(time.monotonic_ns() - start)
    return outer


PAUSES = (0.003, 0.02)


def test_a_recorded_duration_lies_within_the_callers_own_reading_of_the_clock(
    fs: TraceFS,
) -> None:
    """A record's `$duration` and its time are CLOCK_MONOTONIC (a Perfetto slice's start is
    time - duration): within what the caller reads around the call."""
    _define(fs, f"r:t/nap {__name__}:nap d=$duration")
    outer = _naps_timed_around(PAUSES)
    recorded = [int(r["d"]) for r in _records(fs)]
    assert len(recorded) == 2
    for pause, inner, around in zip(PAUSES, recorded, outer, strict=True):
        assert pause * 1e9 <= inner <= around


def test_a_latency_histogram_counts_in_the_callers_own_reading_of_the_clock(
    fs: TraceFS,
) -> None:
    """A hist-only latency event may measure with the TSC (the kernel's `local` trace clock,
    docs/events.md): its scale must agree with CLOCK_MONOTONIC, which the caller reads around
    the call (slew and the scale's error: far below 1%)."""
    event = fs.define(f"r:t/nap {__name__}:nap d=$duration")
    assert event is not None
    fs.write("events/t/nap/trigger", "hist:keys=d.log2")
    kp.wait_for_kprobe_optimizer()
    outer = _naps_timed_around(PAUSES)
    exponents = sorted(int(e) for e in re.findall(r"d: ~ 2\^(\d+)", fs.read("events/t/nap/hist")))
    assert len(exponents) == 2
    for pause, exponent, around in zip(PAUSES, exponents, outer, strict=True):
        # log2 rounds up: the duration d has (d - 1).bit_length() == exponent.
        assert (int(pause * 1e9 * 0.99) - 1).bit_length() <= exponent
        assert exponent <= (int(around * 1.01) - 1).bit_length()


def test_duration_is_only_for_return_probes(fs: TraceFS) -> None:
    from pykprobes.trace.tracefs import TraceWriteError

    with pytest.raises(TraceWriteError) as info:
        fs.define(f"p:t/bad {__name__}:nap d=$duration")
    assert "$duration is not available on probe" in str(info.value)
