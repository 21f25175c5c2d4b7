"""Key-tile stage counts of the mma.sync kernels (a run-time Params field), timed per shape.

    python3 -m bench.sweep_stages   (harness fatbin in .gpu/sdpa)

More stages keep more bytes in flight per block but leave fewer blocks per SM (the plan derives
blocks per SM and the split count from the shared memory a block takes).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aotc.families.sdpa_vector import cuda as cuda_plan
from bench import cuda_harness as h
from bench.bench_sdpa import kv_bytes, make_sets, time_plans
from bench.shapes import SHAPES

ROWS = [SHAPES[i] for i in (10, 1, 2, 0, 4, 5)]  # 256/128 B=1, 192/128 and 128/128 B=8, B=1 rows
DEFAULT = cuda_plan._stages


def main() -> None:
    folder = Path(".gpu/sdpa")
    lib = h.Library(folder / (folder / "current").read_text().strip())
    lib.wgmma_ok = False
    for b, hq, hkv, n, d, v, view in ROWS:
        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, 4)
        nbytes = kv_bytes(b, hkv, n, d, v, view, 2)
        scale = 1 / math.sqrt(d)
        cells = []
        for stages in (None, 2, 3, 4, 5, 6):
            cuda_plan._stages = DEFAULT if stages is None else (lambda *a, s=stages: s)
            try:
                plans = [h.plan_for(lib, *s, scale=scale) for s in sets]
            except Exception as exc:
                cells.append(f"{stages}: {type(exc).__name__}")
                continue
            t = time_plans(lib, sets, plans, scale)
            first = plans[0][0]
            cells.append(
                f"{stages or 'plan'}/g{first.grid[0]}/smem{first.shared_memory // 1024}K "
                f"{t * 1e6:.1f}us {nbytes / t / 1e12:.2f}TB/s"
            )
        cuda_plan._stages = DEFAULT
        print((b, hq, hkv, n, d, v), " | ".join(cells), flush=True)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
