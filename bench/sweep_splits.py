"""Time forced key-split counts for a few small shapes (harness): python3 -m bench.sweep_splits."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bench import cuda_harness as h
from bench.bench_sdpa import bench_harness

folder = Path(".gpu/sdpa")
lib = h.Library(folder / (folder / "current").read_text().strip())
for b, hq, hkv, n, d, v in [
    (1, 32, 4, 4096, 192, 128),
    (1, 16, 16, 8192, 80, 80),
    (1, 128, 1, 8192, 576, 512),
]:
    sets = []
    for _ in range(8):
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
        sets.append((q, k, torch.randn(b, hkv, n, v, device="cuda", dtype=torch.bfloat16)))
    scale = 1 / math.sqrt(d)
    row = []
    planned = h.plan_for(lib, *sets[0], scale=scale)
    for splits in (None, 1, 4, 8, 16, 32, 64, 128):
        t, plan = bench_harness(lib, sets, scale, splits)
        row.append(f"{splits or 'plan'}:{len(plan)}L/g{plan[0].grid[0]}={t * 1e6:.1f}us")
    print((b, hq, hkv, n, d, v), " ".join(row), flush=True)
