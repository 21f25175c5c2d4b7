"""Run aotc's CUDA sdpa_vector kernels on torch tensors, without MLX.

Builds a fatbin from `kernels/cuda/sdpa_vector.cuh` with nvcc, loads it through the CUDA driver
API (ctypes on libcuda.so.1) in torch's context, and executes the launches of `plan_cuda`
through `run_cuda` with a torch `launch_fn`, packing the Params exactly as the MLX primitive
does (the strides of the strided inputs, then the plan's bytes).
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
from pathlib import Path

import torch

from aotc.families.sdpa_vector.cuda import TYPICAL_SM_COUNTS, Launch, plan_cuda, run_cuda
from aotc.families.sdpa_vector.problem import AttentionProblem, MaskKind
from bench.build_harness import build_fatbin, image_arch, kernel_names, plan_arch  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels" / "cuda"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9
# A measurement hook: the shared-memory carveout (percent) every kernel prefers; unset, the
# driver's default.
CARVEOUT = os.environ.get("AOTC_HARNESS_CARVEOUT")
# CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION of cuda.h
CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
# A measurement hook: "0" plans and launches as MLX does, with no programmatic dependent launch.
PDL = os.environ.get("AOTC_HARNESS_PDL", "1") != "0"


class _LaunchAttribute(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_memory", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


# CU_TENSOR_MAP_DATA_TYPE_FLOAT16, _BFLOAT16, _FLOAT32 of cuda.h
CU_TENSOR_MAP_DATA_TYPES = {torch.float16: 6, torch.bfloat16: 9, torch.float32: 7}


class Library:
    """Fatbins loaded into the current (torch) CUDA context."""

    def __init__(self, fatbin_list: Path):
        torch.cuda.init()
        torch.empty(1, device="cuda")  # make torch's primary context current
        self.cuda = ctypes.CDLL("libcuda.so.1")
        self.functions: dict[str, ctypes.c_void_p] = {}
        self.modules = []
        fatbin_list = Path(fatbin_list)
        for line in fatbin_list.read_text().split():
            data = (fatbin_list.parent / line).read_bytes()
            module = ctypes.c_void_p()
            self._check(self.cuda.cuModuleLoadData(ctypes.byref(module), data), "cuModuleLoadData")
            self.modules.append((module, data))
        major, minor = torch.cuda.get_device_capability(0)
        self.arch = image_arch([data for _, data in self.modules], major * 10 + minor)
        # Plans for the image's arch, with that arch's usual SM count where it is not this GPU's
        # (a compute_80 image is planned as for an A100: the grids one would run).
        self.plan_arch = plan_arch(self.arch)
        self.plan_sm_count = (
            None
            if self.plan_arch == f"sm_{major}{minor}"
            else TYPICAL_SM_COUNTS.get(self.plan_arch)
        )
        self._smem_set: dict[str, int] = {}
        # False: plan without the wgmma kernel (baselines, comparisons). It only runs from an
        # sm_90a image on an sm_90 GPU.
        self.wgmma_ok = self.arch == "sm_90a"
        self.fused_ok = True  # False: split plans take the separate combine kernel
        self.poison = False  # fill outputs with NaN before each launch (tests)
        self.tma = True  # False: leave tensor maps unencoded (kernels take their cp.async path)
        self.last_maps_ok: int | None = None  # the bit word of the last launch with tensor maps
        self.last_kernel: str | None = None  # the kernel the last launch ran (its alternative?)
        self.alternatives_taken = 0  # launches that took their view alternative
        # Inputs (by index) whose strides are packed as zeros (tests): a kernel that reads such
        # an input through its tensor map still gets it right, any other read gets row 0.
        self.zero_strides: set[int] = set()
        # Plan overlapping launches (plan_cuda's `overlap`) and launch them with programmatic
        # dependent launch (Launch.overlaps_previous); False: plain launches, MLX's plans.
        self.pdl = PDL

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.cuda.cuGetErrorName(rc, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {rc} {name.value}")

    def function(self, name: str) -> ctypes.c_void_p:
        fn = self.functions.get(name)
        if fn is None:
            for module, _ in self.modules:
                fn = ctypes.c_void_p()
                if self.cuda.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()) == 0:
                    break
                fn = None
            if fn is None:
                raise KeyError(name)
            self.functions[name] = fn
        return fn

    def names(self) -> set[str]:
        found = set()
        for module, _ in self.modules:
            count = ctypes.c_uint()
            if self.cuda.cuModuleGetFunctionCount(ctypes.byref(count), module) != 0:
                continue
            arr = (ctypes.c_void_p * count.value)()
            self.cuda.cuModuleEnumerateFunctions(arr, count, module)
            for f in arr:
                nm = ctypes.c_char_p()
                self.cuda.cuFuncGetName(ctypes.byref(nm), ctypes.c_void_p(f))
                found.add(nm.value.decode())
        return found

    def launch_fn(
        self,
        kernel,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        block,
        shared_memory,
        params,
        strided_input_indices,
        tensor_maps=(),
        overlaps_previous=False,
        view_alternative=None,
    ):
        strides = b"".join(
            struct.pack("@4q", *((0,) * 4 if i in self.zero_strides else inputs[i].stride()))
            for i in strided_input_indices
        )
        blob = strides + params
        all_maps = True
        if tensor_maps:
            blob += self._tensor_maps(inputs, tensor_maps, len(blob))
            all_maps = self.last_maps_ok == (1 << len(tensor_maps)) - 1
        blob += bytes(-len(blob) % 16)  # the kernel's Params may end in alignment padding
        if view_alternative and all_maps:
            alt_kernel, alt_block, alt_smem, view, base = view_alternative
            if _is_prefix_view(inputs[view], inputs[base]):
                kernel, block, shared_memory = alt_kernel, alt_block, alt_smem
                self.alternatives_taken += 1
        self.last_kernel = kernel
        fn = self.function(kernel)
        if self._smem_set.get(kernel, 0) < shared_memory:
            self._check(
                self.cuda.cuFuncSetAttribute(
                    fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, int(shared_memory)
                ),
                "cuFuncSetAttribute",
            )
            self._smem_set[kernel] = shared_memory
            if CARVEOUT is not None:
                self._check(
                    self.cuda.cuFuncSetAttribute(
                        fn, CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, int(CARVEOUT)
                    ),
                    "cuFuncSetAttribute",
                )
        outputs = [
            torch.empty(shape, dtype=DTYPES[dt], device="cuda")
            for shape, dt in zip(output_shapes, output_dtypes, strict=True)
        ]
        if self.poison:
            for out in outputs:
                out.fill_(float("nan") if out.is_floating_point() else -1)
        buf = ctypes.create_string_buffer(blob, len(blob))
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (*inputs, *outputs)]
        args = (ctypes.c_void_p * (len(ptrs) + 1))()
        for i, ptr in enumerate(ptrs):
            args[i] = ctypes.cast(ctypes.pointer(ptr), ctypes.c_void_p)
        args[len(ptrs)] = ctypes.cast(buf, ctypes.c_void_p)
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        # Programmatic dependent launch: the kernel may start while the one before it runs.
        attr = _LaunchAttribute(id=CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value = struct.pack("@i", 1) + bytes(60)
        overlap = overlaps_previous and self.pdl
        config = _LaunchConfig(
            (ctypes.c_uint * 3)(*grid),
            (ctypes.c_uint * 3)(*block),
            shared_memory,
            stream,
            ctypes.pointer(attr),
            int(overlap),
        )
        self._check(
            self.cuda.cuLaunchKernelEx(ctypes.byref(config), fn, args, None),
            f"cuLaunchKernelEx {kernel}",
        )
        return outputs

    def _tensor_maps(self, inputs, maps, offset: int) -> bytes:
        """Padding to 64 bytes, the encoded maps, and the word of which were encoded: the
        launch contract's tail of Params (docs/ARCHITECTURE.md), as the MLX primitive packs it."""
        out = bytearray(-offset % 64)
        ok = 0
        for i, (index, *box) in enumerate(maps):
            encoded = self._encode(inputs[index], box) if self.tma else None
            ok |= (encoded is not None) << i
            out += encoded or bytes(128)
        out += struct.pack("@I", ok)
        self.last_maps_ok = ok
        return bytes(out + bytes(-(offset + len(out)) % 64))  # to 64 bytes from Params' start

    def _encode(self, t: torch.Tensor, box: list[int]) -> bytes | None:
        """`t`'s tiled map in boxes of `box` (innermost first; 1 on the other dimensions)."""
        dtype = CU_TENSOR_MAP_DATA_TYPES[t.dtype]
        if t.stride(-1) != 1:
            return None
        size = t.element_size()
        dims = list(reversed(t.shape))
        strides, largest = [], size * dims[0]
        for dim, stride in zip(dims[1:], reversed(t.stride()[:-1]), strict=True):
            # A dimension of one is never stepped: any legal stride does.
            nbytes = stride * size if dim > 1 else -(-largest // 16) * 16
            strides.append(nbytes)
            largest = max(largest, nbytes)
        rank = len(dims)
        if any(n > 1 for n in box[rank:]):
            return None  # a box dimension the array does not have (as cuda_launch.cpp)
        box = (list(box) + [1] * rank)[:rank]
        u64, u32 = ctypes.c_uint64, ctypes.c_uint32
        out = (ctypes.c_uint64 * 16)()
        rc = self.cuda.cuTensorMapEncodeTiled(
            out,
            ctypes.c_int(dtype),
            u32(rank),
            ctypes.c_void_p(t.data_ptr()),
            (u64 * rank)(*dims),
            (u64 * max(rank - 1, 1))(*strides),
            (u32 * rank)(*box),
            (u32 * rank)(*([1] * rank)),
            ctypes.c_int(0),  # no interleave
            ctypes.c_int(3),  # 128-byte swizzle
            ctypes.c_int(3),  # L2 promotion 256 B
            ctypes.c_int(0),  # out-of-bounds elements read as zeros
        )
        return bytes(out) if rc == 0 else None


def _is_prefix_view(view: torch.Tensor, base: torch.Tensor) -> bool:
    """The launch contract's view condition (cuda_launch.cpp's is_prefix_view): the same
    address, type, dimensions and strides, the innermost dimension no longer."""
    return (
        view.dim() == base.dim() > 0
        and view.dtype == base.dtype
        and view.data_ptr() == base.data_ptr()
        and view.stride() == base.stride()
        and view.shape[:-1] == base.shape[:-1]
        and view.shape[-1] <= base.shape[-1]
    )


def load_library(listing: str | Path | None = None) -> Library:
    """The kernels of a fatbin list (`bench.variants` builds them), or by default the harness
    fatbin `python3 -m bench.build_harness .gpu/sdpa` last built."""
    if listing is None:
        folder = Path(".gpu/sdpa")
        listing = folder / (folder / "current").read_text().strip()
    return Library(Path(listing))


def problem_of(q, k, v, mask=None, sinks=None) -> AttentionProblem:
    b, hq, lq, d = q.shape
    _, hkv, n, _ = k.shape
    kind: MaskKind
    if mask is None:
        kind = "none"
    elif isinstance(mask, str):
        kind = "causal"
    else:
        kind = "bool" if mask.dtype == torch.bool else "additive"
    return AttentionProblem(
        batch=b,
        q_heads=hq,
        kv_heads=hkv,
        q_len=lq,
        kv_len=n,
        qk_dim=d,
        v_dim=v.shape[-1],
        dtype=DTYPE_NAMES[q.dtype],
        mask=kind,
        mask_shape=None if mask is None or isinstance(mask, str) else tuple(mask.shape),
        has_sinks=sinks is not None,
    )


def plan_for(
    lib: Library, q, k, v, mask=None, sinks=None, *, scale, num_splits=None, sm_count=None
):
    problem = problem_of(q, k, v, mask, sinks)
    if sm_count is None:
        sm_count = lib.plan_sm_count or torch.cuda.get_device_properties(0).multi_processor_count
    names = lib.names() or set(lib.functions)
    if not lib.fused_ok:
        names = {name for name in names if "_2pass_fused_" not in name}
    return plan_cuda(
        problem,
        available=names,
        sm_count=sm_count,
        scale=scale,
        arch=lib.plan_arch,
        num_splits=num_splits,
        wgmma=lib.wgmma_ok,
        overlap=lib.pdl,
    )


def run(
    lib: Library,
    q,
    k,
    v,
    mask=None,
    sinks=None,
    *,
    scale,
    launches: list[Launch] | None = None,
    num_splits=None,
):
    if launches is None:
        launches = plan_for(lib, q, k, v, mask, sinks, scale=scale, num_splits=num_splits)
    arrays = {"q": q, "k": k, "v": v}
    if mask is not None and not isinstance(mask, str):
        b, hq, lq, _ = q.shape
        arrays["mask"] = torch.broadcast_to(mask, (b, hq, lq, k.shape[2]))
    if sinks is not None:
        arrays["sinks"] = sinks.to(q.dtype)
    return run_cuda(launches, arrays, lib.launch_fn)


def reference(q, k, v, mask=None, sinks=None, *, scale):
    """MLX's fallback semantics in float64 on the GPU."""
    dt = torch.float64
    b, hq, lq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    qf = q.to(dt).reshape(b, hkv, g, lq, d)
    kf, vf = k.to(dt)[:, :, None], v.to(dt)[:, :, None]
    scores = (qf * scale) @ kf.transpose(-1, -2)  # b, hkv, g, lq, n
    minval = torch.finfo(q.dtype).min
    if isinstance(mask, str):
        qi = torch.arange(n - lq, n, device=q.device)[:, None]
        kj = torch.arange(n, device=q.device)[None]
        keep = qi >= kj
        scores = torch.where(keep, scores, torch.tensor(minval, dtype=dt, device=q.device))
    elif mask is not None:
        m = torch.broadcast_to(mask, (b, hq, lq, n)).reshape(b, hkv, g, lq, n)
        if m.dtype == torch.bool:
            scores = torch.where(m, scores, torch.tensor(minval, dtype=dt, device=q.device))
        else:
            scores = scores + m.to(dt)
    if sinks is not None:
        s = sinks.to(q.dtype).to(dt).reshape(1, hkv, g, 1, 1).expand(b, hkv, g, lq, 1)
        scores = torch.cat([s, scores], dim=-1)
    probs = torch.softmax(scores, dim=-1)
    if sinks is not None:
        probs = probs[..., 1:]
    out = probs @ vf
    return out.reshape(b, hq, lq, v.shape[-1])


def rel_err(out, ref) -> float:
    out = out.to(torch.float64)
    return float(
        torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30)
    )


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)
