// aotc._ext: MLX primitives that run kernels of prebuilt aotc libraries.
//
// Every build has CudaImage, cuda_launch and has_cuda(); cuda_launch works only
// when the extension was built against an MLX with a CUDA backend
// (AOTC_WITH_CUDA, see CMakeLists.txt). On Apple platforms the Metal
// primitive's bindings are added (AOTC_WITH_METAL).
#include <array>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "cuda/cuda_launch.h"
#include "mlx/array.h"
#include "mlx/utils.h"

#ifdef AOTC_WITH_METAL
#include "metal/metal_bindings.h"
#endif

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace {

#ifdef AOTC_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// The Python object CudaImage owns a C++ shared_ptr, so that primitives keep
// the image alive without holding a Python reference (they may be released on
// threads without the GIL).
struct PyCudaImage {
  std::shared_ptr<aotc::CudaImage> image;
};

// A Python callable as a Gradient. Primitives may be released on threads that
// do not hold the GIL, so the reference is dropped under the GIL (and leaked
// once the interpreter is gone).
aotc::Gradient wrap_gradient(nb::object fn) {
  if (fn.is_none()) {
    return {};
  }
  std::shared_ptr<nb::object> holder(
      new nb::object(std::move(fn)), [](nb::object* p) {
        if (Py_IsInitialized()) {
          nb::gil_scoped_acquire gil;
          delete p;
        }
      });
  return [holder](
             const std::vector<mx::array>& primals,
             const std::vector<mx::array>& cotangents) {
    nb::gil_scoped_acquire gil;
    return nb::cast<std::vector<mx::array>>((*holder)(primals, cotangents));
  };
}

// Everything of a launch but its inputs: made once per plan step, so that a call converts only
// the input list from Python (a decode step's host time is mostly argument conversion).
struct LaunchSpec {
  std::shared_ptr<aotc::CudaImage> image;
  std::string kernel;
  std::vector<mx::Shape> output_shapes;
  std::vector<mx::Dtype> output_dtypes;
  std::array<int64_t, 3> grid;
  std::array<int64_t, 3> block;
  int64_t shared_memory;
  std::string params;
  std::vector<int> strided_inputs;
};

LaunchSpec make_spec(
    const PyCudaImage& image,
    std::string kernel,
    const std::vector<std::vector<int>>& output_shapes,
    std::vector<mx::Dtype> output_dtypes,
    std::array<int64_t, 3> grid,
    std::array<int64_t, 3> block,
    int64_t shared_memory,
    const nb::bytes& params,
    std::vector<int> strided_inputs) {
  std::vector<mx::Shape> shapes;
  shapes.reserve(output_shapes.size());
  for (auto& shape : output_shapes) {
    shapes.emplace_back(shape.begin(), shape.end());
  }
  return LaunchSpec{
      image.image,
      std::move(kernel),
      std::move(shapes),
      std::move(output_dtypes),
      grid,
      block,
      shared_memory,
      std::string(params.c_str(), params.size()),
      std::move(strided_inputs)};
}

std::vector<mx::array> launch(
    const LaunchSpec& spec,
    std::vector<mx::array> inputs,
    std::vector<mx::array> gradient_inputs,
    nb::object gradient,
    mx::StreamOrDevice s) {
#ifdef AOTC_WITH_CUDA
  return aotc::cuda_launch(
      spec.image,
      spec.kernel,
      std::move(inputs),
      spec.output_shapes,
      spec.output_dtypes,
      spec.grid,
      spec.block,
      spec.shared_memory,
      spec.params,
      spec.strided_inputs,
      std::move(gradient_inputs),
      wrap_gradient(std::move(gradient)),
      s);
#else
  aotc::check_launch_args(
      spec.kernel,
      inputs.size(),
      spec.output_shapes,
      spec.output_dtypes,
      spec.grid,
      spec.block,
      spec.shared_memory,
      spec.strided_inputs,
      mx::to_stream(s));
  throw std::runtime_error(
      "[aotc.cuda_launch] this aotc._ext was built without the CUDA primitive: the MLX it "
      "was built against has no CUDA backend");
#endif
}

std::vector<mx::array> cuda_launch(
    const PyCudaImage& image,
    std::string kernel,
    std::vector<mx::array> inputs,
    const std::vector<std::vector<int>>& output_shapes,
    std::vector<mx::Dtype> output_dtypes,
    std::array<int64_t, 3> grid,
    std::array<int64_t, 3> block,
    int64_t shared_memory,
    const nb::bytes& params,
    std::vector<int> strided_inputs,
    std::vector<mx::array> gradient_inputs,
    nb::object gradient,
    mx::StreamOrDevice s) {
  auto spec = make_spec(
      image,
      std::move(kernel),
      output_shapes,
      std::move(output_dtypes),
      grid,
      block,
      shared_memory,
      params,
      std::move(strided_inputs));
  return launch(
      spec, std::move(inputs), std::move(gradient_inputs), std::move(gradient), s);
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "aotc's MLX primitives: launch kernels of prebuilt aotc libraries.";

  m.attr("WITH_CUDA") = kWithCuda;

  nb::class_<PyCudaImage>(
      m,
      "CudaImage",
      "The bytes of an aotc fatbin. A CUDA module is loaded from them once per device, on "
      "first use (thread-safe), and kept for the rest of the process.")
      .def(
          "__init__",
          [](PyCudaImage* self, const nb::bytes& data) {
            if (data.size() == 0) {
              throw std::invalid_argument(
                  "[aotc.CudaImage] the image is empty");
            }
            new (self) PyCudaImage{std::make_shared<aotc::CudaImage>(
                std::string(data.c_str(), data.size()))};
          },
          "data"_a)
      .def_prop_ro(
          "nbytes",
          [](const PyCudaImage& self) { return self.image->data().size(); })
      .def("__repr__", [](const PyCudaImage& self) {
        return "CudaImage(" + std::to_string(self.image->data().size()) +
            " bytes)";
      });

  m.def(
      "cuda_launch",
      &cuda_launch,
      "image"_a,
      "kernel"_a,
      "inputs"_a,
      "output_shapes"_a,
      "output_dtypes"_a,
      "grid"_a,
      "block"_a,
      "shared_memory"_a,
      "params"_a,
      "strided_inputs"_a,
      nb::kw_only(),
      "gradient_inputs"_a = std::vector<mx::array>{},
      "gradient"_a = nb::none(),
      "stream"_a = nb::none(),
      R"(Launch kernel `kernel` of `image` on MLX's CUDA backend; returns the outputs (lazy).

The kernel's parameters are (inputs as const pointers..., outputs as pointers..., Params by
value). Params is the int64 strides (elements, all dimensions) of the inputs at the indices
`strided_inputs`, in that order, filled in at evaluation, followed by the bytes `params`.
Inputs not in `strided_inputs` are passed row-contiguous. `grid` counts blocks. Raises
ValueError for a CPU stream or malformed arguments, RuntimeError without the CUDA primitive.

`gradient_inputs` are further inputs of the primitive that the kernel does not see, and
`gradient(primals, cotangents) -> cotangents of all inputs` its gradient; without one, asking
for a gradient raises.)");

  nb::class_<LaunchSpec>(
      m,
      "PreparedLaunch",
      "A cuda_launch with everything but its inputs fixed: calling it costs converting the "
      "inputs only.")
      .def(
          nb::new_(&make_spec),
          "image"_a,
          "kernel"_a,
          "output_shapes"_a,
          "output_dtypes"_a,
          "grid"_a,
          "block"_a,
          "shared_memory"_a,
          "params"_a,
          "strided_inputs"_a)
      .def(
          "__call__",
          &launch,
          "inputs"_a,
          "gradient_inputs"_a = std::vector<mx::array>{},
          "gradient"_a = nb::none(),
          "stream"_a = nb::none(),
          "cuda_launch(image, kernel, inputs, ...) with this launch's fixed arguments; "
          "gradient_inputs and gradient may be passed positionally.")
      .def_prop_ro("kernel", [](const LaunchSpec& self) { return self.kernel; });

  m.def(
      "has_cuda",
      []() {
#ifdef AOTC_WITH_CUDA
        return aotc::cuda_available();
#else
        return false;
#endif
      },
      "True when this extension has the CUDA primitive and MLX's CUDA backend is available.");

  m.def(
      "cuda_sm_count",
      [](int device) -> int {
#ifdef AOTC_WITH_CUDA
        return aotc::sm_count(device);
#else
        (void)device;
        throw std::runtime_error("[aotc] this extension was built without CUDA");
#endif
      },
      "device"_a = 0,
      "Streaming multiprocessors of MLX's CUDA device `device`.");

  m.def(
      "cuda_clear_cache",
      []() {
#ifdef AOTC_WITH_CUDA
        aotc::clear_cache();
#endif
      },
      "Return the unused memory of aotc's CUDA output pools to the driver.");

  m.def(
      "_set_cuda_output_allocator",
      [](const std::string& name) {
#ifdef AOTC_WITH_CUDA
        aotc::set_output_allocator(name);
#else
        if (name != "pool" && name != "mlx") {
          throw std::invalid_argument("unknown CUDA output allocator " + name);
        }
#endif
      },
      "name"_a,
      "Testing aid: 'pool' (default; device memory, stream-ordered) or 'mlx' (MLX's "
      "allocator::malloc, unified memory). The environment variable AOTC_CUDA_ALLOC=mlx "
      "selects 'mlx' at start.");

  m.def("_cuda_output_allocator", []() -> std::string {
#ifdef AOTC_WITH_CUDA
    return aotc::output_allocator();
#else
    return "none";
#endif
  });

#ifdef AOTC_WITH_METAL
  aotc_register_metal(m);
#endif
}
