// aotc's Metal launch primitive (see metal_launch.h).
#include "metal_launch.h"

#include <algorithm>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <utility>

#include <Metal/Metal.hpp>

#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"

namespace aotc::metal {

namespace {

// Row-contiguous copies of inputs whose strides a program cannot take. MLX's own copy kernels
// are not exported by libmlx, so this one is built from source through MLX's library cache the
// first time an input needs it (Metal's run-time compiler ships with macOS, as for
// mx.fast.metal_kernel); the attention kernels themselves come only from the prebuilt metallib.
constexpr const char* kCopyLibrary = "aotc_layout_copy";
constexpr const char* kCopySource = R"metal(
#include <metal_stdlib>
using namespace metal;

template <typename T>
[[kernel]] void aotc_strided_copy(
    const device T* src [[buffer(0)]],
    device T* dst [[buffer(1)]],
    constant const int* shape [[buffer(2)]],
    constant const int64_t* strides [[buffer(3)]],
    constant const int& ndim [[buffer(4)]],
    uint index [[thread_position_in_grid]]) {
  int64_t offset = 0;
  uint64_t rest = index;
  for (int axis = ndim - 1; axis >= 0; --axis) {
    uint64_t extent = uint64_t(shape[axis]);
    offset += int64_t(rest % extent) * strides[axis];
    rest /= extent;
  }
  dst[index] = src[offset];
}

#define AOTC_COPY(name, type)                                             \
  template [[host_name(name)]] [[kernel]] decltype(aotc_strided_copy<type>) \
      aotc_strided_copy<type>;
AOTC_COPY("aotc_strided_copy_1", uchar)
AOTC_COPY("aotc_strided_copy_2", ushort)
AOTC_COPY("aotc_strided_copy_4", uint)
AOTC_COPY("aotc_strided_copy_8", ulong)
)metal";

mx::array row_contiguous_copy(
    mx::metal::Device& d,
    mx::metal::CommandEncoder& encoder,
    const mx::array& in) {
  mx::array out(in.shape(), in.dtype(), nullptr, {});
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (in.size() == 0) {
    return out;
  }
  if (in.size() > std::numeric_limits<uint32_t>::max()) {
    throw std::runtime_error(
        "[aotc.metal_launch] an input with more than 2^32 elements needs a layout copy");
  }
  auto* lib = d.get_library(kCopyLibrary, [] { return std::string(kCopySource); });
  auto* kernel = d.get_kernel("aotc_strided_copy_" + std::to_string(in.itemsize()), lib);
  encoder.set_compute_pipeline_state(kernel);
  encoder.set_input_array(in, 0);
  encoder.set_output_array(out, 1);
  std::vector<int32_t> shape(in.shape().begin(), in.shape().end());
  std::vector<int64_t> strides(in.strides().begin(), in.strides().end());
  encoder.set_vector_bytes(shape, 2);
  encoder.set_vector_bytes(strides, 3);
  int ndim = static_cast<int>(in.ndim());
  encoder.set_bytes(ndim, 4);
  size_t n = in.size();
  size_t group = std::min<size_t>(n, kernel->maxTotalThreadsPerThreadgroup());
  encoder.dispatch_threads(MTL::Size(n, 1, 1), MTL::Size(group, 1, 1));
  return out;
}

// MTL::FunctionConstantValues entries pointing into `values` (which must outlive the list).
mx::metal::MTLFCList constant_list(const std::vector<ConstantValue>& values) {
  mx::metal::MTLFCList list;
  list.reserve(values.size());
  for (const auto& v : values) {
    auto index = static_cast<NS::UInteger>(v.index);
    switch (v.type) {
      case ScalarType::Bool:
        list.emplace_back(&v.b, MTL::DataType::DataTypeBool, index);
        break;
      case ScalarType::Int32:
      case ScalarType::UInt64:
        list.emplace_back(&v.i, MTL::DataType::DataTypeInt, index);
        break;
      case ScalarType::Float32:
        list.emplace_back(&v.f, MTL::DataType::DataTypeFloat, index);
        break;
    }
  }
  return list;
}

void set_scalar(
    mx::metal::CommandEncoder& encoder,
    ScalarType type,
    const Scalar& v,
    int index) {
  switch (type) {
    case ScalarType::Bool: {
      bool b = v.is_float ? v.f != 0.0 : v.i != 0;
      encoder.set_bytes(b, index);
      break;
    }
    case ScalarType::Int32: {
      auto x = static_cast<int32_t>(v.is_float ? static_cast<int64_t>(v.f) : v.i);
      encoder.set_bytes(x, index);
      break;
    }
    case ScalarType::UInt64: {
      auto x = static_cast<uint64_t>(v.is_float ? static_cast<int64_t>(v.f) : v.i);
      encoder.set_bytes(x, index);
      break;
    }
    case ScalarType::Float32: {
      auto x = static_cast<float>(v.is_float ? v.f : static_cast<double>(v.i));
      encoder.set_bytes(x, index);
      break;
    }
  }
}

void check_threadgroup(
    const MTL::ComputePipelineState* kernel,
    const Dispatch& dispatch,
    const std::string& hash_name) {
  size_t requested = dispatch.threadgroup[0] * dispatch.threadgroup[1] * dispatch.threadgroup[2];
  size_t allowed = kernel->maxTotalThreadsPerThreadgroup();
  if (requested > allowed) {
    // A launch past the limit is dropped silently by Metal (the output stays unwritten).
    std::ostringstream msg;
    msg << "[aotc.metal_launch] " << dispatch.kernel << " (" << hash_name << ") launches "
        << requested << " threads per threadgroup but its pipeline allows " << allowed
        << "; plan with aotc's pipeline limits (metal_max_threads) to pick another variant.";
    throw std::runtime_error(msg.str());
  }
}

mx::Stream gpu_stream(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s, mx::Device::gpu);
  if (stream.device.type != mx::Device::gpu) {
    throw std::invalid_argument("[aotc.metal_launch] Metal kernels run on a GPU stream only");
  }
  return stream;
}

} // namespace

std::string library_key(const std::string& library_path) {
  return "aotc:" + library_path;
}

MetalLaunch::MetalLaunch(mx::Stream stream, std::string library_path, Program program)
    : mx::Primitive(stream),
      library_path_(std::move(library_path)),
      program_(std::move(program)) {}

void MetalLaunch::eval_cpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error("[aotc.metal_launch] aotc's Metal kernels run on the GPU only");
}

void MetalLaunch::eval_gpu(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs) {
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto& encoder = mx::metal::get_command_encoder(s);

  // Inputs whose strides the kernels cannot take are copied first (MLX's copy_unless).
  std::vector<mx::array> copies;
  std::vector<mx::array> ins;
  ins.reserve(inputs.size());
  for (size_t j = 0; j < inputs.size(); ++j) {
    if (fits(inputs[j], program_.layouts[j])) {
      ins.push_back(inputs[j]);
    } else {
      ins.push_back(row_contiguous_copy(d, encoder, inputs[j]));
      copies.push_back(ins.back());
    }
  }

  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  // Intermediates as MLX allocates them: owned by the encoder until the command buffer ends.
  std::vector<mx::array> temporaries;
  temporaries.reserve(program_.temporaries.size());
  for (const auto& spec : program_.temporaries) {
    mx::array t(spec.shape, spec.dtype, nullptr, {});
    t.set_data(mx::allocator::malloc(t.nbytes()));
    temporaries.push_back(std::move(t));
  }

  auto* lib = d.get_library(library_key(library_path_), library_path_);
  for (const auto& dispatch : program_.dispatches) {
    if (dispatch.grid[0] == 0 || dispatch.grid[1] == 0 || dispatch.grid[2] == 0) {
      continue; // nothing to compute (an empty batch)
    }
    auto values = resolve_constants(dispatch.constants, ins);
    auto name = hash_name(dispatch.kernel, values);
    auto* kernel = d.get_kernel(dispatch.kernel, lib, name, constant_list(values));
    check_threadgroup(kernel, dispatch, name);
    encoder.set_compute_pipeline_state(kernel);
    for (const auto& b : dispatch.buffers) {
      if (!b.is_array) {
        set_scalar(encoder, b.type, resolve(b.value, ins), b.index);
        continue;
      }
      switch (b.array.kind) {
        case ArrayRef::Kind::Input:
          encoder.set_input_array(ins[b.array.index], b.index);
          break;
        case ArrayRef::Kind::Output:
          if (b.written) {
            encoder.set_output_array(outputs[b.array.index], b.index);
          } else {
            encoder.set_input_array(outputs[b.array.index], b.index);
          }
          break;
        case ArrayRef::Kind::Temporary:
          if (b.written) {
            encoder.set_output_array(temporaries[b.array.index], b.index);
          } else {
            encoder.set_input_array(temporaries[b.array.index], b.index);
          }
          break;
      }
    }
    const auto& g = dispatch.grid;
    const auto& t = dispatch.threadgroup;
    encoder.dispatch_threadgroups(MTL::Size(g[0], g[1], g[2]), MTL::Size(t[0], t[1], t[2]));
  }

  encoder.add_temporaries(std::move(temporaries));
  encoder.add_temporaries(std::move(copies));
}

bool MetalLaunch::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const MetalLaunch*>(&other);
  return o != nullptr && library_path_ == o->library_path_ && program_ == o->program_;
}

std::vector<mx::array> launch(
    const std::string& library_path,
    std::vector<mx::array> inputs,
    Program program,
    mx::StreamOrDevice s) {
  constexpr std::string_view suffix = ".metallib";
  if (library_path.size() <= suffix.size() ||
      library_path.compare(library_path.size() - suffix.size(), suffix.size(), suffix) != 0) {
    // MLX's Device::get_library reads a path that does not end in .metallib as a folder.
    throw std::invalid_argument(
        "[aotc.metal_launch] library_path must name a .metallib file, got " + library_path);
  }
  check_program(program, inputs);
  auto stream = gpu_stream(s);
  // Load the library now so that a missing or unreadable file fails here, not mid-evaluation.
  mx::metal::device(stream.device).get_library(library_key(library_path), library_path);

  std::vector<mx::Shape> shapes;
  std::vector<mx::Dtype> dtypes;
  for (const auto& out : program.outputs) {
    shapes.push_back(out.shape);
    dtypes.push_back(out.dtype);
  }
  return mx::array::make_arrays(
      std::move(shapes),
      dtypes,
      std::make_shared<MetalLaunch>(stream, library_path, std::move(program)),
      std::move(inputs));
}

size_t max_threads_per_threadgroup(
    const std::string& library_path,
    const std::string& kernel,
    const std::vector<Constant>& constants,
    mx::StreamOrDevice s) {
  for (const auto& c : constants) {
    if (c.value.kind == Value::Kind::StrideOf ||
        c.value.kind == Value::Kind::NotRowContiguous) {
      throw std::invalid_argument(
          "[aotc.metal_max_threads] function constants must be graph-time values here");
    }
  }
  auto stream = gpu_stream(s);
  auto& d = mx::metal::device(stream.device);
  auto* lib = d.get_library(library_key(library_path), library_path);
  auto values = resolve_constants(constants, {});
  auto* pipeline = d.get_kernel(kernel, lib, hash_name(kernel, values), constant_list(values));
  return pipeline->maxTotalThreadsPerThreadgroup();
}

std::string architecture(mx::StreamOrDevice s) {
  auto stream = gpu_stream(s);
  return mx::metal::device(stream.device).get_architecture();
}

} // namespace aotc::metal
