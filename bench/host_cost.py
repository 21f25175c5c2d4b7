"""Host time of aotc calls on MLX's CUDA backend: graph building vs evaluation, per call.

    python3 -m bench.host_cost [--index dist/extra_sdpa.cuda.json]

For batch-1 decode the GPU work is ~15 us, so a call's wall time is host time: this splits it
into building the graph (Python, nanobind, array creation) and evaluating 8 calls at once
(MLX's eval: primitives' eval_gpu, graph nodes, launch, sync), against mx.add and mx.fast; the
next column is a call evaluated on its own (MLX's per-evaluation floor is mx.add's), the last
one of 8 dependent calls evaluated at once (each call's output feeds the next one's query, as
a model's layers do). The plan here is one launch (the fused split pass with waiting
combiners); "overlapping combine" is the split pass and the combine kernel as a programmatic
dependent launch, one primitive (a child graph of two kernel nodes: MLX_OVERLAP_COMBINE);
"2 launches" plans without the fused kernel, "last-block merge" lifts FUSED_MAX_SPLITS (one
launch, the last block of each row group merges).
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from unittest import mock

import mlx.core as mx

import aotc
from aotc.families.sdpa_vector import cuda
from aotc.families.sdpa_vector.problem import describe
from aotc.runtime.cuda import extension, load_image
from aotc.runtime.libraries import find

CHAIN = 8


def split_us(make, iters: int = 300, chain: int = CHAIN) -> tuple[float, float]:
    """(build us, eval us) per call, best of 5 rounds of `iters` groups of `chain` calls."""
    best_b = best_e = float("inf")
    for _ in range(5):
        tb = te = 0.0
        for _ in range(iters):
            t0 = time.perf_counter()
            outs = [make() for _ in range(chain)]
            t1 = time.perf_counter()
            mx.eval(outs)
            t2 = time.perf_counter()
            tb, te = tb + t1 - t0, te + t2 - t1
        best_b = min(best_b, tb / iters / chain * 1e6)
        best_e = min(best_e, te / iters / chain * 1e6)
    return best_b, best_e


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    args = parser.parse_args()
    aotc.load(args.index)
    q = mx.random.normal((1, 32, 1, 192)).astype(mx.bfloat16)
    k = mx.random.normal((1, 4, 4096, 192)).astype(mx.bfloat16)
    v = mx.random.normal((1, 4, 4096, 128)).astype(mx.bfloat16)
    tiny = mx.zeros((16,))
    mx.eval(q, k, v, tiny)
    library = find("cuda", ["sdpa_vector_bfloat16_t_192_128"])
    image = load_image(library)
    plain = cuda.preparer(partial(extension().cuda_launch, image))
    prepared = partial(extension().PreparedLaunch, image)
    problem, mx_dtype = describe(q, k, v), partial(getattr, mx)
    names = library.kernel_names
    two_launch_names = {name for name in names if "_2pass_fused_" not in name}

    def runner_of(prepare, available=names, fused_max=cuda.FUSED_MAX_SPLITS, overlap=0):
        with (
            mock.patch.object(cuda, "FUSED_MAX_SPLITS", fused_max),
            mock.patch.object(cuda, "MLX_OVERLAP_COMBINE", overlap),
        ):
            return cuda.CudaRunner(problem, prepare=prepare, available=available, dtype=mx_dtype)

    runner, overlapping, two_launches, last_block = (
        runner_of(prepared),
        runner_of(prepared, overlap=1),
        runner_of(prepared, two_launch_names),
        runner_of(prepared, fused_max=1 << 30),
    )
    plan = cuda.plan_cuda(problem, available=two_launch_names, scale=0.07)
    split_only, split_prepared = (
        cuda.compile_steps(plan, p, mx_dtype)[0][0].call for p in (plain, prepared)
    )
    combine = cuda.compile_steps(plan, prepared, mx_dtype)[0][1].call
    stats = split_prepared([q, k, v, q, q])
    mx.eval(stats)

    cases = {
        "mx.add (tiny)": lambda: tiny + 1,
        "mx.fast SDPA": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.07),
        "aotc.sdpa_vector": lambda: aotc.sdpa_vector(q, k, v, scale=0.07),
        "runner (the plan)": lambda: runner(q, k, v, 0.07, None, None),
        "runner, overlapping combine": lambda: overlapping(q, k, v, 0.07, None, None),
        "runner, 2 launches": lambda: two_launches(q, k, v, 0.07, None, None),
        "the plan's CudaPlan": lambda: runner.plan(0.07)(q, k, v, None, None, 0.07),
        "runner, last-block merge": lambda: last_block(q, k, v, 0.07, None, None),
        "split pass alone (1 launch)": lambda: split_only([q, k, v, q, q])[0],
        "split pass alone, prepared": lambda: split_prepared([q, k, v, q, q])[0],
        "combine alone, prepared": lambda: combine([*stats, stats[1]])[0],
    }
    layered = {
        "mx.add (tiny)": lambda x: x[..., :128] + 1,
        "mx.fast SDPA": lambda x: mx.fast.scaled_dot_product_attention(x, k, v, scale=0.07),
        "aotc.sdpa_vector": lambda x: aotc.sdpa_vector(x, k, v, scale=0.07),
        "runner (the plan)": lambda x: runner(x, k, v, 0.07, None, None),
        "runner, overlapping combine": lambda x: overlapping(x, k, v, 0.07, None, None),
        "runner, 2 launches": lambda x: two_launches(x, k, v, 0.07, None, None),
        "runner, last-block merge": lambda x: last_block(x, k, v, 0.07, None, None),
    }
    print(f"B=1 Hq=32 Hkv=4 N=4096 192/128 bf16; {CHAIN} calls per eval; us per call")
    print(f"{'':30s} {'build':>7s} {'eval':>7s} {'total':>7s} | one call per eval | dependent")
    for name, make in cases.items():
        b, e = split_us(make)
        single = sum(split_us(make, chain=1))
        line = f"{name:30s} {b:7.1f} {e:7.1f} {b + e:7.1f} | {single:17.1f} |"
        if name in layered:
            line += f" {sum(split_us(partial(layers, layered[name], q), chain=1)) / CHAIN:9.1f}"
        print(line, flush=True)


def layers(call, q: mx.array) -> mx.array:
    """CHAIN calls, each query made from the previous call's output (V = 128 of D = 192 columns)."""
    x = q
    for _ in range(CHAIN):
        out = call(x)
        x = mx.concatenate([out, out[..., : q.shape[-1] - out.shape[-1]]], axis=-1)
    return x


if __name__ == "__main__":
    main()
