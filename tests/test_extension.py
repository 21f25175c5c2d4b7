"""The extension aotc._ext: it imports, reports CUDA truthfully, rejects bad launches clearly, and
its CUDA primitive compiles against MLX's installed headers even where no GPU is.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

REPO = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((REPO / "src" / "cuda").glob("*.cpp"))


@pytest.fixture(scope="module")
def ext():
    from aotc.runtime.cuda import extension

    return extension()


def _args(x, **overrides):
    args = {
        "kernel": "k",
        "inputs": [x],
        "output_shapes": [[4]],
        "output_dtypes": [mx.float32],
        "grid": (1, 1, 1),
        "block": (32, 1, 1),
        "shared_memory": 0,
        "params": b"",
        "strided_inputs": [0],
    }
    args.update(overrides)
    return args


def test_imports_and_reports_cuda(ext):
    assert isinstance(ext.WITH_CUDA, bool)
    assert ext.has_cuda() == (ext.WITH_CUDA and mx.cuda.is_available())
    if not mx.cuda.is_available():
        assert ext.has_cuda() is False


def test_cuda_image_holds_bytes(ext):
    image = ext.CudaImage(b"\x00" * 24)
    assert image.nbytes == 24
    assert "24 bytes" in repr(image)
    with pytest.raises(ValueError, match="empty"):
        ext.CudaImage(b"")


@pytest.mark.parametrize("stream", [None, "cpu", "cpu_stream"])
def test_launch_on_cpu_stream_is_a_clear_error(ext, stream):
    if mx.default_device() == mx.gpu and stream is None:
        pytest.skip("the default device is a GPU here")
    kwargs = {}
    if stream == "cpu":
        kwargs["stream"] = mx.cpu
    elif stream == "cpu_stream":
        kwargs["stream"] = mx.default_stream(mx.cpu)
    image = ext.CudaImage(b"\x00" * 16)
    with pytest.raises(ValueError, match="needs a GPU stream"):
        ext.cuda_launch(image, **_args(mx.arange(4.0)), **kwargs)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"strided_inputs": [3]}, "strided input index 3"),
        ({"output_dtypes": []}, "1 output shapes but 0 output dtypes"),
        ({"output_shapes": [], "output_dtypes": []}, "at least one output"),
        ({"block": (2048, 1, 1)}, "more than 1024 threads"),
        ({"grid": (0, 1, 1)}, ">= 1"),
        ({"kernel": ""}, "kernel name is empty"),
        ({"shared_memory": -1}, "shared_memory"),
        ({"tensor_maps": [(-1, 64, 64)]}, "tensor map input index -1 is negative"),
        ({"tensor_maps": [(0, 0, 64)]}, "box dimensions must be 1 to 256"),
        ({"tensor_maps": [(0, 64, 2**32 + 64)]}, "box dimensions must be 1 to 256"),
        ({"tensor_maps": [(0, 64, 64)] * 9}, "at most 8 tensor maps"),
        ({"tensor_maps": [(0, 64, 1, 0)]}, "box dimensions must be 1 to 256"),
        ({"tensor_maps": [(0, 64, 1, 257)]}, "box dimensions must be 1 to 256"),
        ({"tensor_maps": [(0, 64)]}, "(input, box columns, box rows[, box planes]), not 2"),
        ({"tensor_maps": [(2**31, 64, 64)]}, "tensor map input index 2147483647 is not one of"),
    ],
)
def test_launch_arguments_are_checked(ext, override, message):
    image = ext.CudaImage(b"\x00" * 16)
    with pytest.raises(ValueError, match=re.escape(message)):
        ext.cuda_launch(image, **_args(mx.arange(4.0), **override), stream=mx.cpu)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({}, "needs a GPU stream"),
        ({"strided_inputs": [3]}, "strided input index 3"),
        ({"unread_inputs": [1]}, "unread input index 1"),
        ({"tensor_maps": [(1, 64, 64)]}, "tensor map input index 1 is not one of the 1"),
        (
            {"view_alternative": ("alt", (256, 1, 1), 0, 1, 0)},
            "view alternative's view input index 1 is not one of the 1",
        ),
    ],
)
def test_prepared_launch_checks_its_inputs_at_each_call(ext, override, message):
    """PreparedLaunch binds all but the inputs once; a call checks the inputs and stream."""
    args = _args(mx.arange(4.0), **override)
    inputs = args.pop("inputs")
    prepared = ext.PreparedLaunch(ext.CudaImage(b"\x00" * 16), **args)
    assert prepared.kernel == "k"
    with pytest.raises(ValueError, match=re.escape(message)):
        prepared(inputs, [], None, mx.cpu)  # gradient arguments positionally


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"block": (2048, 1, 1)}, "more than 1024 threads"),
        ({"strided_inputs": [-1]}, "strided input index -1"),
        ({"output_dtypes": []}, "1 output shapes but 0 output dtypes"),
        ({"scratch_outputs": [1]}, "scratch output index 1 is not one of the 1 outputs"),
        ({"scratch_outputs": [-1]}, "scratch output index -1 is not one of the 1 outputs"),
        ({"scratch_outputs": [0]}, "at least one output that is not scratch"),
        (
            {
                "output_shapes": [[4], [4]],
                "output_dtypes": [mx.float32] * 2,
                "scratch_outputs": [0, 0],
            },
            "scratch output index 0 is repeated",
        ),
        ({"view_alternative": ("", (256, 1, 1), 0, 1, 0)}, "alternative's kernel name is empty"),
        ({"view_alternative": ("a", (2048, 1, 1), 0, 1, 0)}, "must have 1 to 1024 threads"),
        ({"view_alternative": ("a", (0, 1, 1), 0, 1, 0)}, "must have 1 to 1024 threads"),
        ({"view_alternative": ("a", (256, 1, 1), 2**33, 1, 0)}, "shared_memory is out of range"),
        ({"view_alternative": ("a", (256, 1, 1), 0, -1, 0)}, "view input index -1 is negative"),
        ({"view_alternative": ("a", (256, 1, 1), 0, 0, 0)}, "view and base are the same input"),
    ],
)
def test_prepared_launch_checks_the_rest_once(ext, override, message):
    args = _args(mx.arange(4.0), **override)
    args.pop("inputs")
    with pytest.raises(ValueError, match=re.escape(message)):
        ext.PreparedLaunch(ext.CudaImage(b"\x00" * 16), **args)


def test_prepared_launch_keeps_its_view_alternative(ext):
    args = _args(mx.arange(4.0))
    args.pop("inputs")
    image = ext.CudaImage(b"\x00" * 16)
    assert ext.PreparedLaunch(image, **args).view_alternative is None
    alternative = ("alt", (256, 1, 1), 231576, 2, 1)
    prepared = ext.PreparedLaunch(image, **args, view_alternative=alternative)
    assert prepared.view_alternative == ("alt", [256, 1, 1], 231576, 2, 1)


def test_launcher_maps_dtype_names(ext):
    from aotc.runtime.cuda import CudaLauncher

    launch = CudaLauncher(ext.CudaImage(b"\x00" * 16), stream=mx.cpu)
    with pytest.raises(ValueError, match="needs a GPU stream"):
        launch("k", [mx.arange(4.0)], [(4,)], ["float16"], (1, 1, 1), (32, 1, 1), 0, b"", [0])
    with pytest.raises(ValueError, match="unknown MLX dtype"):
        launch("k", [mx.arange(4.0)], [(4,)], ["float17"], (1, 1, 1), (32, 1, 1), 0, b"", [0])


def test_load_image_reads_once(tmp_path, ext):
    from aotc.runtime.cuda import load_image

    path = tmp_path / "x.fatbin"
    path.write_bytes(b"\x01" * 40)
    image = load_image(path)
    assert image.nbytes == 40
    path.write_bytes(b"\x02" * 80)
    assert load_image(str(path)) is image


# ------------------------------------------------------------- compile-only check of src/cuda


def _cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parents[1]))
    for root in roots:
        if root and (Path(root) / "include" / "cuda.h").is_file():
            return Path(root) / "include"
    return None


def _mlx_include() -> Path:
    import mlx

    return Path(next(iter(mlx.__path__))) / "include"


def _compile(source: Path, *extra: str) -> subprocess.CompletedProcess:
    cxx, cuda_inc = _cxx(), _cuda_include()
    if cxx is None:
        pytest.skip("no C++ compiler")
    if cuda_inc is None:
        pytest.skip("no CUDA toolkit headers (cuda.h)")
    if not (_mlx_include() / "mlx" / "backend" / "cuda" / "device.h").is_file():
        pytest.skip("this MLX does not install its CUDA headers")
    cmd = [
        cxx,
        "-std=c++20",
        "-Wall",
        "-Werror=return-type",
        f"-I{REPO / 'src'}",
        f"-I{REPO / 'src' / 'cuda'}",
        f"-I{REPO / 'src' / 'cuda' / 'compat'}",
        f"-I{_mlx_include()}",
        f"-I{cuda_inc}",
        "-DAOTC_WITH_CUDA",
        *extra,
        str(source),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_primitive_compiles_against_mlx_headers(source):
    result = _compile(source, "-fsyntax-only")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_compile_check_catches_api_misuse(tmp_path):
    """A planted misuse of MLX's CUDA API (a method the encoder does not have) fails the check."""
    source = (REPO / "src" / "cuda" / "cuda_launch.cpp").read_text()
    planted = source.replace("enc.set_output_array(out);", "enc.set_output_arrays(out);", 1)
    assert planted != source
    bad = tmp_path / "cuda_launch.cpp"
    bad.write_text(planted)
    result = _compile(bad, "-fsyntax-only")
    assert result.returncode != 0
    assert "set_output_arrays" in result.stderr


def _cuda_libmlx() -> Path | None:
    """A libmlx.so with the CUDA backend: this MLX's, or $AOTC_MLX_CUDA_LIB."""
    candidates = [os.environ.get("AOTC_MLX_CUDA_LIB"), str(_mlx_include().parent / "lib/libmlx.so")]
    nm = shutil.which("nm")
    for candidate in candidates:
        if nm and candidate and Path(candidate).is_file():
            out = subprocess.run(
                [nm, "-D", "--defined-only", candidate], capture_output=True, text=True
            ).stdout
            if "_ZN3mlx4core2cu19get_command_encoderENS0_6StreamE" in out:
                return Path(candidate)
    return None


def _undefined_symbols(obj: Path) -> set[str]:
    out = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in out.stdout.splitlines() if line.strip()}


@pytest.mark.slow
def test_cuda_primitive_uses_only_exported_mlx_symbols(tmp_path):
    """Every MLX symbol the primitive calls is exported by MLX's CUDA library, and it calls the
    CUDA driver API only (MLX links the runtime statically: its symbols are not there to share).
    """
    lib = _cuda_libmlx()
    if lib is None:
        pytest.skip("no CUDA build of libmlx.so here (set AOTC_MLX_CUDA_LIB to one)")
    exported = set(
        subprocess.run(
            ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
        ).stdout.split()
    )

    def problems(source: Path) -> list[str]:
        obj = tmp_path / (source.stem + ".o")
        result = _compile(source, "-c", "-fPIC", "-o", str(obj))
        assert result.returncode == 0, result.stderr
        undefined = _undefined_symbols(obj)
        mlx_refs = {s for s in undefined if "3mlx4core" in s}
        assert mlx_refs, "expected references to MLX"
        runtime = {s for s in undefined if re.match(r"cuda[A-Z]", s)}
        return sorted(mlx_refs - exported) + sorted(runtime)

    assert problems(REPO / "src" / "cuda" / "cuda_launch.cpp") == []

    # Planted: MLX's own allocation helper is declared in its headers but not exported.
    source = (REPO / "src" / "cuda" / "cuda_launch.cpp").read_text()
    planted = source.replace(
        "return mx::allocator::malloc(nbytes);", "return cu::malloc_async(nbytes, enc);", 1
    )
    assert planted != source
    bad = tmp_path / "planted.cpp"
    bad.write_text(planted)
    assert any("malloc_async" in s for s in problems(bad))
