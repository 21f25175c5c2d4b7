"""Launch plans for MLX's Metal `sdpa_vector` kernels in an aotc metallib, and running them.

This is the host side of MLX's `sdpa_vector` and `sdpa_vector_2pass`
(`mlx/backend/metal/scaled_dot_product_attention.cpp`) in two halves:

- `plan_attention()` is the graph-time decision: from shapes, dtype, mask kind, the GPU
  architecture string (`applegpu_g15s`, MLX's `Device::get_architecture()`) and the pipelines'
  thread limits, it picks the one-pass kernel or the split pass (and its block count), and writes
  every launch out as data: kernel names, function constants 20..26, what each buffer index
  holds, grid and threadgroup sizes, intermediate arrays.
- What MLX reads from strides at evaluation time (the K/V head and sequence strides, the mask
  strides, whether the queries are transposed, whether an input must be copied first) stays a
  *description* (`StrideOf`, `NotRowContiguous`, `InputSpec.layout`) that the generic C++ primitive
  (`src/metal/`, `aotc._ext.metal_launch`) fills in at evaluation time.

`run_metal(plan, arrays, library_path)` hands a plan to the primitive. `make_runner(problem)` is
what `aotc.sdpa_vector` calls on a Metal GPU. Nothing here imports MLX or the extension at import
time, so the module loads (and its plans are tested) on Linux.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

from aotc.families.base import KERNEL_TYPE_NAMES
from aotc.families.sdpa_vector import (
    HEAD_DIM_MULTIPLE,
    MAX_HEAD_DIM,
    combine_name,
    one_pass_name,
    split_pass_name,
)
from aotc.families.sdpa_vector.problem import SUPPORTED_DTYPES, AttentionProblem, Unsupported

# Function constants of mlx/backend/metal/kernels/sdpa_vector.h (MLX 0.32.4, lines 7-13).
FC_HAS_MASK = 20
FC_QUERY_TRANSPOSED = 21
FC_DO_CAUSAL = 22
FC_BOOL_MASK = 23
FC_FLOAT_MASK = 24
FC_HAS_SINKS = 25
FC_BLOCKS = 26

SIMD_WIDTH = 32  # BD/BN of the kernels; the split pass reduces its partials 32 at a time
ONE_PASS_THREADS = 1024  # sdpa_vector: `MTL::Size group_dims(1024, 1, 1)`
COMBINE_THREADS = 1024  # sdpa_vector_2pass_2: `group_dims = MTL::Size(1024, 1, 1)`
MAX_QUERY_ROWS = 8  # eval_gpu: vector mode only while `q_pre.shape(2) <= 8`
MAX_SIMDS = 32  # has_fused_kernel: `query_sequence_length * gqa_factor > 32` has no fused kernel

Variant = Literal["one_pass", "split_pass"]
Layout = Literal[
    "any",
    "row_contiguous",
    "inner_contiguous",
    "flat_batch_heads",
    "inner_contiguous_flat_batch_heads",
    "row_contiguous_or_seq_major",
    "row_contiguous_or_seq_major_one_batch",
]
ScalarType = Literal["bool", "int32", "uint64", "float32"]
Runner = Callable[..., Any]

_ARCH_GEN = re.compile(r"(\d)(\d)[a-z]$")
_PLAN_CACHE_LIMIT = 64  # parameter values remembered per plan (the scale rarely changes)


# --------------------------------------------------------------------------------------------
# The binding description: data that the C++ primitive interprets (see `MetalPlan.wire`).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Const:
    """A value known when the graph is built."""

    value: bool | int | float


@dataclass(frozen=True)
class Param:
    """A value given per call (`run_metal(..., params={"scale": ...})`)."""

    name: str


@dataclass(frozen=True)
class StrideOf:
    """Read at evaluation time: the stride (in elements) of input `input` along the first axis of
    `axes` whose size is > 1; when every one has size 1, the stride of the last axis of `axes`
    (`singleton="last"`) or 0 (`singleton="zero"`)."""

    input: int
    axes: tuple[int, ...]
    singleton: Literal["last", "zero"]


@dataclass(frozen=True)
class NotRowContiguous:
    """Read at evaluation time (after any layout copy): input `input` is not row-contiguous."""

    input: int


Value = Const | Param | StrideOf | NotRowContiguous


@dataclass(frozen=True)
class ArrayRef:
    kind: Literal["input", "output", "temporary"]
    index: int


@dataclass(frozen=True)
class FunctionConstant:
    index: int
    type: Literal["bool", "int32"]
    value: Value
    name: str


@dataclass(frozen=True)
class ArrayBuffer:
    index: int
    array: ArrayRef
    access: Literal["read", "write"]
    name: str


@dataclass(frozen=True)
class BytesBuffer:
    index: int
    type: ScalarType
    value: Value
    name: str


Buffer = ArrayBuffer | BytesBuffer


@dataclass(frozen=True)
class Dispatch:
    """One `dispatch_threadgroups(grid, threadgroup)` of one kernel."""

    kernel: str
    constants: tuple[FunctionConstant, ...]
    buffers: tuple[Buffer, ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]

    @property
    def threads_per_threadgroup(self) -> int:
        x, y, z = self.threadgroup
        return x * y * z

    def buffer(self, index: int) -> Buffer:
        for binding in self.buffers:
            if binding.index == index:
                return binding
        raise KeyError(f"{self.kernel} binds nothing at buffer({index})")

    def constant(self, index: int) -> FunctionConstant:
        for constant in self.constants:
            if constant.index == index:
                return constant
        raise KeyError(f"{self.kernel} sets no function constant {index}")


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class InputSpec:
    """An input of the primitive and the layout its kernels need; the primitive copies it into a
    row-contiguous array at evaluation time only when its strides do not already fit."""

    name: str
    layout: Layout


@dataclass(frozen=True)
class MetalPlan:
    problem: AttentionProblem
    architecture: str
    variant: Variant
    reason: str  # why this variant (MLX's routing, or a pipeline's thread limit)
    blocks: int | None  # the split pass's block count (function constant 26)
    inputs: tuple[InputSpec, ...]
    outputs: tuple[ArraySpec, ...]
    temporaries: tuple[ArraySpec, ...]
    dispatches: tuple[Dispatch, ...]
    params: tuple[str, ...] = ("scale",)

    @property
    def kernel_names(self) -> tuple[str, ...]:
        return tuple(d.kernel for d in self.dispatches)

    def wire(self, params: Mapping[str, float | int] | None = None) -> dict:
        """The plain-data program `aotc._ext.metal_launch` takes, with `params` filled in.

        Cached per parameter values on the plan (a decode step reuses it): do not mutate it.
        """
        key = self._params_key(params)
        wire = self._cache.get(("wire", key))
        if wire is None:
            wire = _wire(self, dict(key))
            self._remember(("wire", key), wire)
        return wire

    def program(self, ext: Any, params: Mapping[str, float | int] | None = None) -> Any:
        """`ext.metal_program(self.wire(params))`: the program parsed once by the extension."""
        key = self._params_key(params)
        program = self._cache.get(("program", key))
        if program is None:
            program = ext.metal_program(self.wire(params))
            self._remember(("program", key), program)
        return program

    def _params_key(self, params: Mapping[str, float | int] | None) -> tuple:
        values = dict(params or {})
        missing = [name for name in self.params if name not in values]
        if missing:
            raise ValueError(f"run_metal needs values for {missing}")
        return tuple(sorted(values.items()))

    @cached_property
    def _cache(self) -> dict:
        return {}  # not a field: plans compare and hash by their launches only

    def _remember(self, key: tuple, value: Any) -> None:
        if len(self._cache) >= _PLAN_CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = value


# --------------------------------------------------------------------------------------------
# Graph-time decisions, as MLX makes them.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """MLX's reading of `MTLDevice.architecture.name` (`Device::Device()` in device.cpp)."""

    name: str

    @property
    def size(self) -> str:
        """The last letter: `p` phone, `g` base/Pro, `s` Max, `d` Ultra (device.cpp's switch)."""
        return self.name[-1:] if self.name else ""

    @property
    def generation(self) -> int:
        """`arch_gen_`: the two digits before the last letter (`applegpu_g15s` -> 15), else 0."""
        match = _ARCH_GEN.search(self.name)
        return int(match.group(1)) * 10 + int(match.group(2)) if match else 0


def check_problem(problem: AttentionProblem) -> None:
    """Raise Unsupported where MLX itself has no vector kernel, or aotc builds none."""
    if problem.dtype not in SUPPORTED_DTYPES:
        raise Unsupported(f"dtype {problem.dtype} has no sdpa_vector kernel")
    if problem.q_len > MAX_QUERY_ROWS:
        raise Unsupported(
            f"{problem.q_len} query rows: sdpa_vector serves at most {MAX_QUERY_ROWS} "
            "(MLX uses its full-attention kernel beyond)"
        )
    if problem.q_len > problem.kv_len:
        raise Unsupported(
            f"the query length {problem.q_len} exceeds the key length {problem.kv_len}"
        )
    if problem.q_len * problem.gqa_factor > MAX_SIMDS:
        raise Unsupported(
            f"query length {problem.q_len} times GQA factor {problem.gqa_factor} exceeds "
            f"{MAX_SIMDS} (one simdgroup per query row and head in the split pass)"
        )
    multiple = HEAD_DIM_MULTIPLE["metal"]
    for label, dim in (("query/key", problem.qk_dim), ("value", problem.v_dim)):
        if dim % multiple or not 0 < dim <= MAX_HEAD_DIM:
            raise Unsupported(
                f"{label} head dim {dim}: the Metal kernels need a multiple of {multiple} "
                f"up to {MAX_HEAD_DIM}"
            )


def route(problem: AttentionProblem, architecture: str) -> tuple[Variant, str]:
    """MLX's choice between the one-pass kernel and the split pass (eval_gpu, vector mode)."""
    size = Architecture(architecture).size
    n = problem.kv_len
    if size in ("d", "s") and n >= 1024:
        return "split_pass", f"{architecture} is a Max/Ultra GPU and {n} keys >= 1024"
    if problem.kv_heads < problem.q_heads and n >= 4096:
        return "split_pass", f"GQA with {n} keys >= 4096"
    return "one_pass", f"{n} keys on {architecture or 'an unknown GPU'}"


def split_blocks(architecture: str, kv_len: int, n_simds: int, override: int | None = None) -> int:
    """The split pass's block count: `sdpa_vector_2pass` in MLX, by the architecture's last letter.

    `override` is MLX's `MLX_SDPA_BLOCKS`, rounded up to a multiple of 32 as MLX does.
    """
    if override is not None and override > 0:
        return -(-override // SIMD_WIDTH) * SIMD_WIDTH
    size = Architecture(architecture).size
    n = kv_len
    if size == "s":
        blocks = 64
        if n > 1024 and n_simds > 4:
            if n <= 8192:
                blocks = 128
            elif n <= 32768:
                blocks = 256
            elif n <= 65536:
                blocks = 512
            else:
                blocks = 1024
        return blocks
    if size == "d":
        blocks = 128
        if n_simds <= 2 and n > 8192:
            blocks = 256
        elif n_simds >= 6:
            if 16384 <= n < 65536:
                blocks = 512
            elif n >= 65536:
                blocks = 1024
        return blocks
    return 64 if n_simds >= 4 else 32


def plan_attention(
    problem: AttentionProblem,
    architecture: str,
    *,
    pipeline_max_threads: Mapping[str, int] | None = None,
    blocks_override: int | None = None,
) -> MetalPlan:
    """The launches for `problem` on a GPU of `architecture`.

    `pipeline_max_threads` maps kernel names to their pipelines' `maxTotalThreadsPerThreadgroup`
    (known only from a built pipeline: `probe_pipeline_limits`); a kernel missing from it is
    assumed to fit (the primitive checks again before it dispatches). When MLX's choice does not
    fit, the other variant is used if it fits; when neither does, Unsupported says why.
    """
    check_problem(problem)
    limits = pipeline_max_threads or {}
    routed, why = route(problem, architecture)
    candidates: tuple[Variant, ...] = (
        ("one_pass", "split_pass") if routed == "one_pass" else ("split_pass", "one_pass")
    )
    misfits: list[str] = []
    for variant in candidates:
        built = _build(problem, architecture, variant, blocks_override)
        misfit = _misfit(built[-1], limits)
        if misfit is None:
            reason = why if variant == routed else f"{'; '.join(misfits)}: {variant} instead"
            return _plan(problem, architecture, variant, reason, *built)
        misfits.append(f"{variant} does not fit: {misfit}")
    raise Unsupported("; ".join(misfits))


def _misfit(dispatches: tuple[Dispatch, ...], limits: Mapping[str, int]) -> str | None:
    for dispatch in dispatches:
        limit = limits.get(dispatch.kernel)
        if limit is not None and dispatch.threads_per_threadgroup > limit:
            return (
                f"{dispatch.kernel} launches {dispatch.threads_per_threadgroup} threads per "
                f"threadgroup but its pipeline allows {limit}"
            )
    return None


def _plan(problem, architecture, variant, reason, blocks, inputs, temps, dispatches) -> MetalPlan:
    out = ArraySpec("out", problem.output_shape, problem.dtype)
    return MetalPlan(
        problem=problem,
        architecture=architecture,
        variant=variant,
        reason=reason,
        blocks=blocks,
        inputs=inputs,
        outputs=(out,),
        temporaries=temps,
        dispatches=dispatches,
    )


def _build(problem: AttentionProblem, architecture: str, variant: Variant, override: int | None):
    """(blocks, inputs, temporaries, dispatches) of one variant."""
    inputs = _input_specs(problem, variant)
    if variant == "one_pass":
        return None, inputs, (), (_one_pass_dispatch(problem),)
    blocks = split_blocks(
        architecture, problem.kv_len, problem.gqa_factor * problem.q_len, override
    )
    b, hq, lq, dv = problem.batch, problem.q_heads, problem.q_len, problem.v_dim
    temporaries = (
        ArraySpec("partials", (b, hq, lq, blocks, dv), problem.dtype),
        ArraySpec("sums", (b, hq, lq, blocks), "float32"),
        ArraySpec("maxs", (b, hq, lq, blocks), "float32"),
    )
    return blocks, inputs, temporaries, _two_pass_dispatches(problem, blocks)


# The call's inputs in order: q, k, v, then the mask and the sinks where the call has them.
QUERIES, KEYS, VALUES = 0, 1, 2


def _mask_input(problem: AttentionProblem) -> int | None:
    return 3 if problem.has_array_mask else None


def _sinks_input(problem: AttentionProblem) -> int | None:
    return 3 + problem.has_array_mask if problem.has_sinks else None


def _input_specs(problem: AttentionProblem, variant: Variant) -> tuple[InputSpec, ...]:
    """The layouts each input must have (MLX's copy_unless checks), in the call's order."""
    inputs = [
        # sdpa_vector_2pass_1 indexes transposed queries by `num_q_heads * q_seq_idx`, which is
        # B*H only when B == 1: MLX's q_copy_unless also lets (L, B, 1, D) layouts through.
        InputSpec(
            "queries",
            "row_contiguous_or_seq_major"
            if variant == "one_pass"
            else "row_contiguous_or_seq_major_one_batch",
        ),
        InputSpec("keys", "inner_contiguous_flat_batch_heads"),  # kv_copy_unless
        InputSpec("values", "inner_contiguous_flat_batch_heads"),
    ]
    if problem.has_array_mask:
        inputs.append(InputSpec("mask", "flat_batch_heads"))  # mask_copy_unless
    if problem.has_sinks:
        inputs.append(InputSpec("sinks", "inner_contiguous"))  # is_matrix_contiguous
    return tuple(inputs)


def _qkv_buffers() -> tuple[Buffer, ...]:
    """Buffers 0-2 of both passes: the queries, keys and values."""
    return (
        ArrayBuffer(0, ArrayRef("input", QUERIES), "read", "queries"),
        ArrayBuffer(1, ArrayRef("input", KEYS), "read", "keys"),
        ArrayBuffer(2, ArrayRef("input", VALUES), "read", "values"),
    )


def _one_pass_dispatch(problem: AttentionProblem) -> Dispatch:
    """sdpa_vector: one threadgroup per (batch x query head, query token)."""
    sinks = _sinks_input(problem)
    strides = _kv_strides(KEYS, VALUES)
    buffers: list[Buffer] = [
        *_qkv_buffers(),
        ArrayBuffer(3, ArrayRef("output", 0), "write", "out"),
        BytesBuffer(4, "int32", Const(problem.gqa_factor), "gqa_factor"),
        BytesBuffer(5, "int32", Const(problem.kv_len), "N"),
        *(BytesBuffer(6 + i, "uint64", value, name) for i, (name, value) in enumerate(strides)),
        BytesBuffer(10, "float32", Param("scale"), "scale"),
        *_mask_buffers(problem, _mask_input(problem), first=11),
    ]
    if sinks is not None:
        buffers.append(ArrayBuffer(16, ArrayRef("input", sinks), "read", "sinks"))
        buffers.append(BytesBuffer(17, "int32", Const(problem.q_heads), "num_q_heads"))
    type_name = KERNEL_TYPE_NAMES[problem.dtype]
    return Dispatch(
        kernel=one_pass_name(type_name, problem.qk_dim, problem.v_dim),
        constants=_flag_constants(problem),
        buffers=tuple(buffers),
        grid=(problem.batch * problem.q_heads, problem.q_len, 1),
        threadgroup=(ONE_PASS_THREADS, 1, 1),
    )


def _two_pass_dispatches(problem: AttentionProblem, blocks: int) -> tuple[Dispatch, Dispatch]:
    """sdpa_vector_2pass_1 over `blocks` key blocks into the temporaries, then the combine."""
    sinks = _sinks_input(problem)
    strides = _kv_strides(KEYS, VALUES)
    buffers: list[Buffer] = [
        *_qkv_buffers(),
        ArrayBuffer(3, ArrayRef("temporary", 0), "write", "out"),
        ArrayBuffer(4, ArrayRef("temporary", 1), "write", "sums"),
        ArrayBuffer(5, ArrayRef("temporary", 2), "write", "maxs"),
        # buffer(6) is unused by sdpa_vector_2pass_1
        BytesBuffer(7, "int32", Const(problem.kv_len), "N"),
        *(BytesBuffer(8 + i, "uint64", value, name) for i, (name, value) in enumerate(strides)),
        BytesBuffer(12, "float32", Param("scale"), "scale"),
        *_mask_buffers(problem, _mask_input(problem), first=13),
    ]
    if sinks is not None:
        buffers.append(ArrayBuffer(18, ArrayRef("input", sinks), "read", "sinks"))
    type_name = KERNEL_TYPE_NAMES[problem.dtype]
    b, hq, lq = problem.batch, problem.q_heads, problem.q_len
    first = Dispatch(
        kernel=split_pass_name(type_name, problem.qk_dim, problem.v_dim),
        constants=(
            *_flag_constants(problem),
            FunctionConstant(FC_BLOCKS, "int32", Const(blocks), "blocks"),
        ),
        buffers=tuple(buffers),
        grid=(problem.kv_heads, b, blocks),
        threadgroup=(SIMD_WIDTH, problem.gqa_factor, lq),
    )
    combine = Dispatch(
        kernel=combine_name(type_name, problem.v_dim),
        constants=(),
        buffers=(
            ArrayBuffer(0, ArrayRef("temporary", 0), "read", "partials"),
            ArrayBuffer(1, ArrayRef("temporary", 1), "read", "sums"),
            ArrayBuffer(2, ArrayRef("temporary", 2), "read", "maxs"),
            ArrayBuffer(3, ArrayRef("output", 0), "write", "out"),
            BytesBuffer(4, "int32", Const(blocks), "blocks"),
        ),
        grid=(b * hq, lq, 1),
        threadgroup=(COMBINE_THREADS, 1, 1),
    )
    return first, combine


def _flag_constants(problem: AttentionProblem) -> tuple[FunctionConstant, ...]:
    has_mask = problem.has_array_mask
    bool_mask = problem.mask == "bool"
    # eval_gpu: `bool do_causal = do_causal_ && q.shape(2) > 1;`
    do_causal = problem.mask == "causal" and problem.q_len > 1
    return (
        FunctionConstant(FC_HAS_MASK, "bool", Const(has_mask), "has_mask"),
        FunctionConstant(FC_QUERY_TRANSPOSED, "bool", NotRowContiguous(0), "query_transposed"),
        FunctionConstant(FC_DO_CAUSAL, "bool", Const(do_causal), "do_causal"),
        FunctionConstant(FC_BOOL_MASK, "bool", Const(bool_mask), "bool_mask"),
        FunctionConstant(FC_FLOAT_MASK, "bool", Const(has_mask and not bool_mask), "float_mask"),
        FunctionConstant(FC_HAS_SINKS, "bool", Const(problem.has_sinks), "has_sinks"),
    )


def _kv_strides(k: int, v: int) -> tuple[tuple[str, Value], ...]:
    # `k.shape(1) == 1 ? k.strides(0) : k.strides(1)` and `k.strides()[2]`, as size_t.
    return (
        ("k_head_stride", StrideOf(k, (1, 0), "last")),
        ("k_seq_stride", StrideOf(k, (2,), "last")),
        ("v_head_stride", StrideOf(v, (1, 0), "last")),
        ("v_seq_stride", StrideOf(v, (2,), "last")),
    )


def _mask_buffers(problem: AttentionProblem, mask: int | None, first: int) -> list[Buffer]:
    if mask is None:
        return []
    float_mask = problem.mask == "additive"
    return [
        # `set_input_array(m, 11 + float_mask)`: bmask at `first`, fmask at `first + 1`
        ArrayBuffer(
            first + float_mask, ArrayRef("input", mask), "read", "fmask" if float_mask else "bmask"
        ),
        # `m.shape(3) > 1 ? m.strides(3) : 0`, `m.shape(2) > 1 ? m.strides(2) : 0`,
        # `m.shape(1) > 1 ? m.strides(1) : (m.shape(0) > 1 ? m.strides(0) : 0)`, as int32
        BytesBuffer(first + 2, "int32", StrideOf(mask, (3,), "zero"), "mask_kv_seq_stride"),
        BytesBuffer(first + 3, "int32", StrideOf(mask, (2,), "zero"), "mask_q_seq_stride"),
        BytesBuffer(first + 4, "int32", StrideOf(mask, (1, 0), "zero"), "mask_head_stride"),
    ]


# --------------------------------------------------------------------------------------------
# The wire format of `aotc._ext.metal_launch` (version 1).
# --------------------------------------------------------------------------------------------

WIRE_VERSION = 1


def _wire(plan: MetalPlan, values: Mapping[str, float | int]) -> dict:
    return {
        "version": WIRE_VERSION,
        "inputs": [{"name": i.name, "layout": i.layout} for i in plan.inputs],
        "outputs": [_spec_wire(s) for s in plan.outputs],
        "temporaries": [_spec_wire(s) for s in plan.temporaries],
        "dispatches": [_dispatch_wire(d, values) for d in plan.dispatches],
    }


def _spec_wire(spec: ArraySpec) -> dict:
    return {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}


def _dispatch_wire(dispatch: Dispatch, params: Mapping[str, float | int]) -> dict:
    return {
        "kernel": dispatch.kernel,
        "constants": [constant_wire(c, params) for c in dispatch.constants],
        "buffers": [_buffer_wire(b, params) for b in dispatch.buffers],
        "grid": list(dispatch.grid),
        "threadgroup": list(dispatch.threadgroup),
    }


def constant_wire(constant: FunctionConstant, params: Mapping[str, float | int]) -> dict:
    value = value_wire(constant.value, params)
    return {"index": constant.index, "type": constant.type, "value": value}


def _buffer_wire(buffer: Buffer, params: Mapping[str, float | int]) -> dict:
    if isinstance(buffer, ArrayBuffer):
        ref = buffer.array
        return {"index": buffer.index, "array": [ref.kind, ref.index], "access": buffer.access}
    value = value_wire(buffer.value, params)
    return {"index": buffer.index, "type": buffer.type, "value": value}


def value_wire(value: Value, params: Mapping[str, float | int]) -> Any:
    if isinstance(value, Const):
        return value.value
    if isinstance(value, Param):
        return params[value.name]
    if isinstance(value, StrideOf):
        return {"stride_of": value.input, "axes": list(value.axes), "singleton": value.singleton}
    return {"not_row_contiguous": value.input}


# --------------------------------------------------------------------------------------------
# Running a plan (macOS with a Metal GPU and aotc._ext built with AOTC_WITH_METAL).
# --------------------------------------------------------------------------------------------


def metal_binding() -> Any:
    """`aotc._ext` when it has the Metal primitive; Unsupported (with the reason) otherwise."""
    try:
        from aotc import _ext  # type: ignore[attr-defined]
    except ImportError as exc:
        raise Unsupported(f"the extension aotc._ext is not importable: {exc}") from None
    if not hasattr(_ext, "metal_launch"):
        raise Unsupported("aotc._ext was built without the Metal primitive (AOTC_WITH_METAL)")
    return _ext


def run_metal(
    plan: MetalPlan,
    arrays: Sequence[Any],
    library_path: str | os.PathLike[str],
    *,
    params: Mapping[str, float | int] | None = None,
    stream: Any = None,
) -> list[Any]:
    """Launch `plan` from the metallib at `library_path`; `arrays` match `plan.inputs` in order.

    Returns the outputs (`plan.outputs`), lazily: MLX evaluates them like any other array.
    """
    if len(arrays) != len(plan.inputs):
        names = [i.name for i in plan.inputs]
        raise ValueError(f"the plan takes {len(names)} inputs {names}, got {len(arrays)}")
    ext = metal_binding()
    program = plan.program(ext, params)
    return ext.metal_launch(str(library_path), list(arrays), program, stream=stream)


def probe_pipeline_limits(
    problem: AttentionProblem,
    architecture: str,
    library_path: str | os.PathLike[str],
    *,
    blocks_override: int | None = None,
    probe: Callable[[str, str, list[dict]], int] | None = None,
) -> dict[str, int]:
    """`maxTotalThreadsPerThreadgroup` of every pipeline either variant would use.

    The probe builds each pipeline with the plan's graph-time constants (queries taken as
    row-contiguous); MLX caches it under the name the launch uses for the same constants.
    """
    if probe is None:
        ext = metal_binding()

        def probe(path: str, kernel: str, constants: list[dict]) -> int:
            return int(ext.metal_max_threads(path, kernel, constants))

    path = str(library_path)
    limits: dict[str, int] = {}
    for variant in ("one_pass", "split_pass"):
        *_, dispatches = _build(problem, architecture, variant, blocks_override)
        for dispatch in dispatches:
            constants = [
                {"index": c.index, "type": c.type, "value": _probe_value(c.value)}
                for c in dispatch.constants
            ]
            limits[dispatch.kernel] = probe(path, dispatch.kernel, constants)
    return limits


def _probe_value(value: Value) -> bool | int | float:
    if isinstance(value, Const):
        return value.value
    if isinstance(value, NotRowContiguous):
        return False
    raise ValueError(f"a function constant cannot be {value}")


def prepare_inputs(
    problem: AttentionProblem, q: Any, k: Any, v: Any, mask: Any = None, sinks: Any = None
) -> list[Any]:
    """The primitive's inputs as MLX's op builds them (`fast.cpp`): an array mask in the output
    dtype (bool masks stay bool) broadcast to (B, H, L, N); sinks in the output dtype."""
    import mlx.core as mx

    arrays = [q, k, v]
    if problem.has_array_mask:
        m = mask if problem.mask == "bool" else mask.astype(q.dtype)
        arrays.append(mx.broadcast_to(m, problem.scores_shape))
    if problem.has_sinks:
        arrays.append(sinks.astype(q.dtype))
    return arrays


def device_architecture() -> str:
    """The architecture MLX's heuristics read (`MLX_METAL_GPU_ARCH` overrides it, as in MLX)."""
    ext = metal_binding()
    return str(ext.metal_architecture())


def env_blocks() -> int | None:
    """MLX's `MLX_SDPA_BLOCKS` override of the split pass's block count (0 or unset: none)."""
    try:
        value = int(os.environ.get("MLX_SDPA_BLOCKS", "0"))
    except ValueError:
        return None
    return value if value > 0 else None


def find_library(kernel_names: Iterable[str]) -> str:
    """The metallib of the first usable loaded Metal library that has every kernel named (the
    registry's search order: `aotc.load`, `AOTC_PATH`, wheels, app bundles), checksum checked."""
    from aotc.runtime import libraries as registry

    wanted = sorted(set(kernel_names))
    library = registry.find("metal", wanted)
    if library is None:
        raise Unsupported(f"no usable Metal library has {wanted}")
    try:
        library.artifact_bytes()  # checks the sha256 the index records (once per process)
    except registry.CorruptArtifact as exc:
        raise Unsupported(str(exc)) from None
    return str(library.index.artifact_path)


def make_runner(problem: AttentionProblem, *, library_path: str | None = None) -> Runner:
    """A function `(q, k, v, scale, mask, sinks) -> out` running `problem` on the Metal GPU.

    Raises Unsupported (the caller falls back to MLX's op and logs the reason) when the extension
    has no Metal primitive, no loaded library has the kernels, or no variant fits the pipelines.
    """
    check_problem(problem)
    architecture = device_architecture()
    override = env_blocks()
    if library_path is None:
        names: set[str] = set()
        for variant in ("one_pass", "split_pass"):
            *_, dispatches = _build(problem, architecture, variant, override)
            names.update(d.kernel for d in dispatches)
        library_path = find_library(names)
    try:
        limits = probe_pipeline_limits(
            problem, architecture, library_path, blocks_override=override
        )
    except (RuntimeError, ValueError) as exc:  # MLX could not load the library or a function
        raise Unsupported(f"the Metal pipelines could not be built: {exc}") from None
    chosen = plan_attention(
        problem, architecture, pipeline_max_threads=limits, blocks_override=override
    )
    path = str(library_path)

    def run(q, k, v, scale, mask=None, sinks=None):
        arrays = prepare_inputs(problem, q, k, v, mask, sinks)
        return run_metal(chosen, arrays, path, params={"scale": float(scale)})[0]

    run.plan = chosen  # type: ignore[attr-defined]
    return run
