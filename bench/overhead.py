"""Where the host time of one aotc.sdpa_vector call goes (B=1 decode, 192/128, bf16).

    python3 -m bench.overhead [--index dist/extra_sdpa.cuda.json]

Graph building is timed without evaluation; "per eval" adds one mx.eval per call.
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


def best_us(fn, iters: int = 2000, repeats: int = 5, evaluate: bool = False) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn()
            if evaluate:
                mx.eval(out)
        best = min(best, (time.perf_counter() - start) / iters)
        if not evaluate:
            mx.eval(out)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    args = parser.parse_args()
    aotc.load(args.index)
    q = mx.random.normal((1, 32, 1, 192)).astype(mx.bfloat16)
    k = mx.random.normal((1, 4, 4096, 192)).astype(mx.bfloat16)
    v = mx.random.normal((1, 4, 4096, 128)).astype(mx.bfloat16)
    mx.eval(q, k, v)
    library = find("cuda", ["sdpa_vector_bfloat16_t_192_128"])
    launch = partial(extension().cuda_launch, load_image(library))
    runner = cuda.make_runner(
        describe(q, k, v),
        launch_fn=launch,
        available=library.kernel_names,
        dtype=partial(getattr, mx),
    )
    tiny = mx.zeros((16,))
    mx.eval(tiny)
    cases = {
        "mx.add (tiny)": lambda: tiny + 1,
        "mx.fast SDPA": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.07),
        "aotc.sdpa_vector": lambda: aotc.sdpa_vector(q, k, v, scale=0.07),
        "aotc runner (no lookup, no grad wiring)": lambda: runner(q, k, v, 0.07, None, None),
    }
    print(f"{'':34s} {'build us':>9s} {'per eval us':>12s}")
    for name, fn in cases.items():
        print(f"{name:34s} {best_us(fn):9.1f} {best_us(fn, 300, 3, True):12.1f}")


if __name__ == "__main__":
    main()
