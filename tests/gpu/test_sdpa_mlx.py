"""aotc.sdpa_vector on MLX's CUDA backend against a float32 reference made of MLX ops.

Runs on the GPU machine with MLX's CUDA build, the extension built, and `dist/` built from the
repository's manifest.yaml (`aotc build manifest.yaml`); skipped with the reason elsewhere.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import pytest

import aotc
from aotc.families.sdpa_vector import api
from aotc.manifest import load_manifest

REPO = Path(__file__).resolve().parents[2]
INDEX = REPO / "dist" / "extra_sdpa.cuda.json"
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
TOL = {"float16": 6e-3, "bfloat16": 3e-2, "float32": 1e-4}

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (hasattr(mx, "cuda") and mx.cuda.is_available()), reason="MLX has no CUDA GPU here"
    ),
]


@pytest.fixture(scope="module", autouse=True)
def library():
    from aotc.runtime.cuda import has_cuda, unavailable_reason

    if not has_cuda():
        pytest.skip(f"aotc's CUDA launch primitive is unavailable: {unavailable_reason()}")
    if not INDEX.is_file():
        pytest.skip(f"{INDEX} is missing: run `aotc build manifest.yaml` first")
    return aotc.load(INDEX)


def manifest_cases() -> list[tuple[str, int, int]]:
    manifest = load_manifest(REPO / "manifest.yaml")
    return sorted({(i.dtype, i.param("D"), i.param("V")) for i in manifest.for_target("cuda")})


def reference(q, k, v, scale, mask, sinks):
    """MLX's semantics in float32 with plain ops (GQA by grouping, causal aligned to the end)."""
    q, k, v = (x.astype(mx.float32) for x in (q, k, v))
    b, hq, lq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = (q * scale).reshape(b, hkv, g, lq, -1) @ k[:, :, None].swapaxes(-1, -2)
    scores = scores.reshape(b, hq, lq, n)
    if isinstance(mask, str):
        rows = mx.arange(n - lq, n)[:, None]
        scores = mx.where(rows >= mx.arange(n)[None], scores, -math.inf)
    elif mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, -math.inf)
    elif mask is not None:
        scores = scores + mask.astype(mx.float32)
    if sinks is not None:
        column = mx.broadcast_to(sinks.astype(mx.float32)[None, :, None, None], (b, hq, lq, 1))
        scores = mx.concatenate([column, scores], axis=-1)
    probs = mx.softmax(scores, axis=-1)
    if sinks is not None:
        probs = probs[..., 1:]
    out = probs.reshape(b, hkv, g, lq, n) @ v[:, :, None]
    return out.reshape(b, hq, lq, -1)


def check(
    *,
    dtype="bfloat16",
    d=192,
    v_dim=128,
    b=1,
    hkv=2,
    gqa=4,
    lq=1,
    n=1000,
    mask=None,
    sinks=False,
    cache=0,
    seed=0,
):
    mx.random.seed(seed)
    t = DTYPES[dtype]
    hq = hkv * gqa
    q = mx.random.normal((b, hq, lq, d)).astype(t)
    if cache:  # K and V as slices of a preallocated cache, as mlx-lm's KVCache returns them
        k_cache = mx.random.normal((b, hkv, n + cache, d)).astype(t)
        v_cache = mx.random.normal((b, hkv, n + cache, v_dim)).astype(t)
        mx.eval(k_cache, v_cache)
        k, v = k_cache[:, :, :n, :], v_cache[:, :, :n, :]
    else:
        k = mx.random.normal((b, hkv, n, d)).astype(t)
        v = mx.random.normal((b, hkv, n, v_dim)).astype(t)
    if mask == "bool":
        mask = mx.random.uniform(shape=(b, 1, lq, n)) > 0.2
        mask[..., -1] = True  # keep every row non-empty
    elif mask == "additive":
        mask = (mx.random.normal((1, hq, lq, n)) * 2).astype(t)
    elif mask == "additive float32":  # cast to the output type by the call, as MLX does
        mask = mx.random.normal((1, hq, lq, n)) * 2
    sink = (mx.random.normal((hq,)) * 2).astype(t) if sinks else None
    mx.eval(q, k, v)
    scale = 1.0 / math.sqrt(d)
    assert aotc.fallback_reason(q, k, v, mask=mask, sinks=sink) is None
    got = aotc.sdpa_vector(q, k, v, scale=scale, mask=mask, sinks=sink)
    want = reference(q, k, v, scale, mask, sink)
    assert got.shape == (b, hq, lq, v_dim) and got.dtype == t
    error = mx.abs(got.astype(mx.float32) - want).max().item()
    assert error <= TOL[dtype] * max(1.0, mx.abs(want).max().item()), error
    # The first call decided in Python and filed its plan: the CallTable alone serves the
    # signature now, and the public call takes that path.
    served = api._native_calls(q, k, v, mask, sink, scale)
    assert served is not None and mx.array_equal(served, got).item()
    again = aotc.sdpa_vector(q, k, v, scale=scale, mask=mask, sinks=sink)
    assert mx.array_equal(again, got).item()


@pytest.mark.parametrize(("dtype", "d", "v_dim"), manifest_cases())
def test_every_dtype_and_pair_of_the_manifest(dtype, d, v_dim):
    check(dtype=dtype, d=d, v_dim=v_dim, n=777)
    check(dtype=dtype, d=d, v_dim=v_dim, n=4096, lq=3, mask="causal")


@pytest.mark.parametrize("gqa", [1, 2, 4, 8, 16])
def test_gqa_factors(gqa):
    check(gqa=gqa, hkv=2, n=1000)


@pytest.mark.parametrize("lq", range(1, 9))
@pytest.mark.parametrize("causal", [False, True])
def test_query_tokens(lq, causal):
    check(lq=lq, mask="causal" if causal else None, n=300)


@pytest.mark.parametrize("mask", ["bool", "additive", "additive float32"])
def test_masks(mask):
    check(mask=mask, lq=2, n=500, b=2)


def test_sinks():
    check(sinks=True, lq=2, n=500, mask="causal")


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 4096, 65537])
def test_kv_lengths(n):
    check(n=n, dtype="float16")


@pytest.mark.parametrize(("d", "v_dim"), [(192, 128), (576, 512)])
def test_strided_cache_slices(d, v_dim):
    check(d=d, v_dim=v_dim, cache=256, n=3000, b=2, lq=2, mask="causal")


def test_mla_decode_with_v_a_view_of_k():
    """DeepSeek-style MLA: one latent KV head for 128 query heads; V = K's first 512 columns."""
    mx.random.seed(1)
    q = mx.random.normal((1, 128, 1, 576)).astype(mx.bfloat16)
    k = mx.random.normal((1, 1, 2048, 576)).astype(mx.bfloat16)
    mx.eval(q, k)
    v = k[..., :512]
    assert aotc.fallback_reason(q, k, v) is None
    got = aotc.sdpa_vector(q, k, v, scale=576**-0.5)
    want = reference(q, k, v, 576**-0.5, None, None)
    assert mx.abs(got.astype(mx.float32) - want).max().item() < 3e-2 * mx.abs(want).max().item()


def test_patch_serves_mlx_fast_attention():
    q = mx.random.normal((1, 8, 1, 192)).astype(mx.bfloat16)
    k = mx.random.normal((1, 2, 100, 192)).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, 100, 128)).astype(mx.bfloat16)
    with aotc.patched():
        got = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.07)
    want = reference(q, k, v, 0.07, None, None)
    assert mx.abs(got.astype(mx.float32) - want).max().item() < 3e-2


def test_unbuilt_pair_falls_back():
    q = mx.random.normal((1, 8, 1, 112)).astype(mx.bfloat16)
    k = mx.random.normal((1, 2, 100, 112)).astype(mx.bfloat16)
    reason = aotc.fallback_reason(q, k, k)
    assert reason is not None and "sdpa_vector_bfloat16_t_112_112" in reason


@pytest.mark.parametrize(
    ("n", "mask", "sinks"), [(64, None, False), (5000, "causal", True), (3000, "bool", False)]
)
def test_gradients_fall_back_to_mlx(n, mask, sinks):
    """The kernels have no backward: gradients through aotc equal those through MLX's op."""
    mx.random.seed(3)
    q = mx.random.normal((1, 8, 2, 192))
    k = mx.random.normal((1, 2, n, 192))
    v = mx.random.normal((1, 2, n, 128))
    if mask == "bool":
        mask = mx.random.uniform(shape=(2, n)) > 0.3
    s = mx.random.normal((8,)) if sinks else None
    assert aotc.fallback_reason(q, k, v, mask=mask, sinks=s) is None

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, scale=0.1, mask=mask, sinks=s) ** 2).sum()

    ours = mx.grad(loss(aotc.sdpa_vector), argnums=(0, 1, 2))(q, k, v)
    theirs = mx.grad(loss(mx.fast.scaled_dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs, strict=True):
        # The cotangent is 2 * out, and aotc's out differs from MLX's in the last bits.
        assert mx.allclose(a, b, atol=2e-3, rtol=1e-2).item()


def _hopper_first_kernel(library, q, k, v, mask=None) -> str:
    """The kernel of the first launch the plan takes for these inputs from `library` on an sm_90
    GPU, whose sm_90a image runs wgmma; skips on other GPUs."""
    from aotc.families.sdpa_vector.cuda import plan_cuda
    from aotc.families.sdpa_vector.problem import describe

    arch = str(mx.device_info().get("architecture", ""))
    if arch != "sm_90":
        pytest.skip(f"the wgmma kernel runs on sm_90 GPUs; this one is {arch}")
    problem = describe(q, k, v, mask)
    return plan_cuda(problem, available=library.kernel_names, wgmma=True)[0].kernel


def test_mla_plans_the_wgmma_kernel_on_hopper(library):
    """On an sm_90 GPU the manifest's sm_90a image serves 64+ rows per KV head with wgmma (at
    B=8 N=32768 its splits of 64 tiles take one block an SM, not clusters of two: the two-deep
    split pass with partials in T, whose view alternative is the seesaw)."""
    from aotc.runtime.cuda import wgmma_runs

    q = mx.zeros((8, 128, 1, 576), dtype=mx.bfloat16)
    k = mx.zeros((8, 1, 32768, 576), dtype=mx.bfloat16)
    kernel = _hopper_first_kernel(library, q, k, k[..., :512])
    assert wgmma_runs(library.index.data["options"]["archs"], "sm_90")
    assert kernel == "sdpa_vector_wgmma_t_partials_bfloat16_t_576_512"


@pytest.mark.parametrize(
    ("n", "short"), [(4096, True), (8192, False)], ids=["2-tile splits", "4-tile splits"]
)
def test_speculative_rows_take_both_wgmma_entry_points(library, n, short):
    """GQA 8 at 8 tokens (64 rows a KV head) at batch 1 on an sm_90 GPU: splits of 2 key tiles
    take the one-deep build (`_short_`), of 4 the two-deep one; both match the reference."""
    q = mx.zeros((1, 32, 8, 192), dtype=mx.bfloat16)
    k = mx.zeros((1, 4, n, 192), dtype=mx.bfloat16)
    v = mx.zeros((1, 4, n, 128), dtype=mx.bfloat16)
    kernel = _hopper_first_kernel(library, q, k, v, "causal")
    assert kernel.startswith("sdpa_vector_wgmma_")
    assert kernel.startswith("sdpa_vector_wgmma_short_") == short, kernel
    check(d=192, v_dim=128, hkv=4, gqa=8, lq=8, n=n, mask="causal")


def test_two_row_groups_take_the_dual_wgmma_entry_point(library):
    """128/128 GQA 16 at 8 tokens (two 64-row groups a KV head), 32k keys, on an sm_90 GPU: the
    manifest's library serves it with two blocks an SM (`_dual_`, 16-tile splits), matching the
    reference."""
    q = mx.zeros((1, 64, 8, 128), dtype=mx.bfloat16)
    k = v = mx.zeros((1, 4, 32768, 128), dtype=mx.bfloat16)
    kernel = _hopper_first_kernel(library, q, k, v, "causal")
    assert kernel == "sdpa_vector_wgmma_dual_bfloat16_t_128_128", kernel
    check(d=128, v_dim=128, hkv=4, gqa=16, lq=8, n=32768, mask="causal")


def test_mla_batch_1_takes_the_pair_entry_point(library):
    """MLA at batch 1, 4096 keys of a latent cache (V its first 512 columns): 64 splits of one
    tile, merged in clusters of two (`_pair_`) before the combine, on an sm_90 GPU (splits of
    8+ tiles take the seesaw instead)."""
    mx.random.seed(23)
    q = mx.random.normal((1, 128, 1, 576)).astype(mx.bfloat16)
    cache = mx.random.normal((1, 1, 4096 + 64, 576)).astype(mx.bfloat16)
    mx.eval(q, cache)
    k = cache[:, :, :4096]
    v = k[..., :512]
    kernel = _hopper_first_kernel(library, q, k, v)
    assert kernel == "sdpa_vector_wgmma_pair_bfloat16_t_576_512", kernel
    got = aotc.sdpa_vector(q, k, v, scale=576**-0.5)
    want = reference(q, k, v, 576**-0.5, None, None)
    error = mx.abs(got.astype(mx.float32) - want).max().item()
    assert error <= TOL["bfloat16"] * max(1.0, mx.abs(want).max().item()), error


def test_mla_large_batch_takes_the_one_pass_entry_point(library):
    """MLA at 66 batches: 132 row groups, one split each as planned for 132 SMs (H100 SXM,
    H200), so the one-pass entry point (`_one_`) writes the output itself, sinks applied,
    through MLX's primitive (one launch, no combine); V is a view of a cache slice of K."""
    mx.random.seed(29)
    q = mx.random.normal((66, 128, 1, 576)).astype(mx.bfloat16)
    cache = mx.random.normal((66, 1, 600, 576)).astype(mx.bfloat16)
    sinks = (mx.random.normal((128,)) * 2).astype(mx.bfloat16)
    mx.eval(q, cache, sinks)
    k = cache[:, :, 37:537]
    v = k[..., :512]
    kernel = _hopper_first_kernel(library, q, k, v)
    assert kernel == "sdpa_vector_wgmma_one_bfloat16_t_576_512", kernel
    got = aotc.sdpa_vector(q, k, v, scale=576**-0.5, sinks=sinks)
    want = reference(q, k, v, 576**-0.5, None, sinks)
    error = mx.abs(got.astype(mx.float32) - want).max().item()
    assert error <= TOL["bfloat16"] * max(1.0, mx.abs(want).max().item()), error


@pytest.mark.parametrize("batch, n", [(8, 8192), (66, 512)], ids=["split_pass", "one_pass"])
def test_mla_takes_the_seesaw_where_v_is_a_view_of_k(library, batch, n):
    """MLA in splits of 8+ key tiles: where V is a prefix view of K (a slice of the latent
    cache, as MLA lays it out) MLX's primitive takes the launch's view alternative, the seesaw
    entry point, at evaluation; with V of its own, the launch's own kernel. Both right."""
    from aotc import _ext
    from aotc.families.sdpa_vector.cuda import plan_cuda
    from aotc.families.sdpa_vector.problem import describe

    mx.random.seed(31)
    q = mx.random.normal((batch, 128, 1, 576)).astype(mx.bfloat16)
    cache = mx.random.normal((batch, 1, n + 40, 576)).astype(mx.bfloat16)
    own_v = mx.random.normal((batch, 1, n, 512)).astype(mx.bfloat16)
    sinks = (mx.random.normal((128,)) * 2).astype(mx.bfloat16)
    mx.eval(q, cache, own_v, sinks)
    k = cache[:, :, 9 : 9 + n]
    _hopper_first_kernel(library, q, k, own_v)  # skips off sm_90
    launch = plan_cuda(describe(q, k, own_v), available=library.kernel_names, wgmma=True)[0]
    assert launch.alternative is not None and "_seesaw" in launch.alternative.kernel
    for v, taken in ((k[..., :512], True), (own_v, False)):
        before = _ext._cuda_view_alternative_launches()
        got = aotc.sdpa_vector(q, k, v, scale=576**-0.5, sinks=sinks)
        mx.eval(got)
        assert (_ext._cuda_view_alternative_launches() > before) == taken
        want = reference(q, k, v, 576**-0.5, None, sinks)
        error = mx.abs(got.astype(mx.float32) - want).max().item()
        assert error <= TOL["bfloat16"] * max(1.0, mx.abs(want).max().item()), error


def test_overlapping_launches_run_as_one_primitive(library, monkeypatch):
    """192/128 GQA 4 at batch 1 on an sm_90+ GPU, planned with the overlapping combine
    (MLX_OVERLAP_COMBINE, off by default: it costs MLX more host time than it saves): the split
    pass, then the combine as a programmatic dependent launch, one MLX primitive (a child graph
    of two kernel nodes). Right alone, in a chain of eight calls, and under mx.grad."""
    from aotc.families.sdpa_vector import cuda
    from aotc.families.sdpa_vector.problem import describe

    arch = str(mx.device_info().get("architecture", ""))
    if not cuda.overlaps_launches(arch):
        pytest.skip(f"programmatic dependent launch needs sm_90+; this GPU is {arch}")
    monkeypatch.setattr(cuda, "MLX_OVERLAP_COMBINE", 1)
    mx.random.seed(29)
    q = mx.random.normal((1, 32, 1, 192)).astype(mx.bfloat16)
    k = mx.random.normal((1, 4, 4096, 192)).astype(mx.bfloat16)
    v = mx.random.normal((1, 4, 4096, 128)).astype(mx.bfloat16)
    scale = 192**-0.5
    runner = api._cuda_runner(describe(q, k, v))
    assert [launch.overlaps_previous for launch in runner.launches] == [False, True]
    assert runner.plan(scale).primitives == [[launch.kernel for launch in runner.launches]]

    def attention(q):
        return runner(q, k, v, scale, None, None)

    want = reference(q, k, v, scale, None, None)
    bound = TOL["bfloat16"] * max(1.0, mx.abs(want).max().item())
    assert mx.abs(attention(q).astype(mx.float32) - want).max().item() <= bound
    # Eight dependent calls in one evaluation: each query from the previous output's columns.
    x = y = q
    for _ in range(8):
        x = mx.concatenate([attention(x)] * 2, axis=-1)[..., :192]
        y = mx.concatenate([reference(y, k, v, scale, None, None)] * 2, axis=-1)[..., :192]
        y = y.astype(mx.bfloat16)
    assert mx.abs(x.astype(mx.float32) - y.astype(mx.float32)).max().item() <= 4 * bound

    def loss(fn):
        return lambda q: (fn(q).astype(mx.float32) ** 2).sum()

    ours = mx.grad(loss(attention))(q)
    theirs = mx.grad(loss(lambda q: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)))(q)
    assert mx.allclose(ours, theirs, atol=5e-2, rtol=5e-2).item()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(("lq", "mask", "sinks"), [(1, None, False), (3, "causal", True)])
def test_mla_shapes_with_their_own_values(dtype, lq, mask, sinks):
    check(dtype=dtype, d=576, v_dim=512, hkv=1, gqa=128, lq=lq, n=3000, mask=mask, sinks=sinks)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("n", [2, 65, 5000])
def test_mla_value_view_in_a_cache(dtype, n):
    """V = K's first 512 columns, K a slice of a preallocated latent cache (mlx-lm's layout).
    n >= 2 query tokens: with fewer keys than queries, causal leaves a row with no key and the
    -inf reference turns it into NaN (MLX's kernels keep such rows uniform instead)."""
    mx.random.seed(n)
    t = DTYPES[dtype]
    q = mx.random.normal((2, 128, 2, 576)).astype(t)
    cache = mx.random.normal((2, 1, n + 100, 576)).astype(t)
    mx.eval(q, cache)
    k = cache[:, :, :n]
    v = k[..., :512]
    got = aotc.sdpa_vector(q, k, v, scale=576**-0.5, mask="causal")
    want = reference(q, k, v, 576**-0.5, "causal", None)
    error = mx.abs(got.astype(mx.float32) - want).max().item()
    assert error <= TOL[dtype] * max(1.0, mx.abs(want).max().item()), error


@pytest.mark.parametrize(
    ("hkv", "n", "d", "v_dim"), [(4, 4096, 192, 128), (8, 32768, 256, 128)], ids=["4k", "32k"]
)
def test_independent_calls_in_one_evaluation(library, hkv, n, d, v_dim):
    """Eight calls evaluated together may run side by side (MLX's CUDA graph has no edges
    between them): each one's waiting combiners and flag slots must stay its own."""
    from aotc.families.sdpa_vector.cuda import device_facts, plan_cuda
    from aotc.families.sdpa_vector.problem import describe

    mx.random.seed(3)
    t = mx.bfloat16
    qs = [mx.random.normal((1, 32, 1, d)).astype(t) for _ in range(8)]
    ks = [mx.random.normal((1, hkv, n, d)).astype(t) for _ in range(2)]
    vs = [mx.random.normal((1, hkv, n, v_dim)).astype(t) for _ in range(2)]
    mx.eval(qs, ks, vs)
    sm_count, arch = device_facts()
    plan = plan_cuda(
        describe(qs[0], ks[0], vs[0]), available=library.kernel_names, sm_count=sm_count, arch=arch
    )
    assert "_2pass_fused_" in plan[0].kernel, "this shape should run as one fused launch"
    scale = d**-0.5
    wants = [reference(q, ks[i % 2], vs[i % 2], scale, None, None) for i, q in enumerate(qs)]
    mx.eval(wants)
    for _ in range(10):
        gots = [aotc.sdpa_vector(q, ks[i % 2], vs[i % 2], scale=scale) for i, q in enumerate(qs)]
        mx.eval(gots)
        for got, want in zip(gots, wants, strict=True):
            error = mx.abs(got.astype(mx.float32) - want).max().item()
            assert error <= TOL["bfloat16"] * max(1.0, mx.abs(want).max().item()), error


def test_eval_polls_the_cuda_events():
    """aotc.eval on MLX's CUDA stream: a chain of calls finishes by polling with an unbounded
    budget, is left to MLX's blocking wait with none, and gives mx.eval's results either way."""
    mx.random.seed(4)
    t = mx.bfloat16
    q = mx.random.normal((8, 32, 1, 128)).astype(t)
    k = mx.random.normal((8, 8, 32768, 128)).astype(t)
    v = mx.random.normal((8, 8, 32768, 128)).astype(t)
    mx.eval(q, k, v)

    def chain():  # ~3 ms on an H100: still running when the first poll looks
        x = q
        for _ in range(8):
            x = aotc.sdpa_vector(x, k, v, scale=0.08)
        return x

    want = chain()
    mx.eval(want)
    polled, waited = chain(), chain()
    assert aotc.eval(polled, spin=math.inf) is True
    assert aotc.eval([waited], spin=0) is False
    assert mx.array_equal(polled, want).item() and mx.array_equal(waited, want).item()


@pytest.mark.parametrize("mask", [None, "causal", "additive"])
def test_a_signature_no_library_serves_runs_mlxs_op_from_the_table(mask):
    """Head dims no library has: the first call decides in Python and files MLX's own op, and
    the table serves the next call with it, on the GPU, equal to MLX's op called directly."""
    mx.random.seed(3)
    q = mx.random.normal((1, 8, 2, 72)).astype(mx.bfloat16)
    k = mx.random.normal((1, 2, 100, 72)).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, 100, 72)).astype(mx.bfloat16)
    if mask == "additive":
        mask = mx.random.normal((1, 8, 2, 100)).astype(mx.bfloat16)
    assert "no usable cuda library" in aotc.fallback_reason(q, k, v, mask=mask)
    api.clear_cache()
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.1, mask=mask)
    first = aotc.sdpa_vector(q, k, v, scale=0.1, mask=mask)
    assert len(api._native_calls) == 1
    served = api._native_calls(q, k, v, mask, None, 0.1)
    assert served is not None
    assert mx.array_equal(first, want).item() and mx.array_equal(served, want).item()
