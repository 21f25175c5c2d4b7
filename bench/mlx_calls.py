"""A profiler target: evaluated MLX calls of the batch-1 192/128 plan, then of the 2-launch plan.

    ncu --kernel-name regex:sdpa_vector --metrics gpu__time_duration.sum \\
        python3 -m bench.mlx_calls [--index dist/extra_sdpa.cuda.json] [--calls 10]

Each call is evaluated on its own (as a decode step's attention would be, one layer at a time),
so the kernels' times are those of MLX's launches, not of back-to-back replays.
"""

from __future__ import annotations

import argparse
from functools import partial

import mlx.core as mx

import aotc
from aotc.families.sdpa_vector import cuda
from aotc.families.sdpa_vector.problem import describe
from aotc.runtime.cuda import extension, load_image
from aotc.runtime.libraries import find


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    aotc.load(args.index)
    q = mx.random.normal((1, 32, 1, 192)).astype(mx.bfloat16)
    k = mx.random.normal((1, 4, 4096, 192)).astype(mx.bfloat16)
    v = mx.random.normal((1, 4, 4096, 128)).astype(mx.bfloat16)
    mx.eval(q, k, v)
    library = find("cuda", ["sdpa_vector_bfloat16_t_192_128"])
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
        for _ in range(args.calls):
            mx.eval(run(q, k, v, 0.07, None, None))
        mx.synchronize()
        print(f"{label}: {args.calls} calls", flush=True)


if __name__ == "__main__":
    main()
