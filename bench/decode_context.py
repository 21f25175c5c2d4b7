"""Decode attention between other kernels, as in a decode step: python3 -m bench.decode_context

bench_sdpa replays one attention kernel back to back, so what one call leaves in L2 (its code,
its scratch, Q) is there for the next. A decode step runs projections and the MLP between two
attention calls, whose weights turn L2 over. Here every attention call follows a GEMM of a decode
step's size (8 x 4096 by 4096 x 12288, bf16: 96 MB of weights, about twice L2) in one CUDA graph,
and a call costs the graph's time minus the GEMMs' alone. aotc (the harness, .gpu/sdpa, or
--lib, a fatbin list that bench.variants builds) and torch's SDPA run on the same inputs, in
alternating order; "alone" is bench_sdpa's back-to-back figure. A benchmark, not a test.

--before picks what runs before each call: "gemm" (the decode step's GEMM), "fill" (zeros
written over 96 MB: L2 full of dirty lines, from a kernel of a few instructions), or "tiny" (one
small elementwise kernel: another kernel's code, L2 left as it was).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from bench import cuda_harness as h
from bench.bench_sdpa import harness_calls, make_sets, time_graph, torch_calls
from bench.shapes import SHAPES, kv_bytes, set_count

GEMM = (8, 4096, 12288)  # tokens x hidden by hidden x out


def attention_calls(lib, sets, scale) -> dict:
    """One callable per input set for each side: aotc's planned launches and torch's SDPA."""
    plans = [h.plan_for(lib, *s, scale=scale) for s in sets]
    return {"aotc": harness_calls(lib, sets, plans, scale), "torch": torch_calls(sets, scale)}


def warmed_up(calls) -> bool:
    """Runs each call once; False when one raises (torch's SDPA runs out of memory on MLA)."""
    try:
        for call in calls:
            call()
        torch.cuda.synchronize()
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        print(f"  ({type(exc).__name__}: {str(exc)[:80]})")
        torch.cuda.empty_cache()
        return False
    return True


def after(first, calls) -> list:
    """Each call preceded by `first`."""
    return [(lambda c=c: (first(), c())) for c in calls]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="0,4,10,2,1", help="indices into bench.shapes.SHAPES")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", choices=("gemm", "fill", "tiny"), default="gemm")
    parser.add_argument("--lib", help="a fatbin list (bench.variants builds); default .gpu/sdpa")
    args = parser.parse_args()
    folder = Path(".gpu/sdpa")
    listing = Path(args.lib) if args.lib else folder / (folder / "current").read_text().strip()
    lib = h.Library(listing)
    tokens, hidden, width = GEMM
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(hidden, width, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(tokens, width, device="cuda", dtype=torch.bfloat16)
    small = torch.zeros(1024, device="cuda")
    before = {
        "gemm": lambda: torch.matmul(x, w, out=y),
        "fill": lambda: w.zero_(),
        "tiny": lambda: small.add_(1.0),
    }[args.before]
    what = {"gemm": f"a {tokens}x{hidden}x{width} GEMM", "fill": "a 96 MB fill"}
    what["tiny"] = "a tiny add"
    print(f"{torch.cuda.get_device_name()}, bf16, after {what[args.before]} each")
    print("shape | round | before us | aotc after it / alone us | torch after it / alone us")
    for i in args.shapes.split(","):
        b, hq, hkv, n, d, v, view = SHAPES[int(i)]
        nbytes = kv_bytes(b, hkv, n, d, v, view)
        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(nbytes))
        calls = attention_calls(lib, sets, 1 / math.sqrt(d))
        failed = {side for side, fns in calls.items() if not warmed_up(fns)}
        for r in range(args.rounds):
            sides = ["aotc", "torch"] if r % 2 == 0 else ["torch", "aotc"]
            base = time_graph([before])
            cells = {}
            for side in sides:
                if side in failed:
                    cells[side] = "failed"
                    continue
                both = time_graph(after(before, calls[side]))
                alone = time_graph(calls[side])
                if None in (base, both, alone):  # time_graph printed why
                    cells[side] = "failed"
                    continue
                cells[side] = f"{(both - base) * 1e6:7.1f} / {alone * 1e6:7.1f}"
            shape = (b, hq, hkv, n, d, v)
            gemm_us = f"{base * 1e6:6.1f}" if base is not None else "failed"
            print(f"{shape} | {r} | {gemm_us} | {cells['aotc']} | {cells['torch']}")
        del sets, calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
