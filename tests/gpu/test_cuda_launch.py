"""aotc._ext.cuda_launch on MLX's CUDA backend, with a tiny fatbin built here by nvcc.

Checks strided inputs (slices, a transpose, a broadcast, a reversed slice) reach the kernel
without copies, several outputs, a non-contiguous input without strides, >48 KB of dynamic shared
memory, clear errors for mismatched launches, both output allocators, and prints (does not assert)
the time of an evaluated call against mx.add.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")


def _why_not() -> str | None:
    from aotc.runtime.cuda import unavailable_reason

    if not mx.cuda.is_available():
        return "MLX has no CUDA GPU here"
    reason = unavailable_reason()
    if reason:
        return reason
    if shutil.which("nvcc") is None:
        return "nvcc is not on PATH"
    return None


REASON = _why_not()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=str(REASON))]

KERNELS = r"""
#include <cstdint>

struct ScaleParams {
  int64_t x_strides[2];
  float scale;
  int rows;
  int cols;
};  // 32 bytes; Python packs 28 (no tail padding)

extern "C" __global__ void aotc_test_scale(const float* x, float* y, const ScaleParams p) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.rows * p.cols) return;
  int r = i / p.cols, c = i % p.cols;
  y[i] = x[r * p.x_strides[0] + c * p.x_strides[1]] * p.scale;
}

struct PairParams {
  int64_t a_strides[1];
  int n;
};

extern "C" __global__ void aotc_test_pair(
    const float* a, const float* b, float* sum, float* diff, const PairParams p) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  float av = a[i * p.a_strides[0]];
  sum[i] = av + b[i];
  diff[i] = av - b[i];
}

struct SmemParams {
  int n;
  int tail;  // where in the dynamic shared memory the values go (floats)
};

extern "C" __global__ void aotc_test_smem(const float* x, float* y, const SmemParams p) {
  extern __shared__ float buf[];
  int i = threadIdx.x;
  if (i < p.n) buf[p.tail + i] = x[i];
  __syncthreads();
  if (i < p.n) y[i] = 2.0f * buf[p.tail + i];
}
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from aotc.runtime.cuda import load_image

    folder = tmp_path_factory.mktemp("fatbin")
    src = folder / "k.cu"
    src.write_text(KERNELS)
    out = folder / "k.fatbin"
    base = ["nvcc", "-fatbin", "-O2", "-o", str(out), str(src)]
    for arch in (["-arch=native"], ["-gencode", "arch=compute_90,code=[sm_90,compute_90]"]):
        result = subprocess.run(base + arch, capture_output=True, text=True)
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stderr
    return load_image(out)


@pytest.fixture(params=["pool", "mlx"])
def allocator(request):
    from aotc import _ext

    _ext._set_cuda_output_allocator(request.param)
    yield request.param
    _ext._set_cuda_output_allocator("pool")


def scale_launch(image, x, scale, rows, cols):
    from aotc import _ext

    params = struct.pack("@fii", scale, rows, cols)
    return _ext.cuda_launch(
        image,
        "aotc_test_scale",
        [x],
        [[rows, cols]],
        [mx.float32],
        ((rows * cols + 127) // 128, 1, 1),
        (128, 1, 1),
        0,
        params,
        [0],
    )[0]


@pytest.mark.parametrize(
    "view",
    ["slice", "transpose", "broadcast", "reversed", "contiguous"],
)
def test_strided_input_reaches_kernel(image, allocator, view):
    big = mx.arange(40 * 30, dtype=mx.float32).reshape(40, 30)
    mx.eval(big)
    x = {
        "slice": lambda: big[3:35:3, 2:27:2],
        "transpose": lambda: big.T[4:20],
        "broadcast": lambda: mx.broadcast_to(big[7:8, :], (9, 30)),
        "reversed": lambda: big[::-1, 5:9],
        "contiguous": lambda: big[10:20],
    }[view]()
    rows, cols = x.shape
    y = scale_launch(image, x, 0.5, rows, cols)
    z = y + 1.0  # the output feeds later MLX ops in the same graph
    mx.eval(y, z)
    expected = np.array(big)[
        {
            "slice": (slice(3, 35, 3), slice(2, 27, 2)),
            "reversed": (slice(None, None, -1), slice(5, 9)),
            "contiguous": (slice(10, 20),),
        }.get(view, (slice(None),))
    ]
    if view == "transpose":
        expected = np.array(big).T[4:20]
    if view == "broadcast":
        expected = np.broadcast_to(np.array(big)[7:8], (9, 30))
    np.testing.assert_array_equal(np.array(y), expected * 0.5)
    np.testing.assert_array_equal(np.array(z), expected * 0.5 + 1)


def test_two_outputs_and_an_input_without_strides(image, allocator):
    from aotc import _ext

    n = 1000
    a_big = mx.arange(3 * n, dtype=mx.float32)
    b_big = mx.arange(2 * n, dtype=mx.float32) * 0.25
    mx.eval(a_big, b_big)
    a = a_big[::3]  # strided: gets strides
    b = b_big[::2]  # not contiguous and gets no strides: cuda_launch makes it contiguous
    total, diff = _ext.cuda_launch(
        image,
        "aotc_test_pair",
        [a, b],
        [[n], [n]],
        [mx.float32, mx.float32],
        ((n + 255) // 256, 1, 1),
        (256, 1, 1),
        0,
        struct.pack("@i", n),
        [0],
    )
    mx.eval(total, diff)
    an, bn = np.array(a_big)[::3], np.array(b_big)[::2]
    np.testing.assert_array_equal(np.array(total), an + bn)
    np.testing.assert_array_equal(np.array(diff), an - bn)


def test_large_dynamic_shared_memory(image):
    from aotc import _ext

    n, smem = 256, 160 * 1024
    x = mx.random.normal((n,))
    y = _ext.cuda_launch(
        image,
        "aotc_test_smem",
        [x],
        [[n]],
        [mx.float32],
        (1, 1, 1),
        (n, 1, 1),
        smem,
        struct.pack("@ii", n, smem // 4 - n),
        [],
    )[0]
    np.testing.assert_array_equal(np.array(y), 2 * np.array(x))


def test_mismatched_launches_fail_clearly(image):
    from aotc import _ext

    x = mx.ones((4, 4))
    with pytest.raises(ValueError, match="no kernel named 'nope'"):
        mx.eval(
            _ext.cuda_launch(
                image, "nope", [x], [[4]], [mx.float32], (1, 1, 1), (32, 1, 1), 0, b"", []
            )
        )
    with pytest.raises(ValueError, match="takes 3 parameters"):
        mx.eval(
            _ext.cuda_launch(
                image,
                "aotc_test_scale",
                [x, x],
                [[4, 4]],
                [mx.float32],
                (1, 1, 1),
                (32, 1, 1),
                0,
                struct.pack("@fii", 1.0, 4, 4),
                [0],
            )
        )
    with pytest.raises(ValueError, match="32-byte Params"):
        mx.eval(
            _ext.cuda_launch(
                image,
                "aotc_test_scale",
                [x],
                [[4, 4]],
                [mx.float32],
                (1, 1, 1),
                (32, 1, 1),
                0,
                b"\0" * 40,
                [0],
            )
        )
    # The stream still works after the errors.
    y = scale_launch(image, x, 3.0, 4, 4)
    np.testing.assert_array_equal(np.array(y), np.full((4, 4), 3.0, np.float32))


def test_no_gradient(image):
    x = mx.ones((4, 4))

    def f(x):
        return scale_launch(image, x, 2.0, 4, 4).sum()

    with pytest.raises(ValueError, match="no gradient"):
        mx.grad(f)(x)


def test_many_steps_and_launcher_glue(image, allocator):
    """A decode-like loop through the launch_fn glue: buffers are reused, results stay right."""
    from aotc import _ext
    from aotc.runtime.cuda import CudaLauncher

    launch = CudaLauncher(image)
    cache = mx.random.normal((64, 512))
    mx.eval(cache)
    expected = np.array(cache)[:, 128:384]
    for step in range(1, 300):
        rows = step % 64 + 1
        k = cache[:rows, 128:384]  # a growing slice of a cache, never copied
        (y,) = launch(
            "aotc_test_scale",
            [k],
            [(rows, 256)],
            ["float32"],
            ((rows * 256 + 127) // 128, 1, 1),
            (128, 1, 1),
            0,
            struct.pack("@fii", 2.0, rows, 256),
            [0],
        )
        if step % 37 == 0:
            np.testing.assert_allclose(np.array(y), 2 * expected[:rows])
        else:
            mx.eval(y)
    _ext.cuda_clear_cache()


def _us_per_eval(make, n=2000):
    for _ in range(100):
        mx.eval(make())
    mx.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(make())
    return (time.perf_counter() - t0) / n * 1e6


def _us_chained(make, n=300, chain=8):
    for _ in range(20):
        mx.eval([make() for _ in range(chain)])
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval([make() for _ in range(chain)])
    return (time.perf_counter() - t0) / (n * chain) * 1e6


def test_time_per_evaluated_call(image, capsys):
    from aotc import _ext

    x = mx.random.normal((64, 256))
    a, b = mx.random.normal((64, 128)), mx.random.normal((64, 128))
    mx.eval(x, a, b)
    xs = x[::2, :128]  # strided
    params = struct.pack("@fii", 2.0, 32, 128)

    def ours():
        return _ext.cuda_launch(
            image, "aotc_test_scale", [xs], [[32, 128]], [mx.float32], (32, 1, 1),
            (128, 1, 1), 0, params, [0],
        )[0]  # fmt: skip

    # "after an op": each step first evaluates an MLX op whose output has the size of ours, so
    # MLX's buffer cache holds a device buffer of that size when the launch allocates.
    c, e = mx.random.normal((32, 128)), mx.random.normal((32, 128))
    mx.eval(c, e)

    def after_op(make):
        def step():
            mx.eval(mx.add(c, e))
            return make()

        return step

    rows = []
    for mode in ("pool", "mlx"):
        _ext._set_cuda_output_allocator(mode)
        base = _us_per_eval(lambda: mx.add(a, b))
        mine = _us_per_eval(ours)
        base_c = _us_chained(lambda: mx.add(a, b))
        mine_c = _us_chained(ours)
        base_m = _us_per_eval(after_op(lambda: mx.add(a, b)), n=1000)
        mine_m = _us_per_eval(after_op(ours), n=1000)
        rows.append((mode, base, mine, base_c, mine_c, base_m, mine_m))
    _ext._set_cuda_output_allocator("pool")
    try:
        name = mx.device_info().get("device_name", "?")
    except Exception:
        name = "?"
    with capsys.disabled():
        print(
            f"\n[aotc timing] {name}: us per evaluated call | per call, 8 per eval | "
            "per step of (eval an MLX op of the same output size, then eval the call)"
        )
        for mode, base, mine, base_c, mine_c, base_m, mine_m in rows:
            print(
                f"[aotc timing] allocator={mode}: mx.add {base:.1f} | {base_c:.1f} | {base_m:.1f}"
                f"  cuda_launch {mine:.1f} | {mine_c:.1f} | {mine_m:.1f}"
                f"  overhead {mine - base:+.1f} | {mine_c - base_c:+.1f} | {mine_m - base_m:+.1f}"
            )


def test_sm_count_from_the_driver():
    """The plans' SM count is the GPU's own (MLX's device_info has none), not a guess."""
    from aotc.families.sdpa_vector.cuda import device_facts
    from aotc.runtime.cuda import sm_count

    count = sm_count()
    assert count is not None and 1 <= count <= 1024
    assert device_facts()[0] == count
    torch = pytest.importorskip("torch", reason="torch (a second reading of the count) is absent")
    if torch.cuda.is_available():
        assert count == torch.cuda.get_device_properties(0).multi_processor_count
