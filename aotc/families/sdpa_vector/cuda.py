"""The CUDA launch plan of `sdpa_vector`: which kernels, grids and packed Params for a problem.

Mirrors `kernels/cuda/sdpa_vector.cuh` (`Cfg`, `shared_bytes`, `Params`, `CombineParams`); the
kernel traps when the plan and the header disagree on the shared-memory size or block shape.

A block of the attention kernels handles one (batch, KV head, key split, row group); its rows are
the GQA group's query heads times the query tokens, so K and V are read once per KV head. Short
KV (or enough blocks already) runs one pass; otherwise the keys are split so that one wave of
resident blocks fills the GPU, and a combine kernel merges the splits.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from aotc.families.base import KERNEL_TYPE_NAMES
from aotc.families.sdpa_vector import (
    combine_name,
    combine_t_name,
    fused_split_name,
    many_rows_name,
    one_pass_name,
    seesaw_shared_bytes,
    split_pass_name,
    wgmma_dual_name,
    wgmma_name,
    wgmma_one_name,
    wgmma_pair_name,
    wgmma_seesaw_name,
    wgmma_seesaw_one_name,
    wgmma_shared_bytes,
    wgmma_short_name,
    wgmma_supported,
    wgmma_t_partials_name,
)
from aotc.families.sdpa_vector.problem import AttentionProblem, Unsupported

# Strided inputs of the attention kernels, in Params order; absent mask -> q's strides.
ATTENTION_STRIDED = ("q", "k", "v", "mask")
STRIDE_BYTES = 4 * 8  # four int64 strides per strided input
# Params after the strides: scale, then 14 ints (the last reserved); CombineParams: 6 ints.
PARAMS_FORMAT = "@f14i"
COMBINE_FORMAT = "@6i"
PARAMS_SIZE = len(ATTENTION_STRIDED) * STRIDE_BYTES + struct.calcsize(PARAMS_FORMAT)
COMBINE_SIZE = struct.calcsize(COMBINE_FORMAT)
MASK_KINDS = {"none": 0, "causal": 1, "bool": 2, "additive": 3}
DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class WgmmaCost:
    """Microseconds of the parts of a one-block-an-SM wgmma call (_wgmma_cost)."""

    tile_us: float
    block_us: float
    combine_bytes_per_us: float
    launch_us: float
    split_block_us: float = 0.0

    def rates(self) -> tuple[float, ...]:
        """What multiplies each of _wgmma_cost_terms' terms."""
        per_byte = 1 / self.combine_bytes_per_us
        return (self.tile_us, self.block_us, self.split_block_us, per_byte, self.launch_us)


MAX_QUERY_TOKENS = 8
DEFAULT_SM_COUNT = 132
# The SM counts of each architecture's most common part (A100, A10/A6000, L40/4090 class), where
# the driver cannot say.
TYPICAL_SM_COUNTS = {"sm_80": 108, "sm_86": 84, "sm_89": 128}
# Per-block dynamic shared memory opt-in limit and per-SM shared memory (H100/H200: 227 KB and
# 228 KB; A100: 163 KB and 164 KB).
SHARED_LIMITS = {"sm_80": (166912, 167936), "sm_90": (232448, 233472)}


# Splits whose loads a merging thread issues at once (kCombineSplitsInFlight of the header), and
# the combine kernel's __launch_bounds__.
COMBINE_SPLITS_IN_FLIGHT = 8
COMBINE_MAX_THREADS = 512


def combine_threads(v_dim: int, num_splits: int) -> int:
    """Threads of a combine block (one query row): split groups of V / 4 threads, as many as
    merge every split in one round trip, up to 512. A group more than that only takes room
    that other rows' blocks could use: MLA B=8's 1024 rows of 8 splits ran in four waves of
    256-thread blocks (11.3 us of a 162 us call, H100, bench/NOTES.md round 12), in one of 128.
    V < 128 takes 128 threads (H200, round 3)."""
    if v_dim < 128:
        return 128
    group = v_dim // 4
    groups = -(-num_splits // COMBINE_SPLITS_IN_FLIGHT)
    return max(group, min(group * groups, COMBINE_MAX_THREADS // group * group))


# The wgmma kernel (sm_90a): 64 query rows and 64 keys per step, three warpgroups, one block per
# SM. It pays off where the rows sharing a KV head fill its 64-row MMAs (MLA's 128 heads), and
# from 33 rows: past the 32 that one two-m-tile register block holds, the mma.sync kernels read
# K and V once per row group. H100, bench/NOTES.md round 20, us, mma.sync plan / wgmma: 192/128
# N=32768 GQA 8 at 5 and 7 tokens (40, 56 rows) B=1 70.7-72.2 / 44.4-47.4, B=8 417-419 / 258;
# GQA 12 at 3 tokens (36 rows) B=8 N=8192 124-125 / 72; 256/128 B=1 N=8192 at 7 tokens 29.8 /
# 20.5. With two-deep K and V slots (round 21) it also leads at 17-32 rows for heads wider than
# 128/128 (round 22, us, register path / wgmma, GQA 4 at 8 tokens): 192/128 B=8 N=32768 470-473
# / 445-446 (H100), 431 / 326-349 (H200); 256/128 B=1 N=32768 83 / 77-78, 76 / 57; 320/256 B=8
# N=8192 361 / 216-217, 366-367 / 149-150; short KV (B=1 N=1024-4096) even or ahead. 128/128's
# register block already reads at copy there (H200 263 / 288-297 on wgmma, round 21): it keeps
# the register path up to 32 rows.
WGMMA_ROWS = 64
WGMMA_KEYS = 64
WGMMA_ATOM_COLS = 64  # 16-bit columns of one 128-byte swizzle atom
WGMMA_THREADS = 384
WGMMA_MIN_ROWS = 17
WGMMA_SMALL_HEADS = 256  # D + V up to this: wgmma from WGMMA_SMALL_HEADS_MIN_ROWS
WGMMA_SMALL_HEADS_MIN_ROWS = 33
# Below 64 rows, a wgmma grid this far under the SM count leaves the short, latency-bound call
# to mma.sync's many blocks (GQA 12, 3 tokens, B=1 N=1024: 16 wgmma blocks 11.6 us against 10.3).
WGMMA_MIN_GRID_SHARE = 4  # sm_count // this
# ... and where K and V rows are wide (576/512 with GQA 8: 8 rows, memory-bound), the mma.sync
# kernel's one 8-warp block per SM lags: wgmma 752 vs 804 us on an H100 (bench/NOTES.md).
WGMMA_WIDE_HEADS = 1024  # D + V
# Key tiles a wgmma split keeps at least (Q, 64 x D, is staged once per block). Wide heads
# (MLA) need 4: at 2, MLA B=1 N=8192 ran 26.7 us against 24.5, N=4096 23.3 against 22.2. Narrow
# ones gain from 2 at short KV: 192/128 GQA 8 at 5 and 7 tokens, B=1 N=4096, 13.4 and 13.9 us
# against 15.4 and 15.8; 128/128 GQA 12 at 5 tokens 12.4 against 14.2 (H100, round 20).
WGMMA_MIN_TILES = 4
WGMMA_NARROW_MIN_TILES = 2
# Key tiles a split needs for the wgmma kernel's two-deep K and V slots (kDeepMinTiles of
# sdpa_vector_wgmma.cuh); where no split has that many, the plan takes the one-deep entry point
# (wgmma_short_name): 192/128 GQA 8 at 8 tokens, B=1 N=4096, 13.5 us against 14.1 (H100, round 21).
WGMMA_DEEP_MIN_TILES = 3
# KV heads of this many 64-row groups (GQA 16 at 8 tokens: 2) take the dual entry point where the
# image has one (128/128): two blocks an SM, each bound by its serial S, softmax and P V chain,
# fill each other's gaps, where its splits (sized for 2 x the SMs) keep WGMMA_DUAL_MIN_TILES
# tiles. 128/128 GQA 16 at 8 tokens, us, dual / one block (bench/NOTES.md round 22): B=8
# N=32768 219-225 / 241-243 (H100), 221-222 / 239-242 (H200); H200 B=4 N=32768 116 / 125, N=8192
# (16-tile splits) 37.5 / 39; shorter splits lose: B=2 N=8192 (8 tiles) 25-26 / 24-25, B=1 (4)
# 18.5 / 17.3. One row group (GQA 8 at 8 tokens) loses 1-15% (80 registers, round 22).
WGMMA_DUAL_MIN_ROW_GROUPS = 2
WGMMA_DUAL_BLOCKS_PER_SM = 2  # the dual entry point's launch bounds
WGMMA_DUAL_MIN_TILES = 16
# The clusters-of-two entry point (wide heads) serves one-block-an-SM grids with an even split count
# of WGMMA_PAIR_MIN_TILES to WGMMA_PAIR_MAX_TILES tiles a split (WGMMA_PAIRS = 0 turns it off, for
# A/B runs). H100, bench/NOTES.md round 23, us, pairs / one block: MLA B=1 N=32768 (8 tiles)
# 36.6-37.4 / 38.4-38.5; B=8 N=8192 (16) 51.4-53.8 / 52.6-55.2; B=2 N=8192 (4) 28.6-28.9 /
# 32.0-32.3; B=1 N=8192 (2 tiles, 128 blocks) 24.1-24.2 / 24.5-24.9 at the one-block plan's 4. But
# 64-block grids (B=1 N=8192 at 4 tiles: 25.0-25.3 / 24.1) and 64-tile splits of two row groups (B=8
# N=32768: 146.9-151.2 / 143.8-144.5) lost.
# Round 24 (H200, 2e6cfe4's kernels): 1-tile splits on 128 blocks beat the one-block plan's 32
# (MLA B=1 N=4096 17.3 / 19.8-19.9 us, B=2 N=2048 16.8-16.9 / 19.2-19.4), and 32-tile splits
# gained or tied (B=2 N=65536 78.2-78.4 / 82.2-83.1, B=4 N=32768 77.4-78.3 / 80.3-80.7,
# B=16 N=8192 80.5-81.0 / 80.6-80.7); 64 tiles still lost (141.9-142.3 / 140.3-140.7).
WGMMA_PAIRS = 1
WGMMA_PAIR_MIN_TILES = 1
WGMMA_PAIR_MAX_TILES = 32
# Percent of the SMs a pair grid must cover. Round 23 asked 90: pairs lost on 64-block grids
# of 4-tile splits, the one-block grid's size. Split down to 1 tile, a pair grid is never
# smaller than the one-block plan's, and short-KV MLA ran 10-22% faster on any of them (H200,
# round 24: B=1 N=2048 64 blocks 15.4-15.5 us against 16 blocks 18.9; B=1 N=1024 32 against
# 8, 14.3-14.6 / 18.2; B=1 N=512 16 against 4, 14.1-14.3 / 18.0-18.2).
WGMMA_PAIR_MIN_FILL = 0
# Row groups of one key split (MLA at 59-66, 128 or 256 sequences on 132 SMs, where whole row
# groups fill the waves best) take the one-pass wgmma entry point where loaded: the block writes
# the output, with no partials and no combine launch.
# 0 keeps the split pass and the combine (an A/B switch for bench.variants --plan-constant).
WGMMA_ONE_PASS = 1
# Where the one-pass entry point is loaded, a grid the wave-filling rule gives several splits
# takes one split instead when a model of the call says it is faster (_wgmma_cost, WgmmaCost):
# waves of blocks x (a split's 64-key tiles x tile_us + block_us), plus, for splits, waves x
# split_block_us (a split block's partials and its share of the tail) and the combine reading
# the partials (fp32, or T for the seesaw's) at combine_bytes_per_us, + launch_us (its launch).
#
# The three-warpgroup block's model (round 37): H200, MLA, forced split counts (bench/NOTES.md
# round 37, harness, three rounds): B=100 N=2048 150.5-160.2 us in one split against
# 180.3-182.5 in the rule's three, N=4096 277.6-282.0 against 289.9-302.2; B=80 N=4096 and B=40
# N=8192 stay faster in three (227.5-234.4 against 275.5-293.4; 207.8-208.1 against
# 258.3-260.0), as the model says.
WGMMA_COST = WgmmaCost(tile_us=2.0, block_us=12.0, combine_bytes_per_us=5.0e6, launch_us=2.0)
# The seesaw's (KV heads of 64+ rows where the seesaw is loaded; round 43): fitted (`python3 -m
# bench.fit_cost`), by least squares of the relative error with block_us held at 12, to 63 MLA
# calls on an H200 (bench/results/2026-11-30-r43-one-split-sweep.json), one split
# and the rule's 2-5 forced, B=36-108 at 1k-8k keys, plain launches. It chooses right at 59
# (fitted leaving out each key length or batch band, the same) and costs at most 2.1% at the
# other four; round 37's model chose the seesaw's splits up to 15% slower (B=68-96 N=2048, its
# T partials and the seesaw's tiles unknown to it). It changes 112 of 9984 MLA plans (16-128
# heads, 1-4 tokens, B=1-256, 256-65536 keys); of 50 timed against round 37's, 47 ran 0.8-32%
# faster (B=64 of 16 heads x 4 tokens at 512 keys: 22.5 us against 33.0), three 1-3% slower
# (B=12 at 512 keys, B=36 N=3072). With fewer rows a KV head it lost at 13 of 16 (up to 17%).
SEESAW_COST = WgmmaCost(
    tile_us=1.6, block_us=12.0, split_block_us=3.4, combine_bytes_per_us=2.3e7, launch_us=2.8
)
# Where V is K's prefix (MLA), the seesaw entry points (sdpa_vector_seesaw.cuh: two warpgroups that
# take turns with the key tiles, each overlapping the other's softmax) run the wgmma split pass and
# the one pass faster, as the launches' view alternatives: KV heads of 64+ query rows whose splits
# hold WGMMA_SEESAW_MIN_TILES tiles or more; shorter splits keep the plan above (pairs). H200,
# harness, bench/NOTES.md round 38 (calls C, D), us, seesaw / the tree's plan: MLA B=8 N=8192
# 44.0-44.5 / 47.4-48.7 (pairs); B=8 N=32768 123.8-132.4 / 139.3-158.8; B=16 N=8192 71.8-74.3 /
# 81.8-85.5; B=64 N=4096 (one split) 123.1-125.9 / 143.4-147.1; B=256 N=2048 278.0-291.9 /
# 329.0-329.6; B=1 N=32768 (8 tiles) 31.6-32.2 / 32.1-32.4; B=2 N=8192 (4 tiles) 26.1-27.7 /
# 24.1-27.4. Q by cp.async where Lq does not divide 64 (speculative decoding's 3, 5-7 tokens). 0
# turns them off (A/B runs).
WGMMA_SEESAW = 1
WGMMA_SEESAW_THREADS = 256
WGMMA_SEESAW_MIN_TILES = 8
# A one pass (one split a row group) of fewer tiles takes the seesaw too. H200, harness, us,
# seesaw / the three-warpgroup one pass, bench/NOTES.md round 40 (call K): MLA B=64 N=128 12.2 /
# 13.5; B=64 N=256 16.6 / 17.6; B=512 N=128 83.3 / 96.6; B=32 N=256 14.0 / 24.3 (that plan split
# it); and round 41 (call B), odd counts, whose last pair skips its absent second tile: B=64 N=64
# 11.0 / 11.5; B=512 N=64 76.6 / 80.3; B=256 N=192 59.6 / 62.5; B=128 N=320 38.9 / 41.7; B=128
# N=448 46.1 / 49.9. 0 turns it off.
WGMMA_SEESAW_SHORT_ONE_PASS = 1
# The fused split pass's last block per row group merges that group's splits alone: worth it for
# a few (B=8 rows: 6 splits, 1-2% faster than with the combine kernel on an H200), not for many.
# At batch 1 every split count loses (bench.sweep_splits, H200): 192/128 with 8 splits 26.8 us
# fused against 25.2, 64 splits 22.5 against 12.7; a merge by one block is on the critical path.
# Beyond FUSED_MAX_SPLITS, when the split blocks and a block per query row fit one wave of
# resident blocks, the fused pass runs with waiting combiners instead: one launch that merges
# each row in its own block, as the combine kernel does.
FUSED_MAX_SPLITS = 8
# On sm_90+ every split pass is followed by the combine kernel launched to overlap its tail
# (programmatic dependent launch: its blocks start as split blocks leave and wait in-kernel for
# the partials), in place of the fused pass, with the fused pass's split counts. H200, us
# (bench/NOTES.md round 26, same calls, sides alternating): 192/128 B=1 9.7 against 11.1-11.2
# with waiting combiners; 80/80 B=1 16.1 against 17.5-17.8; 256/128 B=1 54.2 against 55.7-55.9;
# against the last block's merge, 192/128 B=8 306.3-306.7 against 309.6-310.8 and 32x192/128
# 308.6-308.9 against 314.7-315.2; against plain two launches 0.4-1.2 us a call. Of the wgmma
# split passes only the seesaw's overlap (WGMMA_OVERLAP_COMBINE). Only for launchers that
# overlap launches in their stream (plan_cuda's `overlap`).
OVERLAP_COMBINE = 1
# MLX's CUDA graphs give an edge no type, so under MLX two overlapping launches are one
# primitive whose child graph holds the programmatic edge: that cost more host time than the
# overlap saved (round 26, H200, bench.host_cost: 21.0 us a call against 15.8 with waiting
# combiners; 192/128 B=1 evaluated alone 38.5-46.8 against 31.1; bench.mlx_sdpa 32.7 us a call
# in chains of 8 against 16.6). MLX's plans keep the fused pass (an A/B switch).
MLX_OVERLAP_COMBINE = 0
# The seesaw's split plans (its split pass, or the T-partials entry point in its place) overlap
# their combine too: both allow the next grid at their start. H200, harness, MLA (bench/NOTES.md
# round 43, same calls, 8 rounds alternating): B=8 N=8192 40.0 us against 40.7, B=1-4 2-2.4%
# faster, B=8 N=16384 1.9%, B=8 N=32768 and B=16 level. The pairs' and the other wgmma split
# passes are not overlapped: with a trigger there, MLA B=1 N=8192's pairs ran 1.3% slower, and
# the two-deep kernel 1% slower in plain launches (MLX's plans; overlapped, 1.1-2.5% faster).
WGMMA_OVERLAP_COMBINE = 1
# A flag slot of the fused pass's scratch is 64 bits (aotc_sdpa::Slot): two 4-byte words.
SLOT_WORDS = 2
# The fused pass's scratch is a scratch output of its launch (Launch.scratch_outputs): MLX's
# primitive allocates it at evaluation and returns out alone. 1 returns it as an output array
# beside out, as before round 34 (an A/B switch for bench.build_cost and bench.eval_wait).
FUSED_SCRATCH_AS_OUTPUT = 0
# Bytes of K and V tiles in flight per SM where splits stream (at least LONG_SPLIT_TILES tiles
# each): a block keeps stages - 1 tiles loading while it computes one. Past this the reads slow
# (bench/NOTES.md round 9). H100: 192/128 B=8 441 us with 2 stages x 3 blocks per SM (60 KB)
# against 448 with 3 stages (120 KB); 128/128 B=8 352 us with 2 blocks per SM (64 KB) against
# 359 with 3 (96 KB). H200: 192/128 B=8 308 against 314 us. Short (batch-1) splits are left
# out: 80/80 B=1 with 2 blocks per SM instead of 3 gained 0.6 us on an H100 and lost 0.5-1.9
# on an H200.
STREAM_BYTES_PER_SM = 64 * 1024
LONG_SPLIT_TILES = 32


# Query rows per KV head up to which 4-warp fp16/bf16 blocks run the register path in row groups
# (_register_row_groups). bench_sdpa --q-len, H200 (bench/NOTES.md round 19), us, shared-memory
# 2-4 m-tile blocks / row groups of one m-tile: 128/128 B=8 N=32768, 32 rows 442 / 313; 192/128
# 25.8 / 18.4 at 56 rows (N=4096); 24 rows, B=8 192/128 608 / 521. Past 64 rows (wgmma's, on
# sm_90a) it was not measured.
ROW_GROUPS_MAX_ROWS = 64
# m-tiles of such a row group past 16 rows, where splits are long: the register path holds two,
# and one K or V fragment serves both (H100: 192/128 B=8 N=32768 at 32 rows 475 us against 520-526
# in row groups of one m-tile; 256/128 B=1 81 against 96).
ROW_GROUP_M_TILES = 2


@dataclass(frozen=True)
class Launch:
    kernel: str
    inputs: tuple[str, ...]
    outputs: tuple[tuple[str, tuple[int, ...], str], ...]
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_memory: int
    params: bytes
    strided_inputs: tuple[str, ...]
    # Inputs the kernel does not read: an absent mask's or sinks' place, filled by another
    # input (the kernel takes a fixed parameter list). They pass as null pointers.
    unread: tuple[int, ...] = ()
    # TMA descriptors the launch encodes at evaluation, after the Params bytes: per map, the
    # input and its box (columns, rows); see TensorMap in docs/ARCHITECTURE.md.
    tensor_maps: tuple[TensorMap, ...] = ()
    # The launch may start while the one before it runs (programmatic dependent launch, sm_90+):
    # its kernel waits in-kernel (griddepcontrol.wait) before reading what that one wrote.
    overlaps_previous: bool = False
    # Outputs (indices) that are the kernel's own scratch: no later launch reads them, so MLX's
    # primitive allocates them per evaluation instead of returning them (each output array
    # costs MLX host time at every call). They take no slot of a plan.
    scratch_outputs: tuple[int, ...] = ()
    # The kernel the launch takes instead where, at evaluation, one input is a prefix view of
    # another and every tensor map was encoded (ViewAlternative).
    alternative: ViewAlternative | None = None


@dataclass(frozen=True)
class ViewAlternative:
    """A kernel with the launch's grid, inputs, outputs and params, but its own block and
    dynamic shared memory, taken where input `view` is a prefix view of input `base` (the same
    address, type and strides, the innermost dimension no longer) and every tensor map was
    encoded: only evaluation can see that MLA's V is K's first columns."""

    kernel: str
    block: tuple[int, int, int]
    shared_memory: int
    view: str = "v"
    base: str = "k"


@dataclass(frozen=True)
class TensorMap:
    """A tiled TMA descriptor of one input over all its dimensions (innermost first, the
    input's own strides), in boxes of `box_cols` x `box_rows` x `box_planes` on the three
    innermost dimensions and 1 on the others, 128-byte swizzled."""

    input: str
    box_cols: int
    box_rows: int
    box_planes: int = 1


@dataclass(frozen=True)
class KernelConfig:
    """`Cfg<T, D, V>` of the header."""

    warps: int
    key_tile: int
    stages: int  # default (three 4-warp blocks per SM); 8-warp blocks take up to max_stages
    max_stages: int
    pad: int
    k_splits: int
    max_m_tiles: int
    dtype_size: int
    d: int
    v: int

    @property
    def threads(self) -> int:
        return self.warps * 32

    def shared_bytes(self, m_tiles: int, stages: int | None = None) -> int:
        ts, tk, rows = self.dtype_size, self.key_tile, 16 * m_tiles
        dp, vp, qp = self.d, self.v, self.d + self.pad  # K and V tile rows are unpadded
        pp, sp = tk + self.pad, tk + 4
        stages = self.stages if stages is None else stages
        return ts * (stages * tk * (dp + vp) + rows * qp + rows * pp) + 4 * (
            self.k_splits * rows * sp + 3 * rows
        )


def kernel_config(dtype: str, d: int, v: int) -> KernelConfig:
    ts = DTYPE_SIZES[dtype]
    warps = 8 if d > 256 or v > 256 else 4
    tk = 64 if (d + v) * ts * 64 <= 32 * 1024 else 32 if (d + v) * ts * 32 <= 32 * 1024 else 16
    pad = 16 // ts
    stage_bytes = tk * (d + v) * ts
    stages = 3 if 3 * stage_bytes <= 72 * 1024 else 2
    n_tiles = tk // 8
    return KernelConfig(
        warps=warps,
        key_tile=tk,
        stages=stages,
        max_stages=6,
        pad=pad,
        k_splits=warps // n_tiles if warps > n_tiles else 1,
        max_m_tiles=4,
        dtype_size=ts,
        d=d,
        v=v,
    )


def pack_params(
    *,
    scale: float,
    problem: AttentionProblem,
    num_splits: int,
    keys_per_split: int,
    m_tiles: int,
    row_groups: int,
    stages: int,
    combiners_from: int = 0,
) -> bytes:
    p = problem
    return struct.pack(
        PARAMS_FORMAT,
        scale,
        p.batch,
        p.q_heads,
        p.kv_heads,
        p.q_len,
        p.kv_len,
        MASK_KINDS[p.mask],
        int(p.has_sinks),
        num_splits,
        keys_per_split,
        m_tiles,
        row_groups,
        stages,
        combiners_from,
        0,
    )


def pack_combine_params(problem: AttentionProblem, num_splits: int) -> bytes:
    p = problem
    rows = p.batch * p.q_heads * p.q_len
    return struct.pack(COMBINE_FORMAT, rows, num_splits, p.q_heads, p.q_len, int(p.has_sinks), 0)


def _register_row_groups(rows: int, cfg: KernelConfig) -> bool:
    """Whether blocks of these rows run the register path (fp16/bf16, 4 warps, 1 or 2 m-tiles)
    in row groups that each read K and V (siblings at adjacent block indices, so mostly from L2),
    rather than 2-4 m-tile blocks that share S and P through shared memory at three barriers a
    tile."""
    return rows <= ROW_GROUPS_MAX_ROWS and cfg.warps == 4 and cfg.dtype_size == 2


def _m_tiles(rows: int, cfg: KernelConfig, max_shared: int) -> int:
    """16-row m-tiles per block (block_layout may take one instead of ROW_GROUP_M_TILES)."""
    if _register_row_groups(rows, cfg):
        return 1 if rows <= 16 else ROW_GROUP_M_TILES
    want = 1 if rows <= 16 else 2 if rows <= 32 else 4
    m_tiles = min(want, cfg.max_m_tiles)
    while m_tiles > 1 and cfg.shared_bytes(m_tiles) > max_shared:
        m_tiles //= 2
    if cfg.shared_bytes(m_tiles) > max_shared:
        raise Unsupported(
            f"D={cfg.d}, V={cfg.v} needs {cfg.shared_bytes(m_tiles)} bytes of shared memory, "
            f"over this GPU's {max_shared}"
        )
    return m_tiles


def blocks_per_sm_cap(cfg: KernelConfig, m_tiles: int) -> int:
    """Resident blocks per SM that the kernels' registers allow, as `Cfg::min_blocks` promises
    them to ptxas: three 4-warp blocks of one m-tile, two of 2 or 4 m-tiles (their accumulators
    need more than the 168 registers of three), one 8-warp block. Waiting combiners rely on it:
    a grid counted as one wave must be resident at once."""
    if cfg.warps != 4:
        return 1
    return 3 if m_tiles == 1 else 2


def _stages(cfg: KernelConfig, m_tiles: int, max_shared: int, sm_shared: int) -> int:
    """Key-tile stages: the default for 4-warp blocks, down to 2 when their resident blocks
    would not share an SM otherwise (the split counts assume them); an 8-warp block owns its SM,
    so it takes as many stages as shared memory holds (more bytes in flight)."""
    if cfg.warps == 4:
        blocks = blocks_per_sm_cap(cfg, m_tiles)
        fits = blocks * (cfg.shared_bytes(m_tiles, cfg.stages) + 1024) <= sm_shared
        return cfg.stages if fits else 2
    best = cfg.stages
    for stages in range(cfg.stages, cfg.max_stages + 1):
        if cfg.shared_bytes(m_tiles, stages) <= max_shared:
            best = stages
    return best


def _streaming_fit(
    cfg: KernelConfig,
    stages: int,
    per_sm: int,
    sm_count: int,
    base_blocks: int,
    tiles: int,
    num_splits: int,
) -> tuple[int, int] | None:
    """(stages, blocks per SM) within STREAM_BYTES_PER_SM of tiles in flight, for splits long
    enough to stream (4-warp kernels); None where the plan is within it or its splits are short
    (a short split needs its few tiles requested at once, whatever they cost in flight)."""
    if cfg.warps != 4 or tiles < LONG_SPLIT_TILES * num_splits:
        return None
    stage_bytes = cfg.key_tile * (cfg.d + cfg.v) * cfg.dtype_size
    blocks_per_sm = min(per_sm, -(-base_blocks * num_splits // sm_count))
    if blocks_per_sm * (stages - 1) * stage_bytes <= STREAM_BYTES_PER_SM:
        return None
    stages = max(2, min(stages, 1 + STREAM_BYTES_PER_SM // (blocks_per_sm * stage_bytes)))
    return stages, max(1, min(per_sm, STREAM_BYTES_PER_SM // ((stages - 1) * stage_bytes)))


def combiner_max_splits(cfg: KernelConfig) -> int:
    """The most splits a waiting combiner merges in one round trip: its threads are V / 4 column
    groups times split groups, each with COMBINE_SPLITS_IN_FLIGHT splits' loads in flight
    (wait_and_combine)."""
    return COMBINE_SPLITS_IN_FLIGHT * max(1, min(cfg.threads // (cfg.v // 4), 64))


def _split_count(base_blocks: int, wave: int, tiles: int, min_tiles: int = 1) -> int:
    """Fewest key splits (of whole key tiles) whose blocks fill the waves of resident blocks
    best (>= 90% of the best fill, up to 4 waves); 1 when the base grid fills the GPU well.
    Each split keeps at least `min_tiles` tiles."""
    cap = max(1, min(tiles // min_tiles, -(-4 * wave // base_blocks)))
    counts = _whole_tile_counts(tiles, cap)

    def fill(s: int) -> float:
        blocks = base_blocks * s
        return blocks / (-(-blocks // wave) * wave)

    best = max(fill(s) for s in counts)
    return next(s for s in counts if fill(s) >= 0.9 * best)


def _whole_tile_counts(tiles: int, cap: int) -> list[int]:
    """The split counts up to `cap` that whole key tiles allow (each split ceil(tiles / s)
    tiles, so some requested counts give fewer splits), ascending."""
    return sorted({-(-tiles // -(-tiles // s)) for s in range(1, cap + 1)})


def _whole_tile_splits(kv_len: int, key_tile: int, num_splits: int) -> tuple[int, int]:
    """(splits, keys per split) for about `num_splits` splits of whole key tiles."""
    tiles = -(-kv_len // key_tile)
    num_splits = max(1, min(num_splits, tiles))
    keys_per_split = -(-tiles // num_splits) * key_tile
    return -(-kv_len // keys_per_split), keys_per_split


@dataclass(frozen=True)
class BlockLayout:
    """How the mma.sync kernels' blocks cover a problem before its keys are split: the kernel's
    config, m-tiles a block, stages, blocks per key split and resident blocks per SM."""

    cfg: KernelConfig
    m_tiles: int
    row_groups: int
    stages: int
    base_blocks: int  # (batch, KV head, row group) blocks: one key split's grid
    tiles: int  # key tiles over all the keys
    per_sm: int
    sm_count: int
    sm_shared: int

    @property
    def resident(self) -> int:
        return self.sm_count * self.per_sm


def unserved_archs(dtype: str, d: int, v: int, archs: Sequence[str]) -> list[tuple[str, int, int]]:
    """(arch, bytes a block needs, the arch's limit) for each of `archs` (sm_XX, compute_XX)
    where no block of (dtype, d, v) fits: one m-tile at two stages is the smallest, and the plan
    refuses calls there (`_m_tiles` raises Unsupported)."""
    need = kernel_config(dtype, d, v).shared_bytes(1)
    limits = {arch: _shared_limits(arch)[0] for arch in archs}
    return [(arch, need, limit) for arch, limit in limits.items() if need > limit]


def _shared_limits(arch: str) -> tuple[int, int]:
    """SHARED_LIMITS of an arch (sm_XX, compute_XX): sm_8x's, else sm_90's."""
    return SHARED_LIMITS["sm_80" if _sm_8x(arch) else "sm_90"]


def _sm_8x(arch: str) -> bool:
    return arch.split("_", 1)[-1].startswith("8")


def block_layout(p: AttentionProblem, arch: str, sm_count: int) -> BlockLayout:
    sm_8x = _sm_8x(arch)
    max_shared, sm_shared = _shared_limits(arch)
    cfg = kernel_config(p.dtype, p.qk_dim, p.v_dim)
    rows = p.gqa_factor * p.q_len
    layout = _layout(p, cfg, _m_tiles(rows, cfg, max_shared), sm_count, max_shared, sm_shared)
    # Short splits are latency-bound: twice the blocks of one m-tile finish sooner than two-m-tile
    # blocks that read K and V once (H100, bench/NOTES.md round 19: 192/128 B=1 N=4096, 32 rows,
    # 14.2-14.4 us against 15.5-15.6; with 256+ key tiles a split, two m-tiles won by 5-15%). On
    # sm_80 the two-m-tile register path spilled (the header's kTwoTileRegisterPath).
    if layout.m_tiles > 1 and _register_row_groups(rows, cfg) and (sm_8x or _short_splits(layout)):
        layout = _layout(p, cfg, 1, sm_count, max_shared, sm_shared)
    return layout


def _short_splits(layout: BlockLayout) -> bool:
    """Whether the wave-filling split count leaves splits shorter than LONG_SPLIT_TILES."""
    lay = layout
    return lay.tiles < LONG_SPLIT_TILES * _split_count(lay.base_blocks, lay.resident, lay.tiles)


def _layout(
    p: AttentionProblem,
    cfg: KernelConfig,
    m_tiles: int,
    sm_count: int,
    max_shared: int,
    sm_shared: int,
) -> BlockLayout:
    rows = p.gqa_factor * p.q_len
    row_groups = -(-rows // (16 * m_tiles))
    stages = _stages(cfg, m_tiles, max_shared, sm_shared)
    smem = cfg.shared_bytes(m_tiles, stages)
    # Resident blocks per SM: shared memory, threads (2048 per SM) and registers (65536 per SM)
    # cap them. Waiting combiners need their call's blocks to fit one wave of `resident`.
    per_sm = max(
        1,
        min(sm_shared // (smem + 1024), 2048 // cfg.threads, blocks_per_sm_cap(cfg, m_tiles)),
    )
    return BlockLayout(
        cfg=cfg,
        m_tiles=m_tiles,
        row_groups=row_groups,
        stages=stages,
        base_blocks=p.batch * p.kv_heads * row_groups,
        tiles=-(-p.kv_len // cfg.key_tile),
        per_sm=per_sm,
        sm_count=sm_count,
        sm_shared=sm_shared,
    )


def _default_split_count(layout: BlockLayout, fused: bool, rows_total: int) -> int:
    """The key splits that fill the GPU best; with the fused kernel (`fused`), capped where
    waiting combiners merge faster than the wave-filling count."""
    lay, cfg = layout, layout.cfg
    num_splits = _split_count(lay.base_blocks, lay.resident, lay.tiles)
    streaming = _streaming_fit(
        cfg, lay.stages, lay.per_sm, lay.sm_count, lay.base_blocks, lay.tiles, num_splits
    )
    if streaming is not None:
        num_splits = _split_count(lay.base_blocks, lay.sm_count * streaming[1], lay.tiles)
    if not fused or num_splits <= FUSED_MAX_SPLITS:
        return num_splits
    # Waiting combiners merge in one round trip up to this many splits: fewer, longer splits
    # beat the wave-filling count there while nearly every SM keeps a block (bench.sweep_splits,
    # H100: 192/128 B=1 13.0 us at 32 splits, 128 blocks, against 13.6 at 64; 256/128 B=1 75.3
    # against 77.4 at 45).
    capped = min(num_splits, combiner_max_splits(cfg))
    # ... and their splits run best at up to two blocks per SM (bench.sweep_stages --splits,
    # round 10: 80/80 B=1, 16 KV heads: 16 splits 21.8-21.9 us on an H100, 17.4-17.5 on an
    # H200, against 22.2-22.9 and 17.6-18.3 at 22 splits, three per SM).
    two_per_sm = 2 * lay.sm_count // lay.base_blocks
    if two_per_sm > FUSED_MAX_SPLITS:
        capped = min(capped, two_per_sm)
    blocks = lay.base_blocks * capped
    if 9 * lay.sm_count <= 10 * blocks and blocks + rows_total <= lay.resident:
        return capped
    return num_splits


def _split_shared_memory(layout: BlockLayout, num_splits: int) -> tuple[int, int]:
    """(stages, dynamic shared bytes) of the split blocks."""
    lay, cfg = layout, layout.cfg
    stages = lay.stages
    streaming = _streaming_fit(
        cfg, stages, lay.per_sm, lay.sm_count, lay.base_blocks, lay.tiles, num_splits
    )
    if streaming is not None:
        stages = streaming[0]
    smem = cfg.shared_bytes(lay.m_tiles, stages)
    # No more blocks may share an SM than the split counts assumed: the one-m-tile kernels take
    # ~120 registers, so where two-stage tiles leave room a fourth 4-warp block would fit, and
    # 32x192/128 then ran 455 us against 445 (bench/NOTES.md round 16). Padding the dynamic
    # shared memory caps them at `per_sm`, as registers did when each kernel held every path.
    return stages, max(smem, lay.sm_shared // (lay.per_sm + 1) - 1023)


def plan_cuda(
    problem: AttentionProblem,
    *,
    available: set[str] | frozenset[str],
    sm_count: int = DEFAULT_SM_COUNT,
    scale: float | None = None,
    arch: str = "sm_90",
    num_splits: int | None = None,
    wgmma: bool = False,
    overlap: bool = False,
) -> list[Launch]:
    """The launches computing `problem`; raises Unsupported (with the reason) otherwise.

    `num_splits` forces the key split count (tests); by default it comes from `sm_count`.
    `wgmma`: the loaded image is sm_90a SASS on an sm_90 GPU, so the wgmma kernel can run.
    `overlap`: the launcher runs a launch marked `overlaps_previous` as a programmatic dependent
    launch in its stream (bench's torch harness), so on sm_90+ split passes take the
    overlapping combine (OVERLAP_COMBINE), and so do the seesaw's (WGMMA_OVERLAP_COMBINE).
    """
    p = problem
    _check_problem(p)
    type_name = KERNEL_TYPE_NAMES[p.dtype]
    one = one_pass_name(type_name, p.qk_dim, p.v_dim)
    if one not in available:
        raise Unsupported(f"no loaded library has {one}")
    if scale is None:
        scale = 1.0 / math.sqrt(p.qk_dim)
    combine = combine_name(type_name, p.v_dim)
    wg_kernels = WgmmaKernels.loaded(type_name, p.qk_dim, p.v_dim, available) if wgmma else None
    if wg_kernels and combine in available and _wgmma_serves(p, sm_count):
        return _plan_wgmma(p, wg_kernels, combine, scale, sm_count, num_splits, overlap)

    layout = block_layout(p, arch, sm_count)
    one, first, fused = _block_kernels(p, type_name, layout.m_tiles, available)
    rows_total = p.batch * p.q_heads * p.q_len
    if num_splits is None:
        num_splits = _default_split_count(layout, fused in available, rows_total)
    num_splits, keys_per_split = _whole_tile_splits(p.kv_len, layout.cfg.key_tile, num_splits)
    if num_splits > 1 and (first not in available or combine not in available):
        num_splits, keys_per_split = 1, layout.tiles * layout.cfg.key_tile
    stages, smem = _split_shared_memory(layout, num_splits)

    pack = partial(
        pack_params,
        scale=scale,
        problem=p,
        num_splits=num_splits,
        keys_per_split=keys_per_split,
        m_tiles=layout.m_tiles,
        row_groups=layout.row_groups,
        stages=stages,
    )
    grid = (layout.base_blocks * num_splits, 1, 1)
    block = (layout.cfg.threads, 1, 1)
    if num_splits == 1:
        inputs = _attention_inputs(p)
        out = (("out", p.output_shape, p.dtype),)
        strided = (*inputs[:3], inputs[3])
        return [Launch(one, inputs, out, grid, block, smem, pack(), strided, _attention_unread(p))]
    launches = _split_launches(p, first, combine, num_splits, grid, block, smem, pack())
    if overlap and OVERLAP_COMBINE and overlaps_launches(arch):
        return _overlapped(launches)
    has_fused = fused in available
    if has_fused and num_splits <= FUSED_MAX_SPLITS:
        return [_fused(*launches, fused)]
    if has_fused and grid[0] + rows_total <= layout.resident:
        return [_fused_with_combiners(*launches, fused, pack(combiners_from=grid[0]), num_splits)]
    return launches


def overlaps_launches(arch: str) -> bool:
    """Whether `arch` (sm_XX, compute_XX) has programmatic dependent launch: sm_90 and later."""
    digits = "".join(c for c in arch.split("_", 1)[-1] if c.isdigit())
    return bool(digits) and int(digits) >= 90


def _overlapped(launches: list[Launch]) -> list[Launch]:
    """The split pass, then the combine launched to overlap its tail."""
    split_pass, combine = launches
    return [split_pass, replace(combine, overlaps_previous=True)]


def _check_problem(p: AttentionProblem) -> None:
    if p.q_len < 1 or p.q_len > MAX_QUERY_TOKENS:
        raise Unsupported(f"{p.q_len} query tokens: sdpa_vector serves 1 to {MAX_QUERY_TOKENS}")
    if p.kv_len < 1:
        raise Unsupported("no keys")
    if p.dtype not in DTYPE_SIZES:
        raise Unsupported(f"dtype {p.dtype} has no CUDA kernel")


def _wgmma_serves(p: AttentionProblem, sm_count: int) -> bool:
    """Shapes where the wgmma kernel beats the mma.sync ones: many rows or wide heads."""
    if not wgmma_supported(p.dtype, p.qk_dim, p.v_dim):
        return False
    rows = p.gqa_factor * p.q_len
    if rows >= WGMMA_ROWS or _wide_heads(p):
        return True
    if rows < _wgmma_min_rows(p):
        return False
    row_groups, splits, _ = _wgmma_grid(p, sm_count, None)
    return p.batch * p.kv_heads * row_groups * splits >= sm_count // WGMMA_MIN_GRID_SHARE


def _wgmma_min_rows(p: AttentionProblem) -> int:
    small = p.qk_dim + p.v_dim <= WGMMA_SMALL_HEADS
    return WGMMA_SMALL_HEADS_MIN_ROWS if small else WGMMA_MIN_ROWS


def _wgmma_row_groups(p: AttentionProblem) -> int:
    return -(-p.gqa_factor * p.q_len // WGMMA_ROWS)


def _wgmma_grid(
    p: AttentionProblem, resident_blocks: int, num_splits: int | None, min_tiles: int | None = None
) -> tuple[int, int, int]:
    """(row groups, key splits, keys per split) of the wgmma split pass: whole 64-key tiles,
    at least `min_tiles` (by default _wgmma_min_tiles) a split unless `num_splits` forces the
    count; one wave of `resident_blocks` (the SM count, or twice it for the dual entry point)."""
    row_groups = _wgmma_row_groups(p)
    tiles = -(-p.kv_len // WGMMA_KEYS)
    if num_splits is None:
        base_blocks = p.batch * p.kv_heads * row_groups
        least = _wgmma_min_tiles(p) if min_tiles is None else min_tiles
        num_splits = _one_wave_split_count(base_blocks, resident_blocks, tiles, least)
    return row_groups, *_whole_tile_splits(p.kv_len, WGMMA_KEYS, num_splits)


def _block_kernels(
    p: AttentionProblem, type_name: str, m_tiles: int, available: set[str] | frozenset[str]
) -> tuple[str, str, str]:
    """(one pass, split pass, fused split pass) names for blocks of `m_tiles` m-tiles."""
    names = (
        one_pass_name(type_name, p.qk_dim, p.v_dim),
        split_pass_name(type_name, p.qk_dim, p.v_dim),
        fused_split_name(type_name, p.qk_dim, p.v_dim),
    )
    if m_tiles == 1:
        return names
    one, first, fused = (many_rows_name(name) for name in names)
    if one not in available:
        rows = p.gqa_factor * p.q_len
        raise Unsupported(f"no loaded library has {one} ({rows} query rows per KV head)")
    return one, first, fused


def _attention_inputs(p: AttentionProblem) -> tuple[str, ...]:
    return (
        "q",
        "k",
        "v",
        "mask" if p.has_array_mask else "q",
        "sinks" if p.has_sinks else "q",
    )


def _attention_unread(p: AttentionProblem) -> tuple[int, ...]:
    """The places of an absent mask and sinks among `_attention_inputs`."""
    return (*(() if p.has_array_mask else (3,)), *(() if p.has_sinks else (4,)))


def _fused(split_pass: Launch, combine: Launch, kernel: str) -> Launch:
    """The split pass whose last block per row group merges the splits: one launch, which under
    MLX's CUDA graphs also saves the second graph node of an evaluation. Its scratch holds a
    flag slot per block; "out" comes last (the highest slot, see compile_steps)."""
    return replace(
        split_pass,
        kernel=kernel,
        outputs=(_scratch(split_pass, split_pass.grid[0]), *combine.outputs),
        scratch_outputs=_fused_scratch(),
    )


def _fused_with_combiners(
    split_pass: Launch, combine: Launch, kernel: str, params: bytes, num_splits: int
) -> Launch:
    """The fused split pass followed by one waiting combiner block per query row (the combine's
    grid): `params` names the first combiner block; the scratch holds a flag slot per (row,
    split)."""
    rows = combine.grid[0]
    return replace(
        split_pass,
        kernel=kernel,
        grid=(split_pass.grid[0] + rows, 1, 1),
        params=params,
        outputs=(_scratch(split_pass, rows * num_splits), *combine.outputs),
        scratch_outputs=_fused_scratch(),
    )


def _fused_scratch() -> tuple[int, ...]:
    """The fused pass's scratch outputs: its first output, the scratch (see
    FUSED_SCRATCH_AS_OUTPUT)."""
    return () if FUSED_SCRATCH_AS_OUTPUT else (0,)


def _scratch(split_pass: Launch, slots: int) -> tuple[str, tuple[int, ...], str]:
    """The fused pass's one scratch output (`FusedScratch` of the header): the split pass's
    partials, maxs and sums, then `slots` 64-bit flag slots, in 4-byte words. One buffer in
    place of four, and no array of the call (`Launch.scratch_outputs`)."""
    words = sum(math.prod(shape) for _, shape, _ in split_pass.outputs) + SLOT_WORDS * slots
    return ("scratch", (words,), "float32")


def _split_launches(
    p: AttentionProblem,
    first: str,
    combine: str,
    num_splits: int,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    smem: int,
    params: bytes,
    merged: int = 1,
    partials_in_t: bool = False,
) -> list[Launch]:
    """A split pass writing (partials, maxs, sums), one per `merged` of its `num_splits`, and
    the combine that merges them. The partials are fp32, or with `partials_in_t` the call's
    dtype, each row normalised (`first` then stores them so, and `combine` is combine_t_name's
    kernel): half the bytes to store and merge."""
    inputs = _attention_inputs(p)
    partial_count = num_splits // merged
    threads = combine_threads(p.v_dim, partial_count)
    stat_shape = (p.batch, p.q_heads, p.q_len, partial_count)
    part_shape = (*stat_shape, p.v_dim)
    return [
        Launch(
            first,
            inputs,
            (
                ("partials", part_shape, p.dtype if partials_in_t else "float32"),
                ("maxs", stat_shape, "float32"),
                ("sums", stat_shape, "float32"),
            ),
            grid,
            block,
            smem,
            params,
            (*inputs[:3], inputs[3]),
            _attention_unread(p),
        ),
        Launch(
            combine,
            ("partials", "maxs", "sums", "sinks" if p.has_sinks else "maxs"),
            (("out", p.output_shape, p.dtype),),
            (p.batch * p.q_heads * p.q_len, 1, 1),
            (threads, 1, 1),
            16 * threads,  # one float4 per thread: split groups' partial sums
            pack_combine_params(p, partial_count),
            (),
            () if p.has_sinks else (3,),
        ),
    ]


def _wide_heads(p: AttentionProblem) -> bool:
    return p.qk_dim + p.v_dim >= WGMMA_WIDE_HEADS


def _wgmma_min_tiles(p: AttentionProblem) -> int:
    return WGMMA_MIN_TILES if _wide_heads(p) else WGMMA_NARROW_MIN_TILES


def _one_wave_split_count(base_blocks: int, sm_count: int, tiles: int, min_tiles: int) -> int:
    """wgmma blocks own an SM each: the most whole-tile splits (at least `min_tiles` tiles)
    whose grid fits one wave, where that wave fills 90% of the SMs; otherwise the wave-filling
    count of _split_count. H200, bench/NOTES.md round 20: 192/128 GQA 8 at 5 tokens, N=32768,
    B=1 32 splits (128 blocks) 39.0 us against _split_count's 29 (116) 41.5; B=2 16 (128) 67.0
    against 15 (120) 71.5."""
    cap = min(tiles // min_tiles, sm_count // base_blocks)
    if cap >= 1:
        most = _whole_tile_counts(tiles, cap)[-1]
        if 10 * base_blocks * most >= 9 * sm_count:
            return most
    return _split_count(base_blocks, sm_count, tiles, min_tiles)


@dataclass(frozen=True)
class WgmmaKernels:
    """A pair's wgmma entry points in the loaded images: two deep (always), one deep (`short`),
    two blocks an SM (`dual`), clusters of two (`pair`), one pass (`one`), the seesaw's split
    pass and one pass, the two-deep split pass with partials in T (`t_partials`), and the
    combine of such partials (`combine_t`), None where absent. The seesaw's split pass stores
    partials in T: it counts only with `t_partials` and `combine_t`."""

    deep: str
    short: str | None = None
    dual: str | None = None
    pair: str | None = None
    one: str | None = None
    seesaw: str | None = None
    seesaw_one: str | None = None
    t_partials: str | None = None
    combine_t: str | None = None

    @classmethod
    def loaded(
        cls, type_name: str, d: int, v: int, available: set[str] | frozenset[str]
    ) -> WgmmaKernels | None:
        """The entry points `available` holds; None without the two-deep one."""
        names = (
            wgmma_name,
            wgmma_short_name,
            wgmma_dual_name,
            wgmma_pair_name,
            wgmma_one_name,
            wgmma_seesaw_name,
            wgmma_seesaw_one_name,
            wgmma_t_partials_name,
        )
        deep, *others = (name(type_name, d, v) for name in names)
        if deep not in available:
            return None
        combine_t = combine_t_name(type_name, v)
        kernels = cls(deep, *(name if name in available else None for name in others))
        if combine_t not in available or kernels.t_partials is None:
            return replace(kernels, seesaw=None, t_partials=None)
        return replace(kernels, combine_t=combine_t)


def _plan_wgmma(
    p: AttentionProblem,
    kernels: WgmmaKernels,
    combine: str,
    scale: float,
    sm_count: int,
    num_splits: int | None,
    overlap: bool = False,
) -> list[Launch]:
    """The wgmma split pass and the combine: where the seesaw serves the call (WGMMA_SEESAW,
    64+ rows a KV head, splits of WGMMA_SEESAW_MIN_TILES+ tiles, or one split of any count:
    WGMMA_SEESAW_SHORT_ONE_PASS), one block an SM with the seesaw
    as the view alternative (_seesaw_launches); else two blocks an SM (the dual entry point) for KV
    heads of WGMMA_DUAL_MIN_ROW_GROUPS+ row groups whose splits keep WGMMA_DUAL_MIN_TILES tiles
    there; else one block an SM: in clusters of two that merge their splits (`pair`) where
    _pairs_pay, one deep (`short`) when every split is short. A single two-deep split is one
    launch where the `one` entry point is loaded (WGMMA_ONE_PASS)."""
    seesaw = bool(WGMMA_SEESAW and kernels.seesaw and _full_row_groups(p))
    if seesaw:
        one_pass = kernels.one if WGMMA_ONE_PASS and kernels.seesaw_one else None
        grid = _wgmma_grid_or_one_split(p, sm_count, num_splits, one_pass, seesaw)
        tiles = grid[2] // WGMMA_KEYS
        short_one = WGMMA_SEESAW_SHORT_ONE_PASS and one_pass and grid[1] == 1
        if tiles >= WGMMA_SEESAW_MIN_TILES or short_one:
            return _seesaw_launches(p, kernels, grid, combine, scale, overlap)
    if kernels.dual and _wgmma_row_groups(p) >= WGMMA_DUAL_MIN_ROW_GROUPS:
        grid = _wgmma_grid(p, WGMMA_DUAL_BLOCKS_PER_SM * sm_count, num_splits)
        if grid[2] >= WGMMA_DUAL_MIN_TILES * WGMMA_KEYS:
            return _wgmma_launches(p, kernels.dual, True, grid, combine, scale)
    if kernels.pair:
        # Pairs halve the partials that made short splits cost more (_wgmma_min_tiles), so
        # their grid may split down to WGMMA_PAIR_MIN_TILES tile.
        paired = _wgmma_grid(p, sm_count, num_splits, WGMMA_PAIR_MIN_TILES)
        if _pairs_pay(p, paired, sm_count):
            return _wgmma_launches(p, kernels.pair, True, paired, combine, scale, merged=2)
    one_pass = kernels.one if WGMMA_ONE_PASS else None
    grid = _wgmma_grid_or_one_split(p, sm_count, num_splits, one_pass, seesaw)
    two_deep = kernels.short is None or grid[2] >= WGMMA_DEEP_MIN_TILES * WGMMA_KEYS
    kernel = kernels.deep if two_deep else kernels.short
    launches = _wgmma_launches(p, kernel, two_deep, grid, combine, scale)
    if one_pass and two_deep and grid[1] == 1:
        return [_one_pass(p, launches[0], one_pass)]
    return launches


def _wgmma_grid_or_one_split(
    p: AttentionProblem,
    sm_count: int,
    num_splits: int | None,
    one_pass: str | None,
    seesaw: bool = False,
) -> tuple[int, int, int]:
    """The one-block-an-SM grid: one split where the one-pass entry point is loaded and
    _wgmma_cost prices it lower than the wave-filling rule's splits. `seesaw`: the seesaw serves
    the call's full row groups (SEESAW_COST; its splits of WGMMA_SEESAW_MIN_TILES+ tiles store
    T partials), else WGMMA_COST."""
    grid = _wgmma_grid(p, sm_count, num_splits)
    if one_pass and num_splits is None and grid[1] > 1:
        one_split = _wgmma_grid(p, sm_count, 1)
        model = SEESAW_COST if seesaw else WGMMA_COST
        split_cost = _wgmma_cost(p, grid, sm_count, model, _partial_bytes(p, grid, seesaw))
        if _wgmma_cost(p, one_split, sm_count, model) < split_cost:
            return one_split
    return grid


def _partial_bytes(p: AttentionProblem, grid: tuple[int, int, int], seesaw: bool) -> int:
    """Bytes of a partial element over `grid`: T where the seesaw serves the call and its splits
    hold WGMMA_SEESAW_MIN_TILES+ tiles (_seesaw_launches), else fp32."""
    in_t = seesaw and grid[2] // WGMMA_KEYS >= WGMMA_SEESAW_MIN_TILES
    return DTYPE_SIZES[p.dtype] if in_t else 4


def _full_row_groups(p: AttentionProblem) -> bool:
    """64+ query rows a KV head (MLA's 128 heads at any token count)."""
    return p.gqa_factor * p.q_len >= WGMMA_ROWS


def _seesaw_launches(
    p: AttentionProblem,
    kernels: WgmmaKernels,
    grid: tuple[int, int, int],
    combine: str,
    scale: float,
    overlap: bool = False,
) -> list[Launch]:
    """The two-deep split pass and the combine over `grid`, or for one split the one pass,
    with the seesaw entry point as the first launch's view alternative (V a prefix view of K).
    The seesaw's split pass stores its partials in T, so the launch's own kernel is the two-deep
    split pass that does too (`t_partials`), and the combine is theirs (`combine_t`): half the
    partial bytes took MLA's split plans up to 8% less time (bench/NOTES.md round 42). Both
    split passes let the next grid start, so with `overlap` the combine overlaps their tail
    (WGMMA_OVERLAP_COMBINE)."""
    block, smem = (WGMMA_SEESAW_THREADS, 1, 1), seesaw_shared_bytes(p.qk_dim, p.v_dim)
    if grid[1] == 1 and WGMMA_ONE_PASS and kernels.one and kernels.seesaw_one:
        launches = _wgmma_launches(p, kernels.deep, True, grid, combine, scale)
        alternative = ViewAlternative(kernels.seesaw_one, block, smem)
        return [replace(_one_pass(p, launches[0], kernels.one), alternative=alternative)]
    launches = _wgmma_launches(
        p, kernels.t_partials, True, grid, kernels.combine_t, scale, partials_in_t=True
    )
    alternative = ViewAlternative(kernels.seesaw, block, smem)
    launches = [replace(launches[0], alternative=alternative), launches[1]]
    return _overlapped(launches) if overlap and WGMMA_OVERLAP_COMBINE else launches


def _wgmma_cost(
    p: AttentionProblem,
    grid: tuple[int, int, int],
    sm_count: int,
    model: WgmmaCost = WGMMA_COST,
    partial_bytes: int = 4,
) -> float:
    """Modelled microseconds of a one-block-an-SM wgmma call over `grid` (see WGMMA_COST), its
    partials `partial_bytes` an element."""
    terms = _wgmma_cost_terms(p, grid, sm_count, partial_bytes)
    return sum(rate * term for rate, term in zip(model.rates(), terms, strict=True))


def _wgmma_cost_terms(
    p: AttentionProblem, grid: tuple[int, int, int], sm_count: int, partial_bytes: int
) -> tuple[float, ...]:
    """What WgmmaCost.rates multiply (bench.fit_cost fits them to timed calls): waves x a
    split's tiles, waves, for splits waves again (the split blocks' own cost), the partials'
    bytes and one combine launch."""
    _, num_splits, keys_per_split = grid
    waves = -(-_wgmma_blocks(p, grid) // sm_count)
    tile_waves = waves * (keys_per_split // WGMMA_KEYS)
    if num_splits == 1:
        return (tile_waves, waves, 0, 0, 0)
    partials = p.batch * p.q_heads * p.q_len * num_splits * p.v_dim * partial_bytes
    return (tile_waves, waves, waves, partials, 1)


def _one_pass(p: AttentionProblem, split_pass: Launch, kernel: str) -> Launch:
    """`split_pass` (one split) as `kernel`, which writes the output itself, sinks applied: the
    same inputs (sinks among them when the call has them), `out` for the partials."""
    return replace(split_pass, kernel=kernel, outputs=(("out", p.output_shape, p.dtype),))


def _wgmma_blocks(p: AttentionProblem, grid: tuple[int, int, int]) -> int:
    """Blocks of the wgmma split pass over `grid` (_wgmma_grid's row groups, splits, keys)."""
    row_groups, num_splits, _ = grid
    return p.batch * p.kv_heads * row_groups * num_splits


def _pairs_pay(p: AttentionProblem, grid: tuple[int, int, int], sm_count: int) -> bool:
    """Whether the clusters-of-two entry point serves a one-block-an-SM grid: KV heads of 64+
    rows (whose partials pairs halve), an even split count of WGMMA_PAIR_MIN_TILES to
    WGMMA_PAIR_MAX_TILES tiles a split, and a grid that covers WGMMA_PAIR_MIN_FILL% of the
    SMs."""
    _, num_splits, keys_per_split = grid
    tiles = keys_per_split // WGMMA_KEYS
    full_rows = p.gqa_factor * p.q_len >= WGMMA_ROWS
    window = WGMMA_PAIR_MIN_TILES <= tiles <= WGMMA_PAIR_MAX_TILES
    fills = 100 * _wgmma_blocks(p, grid) >= WGMMA_PAIR_MIN_FILL * sm_count
    return bool(WGMMA_PAIRS) and full_rows and num_splits % 2 == 0 and window and fills


def _wgmma_launches(
    p: AttentionProblem,
    kernel: str,
    two_deep: bool,
    grid: tuple[int, int, int],
    combine: str,
    scale: float,
    merged: int = 1,
    partials_in_t: bool = False,
) -> list[Launch]:
    """`kernel`'s split pass over `grid` (_wgmma_grid's row groups, splits, keys per split) and
    the combine; the split pass writes one partial per `merged` splits (2: the pair kernel), in
    the call's dtype for `partials_in_t` (_split_launches)."""
    row_groups, num_splits, keys_per_split = grid
    params = pack_params(
        scale=scale,
        problem=p,
        num_splits=num_splits,
        keys_per_split=keys_per_split,
        m_tiles=WGMMA_ROWS // 16,
        row_groups=row_groups,
        stages=2,
    )
    blocks = (_wgmma_blocks(p, grid), 1, 1)
    smem = wgmma_shared_bytes(p.qk_dim, p.v_dim, two_deep)
    split_pass, combine_pass = _split_launches(
        p,
        kernel,
        combine,
        num_splits,
        blocks,
        (WGMMA_THREADS, 1, 1),
        smem,
        params,
        merged,
        partials_in_t,
    )
    # K and V tiles come in by TMA (the kernel's WParams), a box per 128-byte column atom; so
    # does Q, in boxes of a row group's 64 rows (Lq tokens of 64 / Lq heads), where Lq divides
    # 64 (the kernel stages other Q by cp.async and never reads that map).
    maps = tuple(TensorMap(name, WGMMA_ATOM_COLS, WGMMA_KEYS) for name in ("k", "v"))
    return [replace(split_pass, tensor_maps=(*maps, _q_map(p))), combine_pass]


def _q_map(p: AttentionProblem) -> TensorMap:
    """Q's tensor map for the wgmma split pass: 64 columns x Lq tokens x 64 / Lq heads."""
    tokens = p.q_len if WGMMA_ROWS % p.q_len == 0 else 1
    return TensorMap("q", WGMMA_ATOM_COLS, tokens, WGMMA_ROWS // tokens)


def with_scale(launches: Sequence[Launch], scale: float) -> list[Launch]:
    """The same launches for another softmax scale (the first float after the strides)."""
    out = []
    for launch in launches:
        if launch.strided_inputs:
            launch = replace(launch, params=struct.pack("@f", scale) + launch.params[4:])
        out.append(launch)
    return out


LaunchFn = Callable[..., Sequence[Any]]
# prepare(kernel, output_shapes, output_dtypes, grid, block, shared_memory, params,
# strided_input_indices, unread_input_indices, tensor_maps, overlaps_previous, scratch_outputs,
# view_alternative) -> call(inputs[, gradient_inputs, gradient]) returning the outputs but the
# scratch (aotc._ext.PreparedLaunch); tensor_maps: (input index, box cols, box rows, box
# planes) each; view_alternative: (kernel, block, shared memory, view index, base index) or None.
PrepareFn = Callable[..., Callable[..., Sequence[Any]]]
# A call's arguments in slot order: the order of a native plan's (and its CallTable key's)
# positional arguments. The scale is no kernel input: a plan is made per scale.
ARGUMENTS = ("q", "k", "v", "mask", "sinks", "scale")
MASK_SLOT, SINKS_SLOT = ARGUMENTS.index("mask"), ARGUMENTS.index("sinks")


def preparer(launch_fn: LaunchFn) -> PrepareFn:
    """A `prepare` for a plain `launch_fn(kernel, inputs, output_shapes, output_dtypes, grid,
    block, shared_memory, params, strided_input_indices, tensor_maps=(),
    overlaps_previous=False, view_alternative=None)` (bench's torch harness, tests) that
    returns every output; each keyword is passed only to launches that set it. The scratch
    outputs are dropped from what the call returns, as MLX's primitive does (a stream-ordered
    allocator may reuse their memory for work queued after the launch)."""

    def prepare(kernel: str, *fixed: Any) -> Callable[..., Sequence[Any]]:
        *fixed, _unread, maps, overlaps, scratch, alternative = fixed  # unread: not read
        extra: dict[str, Any] = {"tensor_maps": maps} if maps else {}
        if overlaps:
            extra["overlaps_previous"] = True
        if alternative:
            extra["view_alternative"] = alternative

        def call(inputs):
            outputs = launch_fn(kernel, inputs, *fixed, **extra)
            return [out for i, out in enumerate(outputs) if i not in scratch]

        return call

    return prepare


@dataclass(frozen=True)
class Step:
    """A Launch lowered for the hot path: array names resolved to slots once, not per call;
    `call(inputs[, gradient_inputs, gradient])` has every other argument bound already."""

    kernel: str
    input_slots: tuple[int, ...]
    output_slots: tuple[int, ...]
    call: Callable[..., Sequence[Any]]


def compile_steps(
    launches: Sequence[Launch], prepare: PrepareFn, dtype: Callable[[str], Any] = lambda n: n
) -> tuple[list[Step], int]:
    """Steps and the slot of "out" (the last launch's output: the highest slot); the first
    slots hold the ARGUMENTS. `dtype` maps dtype names to what `prepare` takes."""
    slots = {name: i for i, name in enumerate(ARGUMENTS)}
    steps = []
    for launch in launches:
        outputs = [
            name for i, (name, _, _) in enumerate(launch.outputs) if i not in launch.scratch_outputs
        ]
        for name in outputs:
            slots.setdefault(name, len(slots))
        steps.append(
            Step(
                kernel=launch.kernel,
                input_slots=tuple(slots[name] for name in launch.inputs),
                output_slots=tuple(slots[name] for name in outputs),
                call=prepare_launch(launch, prepare, dtype),
            )
        )
    return steps, slots["out"]


def prepare_launch(
    launch: Launch, prepare: PrepareFn, dtype: Callable[[str], Any] = lambda n: n
) -> Callable[..., Sequence[Any]]:
    """`prepare` applied to one launch: input names become indices among its inputs."""
    return prepare(
        launch.kernel,
        [shape for _, shape, _ in launch.outputs],
        [dtype(name) for _, _, name in launch.outputs],
        launch.grid,
        launch.block,
        launch.shared_memory,
        launch.params,
        [launch.inputs.index(name) for name in launch.strided_inputs],
        list(launch.unread),
        [
            (launch.inputs.index(m.input), m.box_cols, m.box_rows, m.box_planes)
            for m in launch.tensor_maps
        ],
        launch.overlaps_previous,
        list(launch.scratch_outputs),
        _alternative_arg(launch),
    )


def _alternative_arg(launch: Launch) -> tuple | None:
    """The view alternative as `prepare` takes it: (kernel, block, shared memory, view index,
    base index)."""
    alt = launch.alternative
    if alt is None:
        return None
    index = launch.inputs.index
    return (alt.kernel, alt.block, alt.shared_memory, index(alt.view), index(alt.base))


def run_steps(steps: Sequence[Step], out_slot: int, env: list[Any]) -> Any:
    """`env` starts as the ARGUMENTS (None where absent) and collects the outputs. The Python
    twin of `aotc._ext.CudaPlan` for launch functions of other array types (bench's torch
    harness)."""
    env = env + [None] * (out_slot + 1 - len(env))
    for step in steps:
        results = step.call([env[slot] for slot in step.input_slots])
        for slot, result in zip(step.output_slots, results, strict=True):
            env[slot] = result
    return env[out_slot]


def run_cuda(launches: Sequence[Launch], arrays: Mapping[str, Any], launch_fn: LaunchFn) -> Any:
    """Run the launches in order; `arrays` maps "q", "k", "v" (and "mask" broadcast to
    (B, Hq, Lq, N), "sinks" in the input dtype, when present) to arrays. Returns "out".

    `launch_fn(kernel, inputs, output_shapes, output_dtypes, grid, block, shared_memory, params,
    strided_input_indices[, tensor_maps=...]) -> list of outputs` (see `preparer`).
    """
    steps, out_slot = compile_steps(launches, preparer(launch_fn))
    return run_steps(steps, out_slot, [arrays.get(name) for name in ARGUMENTS])


def device_facts() -> tuple[int, str]:
    """(SM count, architecture) of MLX's GPU. MLX reports the architecture; the SM count comes
    from the driver (an H100 PCIe has 114 SMs, an SXM 132: split counts and the combiners'
    one-wave rule depend on it), else from the architecture's most common part."""
    import mlx.core as mx

    from aotc.runtime import cuda as cuda_runtime

    arch = "sm_90"
    try:
        info = mx.device_info()
        arch = str(info.get("architecture", arch))
    except Exception:
        pass
    sm_count = cuda_runtime.sm_count()  # device 0: MLX's Python Device has no index to ask
    if not sm_count:
        sm_count = TYPICAL_SM_COUNTS.get(arch, DEFAULT_SM_COUNT)
    return sm_count, arch


class CudaRunner:
    """`(q, k, v, scale, mask, sinks) -> out` on MLX arrays of one problem; raises Unsupported
    when made for a problem the kernels do not serve.

    The launches are planned once; per softmax scale they become one `aotc._ext.CudaPlan`
    (`plan(scale)`), which casts the mask and sinks as MLX does, broadcasts the mask, and
    launches without Python. `aotc.sdpa_vector` files that plan under the call's signature in
    its CallTable, so later calls skip Python altogether.

    `prepare`: `aotc._ext.PreparedLaunch` bound to the library's image. `dtype` maps dtype
    names to mx.Dtype. `wgmma`: as for `plan_cuda`. `gradient(scale, mask mode, array mask?,
    sinks?, qkv_inline=...)`, when given, returns the gradients of (the last launch, the
    others): the last launch differentiates the whole call with respect to q, k, v (mask,
    sinks). Where that launch takes q, k, v as its first inputs (a one-launch plan) it
    differentiates those (`qkv_inline`); otherwise they are appended as gradient-only inputs,
    as the mask and sinks always are. Duplicate inputs cost MLX: with K and V of 1 GB, q, k, v
    appended to the fused launch added ~13 us per call to an evaluation (H100,
    bench.mlx_calls).
    """

    def __init__(
        self,
        problem: AttentionProblem,
        *,
        prepare: PrepareFn,
        available: set[str] | frozenset[str],
        dtype: Callable[[str], Any],
        gradient: Callable[..., tuple[Callable, Callable]] | None = None,
        wgmma: bool = False,
    ) -> None:
        sm_count, arch = device_facts()
        self.problem = problem
        self.launches = plan_cuda(
            problem,
            available=available,
            sm_count=sm_count,
            arch=arch,
            scale=1.0,
            wgmma=wgmma,
            overlap=bool(MLX_OVERLAP_COMBINE),
        )
        self._prepare, self._dtype, self._gradient = prepare, dtype, gradient
        self._plans: dict[float, Any] = {}

    def __call__(self, q, k, v, scale, mask, sinks):
        return self.plan(scale)(q, k, v, mask, sinks, scale)

    def plan(self, scale: float) -> Any:
        plan = self._plans.get(scale)
        if plan is None:
            plan = self._plans.setdefault(scale, self._make_plan(scale))
        return plan

    def _make_plan(self, scale: float) -> Any:
        from aotc.runtime.cuda import extension

        p = self.problem
        steps, out_slot = compile_steps(
            with_scale(self.launches, scale), self._prepare, self._dtype
        )
        plan = extension().CudaPlan(len(ARGUMENTS))
        array_mask = p.has_array_mask
        if p.mask == "additive":  # MLX casts additive masks to the output type
            plan.astype(MASK_SLOT, self._dtype(p.dtype))
        if array_mask:
            plan.broadcast_to(MASK_SLOT, list(p.scores_shape))
        if p.has_sinks:
            plan.astype(SINKS_SLOT, self._dtype(p.dtype))
        qkv_inline = self.launches[-1].inputs[:3] == ("q", "k", "v")
        last = others = None
        gradient_inputs: list[int] = []
        if self._gradient is not None:
            mode = p.mask if p.mask == "causal" else None
            last, others = self._gradient(
                scale, mode, array_mask, p.has_sinks, qkv_inline=qkv_inline
            )
            gradient_inputs = [] if qkv_inline else [0, 1, 2]
            gradient_inputs += [MASK_SLOT] * array_mask + [SINKS_SLOT] * p.has_sinks
        for i, step in enumerate(steps):
            final = i == len(steps) - 1
            # A launch that the next one overlaps shares its primitive, whose gradient is the
            # last launch's: it takes none of its own.
            chained = not final and self.launches[i + 1].overlaps_previous
            plan.launch(
                step.call,
                list(step.input_slots),
                list(step.output_slots),
                gradient_inputs if final else [],
                last if final else None if chained else others,
            )
        plan.set_output(out_slot)
        return plan
