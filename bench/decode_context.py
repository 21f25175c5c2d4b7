"""Decode attention between other kernels, as in a decode step: python3 -m bench.decode_context

bench_sdpa replays one attention kernel back to back, so what one call leaves in L2 (its code,
its scratch, Q) is there for the next. A decode step runs projections and the MLP between two
attention calls, whose weights turn L2 over. Here every attention call follows a GEMM of a decode
step's size (8 x 4096 by 4096 x 12288, bf16: 96 MB of weights, about twice L2) in one CUDA graph,
and a call costs the graph's time minus the GEMMs' alone. aotc (the harness, .gpu/sdpa, or
--lib, a fatbin list that bench.variants builds) and torch's SDPA run on the same inputs, in
alternating order; "alone" is bench_sdpa's back-to-back figure. A benchmark, not a test.

--before picks what runs before each call:
  gemm        the decode step's GEMM
  fill        zeros written over 96 MB: L2 full of dirty lines, from a kernel of a few
              instructions
  tiny        one small elementwise kernel: little code, L2 left as it was
  small-gemm  8 x 4096 by 4096 x 256: cuBLAS code of the same depth, 2 MB of weights
  aotc-tiny   aotc's split plan for --tiny-pair D,V on 1 x 264 x 33 x 256 (132 blocks, so every
              SM runs its code), L2 left as it was; with --tiny-lib, from another fatbin list
              (the same fatbin copied is a second module: the same code at another address)

--parts times each kernel inside the graph instead, between events recorded in it: what runs
before a call, the call, and both alone. It says whether a call's extra time after a GEMM is the
call's own or the GEMM's (the graph's difference cannot tell them apart).
"""

from __future__ import annotations

import argparse
import math

import torch

from bench import cuda_harness as h
from bench.bench_sdpa import (
    harness_calls,
    make_sets,
    time_graph,
    torch_calls,
    warm_up_off_capture,
)
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


def time_parts(steps, calls=20, reps=10) -> list[float] | None:
    """Median seconds of each part of the steps (a step is a tuple of parts) in one CUDA graph of
    `calls` steps (cycling over them), from external events recorded between the parts."""
    width = len(steps[0])
    marks = [
        [torch.cuda.Event(enable_timing=True, external=True) for _ in range(width + 1)]
        for _ in range(calls)
    ]
    try:
        warm_up_off_capture([part for step in steps for part in step])
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                marks[i][0].record()
                for j, part in enumerate(steps[i % len(steps)]):
                    part()
                    marks[i][j + 1].record()
        times: list[list[float]] = [[] for _ in range(width)]
        for _ in range(reps):
            g.replay()
            torch.cuda.synchronize()
            for m in marks[1:]:  # the first step follows the previous replay's last
                for j in range(width):
                    times[j].append(m[j].elapsed_time(m[j + 1]) / 1e3)
    except Exception as exc:
        print(f"  (part timing failed: {type(exc).__name__}: {str(exc)[:120]})")
        return None
    return [sorted(t)[len(t) // 2] for t in times]


def parts_cell(before, calls) -> str:
    """'before | call' after each other, then each alone, from events inside the graphs."""
    both = time_parts([(before, c) for c in calls])
    alone = time_parts([(c,) for c in calls])
    base = time_parts([(before,)])
    if None in (both, alone, base):
        return "failed"
    return (
        f"{both[0] * 1e6:6.1f} + {both[1] * 1e6:7.1f} (alone {base[0] * 1e6:6.1f} + "
        f"{alone[0] * 1e6:7.1f})"
    )


def gemm_operands() -> tuple:
    """The decode step's GEMM inputs: activations (tokens x hidden) and 96 MB of weights."""
    tokens, hidden, width = GEMM
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    return x, torch.randn(hidden, width, device="cuda", dtype=torch.bfloat16)


def matmul_into(x, w):
    """x @ w into an output of its own: one GEMM kernel a call."""
    y = torch.empty(x.shape[0], w.shape[1], device="cuda", dtype=x.dtype)
    return lambda: torch.matmul(x, w, out=y)


def predecessor(args, lib) -> tuple:
    """(the kernel --before names, a few words saying what it is)."""
    tokens, hidden, width = GEMM
    x, w = gemm_operands()
    if args.before == "gemm":
        return matmul_into(x, w), f"a {tokens}x{hidden}x{width} GEMM"
    if args.before == "fill":
        return w.zero_, "a 96 MB fill"
    if args.before == "tiny":
        small = torch.zeros(1024, device="cuda")
        return (lambda: small.add_(1.0)), "a tiny add"
    if args.before == "small-gemm":
        return matmul_into(x, w[:, :256].contiguous()), f"a {tokens}x{hidden}x256 GEMM"
    d, v = map(int, args.tiny_pair.split(","))
    # a fused split plan of ~132 blocks: every SM runs its code
    tiny_sets = make_sets(1, 264, 33, 256, d, v, False, torch.bfloat16, 1)
    tiny_lib = h.load_library(args.tiny_lib) if args.tiny_lib else lib
    tiny_call = attention_calls(tiny_lib, tiny_sets, 1 / math.sqrt(d))["aotc"][0]
    return tiny_call, f"aotc's {args.tiny_pair} kernel on 256 keys"


def graph_cell(before, base, calls) -> str:
    """'after it / alone' from the graphs' differences (`base`: `before` alone)."""
    both = time_graph(after(before, calls))
    alone = time_graph(calls)
    if None in (base, both, alone):  # time_graph printed why
        return "failed"
    return f"{(both - base) * 1e6:7.1f} / {alone * 1e6:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="0,4,10,2,1", help="indices into bench.shapes.SHAPES")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--before", choices=("gemm", "fill", "tiny", "small-gemm", "aotc-tiny"), default="gemm"
    )
    parser.add_argument("--lib", help="a fatbin list (bench.variants builds); default .gpu/sdpa")
    parser.add_argument("--parts", action="store_true", help="time each kernel in the graph")
    parser.add_argument("--tiny-pair", default="80,80", help="D,V of --before aotc-tiny")
    parser.add_argument(
        "--tiny-lib", help="--before aotc-tiny's kernels from this fatbin list (a second module)"
    )
    parser.add_argument("--sides", default="aotc,torch", help="torch's MLA calls take ~50 ms")
    args = parser.parse_args()
    lib = h.load_library(args.lib)
    before, what = predecessor(args, lib)
    print(f"{torch.cuda.get_device_name()}, bf16, after {what} each")
    if args.parts:
        print("shape | round | aotc: before + call us (each alone) | torch: the same")
    else:
        print("shape | round | before us | aotc after it / alone us | torch after it / alone us")
    for i in args.shapes.split(","):
        b, hq, hkv, n, d, v, view = SHAPES[int(i)]
        nbytes = kv_bytes(b, hkv, n, d, v, view)
        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(nbytes))
        calls = attention_calls(lib, sets, 1 / math.sqrt(d))
        unused = {side: "skipped" for side in set(calls) - set(args.sides.split(","))}
        unused |= {
            side: "failed" for side in calls if side not in unused and not warmed_up(calls[side])
        }
        shape = (b, hq, hkv, n, d, v)
        for r in range(args.rounds):
            sides = ["aotc", "torch"] if r % 2 == 0 else ["torch", "aotc"]
            base = None if args.parts else time_graph([before])
            cells = {}
            for side in sides:
                if side in unused:
                    cells[side] = unused[side]
                elif args.parts:
                    cells[side] = parts_cell(before, calls[side])
                else:
                    cells[side] = graph_cell(before, base, calls[side])
            if args.parts:
                print(f"{shape} | {r} | {cells['aotc']} | {cells['torch']}")
            else:
                gemm_us = f"{base * 1e6:6.1f}" if base is not None else "failed"
                print(f"{shape} | {r} | {gemm_us} | {cells['aotc']} | {cells['torch']}")
        del sets, calls
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
