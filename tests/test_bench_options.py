"""bench.options: the benchmarks' --shape and --plan-constant values (no GPU needed)."""

import argparse

import pytest

from aotc.families.sdpa_vector import cuda as cuda_plan
from bench.options import parse_constant, parse_shape, set_plan_constants


def test_shapes_parse_with_and_without_a_view():
    assert parse_shape("8,64,4,32768,128,128") == (8, 64, 4, 32768, 128, 128, False)
    assert parse_shape("1,128,1,8192,576,512,view") == (1, 128, 1, 8192, 576, 512, True)


@pytest.mark.parametrize("bad", ["1,2,3", "1,2,3,4,5,x", "1,2,3,4,5,6,no", "1,2,3,4,5,6,7,8"])
def test_bad_shapes_say_what_is_expected(bad):
    with pytest.raises(argparse.ArgumentTypeError, match=bad):
        parse_shape(bad)


def test_plan_constants_set_what_the_plan_reads(monkeypatch):
    monkeypatch.setattr(cuda_plan, "WGMMA_MIN_ROWS", cuda_plan.WGMMA_MIN_ROWS)
    assert set_plan_constants([parse_constant("WGMMA_MIN_ROWS=64")]) == "WGMMA_MIN_ROWS=64"
    assert cuda_plan.WGMMA_MIN_ROWS == 64


@pytest.mark.parametrize(
    "bad", ["NOPE=1", "plan_cuda=1", "SHARED_LIMITS=3", "PARAMS_FORMAT=2", "WGMMA_MIN_ROWS=x"]
)
def test_only_integer_plan_constants_are_taken(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_constant(bad)
