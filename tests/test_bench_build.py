"""Builds of bench's own CUDA code: bench.build_harness.compile_module's whole-program mode,
which `setmaxnreg` experiments need (ptxas ignores `setmaxnreg` in relocatable code, as the CUDA
target builds it; bench/NOTES.md round 29), bench.cluster_probe (round 30), and
bench.ablate_wgmma's profiling builds (round 32)."""

from __future__ import annotations

import subprocess

import pytest

from aotc.formats.fatbin import read_fatbin
from bench.build_harness import KERNELS, NVCC_FLAGS, WHOLE_PROGRAM, compile_module
from bench.cluster_probe import build as build_cluster_probe

from .conftest import needs_nvcc

# Warpgroup 0 gives its registers to warpgroups 1 and 2, which keep 200 accumulators live: more
# than the 168 a thread of 384 gets, fewer than the 240 that setmaxnreg grants.
WIDE = r"""
extern "C" __global__ void __launch_bounds__(384, 1) wide(const float* x, float* y, int n) {
  if (__shfl_sync(0xffffffffu, threadIdx.x / 128, 0) == 0) {  // warp-uniform, as ptxas can see
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n");
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n");
  float acc[200];
#pragma unroll
  for (int j = 0; j < 200; ++j) acc[j] = x[threadIdx.x + j];
  for (int i = 0; i < n; ++i) {
    const float a = x[i], b = x[i + 1];
#pragma unroll
    for (int j = 0; j < 200; ++j) acc[j] = acc[j] * a + b;
  }
#pragma unroll
  for (int j = 0; j < 200; ++j) y[threadIdx.x * 200 + j] = acc[j];
}
"""


@needs_nvcc
def test_only_whole_program_builds_honour_setmaxnreg(tmp_path):
    src = tmp_path / "wide.cu"
    src.write_text(WIDE)
    stack = {}
    for name, flags in (("relocatable", []), ("whole", [WHOLE_PROGRAM])):
        out = tmp_path / f"{name}.fatbin"
        compile_module(src, out, ["sm_90a"], flags)
        [entry] = read_fatbin(out.read_bytes()).entries
        assert entry.arch == "sm_90a" and entry.resources is not None
        stack[name] = entry.resources["wide"].stack
    assert stack["relocatable"] > 0  # setmaxnreg ignored: 168 registers a thread, spills
    assert stack["whole"] == 0
    assert not (tmp_path / "whole.sm_90a.rdc.cubin").exists()  # no relocatable step, no nvlink


@needs_nvcc
def test_cluster_probe_builds_and_says_where_it_runs(tmp_path):
    binary = build_cluster_probe(tmp_path)
    run = subprocess.run([str(binary)], capture_output=True, text=True)
    if "no CUDA device" not in run.stderr:
        pytest.skip("a CUDA device is visible: the probe is a benchmark there (bench/NOTES.md)")
    assert run.returncode == 2
    assert run.stdout == ""  # nothing measured, nothing printed as if it had been


# MLA's pair entry point alone: the kernel bench.ablate_wgmma times, built in a few seconds.
MLA_PAIR = """#include "sdpa_vector_wgmma.cuh"
AOTC_SDPA_VECTOR_WGMMA_PAIR(bf16, __nv_bfloat16, 576, 512)
"""


@needs_nvcc
def test_ablation_mode_zero_is_the_shipped_kernel(tmp_path):
    src = tmp_path / "pair.cu"
    src.write_text(MLA_PAIR)
    shipped, mode0 = tmp_path / "shipped.fatbin", tmp_path / "mode0.fatbin"
    compile_module(src, shipped, ["sm_90a"])
    compile_module(src, mode0, ["sm_90a"], ["-DAOTC_SDPA_ABLATE=0"])
    assert mode0.read_bytes() == shipped.read_bytes()


@needs_nvcc
def test_ablation_skips_leave_the_mmas_pipelined(tmp_path):
    """Skips are fixed at compile time: tested at run time they put branches among the MMAs and
    ptxas made each wgmma wait (C7519), which slowed the whole kernel ~1.5x (round 32)."""
    src = tmp_path / "pair.cu"
    src.write_text(MLA_PAIR)
    for mode in (1, 2, 7):  # S, P V, and both with the loads after the first tile
        run = subprocess.run(
            ["nvcc", *NVCC_FLAGS, f"-I{KERNELS}", "-Xptxas=-v", "-cubin", "-arch=sm_90a",
             f"-DAOTC_SDPA_ABLATE={mode}", "-o", str(tmp_path / f"m{mode}.cubin"), str(src)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "sdpa_vector_wgmma_pair_bf16_576_512" in run.stderr  # ptxas reported on it
        assert "C7519" not in run.stderr, f"mode {mode}: ptxas serialised the MMAs"
