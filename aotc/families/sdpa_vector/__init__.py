"""The `sdpa_vector` family: fused decode attention templated on (T, D, V).

Build-time facts live here (manifest keys, constraints per target, kernel names, generated
sources); run-time plans live in `metal.py` and `cuda.py` beside this file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
from aotc.targets.base import TargetOptions
from aotc.targets.cuda import CudaOptions

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


def combine_t_name(type_name: str, v: int) -> str:
    """The combine of partials stored in T, each row O / l (the seesaw's split passes): CUDA, in
    the combine unit of a V that a wgmma_has_seesaw pair uses."""
    return f"sdpa_vector_2pass_2t_{type_name}_{v}"


def wgmma_name(type_name: str, d: int, v: int) -> str:
    """The split pass on Hopper's warpgroup MMAs (sdpa_vector_wgmma.cuh), CUDA only."""
    return f"sdpa_vector_wgmma_{type_name}_{d}_{v}"


def wgmma_short_name(type_name: str, d: int, v: int) -> str:
    """The wgmma split pass built one tile deep, for splits of 1-2 key tiles: the two-deep
    kernel's extra code cost such calls 0.3-0.7 us (bench/NOTES.md round 21). Only pairs whose
    two-deep layout fits have it (wgmma_has_short)."""
    return f"sdpa_vector_wgmma_short_{type_name}_{d}_{v}"


def wgmma_dual_name(type_name: str, d: int, v: int) -> str:
    """The two-deep wgmma split pass with two blocks an SM (80 registers a thread), for KV heads
    of 2+ row groups (bench/NOTES.md round 22). Only pairs with wgmma_has_dual have it."""
    return f"sdpa_vector_wgmma_dual_{type_name}_{d}_{v}"


def wgmma_pair_name(type_name: str, d: int, v: int) -> str:
    """The two-deep wgmma split pass in clusters of two blocks that merge their key splits
    before writing (half the partials), for wide heads (wgmma_has_pair; bench/NOTES.md round
    23)."""
    return f"sdpa_vector_wgmma_pair_{type_name}_{d}_{v}"


def wgmma_one_name(type_name: str, d: int, v: int) -> str:
    """The two-deep wgmma kernel for row groups of one key split, writing the output itself (no
    partials, no combine), for wide heads (wgmma_has_one)."""
    return f"sdpa_vector_wgmma_one_{type_name}_{d}_{v}"


def wgmma_seesaw_name(type_name: str, d: int, v: int) -> str:
    """The two-warpgroup wgmma split pass for V = K's prefix (MLA), whose warpgroups take turns
    with the key tiles (sdpa_vector_seesaw.cuh), for wgmma_has_seesaw pairs."""
    return f"sdpa_vector_wgmma_seesaw_{type_name}_{d}_{v}"


def wgmma_seesaw_one_name(type_name: str, d: int, v: int) -> str:
    """The seesaw kernel for row groups of one key split, writing the output itself."""
    return f"sdpa_vector_wgmma_seesaw_one_{type_name}_{d}_{v}"


def wgmma_t_partials_name(type_name: str, d: int, v: int) -> str:
    """The two-deep wgmma split pass storing its partials in T, each row O / l, as the seesaw's
    split pass does: the launch that takes the seesaw as its view alternative."""
    return f"sdpa_vector_wgmma_t_partials_{type_name}_{d}_{v}"


# Mirrors `WCfg` and `supported()` of kernels/cuda/sdpa_vector_wgmma.cuh: 16-bit types, Q and K
# rows in whole 64-element atoms, V in two warpgroup halves of whole atoms, shared memory
# (Q, the K/V slots, P, rescale factors, an mbarrier per part of a slot, alignment) within Hopper's
# 227 KB opt-in.
WGMMA_DTYPES = ("float16", "bfloat16")
WGMMA_MAX_SHARED = 232448


_WGMMA_ATOM = 64 * 128  # bytes of one 64-row, 128-byte column atom
_WGMMA_PART_BARRIERS = 3 * 8  # an mbarrier per part (3) of a tile slot
_WGMMA_Q_BARRIER = 8  # Q's mbarrier (Q by TMA)


def _wgmma_fixed_bytes(d: int) -> int:
    """Shared bytes of WCfg besides the tile slots: Q, P, rescale factors, alignment."""
    return (d // 64) * _WGMMA_ATOM + _WGMMA_ATOM + 64 * 4 + 1024


def _wgmma_deep_bytes(d: int, v: int) -> int:
    """WCfg's two-deep layout: two K and two V tile slots."""
    slots = 2 * (d // 64 + v // 64) * _WGMMA_ATOM
    return _wgmma_fixed_bytes(d) + slots + 4 * _WGMMA_PART_BARRIERS + _WGMMA_Q_BARRIER


def _wgmma_deep_fits(d: int, v: int) -> bool:
    return _wgmma_deep_bytes(d, v) <= WGMMA_MAX_SHARED


def wgmma_shared_bytes(d: int, v: int, two_deep: bool = True) -> int:
    """Two K and two V tile slots where they fit and `two_deep` (WCfg::DEEP), else two slots of
    the wider."""
    if two_deep and _wgmma_deep_fits(d, v):
        return _wgmma_deep_bytes(d, v)
    two_slots = 2 * max(d // 64, v // 64) * _WGMMA_ATOM + 2 * _WGMMA_PART_BARRIERS
    two_slots += _WGMMA_Q_BARRIER
    return _wgmma_fixed_bytes(d) + two_slots


_WGMMA_SHARED_PER_SM = 233472  # kSharedPerSM
_WGMMA_BLOCK_RESERVE = 1024  # kBlockReserve
_WGMMA_TWO_BLOCK_HEADS = 256  # kTwoBlockHeads


def wgmma_has_dual(dtype: str, d: int, v: int) -> bool:
    """Whether the pair also gets the two-blocks-an-SM entry point (wgmma_dual_name): two of its
    two-deep blocks fit an SM (WCfg::TWO_BLOCKS_FIT)."""
    block = _wgmma_deep_bytes(d, v) + _WGMMA_BLOCK_RESERVE
    fits = d + v <= _WGMMA_TWO_BLOCK_HEADS and 2 * block <= _WGMMA_SHARED_PER_SM
    return wgmma_has_short(dtype, d, v) and fits


WGMMA_PAIR_HEADS = 1024  # D + V from which a pair gets the cluster entry point (MLA's 576/512)


def wgmma_has_pair(dtype: str, d: int, v: int) -> bool:
    """Whether the pair also gets the clusters-of-two entry point (wgmma_pair_name): heads this
    wide write 128 KB of partials a block, which pairs halve."""
    return wgmma_supported(dtype, d, v) and d + v >= WGMMA_PAIR_HEADS


def wgmma_has_one(dtype: str, d: int, v: int) -> bool:
    """Whether the pair also gets the one-pass entry point (wgmma_one_name): where these heads
    need one split a row group (large batches), its combine would read and its blocks write
    128 KB of partials a block for nothing."""
    return wgmma_has_pair(dtype, d, v)


def seesaw_shared_bytes(d: int, v: int) -> int:
    """SeesawCfg::SMEM: Q, two K slots, P, four rows of floats, an mbarrier per slot atom and
    Q's, alignment."""
    atoms = d // 64
    return (3 * atoms + 1) * _WGMMA_ATOM + 4 * 64 * 4 + (2 * atoms + 1) * 8 + 1024


def wgmma_has_seesaw(dtype: str, d: int, v: int) -> bool:
    """Whether the pair also gets the seesaw entry point (wgmma_seesaw_name): wide heads whose
    V can be K's prefix (V < D), where the tile is compute-bound."""
    fits = seesaw_shared_bytes(d, v) <= WGMMA_MAX_SHARED
    return wgmma_has_pair(dtype, d, v) and v < d and fits


def wgmma_has_short(dtype: str, d: int, v: int) -> bool:
    """Whether the pair also gets the one-deep entry point (wgmma_short_name): its two-deep
    layout fits (WCfg::DEEP_FITS), so the default entry point differs from one deep."""
    return wgmma_supported(dtype, d, v) and _wgmma_deep_fits(d, v)


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

    def dispatch_warning(
        self, target: str, options: TargetOptions, dtype: str, params: dict[str, int]
    ) -> str | None:
        if not isinstance(options, CudaOptions):
            return None
        from aotc.families.sdpa_vector.cuda import unserved_archs

        unserved = unserved_archs(dtype, params["D"], params["V"], options.images)
        if not unserved:
            return None
        need, limit = unserved[0][1:]
        names = ", ".join(arch for arch, _, _ in unserved)
        return (
            f"{dtype} D={params['D']} V={params['V']} cannot run on {names}: a block needs {need} "
            f"bytes of shared memory, over the {limit} a block may take there; such calls fall "
            "back to MLX's own op"
        )

    def translation_units(
        self, target: str, insts: Sequence[Instantiation]
    ) -> list[TranslationUnit]:
        render = _render_metal if target == "metal" else _render_cuda
        units = [_pair_unit(inst, render, target) for inst in insts]
        combines: dict[tuple[str, int], list[Instantiation]] = {}
        for inst in insts:
            combines.setdefault((inst.dtype, inst.param("V")), []).append(inst)
        for (dtype, v), users in sorted(combines.items()):
            units.append(_combine_unit(dtype, v, users, render, target))
        return units

    def include_roots(self, target: str) -> list[IncludeRoot]:
        if target == "metal":
            include = mlx_include_dir()
            if include is None:
                raise FileNotFoundError("MLX's headers were not found: is mlx installed?")
            files = ("mlx/backend/metal/kernels/utils.h", "mlx/backend/metal/kernels/sdpa_vector.h")
            return [IncludeRoot(include, files, "mlx")]
        headers = ("sdpa_vector.cuh", "sdpa_vector_wgmma.cuh", "sdpa_vector_seesaw.cuh")
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


def _wgmma_entry_points(dtype: str, d: int, v: int) -> list[tuple[str, str, str]]:
    """(name, index variant, macro) of the pair's wgmma entry points, in index order: the
    two-deep build, the one-deep (`_short`), the two-blocks-an-SM (`_dual`), the
    clusters-of-two (`_pair`), the one-pass (`_one`) and the seesaw split and one pass
    (`_seesaw`, `_seesaw_one`) ones."""
    type_name = KERNEL_TYPE_NAMES[dtype]
    table = (
        (wgmma_supported, wgmma_name, "", "split_pass_wgmma"),
        (wgmma_has_short, wgmma_short_name, "_short", "split_pass_wgmma_short"),
        (wgmma_has_dual, wgmma_dual_name, "_dual", "split_pass_wgmma_dual"),
        (wgmma_has_pair, wgmma_pair_name, "_pair", "split_pass_wgmma_pair"),
        (wgmma_has_one, wgmma_one_name, "_one", "one_pass_wgmma"),
        (wgmma_has_seesaw, wgmma_seesaw_name, "_seesaw", "split_pass_wgmma_seesaw"),
        (wgmma_has_seesaw, wgmma_seesaw_one_name, "_seesaw_one", "one_pass_wgmma_seesaw"),
        (wgmma_has_seesaw, wgmma_t_partials_name, "_t_partials", "split_pass_wgmma_t_partials"),
    )
    return [
        (name(type_name, d, v), variant, f"AOTC_SDPA_VECTOR_WGMMA{kind.upper()}")
        for has, name, kind, variant in table
        if has(dtype, d, v)
    ]


def cuda_pair_kernels(dtype: str, d: int, v: int) -> list[tuple[str, str]]:
    """(name, variant) of every CUDA entry point that `cuda_pair_macros` instantiates for a pair,
    in index order."""
    type_name = KERNEL_TYPE_NAMES[dtype]
    base = [
        (one_pass_name(type_name, d, v), "one_pass"),
        (split_pass_name(type_name, d, v), "split_pass"),
        (fused_split_name(type_name, d, v), "split_fused"),
    ]
    kernels = base + [(many_rows_name(name), f"{variant}_rows") for name, variant in base]
    return kernels + [(name, variant) for name, variant, _ in _wgmma_entry_points(dtype, d, v)]


def cuda_pair_macros(dtype: str, d: int, v: int) -> list[str]:
    """The macro lines of kernels/cuda/*.cuh that instantiate a pair's CUDA entry points."""
    args = f"{KERNEL_TYPE_NAMES[dtype]}, {CUDA_VALUE_TYPES[dtype]}, {d}, {v}"
    wgmma = [f"{macro}({args})" for _, _, macro in _wgmma_entry_points(dtype, d, v)]
    return [f"AOTC_SDPA_VECTOR({args})", *wgmma]


def cuda_combine_macros(dtype: str, v: int, pairs: Iterable[tuple[int, int]]) -> list[str]:
    """The macro lines of V's combine unit, whose users are `pairs`: fp32 partials' combine,
    and T partials' where needs_combine_t (the kernels of cuda_combine_kernels)."""
    args = f"{KERNEL_TYPE_NAMES[dtype]}, {CUDA_VALUE_TYPES[dtype]}, {v}"
    kinds = ("", "_T") if needs_combine_t(dtype, v, pairs) else ("",)
    return [f"AOTC_SDPA_VECTOR_AGGREGATE{kind}({args})" for kind in kinds]


def needs_combine_t(dtype: str, v: int, pairs: Iterable[tuple[int, int]]) -> bool:
    """Whether V's combine unit gets combine_t_name's kernel: a pair of it with the seesaw."""
    return any(wgmma_has_seesaw(dtype, d, pv) for d, pv in pairs if pv == v)


def cuda_combine_kernels(
    dtype: str, v: int, pairs: Iterable[tuple[int, int]]
) -> list[tuple[str, str]]:
    """(name, variant) of every CUDA entry point of V's combine unit, whose users are `pairs`:
    the fp32 partials' combine, and T partials' where needs_combine_t."""
    type_name = KERNEL_TYPE_NAMES[dtype]
    kernels = [(combine_name(type_name, v), "combine")]
    if needs_combine_t(dtype, v, pairs):
        kernels.append((combine_t_name(type_name, v), "combine_t"))
    return kernels


def _pair_unit(inst: Instantiation, render, target: str) -> TranslationUnit:
    type_name = KERNEL_TYPE_NAMES[inst.dtype]
    d, v = inst.param("D"), inst.param("V")
    if target == "cuda":
        named = cuda_pair_kernels(inst.dtype, d, v)
    else:
        named = [(one_pass_name(type_name, d, v), "one_pass")]
        named.append((split_pass_name(type_name, d, v), "split_pass"))
    return TranslationUnit(
        stem=one_pass_name(type_name, d, v),
        source=render(inst.dtype, [("pair", d, v)]),
        kernels=tuple(_symbol(name, inst.dtype, inst.params, variant) for name, variant in named),
        origins=(inst.origin,),
    )


def _combine_unit(
    dtype: str, v: int, users: list[Instantiation], render, target: str
) -> TranslationUnit:
    pairs = tuple((inst.param("D"), inst.param("V")) for inst in users)
    if target == "cuda":
        named = cuda_combine_kernels(dtype, v, pairs)
    else:
        named = [(combine_name(KERNEL_TYPE_NAMES[dtype], v), "combine")]
    symbols = tuple(_symbol(name, dtype, (("V", v),), variant) for name, variant in named)
    return TranslationUnit(
        stem=symbols[0].name,
        source=render(dtype, [("combine", v, pairs)]),
        kernels=symbols,
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
            v = item[1]
            name = combine_name(type_name, v)
            lines.append(f'instantiate_kernel("{name}", sdpa_vector_2pass_2, {type_name}, {v})')
    return "\n".join(lines) + "\n"


def _render_cuda(dtype: str, items: list[tuple]) -> str:
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
            lines += cuda_pair_macros(dtype, *item[1:])
        else:
            lines += cuda_combine_macros(dtype, *item[1:])
    return "\n".join(lines) + "\n"


FAMILY = SdpaVectorFamily()
