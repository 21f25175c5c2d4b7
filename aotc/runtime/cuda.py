"""Python glue of the CUDA launch primitive `aotc._ext.cuda_launch`.

`load_image(path)` reads an aotc fatbin once per process into an `aotc._ext.CudaImage` (the
extension loads a CUDA module from it once per device, on first use). `CudaLauncher(image)` is
the `launch_fn` of the family plans (`aotc.families.*.cuda.run_cuda`):

    launch_fn(kernel, inputs, output_shapes, output_dtypes, grid, block, shared_memory, params,
              strided_input_indices, tensor_maps=()) -> list[mx.array]

`grid` counts blocks; `params` are the static bytes of the kernel's Params after the strides the
primitive fills in, and `tensor_maps` the (input index, box columns, box rows[, box planes]) of
the TMA descriptors it encodes after them (docs/ARCHITECTURE.md, "The CUDA launch contract").
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CudaLauncher",
    "CudaUnavailable",
    "extension",
    "has_cuda",
    "launcher",
    "load_image",
    "sm_count",
]


class CudaUnavailable(RuntimeError):
    """aotc's CUDA primitive cannot run here; the message says why."""


_lock = threading.Lock()
_images: dict[str, Any] = {}  # resolved artifact path -> aotc._ext.CudaImage
_dtypes: dict[str, Any] = {}  # dtype name -> mx.Dtype


def extension() -> Any:
    """`aotc._ext` (MLX is imported first, so that the extension finds MLX's library loaded)."""
    import mlx.core  # noqa: F401

    try:
        from aotc import _ext  # type: ignore[attr-defined]
    except ImportError as exc:
        raise CudaUnavailable(f"the extension aotc._ext is not importable: {exc}") from None
    return _ext


def has_cuda() -> bool:
    """True when aotc._ext has the CUDA primitive and MLX's CUDA backend is available."""
    try:
        return bool(extension().has_cuda())
    except CudaUnavailable:
        return False


def unavailable_reason() -> str | None:
    """Why CUDA launches cannot run here, or None when they can."""
    try:
        ext = extension()
    except CudaUnavailable as exc:
        return str(exc)
    if not ext.WITH_CUDA:
        return "aotc._ext was built without the CUDA primitive (its MLX had no CUDA backend)"
    if not ext.has_cuda():
        return "MLX's CUDA backend is not available (no GPU or no driver)"
    return None


def load_image(source: str | os.PathLike[str] | Any) -> Any:
    """The `CudaImage` of an aotc fatbin, read once per process per file.

    `source` is the fatbin's path, or a `aotc.runtime.libraries.Library` (whose checksummed
    `artifact_bytes()` are used).
    """
    if hasattr(source, "artifact_bytes"):
        path, read = Path(source.path), source.artifact_bytes
    else:
        path = Path(source)
        read = path.read_bytes
    key = str(path.resolve())
    image = _images.get(key)
    if image is not None:
        return image
    ext = extension()
    with _lock:
        image = _images.get(key)
        if image is None:
            image = _images[key] = ext.CudaImage(read())
    return image


def _dtype(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    dtype = _dtypes.get(value)
    if dtype is None:
        import mlx.core as mx

        dtype = getattr(mx, value, None)
        if not isinstance(dtype, mx.Dtype):
            raise ValueError(f"unknown MLX dtype {value!r}")
        _dtypes[value] = dtype
    return dtype


class CudaLauncher:
    """`launch_fn` bound to one image (and optionally a stream)."""

    __slots__ = ("_launch", "image", "stream")

    def __init__(self, image: Any, stream: Any = None) -> None:
        self.image = image
        self.stream = stream
        self._launch = extension().cuda_launch

    def __call__(
        self,
        kernel: str,
        inputs: Sequence[Any],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[Any],
        grid: Sequence[int],
        block: Sequence[int],
        shared_memory: int,
        params: bytes,
        strided_input_indices: Sequence[int],
        tensor_maps: Sequence[tuple[int, ...]] = (),
    ) -> list[Any]:
        # Sequences pass as they are (the extension takes lists or tuples); dtype names map to
        # mx.Dtype through a cache.
        return self._launch(
            self.image,
            kernel,
            inputs,
            output_shapes,
            [_dtype(dtype) for dtype in output_dtypes],
            grid,
            block,
            shared_memory,
            params,
            strided_input_indices,
            tensor_maps=tensor_maps,
            stream=self.stream,
        )

    def __repr__(self) -> str:
        return f"CudaLauncher({self.image!r})"


@functools.cache
def sm_count(device: int = 0) -> int | None:
    """Streaming multiprocessors of MLX's CUDA device `device` (from the driver), or None where
    CUDA launches cannot run or the extension predates the query."""
    if unavailable_reason() is not None:
        return None
    query = getattr(extension(), "cuda_sm_count", None)
    if query is None:
        return None
    try:
        return int(query(device))
    except RuntimeError:
        return None


def launcher(source: str | os.PathLike[str] | Any, stream: Any = None) -> CudaLauncher:
    """A `launch_fn` for the fatbin at `source` (a path or a Library)."""
    return CudaLauncher(load_image(source), stream)


def sass_runs_on(sass: str, device: str) -> bool:
    """Whether a cubin for `sass` (e.g. "sm_90a", "sm_80") runs on a `device` like "sm_90".

    Arch-specific builds ("a") run only on their exact SM; others on the same major version
    with an equal or newer minor (an sm_80 cubin runs on sm_86).
    """
    build, dev = _sm(sass), _sm(device)
    if build is None or dev is None:
        return False
    (major, minor, suffix), (dev_major, dev_minor, _) = build, dev
    if suffix == "a":
        return (major, minor) == (dev_major, dev_minor)
    return major == dev_major and minor <= dev_minor


def wgmma_runs(archs: list[str] | tuple[str, ...], device: str) -> bool:
    """Whether the driver loads sm_90a SASS (with warpgroup MMAs) from a fatbin of `archs` on
    `device`: only an sm_90 GPU, and only when no plain sm_90 image competes with it."""
    return device == "sm_90" and "sm_90a" in archs and "sm_90" not in archs


def _sm(arch: str) -> tuple[int, int, str] | None:
    digits = arch.removeprefix("sm_")
    suffix = digits[-1] if digits[-1:].isalpha() else ""
    digits = digits.removesuffix(suffix)
    if not digits.isdigit() or len(digits) < 2:
        return None
    return int(digits[:-1]), int(digits[-1]), suffix
