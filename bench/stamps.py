"""Where a split block's time goes: %globaltimer stamps from a profiling build.

    python3 -m bench.stamps build DIR [--flag=-DMACRO=VALUE ...]  (here: nvcc, stamps on, bf16)
    python3 -m bench.stamps run DIR        (on the GPU)

The build records the time at points of every split block (the register path's blocks that
split keys over warps, and the wgmma kernel's) and writes them over the first partial row the
block owns once it is done. `run` launches each shape's split pass alone after warm-ups and
prints, per point, the median, 90th percentile and maximum over the blocks, in us from the first
block's start. Outputs are wrong by design; only the stamps mean something, and taking them
costs the blocks a little time (bench/NOTES.md round 28).
"""

from __future__ import annotations

import argparse
import math
import statistics
import struct
from collections.abc import Sequence
from pathlib import Path

from aotc.families.sdpa_vector.cuda import PARAMS_FORMAT, WGMMA_ROWS, Launch
from bench.shapes import SHAPES as ALL_SHAPES

STAMPS = 12  # kStamps in sdpa_vector.cuh: a slot is that many stamps, then the SM's id
PAIRS = [(576, 512), (192, 128), (256, 128), (80, 80)]
# The batch-1 rows and 192/128 B=8 (register path), then MLA B=8 N=8192, B=1 N=32768, B=8 N=32768.
SHAPES = [ALL_SHAPES[i] for i in (0, 10, 4, 1, 7, 8, 9)]
# Point names by slot (the index in a slot is the AOTC_STAMP number in the kernel).
REGISTER = {
    0: "start",
    1: "block work",
    2: "ring set up",
    3: "tile 0 issued",
    4: "Q issued",
    5: "tile 0 landed",
    6: "tile loop done",  # thread 0's warp
    8: "every warp done",
    9: "slices in smem",  # m-tile 0's key slices, weighted, in shared memory
    7: "merged, stored",
}
WGMMA = [
    {
        0: "start",
        1: "Q landed",
        2: "K(0) first part",
        3: "S(0) done",
        4: "P(0) ready",
        5: "S(1) done",
        6: "S(last) done",
        7: "tile loop done",
        8: "row stats out",  # maxs and sums stored, or (pairs) in shared memory
        9: "end",
    },
    {
        2: "P V(0) done",
        3: "P V(1) done",
        4: "P V(middle) done",
        5: "P V(last) done",
        8: "O out",  # partials stored, or (pairs) O rows in shared memory
    },
]


def build(out: Path, flags: Sequence[str] = ()) -> None:
    """The profiling build, with an A/B's nvcc `flags` (macros, or -I to an older copy of the
    headers) after the stamps' own."""
    from bench.build_harness import compile_module, translation_unit

    out.mkdir(parents=True, exist_ok=True)
    src = out / "stamps.cu"
    src.write_text(translation_unit(PAIRS, ["bfloat16"]))
    compile_module(src, out / "stamps.fatbin", ["sm_90a"], ["-DAOTC_SDPA_STAMPS", *flags])
    (out / "list").write_text("stamps.fatbin")


def stamped_rows(launch: Launch) -> list[tuple[int, int]]:
    """(first float of the partial row, slot) of every stamp slot a split launch writes, as the
    kernels place them: a block's first row, or (pairs) each cluster rank's first row."""
    fields = struct.unpack_from(PARAMS_FORMAT, launch.params)
    batch, q_heads, kv_heads, q_len = fields[1:5]
    num_splits, m_tiles, row_groups = fields[8], fields[10], fields[11]
    group = q_heads // kv_heads
    rows = group * q_len
    v = launch.outputs[0][1][-1]

    def out_row(b: int, kvh: int, r: int) -> int:
        return (b * q_heads + kvh * group + r // q_len) * q_len + r % q_len

    found = []
    for b in range(batch):
        for kvh in range(kv_heads):
            if "wgmma" not in launch.kernel:
                for rg in range(row_groups):
                    row = out_row(b, kvh, rg * 16 * m_tiles)
                    found += [((row * num_splits + s) * v, 0) for s in range(num_splits)]
                continue
            pair = "_pair_" in launch.kernel
            splits = num_splits // 2 if pair else num_splits
            for rg in range(-(-rows // WGMMA_ROWS)):
                firsts = [0, WGMMA_ROWS // 2] if pair else [0]
                for first in firsts:
                    r = rg * WGMMA_ROWS + first
                    if r >= rows:
                        continue
                    base = out_row(b, kvh, r)
                    for s in range(splits):
                        found += [((base * splits + s) * v, slot) for slot in (0, 1)]
    return found


def summarize(stamps: list[list[int]], names: dict[int, str], t0: int) -> None:
    for index, name in names.items():
        us = sorted((row[index] - t0) / 1e3 for row in stamps)
        p90 = us[int(0.9 * (len(us) - 1))]
        print(
            f"  {name:18s} median {statistics.median(us):8.2f}  p90 {p90:8.2f}  max {us[-1]:8.2f}"
        )


def run(out: Path, warmups: int = 30) -> None:
    import torch

    from aotc.families.sdpa_vector.cuda import prepare_launch, preparer
    from bench import cuda_harness as h
    from bench.bench_sdpa import make_sets

    lib = h.Library(out / "list")
    for b, hq, hkv, n, d, v, view in SHAPES:
        [(q, k, vv)] = make_sets(b, hq, hkv, n, d, v, view, torch.bfloat16, 1)
        launch = h.plan_for(lib, q, k, vv, scale=1 / math.sqrt(d))[0]
        title = f"{(b, hq, hkv, n, d, v)} {launch.kernel}, {launch.grid[0]} blocks"
        if "2pass_1" not in launch.kernel and "wgmma" not in launch.kernel:
            print(f"{title}: not a split pass with stamps; skipped")
            continue
        arrays = {"q": q, "k": k, "v": vv}
        call = prepare_launch(launch, preparer(lib.launch_fn))
        inputs = [arrays[name] for name in launch.inputs]
        for _ in range(warmups):
            outs = call(inputs)
        torch.cuda.synchronize()
        words = outs[0].reshape(-1).view(torch.int64).cpu().tolist()
        slots: list[list[list[int]]] = [[], []]
        for first, slot in stamped_rows(launch):
            at = first // 2 + slot * (STAMPS + 1)
            slots[slot].append(words[at : at + STAMPS + 1])
        t0 = min(row[0] for row in slots[0])
        sms = {row[STAMPS] for row in slots[0]}
        print(f"{title}, {len(slots[0])} stamped, on {len(sms)} SMs")
        if "wgmma" in launch.kernel:
            summarize(slots[0], WGMMA[0], t0)
            summarize(slots[1], WGMMA[1], t0)
        else:
            summarize(slots[0], REGISTER, t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="compile the profiling build here (nvcc)")
    build_cmd.add_argument("dir", type=Path)
    build_cmd.add_argument(
        "--flag", action="append", default=[], metavar="-DMACRO=VALUE", help="an A/B's nvcc flag"
    )
    run_cmd = commands.add_parser("run", help="stamp each shape's split pass (on the GPU)")
    run_cmd.add_argument("dir", type=Path)
    run_cmd.add_argument("--warmups", type=int, default=30)
    args = parser.parse_args()
    if args.command == "build":
        build(args.dir, args.flag)
    else:
        run(args.dir, args.warmups)


if __name__ == "__main__":
    main()
