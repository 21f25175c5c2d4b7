"""The Metal primitive's C++ (`src/metal/`), checked on Linux against MLX 0.32.4's real headers.

No Mac here: clang type-checks `src/metal/*.cpp` against `mlx/include/**` (MLX's Metal backend and
metal_cpp) from the `mlx-metal` macOS wheel, with tiny stand-ins for Apple's system headers
(`tests/metal_stubs/`). A second check compiles the sources to objects and looks every MLX and
metal_cpp symbol they need up in the wheel's `libmlx.dylib` export table (MLX builds with hidden
visibility, so a header declaration is no promise that the symbol links). Both checks are also run
on planted mistakes, to show that they report them. Nothing here runs Metal.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import typing
import zipfile
from pathlib import Path

import pytest

from aotc.families.sdpa_vector import metal
from aotc.families.sdpa_vector.metal import Layout

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES_DIR = REPO / "src" / "metal"
STUBS = REPO / "tests" / "metal_stubs"
CACHE = REPO / "build" / "cache"
MLX_METAL = "mlx-metal==0.32.4"
WHEEL_GLOB = "mlx_metal-0.32.4-py3-none-macosx_*_arm64.whl"
EXTRACTED = CACHE / "mlx_metal-0.32.4"
# MLXConfig.cmake of the wheel: MLX_CXX_FLAGS on a Metal build.
MLX_DEFINES = ("-D_METAL_", "-DACCELERATE_NEW_LAPACK")


def _sources() -> list[Path]:
    return sorted(SOURCES_DIR.glob("*.cpp"))


@pytest.fixture(scope="module")
def clangxx() -> str:
    path = shutil.which("clang++")
    if path is None:
        pytest.skip("clang++ is not on PATH (Debian: apt-get install -y clang llvm)")
    return path


def _wheel() -> Path | None:
    found = sorted(CACHE.glob(WHEEL_GLOB))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def mlx_metal() -> Path:
    """`build/cache/mlx_metal-0.32.4/mlx` holding `include/` and `lib/libmlx.dylib`."""
    if sys.platform == "darwin":
        pytest.skip("on macOS the extension build compiles and links src/metal with the real SDK")
    root = EXTRACTED / "mlx"
    if (root / "include" / "mlx" / "backend" / "metal" / "device.h").is_file() and (
        root / "lib" / "libmlx.dylib"
    ).is_file():
        return root
    wheel = _wheel()
    if wheel is None:
        CACHE.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--platform", "macosx_14_0_arm64", "--python-version", "3.12", MLX_METAL,
            "-d", str(CACHE),
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"downloading {MLX_METAL} timed out (offline?)")
        wheel = _wheel()
        if result.returncode != 0 or wheel is None:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"cannot download {MLX_METAL} (offline?): {last}")
    partial = EXTRACTED.with_name(f"{EXTRACTED.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        members = [
            name
            for name in archive.namelist()
            if name.startswith("mlx/include/") or name == "mlx/lib/libmlx.dylib"
        ]
        archive.extractall(partial, members)
    shutil.rmtree(EXTRACTED, ignore_errors=True)
    os.replace(partial, EXTRACTED)
    return root


@pytest.fixture(scope="module")
def include_flags(mlx_metal: Path) -> list[str]:
    try:
        import nanobind
    except ImportError:
        pytest.skip("nanobind is not installed (its headers are needed)")
    python_include = sysconfig.get_paths()["include"]
    if not Path(python_include, "Python.h").is_file():
        pytest.skip(f"Python.h is not in {python_include} (nanobind's headers include it)")
    include = mlx_metal / "include"
    # Stand-ins first, so that GNU libobjc's objc/runtime.h never answers for Apple's.
    dirs = [STUBS, include, include / "metal_cpp", Path(nanobind.include_dir()), python_include]
    return [flag for d in dirs for flag in ("-isystem", str(d))]


def _clang(clangxx: str, flags: list[str], sources: list[Path], *extra: str):
    command = [clangxx, "-std=c++20", "-fblocks", *MLX_DEFINES, *flags, *extra]
    return subprocess.run(
        [*command, *map(str, sources)], capture_output=True, text=True, timeout=600
    )


def test_primitive_type_checks_against_mlx_metal_headers(clangxx, include_flags):
    sources = _sources()
    assert {p.name for p in sources} >= {"metal_launch.cpp", "metal_bindings.cpp"}
    result = _clang(clangxx, include_flags, sources, "-fsyntax-only", "-Wall", "-Wextra")
    assert result.returncode == 0, result.stderr
    # MLX's and metal_cpp's own headers are system headers here: any warning is ours.
    assert "warning:" not in result.stderr, result.stderr


PLANTED = [
    (
        "metal_launch.cpp",
        "kernel->maxTotalThreadsPerThreadgroup()",
        "kernel->maxTotalThreadsPerThreadGroup()",
        "no member named 'maxTotalThreadsPerThreadGroup' in 'MTL::ComputePipelineState'",
    ),
    (
        "metal_launch.cpp",
        "encoder.dispatch_threadgroups(",
        "encoder.dispatch_threadgroup(",
        "no member named 'dispatch_threadgroup' in 'mlx::core::metal::CommandEncoder'",
    ),
    (
        "metal_launch.cpp",
        "d.get_kernel(dispatch.kernel, lib, name, constant_list(values))",
        "d.get_kernel(dispatch.kernel, name, lib, constant_list(values))",
        "no matching member function for call to 'get_kernel'",
    ),
]


@pytest.mark.parametrize(
    ("file", "good", "bad", "message"), PLANTED, ids=["pipeline", "encoder", "argument-order"]
)
def test_planted_mistake_is_reported(clangxx, include_flags, tmp_path, file, good, bad, message):
    for source in SOURCES_DIR.iterdir():
        shutil.copy(source, tmp_path / source.name)
    text = (tmp_path / file).read_text()
    assert good in text, f"the planted mistake no longer matches {file}: update PLANTED"
    (tmp_path / file).write_text(text.replace(good, bad))
    result = _clang(clangxx, include_flags, [tmp_path / file], "-fsyntax-only")
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# Link check: every MLX / metal_cpp symbol the objects need is exported by libmlx.dylib.
# ---------------------------------------------------------------------------------------------


def _llvm_tool(name: str) -> str:
    path = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/llvm-*/bin/{name}"))), None)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt-get install -y llvm)")
    return path


def _normalise(symbol: str) -> str:
    """Demangled names from libc++/Darwin and libstdc++/Linux compared as one: int64_t is `long
    long` on Darwin and `long` on Linux; std's inline namespaces differ."""
    symbol = symbol.replace("std::__1::", "std::").replace("std::__cxx11::", "std::")
    return re.sub(r"\s+", " ", symbol.replace("long long", "long")).strip()


_NEEDED = re.compile(r"^(mlx::|MTL::|NS::|CA::|typeinfo for mlx::|vtable for mlx::)")


@pytest.fixture(scope="module")
def libmlx_exports(mlx_metal: Path) -> set[str]:
    nm, cxxfilt = _llvm_tool("llvm-nm"), _llvm_tool("llvm-cxxfilt")
    listing = subprocess.run(
        [nm, "-gU", "--defined-only", str(mlx_metal / "lib" / "libmlx.dylib")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    mangled = [line.split()[-1] for line in listing.stdout.splitlines() if line.strip()]
    demangled = subprocess.run(
        [cxxfilt, "-_"], input="\n".join(mangled), capture_output=True, text=True, check=True
    )
    exports = {_normalise(name) for name in demangled.stdout.splitlines()}
    assert len(exports) > 1000, "libmlx.dylib's export table looks wrong"
    return exports


def _missing(clangxx, include_flags, sources: list[Path], out: Path, exports: set[str]):
    nm = _llvm_tool("llvm-nm")
    needed: set[str] = set()
    for source in sources:
        obj = out / f"{source.stem}.o"
        result = _clang(clangxx, include_flags, [source], "-c", "-fPIC", "-o", str(obj))
        assert result.returncode == 0, result.stderr
        listing = subprocess.run([nm, "-u", "-C", str(obj)], capture_output=True, text=True)
        for line in listing.stdout.splitlines():
            symbol = line.strip().removeprefix("U ").strip()
            if _NEEDED.match(symbol):
                needed.add(symbol)
    return needed, sorted(s for s in needed if _normalise(s) not in exports)


def test_mlx_symbols_the_primitive_needs_are_exported(
    clangxx, include_flags, libmlx_exports, tmp_path
):
    needed, missing = _missing(clangxx, include_flags, _sources(), tmp_path, libmlx_exports)
    # The calls that matter are among them (so the check looks at the right objects).
    names = "\n".join(needed)
    for call in (
        "mlx::core::metal::device(",
        "mlx::core::metal::get_command_encoder(",
        "mlx::core::metal::Device::get_library(",
        "mlx::core::metal::Device::get_kernel(",
        "mlx::core::metal::CommandEncoder::dispatch_threadgroups(",
        "MTL::Private::Selector::s_kmaxTotalThreadsPerThreadgroup",
    ):
        assert call in names, f"{call} is not referenced: {names}"
    assert not missing, f"not exported by libmlx.dylib 0.32.4: {missing}"


def test_link_check_reports_a_hidden_mlx_function(clangxx, include_flags, libmlx_exports, tmp_path):
    # MLX's own copy helper is declared in an installed header but not exported.
    planted = tmp_path / "planted.cpp"
    planted.write_text(
        '#include "mlx/backend/gpu/copy.h"\n'
        "mlx::core::array f(const mlx::core::array& a, mlx::core::Stream s) {\n"
        "  return mlx::core::contiguous_copy_gpu(a, s);\n"
        "}\n"
    )
    _, missing = _missing(clangxx, include_flags, [planted], tmp_path, libmlx_exports)
    assert any("contiguous_copy_gpu" in s for s in missing), missing


def test_wheel_kernel_header_is_the_installed_one(mlx_metal):
    """The plan reads buffer indices from the installed MLX's sdpa_vector.h; the metallib is built
    from it too. The macOS wheel's copy must be the same text."""
    from aotc.mlx_info import mlx_include_dir

    installed = mlx_include_dir()
    if installed is None:
        pytest.skip("mlx is not installed")
    relative = Path("mlx/backend/metal/kernels/sdpa_vector.h")
    assert (mlx_metal / "include" / relative).read_text() == (installed / relative).read_text()


# ---------------------------------------------------------------------------------------------
# The evaluation-time rules (src/metal/program.cpp has no Metal in it) run against Linux MLX.
# ---------------------------------------------------------------------------------------------

HARNESS = r"""
#include <iostream>
#include <string>
#include <vector>

#include "mlx/mlx.h"
#include "program.h"

namespace mx = mlx::core;
namespace am = aotc::metal;

const std::vector<std::pair<const char*, am::Layout>> kLayouts = {
    {"any", am::Layout::Any},
    {"row_contiguous", am::Layout::RowContiguous},
    {"inner_contiguous", am::Layout::InnerContiguous},
    {"flat_batch_heads", am::Layout::FlatBatchHeads},
    {"inner_contiguous_flat_batch_heads", am::Layout::InnerContiguousFlatBatchHeads},
    {"row_contiguous_or_seq_major", am::Layout::RowContiguousOrSeqMajor},
    {"row_contiguous_or_seq_major_one_batch", am::Layout::RowContiguousOrSeqMajorOneBatch},
};

am::Value stride(std::vector<int> axes, bool zero) {
  am::Value v;
  v.kind = am::Value::Kind::StrideOf;
  v.input = 0;
  v.axes = std::move(axes);
  v.zero_if_singleton = zero;
  return v;
}

void report(const std::string& label, mx::array a) {
  mx::eval(a);
  std::cout << label << " fits";
  for (auto& [name, layout] : kLayouts) {
    if (am::fits(a, layout)) {
      std::cout << " " << name;
    }
  }
  std::cout << " | strides";
  if (a.ndim() == 4) {
    // MLX's k_head_stride, k_seq_stride, mask kv/q/head strides, as the sdpa plan asks for them.
    std::vector<am::Value> values = {
        stride({1, 0}, false), stride({2}, false), stride({3}, true), stride({2}, true),
        stride({1, 0}, true)};
    for (auto& v : values) {
      std::cout << " " << am::resolve(v, {a}).i;
    }
  }
  am::Value transposed;
  transposed.kind = am::Value::Kind::NotRowContiguous;
  transposed.input = 0;
  std::cout << " | not_row_contiguous " << am::resolve(transposed, {a}).i << "\n";
}

int main() {
  mx::set_default_device(mx::Device::cpu);
  report("q_rows", mx::zeros({2, 4, 1, 64}));
  // (B=1, L=3, H=8, D) viewed as (B, H, L, D): how mlx-lm builds decode queries.
  report("q_seq_major_b1", mx::transpose(mx::zeros({1, 3, 8, 64}), {0, 2, 1, 3}));
  // (L=3, B=2, H=1, D) viewed as (B, H, L, D): MLX's q_copy_unless takes it as transposed.
  report("q_seq_major_h1", mx::transpose(mx::zeros({3, 2, 1, 64}), {1, 2, 0, 3}));
  report("q_transposed_b2", mx::transpose(mx::zeros({2, 3, 4, 64}), {0, 2, 1, 3}));
  // A KV cache of 1024 rows holding 100.
  report("kv_cache_slice", mx::slice(mx::zeros({2, 4, 1024, 64}), {0, 0, 0, 0}, {2, 4, 100, 64}));
  report("kv_cache_slice_h1",
         mx::slice(mx::zeros({2, 1, 1024, 64}), {0, 0, 0, 0}, {2, 1, 100, 64}));
  report("kv_transposed_b2", mx::transpose(mx::zeros({2, 100, 4, 64}), {0, 2, 1, 3}));
  report("kv_transposed_b1", mx::transpose(mx::zeros({1, 100, 4, 64}), {0, 2, 1, 3}));
  report("kv_strided_inner",
         mx::slice(mx::zeros({1, 4, 100, 128}), {0, 0, 0, 0}, {1, 4, 100, 128}, {1, 1, 1, 2}));
  report("mask_broadcast_all", mx::broadcast_to(mx::zeros({1, 1, 1, 100}), {2, 4, 1, 100}));
  report("mask_broadcast_batch", mx::broadcast_to(mx::zeros({1, 4, 1, 100}), {2, 4, 1, 100}));
  report("mask_broadcast_heads", mx::broadcast_to(mx::zeros({2, 1, 3, 100}), {2, 4, 3, 100}));
  report("mask_full", mx::zeros({2, 4, 3, 100}));
  report("sinks", mx::zeros({8}));
  report("sinks_strided", mx::slice(mx::zeros({16}), {0}, {16}, {2}));

  std::vector<am::Constant> constants(4);
  constants[0] = {20, am::ScalarType::Bool, {}};
  constants[0].value.int_value = 1;
  constants[1] = {21, am::ScalarType::Bool, {}};
  constants[1].value.kind = am::Value::Kind::NotRowContiguous;
  constants[1].value.input = 0;
  constants[2] = {26, am::ScalarType::Int32, {}};
  constants[2].value.int_value = 128;
  constants[3] = {30, am::ScalarType::Float32, {}};
  constants[3].value.kind = am::Value::Kind::Float;
  constants[3].value.float_value = 0.125;
  auto q = mx::transpose(mx::zeros({1, 3, 8, 64}), {0, 2, 1, 3});
  mx::eval(q);
  std::cout << "hash " << am::hash_name("k", am::resolve_constants(constants, {q})) << "\n";

  am::Program program;
  program.layouts = {am::Layout::Any};
  program.outputs = {{{1}, mx::float32}};
  try {
    am::check_program(program, {q, q});
  } catch (const std::invalid_argument& e) {
    std::cout << "error " << e.what() << "\n";
  }
  am::Dispatch d;
  d.kernel = "k";
  am::Buffer b;
  b.index = 3;
  b.is_array = true;
  b.array = {am::ArrayRef::Kind::Temporary, 0};
  d.buffers = {b};
  program.dispatches = {d};
  try {
    am::check_program(program, {q});
  } catch (const std::invalid_argument& e) {
    std::cout << "error " << e.what() << "\n";
  }
  return 0;
}
"""

# label -> (layouts it fits besides "any", [k_head, k_seq, mask_kv, mask_q, mask_head] strides,
# not_row_contiguous), from MLX's copy_unless lambdas and stride reads in eval_gpu/sdpa_vector.
LAYOUT_CASES = {
    "q_rows": (
        {"row_contiguous", "inner_contiguous", "flat_batch_heads",
         "inner_contiguous_flat_batch_heads", "row_contiguous_or_seq_major",
         "row_contiguous_or_seq_major_one_batch"},
        [64, 64, 1, 0, 64], 0,
    ),
    "q_seq_major_b1": (
        {"inner_contiguous", "flat_batch_heads", "inner_contiguous_flat_batch_heads",
         "row_contiguous_or_seq_major", "row_contiguous_or_seq_major_one_batch"},
        [64, 512, 1, 512, 64], 1,
    ),
    # Accepted by MLX's q_copy_unless, but sdpa_vector_2pass_1 would index it as B == 1.
    "q_seq_major_h1": (
        {"inner_contiguous", "flat_batch_heads", "inner_contiguous_flat_batch_heads",
         "row_contiguous_or_seq_major"},
        [64, 128, 1, 128, 64], 1,
    ),
    "q_transposed_b2": (
        {"inner_contiguous"},
        [64, 256, 1, 256, 64], 1,
    ),
    "kv_cache_slice": (
        {"inner_contiguous", "flat_batch_heads", "inner_contiguous_flat_batch_heads"},
        [65536, 64, 1, 64, 65536], 1,
    ),
    "kv_cache_slice_h1": (
        {"inner_contiguous", "flat_batch_heads", "inner_contiguous_flat_batch_heads"},
        [65536, 64, 1, 64, 65536], 1,
    ),
    "kv_transposed_b2": (
        {"inner_contiguous"},
        [64, 256, 1, 256, 64], 1,
    ),
    "kv_transposed_b1": (
        {"inner_contiguous", "flat_batch_heads", "inner_contiguous_flat_batch_heads",
         "row_contiguous_or_seq_major", "row_contiguous_or_seq_major_one_batch"},
        [64, 256, 1, 256, 64], 1,
    ),
    "kv_strided_inner": (
        {"flat_batch_heads"},
        [12800, 128, 2, 128, 12800], 1,
    ),
    # A mask broadcast over batch and heads walks as one flat axis of stride 0: no copy.
    "mask_broadcast_all": (
        {"inner_contiguous", "flat_batch_heads", "inner_contiguous_flat_batch_heads"},
        [0, 0, 1, 0, 0], 1,
    ),
    "mask_broadcast_batch": ({"inner_contiguous"}, [100, 0, 1, 0, 100], 1),
    "mask_broadcast_heads": ({"inner_contiguous"}, [0, 100, 1, 100, 0], 1),
    "mask_full": (
        {"row_contiguous", "inner_contiguous", "flat_batch_heads",
         "inner_contiguous_flat_batch_heads", "row_contiguous_or_seq_major",
         "row_contiguous_or_seq_major_one_batch"},
        [300, 100, 1, 100, 300], 0,
    ),
    "sinks": (
        {"row_contiguous", "inner_contiguous", "flat_batch_heads",
         "inner_contiguous_flat_batch_heads", "row_contiguous_or_seq_major",
         "row_contiguous_or_seq_major_one_batch"},
        None, 0,
    ),
    "sinks_strided": ({"flat_batch_heads"}, None, 1),
}  # fmt: skip


def _installed_mlx_cpp() -> tuple[Path, Path]:
    """The installed MLX's C++ headers and library folder (the Linux wheel ships both)."""
    from aotc.mlx_info import mlx_include_dir

    include = mlx_include_dir()
    lib = include.parent / "lib" if include else None
    if include is None or lib is None or not any(lib.glob("libmlx.*")):
        pytest.skip("MLX's C++ library and headers (mlx/include, mlx/lib) are not installed")
    return include, lib


@pytest.fixture(scope="module")
def layout_report(clangxx, tmp_path_factory) -> dict[str, str]:
    include, lib = _installed_mlx_cpp()
    work = tmp_path_factory.mktemp("harness")
    (work / "harness.cpp").write_text(HARNESS)
    binary = work / "harness"
    command = [
        clangxx, "-std=c++20", "-I", str(SOURCES_DIR), "-isystem", str(include),
        str(work / "harness.cpp"), str(SOURCES_DIR / "program.cpp"),
        f"-L{lib}", "-lmlx", f"-Wl,-rpath,{lib}", "-o", str(binary),
    ]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    lines: dict[str, str] = {}
    for line in ran.stdout.splitlines():
        key, _, rest = line.partition(" ")
        lines.setdefault(key, "")
        lines[key] += rest if not lines[key] else "\n" + rest
    return lines


@pytest.mark.parametrize("label", sorted(LAYOUT_CASES))
def test_layout_rules_on_real_mlx_arrays(layout_report, label):
    fits, strides, not_row_contiguous = LAYOUT_CASES[label]
    line = layout_report[label]
    got_fits, got_strides, got_flag = (part.split() for part in line.split(" | "))
    assert set(got_fits[1:]) == {"any", *fits}
    if strides is not None:
        assert [int(s) for s in got_strides[1:]] == strides
    assert int(got_flag[1]) == not_row_contiguous


def test_constant_values_and_program_checks(layout_report):
    # 0.125f is 0x3e000000; query_transposed is read from the (seq-major) input.
    assert layout_report["hash"] == "k_fc20_t_fc21_t_fc26_128_fc30_f1040187392"
    assert layout_report["error"].splitlines() == [
        "[aotc.metal_launch] the program takes 1 inputs, got 2",
        "[aotc.metal_launch] k binds buffer(3) to an array that the program does not have",
    ]


# ---------------------------------------------------------------------------------------------
# The bindings (metal_bindings.cpp) built into a Linux module, with the Metal half (metal_launch's
# launch/max_threads/architecture) replaced by a shim: the wire parser, MetalProgram, the checks
# and MLX's array type casters across extensions (nanobind domain "mlx") run for real.
# ---------------------------------------------------------------------------------------------

SHIM = r"""
#include <sstream>

#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include "metal_bindings.h"
#include "metal_launch.h"

namespace am = aotc::metal;
namespace mx = mlx::core;
namespace nb = nanobind;

namespace aotc::metal {
// The Metal half of metal_launch.cpp, replaced: validate as launch() does, hand back the inputs.
std::vector<mx::array> launch(
    const std::string&, std::vector<mx::array> inputs, Program program, mx::StreamOrDevice) {
  check_program(program, inputs);
  return inputs;
}
size_t max_threads_per_threadgroup(
    const std::string&, const std::string&, const std::vector<Constant>& c, mx::StreamOrDevice) {
  return 1000 + c.size();
}
std::string architecture(mx::StreamOrDevice) {
  return "shim";
}
} // namespace aotc::metal

static void value(std::ostream& out, const am::Value& v) {
  out << " " << static_cast<int>(v.kind) << " " << v.int_value << " " << v.float_value << " "
      << v.input << " " << v.zero_if_singleton;
  for (int a : v.axes) {
    out << " a" << a;
  }
}

static std::string describe(const am::Program& p) {
  std::ostringstream out;
  out << "layouts";
  for (auto l : p.layouts) {
    out << " " << static_cast<int>(l);
  }
  out << "\n";
  for (const auto* specs : {&p.outputs, &p.temporaries}) {
    for (const auto& s : *specs) {
      out << (specs == &p.outputs ? "output" : "temporary");
      for (auto d : s.shape) {
        out << " " << d;
      }
      out << " dtype " << static_cast<int>(s.dtype.val()) << "\n";
    }
  }
  for (const auto& d : p.dispatches) {
    out << "dispatch " << d.kernel << " grid " << d.grid[0] << " " << d.grid[1] << " "
        << d.grid[2] << " threadgroup " << d.threadgroup[0] << " " << d.threadgroup[1] << " "
        << d.threadgroup[2] << "\n";
    for (const auto& c : d.constants) {
      out << "  constant " << c.index << " " << static_cast<int>(c.type);
      value(out, c.value);
      out << "\n";
    }
    for (const auto& b : d.buffers) {
      out << "  buffer " << b.index;
      if (b.is_array) {
        out << " array " << static_cast<int>(b.array.kind) << " " << b.array.index << " "
            << b.written;
      } else {
        out << " bytes " << static_cast<int>(b.type);
        value(out, b.value);
      }
      out << "\n";
    }
  }
  return out.str();
}

NB_MODULE(aotc_metal_shim, m) {
  aotc_register_metal(m);
  m.def("describe", [](nb::handle h) { return describe(nb::cast<const am::Program&>(h)); });
}
"""

_LAYOUT_IDS = {name: i for i, name in enumerate(typing.get_args(Layout))}
_DTYPE_IDS = {"bool": 0, "float16": 9, "float32": 10, "bfloat16": 12}  # mlx::core::Dtype::Val
_SCALAR_IDS = {"bool": 0, "int32": 1, "uint64": 2, "float32": 3}  # ScalarType
_ARRAY_IDS = {"input": 0, "output": 1, "temporary": 2}  # ArrayRef::Kind


def _value(value, params) -> str:
    """program.h's Value (kind, int, float, input, zero_if_singleton, axes), printed by the shim."""
    if isinstance(value, metal.Const | metal.Param):
        literal = value.value if isinstance(value, metal.Const) else params[value.name]
        if isinstance(literal, float):
            return f" 1 0 {literal:g} -1 0"
        return f" 0 {int(literal)} 0 -1 0"
    if isinstance(value, metal.StrideOf):
        axes = "".join(f" a{a}" for a in value.axes)
        return f" 2 0 0 {value.input} {int(value.singleton == 'zero')}{axes}"
    return f" 3 0 0 {value.input} 0"


def _describe(plan, params) -> str:
    """What the C++ parser must make of `plan.wire(params)`, from the plan's dataclasses."""
    lines = ["layouts" + "".join(f" {_LAYOUT_IDS[i.layout]}" for i in plan.inputs)]
    for kind, specs in (("output", plan.outputs), ("temporary", plan.temporaries)):
        for spec in specs:
            dims = "".join(f" {d}" for d in spec.shape)
            lines.append(f"{kind}{dims} dtype {_DTYPE_IDS[spec.dtype]}")
    for d in plan.dispatches:
        grid, group = " ".join(map(str, d.grid)), " ".join(map(str, d.threadgroup))
        lines.append(f"dispatch {d.kernel} grid {grid} threadgroup {group}")
        for c in d.constants:
            lines.append(f"  constant {c.index} {_SCALAR_IDS[c.type]}{_value(c.value, params)}")
        for b in d.buffers:
            if isinstance(b, metal.ArrayBuffer):
                kind = _ARRAY_IDS[b.array.kind]
                lines.append(
                    f"  buffer {b.index} array {kind} {b.array.index} {int(b.access == 'write')}"
                )
            else:
                lines.append(
                    f"  buffer {b.index} bytes {_SCALAR_IDS[b.type]}{_value(b.value, params)}"
                )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def shim(clangxx, tmp_path_factory):
    try:
        import nanobind
    except ImportError:
        pytest.skip("nanobind is not installed")
    include, lib = _installed_mlx_cpp()
    python_include = sysconfig.get_paths()["include"]
    if not Path(python_include, "Python.h").is_file():
        pytest.skip(f"Python.h is not in {python_include}")
    work = tmp_path_factory.mktemp("shim")
    (work / "shim.cpp").write_text(SHIM)
    source_dir = Path(nanobind.source_dir())
    module = work / f"aotc_metal_shim{sysconfig.get_config_var('EXT_SUFFIX')}"
    command = [
        clangxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-fvisibility=hidden",
        # MLX's Python module shares its types in nanobind's domain "mlx" (as extensions must).
        "-DNB_DOMAIN=mlx", "-I", str(SOURCES_DIR),
        "-isystem", nanobind.include_dir(),
        "-isystem", str(source_dir.parent / "ext" / "robin_map" / "include"),
        "-isystem", python_include, "-isystem", str(include),
        str(work / "shim.cpp"), str(SOURCES_DIR / "metal_bindings.cpp"),
        str(SOURCES_DIR / "program.cpp"), str(source_dir / "nb_combined.cpp"),
        f"-L{lib}", "-lmlx", f"-Wl,-rpath,{lib}", "-o", str(module),
    ]  # fmt: skip
    if sys.platform == "darwin":
        command[1:1] = ["-undefined", "dynamic_lookup"]
    built = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    sys.path.insert(0, str(work))
    try:
        import aotc_metal_shim
    finally:
        sys.path.remove(str(work))
    return aotc_metal_shim


def _shim_plans():
    from aotc.families.sdpa_vector.problem import AttentionProblem

    def problem(**kw):
        base = dict(batch=2, q_heads=8, kv_heads=2, q_len=1, kv_len=2048, qk_dim=256, v_dim=128,
                    dtype="float16", mask="none", mask_shape=None, has_sinks=False)  # fmt: skip
        base.update(kw)
        return AttentionProblem(**base)

    return {
        "one_pass_bool_mask": metal.plan_attention(
            problem(mask="bool", mask_shape=(2, 8, 1, 2048), q_len=1), "applegpu_g15g"
        ),
        "split_additive_sinks": metal.plan_attention(
            problem(
                mask="additive",
                mask_shape=(2, 8, 2, 2048),
                q_len=2,
                has_sinks=True,
                dtype="bfloat16",
            ),
            "applegpu_g15s",
        ),
        "causal_float32": metal.plan_attention(
            problem(mask="causal", q_len=4, dtype="float32"), "applegpu_g14d"
        ),
    }


@pytest.mark.parametrize("name", ["one_pass_bool_mask", "split_additive_sinks", "causal_float32"])
def test_bindings_parse_every_plan_field(shim, name):
    plan = _shim_plans()[name]
    params = {"scale": 0.0625}
    program = plan.program(shim, params)
    assert type(program).__name__ == "MetalProgram"
    assert plan.program(shim, params) is program  # parsed once per parameter values
    assert shim.describe(program) == _describe(plan, params)
    assert shim.describe(shim.metal_program(plan.wire(params))) == _describe(plan, params)


def test_bindings_take_mlx_arrays_and_report_errors(shim):
    import mlx.core as mx

    plan = _shim_plans()["split_additive_sinks"]
    arrays = [
        mx.zeros((2, 8, 2, 256), dtype=mx.bfloat16),
        mx.zeros((2, 2, 2048, 256), dtype=mx.bfloat16),
        mx.zeros((2, 2, 2048, 128), dtype=mx.bfloat16),
        mx.zeros((2, 8, 2, 2048), dtype=mx.bfloat16),
        mx.zeros((8,), dtype=mx.bfloat16),
    ]
    program = plan.program(shim, {"scale": 0.0625})
    # mx.array crosses into this module's std::vector<mlx::core::array> and back.
    out = shim.metal_launch("x.metallib", arrays, program, stream=None)
    assert [a.shape for a in out] == [a.shape for a in arrays]
    out = shim.metal_launch("x.metallib", arrays, plan.wire({"scale": 1.0}))  # a wire dict too
    assert len(out) == 5
    with pytest.raises(ValueError, match="the program takes 5 inputs, got 3"):
        shim.metal_launch("x.metallib", arrays[:3], program)
    bad = {**plan.wire({"scale": 1.0}), "version": 2}
    with pytest.raises(ValueError, match="version 2 is not 1"):
        shim.metal_program(bad)
    wire = plan.wire({"scale": 1.0})
    broken = {**wire, "inputs": [{**wire["inputs"][0], "layout": "diagonal"}, *wire["inputs"][1:]]}
    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        shim.metal_program(broken)
    constants = [{"index": 20, "type": "bool", "value": True}]
    assert shim.metal_max_threads("x.metallib", "k", constants) == 1001
    with pytest.raises(ValueError, match="function constants are bool, int32 or float32"):
        shim.metal_max_threads("x.metallib", "k", [{"index": 6, "type": "uint64", "value": 1}])
    assert shim.metal_architecture() == "shim"


# ---------------------------------------------------------------------------------------------
# The layout-copy kernel that metal_launch.cpp builds from source when an input needs a copy:
# parsed and instantiated as C++ (no Metal compiler here), with MLX's instantiation form.
# ---------------------------------------------------------------------------------------------

METAL_STDLIB_STANDIN = """\
// C++ stand-in for <metal_stdlib>: address spaces vanish, Metal's short type names exist.
#pragma once
#include <cstdint>
namespace metal {
using uchar = unsigned char;
using ushort = unsigned short;
using uint = unsigned int;
using ulong = unsigned long;
}
#define device
#define constant
"""


def test_layout_copy_kernel_parses_as_cpp(clangxx, tmp_path):
    source = (SOURCES_DIR / "metal_launch.cpp").read_text()
    kernel = re.search(r'R"metal\((.*?)\)metal"', source, re.S).group(1)
    # MLX's instantiate_kernel (kernels/defines.h): attributes where only Metal allows them.
    metal_form = "template [[host_name(name)]] [[kernel]] decltype(aotc_strided_copy<type>)"
    assert metal_form in kernel
    for n, type_name in ((1, "uchar"), (2, "ushort"), (4, "uint"), (8, "ulong")):
        assert f'AOTC_COPY("aotc_strided_copy_{n}", {type_name})' in kernel
    (tmp_path / "metal_stdlib").write_text(METAL_STDLIB_STANDIN)
    (tmp_path / "copy.cpp").write_text(
        kernel.replace(metal_form, "template decltype(aotc_strided_copy<type>)")
    )
    result = subprocess.run(
        [clangxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unknown-attributes",
         "-I", str(tmp_path), str(tmp_path / "copy.cpp")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
