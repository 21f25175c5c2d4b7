"""An attention call described by its arguments: the input of every target's launch plan.

Only shapes and dtypes are read here (they are known when the graph is built); strides are read
by the launch primitives at evaluation time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

MaskKind = Literal["none", "causal", "bool", "additive"]

# mx.Dtype names as the manifest spells them.
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32")


class Unsupported(Exception):
    """The call is outside what the prebuilt kernels do; the reason goes to the debug log."""


@dataclass(frozen=True)
class AttentionProblem:
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    qk_dim: int
    v_dim: int
    dtype: str
    mask: MaskKind
    mask_shape: tuple[int, ...] | None
    has_sinks: bool

    @property
    def gqa_factor(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.q_heads, self.q_len, self.v_dim)

    @property
    def scores_shape(self) -> tuple[int, int, int, int]:
        """What an array mask broadcasts to."""
        return (self.batch, self.q_heads, self.q_len, self.kv_len)

    @property
    def has_array_mask(self) -> bool:
        return self.mask in ("bool", "additive")


def dtype_name(dtype: Any) -> str:
    """`mlx.core.float16` -> `"float16"` without importing mlx here."""
    return str(dtype).rsplit(".", 1)[-1]


def describe(q: Any, k: Any, v: Any, mask: Any = None, sinks: Any = None) -> AttentionProblem:
    """Read the problem from MLX arrays (anything with `.shape` and `.dtype`); raise Unsupported."""
    for name, x in (("queries", q), ("keys", k), ("values", v)):
        if len(x.shape) != 4:
            raise Unsupported(f"{name} must have rank 4, got shape {tuple(x.shape)}")
    batch, q_heads, q_len, qk_dim = q.shape
    _, kv_heads, kv_len, k_dim = k.shape
    v_batch, v_heads, v_len, v_dim = v.shape
    if k.shape[0] != batch or v_batch != batch:
        raise Unsupported("queries, keys and values have different batch sizes")
    if k_dim != qk_dim:
        raise Unsupported(f"queries have head dim {qk_dim} but keys {k_dim}")
    if v_heads != kv_heads or v_len != kv_len:
        raise Unsupported("keys and values differ in heads or length")
    if kv_heads == 0 or q_heads % kv_heads:
        raise Unsupported(f"{q_heads} query heads are not a multiple of {kv_heads} KV heads")
    dtypes = {dtype_name(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
        raise Unsupported(f"dtypes {sorted(dtypes)} are not one of {SUPPORTED_DTYPES}")
    dtype = dtypes.pop()
    mask_kind, mask_shape = _describe_mask(mask, dtype, (batch, q_heads, q_len, kv_len))
    if sinks is not None and tuple(sinks.shape) != (q_heads,):
        raise Unsupported(f"sinks must have shape ({q_heads},), got {tuple(sinks.shape)}")
    return AttentionProblem(
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        qk_dim=qk_dim,
        v_dim=v_dim,
        dtype=dtype,
        mask=mask_kind,
        mask_shape=mask_shape,
        has_sinks=sinks is not None,
    )


def _describe_mask(
    mask: Any, dtype: str, scores_shape: tuple[int, int, int, int]
) -> tuple[MaskKind, tuple[int, ...] | None]:
    if mask is None:
        return "none", None
    if isinstance(mask, str):
        if mask != "causal":
            raise Unsupported(f"mask mode {mask!r} is not 'causal'")
        return "causal", None
    shape = tuple(mask.shape)
    if len(shape) > 4 or not _broadcasts(shape, scores_shape):
        raise Unsupported(f"mask of shape {shape} does not broadcast to {scores_shape}")
    kind = dtype_name(mask.dtype)
    if kind == "bool":
        return "bool", shape
    if kind not in SUPPORTED_DTYPES:
        raise Unsupported(f"mask dtype {kind} is neither bool nor floating")
    return "additive", shape


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))
