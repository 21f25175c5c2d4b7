"""The decode-attention shapes every benchmark here reports, so their tables line up.

(B, Hq, Hkv, N, D, V, V is a view of K): the shapes of the team's GPU baselines, then DeepSeek
style MLA decode (one latent KV head for 128 query heads, V = K's first 512 columns), then
256/128 at batch 1 and MLA at a serving batch (64 sequences of 4096 keys).
"""

from bench.options import add_plan_constant_option

SHAPES = [
    (1, 32, 4, 4096, 192, 128, False),
    (8, 32, 8, 32768, 192, 128, False),
    (8, 32, 8, 32768, 128, 128, False),
    (8, 64, 8, 16384, 576, 512, False),
    (1, 16, 16, 8192, 80, 80, False),
    (32, 32, 8, 8192, 192, 128, False),
    (1, 128, 1, 8192, 576, 512, True),
    (8, 128, 1, 8192, 576, 512, True),
    (1, 128, 1, 32768, 576, 512, True),
    (8, 128, 1, 32768, 576, 512, True),
    (1, 32, 8, 32768, 256, 128, False),
    (64, 128, 1, 4096, 576, 512, True),
]

L2_BYTES = 50 * 2**20


def mlx_kv(shape) -> tuple:
    """A bf16 K/V cache of `shape` as MLX arrays, evaluated (V a view of K's first columns
    where the shape says so, as MLA caches are laid out)."""
    import mlx.core as mx

    b, _, hkv, n, d, v_dim, v_view = shape
    k = mx.random.normal((b, hkv, n, d)).astype(mx.bfloat16)
    v = k[..., :v_dim] if v_view else mx.random.normal((b, hkv, n, v_dim)).astype(mx.bfloat16)
    mx.eval(k, v)
    return k, v


def mlx_query(shape):
    """One bf16 query token per head for `shape`, evaluated."""
    import mlx.core as mx

    b, hq, _, _, d, _, _ = shape
    q = mx.random.normal((b, hq, 1, d)).astype(mx.bfloat16)
    mx.eval(q)
    return q


def kv_bytes(b, hkv, n, d, v, view, es=2) -> int:
    """Bytes of K and V read once (V a view of K counts once), `es` bytes an element."""
    return b * hkv * n * (d + (0 if view else v)) * es


def attention_flops(b, hq, n, d, v) -> int:
    """FLOPs of one query token per head: S = Q K^T and P V, two per multiply-add."""
    return 2 * b * hq * n * (d + v)


def set_count(nbytes: int) -> int:
    """Input sets to cycle over: enough that a call's K and V are mostly not in L2 from the
    previous calls (decode reads each layer's cache once per token), at most 8."""
    return max(1, min(8, -(-4 * L2_BYTES // nbytes)))


def add_mlx_options(parser, *, iters: int, shapes: str = "0,4,10") -> None:
    """The options every per-shape MLX benchmark takes: the library's index, iterations, and
    the shapes (indices into SHAPES; `selected` reads them)."""
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--shapes", default=shapes, help="indices into bench.shapes.SHAPES")
    add_plan_constant_option(parser)


def selected(shapes: str) -> list[tuple]:
    """The SHAPES that a comma-separated list of indices names, in its order."""
    return [SHAPES[int(i)] for i in shapes.split(",")]
