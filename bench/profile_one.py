"""Run one bench shape a few times through the harness (for ncu): python3 -m bench.profile_one
B HQ HKV N D V [view]."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from bench import cuda_harness as h

b, hq, hkv, n, d, v = map(int, sys.argv[1:7])
view = len(sys.argv) > 7
folder = Path(".gpu/sdpa")
lib = h.Library(folder / (folder / "current").read_text().strip())
q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
vv = k[..., :v] if view else torch.randn(b, hkv, n, v, device="cuda", dtype=torch.bfloat16)
plan = h.plan_for(lib, q, k, vv, scale=1 / math.sqrt(d))
print(plan[0].grid, plan[0].shared_memory, [p.kernel for p in plan])
for _ in range(3):
    h.run(lib, q, k, vv, scale=1 / math.sqrt(d), launches=plan)
torch.cuda.synchronize()
