"""Build the harness fatbins (no torch needed): python3 -m bench.build_harness DIR [JOBS].

One fatbin per (dtype, pair), cached by the header's hash; `DIR/current` names the list file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aotc.families.sdpa_vector import (
    cuda_combine_kernels,
    cuda_combine_macros,
    cuda_pair_kernels,
    cuda_pair_macros,
)
from aotc.formats.fatbin import read_fatbin
from aotc.targets.cuda import NVCC_FLAGS, fatbin_sm

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels" / "cuda"
ALL_DTYPES = ("float16", "bfloat16", "float32")
HEADERS = ("sdpa_vector.cuh", "sdpa_vector_wgmma.cuh", "sdpa_vector_seesaw.cuh")
PAIRS = [(576, 512), (192, 128), (256, 128), (96, 64), (320, 256), (128, 128), (80, 80)]


def translation_unit(pairs: Iterable[tuple[int, int]], dtypes: Iterable[str]) -> str:
    lines = ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>", '#include "sdpa_vector_wgmma.cuh"']
    pairs = sorted(set(pairs))
    for dtype in dtypes:
        for d, v in pairs:
            lines += cuda_pair_macros(dtype, d, v)
        for v in sorted({v for _, v in pairs}):
            lines += cuda_combine_macros(dtype, v, pairs)
    return "\n".join(lines) + "\n"


def kernel_names(pairs: Iterable[tuple[int, int]], dtypes: Iterable[str]) -> set[str]:
    pairs = list(pairs)
    names = set()
    for dtype in dtypes:
        for d, v in pairs:
            names |= {name for name, _ in cuda_pair_kernels(dtype, d, v)}
            names |= {name for name, _ in cuda_combine_kernels(dtype, v, pairs)}
    return names


WHOLE_PROGRAM = "-rdc=false"


def compile_module(src: Path, out: Path, archs: Sequence[str], flags: Sequence[str] = ()) -> None:
    """`src` to the fatbin `out` as the CUDA target builds a library: nvcc with its flags (and
    `flags`, whose -I come first) per arch to relocatable cubins, nvlink, fatbinary. A
    `compute_XX` arch adds PTX instead, which the driver compiles for the GPU at load.

    WHOLE_PROGRAM among `flags` compiles each arch's cubin whole instead (no nvlink), which the
    target does not ship: ptxas ignores `setmaxnreg` in relocatable code (bench/NOTES.md round
    29), so experiments with it need this."""
    images = []
    whole = WHOLE_PROGRAM in flags
    target_flags = [f for f in NVCC_FLAGS if not (whole and f.startswith("-rdc"))]
    nvcc = ["nvcc", *target_flags, *flags, f"-I{KERNELS}"]
    for arch in archs:
        if arch.startswith("compute_"):
            ptx = out.with_suffix(f".{arch}.ptx")
            _run([*nvcc, "-ptx", f"-arch={arch}", "-o", ptx, src])
            images.append(f"--image3=kind=ptx,sm={fatbin_sm(arch)},file={ptx}")
            continue
        cubin = out.with_suffix(f".{arch}.cubin")
        compiled = cubin if whole else out.with_suffix(f".{arch}.rdc.cubin")
        _run([*nvcc, "-cubin", f"-arch={arch}", "-o", compiled, src])
        if not whole:
            _run(["nvlink", f"--arch={arch}", compiled, "-o", cubin])
        images.append(f"--image3=kind=elf,sm={fatbin_sm(arch)},file={cubin}")
    _run(["fatbinary", f"--create={out}", "-64", *images])


def _run(cmd: list) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {' '.join(map(str, cmd))}\n{res.stderr}")


def build_fatbin(
    pairs: Iterable[tuple[int, int]],
    dtypes: Sequence[str] = ALL_DTYPES,
    *,
    archs: Sequence[str] = ("sm_90a",),
    out_dir: Path | None = None,
    jobs: int = 8,
) -> Path:
    """Compile (cached by source hash) one cubin per dtype in parallel and link a fatbin."""
    out_dir = Path(out_dir or os.environ.get("AOTC_HARNESS_DIR", tempfile.gettempdir()))
    out_dir.mkdir(parents=True, exist_ok=True)
    header = b"".join((KERNELS / name).read_bytes() for name in HEADERS)
    key = hashlib.sha256(
        header + repr((sorted(set(pairs)), list(dtypes), list(archs), NVCC_FLAGS)).encode()
    ).hexdigest()[:16]
    fatbin = out_dir / f"sdpa_{key}.fatbin"
    if fatbin.exists():
        return fatbin
    jobs_list = []
    for dtype in dtypes:
        for pair in sorted(set(pairs)):
            src = out_dir / f"sdpa_{key}_{dtype}_{pair[0]}_{pair[1]}.cu"
            src.write_text(translation_unit([pair], [dtype]))
            jobs_list.append((src, src.with_suffix(".fatbin")))

    def compile_one(job: tuple[Path, Path]) -> Path:
        compile_module(*job, archs)
        return job[1]

    with ThreadPoolExecutor(jobs) as pool:
        objs = list(pool.map(compile_one, jobs_list))
    # One module per dtype/pair, listed by file name (relative to the list's folder).
    fatbin.write_text("\n".join(o.name for o in objs))
    return fatbin


def image_arch(fatbins: list[bytes], device_sm: int) -> str:
    """The arch of the code the driver runs from these fatbins on a GPU of `device_sm`: its own
    SASS ("sm_90a"), else the newest PTX it can JIT ("compute_80": the sm_80 image's source
    paths, compiled for this GPU). All modules of a harness build hold the same images."""
    entries = read_fatbin(fatbins[0]).entries
    sass = [e.arch for e in entries if e.kind == "elf" and e.sm == device_sm]
    if sass:
        return max(sass, key=lambda arch: arch.endswith("a"))
    ptx = [e for e in entries if e.kind == "ptx" and e.sm <= device_sm]
    if not ptx:
        raise RuntimeError(f"the harness fatbin has no image for sm_{device_sm}")
    return max(ptx, key=lambda e: e.sm).arch


def plan_arch(image: str) -> str:
    """The arch the plan sizes blocks for: the image's (PTX of compute_80 runs sm_80's paths)."""
    return "sm_" + image.split("_", 1)[1].rstrip("af")


if __name__ == "__main__":
    # python3 -m bench.build_harness DIR [JOBS] [ARCH ...]: ARCH defaults to sm_90a; compute_80
    # builds PTX whose sm_80 source paths an H100 runs (JIT-compiled) for the harness GPU tests.
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".gpu/sdpa")
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    archs = tuple(sys.argv[3:]) or ("sm_90a",)
    start = time.time()
    path = build_fatbin(PAIRS, out_dir=out, jobs=jobs, archs=archs)
    (out / "current").write_text(path.name)
    print(f"built {path} in {time.time() - start:.0f} s")
