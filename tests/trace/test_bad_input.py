"""Bad input through the API that once escaped as a Python exception (issue 16, item 10): each
is the documented error, a KprobeError with the kernel's errno, and for a definition or a
filter the error_log entry with its caret."""

from __future__ import annotations

import errno

import pytest

import pykprobes as kp
from pykprobes.trace.tracefs import TraceFS, TraceWriteError


@pytest.mark.parametrize("literal", ["9" * 5000, "-" + "1" * 4301])
def test_a_filter_literal_beyond_the_int_limit(fs: TraceFS, literal: str) -> None:
    event = fs.define("p:bad/f tests.core.targets:add a b")
    assert event is not None
    text = f"a > {literal}"
    with pytest.raises(TraceWriteError) as info:
        fs.set_filter(event, text)
    assert info.value.errno == errno.EINVAL
    log = fs.read("error_log").splitlines()
    assert log[0].endswith("error: Illegal integer value")
    assert log[2].index("^") == log[1].index(literal)
    with pytest.raises(TraceWriteError):
        fs.write("events/bad/f/filter", text)


@pytest.mark.parametrize("size", ["1e30", "-5", "0", "9" * 5000, "1" + "0" * 30, "x"])
def test_buffer_size_kb_that_is_no_size(fs: TraceFS, size: str) -> None:
    with pytest.raises(TraceWriteError) as info:
        fs.write("buffer_size_kb", size)
    assert info.value.errno == errno.EINVAL
    assert fs.read("buffer_size_kb") == "1408\n"


@pytest.mark.parametrize("size", [1e30, -5, 0, 10**30])
def test_a_tracefs_of_no_size(size: object) -> None:
    with pytest.raises(kp.KprobeError) as info:
        TraceFS(buffer_size_kb=size)  # type: ignore[arg-type]
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("path", ["/tmp/no\x00such.py", "/tmp/no\ud800such.py"])
def test_a_line_target_path_no_file_can_have(fs: TraceFS, path: str) -> None:
    definition = f"p:bad/l {path}:3"
    with pytest.raises(TraceWriteError) as info:
        fs.define(definition)
    assert info.value.errno == errno.ENOENT
    log = fs.read("error_log")
    log.encode("utf-8")
    lines = log.splitlines()
    assert lines[0].endswith("error: Failed to find the given file")
    assert lines[2].index("^") == lines[1].index("/tmp/")
    for resolve in (kp.resolve_line, kp.line_symbols):
        with pytest.raises(kp.KprobeError) as caught:
            resolve(f"{path}:3")
        assert caught.value.errno == errno.ENOENT


@pytest.mark.parametrize("name", [5, b"json:loads", ["json:loads"]])
def test_a_symbol_name_that_is_not_a_str(name: object) -> None:
    for make, register in ((kp.Kprobe, kp.register_kprobe),
                           (kp.Kretprobe, kp.register_kretprobe)):
        with pytest.raises(kp.KprobeError) as info:
            register(make(symbol_name=name))  # type: ignore[operator, arg-type]
        assert info.value.errno == errno.EINVAL
