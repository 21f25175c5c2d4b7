"""Decode-attention benchmark: aotc vs mx.fast SDPA vs torch SDPA, with the copy ceiling.

    python3 -m bench.bench_sdpa [--via harness|mlx] [--dtype bfloat16] [--quick]

`--via harness` (default) runs aotc's kernels through bench/cuda_harness.py (torch tensors,
timed as CUDA-graph replays); `--via mlx` runs `aotc.sdpa_vector` on MLX arrays (timed per
evaluated call and chained). mx.fast SDPA is timed whenever MLX with CUDA is importable.
K+V TB/s counts the K and V bytes read once (V a view of K counts once); MLA rows report
TFLOP/s (2 * B * Hq * Lq * N * (D + V)). Each side is timed in `--rounds` passes of its own over
every row (aotc's, then torch's), and the best time of each side is reported.

    python3 -m bench.bench_sdpa --no-mlx --q-len 5 --shape 1,32,4,32768,192,128 \
        [--plan-constant WGMMA_MIN_ROWS=64]

times a shape outside bench.shapes.SHAPES at 5 query tokens, optionally with a plan constant
changed for the run: run it twice, with and without, for a plan rule's A/B on one card.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import time
from functools import partial

import torch

from bench.options import add_plan_constant_option, apply_plan_constants, parse_shape
from bench.shapes import SHAPES, attention_flops, kv_bytes, selected, set_count

SLOW_CALL_S = 2e-3  # torch calls slower than this are timed without graph replays


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.fill_(1)
    for _ in range(3):
        b.copy_(a)
    t = time_events(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() / t


def time_events(fn, reps=50) -> float:
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def warm_up_off_capture(fns) -> None:
    """Runs each of fns once on a side stream before a graph captures them (cuBLAS and cuDNN set
    up their workspaces and plans on a first call, which a capture cannot hold)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


def capture(fns, calls: int):
    """A CUDA graph of `calls` calls cycling over fns (each run once off capture first)."""
    warm_up_off_capture(fns)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    return g


def time_graph(fns, calls=20, reps=15) -> float | None:
    """Median seconds per call of `calls` calls (cycling over fns) captured in one CUDA graph."""
    try:
        g = capture(fns, calls)
        g.replay()
        return time_events(g.replay, reps=reps) / calls
    except Exception as exc:
        print(f"  (graph timing failed: {type(exc).__name__}: {str(exc)[:120]})")
        return None


def make_sets(b, hq, hkv, n, d, v, view, dtype, sets, q_len=1):
    out = []
    for _ in range(sets):
        q = torch.randn(b, hq, q_len, d, device="cuda", dtype=dtype)
        k = torch.randn(b, hkv, n, d, device="cuda", dtype=dtype)
        vv = k[..., :v] if view else torch.randn(b, hkv, n, v, device="cuda", dtype=dtype)
        out.append((q, k, vv))
    return out


def harness_calls(lib, sets, plans, scale) -> list:
    """One callable per input set: its plan's launches through the harness."""
    from bench import cuda_harness as h

    return [
        (lambda s=s, p=p: h.run(lib, *s, scale=scale, launches=p))
        for s, p in zip(sets, plans, strict=True)
    ]


def torch_calls(sets, scale) -> list:
    """One callable per input set: torch's SDPA, the query heads grouped over K's."""
    import torch.nn.functional as F

    sdpa = partial(F.scaled_dot_product_attention, scale=scale, enable_gqa=True)
    return [(lambda q=q, k=k, v=v: sdpa(q, k, v)) for q, k, v in sets]


def time_plans(lib, sets, plans, scale) -> float | None:
    """Seconds per call of `plans` (one per input set) through the harness, as graph replays."""
    fns = harness_calls(lib, sets, plans, scale)
    fns[0]()
    torch.cuda.synchronize()
    return time_graph(fns)


def bench_harness(lib, sets, scale, num_splits=None):
    """(seconds per call, the first set's plan) of the default plan, or `num_splits` forced."""
    from bench import cuda_harness as h

    plans = [h.plan_for(lib, *s, scale=scale, num_splits=num_splits) for s in sets]
    return time_plans(lib, sets, plans, scale), plans[0]


def bench_first_launch(lib, sets, scale, num_splits=None):
    """Seconds per call of the plan's first launch alone (the split pass of a 2-launch plan): the
    most that fusing the combine into it could save is the whole call minus this."""
    from aotc.families.sdpa_vector.cuda import prepare_launch, preparer
    from bench import cuda_harness as h

    fns = []
    for q, k, v in sets:
        launch = h.plan_for(lib, q, k, v, scale=scale, num_splits=num_splits)[0]
        arrays = {"q": q, "k": k, "v": v}
        inputs = [arrays[name] for name in launch.inputs]
        fns.append(partial(prepare_launch(launch, preparer(lib.launch_fn)), inputs))
    return time_graph(fns)


def bench_torch(sets, scale):
    fns = torch_calls(sets, scale)
    try:
        fns[0]()  # warm-up: cuDNN builds its plan on the first call
        once = time_events(fns[0], reps=1)
    except Exception as exc:
        return None, f"failed ({type(exc).__name__})"
    if once > SLOW_CALL_S:
        # 300 graph-replayed calls of a 50 ms fallback heat the GPU for 15 s, and the rows
        # after it ran at throttled clocks; a few calls time it as well.
        return time_events(fns[0], reps=3), None
    return time_graph(fns), None


def gpu_state() -> str:
    """SM clock, temperature and active clock-event reasons, from nvidia-smi ('' without it)."""
    for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):
        try:
            res = subprocess.run(
                ["nvidia-smi", f"--query-gpu=clocks.sm,temperature.gpu,{reasons}",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return ""
        if res.returncode == 0:
            return res.stdout.strip()
    return ""


def to_mx(t):
    import mlx.core as mx
    import numpy as np

    if t.dtype == torch.bfloat16:
        return mx.array(t.float().cpu().numpy()).astype(mx.bfloat16)
    return mx.array(t.cpu().numpy().astype(np.float16 if t.dtype == torch.float16 else np.float32))


def bench_mlx(fn_name, sets, scale, view, v_dim, chained=8, reps=10):
    """(seconds per evaluated call, seconds per call when `chained` are evaluated together)."""
    import mlx.core as mx

    if fn_name == "aotc":
        import aotc

        fn = aotc.sdpa_vector
    else:
        fn = mx.fast.scaled_dot_product_attention
    msets = []
    for q, k, _v in sets[:2]:
        mk = to_mx(k)
        mv = mk[..., :v_dim] if view else to_mx(_v)
        msets.append((to_mx(q), mk, mv))
    for q, k, v in msets:
        mx.eval(fn(q, k, v, scale=scale))
    per_eval, per_chain = [], []
    for _ in range(reps):
        q, k, v = msets[0]
        t0 = time.perf_counter()
        mx.eval(fn(q, k, v, scale=scale))
        per_eval.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        outs = [fn(*msets[i % len(msets)], scale=scale) for i in range(chained)]
        mx.eval(*outs)
        per_chain.append((time.perf_counter() - t0) / chained)
    per_eval.sort()
    per_chain.sort()
    return per_eval[len(per_eval) // 2], per_chain[len(per_chain) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--via", choices=["harness", "mlx"], default="harness")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quick", action="store_true", help="first 5 shapes and MLA B=1 only")
    ap.add_argument("--no-mlx", action="store_true", help="skip mx.fast SDPA")
    ap.add_argument("--no-torch", action="store_true", help="skip torch SDPA")
    ap.add_argument(
        "--split-cost", action="store_true", help="also time the first launch of 2-launch plans"
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="passes per side over every row (best of each)"
    )
    ap.add_argument(
        "--no-fused", action="store_true", help="split plans merge with the combine kernel"
    )
    ap.add_argument("--shapes", help="indices into bench.shapes.SHAPES (default: all)")
    ap.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        default=[],
        metavar="B,HQ,HKV,N,D,V[,view]",
        help="a shape outside SHAPES (repeatable); with --shapes, timed after those",
    )
    ap.add_argument(
        "--library", help="a harness fatbin list (default: the last bench.build_harness build)"
    )
    add_plan_constant_option(ap)
    ap.add_argument(
        "--q-len",
        type=int,
        default=1,
        help="query tokens per head (speculative decoding: 2-8; no mask on either side)",
    )
    args = ap.parse_args()
    apply_plan_constants(args)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[
        args.dtype
    ]
    es = torch.tensor([], dtype=dtype).element_size()
    props = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    print(
        f"GPU: {props.name}, {props.multi_processor_count} SMs; copy bandwidth {bw / 1e12:.2f} TB/s"
    )
    have_mlx = False
    if not args.no_mlx or args.via == "mlx":
        try:
            import mlx.core as mx

            have_mlx = bool(mx.cuda.is_available())
        except Exception as exc:
            print(f"MLX unavailable: {exc}")
    lib = None
    if args.via == "harness":
        from bench import cuda_harness as h

        lib = h.load_library(args.library)
        lib.fused_ok = not args.no_fused
    shapes = SHAPES if not args.quick else SHAPES[:5] + SHAPES[6:7]
    if args.shapes or args.shape:
        shapes = (selected(args.shapes) if args.shapes else []) + args.shape
    # Each side is timed in passes of its own over every row, best of --rounds passes: a kernel
    # run right after torch's cuDNN calls can be slower (H100 round 8: 80/80 B=1 22.8 -> 25.5
    # us; H200 round 9: 256/128 B=1 55.4 us alone, 61.0 alternating with torch), so alternating
    # the two sides row by row charged aotc for torch's state.
    best: dict[tuple, dict[str, object]] = {shape: {} for shape in shapes}

    def keep(shape, side, t):
        if t and (best[shape].get(side) is None or t < best[shape][side]):
            best[shape][side] = t

    for round_ in range(args.rounds):
        # Odd rounds run the rows backwards: what runs before a row changes its time (H100:
        # torch's 256/128 B=1 72.5 us after aotc's calls on the same inputs, 85 after its own
        # out-of-memory MLA row), and each side keeps its best.
        order = shapes if round_ % 2 == 0 else shapes[::-1]
        for shape in order:
            b, hq, hkv, n, d, v, view = shape
            nbytes = kv_bytes(b, hkv, n, d, v, view, es)
            sets = make_sets(b, hq, hkv, n, d, v, view, dtype, set_count(nbytes), args.q_len)
            scale = 1.0 / math.sqrt(d)
            print(f"  [{shape[:6]} aotc, GPU before timing: {gpu_state()}]", flush=True)
            if args.via == "harness":
                t_a, plan = bench_harness(lib, sets, scale)
                best[shape]["plan"] = f"{len(plan)}L g{plan[0].grid[0]}"
                if args.split_cost and len(plan) > 1:
                    t_1 = bench_first_launch(lib, sets, scale)
                    if t_1:
                        print(f"  first launch alone {t_1 * 1e6:.1f} us", flush=True)
            else:
                t_a = bench_mlx("aotc", sets, scale, view, v)[1]
            keep(shape, "aotc", t_a)
            if have_mlx and not args.no_mlx and "mlx" not in best[shape]:
                torch.cuda.empty_cache()
                try:
                    best[shape]["mlx"] = bench_mlx("mlx", sets, scale, view, v)[1]
                except RuntimeError as exc:
                    print(f"  (mx.fast SDPA failed: {str(exc)[:80]})")
                import mlx.core as mx

                mx.clear_cache()
            del sets
            torch.cuda.empty_cache()
        if args.no_torch:
            continue
        for shape in order:
            b, hq, hkv, n, d, v, view = shape
            nbytes = kv_bytes(b, hkv, n, d, v, view, es)
            sets = make_sets(b, hq, hkv, n, d, v, view, dtype, set_count(nbytes), args.q_len)
            print(f"  [{shape[:6]} torch, GPU before timing: {gpu_state()}]", flush=True)
            t_t, t_err = bench_torch(sets, 1.0 / math.sqrt(d))
            keep(shape, "torch", t_t)
            best[shape].setdefault("torch_err", t_err)
            del sets
            torch.cuda.empty_cache()

    def us(t):
        return f"{t * 1e6:9.1f}" if t else "        -"

    rows = []
    for shape in shapes:
        b, hq, hkv, n, d, v, view = shape
        nbytes, r = kv_bytes(b, hkv, n, d, v, view, es), best[shape]
        t_a, t_t = r.get("aotc"), r.get("torch")
        mla = hkv == 1 and hq >= 64
        flops = attention_flops(b, hq, n, d, v) * args.q_len
        rate = (
            f"{flops / t_a / 1e12:6.1f} TF/s"
            if mla and t_a
            else f"{nbytes / t_a / 1e12:5.2f} TB/s ({100 * nbytes / t_a / bw:3.0f}%)"
            if t_a
            else "-"
        )
        tor = us(t_t) if t_t else f"{'skipped' if args.no_torch else r.get('torch_err'):>9}"
        rows.append(
            f"{b:3d} {hq:4d} {hkv:4d} {n:6d} {d:4d} {v:4d} {'y' if view else 'n'} | {us(t_a)} us "
            f"{rate:>17} {r.get('plan', ''):>10} | {us(r.get('mlx'))} | {tor}"
        )
    print()
    print(
        f"{props.name}, {args.dtype}, {args.q_len} query token(s) a head, copy {bw / 1e12:.2f}"
        f" TB/s (read+write), via {args.via}"
    )
    print(
        "  B   Hq  Hkv      N    D    V view |  aotc us/call    K+V TB/s|TFLOP/s   plan"
        " | mx.fast us | torch us"
    )
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
