"""Decode attention at steady state: python3 -m bench.sustained [--shapes 9,1,2,10,0]

bench_sdpa and decode_context time short bursts of CUDA-graph replays, which run at the boost
clock. A model generating tokens runs attention for as long as it decodes, and a compute-bound
call (MLA decode: ~500 TFLOP/s) then draws the board to its power cap, and the GPU lowers the
SM clock. Here each side's calls replay for --seconds on end, alone and each after a decode
step's GEMM (as bench.decode_context; the GEMM's own steady time subtracted), while nvidia-smi
logs the SM clock, the board power and the clock-event reasons (bench.gpu_clocks). A benchmark,
not a test.

The GEMM alone runs at a cooler clock point than inside the GEMM + call loop, so the "after a
GEMM" column is the loop's cost of the call, not a kernel time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from typing import NamedTuple

import torch

from bench import cuda_harness as h
from bench.bench_sdpa import capture, make_sets
from bench.decode_context import after, attention_calls, gemm_operands, matmul_into, warmed_up
from bench.gpu_clocks import ClockLog
from bench.shapes import SHAPES, attention_flops, kv_bytes, set_count

GRAPH_CALLS = 40


class Steady(NamedTuple):
    per_call: float  # seconds
    start: dt.datetime
    end: dt.datetime


def steady(fns, seconds: float) -> Steady:
    """A CUDA graph of GRAPH_CALLS calls (cycling over fns) replayed back to back for
    `seconds`: seconds per call, and when the replays ran."""
    g = capture(fns, GRAPH_CALLS)
    g.replay()
    torch.cuda.synchronize()
    # At most two replays queued: the CPU would otherwise queue seconds of work ahead.
    done = [torch.cuda.Event(), torch.cuda.Event()]
    start, t0, replays = dt.datetime.now(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        done[replays % 2].synchronize()
        g.replay()
        done[replays % 2].record()
        replays += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return Steady(elapsed / replays / GRAPH_CALLS, start, dt.datetime.now())


def rate(shape, seconds: float) -> str:
    b, hq, hkv, n, d, v, view = shape
    if view:  # MLA: compute-bound
        return f"{attention_flops(b, hq, n, d, v) / seconds / 1e12:6.1f} TFLOP/s"
    return f"{kv_bytes(b, hkv, n, d, v, view) / seconds / 1e12:5.2f} TB/s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="9,1,2,10,0", help="indices into bench.shapes.SHAPES")
    parser.add_argument("--seconds", type=float, default=1.5, help="of each steady phase")
    parser.add_argument("--lib", help="a fatbin list (bench.variants builds); default .gpu/sdpa")
    parser.add_argument("--sides", default="aotc,torch")
    args = parser.parse_args()
    lib = h.load_library(args.lib)
    gemm = matmul_into(*gemm_operands())
    print(f"{torch.cuda.get_device_name()}, bf16, {args.seconds} s of replays per phase")
    print("shape | side | alone us (SM clock, power, clock reasons) | after a GEMM us | rate alone")
    phases = []
    with ClockLog() as log:
        for i in args.shapes.split(","):
            shape = SHAPES[int(i)]
            b, _, hkv, n, d, v, view = shape
            sets = make_sets(*shape, torch.bfloat16, set_count(kv_bytes(b, hkv, n, d, v, view)))
            calls = attention_calls(lib, sets, 1 / math.sqrt(d))
            gemm_alone = steady([gemm], args.seconds)
            for side in args.sides.split(","):
                if not warmed_up(calls[side]):
                    phases.append((shape, side, None, None, gemm_alone))
                    continue
                alone = steady(calls[side], args.seconds)
                both = steady(after(gemm, calls[side]), args.seconds)
                phases.append((shape, side, alone, both, gemm_alone))
            del sets, calls
            torch.cuda.empty_cache()
    for shape, side, alone, both, gemm_alone in phases:
        if alone is None:
            print(f"{shape[:6]} | {side} | failed | | ")
            continue
        print(
            f"{shape[:6]} | {side} | {alone.per_call * 1e6:7.1f} "
            f"({log.summary(alone.start, alone.end)}) | "
            f"{(both.per_call - gemm_alone.per_call) * 1e6:7.1f} "
            f"({log.summary(both.start, both.end)}) | {rate(shape, alone.per_call)}"
        )


if __name__ == "__main__":
    main()
