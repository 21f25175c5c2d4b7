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
