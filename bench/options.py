"""Command-line values the benchmarks take (no torch, no GPU): shapes outside bench.shapes.SHAPES
and integer constants of the CUDA plan, set for one run to A/B a plan rule."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def parse_shape(text: str) -> tuple:
    """`B,HQ,HKV,N,D,V[,view]` as a SHAPES entry (`view`: V is K's first V columns)."""
    fields = text.split(",")
    if len(fields) not in (6, 7) or (len(fields) == 7 and fields[6] != "view"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected B,HQ,HKV,N,D,V[,view]")
    try:
        dims = tuple(int(f) for f in fields[:6])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: B,HQ,HKV,N,D,V must be integers") from None
    return (*dims, len(fields) == 7)


def parse_constant(text: str) -> tuple[str, int]:
    """`NAME=INT` for an integer constant of aotc.families.sdpa_vector.cuda (read by the plan at
    each call, so setting it changes the plans that follow)."""
    from aotc.families.sdpa_vector import cuda as cuda_plan

    name, _, value = text.partition("=")
    if not name.isupper() or type(getattr(cuda_plan, name, None)) is not int:
        raise argparse.ArgumentTypeError(f"{name!r} is not an integer constant of the CUDA plan")
    try:
        return name, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be an integer") from None


def set_plan_constants(constants: Iterable[tuple[str, int]]) -> str:
    """Sets each (name, value) in the CUDA plan's module; returns them as `NAME=V, ...`."""
    from aotc.families.sdpa_vector import cuda as cuda_plan

    for name, value in constants:
        setattr(cuda_plan, name, value)
    return ", ".join(f"{name}={value}" for name, value in constants)


def add_plan_constant_option(parser: argparse.ArgumentParser) -> None:
    """`--plan-constant NAME=INT` (repeatable): an integer constant of the CUDA plan, set for the
    run (`apply_plan_constants`) to A/B a plan rule."""
    parser.add_argument(
        "--plan-constant",
        type=parse_constant,
        action="append",
        default=[],
        metavar="NAME=INT",
        help="set an integer constant of the CUDA plan for this run (a plan rule's A/B), "
        "e.g. WGMMA_MIN_ROWS=64",
    )


def apply_plan_constants(args: argparse.Namespace) -> None:
    if args.plan_constant:
        print("plan constants:", set_plan_constants(args.plan_constant))
