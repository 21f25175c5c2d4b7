"""aotc's CUDA sdpa_vector kernels against a float64 reference of MLX's semantics (torch harness).

Needs a CUDA GPU, torch and nvcc (the fatbins are built once per session, or taken from
`$AOTC_HARNESS_DIR/current` / `.gpu/sdpa/current` when prebuilt). A build of PTX for compute_80
(`python3 -m bench.build_harness DIR 8 compute_80`, then `AOTC_HARNESS_DIR=DIR`) runs the sm_80
image's source paths, JIT-compiled for the GPU at hand, with the plans an A100 would make; the
wgmma tests skip there.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from aotc.families.sdpa_vector.problem import Unsupported

torch = pytest.importorskip("torch", reason="torch is not installed")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch"),
]

REPO = Path(__file__).resolve().parents[2]
PAIRS = [(576, 512), (192, 128), (256, 128), (96, 64), (320, 256)]
DTYPES = ["float16", "bfloat16", "float32"]
TOL = {"float16": 4e-3, "bfloat16": 2e-2, "float32": 2e-5}
# The wgmma split pass's tensor-map bits (WParams::maps_ok): K, V and Q.
Q_MAP = 4
ALL_MAPS = 3 | Q_MAP
# fp32 576/512 blocks need 183 KB of shared memory; an sm_8x SM has 163 KB: the plan refuses
# them there, and aotc.sdpa_vector falls back to MLX's op.
SM8X_UNSERVED = {("float32", 576, 512)}


@pytest.fixture(scope="session")
def lib():
    from bench import cuda_harness as h

    for folder in (os.environ.get("AOTC_HARNESS_DIR"), REPO / ".gpu" / "sdpa"):
        if folder and (Path(folder) / "current").exists():
            listing = Path(folder) / (Path(folder) / "current").read_text().strip()
            if listing.exists():
                break
    else:
        if shutil.which("nvcc") is None:
            pytest.skip("nvcc is not on PATH and no prebuilt harness fatbin exists")
        from bench.build_harness import PAIRS as ALL_PAIRS

        listing = h.build_fatbin(ALL_PAIRS)
    library = h.Library(listing)
    library.poison = True
    return library


def _rand(shape, dtype, gen):
    return torch.randn(shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def check(
    lib,
    *,
    b=1,
    hq=8,
    hkv=1,
    lq=1,
    n=100,
    d=192,
    v=128,
    dtype="bfloat16",
    mask=None,
    sinks=False,
    strided=False,
    num_splits=None,
    seed=0,
    view_of_k=False,
):
    from bench import cuda_harness as h

    gen = torch.Generator(device="cuda").manual_seed(seed)
    dt = h.DTYPES[dtype]
    q = _rand((b, hq, lq, d), dt, gen)
    if strided:
        # Slices of a preallocated cache (B, Hkv, Nmax, D) and a transposed-layout query.
        kc = _rand((b, hkv, n + 37, d), dt, gen)
        vc = _rand((b, hkv, n + 37, v + 16), dt, gen)
        k, vv = kc[:, :, 5 : 5 + n], vc[:, :, 3 : 3 + n, 16:]
        if view_of_k:  # an MLA cache slice: V is K's first columns
            vv = k[..., :v]
        q = _rand((b, lq, hq, d), dt, gen).transpose(1, 2)
    elif view_of_k:
        k = _rand((b, hkv, n, d), dt, gen)
        vv = k[..., :v]
    else:
        k = _rand((b, hkv, n, d), dt, gen)
        vv = _rand((b, hkv, n, v), dt, gen)
    m = None
    if mask == "causal":
        m = "causal"
    elif mask == "bool":
        m = torch.rand((b, 1, lq, n), generator=gen, device="cuda") < 0.7
    elif mask == "bool_full":
        m = torch.rand((1, hq, lq, n), generator=gen, device="cuda") < 0.5
        m[..., : n // 2] = False  # some rows keep only a few keys
    elif mask == "additive":
        m = _rand((lq, n), dt, gen) * 2
    s = _rand((hq,), dt, gen) * 2 if sinks else None
    scale = 1.0 / d**0.5
    if lib.plan_arch.startswith("sm_8") and (dtype, d, v) in SM8X_UNSERVED:
        with pytest.raises(Unsupported, match="shared memory"):
            h.plan_for(lib, q, k, vv, m, s, scale=scale, num_splits=num_splits)
        return
    out = h.run(lib, q, k, vv, m, s, scale=scale, num_splits=num_splits)
    torch.cuda.synchronize()
    ref = h.reference(q, k, vv, m, s, scale=scale)
    assert out.shape == ref.shape
    assert not torch.isnan(out).any(), "NaN in the output (unwritten or bad arithmetic)"
    err = h.rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}x{p[1]}")
def test_pairs_and_dtypes(lib, dtype, pair):
    d, v = pair
    check(lib, d=d, v=v, dtype=dtype, hq=8, hkv=2, n=1000)
    check(lib, d=d, v=v, dtype=dtype, hq=8, hkv=2, n=1000, num_splits=5, seed=1)


@pytest.mark.parametrize("gqa", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("lq", [1, 3, 8])
def test_gqa_and_query_tokens(lib, gqa, lq):
    check(lib, hq=2 * gqa, hkv=2, lq=lq, n=333)
    check(lib, hq=2 * gqa, hkv=2, lq=lq, n=333, num_splits=3, mask="causal", seed=2)


@pytest.mark.parametrize("lq", range(1, 9))
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal(lib, lq, dtype):
    check(lib, lq=lq, n=70, mask="causal", dtype=dtype, d=256, v=128)
    check(lib, lq=lq, n=lq, mask="causal", dtype=dtype, d=96, v=64)  # first query sees 1 key


@pytest.mark.parametrize("mask", ["bool", "bool_full", "additive"])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_masks(lib, mask, splits, dtype):
    check(lib, hq=16, hkv=4, lq=4, n=500, mask=mask, num_splits=splits, dtype=dtype)


@pytest.mark.parametrize("splits", [1, 6])
@pytest.mark.parametrize("mask", [None, "causal", "bool"])
def test_sinks(lib, splits, mask):
    check(lib, hq=8, hkv=2, lq=2, n=300, sinks=True, mask=mask, num_splits=splits)
    check(lib, hq=8, hkv=2, lq=2, n=300, sinks=True, num_splits=splits, dtype="float32", d=96, v=64)


# How a split plan merges: (FUSED_MAX_SPLITS, OVERLAP_COMBINE) for each mode of the fused split
# pass (the last block per row group merges / waiting combiners, one per query row, as on sm_8x),
# and for the combine kernel, overlapping the split pass (programmatic dependent launch, sm_90's
# plan) or after it (a library without the fused pass on sm_8x).
MERGES = {
    "last_block": (1 << 30, 0),
    "combiners": (0, 0),
    "overlapped": (None, 1),
    "combine_kernel": (None, 0),
}


@pytest.mark.parametrize("merge", list(MERGES))
@pytest.mark.parametrize(
    "case",
    [
        dict(b=2, hq=32, hkv=4, n=4096, dtype="float16", num_splits=8),  # 8 rows a group
        dict(b=1, hq=16, hkv=16, n=3000, d=96, v=64, dtype="float32", sinks=True, num_splits=5),
        # 2 row groups of 64 rows (the shared-memory softmax path)
        dict(b=1, hq=64, hkv=1, lq=2, n=2000, dtype="bfloat16", mask="causal", num_splits=3),
        # more slots than the first warp's lanes: lanes read two each
        dict(b=1, hq=32, hkv=4, n=4096, d=192, v=128, dtype="bfloat16", num_splits=64),
        dict(b=1, hq=4, hkv=4, n=20000, d=96, v=64, dtype="float16", sinks=True, num_splits=70),
        # rows of 3 x 80 partials (960 bytes) share 128-byte lines with their neighbours: the
        # combine kernel must discard only the lines wholly its row's
        dict(b=1, hq=16, hkv=16, n=3000, d=80, v=80, dtype="bfloat16", num_splits=3),
        # 40 rows a KV head: three row groups of one m-tile, the last one half empty
        dict(b=2, hq=16, hkv=2, lq=5, n=3000, dtype="bfloat16", mask="causal", num_splits=6),
        # Splits of 8+ tiles take every S-th tile (key_tiles): 43 tiles of 32 keys over 5
        # splits, three of them a tile longer, the last tile 13 keys; strided cache slices
        dict(
            b=2, hq=32, hkv=4, lq=3, n=1357, mask="causal", sinks=True, strided=True, num_splits=5
        ),
        # the same through sdpa_block (fp32): 28 tiles of 32 keys over 3 splits, an additive mask
        dict(hq=8, hkv=2, lq=4, n=869, d=96, v=64, dtype="float32", mask="additive", num_splits=3),
    ],
    ids=[
        "fp16",
        "fp32_sinks",
        "bf16_causal_row_groups",
        "bf16_64_splits",
        "fp16_63_splits",
        "bf16_rows_off_lines",
        "bf16_one_m_tile_row_groups",
        "bf16_interleaved_uneven",
        "fp32_interleaved_additive",
    ],
)
def test_split_merge_modes(lib, merge, case, monkeypatch):
    """The fused split pass merges the splits (its last block per row group, or a waiting
    combiner block per query row), or the combine kernel does, after the split pass or
    overlapping it. Later calls run unpoisoned: the caching allocator hands back the same flag
    buffer, whose slots the first call must have reset (and no fill kernel sits between the
    split pass and an overlapping combine)."""
    from aotc.families.sdpa_vector import cuda
    from bench import cuda_harness as h

    fused_max, overlap = MERGES[merge]
    fused = fused_max is not None
    if fused:
        monkeypatch.setattr(cuda, "FUSED_MAX_SPLITS", fused_max)
    monkeypatch.setattr(cuda, "OVERLAP_COMBINE", overlap)
    wgmma_ok = lib.wgmma_ok
    lib.fused_ok, lib.wgmma_ok = fused, False
    try:
        for seed in range(3):
            lib.poison = seed == 0
            check(lib, seed=seed, **case)
        gen = torch.Generator(device="cuda").manual_seed(0)
        q = _rand((1, 32, 1, 192), torch.bfloat16, gen)
        k = _rand((1, 4, 4096, 192), torch.bfloat16, gen)
        plan = h.plan_for(lib, q, k, k[..., :128], scale=0.1, num_splits=6)
    finally:
        lib.fused_ok, lib.wgmma_ok, lib.poison = True, wgmma_ok, True
    assert len(plan) == (1 if fused else 2)
    assert ("_2pass_fused_" in plan[0].kernel) == fused
    # The overlap needs sm_90+ (a compute_80 image plans as an A100) and the harness's PDL.
    overlaps = lib.pdl and cuda.overlaps_launches(lib.plan_arch)
    assert plan[-1].overlaps_previous == (merge == "overlapped" and overlaps)
    combiners_from = struct.unpack(cuda.PARAMS_FORMAT, plan[0].params)[13]
    assert (combiners_from > 0) == (merge == "combiners")


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 4096, 65537])
@pytest.mark.parametrize("pair", [(192, 128), (576, 512)], ids=lambda p: f"{p[0]}x{p[1]}")
def test_kv_lengths(lib, n, pair):
    d, v = pair
    check(lib, hq=16, hkv=2, n=n, d=d, v=v)  # planned split count
    check(lib, hq=16, hkv=2, n=n, d=d, v=v, lq=2, mask="causal", dtype="float16", seed=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [None, 1])
def test_strided_cache_slices(lib, dtype, splits):
    check(lib, b=2, hq=8, hkv=2, lq=3, n=777, strided=True, dtype=dtype, num_splits=splits)
    check(lib, b=2, hq=8, hkv=2, lq=3, n=777, strided=True, dtype=dtype, mask="causal", d=96, v=64)


@pytest.mark.parametrize("dtype", DTYPES)
# 24 rows: two row groups of one m-tile (fp16/bf16) or one block of two m-tiles (fp32).
@pytest.mark.parametrize("hq", [8, 24], ids=["16_rows", "24_rows"])
@pytest.mark.parametrize("splits", [None, 1])
def test_element_paths(lib, dtype, hq, splits):
    """Q, K and V that the 16-byte copies cannot take (out-of-line element loaders): Q with a
    column stride, K transposed in memory, V one element off 16-byte alignment."""
    from bench import cuda_harness as h

    gen = torch.Generator(device="cuda").manual_seed(5)
    dt = h.DTYPES[dtype]
    n, d, v = 333, 192, 128
    q = _rand((1, hq, 2, 2 * d), dt, gen)[..., ::2]
    k = _rand((1, 2, d, n), dt, gen).transpose(-1, -2)
    vv = _rand((1, 2, n, v + 1), dt, gen)[..., 1:]
    out = h.run(lib, q, k, vv, "causal", None, scale=d**-0.5, num_splits=splits)
    torch.cuda.synchronize()
    ref = h.reference(q, k, vv, "causal", None, scale=d**-0.5)
    err = h.rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"


def test_mla_decode_value_view_of_keys(lib):
    check(lib, b=2, hq=128, hkv=1, n=2000, d=576, v=512, view_of_k=True)
    check(lib, b=1, hq=128, hkv=1, lq=2, n=300, d=576, v=512, view_of_k=True, mask="causal")


@pytest.mark.parametrize("splits", [8, 9, 40])
def test_combine_kernel_split_groups(lib, splits):
    # The combine's block: one split group of V / 4 threads (8 splits), two (9), or four, the
    # most (512 threads), that merge 40 splits in two rounds of loads each.
    from aotc.families.sdpa_vector.cuda import combine_threads

    assert combine_threads(512, splits) == 128 * min(4, -(-splits // 8))
    mla = {"b": 2, "hq": 128, "hkv": 1, "n": 3000, "d": 576, "v": 512, "view_of_k": True}
    for sinks in (False, True):
        check(lib, sinks=sinks, num_splits=splits, **mla)
    check(lib, b=2, hq=16, hkv=2, n=3000, d=192, v=128, num_splits=splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 33, 1000, 9000])
def test_value_view_of_keys_in_shared_memory(lib, dtype, n):
    # V read from the K tile in shared memory (v's pointer and strides are K's prefix).
    check(lib, b=2, hq=16, hkv=2, n=n, d=576, v=512, view_of_k=True, dtype=dtype)
    check(lib, b=1, hq=64, hkv=1, n=n, d=576, v=512, view_of_k=True, dtype=dtype, num_splits=3)
    check(lib, hq=8, hkv=2, lq=3, n=n, d=128, v=128, view_of_k=True, dtype=dtype, mask="causal")


def test_value_view_off_the_prefix_is_loaded(lib):
    # Same strides as K but not its first columns: V must be loaded from its own address.
    from bench import cuda_harness as h

    gen = torch.Generator(device="cuda").manual_seed(5)
    q = _rand((1, 32, 1, 576), torch.bfloat16, gen)
    k = _rand((1, 2, 700, 576), torch.bfloat16, gen)
    vv = k[..., 64:]
    out = h.run(lib, q, k, vv, None, None, scale=576**-0.5)
    ref = h.reference(q, k, vv, None, None, scale=576**-0.5)
    assert h.rel_err(out, ref) < TOL["bfloat16"]


def test_planned_for_the_image_arch(lib):
    """32 query rows a KV head (GQA 4 at 8 tokens, 128/128): planned for sm_90, one two-m-tile
    register block (`rows_`); for sm_80 (a compute_80 image), two row groups of one m-tile, as
    sm_80's ptxas spilled the two-m-tile register path. Both compute the same."""
    shape = dict(b=8, hq=32, hkv=8, lq=8, n=8192, d=128, v=128)
    kernel = _first_kernel(lib, **shape)
    assert kernel.startswith("sdpa_vector_rows_") == (lib.plan_arch == "sm_90"), kernel
    check(lib, **shape)


# ---- the wgmma kernel (sm_90a): 33+ query rows per KV head on an sm_90 GPU
WGMMA_PAIRS = [(576, 512), (192, 128), (256, 128), (320, 256)]
_sm90_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability(0) != (9, 0),
    reason="the wgmma kernel runs on sm_90 GPUs only (H100, H200)",
)


@pytest.fixture
def sm90a_image(lib):
    if lib.arch != "sm_90a":
        pytest.skip(f"the wgmma kernel runs from sm_90a SASS; this harness runs {lib.arch}")


def needs_sm90(test):
    return pytest.mark.usefixtures("sm90a_image")(_sm90_gpu(test))


def _first_kernel(lib, **shape):
    from bench import cuda_harness as h

    b, hq, hkv, lq, n = (
        shape.get(x, y) for x, y in (("b", 1), ("hq", 128), ("hkv", 1), ("lq", 1), ("n", 100))
    )
    d, v = shape.get("d", 576), shape.get("v", 512)
    dt = h.DTYPES[shape.get("dtype", "bfloat16")]
    q = torch.empty((b, hq, lq, d), dtype=dt, device="cuda")
    k = torch.empty((b, hkv, n, d), dtype=dt, device="cuda")
    vv = torch.empty((b, hkv, n, v), dtype=dt, device="cuda")
    return h.plan_for(lib, q, k, vv, scale=1.0, num_splits=shape.get("num_splits"))[0].kernel


@needs_sm90
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("pair", WGMMA_PAIRS, ids=lambda p: f"{p[0]}x{p[1]}")
@pytest.mark.parametrize("view", [False, True], ids=["own_v", "v_of_k"])
def test_wgmma_pairs(lib, dtype, pair, view):
    d, v = pair
    assert _first_kernel(lib, d=d, v=v, dtype=dtype).startswith("sdpa_vector_wgmma_")
    check(lib, b=2, hq=128, hkv=1, n=1000, d=d, v=v, dtype=dtype, view_of_k=view)


@needs_sm90
@pytest.mark.parametrize("n", [1, 33, 64, 65, 4096, 65537])
@pytest.mark.parametrize("view", [False, True], ids=["own_v", "v_of_k"])
def test_wgmma_kv_lengths(lib, n, view):
    check(lib, hq=128, hkv=1, n=n, d=576, v=512, view_of_k=view)


@needs_sm90
@pytest.mark.parametrize("lq", [1, 2, 5, 8])
@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
def test_wgmma_masks_and_query_tokens(lib, lq, mask):
    # 96 and 128 heads: row groups of 64 with padding rows past G * Lq.
    check(lib, hq=96, hkv=1, lq=lq, n=300, d=576, v=512, mask=mask, view_of_k=True)
    check(lib, b=2, hq=64, hkv=2, lq=lq, n=200, d=192, v=128, mask=mask, dtype="float16")


@needs_sm90
@pytest.mark.parametrize("lq", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("mask", [None, "causal", "bool"])
def test_wgmma_serves_more_rows_than_a_register_block(lib, lq, mask):
    """GQA 8 at 3-7 tokens (24-56 rows) takes wgmma's one padded 64-row group; at 2 tokens (16
    rows) one m-tile of the register path holds them. 128/128 keeps 17-32 rows on the register
    path (4 tokens, 32 rows), wgmma from 33 (5 tokens)."""
    shape = dict(b=2, hq=32, hkv=4, lq=lq, n=4096, d=192, v=128)
    assert _first_kernel(lib, **shape).startswith("sdpa_vector_wgmma_") == (lq > 2)
    check(lib, **shape, mask=mask, dtype="float16" if mask == "bool" else "bfloat16")
    square = dict(shape, d=128, v=128)
    assert _first_kernel(lib, **square).startswith("sdpa_vector_wgmma_") == (lq > 4)
    check(lib, **square, mask=mask, seed=1)


@needs_sm90
@pytest.mark.parametrize(
    "pair", [(192, 128), (256, 128), (128, 128)], ids=lambda p: f"{p[0]}x{p[1]}"
)
@pytest.mark.parametrize("n", [100, 128, 130, 256, 320, 1000])
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "cp_async"])
def test_wgmma_two_deep_slots(lib, pair, n, tma):
    """Narrow pairs with their own V hold two K and two V tiles: splits of 3+ tiles (odd and
    even counts, a partial last tile) load tile t + 2 into tile t's slots; calls whose splits all
    hold 2 or fewer take the one-deep entry point (`_short_`). Tiles by TMA and, with the maps
    left unencoded, by cp.async; 64-row groups and a padded one (80 rows)."""
    d, v = pair
    lib.tma = tma
    try:
        for hq, lq in ((128, 1), (40, 2)):
            shape = dict(hq=hq, hkv=1, lq=lq, n=n, d=d, v=v)
            assert _first_kernel(lib, **shape).startswith("sdpa_vector_wgmma_")
            one_split = _first_kernel(lib, **shape, num_splits=1)
            assert one_split.startswith("sdpa_vector_wgmma_short_") == (n <= 128), one_split
            check(lib, **shape, num_splits=1)
            check(lib, b=2, **shape, mask="causal", num_splits=2, dtype="float16")
            assert lib.last_maps_ok == (ALL_MAPS if tma else 0)
    finally:
        lib.tma = True


@needs_sm90
@pytest.mark.parametrize("lq", [8, 6], ids=["128_rows", "96_rows"])
@pytest.mark.parametrize(
    ("n", "splits", "dual"),
    [(16384, None, True), (2100, 2, True), (1030, 1, True), (4096, None, False), (1000, 3, False)],
    ids=["n16384", "n2100_2_splits", "n1030_one_split", "n4096_4_tile_splits", "n1000_3_splits"],
)
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "cp_async"])
def test_wgmma_dual_blocks(lib, lq, n, splits, dual, tma):
    """128/128 KV heads of two row groups (GQA 16 at 8 tokens; at 6 the second group is half
    padding) take the dual entry point, two blocks an SM, where its splits keep 16+ tiles (whole,
    or a partial last one); with shorter splits the one-block plan serves them."""
    shape = dict(b=2, hq=64, hkv=4, lq=lq, n=n, d=128, v=128, num_splits=splits)
    lib.tma = tma
    try:
        kernel = _first_kernel(lib, **shape)
        assert kernel.startswith("sdpa_vector_wgmma_dual_") == dual, kernel
        assert kernel.startswith("sdpa_vector_wgmma_"), kernel
        check(lib, **shape)
        check(lib, **shape, mask="causal", dtype="float16", seed=2)
        assert lib.last_maps_ok == (ALL_MAPS if tma else 0)
    finally:
        lib.tma = True


@needs_sm90
@pytest.mark.parametrize("splits", [1, 5])
def test_wgmma_sinks_and_forced_splits(lib, splits):
    check(lib, hq=128, hkv=1, n=1500, d=576, v=512, sinks=True, view_of_k=True, num_splits=splits)
    check(
        lib, hq=128, hkv=2, n=700, d=256, v=128, sinks=True, mask="causal", lq=2, num_splits=splits
    )


@needs_sm90
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "cp_async"])
def test_wgmma_one_pass(lib, tma):
    """Row groups of one key split take the one-pass entry point (`_one_`, wide heads): its
    blocks write the output, sinks applied, with no partials and no combine. As planned (66
    batches of MLA on 132 SMs) and forced to one split: masks of every kind, 1-8 query tokens
    (up to 16 row groups a KV head, a padded one at 96 heads), sinks, cache slices with their
    own V, both dtypes, tiles by TMA and by cp.async."""
    lib.tma = tma
    try:
        planned = dict(b=66, hq=128, hkv=1, n=200, d=576, v=512)
        assert _first_kernel(lib, **planned).startswith("sdpa_vector_wgmma_one_")
        check(lib, **planned, view_of_k=True, sinks=True)
        assert lib.last_maps_ok == (ALL_MAPS if tma else 0)
        for n, lq, mask in (
            (1, 1, None),
            (65, 2, "causal"),
            (1000, 3, "bool"),
            (4097, 8, "additive"),
        ):
            forced = dict(hkv=1, lq=lq, n=n, d=576, v=512, num_splits=1)
            assert _first_kernel(lib, hq=128, **forced).startswith("sdpa_vector_wgmma_one_")
            check(lib, hq=128, **forced, mask=mask, view_of_k=True, sinks=lq == 2)
            check(lib, b=2, hq=96, **forced, mask=mask, sinks=lq != 2, strided=True, seed=1)
            check(lib, hq=64, **forced, mask=mask, dtype="float16", view_of_k=True, seed=2)
    finally:
        lib.tma = True


def _takes_alternative(lib, **case) -> bool:
    """Runs `check` and tells whether a launch of the call took its view alternative."""
    before = lib.alternatives_taken
    check(lib, **case)
    return lib.alternatives_taken > before


@needs_sm90
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_seesaw_serves_mla_where_v_is_a_view_of_k(lib, dtype):
    """MLA with V a prefix view of K, in splits of 8+ key tiles or one split of any count: the
    launch takes its view alternative, the seesaw entry point (split pass, or one pass) on 256
    threads. Odd tile counts (the last pair has no second tile), partial tiles, every mask kind,
    1-8 query tokens (up to 16 row groups), sinks, cache slices, 64, 96 (a padded row group) and
    128 heads. V of its own, or inputs TMA cannot map, keep the launch's own kernel."""
    lib.poison = True
    try:
        planned = dict(b=8, hq=128, hkv=1, n=8192, d=576, v=512, dtype=dtype)
        assert _takes_alternative(lib, **planned, view_of_k=True)
        assert _takes_alternative(lib, **{**planned, "b": 66, "n": 600}, view_of_k=True, sinks=True)
        for n, lq, mask, splits in (
            (513, 1, None, 1),  # 9 tiles: one pass, the last tile 1 key
            (1000, 2, "causal", 2),  # 8 tiles a split
            (4097, 4, "bool", 3),  # 22, 22 and 21 tiles
            (2000, 8, "additive", 1),
            (1000, 3, "bool", 2),  # Lq does not divide 64: Q by cp.async
            (200, 4, "causal", 1),  # one pass of 4 tiles, the last partial
            (130, 2, None, 1),  # one pass of 3 tiles
        ):
            mla = dict(hkv=1, lq=lq, n=n, d=576, v=512, num_splits=splits, dtype=dtype)
            assert _takes_alternative(lib, hq=128, **mla, mask=mask, view_of_k=True, sinks=lq == 2)
            assert _takes_alternative(
                lib, b=2, hq=64, **mla, mask=mask, view_of_k=True, strided=True, seed=1
            )
            assert _takes_alternative(  # 96 heads: the last row group half padding
                lib, b=2, hq=96, **mla, mask=mask, view_of_k=True, sinks=True, seed=3
            )
            assert not _takes_alternative(lib, hq=128, **mla, mask=mask, sinks=True, seed=2)
        lib.tma = False  # no tensor maps: the launch's own kernel, by cp.async
        assert not _takes_alternative(lib, **planned, view_of_k=True)
    finally:
        lib.poison, lib.tma = False, True


@needs_sm90
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_seesaw_half_last_pair(lib, dtype, monkeypatch):
    """Odd tile counts: the seesaw's last pair has no second tile and skips its softmax and
    P V (HALF). The seesaw forced onto every one pass and split (WGMMA_SEESAW_MIN_TILES = 1,
    whatever the plan's rule for short calls): one passes of 1 key and of 1, 3, 5 and 7 tiles,
    splits of 5, 6 and 9 tiles, every mask kind, 1-8 query tokens, sinks, cache slices, 64, 96
    and 128 heads."""
    from aotc.families.sdpa_vector import cuda

    monkeypatch.setattr(cuda, "WGMMA_SEESAW_MIN_TILES", 1)
    lib.poison = True
    try:
        for n, lq, mask, splits in (
            (1, 1, None, 1),  # one tile of one key
            (64, 1, None, 1),  # one whole tile
            (130, 2, "causal", 1),  # 3 tiles, the last 2 keys
            (300, 4, "bool", 1),  # 5 tiles
            (448, 8, "additive", 1),  # 7 whole tiles
            (320, 3, "causal", 1),  # 5 tiles, Q by cp.async
            (1000, 1, None, 3),  # 5, 5 and 6 tiles
            (1152, 2, "causal", 2),  # 9 tiles a split
        ):
            mla = dict(hkv=1, lq=lq, n=n, d=576, v=512, num_splits=splits, dtype=dtype)
            assert _takes_alternative(lib, hq=128, **mla, mask=mask, view_of_k=True, sinks=lq == 2)
            assert _takes_alternative(
                lib, b=2, hq=64, **mla, mask=mask, view_of_k=True, strided=True, seed=1
            )
            assert _takes_alternative(
                lib, b=2, hq=96, **mla, mask=mask, view_of_k=True, sinks=True, seed=3
            )
    finally:
        lib.poison = False


@needs_sm90
def test_seesaw_needs_every_tensor_map(lib):
    """A Q TMA cannot map (an unaligned address) leaves its map unencoded: the launch keeps its
    own kernel, which stages Q by cp.async."""
    from bench import cuda_harness as h

    gen = torch.Generator(device="cuda").manual_seed(17)
    dt = torch.bfloat16
    k = _rand((1, 1, 4096, 576), dt, gen)
    q = _rand((1, 128, 1, 584), dt, gen)[..., 1:577]  # 2-byte offset
    before = lib.alternatives_taken
    out = h.run(lib, q, k, k[..., :512], None, None, scale=576**-0.5, num_splits=2)
    assert lib.last_maps_ok is not None and lib.alternatives_taken == before
    ref = h.reference(q, k, k[..., :512], None, None, scale=576**-0.5)
    assert h.rel_err(out, ref) < TOL["bfloat16"]


@needs_sm90
def test_wgmma_strided_and_scalar_paths(lib):
    from bench import cuda_harness as h

    gen = torch.Generator(device="cuda").manual_seed(11)
    dt = torch.bfloat16
    # Cache slices (16-byte path) and K with a non-unit column stride (element path).
    kc = _rand((1, 1, 1100, 576), dt, gen)
    k = kc[:, :, 7:1007]
    vv = k[..., :512]
    q = _rand((1, 2, 128, 576), dt, gen).transpose(1, 2)
    kt = _rand((1, 1, 576, 1000), dt, gen).transpose(-1, -2)
    for keys, values in ((k, vv), (kt, kt[..., :512]), (k, _rand((1, 1, 1000, 512), dt, gen))):
        out = h.run(lib, q, keys, values, None, None, scale=576**-0.5)
        ref = h.reference(q, keys, values, None, None, scale=576**-0.5)
        assert h.rel_err(out, ref) < TOL["bfloat16"]


@needs_sm90
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "cp_async"])
@pytest.mark.parametrize("view", [False, True], ids=["own_v", "v_of_k"])
def test_wgmma_tile_loads_by_tma_and_by_cp_async(lib, tma, view):
    """The launch encodes K's, V's and Q's tensor maps and the kernel loads tiles by TMA (KV heads
    of 64+ rows: all cases here); with the maps left unencoded it takes its cp.async path. Both
    serve every case."""
    lib.tma = tma
    try:
        for n, mask, splits in ((65, None, None), (1000, "causal", 3), (4096, "bool", None)):
            check(
                lib, hq=128, hkv=1, n=n, d=576, v=512, mask=mask, view_of_k=view, num_splits=splits
            )
            assert lib.last_maps_ok == (ALL_MAPS if tma else 0)
        check(lib, b=2, hq=64, hkv=2, lq=2, n=300, d=192, v=128, sinks=True, dtype="float16")
    finally:
        lib.tma = True


@needs_sm90
def test_wgmma_inputs_tma_cannot_describe_take_cp_async(lib):
    """A K whose address is not 16-byte aligned, or whose columns are strided, has no tensor map:
    the launch clears its bit and the kernel loads it by cp.async (16-byte or element path)."""
    from bench import cuda_harness as h

    gen = torch.Generator(device="cuda").manual_seed(5)
    dt = torch.bfloat16
    q = _rand((1, 128, 1, 576), dt, gen)
    shifted = _rand((1, 1, 700, 584), dt, gen)[..., 1:577]  # 2-byte offset: unaligned
    columns = _rand((1, 1, 576, 700), dt, gen).transpose(-1, -2)  # column stride 700
    for k in (shifted, columns):
        out = h.run(lib, q, k, k[..., :512], None, None, scale=576**-0.5)
        assert lib.last_maps_ok == Q_MAP  # Q's map alone: the kernel stages Q by cp.async too
        ref = h.reference(q, k, k[..., :512], None, None, scale=576**-0.5)
        assert h.rel_err(out, ref) < TOL["bfloat16"]


@needs_sm90
@pytest.mark.parametrize("pair", [False, True], ids=["one_block", "pair"])
def test_wgmma_q_by_tma_and_by_cp_async(lib, pair):
    """Q comes by TMA where its map is encoded and Lq divides 64; an unaligned Q has no map and
    3 tokens no box of whole row groups: those blocks stage Q by cp.async while K still comes by
    TMA. With Q's strides packed as zeros only the TMA path (which reads the map) stays right:
    that tells which path a block took."""
    from bench import cuda_harness as h

    gen = torch.Generator(device="cuda").manual_seed(13)
    dt = torch.bfloat16
    n, splits = (4096, None) if pair else (1000, 1)
    k = _rand((1, 1, n, 576), dt, gen)
    aligned = _rand((1, 128, 1, 576), dt, gen)
    unaligned = _rand((1, 128, 1, 584), dt, gen)[..., 1:577]  # 2-byte offset
    three = _rand((1, 64, 3, 576), dt, gen)  # 192 rows; 64 % 3 != 0
    for q, maps in ((aligned, ALL_MAPS), (unaligned, ALL_MAPS & ~Q_MAP), (three, ALL_MAPS)):
        kernel = h.plan_for(lib, q, k, k[..., :512], scale=1.0, num_splits=splits)[0].kernel
        assert kernel.startswith("sdpa_vector_wgmma_"), kernel
        if q is aligned:
            assert ("_pair_" in kernel) == pair, kernel
        out = h.run(lib, q, k, k[..., :512], None, None, scale=576**-0.5, num_splits=splits)
        assert lib.last_maps_ok == maps
        ref = h.reference(q, k, k[..., :512], None, None, scale=576**-0.5)
        assert h.rel_err(out, ref) < TOL["bfloat16"]
        lib.zero_strides = {0}  # q's
        try:
            out = h.run(lib, q, k, k[..., :512], None, None, scale=576**-0.5, num_splits=splits)
        finally:
            lib.zero_strides = set()
        assert (h.rel_err(out, ref) < TOL["bfloat16"]) == (maps == ALL_MAPS and q is aligned)


# Splits of 1-32 tiles; forced grids are planned as for a GPU they fill.
PAIR_CASES = {
    "b1_plan": dict(n=32768, view_of_k=True),  # 64 splits merged into 32
    "one_tile_plan": dict(n=4096, view_of_k=True),  # 64 splits of one tile
    "one_tile_partial": dict(n=1000, num_splits=16, view_of_k=True),  # the last of 40 keys
    "32_tiles_plan": dict(b=4, n=32768, view_of_k=True),  # 16 splits of 32 tiles
    "two_splits": dict(b=2, n=1000, num_splits=2, view_of_k=True),  # one merged partial
    "partial_tile": dict(n=5000, num_splits=6, view_of_k=True),
    "two_tiles": dict(n=1000, num_splits=8, view_of_k=True),
    "own_v": dict(hq=64, n=3000, num_splits=4),
    "sinks": dict(b=2, n=3000, num_splits=4, sinks=True, view_of_k=True),
    "causal_2_tokens": dict(hq=64, lq=2, n=2000, num_splits=4, mask="causal", view_of_k=True),
    "bool_mask": dict(n=3000, num_splits=4, mask="bool", view_of_k=True),
    "96_rows": dict(hq=96, n=3000, num_splits=4, view_of_k=True),  # a half-empty row group
    "float16": dict(n=3000, num_splits=4, dtype="float16"),
}


@needs_sm90
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "cp_async"])
@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_wgmma_pair_clusters(lib, case, tma, monkeypatch):
    """MLA's splits in clusters of two (the pair entry point): each block keeps half the
    rows of both splits, merged through distributed shared memory, and the combine merges half
    as many partials. With the seesaw off, so that splits of 8-32 tiles take pairs too (with it,
    the plan keeps pairs for shorter splits)."""
    from aotc.families.sdpa_vector import cuda

    monkeypatch.setattr(cuda, "WGMMA_SEESAW", 0)
    shape = dict(dict(b=1, hq=128, hkv=1, lq=1, d=576, v=512), **PAIR_CASES[case])
    plan_shape = {
        k: x for k, x in shape.items() if k in ("b", "hq", "hkv", "lq", "n", "num_splits")
    }
    splits = shape.get("num_splits")
    row_groups = -(-shape["hq"] * shape["lq"] // (64 * shape["hkv"]))
    sm_count = lib.plan_sm_count
    lib.plan_sm_count = splits and shape["b"] * shape["hkv"] * row_groups * splits
    lib.tma = tma
    try:
        kernel = _first_kernel(
            lib, d=576, v=512, dtype=shape.get("dtype", "bfloat16"), **plan_shape
        )
        assert kernel.startswith("sdpa_vector_wgmma_pair_"), kernel
        for seed in range(2):  # the second call reuses the first one's buffers
            lib.poison = seed == 0
            check(lib, seed=seed, **shape)
    finally:
        lib.tma, lib.poison, lib.plan_sm_count = True, True, sm_count
