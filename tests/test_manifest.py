"""Manifest validation: every error names the file, line and key, the bad value and the choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from aotc.errors import ManifestError
from aotc.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]

VALID = """
library: extra_sdpa
targets:
  metal: {sdk: macosx, deployment_target: "14.0", std: metal3.1}
  cuda: {archs: [sm_80, sm_90a], ptx: compute_90}
kernels:
  - family: sdpa_vector
    dtypes: [float16, bfloat16]
    head_dims: [[192, 128], [576, 512], 64]
"""


def error_of(write_manifest, text: str) -> ManifestError:
    path = write_manifest(text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return info.value


def test_valid_manifest_expands_every_instantiation(write_manifest):
    manifest = load_manifest(write_manifest(VALID))
    assert manifest.library == "extra_sdpa"
    assert list(manifest.targets) == ["metal", "cuda"]
    labels = {inst.label for inst in manifest.instantiations}
    assert labels == {
        f"sdpa_vector {dtype} D={d} V={v}"
        for dtype in ("float16", "bfloat16")
        for d, v in ((192, 128), (576, 512), (64, 64))
    }
    assert manifest.warnings == ()


def test_repository_example_manifest_is_valid():
    manifest = load_manifest(REPO / "manifest.yaml")
    pairs = {(i.param("D"), i.param("V")) for i in manifest.instantiations}
    assert (576, 512) in pairs and (192, 128) in pairs


@pytest.mark.parametrize(
    ("text", "line", "key", "fragments"),
    [
        (
            VALID.replace("family: sdpa_vector", "family: sdpa_matrix"),
            6,
            "kernels[0].family",
            ["unknown family 'sdpa_matrix'", "allowed: sdpa_vector"],
        ),
        (
            VALID.replace("[float16, bfloat16]", "[float16, float8]"),
            7,
            "kernels[0].dtypes[1]",
            ["unknown dtype 'float8'", "float16, bfloat16, float32"],
        ),
        (
            VALID.replace("    head_dims:", "    head_dim: [[64, 64]]\n    head_dims:"),
            8,
            "kernels[0].head_dim",
            ["unknown key 'head_dim'", "allowed: family, dtypes, targets, head_dims"],
        ),
        (
            VALID.replace("  cuda: {", "  rocm: {"),
            4,
            "targets.rocm",
            ["unknown target 'rocm'", "allowed: metal, cuda"],
        ),
        (
            VALID.replace("[576, 512]", "[80, 80]"),
            8,
            "kernels[0].head_dims[1]",
            ["D=80 cannot be built for metal", "multiples of 32", "[80, 80]"],
        ),
        (
            VALID.replace("archs: [sm_80, sm_90a]", "archs: [sm_80, hopper]"),
            4,
            "targets.cuda.archs[1]",
            ["'hopper' is not an architecture like sm_90a"],
        ),
        (
            VALID.replace("sdk: macosx", "sdk: windows"),
            3,
            "targets.metal.sdk",
            ["unknown Metal SDK 'windows'", "macosx"],
        ),
        (
            VALID.replace("[float16, bfloat16]", "[]"),
            7,
            "kernels[0].dtypes",
            ["must not be an empty list"],
        ),
        (
            VALID.replace("[[192, 128], [576, 512], 64]", "[]"),
            8,
            "kernels[0].head_dims",
            ["must not be an empty list"],
        ),
        (
            VALID.replace("library: extra_sdpa", "library: ../evil"),
            1,
            "library",
            ["'../evil' is not a safe file name"],
        ),
        (
            VALID.replace("library: extra_sdpa", "library: !!python/object/apply:os.system [ls]"),
            1,
            "library",
            ["YAML tag", "is not allowed"],
        ),
        (
            VALID.replace("    dtypes: [float16, bfloat16]\n", ""),
            6,
            "kernels[0]",
            ["missing required key 'dtypes'"],
        ),
        (
            VALID.replace("[192, 128]", "[192, 128, 64]"),
            8,
            "kernels[0].head_dims[0]",
            ["expected a [D, V] pair, got 3 values"],
        ),
        (
            VALID + "library: again\n",
            9,
            "library",
            ["duplicate key 'library'"],
        ),
        (
            VALID.replace("kernels:", "kernels: [\n"),
            None,
            "",
            ["invalid YAML"],
        ),
    ],
    ids=[
        "unknown-family",
        "unknown-dtype",
        "unknown-key",
        "unknown-target",
        "pair-not-buildable-on-metal",
        "bad-cuda-arch",
        "bad-metal-sdk",
        "empty-dtypes",
        "empty-head-dims",
        "unsafe-library-name",
        "yaml-tag",
        "missing-key",
        "malformed-pair",
        "duplicate-key",
        "syntax-error",
    ],
)
def test_errors_point_at_the_bad_node(write_manifest, text, line, key, fragments):
    error = error_of(write_manifest, text)
    assert error.location is not None
    assert error.location.path.name == "manifest.yaml"
    if line is not None:
        assert error.location.line == line
    assert error.location.key == key
    for fragment in fragments:
        assert fragment in str(error)
    assert str(error).startswith(f"{error.location.path}:{error.location.line}")


def test_entry_targets_allow_a_cuda_only_head_dim(write_manifest):
    text = VALID + "  - family: sdpa_vector\n    dtypes: [float16]\n    head_dims: [80]\n"
    text += "    targets: [cuda]\n"
    manifest = load_manifest(write_manifest(text))
    assert [i.label for i in manifest.for_target("cuda") if i.param("D") == 80] == [
        "sdpa_vector float16 D=80 V=80"
    ]
    assert not [i for i in manifest.for_target("metal") if i.param("D") == 80]


def test_duplicates_are_merged_with_a_warning(write_manifest):
    text = VALID.replace("[[192, 128], [576, 512], 64]", "[[192, 128], [64, 64], 64]")
    manifest = load_manifest(write_manifest(text))
    assert len(manifest.instantiations) == 4
    assert len(manifest.warnings) == 2
    assert "manifest.yaml:8: kernels[0].head_dims[2]" in manifest.warnings[0]
    assert "repeats" in manifest.warnings[0] and "merged" in manifest.warnings[0]


@pytest.mark.parametrize(
    ("cuda", "warned"),
    [
        ("{archs: [sm_80, sm_90a], ptx: compute_90}", "sm_80"),
        ("{archs: [sm_90a], ptx: compute_80}", "compute_80"),
        ("{archs: [sm_86, sm_80], ptx: null}", "sm_86, sm_80"),
        ("{archs: [sm_90a], ptx: compute_90}", None),
    ],
)
def test_instantiations_no_block_of_an_arch_holds_are_warned(write_manifest, cuda, warned):
    """fp32 576/512 needs 182976 bytes of shared memory a block: over sm_8x's 166912, within
    sm_90's. It still builds (sm_90 runs it); on sm_8x its calls fall back to MLX."""
    text = VALID.replace("{archs: [sm_80, sm_90a], ptx: compute_90}", cuda)
    text = text.replace("dtypes: [float16, bfloat16]", "dtypes: [float32, bfloat16]")
    manifest = load_manifest(write_manifest(text))
    assert "sdpa_vector float32 D=576 V=512" in {i.label for i in manifest.instantiations}
    if warned is None:
        assert manifest.warnings == ()
        return
    (warning,) = manifest.warnings
    assert "manifest.yaml:8: kernels[0].head_dims[1]: float32" in warning, warning
    assert f"float32 D=576 V=512 cannot run on {warned}: a block needs 182976 bytes" in warning
    assert "166912" in warning and "fall back to MLX" in warning


def test_missing_targets_means_every_target_with_defaults(write_manifest):
    text = "library: x\nkernels:\n  - {family: sdpa_vector, dtypes: [float32], head_dims: [64]}\n"
    manifest = load_manifest(write_manifest(text))
    assert set(manifest.targets) == {"metal", "cuda"}
