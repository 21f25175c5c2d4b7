"""Key-tile stage counts of the mma.sync kernels (a run-time Params field), timed per shape.

    python3 -m bench.sweep_stages [--rows 10,1,2,0,4,5] [--splits 16,32,64]
    (harness fatbin in .gpu/sdpa)

More stages keep more bytes in flight per block but leave fewer blocks per SM (the plan derives
blocks per SM and the split count from the shared memory a block takes). With --splits, each
stage count is also timed at those forced split counts: a batch-1 split of a few tiles needs
them all in flight at once to pay one DRAM round trip instead of several.
"""

from __future__ import annotations

import argparse
import math

import torch

from aotc.families.sdpa_vector import cuda as cuda_plan
from bench import cuda_harness as h
from bench.bench_sdpa import make_sets, time_plans
from bench.shapes import SHAPES, kv_bytes, set_count

DEFAULT = cuda_plan._stages
DEFAULT_FIT = cuda_plan._streaming_fit


def cell(lib, sets, scale, nbytes, stages, splits) -> str:
    """A forced stage count is kept as it is: the plan's in-flight budget is off for it."""
    if stages is not None:
        cuda_plan._stages = lambda *a, s=stages: s
        cuda_plan._streaming_fit = lambda *a: None
    try:
        plans = [h.plan_for(lib, *s, scale=scale, num_splits=splits) for s in sets]
    except Exception as exc:
        return f"{stages}: {type(exc).__name__}"
    finally:
        cuda_plan._stages, cuda_plan._streaming_fit = DEFAULT, DEFAULT_FIT
    t = time_plans(lib, sets, plans, scale)
    first = plans[0][0]
    return (
        f"{stages or 'plan'}x{splits or 'plan'}/{len(plans[0])}L/g{first.grid[0]}"
        f"/smem{first.shared_memory // 1024}K {t * 1e6:.1f}us {nbytes / t / 1e12:.2f}TB/s"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="10,1,2,0,4,5", help="indices into bench.shapes.SHAPES")
    ap.add_argument("--splits", default="", help="forced split counts besides the plan's")
    ap.add_argument("--stages", default="2,3,4,5,6")
    ap.add_argument("--lib", help="a fatbin list (bench.variants builds); default .gpu/sdpa")
    args = ap.parse_args()
    lib = h.load_library(args.lib)
    lib.wgmma_ok = False
    split_counts = [None] + [int(s) for s in args.splits.split(",") if s]
    stage_counts = [None] + [int(s) for s in args.stages.split(",") if s]
    for index in map(int, args.rows.split(",")):
        b, hq, hkv, n, d, v, view = SHAPES[index]
        nbytes = kv_bytes(b, hkv, n, d, v, view, 2)
        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(nbytes))
        scale = 1 / math.sqrt(d)
        for splits in split_counts:
            cells = [cell(lib, sets, scale, nbytes, st, splits) for st in stage_counts]
            print((b, hq, hkv, n, d, v), " | ".join(cells), flush=True)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
