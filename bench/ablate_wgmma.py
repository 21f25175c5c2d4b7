"""Where the wgmma kernel's time goes: time it with parts skipped (profiling builds).

    python3 -m bench.ablate_wgmma build DIR     (here: nvcc, one bf16 576/512 build per mode)
    python3 -m bench.ablate_wgmma run DIR      (on the GPU)

A mode's bits (-DAOTC_SDPA_ABLATE=BITS, fixed at compile time so that the MMAs stay pipelined):
1 skips S = Q K^T, 2 skips O += P V, 4 skips the K loads after the first tile, 8 the partials'
stores, 16 every K load, 32 Q's load. Mode 0 is the shipped kernel. Results are wrong by
design; only the times mean something. "alone": the split pass without its combine kernel.
"""

from __future__ import annotations

import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.build_harness import compile_module, translation_unit

MODES = {
    0: "all",
    1: "no S",
    2: "no PV",
    4: "no loads",
    3: "no S/PV",
    5: "no S/loads",
    6: "no PV/loads",
    7: "softmax+barriers",
    15: "... no partials",
    23: "... no loads at all",
    55: "... no loads, no Q",
    63: "softmax+barriers only",
}
SHAPES = [
    (8, 128, 1, 32768, 576, 512, True),
    (8, 64, 1, 32768, 576, 512, True),  # one row group: each K tile read once from L2
    (1, 128, 1, 32768, 576, 512, True),
    (8, 128, 1, 8192, 576, 512, True),
]


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    src = out / "ablate.cu"
    src.write_text(translation_unit([(576, 512)], ["bfloat16"]))

    def one(mode: int) -> None:
        folder = out / f"mode{mode}"
        folder.mkdir(exist_ok=True)
        compile_module(src, folder / "ablate.fatbin", ["sm_90a"], [f"-DAOTC_SDPA_ABLATE={mode}"])
        (folder / "list").write_text("ablate.fatbin")

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(one, MODES))


def run(out: Path) -> None:
    import torch

    from bench import cuda_harness as h
    from bench.bench_sdpa import make_sets, time_plans

    libs = {mode: h.Library(out / f"mode{mode}" / "list") for mode in MODES}
    for b, hq, hkv, n, d, v, view in SHAPES:
        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, 2)
        scale = 1 / math.sqrt(d)
        cells, grid = [], None
        for mode, name in MODES.items():
            lib = libs[mode]
            plans = [h.plan_for(lib, *s, scale=scale) for s in sets]
            grid = plans[0][0].grid[0]
            cells.append(f"{name} {time_plans(lib, sets, plans, scale) * 1e6:.1f}")
            if mode in (0, 7, 15, 23, 55, 63):
                cells.append(f"{name} alone {_split_pass_alone(lib, sets, plans) * 1e6:.1f}")
        print((b, hq, hkv, n, d, v), f"g{grid}", " | ".join(cells), flush=True)


def _split_pass_alone(lib, sets, plans) -> float:
    """Seconds per call of the plans' split passes without their combine kernel."""
    from functools import partial

    from aotc.families.sdpa_vector.cuda import prepare_launch, preparer
    from bench.bench_sdpa import time_graph

    fns = []
    for (q, k, v), plan in zip(sets, plans, strict=True):
        inputs = [{"q": q, "k": k, "v": v}[name] for name in plan[0].inputs]
        fns.append(partial(prepare_launch(plan[0], preparer(lib.launch_fn)), inputs))
    return time_graph(fns)


if __name__ == "__main__":
    {"build": build, "run": run}[sys.argv[1]](Path(sys.argv[2]))
