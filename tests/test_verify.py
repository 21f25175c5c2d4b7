"""`aotc verify` on a real CUDA build and on Apple's own mlx.metallib, one exit code per fault."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aotc.artifact import make_index, publish
from aotc.build import build_target
from aotc.codegen import translation_units
from aotc.formats.metallib import read_metallib
from aotc.manifest import load_manifest
from aotc.mlx_info import mlx_version
from aotc.verify import Verdict, installed_header_digest

from ._downloads import wheel_file
from .conftest import needs_nvcc

CUDA_MANIFEST = """
library: tiny
targets:
  cuda: {archs: [sm_90a], ptx: null}
kernels:
  - family: sdpa_vector
    dtypes: [float16]
    head_dims: [[192, 128]]
"""
# MLX's own pairs: Apple's mlx.metallib must hold every name aotc generates for them.
MLX_PAIRS = [
    [64, 64],
    [96, 64],
    [96, 96],
    [128, 128],
    [192, 128],
    [192, 192],
    [256, 256],
    [512, 512],
]
METAL_MANIFEST = f"""
library: mlx
targets:
  metal: {{sdk: macosx, deployment_target: "14.0", std: metal3.1}}
kernels:
  - family: sdpa_vector
    dtypes: [float16, bfloat16, float32]
    head_dims: {MLX_PAIRS}
"""


def run_verify(manifest: Path, dist: Path) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "aotc", "verify", str(manifest), "--dist", str(dist), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, json.loads(done.stdout)


def messages(report: dict) -> str:
    return " ".join(p["message"] for t in report["targets"] for p in t["problems"])


@pytest.fixture(scope="module")
def cuda_dist(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    root = tmp_path_factory.mktemp("verify")
    manifest = root / "manifest.yaml"
    manifest.write_text(CUDA_MANIFEST)
    build_target(load_manifest(manifest), "cuda", out_dir=root / "dist", build_dir=root / "build")
    return manifest, root / "dist"


@pytest.fixture
def cuda_copy(cuda_dist, tmp_path) -> tuple[Path, Path]:
    manifest, dist = cuda_dist
    shutil.copytree(dist, tmp_path / "dist")
    return manifest, tmp_path / "dist"


@needs_nvcc
def test_cuda_build_verifies(cuda_copy):
    code, report = run_verify(*cuda_copy)
    assert code == Verdict.OK, report
    # one pass, split pass, fused split pass (one m-tile, then 2 or 4), wgmma split pass (two
    # deep, one deep), combine
    assert report["targets"][0]["kernels_checked"] == 9


@needs_nvcc
def test_missing_instantiation(cuda_copy, tmp_path):
    manifest, dist = cuda_copy
    grown = tmp_path / "grown.yaml"
    grown.write_text(manifest.read_text().replace("[[192, 128]]", "[[192, 128], [256, 128]]"))
    code, report = run_verify(grown, dist)
    assert code == Verdict.MISSING_KERNELS
    assert "not in the artifact: sdpa_vector_2pass_1_float16_t_256_128" in messages(report)


@needs_nvcc
def test_flipped_byte_in_the_fatbin(cuda_copy):
    manifest, dist = cuda_copy
    fatbin = dist / "tiny.fatbin"
    data = bytearray(fatbin.read_bytes())
    data[len(data) // 2] ^= 0xFF
    fatbin.write_bytes(bytes(data))
    code, report = run_verify(manifest, dist)
    assert code == Verdict.CHECKSUM_MISMATCH
    assert "tiny.fatbin has sha256" in messages(report)


@needs_nvcc
def test_mlx_version_mismatch(cuda_copy):
    manifest, dist = cuda_copy
    index_path = dist / "tiny.cuda.json"
    index = json.loads(index_path.read_text())
    index["mlx"]["version"] = "0.31.0"
    index_path.write_text(json.dumps(index))
    code, report = run_verify(manifest, dist)
    assert code == Verdict.MLX_MISMATCH
    assert f"built for MLX 0.31.0, installed is {mlx_version()}" in messages(report)


@needs_nvcc
def test_not_built(cuda_copy):
    manifest, dist = cuda_copy
    (dist / "tiny.cuda.json").unlink()
    code, _ = run_verify(manifest, dist)
    assert code == Verdict.NOT_BUILT


@pytest.fixture(scope="module")
def mlx_metallib() -> Path:
    path = wheel_file("mlx-metal", "0.32.4", "mlx/lib/mlx.metallib")
    if path is None:
        pytest.skip("the mlx-metal 0.32.4 macOS wheel could not be downloaded (offline?)")
    return path


def test_aotc_names_for_mlx_pairs_are_in_apples_mlx_metallib(mlx_metallib, write_manifest):
    manifest = load_manifest(write_manifest(METAL_MANIFEST))
    names = {k.name for unit in translation_units(manifest, "metal") for k in unit.kernels}
    assert len(names) == 3 * (2 * len(MLX_PAIRS) + 6)  # 2 per pair, 1 combine per (type, V)
    present = {function.name for function in read_metallib(mlx_metallib).functions}
    assert names <= present


@pytest.fixture
def metal_dist(mlx_metallib, write_manifest, tmp_path) -> tuple[Path, Path]:
    """Apple's mlx.metallib laid out as an aotc library `mlx`, indexed as `aotc build` would."""
    manifest = load_manifest(write_manifest(METAL_MANIFEST))
    staged = tmp_path / "staged" / "mlx.metallib"
    staged.parent.mkdir()
    shutil.copyfile(mlx_metallib, staged)
    kernels = [k.to_json() for unit in translation_units(manifest, "metal") for k in unit.kernels]
    index = make_index(
        library="mlx",
        target="metal",
        artifact=staged,
        kernels=kernels,
        options=manifest.targets["metal"].to_json(),
        toolchain={"name": "xcrun metal", "version": "Apple's"},
        flags=manifest.targets["metal"].compile_flags(),
        mlx_version=mlx_version(),
        headers_sha256={"mlx": installed_header_digest({"sdpa_vector"}, "metal")},
    )
    publish(staged, index, tmp_path / "dist")
    return manifest.path, tmp_path / "dist"


def test_apple_metallib_verifies_and_a_flipped_module_byte_is_caught(metal_dist):
    manifest, dist = metal_dist
    code, report = run_verify(manifest, dist)
    assert code == Verdict.OK, messages(report)

    library = dist / "mlx.metallib"
    function = read_metallib(library).function("sdpa_vector_float16_t_192_128")
    data = bytearray(library.read_bytes())
    data[function.module_offset + function.module_size // 2] ^= 0x01
    library.write_bytes(bytes(data))
    index_path = dist / "mlx.metal.json"
    index = json.loads(index_path.read_text())
    index["artifact"]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    index_path.write_text(json.dumps(index))  # the index agrees: only the module hash can tell
    code, report = run_verify(manifest, dist)
    assert code == Verdict.CORRUPT
    assert "sdpa_vector_float16_t_192_128" in messages(report)


def test_wrong_checksum_in_the_index(metal_dist):
    manifest, dist = metal_dist
    index_path = dist / "mlx.metal.json"
    index = json.loads(index_path.read_text())
    index["artifact"]["sha256"] = "0" * 64
    index_path.write_text(json.dumps(index))
    code, report = run_verify(manifest, dist)
    assert code == Verdict.CHECKSUM_MISMATCH
    assert "the index says 0000000000000000" in messages(report)


def test_minimum_os_mismatch(metal_dist, tmp_path):
    manifest, dist = metal_dist
    newer = tmp_path / "newer.yaml"
    newer.write_text(manifest.read_text().replace('"14.0"', '"15.0"'))
    code, report = run_verify(newer, dist)
    assert code == Verdict.TARGET_MISMATCH
    assert "minimum OS 14.0.0, manifest wants 15.0" in messages(report)
