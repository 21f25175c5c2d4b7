"""Host cost of building one served batch-1 call, taken apart, against MLX's floor (a tiny
`mx.add`) and MLX's own fused op on a shape MLX's CUDA backend serves itself (128/128).

    python3 -m bench.build_cost [--index dist/extra_sdpa.cuda.json] [--iters 4000] [--rounds 5]
        [--plan-constant NAME=INT]

A benchmark, not a test: graph building only (nothing is evaluated), best round, us a call. The
served call (192/128 B=1, bench.shapes' first row) is timed whole (`aotc.sdpa_vector`), then by
part: the call table with a hit, the table's signature alone (a miss: another scale), and the
native plan called directly. Where the call is not served (no library has it, or MLX's device is
the CPU), the first line says why and the plan's rows are left out.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import mlx.core as mx

import aotc
from aotc.families.sdpa_vector import api
from bench.fallback_cost import print_row
from bench.options import add_plan_constant_option, apply_plan_constants
from bench.shapes import SHAPES, mlx_kv, mlx_query


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    parser.add_argument("--iters", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    add_plan_constant_option(parser)
    args = parser.parse_args()
    apply_plan_constants(args)
    aotc.load(args.index)
    shape = SHAPES[0]
    q, (k, v) = mlx_query(shape), mlx_kv(shape)
    scale = shape[4] ** -0.5
    q2 = mx.random.normal((1, 32, 1, 128)).astype(mx.bfloat16)
    k2, v2 = (mx.random.normal((1, 4, 4096, 128)).astype(mx.bfloat16) for _ in range(2))
    a, b = mx.array([1.0]), mx.array([2.0])
    mx.eval(q2, k2, v2, a, b)
    reason = aotc.fallback_reason(q, k, v)
    print(
        f"device {mx.default_device()}; {shape[:6]} "
        + (f"falls back: {reason}" if reason else "is served")
    )
    mx.eval(aotc.sdpa_vector(q, k, v, scale=scale))  # files the call in the table

    def row(name: str, call: Callable[[], object]) -> None:
        print_row(name, call, args.iters, args.rounds)

    table = api._native_calls
    row("mx.add (tiny): MLX's floor", lambda: mx.add(a, b))
    row(
        "mx.fast.scaled_dot_product_attention, 128/128",
        lambda: mx.fast.scaled_dot_product_attention(q2, k2, v2, scale=128**-0.5),
    )
    row("aotc.sdpa_vector, 192/128", lambda: aotc.sdpa_vector(q, k, v, scale=scale))
    if table is not None:
        row("the call table, a hit", lambda: table(q, k, v, None, None, scale))
        row("the call table's signature alone (a miss)", lambda: table(q, k, v, None, None, 0.5))
    plan = getattr(api._decide(q, k, v, None, None, None), "plan", None)  # none: falls back
    if plan is not None:
        native = plan(scale)
        row("the native plan called directly", lambda: native(q, k, v, None, None, scale))


if __name__ == "__main__":
    main()
