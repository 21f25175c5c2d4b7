"""Time forced key-split counts of the mma.sync kernels (harness): python3 -m bench.sweep_splits.

The plan's count ("plan") fills the resident block slots; the others show what fewer, longer
splits (fewer concurrent K/V streams) or more, shorter ones (more parallelism) would give. Each
count is timed twice: "f" as the fused split pass (whatever FUSED_MAX_SPLITS says), "c" as the
split pass plus the combine kernel.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from aotc.families.sdpa_vector import cuda
from bench import cuda_harness as h
from bench.bench_sdpa import bench_harness, make_sets
from bench.shapes import SHAPES

ROWS = [SHAPES[i] for i in (0, 4, 10, 1, 2)]  # batch-1 rows, then 192/128 and 128/128 B=8
COUNTS = (None, 4, 8, 12, 16, 24, 32, 48, 64, 96)

folder = Path(".gpu/sdpa")
lib = h.Library(folder / (folder / "current").read_text().strip())
lib.wgmma_ok = False
cuda.FUSED_MAX_SPLITS = 1 << 30
for b, hq, hkv, n, d, v, view in ROWS:
    sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, 4)
    scale = 1 / math.sqrt(d)
    row = []
    for splits in COUNTS:
        times = []
        for fused in (True, False):
            lib.fused_ok = fused
            t, plan = bench_harness(lib, sets, scale, splits)
            times.append(t * 1e6)
        row.append(f"{splits or 'plan'}:g{plan[0].grid[0]} f{times[0]:.1f}/c{times[1]:.1f}")
    print((b, hq, hkv, n, d, v), " ".join(row), flush=True)
    del sets
    torch.cuda.empty_cache()
lib.fused_ok = True
