"""Which prebuilt SASS a GPU can run: the loader falls back rather than fail at evaluation."""

from __future__ import annotations

import pytest

from aotc.runtime.cuda import sass_runs_on


@pytest.mark.parametrize(
    ("sass", "device", "runs"),
    [
        ("sm_90a", "sm_90", True),  # H100/H200 run the arch-specific build
        ("sm_90a", "sm_100", False),  # arch-specific builds run only on their SM
        ("sm_80", "sm_86", True),  # same major, newer minor
        ("sm_86", "sm_80", False),
        ("sm_80", "sm_90", False),  # another major needs PTX
        ("sm_100f", "sm_103", True),
        ("sm_90", "", False),  # unknown device
    ],
)
def test_sass_compatibility(sass, device, runs):
    assert sass_runs_on(sass, device) is runs


def test_sm_count_falls_back_to_the_architecture(monkeypatch):
    """Without a CUDA launch path (this CPU machine) the plans size grids for the
    architecture's common part; with one, by the driver's count."""
    pytest.importorskip("mlx.core")
    from aotc.families.sdpa_vector import cuda as plan
    from aotc.runtime import cuda as runtime

    monkeypatch.setattr(runtime, "sm_count", lambda device=0: None)
    assert plan.device_facts()[0] in (plan.DEFAULT_SM_COUNT, 108, 84, 128)
    monkeypatch.setattr(runtime, "sm_count", lambda device=0: 114)
    assert plan.device_facts()[0] == 114


def test_sm_count_is_none_without_cuda():
    pytest.importorskip("mlx.core")
    from aotc.runtime import cuda as runtime

    if runtime.unavailable_reason() is None:
        pytest.skip("CUDA launches run here: tests/gpu/test_cuda_launch.py checks the count")
    assert runtime.sm_count() is None
