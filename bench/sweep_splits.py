"""Time forced key-split counts of the mma.sync kernels (harness): python3 -m bench.sweep_splits.

The plan's count ("plan") fills the resident block slots; the others show what fewer, longer
splits (fewer concurrent K/V streams) or more, shorter ones (more parallelism) would give. Each
count is timed three ways: "f" the fused split pass whose last block per row group merges, "w"
the fused split pass with waiting combiners (where one wave holds them; else the plan's
fallback), "c" the split pass plus the combine kernel.
"""

from __future__ import annotations

import math

import torch

from aotc.families.sdpa_vector import cuda
from bench import cuda_harness as h
from bench.bench_sdpa import bench_harness, make_sets
from bench.shapes import SHAPES, kv_bytes, set_count

ROWS = [SHAPES[i] for i in (0, 4, 10, 1, 2)]  # batch-1 rows, then 192/128 and 128/128 B=8
COUNTS = (None, 4, 8, 12, 16, 24, 32, 48, 64, 96)

lib = h.load_library()
lib.wgmma_ok = False
MODES = {"f": (True, 1 << 30), "w": (True, 0), "c": (False, cuda.FUSED_MAX_SPLITS)}
DEFAULT_MAX = cuda.FUSED_MAX_SPLITS
for b, hq, hkv, n, d, v, view in ROWS:
    sets = make_sets(
        b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(kv_bytes(b, hkv, n, d, v, view, 2))
    )
    scale = 1 / math.sqrt(d)
    row = []
    for splits in COUNTS:
        cells = []
        for mode, (fused, max_splits) in MODES.items():
            lib.fused_ok, cuda.FUSED_MAX_SPLITS = fused, max_splits
            if splits is None and mode != "c":
                lib.fused_ok, cuda.FUSED_MAX_SPLITS = True, DEFAULT_MAX  # the plan as shipped
            t, plan = bench_harness(lib, sets, scale, splits)
            cells.append(f"{mode}{t * 1e6:.1f}")
        row.append(f"{splits or 'plan'}:g{plan[0].grid[0]} " + "/".join(cells))
    print((b, hq, hkv, n, d, v), " ".join(row), flush=True)
    del sets
    torch.cuda.empty_cache()
lib.fused_ok, cuda.FUSED_MAX_SPLITS = True, DEFAULT_MAX
