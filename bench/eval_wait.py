"""A call evaluated alone: `mx.eval` (sleeps on MLX's blocking-sync event) against `aotc.eval`
(polls it), with MLX's floor (a tiny `mx.add`) evaluated both ways.

    python3 -m bench.eval_wait [--index dist/extra_sdpa.cuda.json] [--iters 300]
        [--shapes 0,4,10] [--chain 1]

A benchmark, not a test. Each iteration builds one call and evaluates it, as a decode step
evaluated on its own would. Every case is timed beside the floor, in blocks: a block runs a
stint of the floor and one of the case (STINT iterations, each evaluating under both waits in
turn), the order of the two flipping block by block, so that drift of the host (its slow states
double the floor for seconds) hits both alike; the first WARM iterations of a stint are not
kept. Prints the median and the 10th-90th percentiles of the wall time per evaluated call
(building included; the building alone in its own column), and how often `aotc.eval` finished by
polling; after each attention case, how far it is over the floor under `aotc.eval` (#6's aim:
within 10 us), as the median over blocks of the case's median minus the floor's, and how much of
that is building the call. With torch present, torch's SDPA followed by
`torch.cuda.synchronize()` is timed the same way for reference. `--chain N`: each evaluation
holds N dependent calls (each query from the previous output), as a decode step's layers would;
times are then per evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

import aotc
from bench.options import apply_plan_constants
from bench.shapes import add_mlx_options, mlx_kv, mlx_query, selected

WAITS: dict[str, Callable[[mx.array], object]] = {
    "mx.eval": mx.eval,
    "aotc.eval": aotc.eval,
}
FLOOR = "mx.add (tiny)"  # MLX's per-evaluation floor


def cases(shape, chain: int) -> dict[str, Callable[[], mx.array]]:
    q, (k, v) = mlx_query(shape), mlx_kv(shape)
    scale = shape[4] ** -0.5
    d, v_dim = shape[4], shape[5]

    def attention_chain() -> mx.array:
        out = aotc.sdpa_vector(q, k, v, scale=scale)
        for _ in range(chain - 1):
            # The next query from this output, as the next layer's would be.
            x = mx.concatenate([out, out[..., : d - v_dim]], axis=-1) if d > v_dim else out
            out = aotc.sdpa_vector(x, k, v, scale=scale)
        return out

    return {
        "mx.sum of K": lambda: mx.sum(k),
        f"aotc.sdpa_vector x{chain}": attention_chain,
    }


Samples = dict[tuple[str, str], list[float]]  # (case, wait) -> us
# A case runs STINT iterations in a row (each evaluating it under both waits in turn), so that
# each follows its own kind as in a steady decode loop; the first WARM of a stint, which follow
# the other case (and its completion work on MLX's threads), are not kept. Alternating the two
# call by call let the floor follow the attention call's completion work: it came out 1.5 us
# above the call in one run (bench/NOTES.md round 32).
STINT = 10
WARM = 2


@dataclass
class Timings:
    """Kept wall us per evaluated call of every (case, wait), and of its building alone, block
    after block (STINT - WARM samples each); and each case's count of aotc.eval's polled waits."""

    times: Samples = field(default_factory=lambda: defaultdict(list))
    builds: Samples = field(default_factory=lambda: defaultdict(list))
    polled: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def time_waits(calls: dict[str, Callable[[], mx.array]], iters: int) -> Timings:
    """About `iters` kept evaluations of every (case, wait), in blocks: each block runs a stint
    of every case, the cases' order flipping block by block, so that drift of the host hits
    the cases alike."""
    for call in calls.values():  # warm: plans made, graphs cached
        for wait in WAITS.values():
            for _ in range(5):
                wait(call())
    timings = Timings()
    names = list(calls)
    for block in range(-(-iters // (STINT - WARM))):
        for case in names if block % 2 == 0 else names[::-1]:
            for i in range(STINT):
                for wait in WAITS if i % 2 == 0 else list(WAITS)[::-1]:
                    start = time.perf_counter()
                    out = calls[case]()
                    built = time.perf_counter()
                    done = WAITS[wait](out)
                    if i >= WARM:
                        timings.times[case, wait].append((time.perf_counter() - start) * 1e6)
                        timings.builds[case, wait].append((built - start) * 1e6)
                        timings.polled[case] += done is True
    return timings


def torch_times(shape, iters: int) -> list[float] | None:
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    b, hq, hkv, n, d, v_dim, _ = shape
    q = torch.randn(b, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, n, v_dim, device="cuda", dtype=torch.bfloat16)
    out = []
    for i in range(iters + 5):
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=True)
        torch.cuda.synchronize()
        if i >= 5:
            out.append((time.perf_counter() - start) * 1e6)
    return out


def row(label: str, samples: list[float], builds: list[float] | None = None) -> str:
    deciles = statistics.quantiles(samples, n=10)
    built = f"{statistics.median(builds):.1f}" if builds else ""
    return (
        f"| {label} | {statistics.median(samples):.1f} | {deciles[0]:.1f}-{deciles[-1]:.1f} "
        f"| {built} |"
    )


def paired_excess(samples: list[float], floor: list[float]) -> float:
    """The median over blocks of a case's median minus the floor's in the same block."""
    kept = STINT - WARM

    def medians(xs: list[float]) -> list[float]:
        return [statistics.median(xs[i : i + kept]) for i in range(0, len(xs), kept)]

    return statistics.median(x - f for x, f in zip(medians(samples), medians(floor), strict=True))


def over_floor(timings: Timings, case: str, wait: str = "aotc.eval") -> str:
    """The aim's figure: the case over the floor under `wait`, and how much of that is building
    the call (paired block by block)."""
    over = paired_excess(timings.times[case, wait], timings.times[FLOOR, wait])
    building = paired_excess(timings.builds[case, wait], timings.builds[FLOOR, wait])
    return (
        f"(under {wait}: {over:.1f} us over MLX's floor, {building:.1f} of it building the call;"
        f" #6 aims at 10 or less)"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    add_mlx_options(parser, iters=300)
    parser.add_argument("--chain", type=int, default=1, help="dependent calls per evaluation")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    apply_plan_constants(args)
    aotc.load(args.index)
    print(f"device: {mx.device_info().get('device_name', '?')}, {args.iters} evaluations each")
    print("| case | median us | p10-p90 us | of which building |\n|---|---|---|---|")
    tiny = mx.zeros((16,))
    mx.eval(tiny)
    for shape in selected(args.shapes):
        for name, call in cases(shape, args.chain).items():
            timings = time_waits({FLOOR: lambda: tiny + 1, name: call}, args.iters)
            for (case, wait), samples in timings.times.items():
                label = case if case == FLOOR else f"{shape[:6]} {case}"
                print(row(f"{label}, {wait}", samples, timings.builds[case, wait]))
            kept = len(timings.times[name, "aotc.eval"])
            print(f"(aotc.eval finished by polling in {timings.polled[name]} of {kept})")
            if name.startswith("aotc."):
                print(over_floor(timings, name))
        reference = None if args.no_torch or args.chain > 1 else torch_times(shape, args.iters)
        if reference:
            print(row(f"{shape[:6]} torch SDPA + synchronize", reference))


if __name__ == "__main__":
    main()
