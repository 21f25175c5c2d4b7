"""The wgmma kernel's tile loads: by TMA (the launch's tensor maps) vs its cp.async path.

    python3 -m bench.tma_loads [--rows 9,7,6,8,3] [--rounds 3]   (harness fatbin in .gpu/sdpa)

Same fatbin, same run: the harness leaves the maps unencoded for the cp.async side. Rows index
bench.shapes.SHAPES (bf16, one query token); the two sides alternate order every round, and
each row prints every round's time per call (CUDA-graph replays) and the best's TFLOP/s.
"""

from __future__ import annotations

import argparse

import torch

from bench import cuda_harness as h
from bench.bench_sdpa import make_sets, time_plans
from bench.shapes import SHAPES, attention_flops, kv_bytes, set_count

SIDES = {"tma": True, "cp.async": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="9,7,6,8,3")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lib = h.load_library()
    print(torch.cuda.get_device_name(0))
    for row in map(int, args.rows.split(",")):
        b, hq, hkv, n, d, v, view = SHAPES[row]
        nbytes = kv_bytes(b, hkv, n, d, v, view)
        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(nbytes))
        plans = [h.plan_for(lib, *s, scale=d**-0.5) for s in sets]
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in list(SIDES) if r % 2 == 0 else list(reversed(SIDES)):
                lib.tma = SIDES[side]
                times[side].append(time_plans(lib, sets, plans, d**-0.5) * 1e6)
        lib.tma = True
        flops = attention_flops(b, hq, n, d, v)
        for side, ts in times.items():
            print(
                f"{SHAPES[row]} {side:8s} "
                + " ".join(f"{t:.1f}" for t in sorted(ts))
                + f" us, best {flops / min(ts) / 1e6:.0f} TFLOP/s"
            )


if __name__ == "__main__":
    main()
