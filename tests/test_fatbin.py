"""The fatbin reader on fatbins built here by nvcc and fatbinary, the image selection the
runtime relies on, precise errors for damaged files, a bounded fuzz, and `aotc inspect`."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aotc.formats.fatbin import (
    FatbinError,
    build_fatbin,
    extract_image,
    read_fatbin,
    select_entry,
)
from aotc.inspect import inspect_file, render_inspection

from .conftest import cuobjdump, cuobjdump_resources

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
HAVE_ZSTD = importlib.util.find_spec("zstandard") is not None

# Two kernels and a device function that must not be listed as one.
KERNELS_CU = """
__device__ __noinline__ float helper(float v) { return v * 2.0f + 1.0f; }
extern "C" __global__ void add_one(float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = helper(x[i]);
}
extern "C" __global__ void scale(float* x, float a, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] *= a;
}
"""
OTHER_CU = 'extern "C" __global__ void other_kernel(int* x) { x[threadIdx.x] = 7; }\n'
GENCODES = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]
# The per-TU images the build pipeline combines: (TU, nvcc output flag, arch, fatbinary kind, sm).
IMAGES = [
    ("k", "-cubin", "sm_90a", "elf", "90a"),
    ("k", "-ptx", "compute_90", "ptx", "90"),
    ("b", "-cubin", "sm_90a", "elf", "90a"),
    ("b", "-ptx", "compute_90", "ptx", "90"),
    ("k", "-cubin", "sm_80", "elf", "80"),
]


def run(*command: str | Path) -> None:
    subprocess.run([str(c) for c in command], check=True, capture_output=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fatbins from nvcc (default and --no-compress) and from fatbinary over per-TU images."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    tmp = tmp_path_factory.mktemp("fatbin")
    (tmp / "k.cu").write_text(KERNELS_CU)
    (tmp / "b.cu").write_text(OTHER_CU)
    out = {"nvcc": tmp / "k.fatbin", "nvcc_plain": tmp / "k_plain.fatbin"}
    run("nvcc", "-fatbin", *GENCODES, tmp / "k.cu", "-o", out["nvcc"])
    run("nvcc", "-fatbin", "--no-compress", *GENCODES, tmp / "k.cu", "-o", out["nvcc_plain"])
    image_args = []
    for tu, flag, arch, kind, sm in IMAGES:
        image = tmp / f"{tu}.{arch}.{kind}"
        out[image.name] = image
        run("nvcc", flag, f"-arch={arch}", tmp / f"{tu}.cu", "-o", image)
        image_args.append(f"--image3=kind={kind},sm={sm},file={image}")
    out["combined"] = tmp / "combined.fatbin"
    out["combined_default"] = tmp / "combined_default.fatbin"
    run("fatbinary", f"--create={out['combined']}", "--compress=false", *image_args)
    run("fatbinary", f"--create={out['combined_default']}", *image_args)
    return out


def nvcc_release() -> str:
    version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.", version)
    return match.group(1) if match else ""


# --- reading ---------------------------------------------------------------------------------


def test_nvcc_fatbin_entries_and_kernels(built: dict[str, Path]) -> None:
    fb = read_fatbin(built["nvcc_plain"])
    assert [(e.kind, e.arch) for e in fb.entries] == [
        ("elf", "sm_80"),
        ("elf", "sm_90a"),
        ("ptx", "compute_90"),
    ]
    assert fb.archs() == ["sm_80", "sm_90a", "compute_90"]
    assert all(e.kernels == {"add_one", "scale"} for e in fb.entries)  # not `helper`
    assert not any(e.compressed for e in fb.entries)
    assert fb.entries[0].offset == 16
    assert [e.end for e in fb.entries[:-1]] == [e.offset for e in fb.entries[1:]]
    assert fb.entries[-1].end == len(fb.data)


def test_nvcc_13_compresses_only_ptx_by_default(built: dict[str, Path]) -> None:
    if nvcc_release() != "13":
        pytest.skip("compression defaults are checked for nvcc 13")
    fb = read_fatbin(built["nvcc"])
    assert [e.compressed for e in fb.entries] == [False, False, True]
    ptx = fb.entries[2]
    assert ptx.compressed_size is not None and ptx.uncompressed_size is not None
    assert ptx.compressed_size <= ptx.size < ptx.uncompressed_size
    if HAVE_ZSTD:
        assert ptx.kernels == {"add_one", "scale"}
        assert b".entry add_one(" in fb.payload(ptx)
    else:
        assert ptx.kernels is None
        assert fb.kernels_by_arch()["compute_90"] is None
        with pytest.raises(FatbinError, match="compressed and cannot be decoded"):
            fb.payload(ptx)
    assert fb.kernels() == {"add_one", "scale"}  # from the cubins either way


def test_fatbinary_combines_per_tu_images(built: dict[str, Path]) -> None:
    fb = read_fatbin(built["combined"])
    assert [(e.kind, e.arch) for e in fb.entries] == [
        ("elf", "sm_90a"),
        ("ptx", "compute_90"),
        ("elf", "sm_90a"),
        ("ptx", "compute_90"),
        ("elf", "sm_80"),
    ]
    assert fb.kernels_by_arch() == {
        "sm_90a": {"add_one", "scale", "other_kernel"},
        "compute_90": {"add_one", "scale", "other_kernel"},
        "sm_80": {"add_one", "scale"},
    }
    for entry, (tu, _, arch, kind, _) in zip(fb.entries, IMAGES, strict=True):
        if kind == "elf":  # cubins are stored byte for byte
            cubin = built[f"{tu}.{arch}.{kind}"].read_bytes()
            assert fb.payload(entry)[: len(cubin)] == cubin


def test_fatbinary_compresses_ptx_unless_told_not_to(built: dict[str, Path]) -> None:
    compressed = [e.compressed for e in read_fatbin(built["combined_default"]).entries]
    assert compressed == [False, True, False, True, False]


def test_flags_name_arch_and_family_specific_builds(built: dict[str, Path]) -> None:
    data = bytearray(built["combined"].read_bytes())
    first, ptx = read_fatbin(bytes(data)).entries[:2]
    struct.pack_into("<Q", data, first.offset + 40, 0x200011)  # family-specific
    struct.pack_into("<Q", data, ptx.offset + 40, 0x100011)  # arch-specific
    assert read_fatbin(bytes(data)).archs()[:2] == ["sm_90f", "compute_90a"]


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is neither on PATH nor installed")
def test_cuobjdump_lists_the_same_images(built: dict[str, Path]) -> None:
    fb = read_fatbin(built["nvcc_plain"])
    for kind, option in (("elf", "--list-elf"), ("ptx", "--list-ptx")):
        listed = subprocess.run(
            [cuobjdump(), option, str(built["nvcc_plain"])], capture_output=True, text=True
        ).stdout
        lines = [line for line in listed.splitlines() if line.startswith(f"{kind.upper()} file")]
        assert len(lines) == sum(e.kind == kind for e in fb.entries)


# --- selecting and extracting the image for a device ----------------------------------------


@pytest.mark.parametrize(
    ("kernel", "device", "index"),
    [
        ("add_one", "sm_90", 0),  # exact SASS: the sm_90a cubin of TU k
        ("other_kernel", 90, 2),  # ... of TU b
        ("scale", "sm_80", 4),
        ("add_one", "sm_100", 1),  # no SASS: PTX compute_90 JIT-compiles forward
        ("other_kernel", "compute_120", 3),
    ],
)
def test_select_entry(built: dict[str, Path], kernel: str, device: str | int, index: int) -> None:
    fb = read_fatbin(built["combined"])
    assert select_entry(fb, kernel, device) == fb.entries[index]
    image = extract_image(built["combined"].read_bytes(), kernel, device)
    [entry] = read_fatbin(image).entries
    assert kernel in (entry.kernels or ())
    source = fb.entries[index]
    assert image[16:] == fb.data[source.offset : source.end]
    assert len(image) == 16 + source.end - source.offset


@pytest.mark.parametrize(
    ("kernel", "device", "message"),
    [
        ("other_kernel", "sm_80", "kernel 'other_kernel' can run on sm_80: it is in sm_90a"),
        ("add_one", "sm_86", "can run on sm_86"),  # SASS must match exactly; PTX 90 > 86
        ("missing", "sm_90", "kernel 'missing' can run on sm_90: it is in no entry"),
        ("add_one", "gfx90a", "cannot read a device arch from 'gfx90a'"),
    ],
)
def test_select_entry_errors(
    built: dict[str, Path], kernel: str, device: str, message: str
) -> None:
    with pytest.raises(FatbinError, match=re.escape(message)):
        select_entry(read_fatbin(built["combined"]), kernel, device)


def test_arch_specific_ptx_only_serves_its_own_device(built: dict[str, Path]) -> None:
    data = bytearray(built["combined"].read_bytes())
    fb = read_fatbin(bytes(data))
    struct.pack_into("<Q", data, fb.entries[3].offset + 40, 0x100011)  # b's PTX -> compute_90a
    only_ptx = read_fatbin(build_fatbin(bytes(data), [read_fatbin(bytes(data)).entries[3]]))
    assert select_entry(only_ptx, "other_kernel", "sm_90").arch == "compute_90a"
    with pytest.raises(FatbinError):
        select_entry(only_ptx, "other_kernel", "sm_100")


def test_compressed_ptx_is_unusable_without_a_decoder(built: dict[str, Path]) -> None:
    if HAVE_ZSTD:
        pytest.skip("zstandard is installed, so compressed PTX is readable")
    with pytest.raises(FatbinError, match="entries compute_90 could not be read"):
        select_entry(read_fatbin(built["combined_default"]), "other_kernel", "sm_100")


# --- damaged files ---------------------------------------------------------------------------


def test_truncation_anywhere_raises_fatbin_error(built: dict[str, Path]) -> None:
    data = built["combined"].read_bytes()
    for end in range(0, len(data), 97):
        with pytest.raises(FatbinError, match=r"^offset \d+: "):
            read_fatbin(data[:end])


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (0, "<I", 0x12345678, "offset 0: expected fatbin magic 0xba55ed50, found 0x12345678"),
        (8, "<Q", 1 << 40, "offset 8: header and payload sizes give"),
        (16 + 4, "<I", 8, "offset 20: entry header size 8 is below 64"),
        (16 + 8, "<Q", 1 << 62, "offset 24: entry #0 (64-byte header, 4611686018427387904-byte"),
        (
            16 + 64 + 0x28,
            "<Q",
            1 << 30,
            "offset 1073741904: expected 17 ELF section headers (1088 bytes) inside the cubin",
        ),
    ],
)
def test_damaged_fields_are_reported_with_their_offset(
    built: dict[str, Path], offset: int, fmt: str, value: int, message: str
) -> None:
    data = bytearray(built["nvcc_plain"].read_bytes())
    struct.pack_into(fmt, data, offset, value)
    with pytest.raises(FatbinError, match=re.escape(message)):
        read_fatbin(bytes(data))


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_fuzz_only_fatbin_error(built: dict[str, Path], data: st.DataObject) -> None:
    sample = bytearray(built["combined"].read_bytes())
    # Mostly the headers and the first cubin's ELF header and section table, where parsing lives.
    hot = [0, 16, 80, 80 + 0x28, 0x4000 - 64, len(sample) - 64]
    for _ in range(data.draw(st.integers(1, 6))):
        base = data.draw(st.sampled_from(hot))
        at = min(len(sample) - 8, base + data.draw(st.integers(0, 200)))
        fmt = data.draw(st.sampled_from(["B", "<H", "<I", "<Q"]))
        bound = (1 << (8 * struct.calcsize(fmt))) - 1
        struct.pack_into(
            fmt, sample, at, data.draw(st.one_of(st.integers(0, min(256, bound)), st.just(bound)))
        )
    if data.draw(st.booleans()):
        sample = sample[: data.draw(st.integers(0, len(sample)))]
    try:
        fb = read_fatbin(bytes(sample))
    except FatbinError as e:
        assert str(e).startswith("offset "), str(e)
        return
    for entry in fb.entries:
        for kernel in entry.kernels or ():
            try:
                read_fatbin(extract_image(fb, kernel, entry.sm))
            except FatbinError as e:
                assert "can run on" in str(e)


# --- inspect ---------------------------------------------------------------------------------


def test_inspect_fatbin_is_json_ready_and_renders(built: dict[str, Path]) -> None:
    data = inspect_file(built["combined"])
    assert json.loads(json.dumps(data)) == data
    assert data["format"] == "fatbin"
    assert [(e["kind"], e["arch"], e["compressed"]) for e in data["entries"]][:2] == [
        ("elf", "sm_90a", False),
        ("ptx", "compute_90", False),
    ]
    assert data["kernels_by_arch"]["sm_80"] == ["add_one", "scale"]
    text = render_inspection(data)
    assert f"CUDA fatbin, {len(built['combined'].read_bytes()):,} bytes, 5 entries" in text
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    assert [r[:3] for r in rows][-1] == ["4", "elf", "sm_80"]
    assert rows[-1][-2:] == ["add_one,", "scale"]
    first = data["entries"][0]["resources"]
    assert set(first) == {"add_one", "scale"} and data["entries"][1]["resources"] is None
    assert first["scale"]["registers"] > 0
    assert "#0 sm_90a: per thread; the stack holds calls' frames and spills" in text
    assert any(
        line.split()[:2] == ["scale", str(first["scale"]["registers"])]
        for line in text.splitlines()
    )


def test_cubin_resources_are_cuobjdumps(built: dict[str, Path]) -> None:
    if cuobjdump() is None:
        pytest.skip("cuobjdump is neither on PATH nor installed")
    fb = read_fatbin(built["nvcc_plain"])
    ours = {
        e.arch: {name: (r.registers, r.stack) for name, r in e.resources.items()}
        for e in fb.entries
        if e.kind == "elf"
    }
    theirs = cuobjdump_resources(built["nvcc_plain"])
    assert set(ours) == {"sm_80", "sm_90a"}
    for arch, kernels in ours.items():
        assert set(kernels) == {"add_one", "scale"}  # entries only, not `helper`
        assert kernels == {name: theirs[arch][name] for name in kernels}
    assert fb.entries[2].resources is None  # PTX


def test_damaged_nv_info_is_a_fatbin_error(built: dict[str, Path]) -> None:
    data = bytearray(built["combined"].read_bytes())
    record = data.find(b"\x04\x2f\x08\x00")  # EIATTR_REGCOUNT, 8 bytes
    assert record > 0
    data[record + 2 : record + 4] = b"\xff\xff"
    with pytest.raises(FatbinError, match=r"\.nv\.info record of 65535 bytes runs past it"):
        read_fatbin(bytes(data))


def test_inspect_marks_unreadable_compressed_entries(built: dict[str, Path]) -> None:
    data = inspect_file(built["combined_default"])
    ptx = data["entries"][1]
    assert ptx["compressed"] and ptx["uncompressed_size"] > ptx["size"]
    if not HAVE_ZSTD:
        assert ptx["kernels"] is None
        assert "(compressed, unreadable here)" in render_inspection(data)
