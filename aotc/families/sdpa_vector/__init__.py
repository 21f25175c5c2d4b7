"""The `sdpa_vector` family: fused decode attention templated on (T, D, V).

Build-time facts live here (manifest keys, constraints per target, kernel names, generated
sources); run-time plans live in `metal.py` and `cuda.py` beside this file.
"""

from __future__ import annotations

from collections.abc import Sequence

from aotc.families.base import (
    KERNEL_TYPE_NAMES,
    IncludeRoot,
    Instantiation,
    KernelSymbol,
    TranslationUnit,
    kernels_dir,
)
from aotc.located_yaml import Node
from aotc.mlx_info import mlx_include_dir

NAME = "sdpa_vector"
CUDA_VALUE_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
# MLX's Metal kernels give each SIMD lane D/32 and V/32 elements; our CUDA kernels load 16-byte
# vectors of up to 8 elements per lane pair, so 16 is the CUDA granularity.
HEAD_DIM_MULTIPLE = {"metal": 32, "cuda": 16}
MAX_HEAD_DIM = 1024

Params = tuple[tuple[str, int], ...]


def one_pass_name(type_name: str, d: int, v: int) -> str:
    return f"sdpa_vector_{type_name}_{d}_{v}"


def split_pass_name(type_name: str, d: int, v: int) -> str:
    return f"sdpa_vector_2pass_1_{type_name}_{d}_{v}"


def fused_split_name(type_name: str, d: int, v: int) -> str:
    """The split pass that also merges the splits (its last block per row group), CUDA only."""
    return f"sdpa_vector_2pass_fused_{type_name}_{d}_{v}"


def many_rows_name(name: str) -> str:
    """The CUDA entry point like `name` (one pass, split pass or fused) for 2 or 4 m-tiles (17+
    query rows per KV head). The plain names hold the one-m-tile path alone: a kernel with every
    path was twice the code, and paid 3-8 us of instruction fetch after other kernels
    (bench/NOTES.md round 16)."""
    return name.replace("sdpa_vector_", "sdpa_vector_rows_", 1)


def combine_name(type_name: str, v: int) -> str:
    return f"sdpa_vector_2pass_2_{type_name}_{v}"


def wgmma_name(type_name: str, d: int, v: int) -> str:
    """The split pass on Hopper's warpgroup MMAs (sdpa_vector_wgmma.cuh), CUDA only."""
    return f"sdpa_vector_wgmma_{type_name}_{d}_{v}"


def wgmma_short_name(type_name: str, d: int, v: int) -> str:
    """The wgmma split pass built one tile deep, for splits of 1-2 key tiles: the two-deep
    kernel's extra code cost such calls 0.3-0.7 us (bench/NOTES.md round 21). Only pairs whose
    two-deep layout fits have it (wgmma_has_short)."""
    return f"sdpa_vector_wgmma_short_{type_name}_{d}_{v}"


# Mirrors `WCfg` and `supported()` of kernels/cuda/sdpa_vector_wgmma.cuh: 16-bit types, Q and K
# rows in whole 64-element atoms, V in two warpgroup halves of whole atoms, shared memory
# (Q, the K/V slots, P, rescale factors, an mbarrier per part of a slot, alignment) within Hopper's
# 227 KB opt-in.
WGMMA_DTYPES = ("float16", "bfloat16")
WGMMA_MAX_SHARED = 232448


def _wgmma_deep_bytes(d: int, v: int) -> int:
    atom, parts = 64 * 128, 3
    return _wgmma_q_and_rest(d) + 2 * (d // 64 + v // 64) * atom + 4 * parts * 8


def _wgmma_q_and_rest(d: int) -> int:
    atom = 64 * 128
    return (d // 64) * atom + atom + 64 * 4 + 1024


def wgmma_shared_bytes(d: int, v: int, two_deep: bool = True) -> int:
    """Two K and two V tile slots where they fit and `two_deep` (WCfg::DEEP), else two slots of
    the wider."""
    if two_deep and _wgmma_deep_bytes(d, v) <= WGMMA_MAX_SHARED:
        return _wgmma_deep_bytes(d, v)
    atom, parts = 64 * 128, 3
    return _wgmma_q_and_rest(d) + 2 * max(d // 64, v // 64) * atom + 2 * parts * 8


def wgmma_has_short(dtype: str, d: int, v: int) -> bool:
    """Whether the pair also gets the one-deep entry point (wgmma_short_name): its two-deep
    layout fits (WCfg::DEEP_FITS), so the default entry point differs from one deep."""
    return wgmma_supported(dtype, d, v) and _wgmma_deep_bytes(d, v) <= WGMMA_MAX_SHARED


def wgmma_supported(dtype: str, d: int, v: int) -> bool:
    return (
        dtype in WGMMA_DTYPES
        and d % 64 == 0
        and v % 128 == 0
        and v <= 512
        and wgmma_shared_bytes(d, v) <= WGMMA_MAX_SHARED
    )


class SdpaVectorFamily:
    name = NAME
    dtypes = ("float16", "bfloat16", "float32")
    entry_keys = frozenset({"head_dims"})  # required keys of a manifest entry

    def parse_params(self, entry: dict[str, Node]) -> list[tuple[Params, Node]]:
        return [(_parse_pair(item), item) for item in entry["head_dims"].sequence()]

    def unsupported_reason(self, target: str, dtype: str, params: dict[str, int]) -> str | None:
        multiple = HEAD_DIM_MULTIPLE[target]
        for key in ("D", "V"):
            value = params[key]
            if value % multiple or not 0 < value <= MAX_HEAD_DIM:
                return (
                    f"{key}={value} cannot be built for {target}: sdpa_vector needs head dims that "
                    f"are multiples of {multiple} between {multiple} and {MAX_HEAD_DIM}"
                )
        return None

    def translation_units(
        self, target: str, insts: Sequence[Instantiation]
    ) -> list[TranslationUnit]:
        render = _render_metal if target == "metal" else _render_cuda
        units = [_pair_unit(inst, render, target) for inst in insts]
        combines: dict[tuple[str, int], list[Instantiation]] = {}
        for inst in insts:
            combines.setdefault((inst.dtype, inst.param("V")), []).append(inst)
        for (dtype, v), users in sorted(combines.items()):
            units.append(_combine_unit(dtype, v, users, render))
        return units

    def include_roots(self, target: str) -> list[IncludeRoot]:
        if target == "metal":
            include = mlx_include_dir()
            if include is None:
                raise FileNotFoundError("MLX's headers were not found: is mlx installed?")
            files = ("mlx/backend/metal/kernels/utils.h", "mlx/backend/metal/kernels/sdpa_vector.h")
            return [IncludeRoot(include, files, "mlx")]
        headers = ("sdpa_vector.cuh", "sdpa_vector_wgmma.cuh")
        return [IncludeRoot(kernels_dir() / "cuda", headers, "aotc")]


def _parse_pair(node: Node) -> Params:
    """`[D, V]`, or a bare `D` meaning V = D."""
    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):
        return (("D", value), ("V", value))
    items = node.expect(list, "a [D, V] pair or a single head dim")
    if len(items) != 2:
        raise node.error(f"expected a [D, V] pair, got {len(items)} values")
    d, v = (item.expect(int, "an integer head dim") for item in items)
    return (("D", d), ("V", v))


def _pair_unit(inst: Instantiation, render, target: str) -> TranslationUnit:
    type_name = KERNEL_TYPE_NAMES[inst.dtype]
    d, v = inst.param("D"), inst.param("V")
    kernels = (
        _symbol(one_pass_name(type_name, d, v), inst.dtype, inst.params, "one_pass"),
        _symbol(split_pass_name(type_name, d, v), inst.dtype, inst.params, "split_pass"),
    )
    if target == "cuda":
        fused = _symbol(fused_split_name(type_name, d, v), inst.dtype, inst.params, "split_fused")
        rows = tuple(
            _symbol(many_rows_name(k.name), inst.dtype, inst.params, f"{k.variant}_rows")
            for k in (*kernels, fused)
        )
        kernels = (*kernels, fused, *rows)
    if target == "cuda" and wgmma_supported(inst.dtype, d, v):
        wgmma = _symbol(wgmma_name(type_name, d, v), inst.dtype, inst.params, "split_pass_wgmma")
        kernels = (*kernels, wgmma)
    if target == "cuda" and wgmma_has_short(inst.dtype, d, v):
        short = wgmma_short_name(type_name, d, v)
        kernels = (*kernels, _symbol(short, inst.dtype, inst.params, "split_pass_wgmma_short"))
    return TranslationUnit(
        stem=one_pass_name(type_name, d, v),
        source=render(inst.dtype, [("pair", d, v)]),
        kernels=kernels,
        origins=(inst.origin,),
    )


def _combine_unit(dtype: str, v: int, users: list[Instantiation], render) -> TranslationUnit:
    type_name = KERNEL_TYPE_NAMES[dtype]
    symbol = _symbol(combine_name(type_name, v), dtype, (("V", v),), "combine")
    return TranslationUnit(
        stem=symbol.name,
        source=render(dtype, [("combine", v)]),
        kernels=(symbol,),
        origins=tuple(inst.origin for inst in users),
    )


def _symbol(name: str, dtype: str, params: Params, variant: str) -> KernelSymbol:
    return KernelSymbol(name=name, family=NAME, dtype=dtype, params=params, variant=variant)


_HEADER = "// Generated by aotc: sdpa_vector instantiations. Do not edit."


def _render_metal(dtype: str, items: list[tuple]) -> str:
    type_name = KERNEL_TYPE_NAMES[dtype]
    lines = [
        _HEADER,
        "#include <metal_stdlib>",
        "",
        '#include "mlx/backend/metal/kernels/utils.h"',
        '#include "mlx/backend/metal/kernels/sdpa_vector.h"',
        "",
        "using namespace metal;",
        "",
    ]
    for item in items:
        if item[0] == "pair":
            _, d, v = item
            for name, func in (
                (one_pass_name(type_name, d, v), "sdpa_vector"),
                (split_pass_name(type_name, d, v), "sdpa_vector_2pass_1"),
            ):
                lines.append(f'instantiate_kernel("{name}", {func}, {type_name}, {d}, {v})')
        else:
            _, v = item
            name = combine_name(type_name, v)
            lines.append(f'instantiate_kernel("{name}", sdpa_vector_2pass_2, {type_name}, {v})')
    return "\n".join(lines) + "\n"


def _render_cuda(dtype: str, items: list[tuple]) -> str:
    type_name, value_type = KERNEL_TYPE_NAMES[dtype], CUDA_VALUE_TYPES[dtype]
    lines = [
        _HEADER,
        "#include <cuda_fp16.h>",
        "#include <cuda_bf16.h>",
        "",
        '#include "sdpa_vector_wgmma.cuh"',
        "",
    ]
    for item in items:
        if item[0] == "pair":
            _, d, v = item
            lines.append(f"AOTC_SDPA_VECTOR({type_name}, {value_type}, {d}, {v})")
            if wgmma_supported(dtype, d, v):
                lines.append(f"AOTC_SDPA_VECTOR_WGMMA({type_name}, {value_type}, {d}, {v})")
            if wgmma_has_short(dtype, d, v):
                lines.append(f"AOTC_SDPA_VECTOR_WGMMA_SHORT({type_name}, {value_type}, {d}, {v})")
        else:
            _, v = item
            lines.append(f"AOTC_SDPA_VECTOR_AGGREGATE({type_name}, {value_type}, {v})")
    return "\n".join(lines) + "\n"


FAMILY = SdpaVectorFamily()
