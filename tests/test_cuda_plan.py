"""The CUDA launch plan of sdpa_vector: kernel choice, splits, grids and the Params layout."""

from __future__ import annotations

import math
import re
import shutil
import struct
import subprocess
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from aotc.families.sdpa_vector import (
    cuda,
    seesaw_shared_bytes,
    wgmma_has_dual,
    wgmma_has_one,
    wgmma_has_pair,
    wgmma_has_seesaw,
    wgmma_has_short,
    wgmma_supported,
)
from aotc.families.sdpa_vector.cuda import (
    ARGUMENTS,
    COMBINE_FORMAT,
    COMBINE_SIZE,
    FUSED_MAX_SPLITS,
    LONG_SPLIT_TILES,
    PARAMS_SIZE,
    STREAM_BYTES_PER_SM,
    Launch,
    TensorMap,
    blocks_per_sm_cap,
    combine_threads,
    combiner_max_splits,
    compile_steps,
    kernel_config,
    plan_cuda,
    run_cuda,
    run_steps,
    wgmma_shared_bytes,
    with_scale,
)
from aotc.families.sdpa_vector.problem import AttentionProblem, Unsupported

REPO = Path(__file__).resolve().parents[1]
NAMES = (
    {
        f"{prefix}{kind}{t}_{d}_{v}"
        for prefix in ("sdpa_vector_", "sdpa_vector_rows_")  # one m-tile; 2 or 4
        for t in ("float", "float16_t", "bfloat16_t")
        for d, v in ((192, 128), (576, 512), (128, 128))
        for kind in ("", "2pass_1_")
    }
    | {
        f"sdpa_vector_2pass_2_{t}_{v}"
        for t in ("float", "float16_t", "bfloat16_t")
        for v in (128, 512)
    }
    | {f"sdpa_vector_2pass_2t_{t}_{v}" for t in ("float16_t", "bfloat16_t") for v in (128, 512)}
)


def problem(**kw) -> AttentionProblem:
    base = dict(
        batch=1,
        q_heads=32,
        kv_heads=4,
        q_len=1,
        kv_len=4096,
        qk_dim=192,
        v_dim=128,
        dtype="bfloat16",
        mask="none",
        mask_shape=None,
        has_sinks=False,
    )
    base.update(kw)
    return AttentionProblem(**base)


def unpack(launch: Launch) -> tuple:
    return struct.unpack("@f14i", launch.params)


def test_short_kv_is_one_pass():
    (launch,) = plan_cuda(problem(kv_len=31), available=NAMES, sm_count=132)
    assert launch.kernel == "sdpa_vector_bfloat16_t_192_128"
    assert launch.inputs == ("q", "k", "v", "q", "q")
    assert launch.strided_inputs == ("q", "k", "v", "q")
    assert launch.outputs == (("out", (1, 32, 1, 128), "bfloat16"),)
    fields = unpack(launch)
    assert fields[1:9] == (1, 32, 4, 1, 31, 0, 0, 1)  # batch..num_splits
    assert launch.grid == (4, 1, 1) and launch.block == (128, 1, 1)


def test_long_kv_splits_to_fill_the_gpu():
    first, combine = plan_cuda(problem(), available=NAMES, sm_count=132)
    assert first.kernel == "sdpa_vector_2pass_1_bfloat16_t_192_128"
    assert combine.kernel == "sdpa_vector_2pass_2_bfloat16_t_128"
    splits, keys_per_split = unpack(first)[8:10]
    cfg = kernel_config("bfloat16", 192, 128)
    assert keys_per_split % cfg.key_tile == 0
    assert (splits - 1) * keys_per_split < 4096 <= splits * keys_per_split
    assert first.grid[0] == 4 * splits >= 132
    assert first.outputs[0] == ("partials", (1, 32, 1, splits, 128), "float32")
    assert combine.inputs == ("partials", "maxs", "sums", "maxs")
    assert combine.grid == (32, 1, 1)
    threads = 32 * -(-splits // 8)  # split groups of V / 4 threads, 8 splits each
    assert combine.block == (threads, 1, 1) and combine.shared_memory == 16 * threads
    assert struct.unpack("@6i", combine.params) == (32, splits, 32, 1, 0, 0)


def test_split_pass_merges_in_one_launch_when_the_image_has_it():
    fused = "sdpa_vector_2pass_fused_bfloat16_t_192_128"
    few = problem(batch=8, kv_heads=8, kv_len=32768)  # 6 splits
    two = plan_cuda(few, available=NAMES, sm_count=132)
    (launch,) = plan_cuda(few, available=NAMES | {fused}, sm_count=132)
    assert launch.kernel == fused
    assert 1 < unpack(launch)[8] <= FUSED_MAX_SPLITS
    # Same blocks and Params as the two-launch plan's split pass; the merged output comes last
    # (the highest slot), after a flag slot per block.
    assert (launch.grid, launch.block, launch.shared_memory, launch.params) == (
        two[0].grid,
        two[0].block,
        two[0].shared_memory,
        two[0].params,
    )
    # One scratch output: the partials, maxs and sums, then a 64-bit flag slot per block.
    words = sum(math.prod(shape) for _, shape, _ in two[0].outputs) + 2 * launch.grid[0]
    assert launch.outputs == (("scratch", (words,), "float32"), two[1].outputs[0])
    assert unpack(launch)[13] == 0  # no waiting combiners: the last block per row group merges
    # One split needs no merge at all.
    (one,) = plan_cuda(problem(kv_len=31), available=NAMES | {fused}, sm_count=132)
    assert one.kernel == "sdpa_vector_bfloat16_t_192_128"


def test_many_splits_merge_in_waiting_combiners_when_one_wave_holds_them():
    fused = "sdpa_vector_2pass_fused_bfloat16_t_192_128"
    (launch,) = plan_cuda(problem(), available=NAMES | {fused}, sm_count=132)  # batch 1
    fields = unpack(launch)
    splits = fields[8]
    # Fewer splits than the two-launch plan's 64: as many as a combiner merges in one round trip
    # (8 in flight x 4 split groups of its 128 threads over 32 column groups).
    assert unpack(plan_cuda(problem(), available=NAMES, sm_count=132)[0])[8] == 64
    assert splits == combiner_max_splits(kernel_config("bfloat16", 192, 128)) == 32
    # The split blocks of the two-launch plan with that count, then one combiner per query row.
    two = plan_cuda(problem(), available=NAMES, sm_count=132, num_splits=splits)
    assert launch.kernel == fused
    assert launch.grid == (two[0].grid[0] + 32, 1, 1)
    assert (launch.block, launch.shared_memory) == (two[0].block, two[0].shared_memory)
    assert fields[13] == two[0].grid[0]  # combiners_from
    split_fields = unpack(two[0])
    assert fields[:13] == split_fields[:13] and fields[14] == split_fields[14] == 0
    # The scratch ends with a 64-bit flag slot per (row, split).
    words = sum(math.prod(shape) for _, shape, _ in two[0].outputs) + 2 * 32 * splits
    assert launch.outputs == (("scratch", (words,), "float32"), two[1].outputs[0])
    # Forced counts are kept.
    (forced,) = plan_cuda(problem(), available=NAMES | {fused}, sm_count=132, num_splits=64)
    assert unpack(forced)[8] == 64 and unpack(forced)[13] == 4 * 64
    # When the split blocks and the combiners would not all be resident at once (a 24-SM GPU),
    # the combine kernel stays.
    small = plan_cuda(problem(), available=NAMES | {fused}, sm_count=24)
    assert [x.kernel for x in small] == [
        x.kernel for x in plan_cuda(problem(), available=NAMES, sm_count=24)
    ]
    assert len(small) == 2


def test_waiting_combiner_splits_fill_two_blocks_per_sm():
    names = {f"sdpa_vector{k}_bfloat16_t_80_80" for k in ("", "_2pass_1", "_2pass_fused")}
    names |= {"sdpa_vector_2pass_2_bfloat16_t_80"}
    shape = problem(q_heads=16, kv_heads=16, kv_len=8192, qk_dim=80, v_dim=80)
    (launch,) = plan_cuda(shape, available=names, sm_count=132)
    fields = unpack(launch)
    # 128 key tiles per head: 16 splits of 8 (256 split blocks, under 2 x 132), where one wave
    # of three blocks per SM would take 22 of 6.
    assert fields[8] == 16 and fields[9] == 8 * 64
    assert launch.grid[0] == 16 * 16 + 16  # then a combiner per query row
    two_launch = plan_cuda(shape, available=names - {"sdpa_vector_2pass_fused_bfloat16_t_80_80"})
    assert unpack(two_launch[0])[8] == 22
    # Where the combiner's reach is the smaller cap, it stays: 256/128 B=1, 8 KV heads.
    wide = problem(q_heads=32, kv_heads=8, kv_len=32768, qk_dim=256, v_dim=128)
    names = {n.replace("192_128", "256_128") for n in NAMES}
    names |= {"sdpa_vector_2pass_fused_bfloat16_t_256_128"}
    (launch,) = plan_cuda(wide, available=names, sm_count=132)
    assert unpack(launch)[8] == combiner_max_splits(kernel_config("bfloat16", 256, 128)) == 32


def test_split_passes_overlap_the_combine_for_launchers_that_ask_on_sm_90():
    fused = "sdpa_vector_2pass_fused_bfloat16_t_192_128"
    names = NAMES | {fused}
    plan = partial(plan_cuda, available=names, sm_count=132)
    split_pass, combine = plan(problem(), overlap=True)  # sm_90
    # The waiting combiners' split count (the plan without `overlap`), as a split pass and the
    # combine kernel, the combine launched to overlap the split pass's tail.
    (waiting,) = plan(problem())
    assert waiting.kernel == fused and unpack(waiting)[13] > 0
    (sm_80,) = plan(problem(), overlap=True, arch="sm_80")  # no programmatic launch there
    assert sm_80.kernel == fused and unpack(sm_80)[13] > 0
    assert unpack(split_pass)[8] == 32 == combiner_max_splits(kernel_config("bfloat16", 192, 128))
    assert split_pass.kernel == "sdpa_vector_2pass_1_bfloat16_t_192_128"
    assert combine.kernel == "sdpa_vector_2pass_2_bfloat16_t_128"
    assert (split_pass.overlaps_previous, combine.overlaps_previous) == (False, True)
    assert split_pass.grid == (waiting.grid[0] - 32, 1, 1)  # no combiner blocks
    assert [name for name, _, _ in split_pass.outputs] == list(combine.inputs[:3])
    # The two-launch plan at that count (a library without the fused pass), but for the overlap.
    two = plan_cuda(problem(), available=NAMES, sm_count=132, num_splits=32)
    assert [split_pass, replace(combine, overlaps_previous=False)] == two
    # Splits that waiting combiners could not merge in one wave (B=8 at 4 tokens, 512 rows),
    # and the few that the fused pass's last block merges, overlap the combine too.
    many = problem(batch=8, q_len=4, kv_len=8192)
    assert [x.overlaps_previous for x in plan(many, overlap=True)] == [False, True]
    assert not any(x.overlaps_previous for x in plan(many))
    few = problem(batch=8, kv_heads=8, kv_len=32768)  # 6 splits
    assert [x.overlaps_previous for x in plan(few, overlap=True)] == [False, True]
    (last_block,) = plan(few)
    assert last_block.kernel == fused and unpack(last_block)[13] == 0
    # One split needs no merge; the wgmma split pass's combine does not overlap.
    assert len(plan(problem(kv_len=31), overlap=True)) == 1
    mla_plan = plan_cuda(mla(), available=WG_NAMES, sm_count=132, wgmma=True, overlap=True)
    assert not any(x.overlaps_previous for x in mla_plan)


@pytest.mark.parametrize(
    ("arch", "overlaps"),
    [
        ("sm_80", False),
        ("sm_86", False),
        ("compute_80", False),
        ("sm_89", False),
        ("sm_90", True),
        ("sm_90a", True),
        ("compute_90", True),
        ("sm_100", True),
    ],
)
def test_programmatic_launch_needs_sm_90(arch, overlaps):
    assert cuda.overlaps_launches(arch) is overlaps


def test_overlap_reaches_launch_fn_as_a_keyword():
    launches = plan_cuda(problem(), available=NAMES, overlap=True)
    calls = []

    def launch_fn(kernel, inputs, shapes, dtypes, grid, block, smem, params, strided, **kw):
        calls.append((kernel, kw))
        return [f"{kernel}:{i}" for i in range(len(shapes))]

    out = run_cuda(launches, {"q": "Q", "k": "K", "v": "V"}, launch_fn)
    # Only the overlapping launch gets the keyword: plain launch functions need not know it.
    assert calls == [(launches[0].kernel, {}), (launches[1].kernel, {"overlaps_previous": True})]
    assert out == f"{launches[1].kernel}:0"


def _in_flight_per_sm(launch: Launch, cfg, sm_count: int) -> int:
    stages = unpack(launch)[12]
    fit = 233472 // (launch.shared_memory + 1024)  # what the shared memory lets an SM hold
    blocks_per_sm = min(fit, -(-launch.grid[0] // sm_count))
    return blocks_per_sm * (stages - 1) * cfg.key_tile * (cfg.d + cfg.v) * cfg.dtype_size


@pytest.mark.parametrize(
    ("d", "v", "batch", "splits", "stages"),
    [
        (192, 128, 8, 6, 2),  # 3 stages x 3 blocks per SM would keep 120 KB in flight
        (128, 128, 8, 4, 2),  # 64-key tiles: 2 blocks per SM, not 3
        (192, 128, 32, 3, 2),
    ],
)
def test_long_splits_keep_the_streaming_bytes_in_flight(d, v, batch, splits, stages):
    cfg = kernel_config("bfloat16", d, v)
    names = NAMES | {f"sdpa_vector{k}_bfloat16_t_{d}_{v}" for k in ("", "_2pass_1")}
    shape = problem(
        batch=batch, kv_heads=8, kv_len=32768 if batch == 8 else 8192, qk_dim=d, v_dim=v
    )
    first = plan_cuda(shape, available=names, sm_count=132)[0]
    fields = unpack(first)
    assert (fields[8], fields[12]) == (splits, stages)
    assert -(-shape.kv_len // cfg.key_tile) >= LONG_SPLIT_TILES * splits
    assert _in_flight_per_sm(first, cfg, 132) <= STREAM_BYTES_PER_SM
    # Padded past its tiles where a fourth block would fit: the split counts assume three.
    assert cfg.shared_bytes(1, stages) <= first.shared_memory
    assert 4 * (first.shared_memory + 1024) > 233472 >= 3 * (first.shared_memory + 1024)


def test_short_splits_keep_their_stages_and_blocks():
    # Batch 1: a split of a few tiles wants them all requested at once, even past the budget
    # (80/80 with 16 KV heads: 3 blocks per SM, 120 KB in flight).
    cfg = kernel_config("bfloat16", 192, 128)
    first = plan_cuda(problem(), available=NAMES, sm_count=132)[0]
    assert unpack(first)[12] == cfg.stages == 3
    names = {f"sdpa_vector{k}_bfloat16_t_80_80" for k in ("", "_2pass_1")}
    names |= {"sdpa_vector_2pass_2_bfloat16_t_80"}
    shape = problem(q_heads=16, kv_heads=16, kv_len=8192, qk_dim=80, v_dim=80)
    first = plan_cuda(shape, available=names, sm_count=132)[0]
    assert unpack(first)[12] == kernel_config("bfloat16", 80, 80).stages == 3
    assert 16 * unpack(first)[8] > 2 * 132  # more blocks than 2 per SM


def test_fused_plan_runs_through_compile_steps():
    from aotc.families.sdpa_vector.cuda import compile_steps, preparer, run_steps

    fused = "sdpa_vector_2pass_fused_bfloat16_t_192_128"
    few = problem(batch=8, kv_heads=8, kv_len=32768)
    launches = plan_cuda(few, available=NAMES | {fused}, sm_count=132)
    seen = []

    def launch_fn(kernel, inputs, shapes, dtypes, *rest):
        seen.append((kernel, len(inputs), dtypes))
        return [f"{kernel}:{i}" for i in range(len(shapes))]

    steps, out_slot = compile_steps(launches, preparer(launch_fn))
    out = run_steps(steps, out_slot, ["q", "k", "v", None, None])
    assert out == f"{fused}:1"  # "out", after the scratch
    assert seen == [(fused, 5, ["float32", "bfloat16"])]
    # The scratch is the kernel's own: it takes no slot, and "out" takes the first free one.
    assert launches[0].scratch_outputs == (0,)
    assert [step.output_slots for step in steps] == [(out_slot,)]
    assert out_slot == len(ARGUMENTS)


@pytest.mark.parametrize("batch", [1, 8])  # waiting combiners at batch 1, a last block at 8
def test_fused_plan_hands_its_scratch_to_prepare(batch):

    fused = "sdpa_vector_2pass_fused_bfloat16_t_192_128"
    p = problem(batch=batch, kv_heads=8 if batch > 1 else 4, kv_len=32768 if batch > 1 else 4096)
    launches = plan_cuda(p, available=NAMES | {fused}, sm_count=132)
    assert [launch.kernel for launch in launches] == [fused]
    got = []

    def prepare(kernel, shapes, dtypes, *rest):
        got.append((shapes, dtypes, rest[-2]))
        return lambda inputs: []

    compile_steps(launches, prepare)
    ((shapes, dtypes, scratch),) = got
    assert scratch == [0] and dtypes == ["float32", "bfloat16"]
    assert len(shapes) == 2 and len(shapes[0]) == 1  # the scratch is one run of words


def test_fused_scratch_as_output_switch(monkeypatch):
    """FUSED_SCRATCH_AS_OUTPUT=1 (an A/B switch) returns the scratch beside out again."""
    fused = "sdpa_vector_2pass_fused_bfloat16_t_192_128"
    monkeypatch.setattr(cuda, "FUSED_SCRATCH_AS_OUTPUT", 1)
    (launch,) = plan_cuda(problem(kv_heads=4, kv_len=4096), available=NAMES | {fused}, sm_count=132)
    assert launch.scratch_outputs == ()
    steps, out_slot = compile_steps([launch], lambda kernel, *fixed: None)
    assert steps[0].output_slots == (out_slot - 1, out_slot)


def test_many_blocks_stay_one_pass():
    launches = plan_cuda(problem(batch=99, kv_heads=4, kv_len=32768), available=NAMES, sm_count=132)
    assert len(launches) == 1


def test_many_rows_take_the_rows_entry_points():
    """Up to 16 query rows per KV head (one m-tile) run the plain entry points, which hold that
    path alone, and so do fp16/bf16 4-warp blocks up to ROW_GROUPS_MAX_ROWS rows, in row groups;
    other blocks of 17+ rows run `sdpa_vector_rows_...`. A library without those falls back,
    saying why."""
    one_tile = plan_cuda(problem(q_len=2), available=NAMES, sm_count=132)  # 16 rows
    assert all(not x.kernel.startswith("sdpa_vector_rows_") for x in one_tile)
    assert unpack(one_tile[0])[10:12] == (1, 1)
    grouped = plan_cuda(problem(q_len=3), available=NAMES, sm_count=132)  # 24 rows, bf16
    assert grouped[0].kernel == "sdpa_vector_2pass_1_bfloat16_t_192_128"
    assert unpack(grouped[0])[10:12] == (1, 2)  # short splits: two row groups of one m-tile
    long_kv = problem(q_len=3, batch=8, kv_len=32768)  # 256 key tiles a split
    launch = plan_cuda(long_kv, available=NAMES, sm_count=132)[0]
    assert launch.kernel == "sdpa_vector_rows_2pass_1_bfloat16_t_192_128"  # 2 m-tiles, registers
    assert unpack(launch)[10:12] == (2, 1)
    launch = plan_cuda(long_kv, available=NAMES, sm_count=108, arch="sm_80")[0]
    assert unpack(launch)[10:12] == (1, 2)  # sm_80 spilled in that path: one m-tile
    rows = plan_cuda(problem(q_len=3, dtype="float32"), available=NAMES, sm_count=132)
    assert rows[0].kernel == "sdpa_vector_rows_2pass_1_float_192_128"
    assert unpack(rows[0])[10:12] == (2, 1)
    assert rows[1].kernel == "sdpa_vector_2pass_2_float_128"  # the combine has one name
    fused = "sdpa_vector_rows_2pass_fused_float_192_128"
    (launch,) = plan_cuda(
        problem(q_len=3, kv_len=256, dtype="float32"), available=NAMES | {fused}, sm_count=132
    )
    assert launch.kernel == fused
    plain_only = {n for n in NAMES if not n.startswith("sdpa_vector_rows_")}
    assert plan_cuda(problem(q_len=8), available=plain_only, sm_count=132)  # 64 rows, bf16
    with pytest.raises(Unsupported, match=r"sdpa_vector_rows_float_192_128 \(24 query rows"):
        plan_cuda(problem(q_len=3, dtype="float32"), available=plain_only, sm_count=132)
    with pytest.raises(Unsupported, match=r"sdpa_vector_rows_bfloat16_t_192_128 \(72 query"):
        plan_cuda(problem(q_heads=36, q_len=8), available=plain_only, sm_count=132)


def test_gqa_rows_and_row_groups():
    (launch,) = plan_cuda(
        problem(q_heads=128, kv_heads=1, q_len=1, qk_dim=576, v_dim=512, kv_len=64),
        available=NAMES,
        sm_count=132,
        num_splits=1,
    )
    m_tiles, row_groups, stages = unpack(launch)[10:13]
    assert (m_tiles, row_groups) == (4, 2)  # 64 rows per block: K read twice for 128 heads
    cfg = kernel_config("bfloat16", 576, 512)
    # One 8-warp block per SM: as many stages as fit the 227 KB opt-in.
    assert cfg.stages < stages <= cfg.max_stages
    assert cfg.shared_bytes(4, stages) <= 232448 < cfg.shared_bytes(4, stages + 1)
    assert launch.shared_memory == cfg.shared_bytes(4, stages)
    (launch,) = plan_cuda(
        problem(q_heads=32, kv_heads=4, q_len=8), available=NAMES, sm_count=132, num_splits=1
    )
    assert unpack(launch)[10:12] == (1, 4)  # 64 rows, bf16: four row groups of one m-tile
    (launch,) = plan_cuda(
        problem(q_heads=36, kv_heads=4, q_len=8), available=NAMES, sm_count=132, num_splits=1
    )
    # 72 rows, 64 a block: K and V read twice. Blocks of 4 m-tiles share an SM two at a time
    # (their registers), and two fit with the default three stages.
    assert unpack(launch)[10:13] == (4, 2, 3)
    cfg = kernel_config("bfloat16", 192, 128)
    assert blocks_per_sm_cap(cfg, 4) == 2
    assert launch.shared_memory == cfg.shared_bytes(4, 3)
    assert 2 * (cfg.shared_bytes(4, 3) + 1024) <= 233472
    # fp32 128/128 at 2 m-tiles: two blocks of three stages would not share an SM, so two.
    (launch,) = plan_cuda(
        problem(q_heads=32, kv_heads=8, q_len=8, qk_dim=128, v_dim=128, dtype="float32"),
        available=NAMES,
        sm_count=132,
        num_splits=1,
    )
    cfg = kernel_config("float32", 128, 128)
    assert unpack(launch)[10:13] == (2, 1, 2)
    assert 2 * (cfg.shared_bytes(2, 3) + 1024) > 233472


def test_mask_and_sinks_inputs():
    p = problem(mask="bool", mask_shape=(1, 1, 1, 4096), has_sinks=True)
    first, combine = plan_cuda(p, available=NAMES, sm_count=132)
    assert first.inputs == ("q", "k", "v", "mask", "sinks")
    assert first.strided_inputs == ("q", "k", "v", "mask")
    assert unpack(first)[6:8] == (2, 1)
    assert combine.inputs[-1] == "sinks"
    assert (
        unpack(plan_cuda(problem(mask="causal", kv_len=8), available=NAMES, sm_count=132)[0])[6]
        == 1
    )


def test_unsupported():
    with pytest.raises(Unsupported, match="query tokens"):
        plan_cuda(problem(q_len=9), available=NAMES, sm_count=132)
    with pytest.raises(Unsupported, match="no loaded library"):
        plan_cuda(problem(qk_dim=256), available=NAMES, sm_count=132)


def test_scale_repacking():
    launches = plan_cuda(problem(), available=NAMES, sm_count=132, scale=1.0)
    rescaled = with_scale(launches, 0.125)
    assert unpack(rescaled[0])[0] == 0.125
    assert rescaled[0].params[4:] == launches[0].params[4:]
    assert rescaled[1] == launches[1]


def test_run_cuda_wires_outputs():
    launches = plan_cuda(problem(), available=NAMES, sm_count=132)
    calls = []

    def launch_fn(kernel, inputs, shapes, dtypes, grid, block, smem, params, strided):
        calls.append((kernel, inputs, strided))
        return [f"{kernel}:{i}" for i in range(len(shapes))]

    out = run_cuda(launches, {"q": "Q", "k": "K", "v": "V"}, launch_fn)
    assert calls[0][1] == ["Q", "K", "V", "Q", "Q"] and calls[0][2] == [0, 1, 2, 0]
    first = launches[0].kernel
    assert calls[1][1] == [f"{first}:0", f"{first}:1", f"{first}:2", f"{first}:1"]
    assert calls[1][2] == []
    assert out == f"{launches[1].kernel}:0"


def test_prepared_steps_bind_once_with_unread_inputs():
    launches = plan_cuda(problem(), available=NAMES, sm_count=132)
    prepared, calls = [], []

    def prepare(
        kernel, shapes, dtypes, grid, block, smem, params, strided, unread, maps, over, scratch, alt
    ):
        assert maps == []  # the mma.sync kernels take no tensor maps
        assert not over  # plans overlap launches only for launchers that ask
        assert scratch == []  # only the fused pass has scratch
        assert alt is None  # only MLA's wgmma launches have view alternatives
        prepared.append((kernel, grid, params, strided, unread))

        def call(inputs):
            calls.append((kernel, inputs))
            return [f"{kernel}:{i}" for i in range(len(shapes))]

        return call

    steps, out_slot = compile_steps(launches, prepare)
    assert [p[0] for p in prepared] == [launch.kernel for launch in launches]
    # No mask, no sinks: q fills their places, and the kernels are told not to read them.
    assert prepared[0][1:] == (launches[0].grid, launches[0].params, [0, 1, 2, 0], [3, 4])
    assert prepared[1][4] == [3]  # the combine's sinks place
    out = run_steps(steps, out_slot, ["Q", "K", "V", None, None, 0.1])
    assert out == f"{launches[1].kernel}:0"
    assert calls[0][1] == ["Q", "K", "V", "Q", "Q"]


def test_present_mask_and_sinks_are_read():
    p = problem(mask="additive", mask_shape=(1, 1, 1, 4096), has_sinks=True)
    first, combine = plan_cuda(p, available=NAMES, sm_count=132)
    assert first.unread == () and combine.unread == ()
    first, combine = plan_cuda(problem(mask="causal"), available=NAMES, sm_count=132)
    assert first.unread == (3, 4)  # a causal mask is no array


PROBE = r"""
#include <cstdio>
#include <cstddef>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "sdpa_vector_wgmma.cuh"
using namespace aotc_sdpa;
template <typename T, int D, int V> void wcfg(const char* n) {
  std::printf("wgmma %s %d %d %d %d %d %d %d\n", n, D, V, (int)wg::supported<T, D, V>(),
              wg::WCfg<D, V>::SMEM, wg::WCfg<D, V, false>::SMEM,
              (int)wg::WCfg<D, V>::DEEP_FITS, (int)wg::WCfg<D, V>::TWO_BLOCKS_FIT);
}
template <typename T, int D, int V> void cfg(const char* n) {
  using C = Cfg<T, D, V>;
  std::printf("cfg %s %d %d %d %d %d %d %d %d %d %d %d\n", n, D, V, C::NW, C::TK, C::STAGES,
              C::MAX_STAGES, C::KS, C::MT_MAX, shared_bytes<T, D, V>(1, C::STAGES),
              shared_bytes<T, D, V>(2, C::STAGES), shared_bytes<T, D, V>(4, C::MAX_STAGES));
}
int main() {
  std::printf("params %zu %zu %zu %zu\n", sizeof(Params), offsetof(Params, scale),
              offsetof(Params, reserved), sizeof(CombineParams));
  cfg<__nv_bfloat16, 192, 128>("bfloat16"); cfg<__half, 576, 512>("float16");
  cfg<float, 576, 512>("float32"); cfg<float, 96, 64>("float32"); cfg<__half, 80, 80>("float16");
  cfg<__nv_bfloat16, 320, 256>("bfloat16"); cfg<float, 256, 128>("float32");
  wcfg<__nv_bfloat16, 576, 512>("bfloat16"); wcfg<__half, 192, 128>("float16");
  wcfg<__nv_bfloat16, 256, 128>("bfloat16"); wcfg<__nv_bfloat16, 128, 128>("bfloat16");
  wcfg<__half, 512, 512>("float16"); wcfg<__nv_bfloat16, 448, 384>("bfloat16");
  wcfg<float, 192, 128>("float32"); wcfg<__half, 80, 80>("float16");
  wcfg<__half, 64, 128>("float16"); wcfg<__nv_bfloat16, 128, 256>("bfloat16");
  // batch 1, 32 query heads, one token, 32 splits, V = 128, a flag slot per (row, split)
  std::printf("scratch %lld\n", fused_scratch_words(32LL * 32, 128, 32LL * 32));
  std::printf("wparams %zu %zu %zu %zu\n", sizeof(wg::WParams), offsetof(wg::WParams, maps),
              offsetof(wg::WParams, maps_ok), alignof(wg::WParams));
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_header_layout_matches_plan(tmp_path):
    src = tmp_path / "probe.cu"
    src.write_text(PROBE)
    exe = tmp_path / "probe"
    subprocess.run(
        ["nvcc", "-std=c++17", f"-I{REPO / 'kernels' / 'cuda'}", "-o", exe, src], check=True
    )
    lines = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.splitlines()
    size, scale_off, last_off, combine_size = map(int, lines[0].split()[1:])
    # The struct may end in alignment padding, which the launch primitive zero-fills.
    assert size == -(-PARAMS_SIZE // 8) * 8 and scale_off == 128 and last_off == PARAMS_SIZE - 4
    assert combine_size == COMBINE_SIZE
    # The launch contract's tail (cuda_launch.cpp, bench.cuda_harness): the tensor maps at the
    # next 64-byte boundary after the packed Params, 128 bytes each, then their bit word; the
    # whole a multiple of 64 bytes.
    (wparams,) = [line for line in lines if line.startswith("wparams ")]
    wsize, maps_at, ok_at, align = map(int, wparams.split()[1:])
    packed = PARAMS_SIZE  # the strides of q, k, v and the mask, then the plan's bytes
    maps = len(plan_cuda(mla(), available=WG_NAMES, sm_count=132, wgmma=True)[0].tensor_maps)
    assert maps_at == -(-packed // 64) * 64 and ok_at == maps_at + maps * 128 and align == 64
    assert wsize == -(-(ok_at + 4) // 64) * 64
    scratch = [int(line.split()[1]) for line in lines if line.startswith("scratch ")]
    fused = "sdpa_vector_2pass_fused_bfloat16_t_192_128"
    (launch,) = plan_cuda(problem(), available=NAMES | {fused}, sm_count=132)
    assert unpack(launch)[8] == 32 and scratch == [launch.outputs[0][1][0]]
    for line in lines[1:]:
        kind, dtype, *nums = line.split()
        if kind in ("scratch", "wparams"):
            continue
        if kind == "wgmma":
            d, v, supported, smem, smem_short, deep_fits, two_blocks = map(int, nums)
            assert wgmma_supported(dtype, d, v) == bool(supported), line
            assert wgmma_shared_bytes(d, v) == smem, line
            assert wgmma_shared_bytes(d, v, two_deep=False) == smem_short, line
            assert wgmma_has_short(dtype, d, v) == (bool(supported) and bool(deep_fits)), line
            dual = bool(supported) and bool(deep_fits) and bool(two_blocks)
            assert wgmma_has_dual(dtype, d, v) == dual, line
            continue
        d, v, nw, tk, stages, max_stages, ks, mt_max, smem1, smem2, smem4 = map(int, nums)
        cfg = kernel_config(dtype, d, v)
        got = (
            cfg.warps,
            cfg.key_tile,
            cfg.stages,
            cfg.max_stages,
            cfg.k_splits,
            cfg.max_m_tiles,
            cfg.shared_bytes(1),
            cfg.shared_bytes(2),
            cfg.shared_bytes(4, cfg.max_stages),
        )
        assert got == (nw, tk, stages, max_stages, ks, mt_max, smem1, smem2, smem4), line


WG_NAMES = NAMES | {f"sdpa_vector_wgmma_{t}_576_512" for t in ("float16_t", "bfloat16_t")}


def mla(**kw) -> AttentionProblem:
    base = dict(q_heads=128, kv_heads=1, qk_dim=576, v_dim=512, kv_len=32768, batch=8)
    base.update(kw)
    return problem(**base)


def test_wgmma_serves_mla_when_the_image_has_it():
    first, combine = plan_cuda(mla(), available=WG_NAMES, sm_count=132, wgmma=True)
    assert first.kernel == "sdpa_vector_wgmma_bfloat16_t_576_512"
    assert combine.kernel == "sdpa_vector_2pass_2_bfloat16_t_512"
    assert first.block == (384, 1, 1)
    assert first.shared_memory == wgmma_shared_bytes(576, 512) <= 232448
    (*_, splits, keys_per_split, m_tiles, row_groups, stages, _, _) = unpack(first)
    assert (m_tiles, row_groups, stages) == (4, 2, 2)
    assert keys_per_split % 64 == 0 and splits * keys_per_split >= 32768
    assert first.grid == (8 * 2 * splits, 1, 1)
    assert first.outputs[0][1] == (8, 128, 1, splits, 512)
    # K and V tiles come by TMA: a box of one 128-byte column atom by 64 keys each; Q in boxes
    # of a row group's 64 rows (one token of 64 heads).
    assert first.tensor_maps == (
        TensorMap("k", 64, 64),
        TensorMap("v", 64, 64),
        TensorMap("q", 64, 1, 64),
    )
    assert combine.tensor_maps == ()


@pytest.mark.parametrize(("q_len", "box"), [(1, (1, 64)), (2, (2, 32)), (8, (8, 8)), (3, (1, 64))])
def test_q_map_boxes_hold_a_row_group_in_its_row_order(q_len, box):
    # Rows g * Lq + i: Lq tokens (innermost) of 64 / Lq heads; where Lq does not divide 64 the
    # kernel stages Q by cp.async and the map (any valid box) goes unread.
    first, _ = plan_cuda(mla(q_len=q_len), available=WG_NAMES, sm_count=132, wgmma=True)
    assert first.tensor_maps[2] == TensorMap("q", 64, *box)


def test_combine_blocks_take_every_split_in_one_round_trip():
    # MLA B=8: 1024 rows of 8 splits, one split group of V / 4 threads (8 splits in flight).
    _, combine = plan_cuda(mla(), available=WG_NAMES, sm_count=132, wgmma=True)
    assert combine.grid == (1024, 1, 1)
    assert combine.block == (128, 1, 1) and combine.shared_memory == 16 * 128
    # MLA B=1 takes 64 splits: four groups (512 threads, the most), two round trips.
    first, combine = plan_cuda(mla(batch=1), available=WG_NAMES, sm_count=132, wgmma=True)
    assert unpack(first)[8] == 64 and combine.block == (512, 1, 1)
    assert [combine_threads(128, s) for s in (1, 8, 9, 64, 65, 200)] == [32, 32, 64, 256, 288, 512]
    assert combine_threads(256, 64) == 512 and combine_threads(320, 64) == 480
    assert combine_threads(80, 64) == combine_threads(64, 2) == 128


def test_tensor_maps_reach_prepare_and_launch_fn_by_input_index():
    launches = plan_cuda(mla(), available=WG_NAMES, sm_count=132, wgmma=True)
    maps = []
    compile_steps(launches, lambda kernel, *fixed: maps.append(fixed[-4]))
    # q, k and v are inputs 0, 1 and 2
    assert maps == [[(1, 64, 64, 1), (2, 64, 64, 1), (0, 64, 1, 64)], []]
    calls = []

    def launch_fn(kernel, inputs, shapes, dtypes, grid, block, smem, params, strided, **kw):
        calls.append(kw)
        return [f"{kernel}:{i}" for i in range(len(shapes))]

    run_cuda(launches, {"q": "Q", "k": "K", "v": "V"}, launch_fn)
    # Only launches with maps get the keyword: plain launch functions need not know it.
    assert calls == [{"tensor_maps": [(1, 64, 64, 1), (2, 64, 64, 1), (0, 64, 1, 64)]}, {}]


def test_wgmma_needs_the_flag_the_kernel_and_enough_rows():
    plain = plan_cuda(mla(), available=WG_NAMES, sm_count=132)
    assert plain[0].kernel == "sdpa_vector_rows_2pass_1_bfloat16_t_576_512"  # 4 m-tiles
    missing = plan_cuda(mla(), available=NAMES, sm_count=132, wgmma=True)
    assert missing[0].kernel == "sdpa_vector_rows_2pass_1_bfloat16_t_576_512"
    few_rows = plan_cuda(
        mla(q_heads=16, qk_dim=192, v_dim=128),
        available=WG_NAMES | {"sdpa_vector_wgmma_bfloat16_t_192_128"},
        sm_count=132,
        wgmma=True,
    )
    assert few_rows[0].kernel == "sdpa_vector_2pass_1_bfloat16_t_192_128"
    # Wide heads (D + V >= 1024) take wgmma even with few rows (memory-bound GQA 8).
    wide = plan_cuda(mla(q_heads=8), available=WG_NAMES, sm_count=132, wgmma=True)
    assert wide[0].kernel == "sdpa_vector_wgmma_bfloat16_t_576_512"
    f32 = plan_cuda(mla(dtype="float32"), available=WG_NAMES, sm_count=132, wgmma=True)
    assert f32[0].kernel == "sdpa_vector_rows_2pass_1_float_576_512"


def test_wgmma_serves_more_rows_than_a_register_block():
    """33-63 rows a KV head (17-63 past 128/128): wgmma's one 64-row group reads K and V once,
    where the mma.sync kernels' row groups of 32 read them twice or more (or, at 17-32 rows,
    once but below copy speed); not where its grid would be tiny."""
    names = NAMES | {"sdpa_vector_wgmma_bfloat16_t_192_128", "sdpa_vector_wgmma_bfloat16_t_128_128"}

    def first(**kw):
        return plan_cuda(problem(**kw), available=names, sm_count=132, wgmma=True)[0].kernel

    long_kv = dict(kv_len=32768)
    assert first(q_len=5, **long_kv) == "sdpa_vector_wgmma_bfloat16_t_192_128"  # 40 rows
    assert first(q_len=7, **long_kv) == "sdpa_vector_wgmma_bfloat16_t_192_128"  # 56 rows
    # 17-32 rows: heads wider than 128/128 take wgmma, 128/128 keeps two register m-tiles.
    assert first(q_len=4, **long_kv) == "sdpa_vector_wgmma_bfloat16_t_192_128"  # 32 rows
    assert first(q_len=3, **long_kv) == "sdpa_vector_wgmma_bfloat16_t_192_128"  # 24 rows
    assert not first(q_len=2, **long_kv).startswith("sdpa_vector_wgmma")  # 16 rows
    square = dict(long_kv, qk_dim=128, v_dim=128)
    assert not first(q_len=4, **square).startswith("sdpa_vector_wgmma")  # 32 rows
    assert first(q_len=5, **square) == "sdpa_vector_wgmma_bfloat16_t_128_128"  # 40 rows
    assert first(q_len=5) == "sdpa_vector_wgmma_bfloat16_t_192_128"  # N=4096: 64 blocks
    gqa12 = dict(q_heads=48, q_len=3, qk_dim=128, v_dim=128)  # 36 rows
    assert first(**gqa12, batch=8, kv_len=8192).startswith("sdpa_vector_wgmma")
    # N=1024 at batch 1: 16 wgmma blocks, under a quarter of the SMs.
    assert not first(**gqa12, kv_len=1024).startswith("sdpa_vector_wgmma")
    assert not first(q_len=5, dtype="float32", **long_kv).startswith("sdpa_vector_wgmma")


def test_wgmma_splits_fill_one_wave_of_one_block_per_sm():
    names = WG_NAMES | {"sdpa_vector_wgmma_bfloat16_t_192_128"}

    def grid(p):
        return plan_cuda(p, available=names, sm_count=132, wgmma=True)[0].grid[0]

    # 4 KV heads (B=1) and 8 (B=2) of 40 rows: 32 and 16 splits, 128 blocks (not 116 and 120).
    assert grid(problem(q_len=5, kv_len=32768)) == 128
    assert grid(problem(batch=2, q_len=5, kv_len=32768)) == 128
    # Narrow heads' splits keep 2 tiles: N=4096 (64 tiles) gives 4 KV heads 32 splits each,
    # and N=2048 16; MLA keeps 4 (B=1 N=8192: 32 splits, not 64).
    assert grid(problem(q_len=5, kv_len=4096)) == 128
    assert grid(problem(q_len=5, kv_len=2048)) == 64
    assert grid(mla(batch=1, kv_len=8192)) == 2 * 32
    # 48 row groups fill one wave to 96 blocks only: two waves of 5 splits fill them better.
    assert grid(problem(batch=12, q_len=5, kv_len=32768)) == 240
    assert grid(mla()) == 16 * 8 and grid(mla(batch=1)) == 2 * 64  # MLA as before


def test_wgmma_short_splits_take_the_one_deep_entry_point():
    deep, short = (f"sdpa_vector_wgmma{s}_bfloat16_t_192_128" for s in ("", "_short"))
    names = WG_NAMES | {deep, short}

    def split_pass(p, available=names, num_splits=None):
        first = plan_cuda(p, available=available, sm_count=132, wgmma=True, num_splits=num_splits)
        return first[0].kernel, first[0].shared_memory

    deep_bytes, short_bytes = wgmma_shared_bytes(192, 128), wgmma_shared_bytes(192, 128, False)
    assert short_bytes < deep_bytes
    # 8 tokens at GQA 8: N=4096 splits hold 2 tiles, N=8192 4 (one wave of 4 KV heads' splits).
    assert split_pass(problem(q_len=8, kv_len=4096)) == (short, short_bytes)
    assert split_pass(problem(q_len=8, kv_len=8192)) == (deep, deep_bytes)
    assert split_pass(problem(q_len=8, kv_len=130), num_splits=1) == (deep, deep_bytes)
    assert split_pass(problem(q_len=8, kv_len=128), num_splits=1) == (short, short_bytes)
    # An image without it, and pairs whose two-deep layout does not fit (576/512), keep the one.
    assert split_pass(problem(q_len=8, kv_len=4096), names - {short}) == (deep, deep_bytes)
    assert not wgmma_has_short("bfloat16", 576, 512) and wgmma_has_short("float16", 192, 128)
    (mla_first, _) = plan_cuda(mla(batch=1, kv_len=256), available=names, sm_count=132, wgmma=True)
    assert mla_first.kernel == "sdpa_vector_wgmma_bfloat16_t_576_512"


def test_two_row_groups_take_the_dual_entry_point():
    """128/128 KV heads of 2+ 64-row groups run two blocks an SM (the dual entry point), their
    splits sized for one wave of 2 x 132 blocks, where those splits keep 16+ tiles."""
    deep, short, dual = (
        f"sdpa_vector_wgmma{s}_bfloat16_t_128_128" for s in ("", "_short", "_dual")
    )
    names = WG_NAMES | {deep, short, dual}

    def split_pass(available=names, num_splits=None, **kw):
        p = problem(qk_dim=128, v_dim=128, **kw)
        first = plan_cuda(p, available=available, sm_count=132, wgmma=True, num_splits=num_splits)
        return first[0].kernel, first[0].grid[0], first[0].shared_memory

    deep_bytes = wgmma_shared_bytes(128, 128)
    gqa16 = dict(q_heads=64, kv_heads=4, q_len=8, kv_len=32768)  # 128 rows: two groups
    # B=8: 64 row groups, 4 splits of 128 tiles (256 blocks; one block an SM would run 2).
    assert split_pass(batch=8, **gqa16) == (dual, 256, deep_bytes)
    assert split_pass(names - {dual}, batch=8, **gqa16) == (deep, 128, deep_bytes)
    assert split_pass(batch=1, **dict(gqa16, q_len=6)) == (dual, 256, deep_bytes)  # 96 rows
    assert split_pass(batch=4, **dict(gqa16, kv_len=8192)) == (dual, 256, deep_bytes)  # 16 tiles
    # Splits under 16 tiles at 2 x 132 blocks: the one-block plan.
    assert split_pass(batch=2, **dict(gqa16, kv_len=8192)) == (deep, 128, deep_bytes)  # 8
    assert split_pass(batch=1, **dict(gqa16, kv_len=8192)) == (deep, 128, deep_bytes)  # 4
    assert split_pass(num_splits=1, **dict(gqa16, kv_len=1025))[0] == dual  # 17 tiles
    assert split_pass(num_splits=1, **dict(gqa16, kv_len=1000))[0] == dual  # 16, partial
    assert split_pass(num_splits=1, **dict(gqa16, kv_len=960))[0] == deep  # 15 tiles
    # One row group (GQA 8 at 8 tokens) keeps one block an SM; 192/128 has no dual build.
    assert split_pass(batch=8, **dict(gqa16, q_heads=32))[:2] == (deep, 128)
    assert not wgmma_has_dual("bfloat16", 192, 128) and wgmma_has_dual("float16", 128, 128)
    assert wgmma_has_dual("bfloat16", 128, 128) and not wgmma_has_dual("float32", 128, 128)


def test_mla_splits_merge_in_clusters_of_two(monkeypatch):
    """KV heads of 64+ rows with wide heads (MLA) whose grid, split down to 1 tile, has an even
    split count of 1-32 tiles a split take the clusters-of-two entry point: one partial per two
    splits and a combine over half the splits, also where the grid leaves SMs idle (short KV).
    Longer splits, odd counts, fewer rows, the switch off or an image without it keep the
    two-deep kernel and its 4-tile splits."""
    from aotc.families.sdpa_vector import cuda

    pair, deep = (f"sdpa_vector_wgmma{s}_bfloat16_t_576_512" for s in ("_pair", ""))
    names = WG_NAMES | {pair}

    def plan(available=names, num_splits=None, sm_count=132, **kw):
        p = mla(**kw)
        return plan_cuda(
            p, available=available, sm_count=sm_count, wgmma=True, num_splits=num_splits
        )

    cases = (  # (shape, splits, keys a split): every grid 128 blocks
        (dict(batch=1), 64, 512),  # 8 tiles: the two-deep plan's grid too
        (dict(batch=8, kv_len=8192), 8, 1024),
        (dict(batch=2, kv_len=8192), 32, 256),
        (dict(batch=1, kv_len=8192), 64, 128),  # 2 tiles, where the two-deep plan takes 4
        (dict(batch=1, kv_len=4096), 64, 64),  # 1 tile: 128 blocks, not the plan's 32
        (dict(batch=4), 16, 2048),  # 32 tiles
        (dict(batch=2, q_heads=64), 64, 512),  # one row group
    )
    for kw, splits, keys in cases:
        first, merge = plan(**kw)
        assert first.kernel == pair and first.grid == (128, 1, 1), kw
        assert unpack(first)[8:10] == (splits, keys), kw
        stats = (kw["batch"], kw.get("q_heads", 128), 1, splits // 2)
        assert [shape for _, shape, _ in first.outputs] == [(*stats, 512), stats, stats]
        assert struct.unpack(COMBINE_FORMAT, merge.params)[1] == splits // 2
    one_block = plan(names - {pair}, batch=1, kv_len=8192)[0]
    assert one_block.kernel == deep and unpack(one_block)[8:10] == (32, 256)  # 64 blocks
    for kv_len, blocks in ((2048, 64), (512, 16)):  # 1-tile splits on part of the GPU
        short = plan(batch=1, kv_len=kv_len)[0]
        assert short.kernel == pair and short.grid == (blocks, 1, 1), kv_len
        assert unpack(short)[8:10] == (blocks // 2, 64), kv_len
    assert plan(batch=8)[0].kernel == deep  # 64 tiles a split
    assert plan(num_splits=2, kv_len=1000)[0].kernel == pair  # 4 blocks of 8 tiles
    assert plan(num_splits=7, kv_len=3000, sm_count=112)[0].kernel == deep  # odd
    assert plan(batch=1, q_heads=32)[0].kernel == deep  # 32 rows: partials of 32 rows
    monkeypatch.setattr(cuda, "WGMMA_PAIRS", 0)
    assert plan(batch=1)[0].kernel == deep
    assert wgmma_has_pair("bfloat16", 576, 512) and wgmma_has_pair("float16", 576, 512)
    assert not wgmma_has_pair("float32", 576, 512) and not wgmma_has_pair("bfloat16", 192, 128)


def test_wgmma_keeps_a_combine_for_one_split_and_padding_rows():
    launches = plan_cuda(
        mla(q_heads=96, q_len=3, kv_len=50), available=WG_NAMES, sm_count=132, wgmma=True
    )
    assert [launch.kernel.split("_")[2] for launch in launches] == ["wgmma", "2pass"]
    (*_, splits, keys_per_split, _, row_groups, _, _, _) = unpack(launches[0])
    assert (splits, keys_per_split, row_groups) == (1, 64, 5)  # 288 rows in groups of 64
    assert launches[0].grid == (8 * 5, 1, 1)


def test_wgmma_one_split_is_one_launch_where_loaded(monkeypatch):
    """Row groups of one key split take the one-pass entry point, where the image has it: the
    split pass's launch (grid, params, maps, inputs) writing `out`, with no combine."""
    one = "sdpa_vector_wgmma_one_bfloat16_t_576_512"
    names = WG_NAMES | {one}
    shapes = (  # 132 / 2 row groups: 66 batches of MLA fill the SMs with one split each
        (dict(batch=66, kv_len=4096), False),
        (dict(batch=128, kv_len=4096), True),  # two waves of one split
        (dict(q_heads=96, q_len=3, kv_len=50), True),  # 8 x 5 row groups, padding rows
    )
    for shape, sinks in shapes:
        p = mla(**shape, has_sinks=sinks)
        (launch,) = plan_cuda(p, available=names, sm_count=132, wgmma=True)
        split_pass, _ = plan_cuda(p, available=WG_NAMES, sm_count=132, wgmma=True)
        out = (("out", p.output_shape, "bfloat16"),)
        assert launch == replace(split_pass, kernel=one, outputs=out), shape
        assert unpack(launch)[8] == 1
        assert launch.inputs[4] == ("sinks" if sinks else "q")
        assert (4 in launch.unread) == (not sinks)
    deep = "sdpa_vector_wgmma_bfloat16_t_576_512"
    several = plan_cuda(mla(batch=8), available=names, sm_count=132, wgmma=True)
    assert [launch.kernel for launch in several] == [deep, "sdpa_vector_2pass_2_bfloat16_t_512"]
    monkeypatch.setattr(cuda, "WGMMA_ONE_PASS", 0)
    two = plan_cuda(mla(batch=66, kv_len=4096), available=names, sm_count=132, wgmma=True)
    assert [launch.kernel for launch in two] == [deep, "sdpa_vector_2pass_2_bfloat16_t_512"]
    assert wgmma_has_one("float16", 576, 512) and not wgmma_has_one("bfloat16", 192, 128)


def test_wgmma_takes_one_split_where_the_model_says_it_is_faster():
    """Where the wave-filling rule gives MLA three splits, the one-pass entry point takes one
    instead when _wgmma_cost says so; the choices measured on an H200 (round 37)."""
    names = WG_NAMES | {"sdpa_vector_wgmma_one_bfloat16_t_576_512"}

    def first(batch, kv_len, available=names):
        launch = plan_cuda(
            mla(batch=batch, kv_len=kv_len), available=available, sm_count=132, wgmma=True
        )[0]
        return launch.kernel.split("_")[3], unpack(launch)[8], launch.grid[0]

    # 200 blocks in one split: two waves of 32 or 64 tiles beat five of 11 or 22 and a combine.
    assert first(100, 2048) == ("one", 1, 200) and first(100, 4096) == ("one", 1, 200)
    # One split: 160 blocks, a second wave of 28; 80 blocks, 52 of 132 SMs idle.
    assert first(80, 4096) == ("bfloat16", 3, 480) and first(40, 8192) == ("bfloat16", 3, 240)
    assert first(100, 8192) == ("bfloat16", 3, 600)  # one split measured level there
    # Without the one-pass entry point the rule's split count stands.
    assert first(100, 2048, WG_NAMES) == ("bfloat16", 3, 600)
    p = mla(batch=100, kv_len=4096)
    three, one = cuda._wgmma_grid(p, 132, None), cuda._wgmma_grid(p, 132, 1)
    assert (three[1], one[1]) == (3, 1)
    # 5 waves x (22 tiles x 2 + 12) + 12800 rows x 3 x 2 KB at 5 TB/s + 2, against 2 x (64 x 2 + 12)
    assert cuda._wgmma_cost(p, three, 132) == pytest.approx(5 * 56 + 12800 * 3 * 2048 / 5e6 + 2)
    assert cuda._wgmma_cost(p, one, 132) == pytest.approx(2 * 140)


SEESAW = "sdpa_vector_wgmma_seesaw_bfloat16_t_576_512"
SEESAW_ONE = "sdpa_vector_wgmma_seesaw_one_bfloat16_t_576_512"
WG_ALL = WG_NAMES | {
    f"sdpa_vector_wgmma_{kind}_bfloat16_t_576_512"
    for kind in ("pair", "one", "seesaw", "seesaw_one", "t_partials")
}


def test_mla_splits_of_eight_tiles_take_the_seesaw_where_v_is_a_view(monkeypatch):
    """MLA grids whose splits hold WGMMA_SEESAW_MIN_TILES tiles or more, or one split of any
    count: the two-deep split pass (its partials in T, as the seesaw's) or the one pass with the
    seesaw entry point as its view alternative (V a prefix view of K), 256 threads and its own
    shared memory; the rest of the launch is the one-block plan's."""
    deep = "sdpa_vector_wgmma_t_partials_bfloat16_t_576_512"
    alt = cuda.ViewAlternative(SEESAW, (256, 1, 1), seesaw_shared_bytes(576, 512), "v", "k")
    shapes = (
        dict(batch=8, kv_len=8192),
        dict(batch=8, kv_len=32768),
        dict(batch=1, q_len=2),
        dict(q_heads=96, q_len=3),  # Lq does not divide 64: the seesaw stages Q by cp.async
    )
    for shape in shapes:
        p = mla(**shape)
        split, combine = plan_cuda(p, available=WG_ALL, sm_count=132, wgmma=True)
        assert (split.kernel, split.alternative) == (deep, alt), shape
        assert split.grid == (cuda._wgmma_blocks(p, cuda._wgmma_grid(p, 132, None)), 1, 1)
        assert combine.alternative is None
        assert unpack(split)[9] >= cuda.WGMMA_SEESAW_MIN_TILES * 64  # keys a split
    p = mla(batch=64, kv_len=4096, has_sinks=True)  # one split a row group: the one pass
    (one,) = plan_cuda(p, available=WG_ALL, sm_count=132, wgmma=True)
    assert one.kernel == "sdpa_vector_wgmma_one_bfloat16_t_576_512"
    assert one.alternative == replace(alt, kernel=SEESAW_ONE)
    assert one.inputs[4] == "sinks" and one.outputs == (("out", p.output_shape, "bfloat16"),)
    # A one pass of fewer tiles takes it too, even or odd (WGMMA_SEESAW_SHORT_ONE_PASS).
    for kv_len in (1, 64, 128, 200, 384, 448):
        (short,) = plan_cuda(
            mla(batch=64, kv_len=kv_len), available=WG_ALL, sm_count=132, wgmma=True
        )
        assert short.kernel == "sdpa_vector_wgmma_one_bfloat16_t_576_512", kv_len
        assert short.alternative == replace(alt, kernel=SEESAW_ONE), kv_len
    monkeypatch.setattr(cuda, "WGMMA_SEESAW_SHORT_ONE_PASS", 0)
    (short,) = plan_cuda(mla(batch=64, kv_len=128), available=WG_ALL, sm_count=132, wgmma=True)
    assert short.alternative is None
    # Splits under 8 tiles keep the pairs; so do KV heads of under 64 rows (32 heads), and
    # calls without the seesaw or with WGMMA_SEESAW = 0.
    for shape in (dict(batch=2, kv_len=8192), dict(q_heads=32)):
        launches = plan_cuda(mla(**shape), available=WG_ALL, sm_count=132, wgmma=True)
        assert all(launch.alternative is None for launch in launches), shape
    b8 = mla(batch=8, kv_len=8192)
    plain = plan_cuda(b8, available=WG_ALL - {SEESAW, SEESAW_ONE}, sm_count=132, wgmma=True)
    monkeypatch.setattr(cuda, "WGMMA_SEESAW", 0)
    assert plan_cuda(b8, available=WG_ALL, sm_count=132, wgmma=True) == plain
    assert plain[0].kernel == "sdpa_vector_wgmma_pair_bfloat16_t_576_512"
    assert wgmma_has_seesaw("float16", 576, 512) and not wgmma_has_seesaw("bfloat16", 512, 512)


def test_seesaw_split_plans_keep_partials_in_t():
    """A split plan with the seesaw as its view alternative: the seesaw stores its partials in
    the call's dtype, so the launch's own kernel is the two-deep split pass that does too
    (_t_partials), and the combine of such partials (2pass_2t) merges them; without either the
    seesaw's split pass is not taken. Every other plan keeps fp32 partials and the fp32
    combine; one passes have no partials."""
    for dtype in ("bfloat16", "float16"):
        names = {name.replace("bfloat16", dtype) for name in WG_ALL}
        p = mla(batch=8, kv_len=8192, dtype=dtype)
        split, combine = plan_cuda(p, available=names, sm_count=132, wgmma=True)
        assert split.kernel == f"sdpa_vector_wgmma_t_partials_{dtype}_t_576_512"
        assert split.alternative.kernel == f"sdpa_vector_wgmma_seesaw_{dtype}_t_576_512"
        assert split.outputs[0] == ("partials", (8, 128, 1, 8, 512), dtype)
        assert combine.kernel == f"sdpa_vector_2pass_2t_{dtype}_t_512"
        assert combine.inputs[0] == "partials"
        for missing in (split.kernel, combine.kernel):
            without = plan_cuda(p, available=names - {missing}, sm_count=132, wgmma=True)
            assert all(launch.alternative is None for launch in without)
            assert without[0].outputs[0][2] == "float32"
            assert without[1].kernel == f"sdpa_vector_2pass_2_{dtype}_t_512"
    for shape in (dict(batch=2, kv_len=8192), dict(q_heads=32)):  # pairs; rows under 64
        split, combine = plan_cuda(mla(**shape), available=WG_ALL, sm_count=132, wgmma=True)
        assert split.alternative is None and split.outputs[0][2] == "float32", shape
        assert combine.kernel == "sdpa_vector_2pass_2_bfloat16_t_512"
    (one,) = plan_cuda(mla(batch=64, kv_len=4096), available=WG_ALL, sm_count=132, wgmma=True)
    assert one.kernel == "sdpa_vector_wgmma_one_bfloat16_t_576_512" and one.alternative


def test_the_seesaw_takes_one_split_where_its_own_model_says_it_is_faster():
    """Where the seesaw serves KV heads of 64+ rows, one split or the rule's splits is chosen by
    the seesaw's model (SEESAW_COST, its split passes' partials in T); the choices as measured
    on an H200 (round 43). Fewer rows a KV head keep the three-warpgroup model (WGMMA_COST)."""

    def first(batch, kv_len, **kw):
        p = mla(batch=batch, kv_len=kv_len, **kw)
        launch = plan_cuda(p, available=WG_ALL, sm_count=132, wgmma=True)[0]
        return launch.kernel.split("_")[3], unpack(launch)[8]

    # One split: 96 x 2 row groups of 32 tiles in two waves, against three of 16-tile splits
    # (122.6 us against 140.9); B=68 (119.9 / 120.2), B=100 N=4096 (242.6 / 265.1).
    assert first(96, 2048) == first(68, 2048) == first(100, 4096) == ("one", 1)
    # The rule's splits: B=80 N=4096 (206.8 / 230.7), B=40 N=8192 (186.3 / 213.6).
    assert first(80, 4096) == first(40, 8192) == ("t", 3)
    # 16 heads of one token: the three-warpgroup model keeps its splits (71.5 us against 78.0).
    assert first(80, 2048, q_heads=16) == ("bfloat16", 3)
    p = mla(batch=96, kv_len=2048)
    rule, one = cuda._wgmma_grid(p, 132, None), cuda._wgmma_grid(p, 132, 1)
    assert (rule[1], rule[2] // 64, one[1]) == (2, 16, 1)
    # 3 waves x (16 tiles x 1.6 + 12 + 3.4) + 12288 rows x 2 x 1 KB at 23 MB/us + 2.8, against
    # 2 waves x (32 tiles x 1.6 + 12).
    split = cuda._wgmma_cost(p, rule, 132, cuda.SEESAW_COST, 2)
    assert split == pytest.approx(3 * (16 * 1.6 + 12 + 3.4) + 12288 * 2 * 1024 / 2.3e7 + 2.8)
    assert cuda._wgmma_cost(p, one, 132, cuda.SEESAW_COST) == pytest.approx(2 * (32 * 1.6 + 12))


def test_seesaw_split_plans_overlap_their_combine_for_launchers_that_ask():
    """The seesaw's split passes (and the T-partials entry point taken in their place) let the
    next grid launch at their start, so where the launcher overlaps launches (the torch
    harness), their combine is launched to overlap the split pass's tail. MLX's plans
    (overlap=False) and every other wgmma plan keep two plain launches: the pairs' split pass
    has no early trigger (round 43: overlapped, it ran up to 1.3% slower)."""
    p = mla(batch=8, kv_len=8192)
    plain = plan_cuda(p, available=WG_ALL, sm_count=132, wgmma=True)
    split, combine = plan_cuda(p, available=WG_ALL, sm_count=132, wgmma=True, overlap=True)
    assert combine.kernel == "sdpa_vector_2pass_2t_bfloat16_t_512"
    assert (split.overlaps_previous, combine.overlaps_previous) == (False, True)
    assert [split, replace(combine, overlaps_previous=False)] == plain
    assert not any(launch.overlaps_previous for launch in plain)
    pairs = plan_cuda(
        mla(batch=2, kv_len=8192), available=WG_ALL, sm_count=132, wgmma=True, overlap=True
    )
    assert pairs[1].kernel == "sdpa_vector_2pass_2_bfloat16_t_512"
    assert not any(launch.overlaps_previous for launch in pairs)
    (one,) = plan_cuda(
        mla(batch=64, kv_len=4096), available=WG_ALL, sm_count=132, wgmma=True, overlap=True
    )
    assert not one.overlaps_previous


def test_view_alternatives_reach_prepare_by_input_index():
    """prepare gets (kernel, block, shared memory, view index, base index); the torch harness's
    launch_fn gets it as `view_alternative`, only where a launch has one."""
    launches = plan_cuda(mla(batch=8, kv_len=8192), available=WG_ALL, sm_count=132, wgmma=True)
    got = []
    compile_steps(launches, lambda kernel, *fixed: got.append(fixed[-1]))
    smem = seesaw_shared_bytes(576, 512)
    assert got == [(SEESAW, (256, 1, 1), smem, 2, 1), None]  # v is input 2, k input 1
    calls = []

    def launch_fn(kernel, inputs, *fixed, **extra):
        calls.append((kernel, extra.get("view_alternative")))
        return [None] * len(fixed[0])

    run_cuda(launches, {"q": 0, "k": 1, "v": 2}, launch_fn)
    assert calls == [(launches[0].kernel, got[0]), (launches[1].kernel, None)]


def test_wgmma_splits_keep_whole_tiles():
    for kv_len, forced in ((8192, None), (8192, 7), (1000, 64), (65537, None)):
        first, _ = plan_cuda(
            mla(batch=1, kv_len=kv_len),
            available=WG_NAMES,
            sm_count=132,
            wgmma=True,
            num_splits=forced,
        )
        (*_, splits, keys_per_split, _, _, _, _, _) = unpack(first)
        assert keys_per_split % 64 == 0
        assert (splits - 1) * keys_per_split < kv_len <= splits * keys_per_split
        if forced is None:
            assert keys_per_split >= 4 * 64 or splits == 1


@pytest.mark.parametrize(
    ("dtype", "d", "v", "ok"),
    [
        ("bfloat16", 576, 512, True),
        ("float16", 192, 128, True),
        ("float16", 320, 256, True),
        ("float32", 576, 512, False),
        ("bfloat16", 96, 64, False),
        ("bfloat16", 576, 448, False),
        ("bfloat16", 1024, 512, False),  # shared memory
    ],
)
def test_wgmma_supported_pairs(dtype, d, v, ok):
    assert wgmma_supported(dtype, d, v) is ok


# Pairs whose K and V rows split into differently shaped parts (atoms of 64 columns): 576/512
# (5 + 4 K atoms, or 4 + 4 V atoms and 1 past V), 320/256 (a 3-atom part: row pieces that are no
# power of two), 192/128 (2 + 1), 64/128 (a one-atom K row: an empty second part).
WGMMA_PARTS_PAIRS = [(576, 512), (320, 256), (192, 128), (64, 128)]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_wgmma_kernels_compile_with_pipelined_mmas(tmp_path):
    """Every part shape (and a one-deep and a dual entry point) compiles for sm_90a, and ptxas
    keeps the MMAs asynchronous: it reports C7520 when it serializes wgmma and C7519 when it
    injects warpgroup arrives around them."""
    assert all(wgmma_supported("bfloat16", d, v) for d, v in WGMMA_PARTS_PAIRS)
    src = tmp_path / "wgmma.cu"
    src.write_text(
        '#include "sdpa_vector_wgmma.cuh"\n'
        + "".join(
            f"AOTC_SDPA_VECTOR_WGMMA(bfloat16, __nv_bfloat16, {d}, {v})\n"
            for d, v in WGMMA_PARTS_PAIRS
        )
        + "AOTC_SDPA_VECTOR_WGMMA_SHORT(bfloat16, __nv_bfloat16, 192, 128)\n"
        + "AOTC_SDPA_VECTOR_WGMMA_DUAL(bfloat16, __nv_bfloat16, 128, 128)\n"
    )
    result = subprocess.run(
        ["nvcc", "-O3", "-std=c++17", f"-I{REPO / 'kernels' / 'cuda'}",
         "-gencode=arch=compute_90a,code=sm_90a", "-cubin", "-Xptxas", "-v",
         "-o", tmp_path / "wgmma.cubin", src],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    entries = result.stderr.count("Compiling entry function 'sdpa_vector_wgmma_")
    assert entries == len(WGMMA_PARTS_PAIRS) + 2, result.stderr[-4000:]  # one short, one dual
    for code in ("C7520", "C7519"):
        assert code not in result.stderr, result.stderr[-4000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_seesaw_kernels_compile_relocatable_with_pipelined_mmas_and_no_spills(tmp_path):
    """The seesaw entry points as aotc ships them (relocatable, sm_90a): ptxas keeps every wgmma
    asynchronous (C7515: accumulators defined by other instructions mid-pipeline, a branch
    among the MMAs did it), and their ~250 registers a thread fit 256 threads without spills
    (no `setmaxnreg`, which relocatable builds ignore)."""
    src = tmp_path / "seesaw.cu"
    src.write_text(
        '#include "sdpa_vector_wgmma.cuh"\n'
        + "".join(
            f"AOTC_SDPA_VECTOR_WGMMA_SEESAW{kind}({tn}, {t}, 576, 512)\n"
            for kind in ("", "_ONE")
            for tn, t in (("bfloat16_t", "__nv_bfloat16"), ("float16_t", "__half"))
        )
    )
    result = subprocess.run(
        ["nvcc", "-O3", "-std=c++17", "-rdc=true", f"-I{REPO / 'kernels' / 'cuda'}",
         "-gencode=arch=compute_90a,code=sm_90a", "-c", "-Xptxas", "-v",
         "-o", tmp_path / "seesaw.o", src],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stderr
    assert log.count("Compiling entry function 'sdpa_vector_wgmma_seesaw_") == 4, log[-4000:]
    for code in ("C7515", "C7520", "C7519"):
        assert code not in log, log[-4000:]
    for entry in log.split("Compiling entry function 'sdpa_vector_wgmma_seesaw_")[1:]:
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in entry, entry
        registers = int(re.search(r"Used (\d+) registers", entry).group(1))
        assert registers * 256 <= 65536, entry
