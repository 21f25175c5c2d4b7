"""MLA-style shapes: the mma.sync split pass vs the wgmma kernel, and wgmma's split counts.

python3 -m bench.sweep_wgmma [--few-rows] [--plan-only]   (harness fatbin in .gpu/sdpa, sm_90)
"""

from __future__ import annotations

import math
import sys

import torch

from aotc.families.sdpa_vector import cuda as cuda_plan
from bench import cuda_harness as h
from bench.bench_sdpa import bench_harness, make_sets
from bench.shapes import SHAPES as ALL_SHAPES
from bench.shapes import attention_flops, kv_bytes, set_count

# MLA rows of the shared list, then MLA with its own V and a 192/128 shape with 64 rows a head.
SHAPES = [s for s in ALL_SHAPES if s[6]] + [
    (8, 128, 1, 8192, 576, 512, False),
    (4, 64, 1, 16384, 192, 128, False),
]
FEW_ROWS = [ALL_SHAPES[3], ALL_SHAPES[1], (8, 32, 8, 32768, 256, 128, False)]
SPLITS = (None, 1, 2, 4, 8, 16, 32, 64)


def main() -> None:
    lib = h.load_library()
    shapes, splits_list = SHAPES, SPLITS
    if "--few-rows" in sys.argv:
        cuda_plan.WGMMA_MIN_ROWS = cuda_plan.WGMMA_SMALL_HEADS_MIN_ROWS = 1
        shapes, splits_list = FEW_ROWS, (None, 2, 4)
    if "--plan-only" in sys.argv:
        splits_list = (None,)
    for b, hq, hkv, n, d, v, view in shapes:
        nbytes, flops = kv_bytes(b, hkv, n, d, v, view), attention_flops(b, hq, n, d, v)

        def rate(t, flops=flops, nbytes=nbytes):
            return f"{flops / t / 1e12:.0f}TF {nbytes / t / 1e12:.2f}TB/s"

        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(nbytes))
        scale = 1 / math.sqrt(d)
        cells = []
        lib.wgmma_ok = False
        t, plan = bench_harness(lib, sets, scale)
        cells.append(f"mma.sync {t * 1e6:.1f}us {rate(t)}")
        lib.wgmma_ok = True
        for splits in splits_list:
            try:
                t, plan = bench_harness(lib, sets, scale, splits)
            except Exception as exc:
                cells.append(f"{splits}: {type(exc).__name__} {str(exc)[:60]}")
                continue
            tag = "wg" if plan[0].kernel.startswith("sdpa_vector_wgmma") else "old"
            cells.append(f"{tag} s={splits or 'plan'}/g{plan[0].grid[0]} {t * 1e6:.1f}us {rate(t)}")
        print((b, hq, hkv, n, d, v, view), " | ".join(cells), flush=True)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
