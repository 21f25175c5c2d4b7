"""bench.stamps: where a profiling build's stamps land, and that only that build takes them."""

from __future__ import annotations

import itertools
import math
import subprocess

import pytest

from aotc.families.sdpa_vector.cuda import plan_cuda
from aotc.families.sdpa_vector.problem import AttentionProblem
from bench.build_harness import KERNELS, NVCC_FLAGS, kernel_names, translation_unit
from bench.stamps import PAIRS, SHAPES, STAMPS, stamped_rows

from .conftest import needs_nvcc

NAMES = kernel_names(PAIRS, ["bfloat16"])


def split_launch(b, hq, hkv, n, d, v, view):
    problem = AttentionProblem(
        batch=b,
        q_heads=hq,
        kv_heads=hkv,
        q_len=1,
        kv_len=n,
        qk_dim=d,
        v_dim=v,
        dtype="bfloat16",
        mask="none",
        mask_shape=None,
        has_sinks=False,
    )
    return plan_cuda(problem, available=NAMES, sm_count=132, wgmma=True, overlap=True)[0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_every_block_stamps_slots_of_its_own(shape):
    launch = split_launch(*shape)
    wgmma = "wgmma" in launch.kernel
    assert wgmma or "2pass_1" in launch.kernel  # every shape's first launch is a split pass
    slots = stamped_rows(launch)
    assert len(slots) == launch.grid[0] * (2 if wgmma else 1)  # one slot a stamping thread
    words = 2 * (STAMPS + 1)  # floats a slot covers
    spans = sorted((first + slot * words, first + (slot + 1) * words) for first, slot in slots)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    assert spans[0][0] >= 0 and spans[-1][1] <= math.prod(launch.outputs[0][1])
    v = launch.outputs[0][1][-1]
    assert all(first % v == 0 and words * (slot + 1) <= v for first, slot in slots)


@needs_nvcc
def test_only_the_profiling_build_reads_the_timer(tmp_path):
    src = tmp_path / "tu.cu"
    src.write_text(translation_unit([(128, 128)], ["bfloat16"]))

    def ptx(*flags: str) -> str:
        out = tmp_path / "tu.ptx"
        cmd = ["nvcc", *NVCC_FLAGS, *flags, f"-I{KERNELS}", "-ptx", "-arch=sm_90a", "-o", out]
        subprocess.run([*cmd, src], check=True, capture_output=True)
        return out.read_text()

    assert "globaltimer" not in ptx()
    stamped = ptx("-DAOTC_SDPA_STAMPS")
    # Both kernel families stamp: the register path's split blocks and the wgmma blocks.
    for entry in ("sdpa_vector_2pass_1_bfloat16_t_128_128", "sdpa_vector_wgmma_bfloat16_t_128_128"):
        body = stamped.split(f".entry {entry}(")[1].split(".entry ")[0]
        assert "%globaltimer" in body, entry
