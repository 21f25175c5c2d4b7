"""Time forced key-split counts of the mma.sync kernels (harness): python3 -m bench.sweep_splits.

The plan's count ("plan") fills the resident block slots; the others show what fewer, longer
splits (fewer concurrent K/V streams) or more, shorter ones (more parallelism) would give.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bench import cuda_harness as h
from bench.bench_sdpa import bench_harness, make_sets
from bench.shapes import SHAPES

ROWS = [SHAPES[i] for i in (0, 4, 10, 1, 2)]  # batch-1 rows, then 192/128 and 128/128 B=8
COUNTS = (None, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96)

folder = Path(".gpu/sdpa")
lib = h.Library(folder / (folder / "current").read_text().strip())
lib.wgmma_ok = False
for b, hq, hkv, n, d, v, view in ROWS:
    sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, 4)
    scale = 1 / math.sqrt(d)
    row = []
    for splits in COUNTS:
        t, plan = bench_harness(lib, sets, scale, splits)
        row.append(f"{splits or 'plan'}:g{plan[0].grid[0]}={t * 1e6:.1f}us")
    print((b, hq, hkv, n, d, v), " ".join(row), flush=True)
    del sets
    torch.cuda.empty_cache()
