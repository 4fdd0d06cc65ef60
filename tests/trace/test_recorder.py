"""The compiled recorder of both backends (recorder.py, `_speedups.Recorder`): when it hands
the hit back (True), what it records (False), its conversions, that it keeps no reference
to the program's objects, and bad input."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

from pykprobes.trace.recorder import KIND_CONVERT, KIND_DESCRIBE, KIND_INT, KIND_STR
from pykprobes.trace.safe import describe
from pykprobes.trace.types import to_int, to_str
from tests.trace.rings import BACKENDS


class Obj:
    pass


@pytest.fixture(params=BACKENDS)
def make(request: pytest.FixtureRequest) -> Any:
    Ring, Recorder, _ = request.param

    def build(kinds: tuple[int, ...], converters: tuple[Any, ...], size: int = -1,
              busy: dict[int, Any] | None = None,
              held: list[Any] | None = None) -> tuple[Any, Any]:
        ring = Ring(1 << 20)
        rec = Recorder("EV", ring, {} if busy is None else busy,
                       [None] if held is None else held, kinds, converters, size)
        rec.fast = True
        return rec, ring

    return build


def test_records_values_with_time_and_thread(make: Any) -> None:
    rec, ring = make((KIND_DESCRIBE, KIND_DESCRIBE), (describe, describe))
    assert rec(1, "ab") is False
    ((seq, ts, key, event, values, caller, size),) = ring.snapshot()
    assert (seq, event, values, caller, size) == (0, "EV", (1, "ab"), None, 24 + 8 + 6)
    assert ts > 0 and type(key) is int and rec.nhit == 1


def test_hands_back_what_the_careful_path_must_do(make: Any) -> None:
    busy: dict[int, Any] = {}
    held: list[Any] = [None]
    rec, ring = make((KIND_DESCRIBE,), (describe,), busy=busy, held=held)
    rec.fast = False
    assert rec(1) is True
    rec.fast = True
    ring.tracing_on = False
    assert rec(1) is True
    ring.tracing_on = True
    busy[1] = object()
    assert rec(1) is True
    busy.clear()
    held[0] = object()  # a fast-path hit runs its handler somewhere
    assert rec(1) is True
    held[0] = None
    assert rec(1, 2) is True  # not the arity it was made for
    assert rec() is True
    assert (ring.entries, rec.nhit) == (0, 0)
    assert rec(1) is False and ring.entries == 1


def test_conversions_and_fixed_size(make: Any) -> None:
    rec, ring = make((KIND_INT, KIND_STR, KIND_CONVERT, KIND_DESCRIBE),
                     (to_int, to_str, lambda v: 42, describe), size=99)
    big = "x" * 300
    obj = Obj()
    assert rec(2.5, big, "ignored", obj) is False
    values = ring.snapshot()[0][4]
    assert values[:3] == (2, "x" * 256 + "...", 42)
    assert values[3].startswith("<") and "Obj at 0x" in values[3]
    assert ring.snapshot()[0][6] == 99


def test_no_reference_to_program_objects(make: Any) -> None:
    rec, ring = make((KIND_DESCRIBE, KIND_INT), (describe, to_int))
    obj = Obj()
    ref = weakref.ref(obj)
    rec(obj, obj)
    del obj
    gc.collect()
    assert ref() is None and ring.entries == 1


@pytest.mark.parametrize("bad", [
    dict(kinds=(1, 1), converters=(describe,)),
    dict(kinds=(9,), converters=(describe,)),
    dict(kinds=("x",), converters=(describe,)),
    dict(kinds=(1,), converters=(5,)),
    dict(kinds=(1,), converters=(describe,), busy=[]),
    dict(kinds=(1,), converters=(describe,), held=[]),
    dict(kinds=(1,), converters=(describe,), held=(None,)),
])
def test_bad_input(make: Any, bad: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError)):
        make(**bad)


def test_the_backend_choice_is_forced_by_the_environment_and_shown_by_info() -> None:
    import subprocess
    import sys

    code = "from pykprobes.trace import backend; print(backend.NAME, '|', backend.REASON)"
    env = {"PYKPROBES_ACCELERATOR": "off", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out.strip() == "python | forced by PYKPROBES_ACCELERATOR=off"
    info = subprocess.run([sys.executable, "-m", "pykprobes", "info"], env=env,
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "accelerator: python (forced by PYKPROBES_ACCELERATOR=off)" in info
    assert "hits inside breakpoint handlers: not seen (no C accelerator)" in info
