"""The shipping path on the GPU: a wheel of dist/'s CUDA artifacts, installed into a fresh venv,
found through its entry point, runs its kernels through aotc.sdpa_vector with no compiler."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from aotc.packaging.wheel import build_wheels

from ..test_packaging import pip_install, run_in, venv  # noqa: F401 - venv is a fixture

REPO = Path(__file__).resolve().parents[2]
INDEX = REPO / "dist" / "extra_sdpa.cuda.json"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="MLX has no CUDA GPU here"
    ),
    pytest.mark.skipif(not INDEX.is_file(), reason=f"{INDEX} is missing: run aotc build first"),
]

SCRIPT = """
import json, os
import mlx.core as mx
import aotc

found = [lib for lib in aotc.libraries() if lib.name == "extra_sdpa" and lib.target == "cuda"]
q = mx.random.normal((2, 32, 1, 192)).astype(mx.bfloat16)
k = mx.random.normal((2, 8, 3000, 192)).astype(mx.bfloat16)
v = mx.random.normal((2, 8, 3000, 128)).astype(mx.bfloat16)
got = aotc.sdpa_vector(q, k, v, scale=0.07, mask="causal")
want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.07, mask="causal")
print(json.dumps({
    "origins": [lib.origin for lib in found],
    "usable": [lib.usable for lib in found],
    "reason": aotc.fallback_reason(q, k, v, mask="causal"),
    "error": mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item(),
}))
"""


def test_wheel_runs_its_kernels_from_a_fresh_venv(tmp_path, venv):  # noqa: F811
    (wheel,) = build_wheels(
        REPO / "manifest.yaml", dist=INDEX.parent, out=tmp_path, targets=["cuda"]
    )
    pip_install(venv, wheel)
    result = run_in(venv, SCRIPT)
    assert result["origins"] and result["origins"][0].startswith("entry point")
    assert result["usable"][0] is True
    assert result["reason"] is None
    assert result["error"] < 3e-2
