"""aotc.eval: mx.eval that polls for completion before it waits.

Runs on MLX's CPU stream here, where evaluations are asynchronous as on the GPU: a long one is
still running when the first poll looks, so a zero budget must fall back to mx.eval's wait and
an unbounded one must finish by polling. The GPU's side (CUDA events) is in
tests/gpu/test_sdpa_mlx.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import aotc  # noqa: E402
from aotc.runtime import evaluate  # noqa: E402


@pytest.fixture(autouse=True)
def on_the_cpu():
    """MLX's CPU stream on every machine: exact float32 matmuls, and slow enough to poll."""
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def _slow(seed: int) -> tuple[mx.array, np.ndarray]:
    """A lazy product of several matmuls (tens of ms on two cores) and its numpy value."""
    a = np.random.default_rng(seed).standard_normal((384, 384)).astype(np.float32) / 20
    x, expected = mx.array(a), a
    for _ in range(12):
        x, expected = x @ mx.array(a), expected @ a
    return x, expected


def test_evaluates_a_tree_and_ignores_other_leaves():
    x, expected = _slow(0)
    y, z = x @ x, (x * 2, None)
    tree = [x, {"y": y, "note": "not an array"}, (3, None)]
    assert aotc.eval(tree, z, spin=math.inf) is True
    # All were evaluated: with no budget, nothing is left to wait for.
    assert aotc.eval(y, z[0], spin=0) is True
    np.testing.assert_allclose(np.array(x), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(y), expected @ expected, rtol=1e-3, atol=1e-4)


def test_a_zero_budget_leaves_the_wait_to_mlx():
    x, expected = _slow(1)
    assert aotc.eval(x, spin=0) is False
    np.testing.assert_allclose(np.array(x), expected, rtol=1e-4, atol=1e-5)


def test_an_unbounded_budget_finishes_by_polling():
    x, expected = _slow(2)
    assert aotc.eval(x, spin=math.inf) is True
    np.testing.assert_allclose(np.array(x), expected, rtol=1e-4, atol=1e-5)


def test_a_huge_budget_polls_until_done():
    x, expected = _slow(6)
    assert aotc.eval(x, spin=1e300) is True  # no overflow into a past deadline
    np.testing.assert_allclose(np.array(x), expected, rtol=1e-4, atol=1e-5)


def test_arrays_already_evaluated_need_no_wait():
    x, _ = _slow(3)
    mx.eval(x)
    assert aotc.eval(x, spin=0) is True
    assert aotc.eval() is True


def test_several_outputs_depending_on_each_other():
    x, expected = _slow(4)
    outs = [x, x.T @ x, mx.sum(x)]
    assert aotc.eval(outs, spin=math.inf) is True
    np.testing.assert_allclose(np.array(outs[1]), expected.T @ expected, rtol=1e-3, atol=1e-4)
    assert outs[2].item() == pytest.approx(float(expected.sum()), rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("spin", [-1e-3, math.nan])
def test_a_bad_budget_is_refused(spin):
    with pytest.raises(ValueError, match="spin must be a number of seconds >= 0"):
        aotc.eval(mx.array(1.0), spin=spin)


def test_the_extension_polls():
    """The native path is the one taken here (CI builds the extension)."""
    assert evaluate._eval_polling is not None
    assert evaluate._eval_polling.__name__ == "eval_polling"


def test_without_the_extension_it_is_mx_eval(monkeypatch):
    monkeypatch.setattr(evaluate, "_eval_polling", None)
    x, expected = _slow(5)
    assert aotc.eval([x], spin=math.inf) is False
    np.testing.assert_allclose(np.array(x), expected, rtol=1e-4, atol=1e-5)
