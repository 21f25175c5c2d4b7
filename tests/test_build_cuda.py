"""The CUDA build for real: nvcc, nvlink, fatbinary through CMake + Ninja."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aotc.artifact import read_index, sha256_file
from aotc.build import build_target
from aotc.errors import BuildFailed
from aotc.families.base import kernels_dir
from aotc.families.sdpa_vector.cuda import WGMMA_THREADS, blocks_per_sm_cap, kernel_config
from aotc.formats.fatbin import read_fatbin
from aotc.manifest import load_manifest

from .conftest import cuobjdump, cuobjdump_resources, needs_nvcc

pytestmark = [needs_nvcc, pytest.mark.slow]

SMALL = """
library: tiny_sdpa
targets:
  cuda: {archs: [sm_90a], ptx: null}
kernels:
  - family: sdpa_vector
    dtypes: [float16]
    head_dims: [[192, 128]]
"""


def build(path: Path, tmp_path: Path):
    return build_target(
        load_manifest(path), "cuda", out_dir=tmp_path / "dist", build_dir=tmp_path / "build", jobs=2
    )


def compiled(result) -> list[str]:
    return sorted(step for step in result.compiled if step.startswith("compiling"))


def test_build_is_incremental_and_publishes_an_exact_index(write_manifest, tmp_path):
    path = write_manifest(SMALL)
    first = build(path, tmp_path)
    assert compiled(first) == [
        "compiling sdpa_vector_2pass_2_float16_t_128 for sm_90a",
        "compiling sdpa_vector_float16_t_192_128 for sm_90a",
    ]
    index = read_index(first.index)
    names = {"sdpa_vector_float16_t_192_128", "sdpa_vector_2pass_1_float16_t_192_128"}
    names |= {"sdpa_vector_wgmma_float16_t_192_128", "sdpa_vector_2pass_2_float16_t_128"}
    names |= {"sdpa_vector_2pass_fused_float16_t_192_128"}
    names |= {n.replace("sdpa_vector_", "sdpa_vector_rows_") for n in names if "_192_" in n}
    names -= {"sdpa_vector_rows_wgmma_float16_t_192_128"}
    names |= {"sdpa_vector_wgmma_short_float16_t_192_128"}
    assert index.kernel_names == names
    assert index.data["artifact"]["sha256"] == sha256_file(first.artifact)
    assert index.data["toolchain"]["name"] == "nvcc"
    assert index.data["options"] == {"archs": ["sm_90a"], "ptx": None}
    fatbin = read_fatbin(first.artifact.read_bytes())
    assert fatbin.archs() == ["sm_90a"]
    assert fatbin.kernels() == names

    again = build(path, tmp_path)
    assert again.compiled == ()
    assert not again.published

    grown = write_manifest(SMALL.replace("[[192, 128]]", "[[192, 128], [256, 128]]"))
    third = build(grown, tmp_path)
    assert compiled(third) == ["compiling sdpa_vector_float16_t_256_128 for sm_90a"]
    assert any(step.startswith("linking") for step in third.compiled)
    assert (
        "sdpa_vector_2pass_1_float16_t_256_128"
        in read_fatbin(third.artifact.read_bytes()).kernels()
    )


def test_broken_kernel_fails_with_the_compiler_message_and_keeps_artifacts(
    write_manifest, tmp_path, monkeypatch
):
    path = write_manifest(SMALL)
    good = build(path, tmp_path)
    before = {p.name: p.read_bytes() for p in (good.artifact, good.index)}

    broken = tmp_path / "kernels"
    shutil.copytree(kernels_dir(), broken)
    header = broken / "cuda" / "sdpa_vector.cuh"
    header.write_text(header.read_text() + '\nstatic_assert(false, "planted by the test");\n')
    monkeypatch.setenv("AOTC_KERNELS_DIR", str(broken))
    with pytest.raises(BuildFailed) as info:
        build(path, tmp_path)
    message = str(info.value)
    assert "planted by the test" in message
    assert (
        "compiling sdpa_vector_" in message
        and "manifest.yaml:7: kernels[0].head_dims[0]" in message
    )
    after = {p.name: p.read_bytes() for p in (good.artifact, good.index)}
    assert after == before


def test_cli_builds_and_skips_metal_with_a_reason(write_manifest, tmp_path):
    path = write_manifest(
        SMALL.replace("targets:\n", 'targets:\n  metal: {deployment_target: "14.0"}\n')
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aotc",
            "build",
            str(path),
            "--out",
            str(tmp_path / "dist"),
            "--build-dir",
            str(tmp_path / "build"),
            "-j",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "skipping metal" in done.stderr and "xcrun" in done.stderr
    assert (
        "[1/" in done.stderr and "compiling sdpa_vector_float16_t_192_128 for sm_90a" in done.stderr
    )
    index = json.loads((tmp_path / "dist" / "tiny_sdpa.cuda.json").read_text())
    # one pass, split pass, fused split pass (one m-tile, then 2 or 4), wgmma split pass (two
    # deep, one deep), combine
    assert len(index["kernels"]) == 9

    named = subprocess.run(
        [sys.executable, "-m", "aotc", "build", str(path), "--target", "metal"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert named.returncode == 3
    assert "aotc generate" in named.stderr


def run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aotc", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_interrupted_build_leaves_previous_artifacts(write_manifest, tmp_path):
    path = write_manifest(SMALL)
    good = build(path, tmp_path)
    before = {p: p.read_bytes() for p in (good.artifact, good.index)}
    grown = write_manifest(SMALL.replace("[[192, 128]]", "[[192, 128], [256, 128]]"), "grown.yaml")
    args = [
        "build",
        str(grown),
        "--out",
        str(tmp_path / "dist"),
        "--build-dir",
        str(tmp_path / "build"),
    ]
    proc = run_cli(args, tmp_path)
    assert proc.stderr is not None
    for line in proc.stderr:  # interrupt while the new unit compiles
        if "compiling" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert {p: p.read_bytes() for p in before} == before
    assert not list((tmp_path / "dist").glob(".*.tmp"))


def test_concurrent_builds_of_one_tree_both_succeed(write_manifest, tmp_path):
    path = write_manifest(SMALL)
    args = [
        "build",
        str(path),
        "--out",
        str(tmp_path / "dist"),
        "--build-dir",
        str(tmp_path / "build"),
    ]
    procs = [run_cli(args, tmp_path) for _ in range(2)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    index = read_index(tmp_path / "dist" / "tiny_sdpa.cuda.json")
    assert sha256_file(index.artifact_path) == index.data["artifact"]["sha256"]
    # The second build waited for the first and found nothing left to compile.
    assert sorted("(0 units compiled)" in out for out, _ in outputs) == [False, True]


def entry_kernels_by_arch(fatbin: Path) -> dict[str, set[str]]:
    """What NVIDIA's cuobjdump lists: the entry (kernel) symbols of each SASS image."""
    listing = subprocess.run(
        [cuobjdump(), "-symbols", str(fatbin)], capture_output=True, text=True, check=True
    ).stdout
    kernels: dict[str, set[str]] = {}
    arch = None
    for line in listing.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
            kernels.setdefault(arch, set())
        elif arch and line.split()[:4] == ["FUNC", "GLOBAL", "DEFAULT", "ENTRY"]:
            kernels[arch].add(line.split()[-1])
    return kernels


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is neither on PATH nor installed")
def test_cuobjdump_sees_exactly_the_indexed_kernels_for_every_arch(write_manifest, tmp_path):
    path = write_manifest(SMALL.replace("archs: [sm_90a]", "archs: [sm_80, sm_90a]"))
    result = build(path, tmp_path)
    names = read_index(result.index).kernel_names
    assert entry_kernels_by_arch(result.artifact) == {"sm_80": names, "sm_90a": names}


def resource_usage(fatbin: Path) -> dict[str, tuple[int, int]]:
    """(registers, stack bytes) per kernel of a one-arch fatbin, by aotc's reader."""
    (entry,) = (e for e in read_fatbin(fatbin).entries if e.kind == "elf")
    return {name: (use.registers, use.stack) for name, use in entry.resources.items()}


def test_shipped_kernels_fit_the_plans_blocks_per_sm_without_spills(write_manifest, tmp_path):
    # Relocatable device code (needed to nvlink the units) made ptxas call the out-of-line
    # loaders by the ABI: the 128/128 kernels went to the 168-register cap with 40-64 bytes of
    # stack spills, and ran 3-8% slower through MLX than the same code built whole (round 18).
    # Internal linkage keeps them at the loaders' 16-byte call frame; the 2- and 4-m-tile
    # kernels, capped for two blocks per SM, no longer spill either (round 19).
    path = write_manifest(SMALL.replace("float16", "bfloat16").replace("[192, 128]", "[128, 128]"))
    usage = resource_usage(build(path, tmp_path).artifact)
    cfg = kernel_config("bfloat16", 128, 128)
    attention = {
        name: use
        for name, use in usage.items()
        if "_2pass_2_" not in name and "_wgmma_" not in name
    }
    assert len(attention) == 6, usage
    for name, (registers, stack) in attention.items():
        blocks = blocks_per_sm_cap(cfg, 2 if "_rows_" in name else 1)
        # Registers go to a warp in steps of 8 per thread; waiting combiners need the blocks
        # the plan counts to be resident together.
        assert -(-registers // 8) * 8 * cfg.threads * blocks <= 65536, (name, registers)
        assert stack <= 16, (name, registers, stack)
    # The wgmma entry points: no stack; the dual one fits two 384-thread blocks an SM.
    wgmma = {name: use for name, use in usage.items() if "_wgmma_" in name}
    assert len(wgmma) == 3, usage
    for name, (registers, stack) in wgmma.items():
        blocks = 2 if "_wgmma_dual_" in name else 1
        assert -(-registers // 8) * 8 * WGMMA_THREADS * blocks <= 65536, (name, registers)
        assert stack == 0, (name, registers, stack)


@pytest.mark.skipif(cuobjdump() is None, reason="cuobjdump is neither on PATH nor installed")
def test_bench_harness_compiles_the_shipped_kernels(write_manifest, tmp_path):
    # The benchmarks time the harness's modules; they must be the SASS a library ships. Both
    # sides are read by aotc's fatbin reader, checked against NVIDIA's cuobjdump on the library.
    from bench.build_harness import build_fatbin

    path = write_manifest(SMALL.replace("float16", "bfloat16").replace("[192, 128]", "[128, 128]"))
    library = build(path, tmp_path).artifact
    shipped = resource_usage(library)
    (theirs,) = cuobjdump_resources(library).values()
    assert shipped == {name: theirs[name] for name in shipped}
    listing = build_fatbin([(128, 128)], ["bfloat16"], out_dir=tmp_path / "harness", jobs=2)
    harness = {}
    for module in listing.read_text().split():
        harness.update(resource_usage(listing.parent / module))
    assert len(shipped) >= 4 and set(shipped) <= set(harness)
    assert {name: harness[name] for name in shipped} == shipped


def test_harness_images_decide_the_arch_it_plans_for(tmp_path):
    """A harness built as PTX for compute_80 runs the sm_80 image's source paths on sm_80 and
    newer GPUs (the driver compiles it at load) and is planned for sm_80; an sm_90a build runs
    its own SASS on an sm_90 GPU only."""
    from bench.build_harness import build_fatbin, image_arch, plan_arch

    def modules(archs: tuple[str, ...]) -> list[bytes]:
        out = tmp_path / archs[0]
        listing = build_fatbin([(128, 128)], ["bfloat16"], archs=archs, out_dir=out, jobs=2)
        return [(listing.parent / name).read_bytes() for name in listing.read_text().split()]

    ptx = modules(("compute_80",))
    assert image_arch(ptx, 90) == image_arch(ptx, 80) == "compute_80"
    assert plan_arch("compute_80") == "sm_80"
    with pytest.raises(RuntimeError, match="no image for sm_75"):
        image_arch(ptx, 75)
    sass = modules(("sm_90a",))
    assert image_arch(sass, 90) == "sm_90a" and plan_arch("sm_90a") == "sm_90"
    with pytest.raises(RuntimeError, match="no image for sm_80"):
        image_arch(sass, 80)
