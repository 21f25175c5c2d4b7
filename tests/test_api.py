"""The run-time API on MLX's CPU stream: every call falls back to MLX's op, exactly.

The calls name `stream=mx.cpu`, so the fallback is what runs on any machine, a GPU one included.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import pytest

import aotc
from aotc.families.sdpa_vector import api
from aotc.families.sdpa_vector.problem import Unsupported, describe


@pytest.fixture
def qkv():
    mx.random.seed(0)
    q = mx.random.normal((2, 8, 3, 192)).astype(mx.float16)
    k = mx.random.normal((2, 2, 40, 192)).astype(mx.float16)
    v = mx.random.normal((2, 2, 40, 128)).astype(mx.float16)
    return q, k, v


@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
def test_fallback_matches_mlx(qkv, mask):
    q, k, v = qkv
    if mask == "bool":
        mask = mx.random.uniform(shape=(3, 40)) > 0.3
    elif mask == "additive":
        mask = mx.random.normal((2, 1, 3, 40)).astype(mx.float16)
    sinks = mx.random.normal((8,)).astype(mx.float16)
    expected = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.1, mask=mask, sinks=sinks, stream=mx.cpu
    )
    got = aotc.sdpa_vector(q, k, v, scale=0.1, mask=mask, sinks=sinks, stream=mx.cpu)
    assert mx.array_equal(got, expected).item()


def test_fallback_reason_is_logged(qkv, caplog):
    q, k, v = qkv
    api.clear_cache()
    with caplog.at_level(logging.DEBUG, logger="aotc"):
        aotc.sdpa_vector(q, k, v, scale=0.1, stream=mx.cpu)
    assert any(
        "falls back to MLX" in r.message and "not a GPU" in r.message for r in caplog.records
    )


def test_patch_routes_mlx_fast_attention_through_aotc(qkv, monkeypatch):
    q, k, v = qkv
    seen = []
    original = api.sdpa_vector

    def spy(*args, **kwargs):
        seen.append(kwargs["scale"])
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "sdpa_vector", spy)
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, stream=mx.cpu)
    with aotc.patched():
        assert mx.fast.scaled_dot_product_attention is not api._MLX_SDPA
        got = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, stream=mx.cpu)
    assert mx.fast.scaled_dot_product_attention is api._MLX_SDPA
    assert seen == [0.5]
    assert mx.array_equal(got, expected).item()


def test_gradients_come_from_mlx_op():
    q, k, v = (mx.random.normal(s) for s in ((1, 4, 2, 64), (1, 2, 9, 64), (1, 2, 9, 32)))
    calls = []

    def forward(q, k, v, scale, mask, sinks):
        calls.append(1)
        return api._MLX_SDPA(q, k, v, scale=scale, mask=mask, sinks=sinks)

    run = api.with_mlx_gradient(forward)

    def loss(fn):
        return lambda q, k, v: fn(q, k, v).sum()

    ours = mx.grad(loss(lambda q, k, v: run(q, k, v, 0.125, "causal", None)), argnums=(0, 1, 2))
    ref = mx.grad(
        loss(lambda q, k, v: api._MLX_SDPA(q, k, v, scale=0.125, mask="causal")), argnums=(0, 1, 2)
    )
    for a, b in zip(ours(q, k, v), ref(q, k, v), strict=True):
        assert mx.allclose(a, b, atol=1e-5).item()
    assert calls == [1]


@pytest.mark.parametrize(
    ("shapes", "mask", "reason"),
    [
        (((1, 6, 1, 64), (1, 4, 9, 64), (1, 4, 9, 64)), None, "not a multiple"),
        (((1, 4, 1, 64), (1, 4, 9, 32), (1, 4, 9, 64)), None, "head dim 64 but keys 32"),
        (((1, 4, 1, 64), (1, 4, 9, 64), (1, 4, 9, 64)), "sliding", "not 'causal'"),
        (((4, 1, 64), (1, 4, 9, 64), (1, 4, 9, 64)), None, "rank 4"),
    ],
)
def test_describe_rejects_with_a_reason(shapes, mask, reason):
    q, k, v = (mx.zeros(s, dtype=mx.float16) for s in shapes)
    with pytest.raises(Unsupported, match=reason):
        describe(q, k, v, mask)


def test_describe_reads_gqa_and_masks():
    q = mx.zeros((2, 32, 4, 192), dtype=mx.bfloat16)
    k = mx.zeros((2, 8, 100, 192), dtype=mx.bfloat16)
    v = mx.zeros((2, 8, 100, 128), dtype=mx.bfloat16)
    problem = describe(q, k, v, mx.zeros((4, 100), dtype=mx.bool_))
    assert (problem.gqa_factor, problem.mask, problem.mask_shape) == (4, "bool", (4, 100))
    assert problem.output_shape == (2, 32, 4, 128)
    assert describe(q, k, v, "causal").mask == "causal"


def test_an_unusable_library_with_the_kernel_warns_and_falls_back(tmp_path, write_manifest):
    from aotc.artifact import make_index, publish
    from aotc.runtime import libraries as registry

    artifact = tmp_path / "built" / "stale.fatbin"
    artifact.parent.mkdir()
    artifact.write_bytes(b"not used: the library is refused before its bytes are read")
    kernel = {"name": "sdpa_vector_float16_t_192_128", "family": "sdpa_vector"}
    index = make_index(
        library="stale",
        target="cuda",
        artifact=artifact,
        kernels=[{**kernel, "dtype": "float16", "params": {"D": 192, "V": 128}, "variant": "x"}],
        options={"archs": ["sm_90a"], "ptx": None},
        toolchain={"name": "nvcc", "version": "13.0"},
        flags=[],
        mlx_version="0.31.0",
        headers_sha256={},
    )
    _, index_path = publish(artifact, index, tmp_path / "dist")
    registry.reset()
    try:
        with pytest.warns(RuntimeWarning, match="built for MLX 0.31.0"):
            aotc.load(index_path)
        q = mx.zeros((1, 8, 1, 192), dtype=mx.float16)
        k = mx.zeros((1, 2, 10, 192), dtype=mx.float16)
        v = mx.zeros((1, 2, 10, 128), dtype=mx.float16)
        with (
            pytest.warns(RuntimeWarning, match="falls back to MLX for sdpa_vector_float16_t_192"),
            pytest.raises(Unsupported, match="no usable cuda library"),
        ):
            api._library_for("cuda", describe(q, k, v))
    finally:
        registry.reset()


def _gradient_case(seed: int):
    """(q, k, v, cotangent of out, MLX's gradients of q, k, v) for a small problem."""
    b, hq, hkv, n, d, v = 1, 4, 2, 9, 16, 16
    q, k, vv = (
        mx.random.normal(shape, key=kk)
        for shape, kk in zip(
            [(b, hq, 1, d), (b, hkv, n, d), (b, hkv, n, v)],
            mx.random.split(mx.random.key(seed), 3),
            strict=True,
        )
    )
    ct_out = mx.random.normal((b, hq, 1, v), key=mx.random.key(seed + 1))
    _, want = mx.vjp(
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25),
        [q, k, vv],
        [ct_out],
    )
    return q, k, vv, ct_out, want


def test_launch_gradient_takes_the_cotangent_of_the_calls_output():
    """A split pass of two launches returns (partials, maxs, sums) and the fused one (scratch,
    out): the gradient of the last launch must follow out's cotangent, the last one, not the
    first output's."""
    from aotc.families.sdpa_vector.api import mlx_gradients

    q, k, vv, ct_out, want = _gradient_case(0)
    b, hq, v = 1, 4, 16
    last, _ = mlx_gradients(0.25, None, False, False)
    kernel_inputs = [q, k, vv, q, q]
    intermediates = [mx.zeros((b, hq, 1, 3, v)), mx.zeros((b, hq, 1, 3)), mx.zeros((b, hq, 1, 3))]
    flags = mx.zeros((6,), dtype=mx.uint32)
    grads = last([*kernel_inputs, q, k, vv], [*intermediates, flags, ct_out])
    assert len(grads) == len(kernel_inputs) + 3
    assert all(not mx.any(g).item() for g in grads[: len(kernel_inputs)])
    for got, expected in zip(grads[len(kernel_inputs) :], want, strict=True):
        assert mx.allclose(got, expected, atol=1e-5).item()
    assert mx.any(grads[-3]).item()  # q's gradient is not the zeros of a wrong cotangent


def test_one_launch_gradient_reads_q_k_v_from_its_kernel_inputs():
    """A one-launch plan takes q, k, v as its first kernel inputs: its gradient lands there (and
    zeros on the placeholders that repeat q), with no gradient-only inputs appended."""
    from aotc.families.sdpa_vector.api import mlx_gradients

    q, k, vv, ct_out, want = _gradient_case(2)
    last, _ = mlx_gradients(0.25, None, False, False, qkv_inline=True)
    kernel_inputs = [q, k, vv, q, q]
    grads = last(kernel_inputs, [mx.zeros((1, 4, 1, 3, 16)), ct_out])
    assert len(grads) == len(kernel_inputs)
    for got, expected in zip(grads[:3], want, strict=True):
        assert mx.allclose(got, expected, atol=1e-5).item()
    assert mx.any(grads[0]).item()
    assert not mx.any(grads[3]).item() and not mx.any(grads[4]).item()


def test_run_time_names_resolve_once():
    """`aotc.sdpa_vector` is on a decode step's hot path: after the first lookup it is a plain
    module attribute, not a module __getattr__ call with an import each time."""
    import aotc

    first = aotc.sdpa_vector
    assert vars(aotc)["sdpa_vector"] is first
    from aotc.families.sdpa_vector.api import sdpa_vector

    assert first is sdpa_vector
