"""Host cost of a call that aotc cannot serve: MLX's op called from Python, against
`aotc.sdpa_vector` serving the call from its table (MLX's op as a native call), and deciding in
Python each time as it did before fallbacks were filed (the table misses, Python finds the cached
decision and calls MLX's op).

    python3 -m bench.fallback_cost [--iters 20000] [--rounds 7]

A benchmark, not a test: graph building only (nothing is evaluated), best round, us a call.
Runs on any device: the head dims (D = V = 72) are ones no library here has, so the call falls
back on a GPU too (the first line printed says why).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import mlx.core as mx

import aotc
from aotc.families.sdpa_vector import api


def per_call_us(call: Callable[[], object], iters: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        best = min(best, (time.perf_counter() - start) / iters * 1e6)
    return best


def print_row(name: str, call: Callable[[], object], iters: int, rounds: int) -> None:
    """One table row: `name` and the call's best per-call building time."""
    print(f"| {name} | {per_call_us(call, iters, rounds):.2f} us |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    q = mx.random.normal((1, 32, 1, 72)).astype(mx.bfloat16)
    k = mx.random.normal((1, 4, 4096, 72)).astype(mx.bfloat16)
    v = mx.random.normal((1, 4, 4096, 72)).astype(mx.bfloat16)
    mx.eval(q, k, v)
    scale = 72**-0.5
    reason = aotc.fallback_reason(q, k, v)
    print(f"device {mx.default_device()}; falls back: {reason}")
    sdpa = aotc.sdpa_vector

    def row(name: str, call: Callable[[], object]) -> None:
        print_row(name, call, args.iters, args.rounds)

    row(
        "mx.fast.scaled_dot_product_attention",
        lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale),
    )
    row("aotc.sdpa_vector, filed", lambda: sdpa(q, k, v, scale=scale))
    # As before fallbacks were filed: the table misses, Python finds the cached decision.
    filing, api._MlxAttentionCall = api._MlxAttentionCall, None
    aotc.clear_cache()
    try:
        row("aotc.sdpa_vector, deciding in Python", lambda: sdpa(q, k, v, scale=scale))
    finally:
        api._MlxAttentionCall = filing


if __name__ == "__main__":
    main()
