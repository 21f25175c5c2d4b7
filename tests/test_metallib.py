"""The metallib reader on real files: Metal.jl's test libraries (macOS 11 to 26), MLX's own
146 MB library and mlx-cluster's, plus precise errors for damaged files and `aotc inspect`."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from aotc.formats.metallib import FunctionConstant, MetallibError, read_metallib
from aotc.inspect import InspectError, inspect_file, render_inspection
from tests._downloads import wheel_file

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "metallib"

# From the fixtures' README: file -> (bytes, format, platform, platform version, functions).
README_TABLE = {
    "constants.11": (4328, "1.2.5", "unknown", "0.0.0", ["vadd"]),
    "constants.12": (4328, "1.2.6", "macOS", "12.0.0", ["vadd"]),
    "constants.13": (5048, "1.2.7", "macOS", "13.0.0", ["vadd"]),
    "constants.14": (5432, "1.2.7", "macOS", "14.0.0", ["vadd"]),
    "constants.15": (5448, "1.2.8", "macOS", "15.0.0", ["vadd"]),
    "constants.26": (5512, "1.2.9", "macOS", "26.0.0", ["vadd"]),
    "debuginfo.11": (3106, "1.2.5", "unknown", "0.0.0", ["foo"]),
    "debuginfo.12": (3106, "1.2.6", "macOS", "12.0.0", ["foo"]),
    "debuginfo.13": (3296, "1.2.7", "macOS", "13.0.0", ["foo"]),
    "debuginfo.14": (3808, "1.2.7", "macOS", "14.0.0", ["foo"]),
    "debuginfo.15": (3808, "1.2.8", "macOS", "15.0.0", ["foo"]),
    "debuginfo.26": (3888, "1.2.9", "macOS", "26.0.0", ["foo"]),
    "dummy": (88566, "1.2.6", "macOS", "12.1.0", ["kernel_1", "kernel_2"]),
    "kernel.11": (2991, "1.2.5", "unknown", "0.0.0", ["foo"]),
    "kernel.12": (2991, "1.2.6", "macOS", "12.0.0", ["foo"]),
    "kernel.13": (3168, "1.2.7", "macOS", "13.0.0", ["foo"]),
    "kernel.14": (3168, "1.2.7", "macOS", "14.0.0", ["foo"]),
    "kernel.15": (3168, "1.2.8", "macOS", "15.0.0", ["foo"]),
    "kernel.26": (3216, "1.2.9", "macOS", "26.0.0", ["foo"]),
    "kernels.11": (8737, "1.2.5", "unknown", "0.0.0", ["foo", "bar", "baz"]),
    "kernels.12": (8737, "1.2.6", "macOS", "12.0.0", ["foo", "bar", "baz"]),
    "kernels.13": (9200, "1.2.7", "macOS", "13.0.0", ["foo", "bar", "baz"]),
    "kernels.14": (9200, "1.2.7", "macOS", "14.0.0", ["foo", "bar", "baz"]),
    "kernels.15": (9200, "1.2.8", "macOS", "15.0.0", ["foo", "bar", "baz"]),
    "kernels.26": (9248, "1.2.9", "macOS", "26.0.0", ["foo", "bar", "baz"]),
    "sources.11": (88577, "1.2.5", "unknown", "0.0.0", ["foo", "bar"]),
    "sources.12": (88618, "1.2.6", "macOS", "12.0.0", ["foo", "bar"]),
    "sources.13": (88928, "1.2.7", "macOS", "13.0.0", ["foo", "bar"]),
    "sources.14": (88928, "1.2.7", "macOS", "14.0.0", ["foo", "bar"]),
    "sources.15": (88960, "1.2.8", "macOS", "15.0.0", ["foo", "bar"]),
    "sources.26": (62496, "1.2.9", "macOS", "26.0.0", ["foo", "bar"]),
}
# The AIR and Metal Shading Language versions Apple's compiler emits for each macOS release.
LANGUAGE_VERSIONS = {
    "11": ("2.3", "2.3"),
    "12": ("2.4", "2.4"),
    "13": ("2.5", "3.0"),
    "14": ("2.6", "3.1"),
    "15": ("2.7", "3.2"),
    "26": ("2.8", "4.0"),
}
VADD_CONSTANTS = (FunctionConstant("foo", "float", 0), FunctionConstant("bar", "float", 2))


def fixture(stem: str) -> Path:
    path = FIXTURES / f"{stem}.metallib"
    if not path.is_file():
        pytest.skip(f"metallib fixtures are not at {FIXTURES}")
    return path


def mlx_file(package: str, version: str, member: str) -> Path:
    path = wheel_file(package, version, member)
    if path is None:
        pytest.skip(f"{package}=={version} is not in build/cache and cannot be downloaded")
    return path


@pytest.mark.parametrize("stem", sorted(README_TABLE))
def test_fixture_matches_readme(stem: str) -> None:
    size, fmt, platform, platform_version, names = README_TABLE[stem]
    lib = read_metallib(fixture(stem))
    assert (lib.file_size, lib.format_version, lib.file_type) == (size, fmt, "executable")
    assert (lib.platform, lib.platform_version) == (platform, platform_version)
    assert [f.name for f in lib.functions] == names
    assert {f.type for f in lib.functions} == {"kernel"}
    assert lib.verify_hashes() == []
    assert lib.has_sources == stem.startswith(("sources", "dummy"))
    for f in lib.functions:
        expected = VADD_CONSTANTS if stem.startswith("constants") else ()
        assert f.constants == expected
        assert bytes(lib.module(f)[:4]) == b"\xde\xc0\x17\x0b"  # LLVM bitcode wrapper magic


@pytest.mark.parametrize("stem", [s for s in README_TABLE if s != "dummy"])
def test_language_versions_and_triple_follow_the_macos_release(stem: str) -> None:
    release = stem.split(".")[1]
    lib = read_metallib(fixture(stem))
    assert {(f.air_version, f.msl_version) for f in lib.functions} == {LANGUAGE_VERSIONS[release]}
    assert lib.target is not None
    assert (lib.target.vendor, lib.target.os, lib.target.os_version) == (
        "apple",
        "macosx",
        f"{release}.0.0",
    )
    assert lib.target.arch == ("air64_v28" if release == "26" else "air64")


def test_dummy_library_target_and_uuid() -> None:
    lib = read_metallib(fixture("dummy").read_bytes())
    assert lib.target is not None and lib.target.triple == "air64-apple-macosx12.1.0"
    assert lib.uuid == "3f626a7fef5c6f5350fea8cfae805d0c"
    assert set(lib.extensions) == {"HSRD"}


@pytest.fixture(scope="module")
def mlx_library():
    return read_metallib(mlx_file("mlx-metal", "0.32.4", "mlx/lib/mlx.metallib"))


def test_mlx_metal_library(mlx_library) -> None:
    lib = mlx_library
    assert (lib.file_size, lib.format_version) == (146_876_416, "1.2.7")
    assert (lib.platform, lib.platform_version) == ("macOS", "14.0.0")
    assert lib.target is not None and lib.target.triple == "air64_v26-apple-macosx14.0.0"
    assert len(lib.functions) == 17_248
    assert len({f.name for f in lib.functions}) == 17_248
    for name in [
        "sdpa_vector_float16_t_192_128",
        "sdpa_vector_2pass_1_float16_t_192_128",
        "sdpa_vector_2pass_2_float16_t_128",
    ]:
        assert name in lib
        assert lib.function(name).type == "kernel"
    blocks = lib.function("sdpa_vector_2pass_1_float16_t_192_128").constants[-1]
    assert blocks == FunctionConstant("blocks", "int", 26)
    assert sum(1 for f in lib.functions if f.constants) == 742


def test_mlx_metal_library_hashes_all_verify(mlx_library) -> None:
    assert mlx_library.verify_hashes() == []


def test_mlx_cluster_library() -> None:
    lib = read_metallib(mlx_file("mlx-cluster", "0.0.7", "mlx_cluster/mlx_cluster.metallib"))
    assert (lib.file_size, lib.format_version, lib.platform_version) == (5432, "1.2.8", "15.0.0")
    assert [(f.name, f.type) for f in lib.functions] == [("random_walk", "kernel")]
    assert lib.verify_hashes() == []


# --- damaged files -------------------------------------------------------------------------


def _u64(data: bytearray, offset: int, value: int) -> bytearray:
    struct.pack_into("<Q", data, offset, value)
    return data


def test_a_changed_module_byte_fails_its_hash() -> None:
    data = bytearray(fixture("kernels.14").read_bytes())
    lib = read_metallib(bytes(data))
    bar = lib.function("bar")
    data[bar.module_offset + 100] ^= 0xFF
    problems = read_metallib(data).verify_hashes()
    assert len(problems) == 1 and problems[0].startswith("bar: module at offset")


def test_group_sizes_are_not_trusted() -> None:
    """Writers disagree on whether a group's size counts its own field: ends come from ENDT."""
    data = bytearray(fixture("kernels.14").read_bytes())
    offset = struct.unpack_from("<Q", data, 24)[0] + 4
    for _ in range(3):
        size = struct.unpack_from("<I", data, offset)[0]
        struct.pack_into("<I", data, offset, size - 4)
        offset += size
    assert read_metallib(data) == read_metallib(fixture("kernels.14"))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:87], "offset 0: expected the header (88 bytes)"),
        (lambda d: b"MTLX" + d[4:], "offset 0: expected magic b'MTLB', found b'MTLX'"),
        (lambda d: d + b"\0", "offset 16: the header gives a file size of 9200, not 9201"),
        (lambda d: _u64(d, 24, 10**6), "offset 1000000: the function list section"),
        (lambda d: _u64(d, 80, 10**6), "the module section (1000000 bytes) does not fit"),
    ],
)
def test_damaged_header_is_reported_with_its_offset(mutate, message: str) -> None:
    data = mutate(bytearray(fixture("kernels.14").read_bytes()))
    with pytest.raises(MetallibError, match=re.escape(message)):
        read_metallib(bytes(data))


def test_truncation_anywhere_raises_metallib_error() -> None:
    data = fixture("constants.14").read_bytes()
    for end in range(0, len(data), 7):
        with pytest.raises(MetallibError, match=r"^offset \d+: "):
            read_metallib(data[:end])


def test_function_count_beyond_the_list_is_rejected_before_reading() -> None:
    data = bytearray(fixture("kernel.14").read_bytes())
    struct.pack_into("<I", data, 88, 0xFFFFFFFF)
    with pytest.raises(MetallibError, match="offset 88: 4294967295 functions cannot fit"):
        read_metallib(data)


def test_module_outside_its_section_is_rejected() -> None:
    data = bytearray(fixture("kernel.14").read_bytes())
    mdsz = data.index(b"MDSZ") + 6
    struct.pack_into("<Q", data, mdsz, 1 << 40)
    with pytest.raises(MetallibError, match=r"the module of 'foo' .* does not fit in the module"):
        read_metallib(data)


def test_missing_tag_is_named() -> None:
    data = bytearray(fixture("kernel.14").read_bytes())
    data[data.index(b"HASH") : data.index(b"HASH") + 4] = b"XASH"
    with pytest.raises(MetallibError, match=r"offset 92: function 'foo' .* has no HASH tag"):
        read_metallib(data)


# --- inspect -------------------------------------------------------------------------------


def test_inspect_metallib_is_json_ready_and_renders() -> None:
    data = inspect_file(fixture("constants.14"))
    assert json.loads(json.dumps(data)) == data
    assert data["format"] == "metallib"
    assert (data["format_version"], data["platform"], data["platform_version"]) == (
        "1.2.7",
        "macOS",
        "14.0.0",
    )
    assert data["target_triple"] == "air64-apple-macosx14.0.0"
    assert data["hash_mismatches"] == []
    [vadd] = data["functions"]
    assert vadd["name"] == "vadd" and vadd["type"] == "kernel"
    assert vadd["constants"] == [
        {"name": "foo", "type": "float", "index": 0},
        {"name": "bar", "type": "float", "index": 2},
    ]
    text = render_inspection(data)
    assert "format 1.2.7 executable, platform macOS 14.0.0" in text
    assert "module hashes: all match" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("vadd"))
    assert row.split()[:5] == ["vadd", "kernel", "2.6", "3.1", "4,544"]
    assert row.endswith("foo: float @0, bar: float @2")


def test_inspect_dispatches_on_magic_not_extension(tmp_path: Path) -> None:
    renamed = tmp_path / "library.fatbin"
    renamed.write_bytes(fixture("kernel.14").read_bytes())
    assert inspect_file(renamed)["format"] == "metallib"


def test_inspect_reports_unknown_and_damaged_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.metallib"
    text.write_text("hello")
    with pytest.raises(InspectError, match=r"not a Metal library .* starts with 68 65 6c 6c"):
        inspect_file(text)
    damaged = tmp_path / "damaged.metallib"
    damaged.write_bytes(fixture("kernel.14").read_bytes()[:200])
    with pytest.raises(InspectError, match=r"damaged.metallib: offset 16: the header gives"):
        inspect_file(damaged)
    with pytest.raises(InspectError, match="cannot read"):
        inspect_file(tmp_path / "absent")
