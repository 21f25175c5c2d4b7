"""A profiler target: MLX calls of one shape's plan, then of its two-launch plan.

    ncu --kernel-name regex:sdpa_vector --metrics gpu__time_duration.sum \\
        python3 -m bench.mlx_calls [--index dist/extra_sdpa.cuda.json] [--calls 10]
        [--shape 0] [--chain 1]

`--shape` indexes bench.shapes.SHAPES (default: batch-1 192/128). Each evaluation holds `--chain`
calls: 1, as a decode step's attention would be evaluated one layer at a time, so the kernels'
times are those of MLX's launches, not of back-to-back replays. It prints the wall time per call
(building the calls, then evaluating them) to set beside the kernels' times, for the plan, the
two-launch plan, the public `aotc.sdpa_vector`, and `mx.sum` of K as a baseline.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import mlx.core as mx

import aotc
from aotc.families.sdpa_vector import cuda
from aotc.families.sdpa_vector.api import mlx_gradients
from aotc.families.sdpa_vector.problem import describe
from aotc.runtime.cuda import extension, load_image, wgmma_runs
from aotc.runtime.libraries import find
from bench.shapes import SHAPES, mlx_kv, mlx_query


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--shape", type=int, default=0)
    parser.add_argument("--chain", type=int, default=1)
    args = parser.parse_args()
    aotc.load(args.index)
    shape = SHAPES[args.shape]
    b, hq, hkv, n, d, v_dim, _ = shape
    q, (k, v) = mlx_query(shape), mlx_kv(shape)
    library = find("cuda", [f"sdpa_vector_bfloat16_t_{d}_{v_dim}"])
    prepare = partial(extension().PreparedLaunch, load_image(library))
    names = library.kernel_names
    archs = library.index.data.get("options", {}).get("archs", [])
    wgmma = wgmma_runs(archs, str(mx.device_info().get("architecture", "")))
    fused = names
    unfused = {name for name in names if "_2pass_fused_" not in name}
    plans = {
        "plan": (fused, None),
        "two launches": (unfused, None),
        # As aotc.sdpa_vector runs it, with MLX's op as its gradient.
        "plan with its gradient": (fused, mlx_gradients),
    }
    for label, (available, gradient) in plans.items():
        run = cuda.CudaRunner(
            describe(q, k, v),
            prepare=prepare,
            available=available,
            dtype=partial(getattr, mx),
            gradient=gradient,
            wgmma=wgmma,
        )
        call = partial(run, q, k, v, 0.07, None, None)
        report(f"{(b, hq, hkv, n, d, v_dim)} {label}", call, args)
    # The same per-evaluation timing for one of MLX's own ops reading K once, as a baseline
    # for what an evaluation costs around its kernels.
    report(f"mx.sum of K ({k.nbytes / 1e9:.2f} GB)", lambda: mx.sum(k), args)
    report(
        f"{(b, hq, hkv, n, d, v_dim)} aotc.sdpa_vector",
        lambda: aotc.sdpa_vector(q, k, v, scale=0.07),
        args,
    )


def report(label: str, call, args) -> None:
    """Wall time per call: building the calls (host) and evaluating them (launches, the GPU's
    time and the wait for it)."""
    mx.eval([call() for _ in range(args.chain)])
    mx.synchronize()
    build = evaluate = 0.0
    for _ in range(args.calls):
        start = time.perf_counter()
        outs = [call() for _ in range(args.chain)]
        built = time.perf_counter()
        mx.eval(outs)
        build += built - start
        evaluate += time.perf_counter() - built
    n = args.calls * args.chain
    print(
        f"{label}: {args.calls} evaluations of {args.chain} calls, us per call: "
        f"{(build + evaluate) / n * 1e6:.1f} wall = {build / n * 1e6:.1f} building + "
        f"{evaluate / n * 1e6:.1f} evaluating",
        flush=True,
    )


if __name__ == "__main__":
    main()
