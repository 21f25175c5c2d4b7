"""Generated sources and build trees: golden files, incremental writes, exact Metal commands."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from aotc.build import configure, ninja_commands
from aotc.codegen import TREE_FILE, generate
from aotc.manifest import load_manifest
from aotc.mlx_info import mlx_include_dir

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = """
library: extra_sdpa
targets:
  metal: {sdk: macosx, deployment_target: "14.0", std: metal3.1}
  cuda: {archs: [sm_80, sm_90a], ptx: compute_90}
kernels:
  - family: sdpa_vector
    dtypes: [float16, bfloat16]
    head_dims: [[576, 512], [192, 128], [256, 128]]
"""


@pytest.fixture
def manifest(write_manifest):
    return load_manifest(write_manifest(MANIFEST))


@pytest.mark.parametrize(
    ("target", "name"),
    [
        ("metal", "sdpa_vector_float16_t_576_512.metal"),
        ("metal", "sdpa_vector_2pass_2_bfloat16_t_128.metal"),
        ("cuda", "sdpa_vector_float16_t_576_512.cu"),
        ("cuda", "sdpa_vector_2pass_2_bfloat16_t_128.cu"),
    ],
)
def test_generated_sources_match_golden_files(manifest, tmp_path, target, name):
    tree = generate(manifest, target, tmp_path / "build")
    generated = (tree.root / "src" / name).read_text()
    golden = GOLDEN / target / name
    if os.environ.get("AOTC_UPDATE_GOLDEN"):
        golden.write_text(generated)
    assert generated == golden.read_text()


def test_one_unit_per_pair_and_one_combine_per_type_and_value_dim(manifest, tmp_path):
    tree = generate(manifest, "metal", tmp_path / "build")
    stems = sorted(unit.stem for unit in tree.units)
    pairs = [
        f"sdpa_vector_{t}_{d}_{v}"
        for t in ("float16_t", "bfloat16_t")
        for d, v in ((576, 512), (192, 128), (256, 128))
    ]
    combines = [
        f"sdpa_vector_2pass_2_{t}_{v}" for t in ("float16_t", "bfloat16_t") for v in (512, 128)
    ]
    assert stems == sorted(pairs + combines)
    names = {kernel.name for kernel in tree.kernels}
    assert "sdpa_vector_2pass_1_bfloat16_t_256_128" in names
    # 192/128 and 256/128 share V=128: one combine kernel serves both.
    combine = next(u for u in tree.units if u.stem == "sdpa_vector_2pass_2_float16_t_128")
    assert [o.key for o in combine.origins] == [
        "kernels[0].head_dims[1]",
        "kernels[0].head_dims[2]",
    ]


def test_tree_is_self_contained_and_rewritten_only_on_change(manifest, tmp_path, write_manifest):
    tree = generate(manifest, "metal", tmp_path / "build")
    include = tree.root / "include" / "mlx/backend/metal/kernels"
    for header in ("utils.h", "sdpa_vector.h", "bf16.h", "defines.h", "complex.h"):
        assert (include / header).read_bytes() == (
            mlx_include_dir() / "mlx/backend/metal/kernels" / header
        ).read_bytes()
    described = json.loads((tree.root / TREE_FILE).read_text())
    assert described["headers_sha256"]["mlx"] == tree.headers_sha256["mlx"]

    again = generate(manifest, "metal", tmp_path / "build")
    assert again.written == ()

    grown = load_manifest(
        write_manifest(MANIFEST.replace("[256, 128]]", "[256, 128], [320, 256]]"))
    )
    third = generate(grown, "metal", tmp_path / "build")
    changed = sorted(p.relative_to(tree.root).as_posix() for p in third.written)
    assert changed == [
        "CMakeLists.txt",
        TREE_FILE,
        "src/sdpa_vector_2pass_2_bfloat16_t_256.metal",
        "src/sdpa_vector_2pass_2_float16_t_256.metal",
        "src/sdpa_vector_bfloat16_t_320_256.metal",
        "src/sdpa_vector_float16_t_320_256.metal",
    ]

    shrunk = generate(manifest, "metal", tmp_path / "build")
    assert not (tree.root / "src/sdpa_vector_float16_t_320_256.metal").exists()
    assert len(list((tree.root / "src").iterdir())) == len(shrunk.units)


def test_metal_build_runs_exactly_these_xcrun_commands(manifest, tmp_path):
    tree = generate(manifest, "metal", tmp_path / "build")
    configure(tree)
    lines = ninja_commands(tree)
    compiles = [shlex.split(line.split(" && ", 1)[1]) for line in lines if " -c " in line]
    assert len(compiles) == len(tree.units)
    for argv, unit in zip(compiles, tree.units, strict=True):
        assert argv[:4] == ["xcrun", "-sdk", "macosx", "metal"]
        assert argv[argv.index("-c") + 1] == str(tree.root / "src" / f"{unit.stem}.metal")
        assert argv[argv.index("-o") + 1] == str(tree.binary_dir / "air" / f"{unit.stem}.air")
        for flag in (
            "-std=metal3.1",
            "-mmacosx-version-min=14.0",
            f"-I{tree.root / 'include'}",
            "-Wall",
            "-Wextra",
            "-fno-fast-math",
        ):
            assert flag in argv, flag
    link = shlex.split(lines[-1].split(" && ", 1)[1])
    assert link[:4] == ["xcrun", "-sdk", "macosx", "metallib"]
    assert link[4:-2] == [str(tree.binary_dir / "air" / f"{u.stem}.air") for u in tree.units]
    assert link[-2:] == ["-o", str(tree.binary_dir / "extra_sdpa.metallib")]


def test_metal_options_reach_every_command(write_manifest, tmp_path):
    text = MANIFEST.replace(
        'deployment_target: "14.0", std: metal3.1', 'deployment_target: "15.0", std: metal3.2'
    )
    tree = generate(load_manifest(write_manifest(text)), "metal", tmp_path / "build")
    configure(tree)
    compiles = [line for line in ninja_commands(tree) if " -c " in line]
    assert all("-mmacosx-version-min=15.0" in line and "-std=metal3.2" in line for line in compiles)
