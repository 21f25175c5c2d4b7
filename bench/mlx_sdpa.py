"""Decode attention through MLX on the GPU: aotc.sdpa_vector vs mx.fast SDPA vs torch SDPA.

    python3 -m bench.mlx_sdpa [--index dist/extra_sdpa.cuda.json] [--iters 20] [--shapes 0,4]
        [--plan-constant NAME=INT]

A benchmark, not a test: one table per run, with the device's copy bandwidth and MLX's
per-evaluation floor measured in the same run as the ceilings to compare against. "us/eval" is
one call evaluated alone; "us/call" and mx.fast are chains of 8 calls per evaluation, each
query computed from the previous call's output as a model's layers are (layer_chain: one small
fused kernel per call; torch's eager loop runs the same step as one addcmul), pipelined with
mx.async_eval (seconds_per_call). Every side cycles over enough K/V sets that L2 does not
keep them between calls.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import mlx.core as mx

import aotc
from bench.options import apply_plan_constants
from bench.shapes import (
    SHAPES,
    add_mlx_options,
    attention_flops,
    kv_bytes,
    mlx_kv,
    mlx_query,
    selected,
    set_count,
)

CHAIN = 8  # calls per evaluation for the us/call column


def seconds_per_call(calls: Callable[[], list[mx.array]], iters: int) -> float:
    """Wall time per call of the chains `calls()` makes. One call per chain waits for each (a
    lone call's latency); longer chains are pipelined as mlx-lm generates tokens: the next is
    built while the GPU runs this one (mx.async_eval), so the figure is the GPU's rate when the
    host keeps up, as with torch's eager calls."""
    for _ in range(3):
        outs = calls()
        mx.eval(outs)
    chain = len(outs)
    start = time.perf_counter()
    if chain == 1:
        for _ in range(iters):
            mx.eval(calls())
    else:
        pipelined(calls, iters)
    return (time.perf_counter() - start) / (iters * chain)


def pipelined(calls: Callable[[], list[mx.array]], iters: int) -> None:
    """`iters` chains, each built and submitted (mx.async_eval) before waiting for the last."""
    pending: list[mx.array] = []
    for _ in range(iters):
        outs = calls()
        mx.async_eval(outs)
        mx.eval(pending)
        pending = outs
    mx.eval(pending)


@mx.compile
def _after(q: mx.array, out: mx.array) -> mx.array:
    """q, computed after `out`: one small fused kernel. mx.depends would order the graph only:
    MLX's CUDA graph tracks buffers, so calls chained by it still ran at once on the GPU."""
    return q + out[..., :1] * 0


def layer_chain(op: Callable, q: mx.array, kvs: list, chain: int) -> Callable[[], list]:
    """`chain` calls as a model's layers make them: each on the next K/V set (a layer's cache),
    its query computed after the previous call's output. Independent calls in one evaluation
    run at once on the GPU, and identical ones share K and V through L2."""

    def calls() -> list[mx.array]:
        outs = [op(q, *kvs[0])]
        for i in range(1, chain):
            outs.append(op(_after(q, outs[-1]), *kvs[i % len(kvs)]))
        return outs

    return calls


def copy_bandwidth() -> tuple[float, str]:
    """Bytes read + written per second by a 1 GiB device-to-device copy (torch's copy_ when
    torch has CUDA: MLX's elementwise kernels do not reach the copy engine's rate)."""
    try:
        import torch

        if torch.cuda.is_available():
            src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            for _ in range(3):
                dst.copy_(src)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / 20
            del src, dst
            torch.cuda.empty_cache()
            return 2 * (1 << 30) / seconds, "torch copy_"
    except ImportError:
        pass
    x = mx.zeros((1 << 28,), dtype=mx.float32)
    mx.eval(x)
    return 2 * x.nbytes / seconds_per_call(lambda: [x + 1], 10), "MLX x + 1"


def eval_floor() -> float:
    x = mx.zeros((16,))
    mx.eval(x)
    return seconds_per_call(lambda: [x + 1], 200)


def torch_sdpa(b, hq, hkv, n, d, v_dim, iters, sets) -> float | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    try:
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
        kvs = [
            (
                torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16),
                torch.randn(b, hkv, n, v_dim, device="cuda", dtype=torch.bfloat16),
            )
            for _ in range(sets)
        ]

        zero = torch.zeros((), device="cuda", dtype=torch.bfloat16)

        def run(i, qi):
            k, v = kvs[i % sets]
            out = F.scaled_dot_product_attention(qi, k, v, scale=d**-0.5, enable_gqa=hkv != hq)
            # The next query after this output, in one kernel, as layer_chain's MLX calls.
            return torch.addcmul(q, out[..., :1], zero)

        qi = q
        for i in range(3):
            qi = run(i, qi)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(iters):
            qi = run(i, qi)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / iters
    except RuntimeError:  # out of memory, unsupported shape
        return None
    finally:
        # torch's math path for MLA holds GBs in its cache; MLX needs them back for the next
        # row (an H200 run of round 9 ran out of memory there).
        q = kvs = None
        torch.cuda.empty_cache()


def make_kvs(shape, sets) -> list[tuple[mx.array, mx.array]]:
    """`sets` K/V caches of `shape`, evaluated."""
    return [mlx_kv(shape) for _ in range(sets)]


def row(shape, iters: int) -> dict:
    """One table row; its arrays die with the call, so rows do not pile up GPU memory."""
    b, hq, hkv, n, d, v_dim, v_view = shape
    q = mlx_query(shape)
    nbytes = kv_bytes(b, hkv, n, d, v_dim, v_view)
    sets = set_count(nbytes)
    kvs = make_kvs(shape, sets)
    scale = d**-0.5
    flops = attention_flops(b, hq, n, d, v_dim)
    result = {"shape": shape, "bytes": nbytes, "flops": flops}
    result["reason"] = aotc.fallback_reason(q, *kvs[0])
    ours = partial(aotc.sdpa_vector, scale=scale)
    theirs = partial(mx.fast.scaled_dot_product_attention, scale=scale)
    result["aotc_eval"] = seconds_per_call(layer_chain(ours, q, kvs, 1), iters)
    result["aotc"] = seconds_per_call(layer_chain(ours, q, kvs, CHAIN), iters)
    try:
        result["mlx"] = seconds_per_call(layer_chain(theirs, q, kvs, CHAIN), max(2, iters // 4))
    except RuntimeError:
        result["mlx"] = None
    del kvs
    mx.clear_cache()
    result["torch"] = torch_sdpa(b, hq, hkv, n, d, v_dim, iters, sets)
    # A second round of both, best of each: torch's cuDNN calls slow the kernels run right
    # after them (bench/NOTES.md, round 8), so whichever side runs first would be favoured.
    kvs = make_kvs(shape, sets)
    result["aotc"] = min(result["aotc"], seconds_per_call(layer_chain(ours, q, kvs, CHAIN), iters))
    del kvs
    mx.clear_cache()
    if result["torch"] is not None:
        second = torch_sdpa(b, hq, hkv, n, d, v_dim, iters, sets)
        result["torch"] = min(result["torch"], second or 1.0)
    return result


def fmt_us(seconds: float | None) -> str:
    return "failed" if seconds is None else f"{seconds * 1e6:9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mlx_options(parser, iters=20, shapes=",".join(map(str, range(len(SHAPES)))))
    args = parser.parse_args()
    apply_plan_constants(args)
    aotc.load(args.index)
    (copy, how), floor = copy_bandwidth(), eval_floor()
    print(f"device: {mx.device_info().get('device_name', mx.default_device())}")
    print(
        f"copy bandwidth {copy / 1e12:.2f} TB/s (read+write, {how}); "
        f"MLX eval floor {floor * 1e6:.1f} us"
    )
    print(
        f"us/call: {CHAIN} dependent calls per evaluation (a layer each), the next {CHAIN} "
        "built while the GPU runs these"
    )
    print(
        "  B   Hq Hkv      N    D    V | aotc us/eval | aotc us/call  rate            | "
        "mx.fast us | torch us"
    )
    for shape in selected(args.shapes):
        r = row(shape, args.iters)
        mx.clear_cache()
        b, hq, hkv, n, d, v_dim, _ = shape
        if hkv == 1 and hq >= 64:  # MLA decode is compute-bound: report TFLOP/s
            rate = f"{r['flops'] / r['aotc'] / 1e12:6.1f} TFLOP/s"
        else:
            tbs = r["bytes"] / r["aotc"]
            rate = f"{tbs / 1e12:5.2f} TB/s {100 * tbs / copy:3.0f}%"
        note = "" if r["reason"] is None else f"  (fallback: {r['reason']})"
        print(
            f"{b:3d} {hq:4d} {hkv:3d} {n:6d} {d:4d} {v_dim:4d} | {fmt_us(r['aotc_eval'])}    | "
            f"{fmt_us(r['aotc'])}    {rate:15s} | {fmt_us(r['mlx'])}  | {fmt_us(r['torch'])}{note}"
        )


if __name__ == "__main__":
    main()
