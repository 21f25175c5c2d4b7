"""MLA decode through MLX: which kernels run and how long a call takes, view of K or not.

python3 -m bench.probe_mla [--index dist/extra_sdpa.cuda.json]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import mlx.core as mx

import aotc
from aotc.families.sdpa_vector import cuda
from aotc.families.sdpa_vector.problem import describe
from aotc.runtime.cuda import extension, load_image, wgmma_runs


def per_call_us(fn, chain: int = 8, iters: int = 20) -> float:
    for _ in range(3):
        mx.eval([fn() for _ in range(chain)])
    start = time.perf_counter()
    for _ in range(iters):
        mx.eval([fn() for _ in range(chain)])
    return (time.perf_counter() - start) / (iters * chain) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", default="dist/extra_sdpa.cuda.json")
    args = parser.parse_args()
    library = aotc.load(args.index)
    arch = str(mx.device_info().get("architecture"))
    print("arch", arch, "wgmma", wgmma_runs(library.index.data["options"]["archs"], arch))
    for b, n in ((1, 8192), (1, 32768), (8, 32768)):
        k = mx.random.normal((b, 1, n, 576)).astype(mx.bfloat16)
        q = mx.random.normal((b, 128, 1, 576)).astype(mx.bfloat16)
        own_v = mx.random.normal((b, 1, n, 512)).astype(mx.bfloat16)
        mx.eval(q, k, own_v)
        view = k[..., :512]
        plan = cuda.plan_cuda(
            describe(q, k, view), available=library.kernel_names, sm_count=132, arch=arch,
            wgmma=True,
        )  # fmt: skip
        desc = " + ".join(f"{launch.kernel}[g{launch.grid[0]}]" for launch in plan)
        bare = cuda.CudaRunner(
            describe(q, k, view),
            prepare=partial(extension().PreparedLaunch, load_image(library)),
            available=library.kernel_names, dtype=partial(getattr, mx), wgmma=True,
        )  # fmt: skip
        t = per_call_us(lambda q=q, k=k, v=view, r=bare: r(q, k, v, 0.04, None, None))
        print(f"B={b} N={n} view, runner without gradient wiring: {t:.1f} us/call")
        t = per_call_us(lambda q=q, k=k, v=view: aotc.sdpa_vector(q, k, v, scale=0.04), chain=1)
        print(f"B={b} N={n} view, one call per eval: {t:.1f} us/call")
        for name, v in (("view", view), ("own V", own_v)):
            t = per_call_us(lambda q=q, k=k, v=v: aotc.sdpa_vector(q, k, v, scale=0.04))
            flops = 2 * b * 128 * n * 1088
            print(f"B={b} N={n} {name}: {t:.1f} us/call, {flops / t / 1e6:.0f} TFLOP/s; {desc}")


if __name__ == "__main__":
    main()
