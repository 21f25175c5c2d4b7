"""`aotc.sdpa_vector` and `aotc.patch`: MLX's fused attention, served by prebuilt kernels.

A call is described once per distinct (shapes, dtypes, mask, sinks, device): the decision (which
library, which kernels, or why MLX's own op must run instead) is cached. Where the decision is a
native plan (CUDA), it is also filed in the extension's CallTable under the call's signature and
scale, so the hot path of a decode step is one call into C++: the lookup and the launches. A
fallback decision files MLX's own op there the same way (see `_file_fallback`).
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import mlx.core as mx

from aotc.errors import AotcError
from aotc.families.sdpa_vector.problem import AttentionProblem, Unsupported, describe

log = logging.getLogger("aotc")

Runner = Callable[..., mx.array]
_MLX_SDPA = mx.fast.scaled_dot_product_attention
_CACHE_LIMIT = 4096
_decisions: dict[tuple, Runner | str] = {}
_lock = threading.Lock()


def _call_table() -> Any:
    """The extension's CallTable, or None where the extension does not load: the table only
    speeds up calls, so a missing or broken extension leaves every call deciding in Python
    (and a CUDA decision then says why the extension is unusable)."""
    from aotc.runtime.cuda import extension

    try:
        return extension().CallTable(_CACHE_LIMIT)
    except Exception as exc:
        log.debug("aotc.sdpa_vector runs without the native call table: %s", exc)
        return None


_native_calls = _call_table()


def _fallback_call_type() -> Any:
    """The extension's MlxAttentionCall (MLX's op as a native call), or None without one."""
    from aotc.runtime.cuda import extension

    try:
        return extension().MlxAttentionCall
    except Exception:  # no extension, or one built before it: fallbacks decide in Python
        return None


_MlxAttentionCall = _fallback_call_type() if _native_calls is not None else None


def sdpa_vector(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    scale: float,
    mask: mx.array | str | None = None,
    sinks: mx.array | None = None,
    stream: Any = None,
) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` for short queries, on aotc's prebuilt kernels.

    Falls back to MLX's own op (with the reason in the `aotc` debug log) when no loaded library
    has the instantiation, or the inputs are outside what the kernels do. Gradients flow through
    MLX's own op: the backward pass of a prebuilt forward is MLX's.
    """
    if stream is None and _native_calls is not None:
        out = _native_calls(q, k, v, mask, sinks, scale)
        if out is not None:
            return out
    decision = _decide(q, k, v, mask, sinks, stream)
    if isinstance(decision, str):
        debug = log.isEnabledFor(logging.DEBUG)
        if debug:
            log.debug("aotc.sdpa_vector falls back to MLX: %s", decision)
        out = _MLX_SDPA(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream)
        if not debug:  # each logged fallback decides again, so that each logs its reason
            _file_fallback(q, k, v, mask, sinks, scale, stream)
        return out
    plan = getattr(decision, "plan", None)  # runners with native plans (CUDA) have one
    if plan is None:
        return decision(q, k, v, scale, mask, sinks)
    native = plan(scale)
    _file(native, q, k, v, mask, sinks, scale, stream)
    return native(q, k, v, mask, sinks, scale)


def _file(native, q, k, v, mask, sinks, scale, stream) -> None:
    """Serve later calls of this signature by the native call `native` straight from the table
    (calls with an explicit stream skip the table)."""
    if stream is None and _native_calls is not None:
        _native_calls.add(native, q, k, v, mask, sinks, scale)


def _file_fallback(q, k, v, mask, sinks, scale, stream) -> None:
    """File MLX's op for this fallback's signature, where the extension has it.

    Called once MLX's op has accepted the call (a mask string it rejects raised before)."""
    if _MlxAttentionCall is not None:
        mode = mask if isinstance(mask, str) else ""
        _file(_MlxAttentionCall(scale, mode), q, k, v, mask, sinks, scale, stream)


def fallback_reason(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    mask: mx.array | str | None = None,
    sinks: mx.array | None = None,
    stream: Any = None,
) -> str | None:
    """Why `sdpa_vector` would call MLX's own op for these arguments; None when aotc serves them."""
    decision = _decide(q, k, v, mask, sinks, stream)
    return decision if isinstance(decision, str) else None


def _decide(q, k, v, mask, sinks, stream) -> Runner | str:
    key = _cache_key(q, k, v, mask, sinks, stream)
    decision = _decisions.get(key)
    if decision is None:
        decision = _make_decision(q, k, v, mask, sinks, stream)
        with _lock:
            if len(_decisions) >= _CACHE_LIMIT:
                _decisions.clear()
            _decisions[key] = decision
    return decision


def _cache_key(q, k, v, mask, sinks, stream) -> tuple:
    mask_key = mask if mask is None or isinstance(mask, str) else (mask.shape, mask.dtype)
    sinks_key = None if sinks is None else (sinks.shape, sinks.dtype)
    # MLX's Device and Stream compare by value but hash by identity: the default device is
    # keyed by its type (one GPU per MLX process), a stream by its text (a rare path)
    device = mx.default_device().type if stream is None else str(stream)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, mask_key, sinks_key, device)


def _make_decision(q, k, v, mask, sinks, stream) -> Runner | str:
    try:
        backend = _backend(stream)
        problem = describe(q, k, v, mask, sinks)
        return _BACKENDS[backend](problem)
    except (Unsupported, AotcError) as exc:  # AotcError: e.g. a corrupt artifact, already warned
        return str(exc)


def with_mlx_gradient(forward: Runner) -> Runner:
    """`forward` for the values, MLX's own op for the gradients (aotc kernels have no backward).

    One `mx.custom_function` per (scale, mask mode, sinks), taking arrays positionally: its
    per-call cost is about a microsecond, where keyword arguments cost tens.
    """
    functions: dict[tuple, Callable[..., mx.array]] = {}

    def run(q, k, v, scale, mask, sinks):
        array_mask = mask is not None and not isinstance(mask, str)
        key = (scale, None if array_mask else mask, array_mask, sinks is not None)
        function = functions.get(key)
        if function is None:
            function = functions.setdefault(key, _differentiable(forward, *key))
        arrays = [q, k, v]
        if array_mask:
            arrays.append(mask)
        if sinks is not None:
            arrays.append(sinks)
        return function(*arrays)

    return run


def _differentiable(forward: Runner, scale, mask_mode, array_mask, has_sinks):
    def unpack(arrays):
        q, k, v, *rest = arrays
        mask = rest.pop(0) if array_mask else mask_mode
        sinks = rest.pop(0) if has_sinks else None
        return q, k, v, mask, sinks

    @mx.custom_function
    def attention(*arrays):
        return forward(*unpack(arrays)[:3], scale, *unpack(arrays)[3:])

    @attention.vjp
    def attention_vjp(primals, cotangent, output):
        return tuple(_mlx_op_gradients(scale, *unpack(primals), cotangent))

    return attention


def _mlx_op_gradients(scale, q, k, v, mask, sinks, cotangent) -> list:
    """The cotangents MLX's own op gives q, k, v, then an array mask (zeros) and the sinks,
    where the call has them: the backward pass of every prebuilt forward."""

    def reference(q, k, v, *maybe_sinks):
        return _MLX_SDPA(
            q, k, v, scale=scale, mask=mask, sinks=maybe_sinks[0] if maybe_sinks else None
        )

    differentiable = [q, k, v] + ([] if sinks is None else [sinks])
    _, grads = mx.vjp(reference, differentiable, [cotangent])
    result = list(grads[:3])
    if mask is not None and not isinstance(mask, str):
        result.append(mx.zeros_like(mask))
    if sinks is not None:
        result.append(grads[3])
    return result


def _backend(stream: Any) -> str:
    """The GPU backend serving the call; aotc launches go to the default GPU stream."""
    device = _device_of(stream)
    if device != mx.gpu:
        raise Unsupported(f"the call runs on {stream or mx.default_device()}, not a GPU")
    if isinstance(stream, mx.Stream) and stream != mx.default_stream(mx.default_device()):
        raise Unsupported(f"aotc launches on the default GPU stream, not {stream}")
    if _available("cuda"):
        return "cuda"
    if _available("metal"):
        return "metal"
    raise Unsupported("this MLX has neither a CUDA nor a Metal GPU backend")


def _device_of(stream: Any) -> Any:
    """The DeviceType of `stream` as MLX's `stream=` argument allows it (None, type, device)."""
    if stream is None:
        return mx.default_device().type
    if isinstance(stream, mx.DeviceType):
        return stream
    return getattr(stream, "device", stream).type


def _available(backend: str) -> bool:
    module = getattr(mx, backend, None)
    return bool(module is not None and module.is_available())


def _cuda_runner(problem: AttentionProblem) -> Runner:
    from aotc.families.sdpa_vector import cuda
    from aotc.runtime.cuda import (
        extension,
        has_cuda,
        load_image,
        sass_runs_on,
        unavailable_reason,
        wgmma_runs,
    )

    if not has_cuda():
        raise Unsupported(f"aotc's CUDA launch primitive is unavailable: {unavailable_reason()}")
    library = _library_for("cuda", problem)
    device = str(mx.device_info().get("architecture", ""))
    archs = library.index.data.get("options", {}).get("archs", [])
    if not any(sass_runs_on(arch, device) for arch in archs):
        # The fatbin's PTX is one image per unit; the driver would JIT only one of them.
        raise Unsupported(f"{library.name} has SASS for {', '.join(archs)}, none for {device}")
    return cuda.CudaRunner(
        problem,
        prepare=partial(extension().PreparedLaunch, load_image(library)),
        available=library.kernel_names,
        dtype=partial(getattr, mx),
        gradient=mlx_gradients,
        wgmma=wgmma_runs(archs, device),
    )


def mlx_gradients(
    scale: float,
    mask_mode: str | None,
    array_mask: bool,
    has_sinks: bool,
    *,
    qkv_inline: bool = False,
):
    """Gradients of a launched call, computed by MLX's own op: (last launch, other launches).

    The last launch returns the whole call's gradient for q, k, v: its first three inputs when
    `qkv_inline` (a one-launch plan), else gradient-only inputs appended to it; the mask and
    sinks follow as gradient-only inputs. Every other input gets zeros, so the intermediates of
    a split pass add nothing. The call's output is the last launch's last output (the fused
    split pass also returns its scratch before it).
    """
    extras = (0 if qkv_inline else 3) + array_mask + has_sinks

    def last(primals, cotangents):
        n_kernel = len(primals) - extras
        kernel_inputs, rest = primals[:n_kernel], list(primals[n_kernel:])
        q, k, v = kernel_inputs[:3] if qkv_inline else (rest.pop(0), rest.pop(0), rest.pop(0))
        mask = rest.pop(0) if array_mask else mask_mode
        sinks = rest.pop(0) if has_sinks else None
        grads = _mlx_op_gradients(scale, q, k, v, mask, sinks, cotangents[-1])
        result = [mx.zeros_like(x) for x in kernel_inputs]
        if qkv_inline:  # q, k, v are the kernel's first inputs; mask and sinks follow them
            result[:3], grads = grads[:3], grads[3:]
        return result + grads

    def others(primals, cotangents):
        return [mx.zeros_like(x) for x in primals]

    return last, others


def _library_for(target: str, problem: AttentionProblem):
    """The first usable library (search order) with this instantiation's one-pass kernel."""
    from aotc.families.base import KERNEL_TYPE_NAMES
    from aotc.families.sdpa_vector import one_pass_name
    from aotc.runtime.libraries import find, libraries

    name = one_pass_name(KERNEL_TYPE_NAMES[problem.dtype], problem.qk_dim, problem.v_dim)
    library = find(target, [name])
    if library is None:
        unusable = [lib for lib in libraries() if lib.target == target and name in lib.kernel_names]
        if unusable:  # built for this call, but not for this MLX or machine: worth a warning
            why = "; ".join(f"{lib.path}: {', '.join(lib.problems)}" for lib in unusable)
            warnings.warn(f"aotc falls back to MLX for {name}: {why}", RuntimeWarning, 2)
        raise Unsupported(f"no usable {target} library has {name}")
    return library


def _metal_runner(problem: AttentionProblem) -> Runner:
    from aotc.families.sdpa_vector import metal

    return with_mlx_gradient(metal.make_runner(problem))


_BACKENDS: dict[str, Callable[[AttentionProblem], Runner]] = {
    "cuda": _cuda_runner,
    "metal": _metal_runner,
}


def clear_cache() -> None:
    """Forget cached decisions (after `aotc.load()` adds a library, for instance)."""
    with _lock:
        _decisions.clear()
        if _native_calls is not None:
            _native_calls.clear()


def _patched_sdpa(q, k, v, *, scale, mask=None, sinks=None, stream=None, **kwargs):
    if kwargs:  # arguments of a newer MLX that aotc does not know: let MLX handle them
        return _MLX_SDPA(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream, **kwargs)
    return sdpa_vector(q, k, v, scale=scale, mask=mask, sinks=sinks, stream=stream)


def patch() -> None:
    """Route `mx.fast.scaled_dot_product_attention` through aotc (mlx-lm models use it as is)."""
    mx.fast.scaled_dot_product_attention = _patched_sdpa


def unpatch() -> None:
    mx.fast.scaled_dot_product_attention = _MLX_SDPA


@contextmanager
def patched() -> Iterator[None]:
    """`with aotc.patched(): ...` routes MLX's fused attention through aotc inside the block."""
    previous = mx.fast.scaled_dot_product_attention
    patch()
    try:
        yield
    finally:
        mx.fast.scaled_dot_product_attention = previous
