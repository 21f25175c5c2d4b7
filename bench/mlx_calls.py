"""A profiler target: MLX calls of one shape's plan, then of its two-launch plan.

    ncu --kernel-name regex:sdpa_vector --metrics gpu__time_duration.sum \\
        python3 -m bench.mlx_calls [--index dist/extra_sdpa.cuda.json] [--calls 10]
        [--shape 0] [--chain 1]

`--shape` indexes bench.shapes.SHAPES (default: batch-1 192/128). Each evaluation holds `--chain`
calls: 1, as a decode step's attention would be evaluated one layer at a time, so the kernels'
times are those of MLX's launches, not of back-to-back replays. Without a profiler it prints the
wall time per call, to set beside the kernels' times.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import mlx.core as mx

import aotc
from aotc.families.sdpa_vector import cuda
from aotc.families.sdpa_vector.problem import describe
from aotc.runtime.cuda import extension, load_image
from aotc.runtime.libraries import find
from bench.shapes import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--shape", type=int, default=0)
    parser.add_argument("--chain", type=int, default=1)
    args = parser.parse_args()
    aotc.load(args.index)
    b, hq, hkv, n, d, v_dim, v_view = SHAPES[args.shape]
    q = mx.random.normal((b, hq, 1, d)).astype(mx.bfloat16)
    k = mx.random.normal((b, hkv, n, d)).astype(mx.bfloat16)
    v = k[..., :v_dim] if v_view else mx.random.normal((b, hkv, n, v_dim)).astype(mx.bfloat16)
    mx.eval(q, k, v)
    library = find("cuda", [f"sdpa_vector_bfloat16_t_{d}_{v_dim}"])
    prepare = partial(extension().PreparedLaunch, load_image(library))
    names = library.kernel_names
    plans = {
        "plan": names,
        "two launches": {name for name in names if "_2pass_fused_" not in name},
    }
    for label, available in plans.items():
        run = cuda.make_runner(
            describe(q, k, v), prepare=prepare, available=available, dtype=partial(getattr, mx)
        )
        mx.eval([run(q, k, v, 0.07, None, None) for _ in range(args.chain)])
        mx.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            mx.eval([run(q, k, v, 0.07, None, None) for _ in range(args.chain)])
        mx.synchronize()
        per_call = (time.perf_counter() - start) / (args.calls * args.chain)
        print(
            f"{(b, hq, hkv, n, d, v_dim)} {label}: {args.calls} evaluations of {args.chain} "
            f"calls, {per_call * 1e6:.1f} us per call (wall)",
            flush=True,
        )


if __name__ == "__main__":
    main()
