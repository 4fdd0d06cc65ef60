"""trace/cmdlines.py and the thread keys of both backends: a key per thread, never reused
after the thread ended (idents are), its id and name saved at its first record and resolved
when the buffer is read; the table is bounded."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pykprobes.trace import cmdlines
from pykprobes.trace.buffer import TraceBuffer
from tests.trace.rings import BACKENDS


@pytest.fixture(params=BACKENDS)
def thread_key(request: pytest.FixtureRequest) -> Any:
    return request.param[2]


def _in_thread(fn: Any, name: str) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append((fn(), threading.get_native_id())),
                         name=name)
    t.start()
    t.join()
    return out[0]


def test_a_thread_keeps_its_key_and_is_saved(thread_key: Any) -> None:
    key = thread_key()
    assert thread_key() == key
    assert cmdlines.resolve(key) == (threading.get_native_id(),
                                     threading.current_thread().name)


def test_keys_are_never_reused_after_a_thread_ended(thread_key: Any) -> None:
    # Threads started one after the other usually get the same ident: not the same key.
    seen = {}
    for n in range(5):
        key, tid = _in_thread(thread_key, f"worker-{n}")
        assert key not in seen
        seen[key] = (tid, f"worker-{n}")
    for key, who in seen.items():
        assert cmdlines.resolve(key) == who


def test_a_pair_stands_for_itself_and_unknown_keys_are_unknown() -> None:
    assert cmdlines.resolve((12, "x")) == (12, "x")
    assert cmdlines.resolve(-12345) == cmdlines.UNKNOWN == (0, "<...>")


def test_the_table_is_bounded_and_a_live_thread_is_saved_again(thread_key: Any) -> None:
    key = thread_key()
    saved = dict(cmdlines.saved)
    try:
        for n in range(cmdlines.SAVED_MAX + 10):
            cmdlines.saved[-1 - n] = (n, "old")
            if len(cmdlines.saved) >= cmdlines.SAVED_MAX:
                cmdlines.note(-999_999)
        assert len(cmdlines.saved) <= cmdlines.SAVED_MAX
        cmdlines.saved.pop(key, None)
        # The C backend remembers the last key it saw: a thread switch makes it look again.
        _in_thread(thread_key, "other")
        assert thread_key() == key
        assert cmdlines.resolve(key)[0] == threading.get_native_id()
    finally:
        cmdlines.saved.clear()
        cmdlines.saved.update(saved)


def test_records_of_an_ended_thread_keep_its_id_and_name() -> None:
    from pykprobes.trace.backend import thread_key

    buf = TraceBuffer()
    tids = []
    for n in range(3):
        def work(n: int = n) -> None:
            tids.append(threading.get_native_id())
            buf.append(n, thread_key(), None, (n,), None, 32)

        t = threading.Thread(target=work, name=f"gone-{n}")
        t.start()
        t.join()
    records = buf.snapshot()
    assert [(r[1], r[2]) for r in records] == [(tids[n], f"gone-{n}") for n in range(3)]
