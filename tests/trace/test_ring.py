"""The trace buffer's storage (ring.py and the C ring): sequence numbers, both overflow
modes, the gaps that are the lost events, resize, clear, the reader's wake-up, bad input.
Every test runs on each backend."""

from __future__ import annotations

from typing import Any

import pytest

from tests.trace.rings import BACKENDS

EV = object()


def put(r: Any, n: int, size: int = 32) -> bool:
    return bool(r.append(n * 10, 7, EV, (n,), None, size))


def seqs(entries: list[Any]) -> list[int]:
    return [e[0] for e in entries]


@pytest.fixture(params=BACKENDS)
def Ring(request: pytest.FixtureRequest) -> Any:
    return request.param[0]


def test_entries_carry_what_was_appended(Ring: Any) -> None:
    r = Ring(1024)
    assert r.append(5, 7, EV, (1, "a"), "m:f", 40) is True
    assert r.snapshot() == [(0, 5, 7, EV, (1, "a"), "m:f", 40)]
    assert (r.entries, r.bytes_used, r.next_seq, r.read_seq) == (1, 40, 1, 0)
    assert r.limit == 1024


def test_overwrite_evicts_the_oldest_and_counts_overrun(Ring: Any) -> None:
    r = Ring(100)
    for n in range(5):
        assert put(r, n)
    assert seqs(r.snapshot()) == [2, 3, 4]
    assert (r.overrun, r.dropped, r.bytes_used) == (2, 0, 96)
    assert r.counts() == (3, 5)


def test_drop_newest_refuses_and_counts_dropped(Ring: Any) -> None:
    r = Ring(100, False)
    results = [put(r, n) for n in range(5)]
    assert results == [True, True, True, False, False]
    assert seqs(r.snapshot()) == [0, 1, 2]
    assert (r.overrun, r.dropped, r.next_seq) == (0, 2, 5)


def test_an_entry_bigger_than_the_ring_is_dropped_even_when_overwriting(Ring: Any) -> None:
    r = Ring(100)
    put(r, 0)
    assert put(r, 1, size=101) is False
    assert (r.dropped, r.entries) == (1, 1)


def test_take_consumes_and_reports_the_range(Ring: Any) -> None:
    r = Ring(100)
    for n in range(5):
        put(r, n)
    entries, start, end = r.take()
    assert (seqs(entries), start, end) == ([2, 3, 4], 0, 5)
    assert (r.entries, r.bytes_used, r.read_seq, r.pending()) == (0, 0, 5, False)
    put(r, 5)
    assert r.pending()
    entries, start, end = r.take()
    assert (seqs(entries), start, end) == ([5], 5, 6)


def test_a_loss_alone_is_pending(Ring: Any) -> None:
    r = Ring(100, False)
    for n in range(3):
        put(r, n)
    r.take()
    r.add_lost(4)
    assert r.pending() and r.dropped == 4
    assert r.take() == ([], 3, 7)


def test_tracing_off_refuses_uncounted(Ring: Any) -> None:
    r = Ring(100)
    r.tracing_on = False
    assert put(r, 0) is False
    assert (r.next_seq, r.dropped, r.pending()) == (0, 0, False)


def test_clear_forgets_losses_and_counters(Ring: Any) -> None:
    r = Ring(64)
    for n in range(5):
        put(r, n)
    r.clear()
    assert (r.entries, r.overrun, r.dropped, r.pending(), r.bytes_used) == (0, 0, 0, False, 0)
    put(r, 9)
    assert r.take()[1:] == (5, 6)


def test_resize_evicts_as_overrun(Ring: Any) -> None:
    r = Ring(1000)
    for n in range(10):
        put(r, n)
    r.resize(100)
    assert seqs(r.snapshot()) == [7, 8, 9]
    assert (r.overrun, r.limit) == (7, 100)


def test_wake_is_called_once_when_waiting(Ring: Any) -> None:
    r = Ring(100, False)
    calls: list[int] = []
    r.wake = lambda: calls.append(1)
    put(r, 0)
    assert calls == []
    r.waiting = True
    put(r, 1)
    put(r, 2)
    assert calls == [1] and not r.waiting
    r.waiting = True
    put(r, 3)
    put(r, 4)  # dropped: a loss is news too
    assert calls == [1, 1]
    r.waiting = True
    r.add_lost(1)
    assert calls == [1, 1, 1]


def test_a_wake_that_raises_never_reaches_the_writer(Ring: Any) -> None:
    r = Ring(100)

    def bad() -> None:
        raise RuntimeError("boom")

    r.wake = bad
    r.waiting = True
    assert put(r, 0) is True
    assert r.entries == 1


@pytest.mark.parametrize("limit", [0, -1, 1.5, "10", None])
def test_bad_limits(Ring: Any, limit: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        Ring(limit)
    r = Ring(10)
    with pytest.raises((ValueError, TypeError)):
        r.resize(limit)
    assert r.limit == 10
