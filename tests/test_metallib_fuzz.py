"""Fuzzing the metallib reader: damaged real files and random headers only ever raise
MetallibError. Derandomized with fixed example counts, so CI time and results are stable."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aotc.formats.metallib import HEADER_SIZE, MAGIC, MetallibError, read_metallib

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "metallib"
STEMS = ["constants.14", "kernels.11", "sources.26", "debuginfo.15"]
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _load() -> dict[str, bytes]:
    paths = {s: FIXTURES / f"{s}.metallib" for s in STEMS}
    return {s: p.read_bytes() for s, p in paths.items() if p.is_file()}


SAMPLES = _load()
needs_fixtures = pytest.mark.skipif(
    len(SAMPLES) != len(STEMS), reason=f"metallib fixtures are not at {FIXTURES}"
)


def read_or_reject(data: bytes) -> None:
    """The one allowed failure is MetallibError; a library that reads must also verify."""
    try:
        lib = read_metallib(data)
    except MetallibError as e:
        assert str(e).startswith("offset "), str(e)
        return
    assert isinstance(lib.verify_hashes(), list)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A fixture with some bytes overwritten, some 2/4/8-byte fields set, maybe truncated."""
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        fmt = draw(st.sampled_from(["B", "<H", "<I", "<Q"]))
        size = struct.calcsize(fmt)
        if at + size <= len(data):
            # Small values and extremes find off-by-one and overflow paths more than uniform ones.
            bound = (1 << (8 * size)) - 1
            value = draw(st.one_of(st.integers(0, 64), st.just(bound), st.integers(0, bound)))
            struct.pack_into(fmt, data, at, value)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@needs_fixtures
@SETTINGS
@given(damaged())
def test_damaged_fixtures_raise_only_metallib_error(data: bytes) -> None:
    read_or_reject(data)


@needs_fixtures
@SETTINGS
@given(st.data())
def test_damaged_header_fields_raise_only_metallib_error(data: st.DataObject) -> None:
    """Header offsets and sizes (bytes 16-87) pointed anywhere, keeping the file size right."""
    sample = bytearray(SAMPLES[data.draw(st.sampled_from(sorted(SAMPLES)))])
    field = data.draw(st.integers(3, 10))  # u64 fields after the file size
    limit = data.draw(st.sampled_from([len(sample) + 16, 1 << 64]))
    struct.pack_into("<Q", sample, 8 * field, data.draw(st.integers(0, limit - 1)))
    read_or_reject(bytes(sample))


@SETTINGS
@given(st.binary(min_size=HEADER_SIZE - 4, max_size=HEADER_SIZE + 200))
def test_random_headers_raise_only_metallib_error(tail: bytes) -> None:
    data = bytearray(MAGIC + tail)
    if len(data) >= 24:
        struct.pack_into("<Q", data, 16, len(data))  # get past the size check most of the time
    read_or_reject(bytes(data))
