"""trace/buffer.py: the ring buffer, single-threaded: size estimate, both overflow modes with
exact lost counts and their places in the stream, tracing_on, resize, clear, snapshot and the
trace_pipe read, blocking included. The concurrent cases are in test_buffer_threads.py."""

from __future__ import annotations

import errno
import threading
import time
from typing import Any

import pytest

from pykprobes.errors import KprobeError
from pykprobes.trace.buffer import (
    DEFAULT_SIZE_KB,
    MAX_SIZE_KB,
    ReadBatch,
    Record,
    TraceBuffer,
    record_size,
)


class StandInEvent:
    """What the buffer and the formats need of an event (trace/events.py's Event)."""

    def __init__(self, name: str = "ev", fields: tuple[str, ...] = ("n",)) -> None:
        self.name = name
        self.group = "pykprobes"
        self.fields = fields
        self.symbol = "pkg.mod:func"
        self.offset = 0
        self.is_return = False


class Fault:
    """Like fetchargs' FAULT marker: a class named Fault."""


EV = StandInEvent()


def rec(n: int, *more: Any, caller: str | None = None) -> Record:
    """A record whose first value is `n`; with no `more`, its estimate is 32 bytes."""
    return (n * 1000, 1, "MainThread", EV, (n, *more), caller)


def ns(records: list[Record]) -> list[int]:
    return [r[4][0] for r in records]


# A 1 KB buffer holds exactly 32 records of 32 bytes.
ONE_KB_RECORDS = 32


# -- the size estimate ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "caller", "size"),
    [
        ((), None, 24),
        ((1,), None, 32),
        ((1.5,), None, 32),
        ((None,), None, 32),
        ((True,), None, 32),
        ((Fault(),), None, 32),
        ((2**200,), None, 32),  # ints count 8 whatever their size
        (("",), None, 28),
        (("abc",), None, 31),
        (("é" * 10,), None, 38),  # code points, not UTF-8 bytes
        ((b"abcd",), None, 32),
        ((1, "abc", b"", 2.0), None, 24 + 8 + 7 + 4 + 8),
        ((), "pkg.mod:caller", 32),  # a return probe's second ip
        ((1,), "pkg.mod:caller", 40),
    ],
)
def test_record_size(values: tuple[Any, ...], caller: str | None, size: int) -> None:
    assert record_size((0, 1, "t", EV, values, caller)) == size


def test_write_accounts_the_estimate() -> None:
    buf = TraceBuffer(size_kb=1)
    buf.write(rec(0))
    buf.write(rec(1, "abc"))
    buf.write(rec(2, caller="m:f"))
    assert buf.bytes_used == 32 + 39 + 40
    assert buf.entries == 3


def test_defaults() -> None:
    buf = TraceBuffer()
    assert buf.size_kb == DEFAULT_SIZE_KB == 1408
    assert buf.overwrite is True
    assert buf.tracing_on is True
    assert (buf.entries, buf.lost, buf.overrun, buf.dropped) == (0, 0, 0, 0)


# -- filling up ---------------------------------------------------------------------------


def test_fills_exactly_to_size() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    for n in range(ONE_KB_RECORDS):
        assert buf.write(rec(n)) is True
    assert buf.bytes_used == 1024
    assert buf.write(rec(99)) is False
    assert (buf.entries, buf.dropped, buf.lost) == (ONE_KB_RECORDS, 1, 1)


def test_overwrite_mode_overwrites_the_oldest_and_counts_them() -> None:
    buf = TraceBuffer(size_kb=1)
    results = [buf.write(rec(n)) for n in range(100)]
    assert all(results)
    assert buf.entries == ONE_KB_RECORDS
    assert (buf.overrun, buf.dropped, buf.lost) == (68, 0, 68)
    assert ns(buf.snapshot()) == list(range(68, 100))
    assert buf.counts() == (32, 100)  # entries-in-buffer / entries-written

    batch = buf.read(block=False)
    assert ns(batch) == list(range(68, 100))
    assert batch.lost_at == [(0, 68)]
    assert batch.lost == 68
    # Handed out once: the next read reports nothing more.
    assert buf.write(rec(100))
    again = buf.read(block=False)
    assert (ns(again), again.lost_at) == ([100], [])
    assert buf.lost == 68  # the counter stays until clear()


def test_drop_mode_drops_the_newest_and_counts_them() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    results = [buf.write(rec(n)) for n in range(100)]
    assert results == [True] * 32 + [False] * 68
    assert (buf.overrun, buf.dropped, buf.lost) == (0, 68, 68)
    assert ns(buf.snapshot()) == list(range(32))
    assert buf.counts() == (32, 32)  # dropped records were never written

    batch = buf.read(block=False)
    assert ns(batch) == list(range(32))
    assert batch.lost_at == [(32, 68)]  # after the last record: where they were lost
    # Room again: the next ones are stored, and no loss is reported twice.
    assert buf.write(rec(100)) and buf.write(rec(101))
    again = buf.read(block=False)
    assert (ns(again), again.lost_at) == ([100, 101], [])


def test_overwrite_evicts_as_many_as_a_big_record_needs() -> None:
    buf = TraceBuffer(size_kb=1)
    for n in range(ONE_KB_RECORDS):
        buf.write(rec(n))
    big = rec(1000, "x" * 192)  # 24 + 8 + 4 + 192 = 228 bytes: 8 records of 32 must go
    assert record_size(big) == 228
    assert buf.write(big)
    assert buf.overrun == 8
    assert ns(buf.snapshot()) == [*range(8, 32), 1000]
    assert buf.bytes_used == 24 * 32 + 228


@pytest.mark.parametrize("overwrite", [True, False])
def test_a_record_bigger_than_the_buffer_is_dropped(overwrite: bool) -> None:
    buf = TraceBuffer(size_kb=1, overwrite=overwrite)
    buf.write(rec(0))
    assert buf.write(rec(1, "x" * 1024)) is False
    assert (buf.entries, buf.dropped, buf.overrun) == (1, 1, 0)
    batch = buf.read(block=False)
    assert (ns(batch), batch.lost_at) == ([0], [(1, 1)])


def test_a_too_big_record_alone_still_wakes_the_stream() -> None:
    buf = TraceBuffer(size_kb=1)
    buf.write(rec(1, "x" * 2000))
    batch = buf.read(block=False)
    assert (list(batch), batch.lost_at) == ([], [(0, 1)])


def test_losses_keep_their_places_when_the_mode_changes() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    for n in range(ONE_KB_RECORDS + 2):  # 32 stored, 2 dropped after them
        buf.write(rec(n))
    buf.overwrite = True
    for n in range(100, 105):  # 5 oldest overwritten
        buf.write(rec(n))
    batch = buf.read(block=False)
    assert ns(batch) == [*range(5, 32), *range(100, 105)]
    assert batch.lost_at == [(0, 5), (27, 2)]
    assert batch.lost == buf.lost == 7


def test_overwriting_past_a_gap_merges_it_into_the_head() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    for n in range(ONE_KB_RECORDS + 2):
        buf.write(rec(n))
    buf.overwrite = True
    for n in range(100, 140):  # 40 overwritten: the 32 first and 8 new; the gap goes too
        buf.write(rec(n))
    batch = buf.read(block=False)
    assert ns(batch) == list(range(108, 140))
    assert batch.lost_at == [(0, 42)]
    assert (buf.overrun, buf.dropped, buf.lost) == (40, 2, 42)


def test_every_record_is_read_once_or_reported_lost() -> None:
    # Alternate modes, reads and overflows; the reads account for every write.
    buf = TraceBuffer(size_kb=1)
    written = 0
    seen: list[int] = []
    reported = 0
    for round_ in range(20):
        buf.overwrite = round_ % 3 != 0
        for _ in range(round_ * 7 % 50):
            buf.write(rec(written))
            written += 1
        if round_ % 2:
            batch = buf.read(block=False)
            seen += ns(batch)
            reported += batch.lost
    batch = buf.read(block=False)
    seen += ns(batch)
    reported += batch.lost
    assert seen == sorted(set(seen))
    assert len(seen) + reported == written
    assert reported == buf.lost


# -- tracing_on -----------------------------------------------------------------------------


def test_tracing_off_drops_without_counting() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    buf.write(rec(0))
    buf.tracing_on = False
    assert buf.write(rec(1)) is False
    assert (buf.entries, buf.lost, buf.dropped) == (1, 0, 0)
    buf.tracing_on = True
    assert buf.write(rec(2)) is True
    batch = buf.read(block=False)
    assert (ns(batch), batch.lost_at) == ([0, 2], [])


def test_tracing_off_does_not_count_even_when_full() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    for n in range(ONE_KB_RECORDS):
        buf.write(rec(n))
    buf.tracing_on = False
    for n in range(10):
        buf.write(rec(n))
    assert buf.lost == 0


# -- resize, clear, snapshot ------------------------------------------------------------


def test_resize_grows_and_keeps_the_records() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    for n in range(ONE_KB_RECORDS):
        buf.write(rec(n))
    buf.resize(2)
    assert buf.size_kb == 2
    for n in range(ONE_KB_RECORDS, 2 * ONE_KB_RECORDS):
        assert buf.write(rec(n))
    assert not buf.write(rec(999))
    assert ns(buf.snapshot()) == list(range(2 * ONE_KB_RECORDS))


@pytest.mark.parametrize("overwrite", [True, False])
def test_resize_shrinks_by_evicting_the_oldest(overwrite: bool) -> None:
    buf = TraceBuffer(size_kb=2, overwrite=overwrite)
    for n in range(2 * ONE_KB_RECORDS):
        buf.write(rec(n))
    buf.resize(1)
    assert buf.entries == ONE_KB_RECORDS
    assert (buf.overrun, buf.lost) == (32, 32)  # counted as the kernel counts removed pages
    batch = buf.read(block=False)
    assert ns(batch) == list(range(32, 64))
    assert batch.lost_at == [(0, 32)]


@pytest.mark.parametrize("bad", [0, -1, -5, 1.5, 1e30, 10**30, MAX_SIZE_KB + 1, "4", True,
                                 None])
def test_resize_refuses_a_bad_size(bad: Any) -> None:
    buf = TraceBuffer(size_kb=1)
    with pytest.raises(KprobeError, match="number of KB") as caught:
        buf.resize(bad)
    assert caught.value.errno == errno.EINVAL
    assert buf.size_kb == 1
    with pytest.raises(KprobeError):
        TraceBuffer(size_kb=bad)
    buf.resize(MAX_SIZE_KB)  # the largest is taken: nothing is allocated for it
    assert buf.size_kb == MAX_SIZE_KB


def test_clear_empties_and_resets_the_counters() -> None:
    buf = TraceBuffer(size_kb=1)
    for n in range(50):
        buf.write(rec(n))
    buf.clear()
    assert (buf.entries, buf.bytes_used, buf.lost, buf.overrun, buf.dropped) == (0, 0, 0, 0, 0)
    assert buf.counts() == (0, 0)
    # Losses before the clear are not reported: clearing is not losing.
    batch = buf.read(block=False)
    assert (list(batch), batch.lost_at) == ([], [])
    buf.write(rec(7))
    assert ns(buf.read(block=False)) == [7]


def test_snapshot_consumes_nothing() -> None:
    buf = TraceBuffer(size_kb=1)
    for n in range(3):
        buf.write(rec(n))
    first = buf.snapshot()
    assert ns(first) == ns(buf.snapshot()) == [0, 1, 2]
    first.clear()  # a copy
    assert buf.entries == 3
    assert ns(buf.read(block=False)) == [0, 1, 2]
    assert buf.snapshot() == []
    assert buf.counts() == (0, 0)  # consumed records count in neither (as in ftrace)


def test_counts_after_overwrite_and_consuming_read() -> None:
    buf = TraceBuffer(size_kb=1)
    for n in range(40):
        buf.write(rec(n))
    assert buf.counts() == (32, 40)
    buf.read(block=False)
    assert buf.counts() == (0, 8)


# -- never raises ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [None, 42, (), (1, 2), (0, 1, "t", EV, 5, None), (0, 1, "t", EV, None, None)],
)
def test_write_never_raises(bad: Any) -> None:
    # Not a record: refused, neither stored nor counted lost (the buffer does not validate
    # records beyond what the estimate reads, it only never raises).
    buf = TraceBuffer(size_kb=1)
    assert buf.write(bad) is False
    assert (buf.entries, buf.lost) == (0, 0)


def test_write_never_runs_program_code_for_the_estimate() -> None:
    class Hostile(str):
        def __len__(self) -> int:
            raise AssertionError("ran __len__")

    buf = TraceBuffer(size_kb=1)
    # A str subclass counts as a scalar: its __len__ is not called.
    assert buf.write((0, 1, "t", EV, (Hostile("abc"),), None))
    assert buf.bytes_used == 32


# -- trace_pipe reads -----------------------------------------------------------------------


def test_read_empty_without_blocking() -> None:
    batch = TraceBuffer().read(block=False)
    assert isinstance(batch, ReadBatch)
    assert (list(batch), batch.lost_at, batch.lost) == ([], [], 0)


def test_read_times_out() -> None:
    buf = TraceBuffer()
    start = time.monotonic()
    batch = buf.read(timeout=0.2)
    elapsed = time.monotonic() - start
    assert list(batch) == []
    assert 0.15 <= elapsed < 5


def test_zero_timeout_does_not_wait() -> None:
    start = time.monotonic()
    assert list(TraceBuffer().read(timeout=0)) == []
    assert time.monotonic() - start < 1


def _blocked_reader(buf: TraceBuffer, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        out["batch"] = buf.read(**kwargs)
        out["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _wait_until_blocked(buf: TraceBuffer, readers: int = 1) -> None:
    deadline = time.monotonic() + 5
    while buf._nwaiting < readers:  # white box: the readers registered and are waiting
        assert time.monotonic() < deadline, "the reader never blocked"
        time.sleep(0.001)


def test_blocking_read_wakes_up_when_written() -> None:
    buf = TraceBuffer()
    thread, out = _blocked_reader(buf, timeout=30)
    _wait_until_blocked(buf)
    written_at = time.monotonic()
    buf.write(rec(5))
    thread.join(10)
    assert not thread.is_alive()
    assert ns(out["batch"]) == [5]
    assert out["at"] - written_at < 1.0  # promptly, not at the timeout


def test_blocking_read_without_timeout_wakes_up() -> None:
    buf = TraceBuffer()
    thread, out = _blocked_reader(buf)
    _wait_until_blocked(buf)
    buf.write(rec(1))
    thread.join(10)
    assert ns(out["batch"]) == [1]


def test_blocking_read_wakes_up_for_a_loss() -> None:
    buf = TraceBuffer(size_kb=1)
    thread, out = _blocked_reader(buf, timeout=30)
    _wait_until_blocked(buf)
    buf.write(rec(1, "x" * 5000))  # too big: dropped, and that is news for trace_pipe
    thread.join(10)
    assert out["batch"].lost_at == [(0, 1)]


def test_interrupt_wakes_blocked_readers() -> None:
    buf = TraceBuffer()
    readers = [_blocked_reader(buf) for _ in range(2)]
    _wait_until_blocked(buf, readers=2)
    buf.interrupt()
    for thread, out in readers:
        thread.join(10)
        assert not thread.is_alive()
        assert list(out["batch"]) == []
    # Later reads are not interrupted.
    buf.write(rec(3))
    assert ns(buf.read(timeout=5)) == [3]


def test_repr() -> None:
    buf = TraceBuffer(size_kb=1, overwrite=False)
    buf.write(rec(1))
    buf.tracing_on = False
    assert repr(buf) == (
        "<TraceBuffer 1 KB, 1 entries, 32 bytes used, lost 0, drop newest, tracing off>"
    )
