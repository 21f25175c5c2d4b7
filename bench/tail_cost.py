"""How much of a batch-1 call is its merge: the fused plan (one launch with waiting combiners, as
under MLX) against the split-pass kernel alone with the same splits, the two-launch plan (split
pass, combine) and the same with the combine overlapping the split pass (the harness's plan on
sm_90+: a programmatic dependent launch).

    python3 -m bench.tail_cost [FATBIN_LIST]   (default: the harness fatbin in .gpu/sdpa;
    CUDA-graph replays, us per call)
"""

from __future__ import annotations

import math
import struct

import torch

from aotc.families.sdpa_vector.cuda import PARAMS_FORMAT
from bench import cuda_harness as h
from bench.bench_sdpa import bench_first_launch, bench_harness, make_sets
from bench.shapes import SHAPES, kv_bytes, set_count

ROWS = [SHAPES[i] for i in (0, 4, 10)]  # the batch-1 rows


def main(listing: str | None = None) -> None:
    lib = h.load_library(listing)
    lib.wgmma_ok = False
    print(
        "shape | fused plan | split pass alone | split pass + combine kernel (same splits) "
        "| the same, the combine overlapping (PDL, sm_90+)"
    )
    for b, hq, hkv, n, d, v, view in ROWS:
        sets = make_sets(
            b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(kv_bytes(b, hkv, n, d, v, view, 2))
        )
        scale = 1 / math.sqrt(d)
        lib.fused_ok, lib.pdl = True, False
        t_plan, plan = bench_harness(lib, sets, scale)
        splits = struct.unpack(PARAMS_FORMAT, plan[0].params)[8]  # num_splits
        lib.fused_ok = False
        t_split = bench_first_launch(lib, sets, scale, splits)
        t_two, _ = bench_harness(lib, sets, scale, splits)
        lib.pdl = True
        t_overlapped, _ = bench_harness(lib, sets, scale, splits)
        lib.fused_ok = True
        print(
            (b, hq, hkv, n, d, v),
            f"{splits} splits, {plan[0].kernel} g{plan[0].grid[0]}",
            f"| {t_plan * 1e6:.1f} | {t_split * 1e6:.1f} | {t_two * 1e6:.1f}"
            f" | {t_overlapped * 1e6:.1f}",
            flush=True,
        )
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import sys

    main(sys.argv[1] if len(sys.argv) > 1 else None)
