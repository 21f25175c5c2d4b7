// aotc._ext: MLX primitives that run kernels of prebuilt aotc libraries.
//
// Every build has CudaImage, cuda_launch and has_cuda(); cuda_launch works only
// when the extension was built against an MLX with a CUDA backend
// (AOTC_WITH_CUDA, see CMakeLists.txt). On Apple platforms the Metal
// primitive's bindings are added (AOTC_WITH_METAL).
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "call_table.h"
#include "eval_polling.h"
#include "mlx_attention_call.h"
#include "cuda/cuda_launch.h"
#include "cuda/cuda_plan.h"
#include "mlx/array.h"
#include "mlx/utils.h"

#ifdef AOTC_WITH_METAL
#include "metal/metal_bindings.h"
#endif

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

#ifndef AOTC_WITH_CUDA
namespace aotc {
// Builds without the CUDA primitive check a launch as the CUDA build does, then
// say why they cannot run it.
std::vector<mx::array> launch_chain(
    ChainPtr chain,
    std::vector<mx::array> inputs,
    std::vector<mx::array>,
    Gradient,
    mx::StreamOrDevice s) {
  check_chain(*chain, inputs.size(), mx::to_stream(s));
  throw std::runtime_error(
      "[aotc.cuda_launch] this aotc._ext was built without the CUDA primitive: the MLX it "
      "was built against has no CUDA backend");
}
} // namespace aotc
#endif

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

// A LaunchSpec from Python's arguments (made once per plan step).
struct PreparedLaunch {
  std::shared_ptr<const aotc::LaunchSpec> spec;
};

// Tensor maps as Python passes them: (input, box columns, box rows[, box
// planes]) each.
using TensorMapArgs = std::vector<std::vector<int64_t>>;

// Box sizes outside uint32 are refused by the spec's checks, not wrapped.
std::vector<aotc::TensorMapSpec> tensor_map_specs(const TensorMapArgs& maps) {
  std::vector<aotc::TensorMapSpec> specs;
  specs.reserve(maps.size());
  for (auto& map : maps) {
    if (map.size() != 3 && map.size() != 4) {
      throw std::invalid_argument(
          "[aotc.cuda_launch] a tensor map is (input, box columns, box rows[, box planes]), "
          "not " + std::to_string(map.size()) + " numbers");
    }
    auto box = [](int64_t n) { return n < 1 || n > 256 ? 0u : uint32_t(n); };
    // Out of int's range: clamped, so that the spec's index checks name the problem.
    const int input = int(std::clamp<int64_t>(map[0], -1, INT32_MAX));
    specs.push_back({input, box(map[1]), box(map[2]), map.size() == 4 ? box(map[3]) : 1u});
  }
  return specs;
}

// A view alternative as Python passes it: (kernel, block, shared memory, view
// input, base input), or None.
using AlternativeArg = std::optional<
    std::tuple<std::string, std::array<int64_t, 3>, int64_t, int64_t, int64_t>>;

std::optional<aotc::ViewAlternative> view_alternative(const AlternativeArg& arg) {
  if (!arg) {
    return std::nullopt;
  }
  auto& [kernel, block, smem, view, base] = *arg;
  // Out of range: clamped, so that the spec's checks name the problem.
  auto dim = [](int64_t n) { return uint32_t(std::clamp<int64_t>(n, 0, 1 << 20)); };
  auto index = [](int64_t i) { return int(std::clamp<int64_t>(i, -1, INT32_MAX)); };
  return aotc::ViewAlternative{
      kernel,
      {dim(block[0]), dim(block[1]), dim(block[2])},
      uint32_t(std::clamp<int64_t>(smem, 0, (int64_t(1) << 32) - 1)),
      index(view),
      index(base)};
}

PreparedLaunch make_prepared(
    const PyCudaImage& image,
    std::string kernel,
    const std::vector<std::vector<int>>& output_shapes,
    std::vector<mx::Dtype> output_dtypes,
    std::array<int64_t, 3> grid,
    std::array<int64_t, 3> block,
    int64_t shared_memory,
    const nb::bytes& params,
    std::vector<int> strided_inputs,
    std::vector<int> unread_inputs,
    const TensorMapArgs& tensor_maps,
    bool overlaps_previous,
    std::vector<int> scratch_outputs,
    const AlternativeArg& alternative) {
  std::vector<mx::Shape> shapes;
  shapes.reserve(output_shapes.size());
  for (auto& shape : output_shapes) {
    shapes.emplace_back(shape.begin(), shape.end());
  }
  return PreparedLaunch{aotc::make_launch_spec(
      image.image,
      std::move(kernel),
      std::move(shapes),
      std::move(output_dtypes),
      grid,
      block,
      shared_memory,
      std::string(params.c_str(), params.size()),
      std::move(strided_inputs),
      std::move(unread_inputs),
      tensor_map_specs(tensor_maps),
      overlaps_previous,
      std::move(scratch_outputs),
      view_alternative(alternative))};
}

std::vector<mx::array> launch_prepared(
    const PreparedLaunch& prepared,
    std::vector<mx::array> inputs,
    std::vector<mx::array> gradient_inputs,
    nb::object gradient,
    mx::StreamOrDevice s) {
  return aotc::launch(
      prepared.spec,
      std::move(inputs),
      std::move(gradient_inputs),
      wrap_gradient(std::move(gradient)),
      s);
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
    const TensorMapArgs& tensor_maps,
    std::vector<mx::array> gradient_inputs,
    nb::object gradient,
    mx::StreamOrDevice s) {
  auto prepared = make_prepared(
      image,
      std::move(kernel),
      output_shapes,
      std::move(output_dtypes),
      grid,
      block,
      shared_memory,
      params,
      std::move(strided_inputs),
      {},
      tensor_maps,
      false,
      {},
      std::nullopt);
  return launch_prepared(
      prepared, std::move(inputs), std::move(gradient_inputs), std::move(gradient), s);
}

// The arrays in `tree` (lists, tuples and dicts' values, nested; other leaves
// are ignored), as mx.eval takes them.
void flatten_arrays(nb::handle tree, std::vector<mx::array>& out) {
  if (auto* a = aotc::as_array(tree)) {
    out.push_back(*a);
  } else if (nb::isinstance<nb::list>(tree) || nb::isinstance<nb::tuple>(tree)) {
    for (nb::handle item : tree) {
      flatten_arrays(item, out);
    }
  } else if (nb::isinstance<nb::dict>(tree)) {
    for (auto [key, value] : nb::borrow<nb::dict>(tree)) {
      flatten_arrays(value, out);
    }
  }
}

// `spin` seconds as a polling budget: infinity polls until done, and so does a
// budget of a year or more (nanoseconds from now past ~292 years overflow).
std::optional<std::chrono::nanoseconds> spin_budget(double spin) {
  if (std::isnan(spin) || spin < 0) {
    throw std::invalid_argument("[aotc.eval] spin must be >= 0 or inf");
  }
  if (spin >= 365.0 * 24 * 3600) {
    return std::nullopt;
  }
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::duration<double>(spin));
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "aotc's MLX primitives: launch kernels of prebuilt aotc libraries.";

  m.attr("WITH_CUDA") = kWithCuda;
  m.attr("NO_SOURCE") = aotc::kNoSource;

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
      "tensor_maps"_a = TensorMapArgs{},
      "gradient_inputs"_a = std::vector<mx::array>{},
      "gradient"_a = nb::none(),
      "stream"_a = nb::none(),
      R"(Launch kernel `kernel` of `image` on MLX's CUDA backend; returns the outputs (lazy).

The kernel's parameters are (inputs as const pointers..., outputs as pointers..., Params by
value). Params is the int64 strides (elements, all dimensions) of the inputs at the indices
`strided_inputs`, in that order, filled in at evaluation, followed by the bytes `params`.
Inputs not in `strided_inputs` are passed row-contiguous. `tensor_maps`: (input index, box
columns, box rows[, box planes]) of TMA descriptors encoded at evaluation after those bytes (see
docs/ARCHITECTURE.md, "The CUDA launch contract"). `grid` counts blocks. Raises
ValueError for a CPU stream or malformed arguments, RuntimeError without the CUDA primitive.

`gradient_inputs` are further inputs of the primitive that the kernel does not see, and
`gradient(primals, cotangents) -> cotangents of all inputs` its gradient; without one, asking
for a gradient raises.)");

  nb::class_<PreparedLaunch>(
      m,
      "PreparedLaunch",
      "A cuda_launch with everything but its inputs fixed: calling it costs converting the "
      "inputs only.")
      .def(
          nb::new_(&make_prepared),
          "image"_a,
          "kernel"_a,
          "output_shapes"_a,
          "output_dtypes"_a,
          "grid"_a,
          "block"_a,
          "shared_memory"_a,
          "params"_a,
          "strided_inputs"_a,
          "unread_inputs"_a = std::vector<int>{},
          "tensor_maps"_a = TensorMapArgs{},
          "overlaps_previous"_a = false,
          "scratch_outputs"_a = std::vector<int>{},
          "view_alternative"_a = nb::none(),
          "`unread_inputs`: inputs the kernel does not read (an absent mask's or sinks' "
          "place): passed as null pointers and never made contiguous. `tensor_maps`: as "
          "for cuda_launch. `overlaps_previous`: in a CudaPlan, the kernel may start while "
          "the plan's launch before it runs (it waits in-kernel for that launch's outputs); "
          "the two run as one primitive. `scratch_outputs`: outputs (indices) that are the "
          "kernel's own scratch: allocated at each evaluation and freed once the GPU is done, "
          "they are not returned. `view_alternative`: (kernel, block, shared_memory, view, "
          "base) or None: the kernel the launch takes instead, with that block and dynamic "
          "shared memory, where at evaluation input `view` is a prefix view of input `base` "
          "(the same address, type and strides, the innermost dimension no longer) and every "
          "tensor map was encoded.")
      .def(
          "__call__",
          &launch_prepared,
          "inputs"_a,
          "gradient_inputs"_a = std::vector<mx::array>{},
          "gradient"_a = nb::none(),
          "stream"_a = nb::none(),
          "cuda_launch(image, kernel, inputs, ...) with this launch's fixed arguments; "
          "gradient_inputs and gradient may be passed positionally.")
      .def_prop_ro(
          "kernel", [](const PreparedLaunch& self) { return self.spec->kernel; })
      .def_prop_ro(
          "overlaps_previous",
          [](const PreparedLaunch& self) { return self.spec->overlaps_previous; })
      .def_prop_ro(
          "scratch_outputs",
          [](const PreparedLaunch& self) { return self.spec->scratch_outputs; })
      .def_prop_ro("view_alternative", [](const PreparedLaunch& self) -> nb::object {
        if (!self.spec->alternative) {
          return nb::none();
        }
        auto& a = *self.spec->alternative;
        return nb::make_tuple(a.kernel, a.block, a.shared_memory, a.view, a.base);
      });

  nb::class_<aotc::NativeCall>(
      m,
      "NativeCall",
      "A call served by prebuilt kernels without Python (see CallTable).")
      .def(
          "__call__",
          [](const aotc::NativeCall& self, nb::args args) {
            return self(aotc::arguments_of(args));
          },
          "Run the call: its arguments positionally, arrays and the values its plan fixed.");

  nb::class_<aotc::MlxAttentionCall, aotc::NativeCall>(
      m,
      "MlxAttentionCall",
      "mx.fast.scaled_dot_product_attention as a native call, for signatures that fall "
      "back to it: called with (q, k, v, mask, sinks, scale) as a CallTable passes them, "
      "the scale and a string mask fixed here.")
      .def(nb::init<float, std::string>(), "scale"_a, "mask_mode"_a = "");

  nb::class_<aotc::CudaPlan, aotc::NativeCall>(
      m,
      "CudaPlan",
      "A CUDA launch plan as one native call: argument conversions, then launches over "
      "numbered slots. Slots [0, num_args) hold the call's arguments (None, strings and "
      "numbers leave theirs empty); launches write their outputs to further slots.")
      .def(nb::init<int>(), "num_args"_a)
      .def_prop_ro("num_args", &aotc::CudaPlan::num_args)
      .def_prop_ro(
          "primitives",
          &aotc::CudaPlan::primitive_kernels,
          "The kernels of each primitive a call builds, in order: a launch that overlaps "
          "the one before it (PreparedLaunch.overlaps_previous) shares that one's primitive.")
      .def_prop_ro(
          "primitive_sources",
          &aotc::CudaPlan::primitive_sources,
          "Per primitive, per launch, where each kernel input comes from: i >= 0 the "
          "primitive's input i, ~j its output j (an earlier launch's), NO_SOURCE none (an "
          "unread input, passed as a null pointer, which takes no input of the primitive).")
      .def(
          "astype",
          &aotc::CudaPlan::astype,
          "slot"_a,
          "dtype"_a,
          "Cast the argument in `slot` (when given, and of another dtype) for the kernels.")
      .def(
          "broadcast_to",
          [](aotc::CudaPlan& self, int slot, const std::vector<int>& shape) {
            self.broadcast_to(slot, mx::Shape(shape.begin(), shape.end()));
          },
          "slot"_a,
          "shape"_a,
          "Broadcast the argument in `slot` (when given) for the kernels.")
      .def(
          "launch",
          [](aotc::CudaPlan& self,
             const PreparedLaunch& prepared,
             std::vector<int> inputs,
             std::vector<int> outputs,
             std::vector<int> gradient_inputs,
             nb::object gradient) {
            self.launch(
                prepared.spec,
                std::move(inputs),
                std::move(outputs),
                std::move(gradient_inputs),
                wrap_gradient(std::move(gradient)));
          },
          "prepared"_a,
          "inputs"_a,
          "outputs"_a,
          "gradient_inputs"_a = std::vector<int>{},
          "gradient"_a = nb::none(),
          "Append a launch reading slots `inputs` and writing `outputs` (fresh slots); "
          "`gradient_inputs` are argument slots (as given) appended for `gradient`.")
      .def("set_output", &aotc::CudaPlan::set_output, "slot"_a);

  nb::class_<aotc::CallTable>(
      m,
      "CallTable",
      "Native calls by the signature of their Python arguments (array shapes and dtypes; "
      "None, strings, numbers by value) and MLX's default device: a hit runs without "
      "Python, a miss returns None.")
      .def(nb::init<size_t>(), "limit"_a = 4096)
      .def(
          "__call__",
          [](aotc::CallTable& self, nb::args args) { return self.call(args); },
          "The output of the native call for these arguments, or None.")
      .def(
          "add",
          [](aotc::CallTable& self, std::shared_ptr<aotc::NativeCall> call, nb::args args) {
            return self.add(args, std::move(call));
          },
          "Serve calls with the signature of `args` by `call`; False where the arguments "
          "have no signature (types other than arrays, None, str, int, float).")
      .def("clear", &aotc::CallTable::clear)
      .def("__len__", &aotc::CallTable::size);

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
      "_cuda_view_alternative_launches",
      []() -> uint64_t {
#ifdef AOTC_WITH_CUDA
        return aotc::view_alternative_launches();
#else
        return 0;
#endif
      },
      "Testing aid: launches that took their view alternative so far in this process.");

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

  m.def(
      "eval_polling",
      [](nb::handle tree, double spin) {
        auto budget = spin_budget(spin);
        std::vector<mx::array> arrays;
        flatten_arrays(tree, arrays);
        nb::gil_scoped_release nogil;
        return aotc::eval_polling(std::move(arrays), budget);
      },
      "tree"_a,
      "spin"_a,
      "Evaluate the arrays of `tree` as mx.eval does, polling for their completion for up to "
      "`spin` seconds (math.inf: until done) before waiting as mx.eval does. True when they "
      "completed while polling.");

#ifdef AOTC_WITH_METAL
  aotc_register_metal(m);
#endif
}
