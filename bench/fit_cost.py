"""The seesaw's one-split cost model (SEESAW_COST) from timed calls: one split against the
wave-filling rule's splits, both forced, then a fit of WgmmaCost to those times.

    python3 -m bench.fit_cost run OUT.json [--library LIST] [--rounds 2]   (on the GPU)
    python3 -m bench.fit_cost fit SWEEP.json [--block-us 12]               (anywhere)

`run` times MLA (128 heads, V a view of K, bf16, one token) at B=36-52 and 68-108 of 1k-8k keys,
wherever the rule gives several splits, in plain launches as MLX's plans run them (medians of
`rounds`, the two sides alternating). `fit` finds the WgmmaCost whose modelled times are nearest
the timed ones (least squares of the relative error, block_us held: the sweep has no grid under
one wave to fix it), and prints where it and the plan's SEESAW_COST choose the slower side.
`bench/results/2026-11-30-r43-one-split-sweep.json` holds round 43's sweep (H200).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from aotc.families.sdpa_vector import cuda as plan
from aotc.families.sdpa_vector.cuda import WgmmaCost
from aotc.families.sdpa_vector.problem import AttentionProblem

SM_COUNT = 132
BATCHES = (*range(36, 53, 4), *range(68, 111, 4))
KEYS = (1024, 2048, 4096, 8192)


@dataclass(frozen=True)
class Timed:
    """One shape's two sides: one split and the rule's `splits`, us a call."""

    batch: int
    kv_len: int
    splits: int
    one_us: float
    split_us: float


def mla(batch: int, kv_len: int) -> AttentionProblem:
    return AttentionProblem(batch, 128, 1, 1, kv_len, 576, 512, "bfloat16", "none", None, False)


def swept_shapes() -> list[tuple[int, int, int]]:
    """(batch, keys, the rule's split count) wherever the rule gives several splits."""
    shapes = []
    for kv_len in KEYS:
        for batch in BATCHES:
            splits = plan._wgmma_grid(mla(batch, kv_len), SM_COUNT, None)[1]
            if splits > 1:
                shapes.append((batch, kv_len, splits))
    return shapes


def sides(t: Timed) -> list[tuple[list[float], float]]:
    """(features, timed us) of the shape's one split and its splits (`features`)."""
    p = mla(t.batch, t.kv_len)
    return [(features(p, count), us) for count, us in ((1, t.one_us), (t.splits, t.split_us))]


def features(p: AttentionProblem, num_splits: int) -> list[float]:
    """The terms that WgmmaCost.rates multiply in _wgmma_cost for `num_splits` splits, with the
    seesaw's partial size (T where its splits hold WGMMA_SEESAW_MIN_TILES+ tiles)."""
    grid = plan._wgmma_grid(p, SM_COUNT, num_splits)
    bytes_each = plan._partial_bytes(p, grid, seesaw=True)
    return list(plan._wgmma_cost_terms(p, grid, SM_COUNT, bytes_each))


def modelled(cost: WgmmaCost, row: list[float]) -> float:
    return sum(rate * x for rate, x in zip(cost.rates(), row, strict=True))


def fit(timed: list[Timed], block_us: float = 12.0) -> WgmmaCost:
    """The WgmmaCost (block_us given) minimising the squared relative error over both sides."""
    rows, ys = [], []
    for t in timed:
        for row, us in sides(t):
            # Relative error: divide the row and its target by the timed us; block_us moves over.
            rows.append([x / us for i, x in enumerate(row) if i != 1])
            ys.append((us - block_us * row[1]) / us)
    tile, split_block, per_byte, launch = _least_squares(rows, ys)
    return WgmmaCost(
        tile_us=tile,
        block_us=block_us,
        split_block_us=split_block,
        combine_bytes_per_us=1 / per_byte,
        launch_us=launch,
    )


def _least_squares(rows: list[list[float]], ys: list[float]) -> list[float]:
    """x minimising |rows x - ys|^2, by the normal equations (a few unknowns)."""
    n = len(rows[0])
    a = [[sum(r[i] * r[j] for r in rows) for j in range(n)] for i in range(n)]
    b = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(n)]
    for col in range(n):  # Gaussian elimination with partial pivoting
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot], b[col], b[pivot] = a[pivot], a[col], b[pivot], b[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
            b[r] -= f * b[col]
    x = [0.0] * n
    for r in reversed(range(n)):
        x[r] = (b[r] - sum(a[r][c] * x[c] for c in range(r + 1, n))) / a[r][r]
    return x


def wrong_choices(cost: WgmmaCost, timed: list[Timed]) -> list[tuple[Timed, float]]:
    """Shapes where `cost` picks the slower side, with how much slower (a fraction)."""
    wrong = []
    for t in timed:
        (one_row, one_us), (split_row, split_us) = sides(t)
        picks_split = modelled(cost, split_row) < modelled(cost, one_row)
        if picks_split != (split_us < one_us):
            wrong.append((t, abs(split_us - one_us) / min(split_us, one_us)))
    return wrong


def load(path: Path) -> list[Timed]:
    fields = Timed.__dataclass_fields__
    rows = json.loads(path.read_text())["timed"]
    return [Timed(**{k: v for k, v in row.items() if k in fields}) for row in rows]


def report(timed: list[Timed], block_us: float) -> None:
    fitted = fit(timed, block_us)
    print(f"{len(timed)} shapes; fitted (block_us held at {block_us}):")
    print("  " + ", ".join(f"{f}={getattr(fitted, f):.4g}" for f in fitted.__dataclass_fields__))
    for name, cost in (("fitted", fitted), ("SEESAW_COST", plan.SEESAW_COST)):
        wrong = wrong_choices(cost, timed)
        print(f"{name}: the slower side at {len(wrong)} shapes")
        for t, loss in wrong:
            print(f"  B={t.batch} N={t.kv_len} ({t.splits} splits): {100 * loss:.1f}% slower")


def run(out: Path, listing: str | None, rounds: int) -> None:
    import torch

    from bench import cuda_harness as h
    from bench.bench_sdpa import make_sets, time_plans

    lib = h.load_library(listing)
    lib.pdl = False  # MLX's plans launch plainly
    scale = 1 / math.sqrt(576)
    timed = []
    for batch, kv_len, splits in swept_shapes():
        sets = make_sets(batch, 128, 1, kv_len, 576, 512, True, torch.bfloat16, 1)
        plans = {
            k: [h.plan_for(lib, *s, scale=scale, num_splits=k) for s in sets] for k in (1, splits)
        }
        times = {k: [] for k in plans}
        for r in range(rounds):
            for k in (1, splits) if r % 2 == 0 else (splits, 1):
                times[k].append(time_plans(lib, sets, plans[k], scale) * 1e6)
        t = Timed(
            batch, kv_len, splits, statistics.median(times[1]), statistics.median(times[splits])
        )
        print(t, flush=True)
        timed.append(t)
        del sets
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name(0)
    out.write_text(json.dumps({"device": device, "timed": [vars(t) for t in timed]}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="time the sweep (on the GPU)")
    run_cmd.add_argument("out", type=Path)
    run_cmd.add_argument("--library", help="a harness fatbin list (default: the last build)")
    run_cmd.add_argument("--rounds", type=int, default=2)
    fit_cmd = commands.add_parser("fit", help="fit WgmmaCost to a sweep")
    fit_cmd.add_argument("sweep", type=Path)
    fit_cmd.add_argument("--block-us", type=float, default=12.0)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.library, args.rounds)
    else:
        report(load(args.sweep), args.block_us)


if __name__ == "__main__":
    main()
