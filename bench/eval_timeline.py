"""Where the time of one evaluated MLX call goes, from a CUPTI trace (torch's profiler).

    python3 -m bench.eval_timeline [--index dist/extra_sdpa.cuda.json] [--iters 30]
        [--wait aotc]
    python3 -m bench.eval_timeline --chain 8 --shapes 9

A benchmark, not a test. Each case is built and evaluated alone (`mx.eval` per call), as a
decode step evaluated layer by layer would be; the trace times, per evaluation: building the
graph (host), from `mx.eval` to the graph's launch (host), from that launch to the first kernel
(driver and GPU), the kernels, and from the last kernel's end to `mx.eval` returning (the
wait's wake-up). With `--chain N`, `aotc.sdpa_vector` runs as `bench.mlx_sdpa` times it (N
dependent calls per evaluation, pipelined), and each kernel is listed with its duration and the
GPU's idle time before it: where a chained call's time goes besides its attention kernels.
torch is used only for its profiler: CUPTI records the process's kernels, MLX's included.
Tracing slows the host phases (the floor's evaluation: ~40 us traced, 22-30 untraced on an
H200), so compare the cases with each other, not with untraced runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
from collections.abc import Callable

import mlx.core as mx

import aotc
from bench.options import apply_plan_constants
from bench.shapes import add_mlx_options, mlx_kv, mlx_query, selected

LAUNCH_CALLS = ("cudaGraphLaunch", "cuGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel")


def cases(shape) -> dict[str, Callable[[], mx.array]]:
    q, (k, v) = mlx_query(shape), mlx_kv(shape)
    tiny = mx.zeros((16,))
    mx.eval(tiny)
    scale = shape[4] ** -0.5
    return {
        "mx.add (tiny): the floor": lambda: tiny + 1,
        "mx.sum of K": lambda: mx.sum(k),
        "mx.fast SDPA": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
        "aotc.sdpa_vector": lambda: aotc.sdpa_vector(q, k, v, scale=scale),
    }


def trace(
    calls: dict[str, Callable[[], mx.array]], iters: int, wait: Callable = mx.eval
) -> list[dict]:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.cuda.init()
    for call in calls.values():  # warm: plans made, graphs cached
        for _ in range(3):
            wait(call())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for name, call in calls.items():
            for i in range(iters):
                with record_function(f"build|{name}|{i}"):
                    out = call()
                with record_function(f"eval|{name}|{i}"):
                    wait(out)
    return events_of(prof)


def events_of(prof) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace_file:
            return json.load(trace_file)["traceEvents"]


def phases(events: list[dict]) -> dict[str, list[dict[str, float]]]:
    ranges = [e for e in events if e.get("cat") == "user_annotation" and "|" in e.get("name", "")]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: float(e["ts"]))
    launches = sorted(
        (e for e in events if e.get("name", "").split("_v")[0] in LAUNCH_CALLS),
        key=lambda e: float(e["ts"]),
    )
    builds = {tuple(e["name"].split("|")[1:]): e for e in ranges if e["name"].startswith("build")}
    out: dict[str, list[dict[str, float]]] = {}
    for e in ranges:
        kind, name, i = e["name"].split("|")
        if kind != "eval":
            continue
        start, end = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        mine = [k for k in kernels if start <= float(k["ts"]) <= end]
        launch = next((c for c in launches if start <= float(c["ts"]) <= end), None)
        if not mine or launch is None:
            continue
        first = float(mine[0]["ts"])
        last = max(float(k["ts"]) + float(k["dur"]) for k in mine)
        out.setdefault(name, []).append(
            {
                "build": float(builds[(name, i)]["dur"]),
                "to launch": float(launch["ts"]) - start,
                "to kernel": first - float(launch["ts"]),
                "kernels": last - first,
                "busy": sum(float(k["dur"]) for k in mine),
                "wake": end - last,
                "eval": end - start,
                "count": len(mine),
            }
        )
    return out


def chain_kernels(shape, chain: int, iters: int) -> dict[str, dict[str, list[float]]]:
    """Per kernel name: durations and the GPU idle time before each (from the previous kernel's
    end), over `iters` pipelined evaluations of `chain` dependent calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.mlx_sdpa import layer_chain, make_kvs, pipelined
    from bench.shapes import kv_bytes, set_count

    b, _, hkv, n, d, v_dim, v_view = shape
    q = mlx_query(shape)
    kvs = make_kvs(shape, set_count(kv_bytes(b, hkv, n, d, v_dim, v_view)))
    calls = layer_chain(lambda *a: aotc.sdpa_vector(*a, scale=d**-0.5), q, kvs, chain)
    torch.cuda.init()
    for _ in range(3):
        mx.eval(calls())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipelined(calls, iters)
    events = events_of(prof)
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: float(e["ts"]))
    out: dict[str, dict[str, list[float]]] = {}
    for prev, k in itertools.pairwise(kernels):
        row = out.setdefault(k["name"][:48], {"dur": [], "idle": []})
        row["dur"].append(float(k["dur"]))
        row["idle"].append(float(k["ts"]) - float(prev["ts"]) - float(prev["dur"]))
    span = float(kernels[-1]["ts"]) + float(kernels[-1]["dur"]) - float(kernels[0]["ts"])
    out["(span per call)"] = {"dur": [span / (iters * chain)], "idle": [0.0]}
    return out


def print_chain(shape, chain: int, iters: int) -> None:
    print(f"\n{shape[:6]}: {chain} chained calls per evaluation, {iters} evaluations")
    print(f"{'kernel':50s}{'count':>7s}{'us':>9s}{'idle before':>13s}")
    for name, row in chain_kernels(shape, chain, iters).items():
        dur, idle = statistics.median(row["dur"]), statistics.median(row["idle"])
        print(f"{name:50s}{len(row['dur']):7d}{dur:9.1f}{idle:13.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    add_mlx_options(parser, iters=30)
    parser.add_argument("--chain", type=int, default=0, help="trace chained calls instead")
    parser.add_argument("--wait", choices=("mx", "aotc"), default="mx", help="mx.eval or aotc.eval")
    args = parser.parse_args()
    apply_plan_constants(args)
    aotc.load(args.index)
    if args.chain:
        for shape in selected(args.shapes):
            print_chain(shape, args.chain, args.iters)
        return
    columns = ("build", "to launch", "to kernel", "kernels", "busy", "wake", "eval")
    wait = aotc.eval if args.wait == "aotc" else mx.eval
    print(f"median us per evaluated call (one call per {args.wait}.eval); kernels: first start")
    print("to last end, busy: their summed durations; wake: last kernel's end to the return")
    for shape in selected(args.shapes):
        print(f"\n{shape[:6]}")
        print(f"{'':28s}" + "".join(f"{c:>10s}" for c in columns) + "   kernels")
        for name, rows in phases(trace(cases(shape), args.iters, wait)).items():
            medians = [statistics.median(r[c] for r in rows) for c in columns]
            count = statistics.median(r["count"] for r in rows)
            print(f"{name:28s}" + "".join(f"{m:10.1f}" for m in medians) + f"   {count:g}")


if __name__ == "__main__":
    main()
