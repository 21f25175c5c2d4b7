"""Compile-time variants of the kernels, timed side by side on the same card.

    python3 -m bench.variants build DIR NAME=-DMACRO=VALUE[,-DOTHER=..] ...   (here, nvcc)
    python3 -m bench.variants run DIR [--mla] [--plan-constant NAME=INT]      (on the GPU)

Each variant is a bf16 fatbin of the pairs below; `run` times the shapes below (or, with --mla,
bench.sweep_wgmma's many-rows shapes) for each (CUDA graph replays through the harness, default
plan) and prints one row per shape. A variant whose flags hold `-rdc=false` is compiled whole
(build_harness.WHOLE_PROGRAM), not as the target ships it.
"""

from __future__ import annotations

import argparse
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.build_harness import compile_module, translation_unit
from bench.options import add_plan_constant_option, apply_plan_constants
from bench.shapes import SHAPES as ALL_SHAPES

PAIRS = [(576, 512), (192, 128), (256, 128), (128, 128), (80, 80)]
# MLA B=8 N=32768, 576/512 GQA 8, 192/128 and 128/128 B=8, 256/128, 192/128 and 80/80 at B=1.
SHAPES = [ALL_SHAPES[i] for i in (9, 3, 1, 2, 10, 0, 4)]


def build(out: Path, specs: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    src = out / "variant.cu"
    src.write_text(translation_unit(PAIRS, ["bfloat16"]))

    def one(spec: str) -> None:
        name, _, defines = spec.partition("=")
        folder = out / name
        folder.mkdir(exist_ok=True)
        flags = [d for d in defines.split(",") if d]
        compile_module(src, folder / "v.fatbin", ["sm_90a"], flags)
        (folder / "list").write_text("v.fatbin")

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(one, specs))
    (out / "names").write_text("".join(s.partition("=")[0] + "\n" for s in specs))


def run(out: Path, shapes: list[tuple] = SHAPES) -> None:
    import torch

    from bench import cuda_harness as h
    from bench.bench_sdpa import bench_harness, make_sets
    from bench.shapes import attention_flops, kv_bytes, set_count

    names = (out / "names").read_text().split()
    libs = {name: h.Library(out / name / "list") for name in names}
    print("shape | " + " | ".join(names))
    for b, hq, hkv, n, d, v, view in shapes:
        nbytes = kv_bytes(b, hkv, n, d, v, view)
        sets = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, set_count(nbytes))
        scale = 1 / math.sqrt(d)
        flops = attention_flops(b, hq, n, d, v)
        cells = []
        for name, lib in libs.items():
            t, _ = bench_harness(lib, sets, scale)
            cells.append(
                f"{name} {t * 1e6:.1f}us {flops / t / 1e12:.0f}TF {nbytes / t / 1e12:.2f}TB/s"
            )
        print((b, hq, hkv, n, d, v, view), " | ".join(cells), flush=True)
        del sets
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="compile the variants here (nvcc)")
    build_cmd.add_argument("dir", type=Path)
    build_cmd.add_argument("specs", nargs="+", metavar="NAME=-DMACRO=VALUE[,-DOTHER=..]")
    run_cmd = commands.add_parser("run", help="time the variants (on the GPU)")
    run_cmd.add_argument("dir", type=Path)
    run_cmd.add_argument("--mla", action="store_true", help="bench.sweep_wgmma's shapes")
    add_plan_constant_option(run_cmd)
    args = parser.parse_args()
    if args.command == "build":
        build(args.dir, args.specs)
        return
    apply_plan_constants(args)
    if args.mla:
        from bench.sweep_wgmma import SHAPES as MLA_SHAPES

        run(args.dir, MLA_SHAPES)
    else:
        run(args.dir)


if __name__ == "__main__":
    main()
