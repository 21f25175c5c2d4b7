"""bench.fit_cost: the seesaw's one-split cost model refitted from round 43's sweep (no GPU)."""

from pathlib import Path

import pytest

from aotc.families.sdpa_vector import cuda as plan
from bench.fit_cost import (
    SM_COUNT,
    _least_squares,
    features,
    fit,
    load,
    mla,
    modelled,
    swept_shapes,
    wrong_choices,
)

SWEEP = Path(__file__).parents[1] / "bench/results/2026-11-30-r43-one-split-sweep.json"


def test_the_sweep_covers_the_shapes_the_rule_splits():
    """Round 43's sweep timed every shape where the wave-filling rule gives several splits, at
    the split counts it gives today."""
    assert [(t.batch, t.kv_len, t.splits) for t in load(SWEEP)] == swept_shapes()


def test_the_fit_gives_the_plans_seesaw_cost():
    """SEESAW_COST is round 43's fit, rounded."""
    fitted, cost = fit(load(SWEEP)), plan.SEESAW_COST
    assert fitted.block_us == cost.block_us == 12.0
    assert fitted.tile_us == pytest.approx(cost.tile_us, abs=0.01)
    assert fitted.split_block_us == pytest.approx(cost.split_block_us, abs=0.05)
    assert fitted.launch_us == pytest.approx(cost.launch_us, abs=0.05)
    assert fitted.combine_bytes_per_us == pytest.approx(cost.combine_bytes_per_us, rel=0.03)


def test_seesaw_cost_takes_the_slower_side_at_four_shapes_by_at_most_2_percent():
    wrong = wrong_choices(plan.SEESAW_COST, load(SWEEP))
    assert sorted((t.batch, t.kv_len) for t, _ in wrong) == [
        (52, 8192),
        (100, 8192),
        (104, 8192),
        (108, 8192),
    ]
    assert max(loss for _, loss in wrong) < 0.022


@pytest.mark.parametrize("batch, kv_len", [(36, 1024), (48, 1024), (96, 2048), (40, 8192)])
def test_features_price_a_call_as_the_plan_does(batch, kv_len):
    p = mla(batch, kv_len)
    for count in (1, plan._wgmma_grid(p, SM_COUNT, None)[1]):
        grid = plan._wgmma_grid(p, SM_COUNT, count)
        in_t = grid[2] // plan.WGMMA_KEYS >= plan.WGMMA_SEESAW_MIN_TILES
        want = plan._wgmma_cost(p, grid, SM_COUNT, plan.SEESAW_COST, 2 if in_t else 4)
        assert modelled(plan.SEESAW_COST, features(p, count)) == pytest.approx(want)


def test_least_squares_solves_an_overdetermined_consistent_system():
    rows = [[1.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    x = [0.5, -2.0, 4.0]
    ys = [sum(r * v for r, v in zip(row, x, strict=True)) for row in rows]
    assert _least_squares(rows, ys) == pytest.approx(x)
