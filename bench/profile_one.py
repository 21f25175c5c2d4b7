"""Run one bench shape a few times (for ncu): python3 -m bench.profile_one B HQ HKV N D V
[view] [--torch | --lib=FATBIN_LIST]; --torch runs torch's SDPA on the same inputs instead of
aotc's kernels, --lib takes the kernels from another fatbin list (bench.variants builds)."""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from bench import cuda_harness as h

args = [a for a in sys.argv[1:] if not a.startswith("--")]
b, hq, hkv, n, d, v = map(int, args[:6])
view = len(args) > 6
q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
vv = k[..., :v] if view else torch.randn(b, hkv, n, v, device="cuda", dtype=torch.bfloat16)
scale = 1 / math.sqrt(d)
if "--torch" in sys.argv:
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, vv, scale=scale, enable_gqa=True)
else:
    libs = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--lib=")]
    lib = h.load_library(libs[0] if libs else None)
    plan = h.plan_for(lib, q, k, vv, scale=scale)
    print(plan[0].grid, plan[0].shared_memory, [p.kernel for p in plan])
    for _ in range(3):
        h.run(lib, q, k, vv, scale=scale, launches=plan)
torch.cuda.synchronize()
