// aotc's CUDA launch primitive: runs one extern "C" kernel of a prebuilt aotc
// fatbin as an MLX primitive, so it takes part in MLX's lazy graph and MLX's
// CUDA graph encoder.
//
// The kernel's parameter list is (inputs as const pointers..., outputs as
// pointers..., const Params p) where Params is a plain struct passed by value:
// its first bytes are the int64 strides (in elements, every dimension) of the
// inputs listed in `strided_inputs`, in order, filled in at evaluation time
// from the arrays MLX hands the primitive; the rest of Params is the `params`
// bytes given at graph-build time (docs/ARCHITECTURE.md, "The CUDA launch
// contract").
//
// This header needs no CUDA headers: the extension's main file includes it in
// every build; launch() is defined by cuda_launch.cpp when the extension is
// built with AOTC_WITH_CUDA, and by a stub that says why it cannot run
// otherwise.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace aotc {

// The bytes of an aotc fatbin. A CUDA module is loaded from them once per
// device, on first use (thread-safe), and is never unloaded: MLX's CUDA graph
// cache may hold kernel nodes that refer to its functions for the rest of the
// process.
class CudaImage {
 public:
  explicit CudaImage(std::string data) : data_(std::move(data)) {}
  CudaImage(const CudaImage&) = delete;
  CudaImage& operator=(const CudaImage&) = delete;

  const std::string& data() const noexcept {
    return data_;
  }

 private:
  friend struct CudaImageAccess; // cuda_launch.cpp
  std::string data_;
  std::once_flag once_;
  std::shared_ptr<void>
      modules_; // per-device modules, created by the CUDA build
};

using Dim3 = std::array<uint32_t, 3>;

// A TMA descriptor (CUtensorMap) the launch encodes at evaluation, when the
// input's address and strides are known: a tiled map of input `input` over all
// its dimensions (innermost first, the input's own strides) in boxes of
// box_cols x box_rows x box_planes on the three innermost dimensions and 1 on
// the others, 128-byte swizzled, with out-of-bounds elements read as zeros. The
// maps follow the Params bytes at the next 64-byte boundary, 128 bytes each,
// then a uint32 whose bit i says map i was encoded; an input TMA cannot
// describe (address or strides not multiples of 16 bytes, ...) leaves its map
// zero and its bit clear, and the kernel takes another path
// (docs/ARCHITECTURE.md).
struct TensorMapSpec {
  int input;
  uint32_t box_cols;
  uint32_t box_rows;
  uint32_t box_planes = 1;
  bool operator==(const TensorMapSpec&) const = default;
};

// A kernel a launch takes instead of its own when, at evaluation, its input
// `view` is a prefix view of its input `base` (the same address, type,
// dimensions and strides; the innermost dimension no longer) and every tensor
// map of the launch was encoded: the same grid, inputs, outputs and Params, its
// own block and dynamic shared memory. MLA's V is K's first columns (v = k[..., :V]),
// which only evaluation can see; a kernel that reads V from K's tiles needs no
// V of its own (docs/ARCHITECTURE.md).
struct ViewAlternative {
  std::string kernel;
  Dim3 block;
  uint32_t shared_memory;
  int view;
  int base;
  bool operator==(const ViewAlternative&) const = default;
};

// The gradient of a launch, supplied by the caller (aotc computes it with
// MLX's own ops): given the primitive's inputs and the cotangents of its
// outputs, the cotangents of every input.
using Gradient = std::function<std::vector<mlx::core::array>(
    const std::vector<mlx::core::array>& primals,
    const std::vector<mlx::core::array>& cotangents)>;

// Checks a launch's fixed arguments (make_launch_spec); its inputs and stream
// are checked at each launch (check_chain). Throws std::invalid_argument
// with the reason. Both builds share these checks, so argument errors read the
// same everywhere.
inline void check_launch_args(
    const std::string& kernel,
    const std::vector<mlx::core::Shape>& output_shapes,
    const std::vector<mlx::core::Dtype>& output_dtypes,
    const std::array<int64_t, 3>& grid,
    const std::array<int64_t, 3>& block,
    int64_t shared_memory,
    const std::vector<int>& strided_inputs,
    const std::vector<int>& unread_inputs,
    const std::vector<TensorMapSpec>& tensor_maps = {},
    const std::vector<int>& scratch_outputs = {},
    const std::optional<ViewAlternative>& alternative = std::nullopt) {
  auto fail = [](const std::string& msg) {
    throw std::invalid_argument("[aotc.cuda_launch] " + msg);
  };
  if (kernel.empty()) {
    fail("the kernel name is empty");
  }
  if (output_shapes.empty()) {
    fail("a launch needs at least one output");
  }
  if (output_shapes.size() != output_dtypes.size()) {
    fail(
        std::to_string(output_shapes.size()) + " output shapes but " +
        std::to_string(output_dtypes.size()) + " output dtypes");
  }
  for (auto& shape : output_shapes) {
    for (auto d : shape) {
      if (d < 0) {
        fail("an output shape has a negative dimension");
      }
    }
  }
  for (int i = 0; i < 3; ++i) {
    if (grid[i] < 1 || block[i] < 1) {
      fail("grid and block dimensions must be >= 1");
    }
  }
  if (grid[0] > 0x7fffffffLL || grid[1] > 65535 || grid[2] > 65535) {
    fail("the grid is larger than CUDA allows (2^31-1, 65535, 65535 blocks)");
  }
  if (block[0] > 1024 || block[1] > 1024 || block[2] > 64 ||
      block[0] * block[1] * block[2] > 1024) {
    fail("a block has more than 1024 threads");
  }
  if (shared_memory < 0 || shared_memory > (int64_t(1) << 31)) {
    fail("shared_memory is out of range");
  }
  auto check_index = [&](int i, const char* what) {
    if (i < 0) {
      fail(std::string(what) + " input index " + std::to_string(i) + " is negative");
    }
  };
  for (int i : strided_inputs) {
    check_index(i, "strided");
  }
  for (int i : unread_inputs) {
    check_index(i, "unread");
  }
  for (size_t i = 0; i < scratch_outputs.size(); ++i) {
    const int o = scratch_outputs[i];
    if (o < 0 || size_t(o) >= output_shapes.size()) {
      fail(
          "scratch output index " + std::to_string(o) + " is not one of the " +
          std::to_string(output_shapes.size()) + " outputs");
    }
    if (std::find(scratch_outputs.begin(), scratch_outputs.begin() + i, o) !=
        scratch_outputs.begin() + i) {
      fail("scratch output index " + std::to_string(o) + " is repeated");
    }
  }
  if (scratch_outputs.size() >= output_shapes.size()) {
    fail("a launch needs at least one output that is not scratch");
  }
  if (tensor_maps.size() > 8) {
    fail("a launch takes at most 8 tensor maps");
  }
  for (auto& map : tensor_maps) {
    check_index(map.input, "tensor map");
    auto bad = [](uint32_t n) { return n < 1 || n > 256; };
    if (bad(map.box_cols) || bad(map.box_rows) || bad(map.box_planes)) {
      fail("a tensor map's box dimensions must be 1 to 256 elements");
    }
  }
  if (alternative) {
    auto& alt = *alternative;
    if (alt.kernel.empty()) {
      fail("the view alternative's kernel name is empty");
    }
    const auto& b = alt.block;
    if (b[0] < 1 || b[1] < 1 || b[2] < 1 || b[0] > 1024 || b[1] > 1024 || b[2] > 64 ||
        uint64_t(b[0]) * b[1] * b[2] > 1024) {
      fail("the view alternative's block must have 1 to 1024 threads");
    }
    if (alt.shared_memory > (uint32_t(1) << 31)) {
      fail("the view alternative's shared_memory is out of range");
    }
    check_index(alt.view, "view alternative's view");
    check_index(alt.base, "view alternative's base");
    if (alt.view == alt.base) {
      fail("the view alternative's view and base are the same input");
    }
  }
}

// Whether index `i` is among `indices` (a launch's strided, unread or scratch
// lists: a few entries each).
inline bool listed(const std::vector<int>& indices, size_t i) {
  return std::find(indices.begin(), indices.end(), int(i)) != indices.end();
}

// Everything of a launch but its inputs: made (and checked) once per plan
// step and shared by every call and primitive of that step, so that a call
// converts and copies only its inputs.
struct LaunchSpec {
  std::shared_ptr<CudaImage> image;
  std::string kernel;
  std::vector<mlx::core::Shape> output_shapes;
  std::vector<mlx::core::Dtype> output_dtypes;
  Dim3 grid;
  Dim3 block;
  uint32_t shared_memory;
  std::string params;
  std::vector<int> strided_inputs;
  // Inputs the kernel does not read (an absent mask's or sinks' place): passed
  // as null pointers, never made contiguous.
  std::vector<int> unread_inputs;
  std::vector<TensorMapSpec> tensor_maps;
  // In a plan, the launch may start while the launch before it runs
  // (programmatic dependent launch, sm_90+): its kernel waits in-kernel
  // (griddepcontrol.wait) before reading that launch's outputs. CudaPlan runs
  // the two as one primitive (a chain, see launch_chain).
  bool overlaps_previous = false;
  // Outputs (indices among output_shapes) that are the kernel's own scratch:
  // allocated at each evaluation and held until the GPU is done with them, but
  // not outputs of the primitive, since each output array costs MLX host time
  // at every call. The kernel's parameter list is unchanged.
  std::vector<int> scratch_outputs;
  // Taken instead of `kernel` where its condition holds at evaluation.
  std::optional<ViewAlternative> alternative;
  // Primitives of equal specs are equivalent (CudaLaunch::is_equivalent).
  bool operator==(const LaunchSpec&) const = default;

  bool is_scratch(size_t output) const {
    return listed(scratch_outputs, output);
  }
  // Outputs that are arrays of the primitive (all but the scratch).
  size_t array_outputs() const {
    return output_shapes.size() - scratch_outputs.size();
  }
};

// An unread kernel input (LaunchSpec::unread_inputs) that takes no array of the
// primitive: the kernel gets a null pointer (ChainLink::sources).
constexpr int kNoSource = std::numeric_limits<int>::min();

// Whether the spec's input `input` is unread and needs nothing of its array (no
// strides, no tensor map, no part in the view alternative's test), so that it
// may take none (kNoSource).
inline bool needs_no_array(const LaunchSpec& spec, size_t input) {
  const bool mapped = std::any_of(
      spec.tensor_maps.begin(), spec.tensor_maps.end(), [&](const TensorMapSpec& m) {
        return m.input == int(input);
      });
  const auto& alt = spec.alternative;
  const bool tested = alt && (alt->view == int(input) || alt->base == int(input));
  return listed(spec.unread_inputs, input) && !listed(spec.strided_inputs, input) && !mapped &&
      !tested;
}

// One launch of a chain: its spec, and where each of its kernel inputs comes
// from: i >= 0 the chain's input i, ~j (< 0) the chain's output j (an earlier
// link's), kNoSource none (an unread input). A chain's outputs are its links'
// outputs but the scratch, in order.
struct ChainLink {
  std::shared_ptr<const LaunchSpec> spec;
  std::vector<int> sources;
  bool operator==(const ChainLink& o) const {
    return (spec == o.spec || *spec == *o.spec) && sources == o.sources;
  }
};
// Made once per plan step and shared by every call and primitive of that step.
using Chain = std::vector<ChainLink>;
using ChainPtr = std::shared_ptr<const Chain>;

// Checks the arguments (check_launch_args) and makes the spec. Throws
// std::invalid_argument.
inline std::shared_ptr<const LaunchSpec> make_launch_spec(
    std::shared_ptr<CudaImage> image,
    std::string kernel,
    std::vector<mlx::core::Shape> output_shapes,
    std::vector<mlx::core::Dtype> output_dtypes,
    const std::array<int64_t, 3>& grid,
    const std::array<int64_t, 3>& block,
    int64_t shared_memory,
    std::string params,
    std::vector<int> strided_inputs,
    std::vector<int> unread_inputs,
    std::vector<TensorMapSpec> tensor_maps = {},
    bool overlaps_previous = false,
    std::vector<int> scratch_outputs = {},
    std::optional<ViewAlternative> alternative = std::nullopt) {
  if (!image) {
    throw std::invalid_argument("[aotc.cuda_launch] no CUDA image");
  }
  check_launch_args(
      kernel,
      output_shapes,
      output_dtypes,
      grid,
      block,
      shared_memory,
      strided_inputs,
      unread_inputs,
      tensor_maps,
      scratch_outputs,
      alternative);
  auto dim3 = [](const std::array<int64_t, 3>& a) {
    return Dim3{uint32_t(a[0]), uint32_t(a[1]), uint32_t(a[2])};
  };
  return std::make_shared<const LaunchSpec>(LaunchSpec{
      std::move(image),
      std::move(kernel),
      std::move(output_shapes),
      std::move(output_dtypes),
      dim3(grid),
      dim3(block),
      uint32_t(shared_memory),
      std::move(params),
      std::move(strided_inputs),
      std::move(unread_inputs),
      std::move(tensor_maps),
      overlaps_previous,
      std::move(scratch_outputs),
      std::move(alternative)});
}

// The checks of a launch's input indices against its input count (both
// builds).
inline void check_launch_inputs(const LaunchSpec& spec, size_t num_inputs) {
  auto check = [&](int i, const char* what) {
    if (size_t(i) >= num_inputs) {
      throw std::invalid_argument(
          "[aotc.cuda_launch] " + std::string(what) + " input index " +
          std::to_string(i) + " is not one of the " + std::to_string(num_inputs) +
          " inputs");
    }
  };
  for (int i : spec.strided_inputs) {
    check(i, "strided");
  }
  for (int i : spec.unread_inputs) {
    check(i, "unread");
  }
  for (auto& map : spec.tensor_maps) {
    check(map.input, "tensor map");
  }
  if (spec.alternative) {
    check(spec.alternative->view, "view alternative's view");
    check(spec.alternative->base, "view alternative's base");
  }
}

inline void check_gpu_stream(const mlx::core::Stream& stream) {
  if (stream.device.type != mlx::core::Device::gpu) {
    throw std::invalid_argument(
        "[aotc.cuda_launch] needs a GPU stream, got a CPU stream (MLX's device for this "
        "call is the CPU): aotc's CUDA kernels run only on MLX's CUDA backend");
  }
}

// Checks a chain's links against its inputs and stream (both builds), before
// building it.
inline void check_chain(
    const std::vector<ChainLink>& links,
    size_t num_inputs,
    const mlx::core::Stream& stream) {
  auto fail = [](const std::string& msg) {
    throw std::invalid_argument("[aotc.cuda_launch] " + msg);
  };
  if (links.empty()) {
    fail("a chain has no launch");
  }
  size_t outputs = 0;
  for (auto& link : links) {
    if (!link.spec) {
      fail("a chain's launch has no spec");
    }
    for (size_t i = 0; i < link.sources.size(); ++i) {
      const int src = link.sources[i];
      if (src == kNoSource) {
        if (!needs_no_array(*link.spec, i)) {
          fail(
              "kernel '" + link.spec->kernel + "' has no array for its input " +
              std::to_string(i) + ", which it reads");
        }
        continue;
      }
      if (src >= 0 && size_t(src) >= num_inputs) {
        fail(
            "kernel '" + link.spec->kernel + "' reads input " + std::to_string(src) +
            ", not one of the chain's " + std::to_string(num_inputs) + " inputs");
      }
      if (src < 0 && size_t(~src) >= outputs) {
        fail(
            "kernel '" + link.spec->kernel + "' reads output " + std::to_string(~src) +
            ", which no earlier launch of the chain writes");
      }
    }
    check_launch_inputs(*link.spec, link.sources.size());
    outputs += link.spec->array_outputs();
  }
  check_gpu_stream(stream);
}

// Whether a kernel of the chain reads its input `input` with no strides (so it
// must be row-contiguous). Scanned per call: chains are a link or two of a few
// inputs, cheaper than a vector's allocation.
inline bool read_without_strides(const std::vector<ChainLink>& links, size_t input) {
  for (auto& link : links) {
    for (size_t i = 0; i < link.sources.size(); ++i) {
      if (link.sources[i] == int(input) && !listed(link.spec->strided_inputs, i) &&
          !listed(link.spec->unread_inputs, i)) {
        return true;
      }
    }
  }
  return false;
}

// Builds the outputs of a chain of kernel launches as one primitive (lazy MLX
// arrays): the links run in order, a link whose spec overlaps_previous by
// programmatic dependent launch where the GPU has it (sm_90+), else after the
// link before it. `gradient_inputs` are further inputs of the primitive that no
// kernel sees, there for `gradient`, which differentiates the last link (its
// inputs and the gradient inputs, given its outputs' cotangents). Needs
// AOTC_WITH_CUDA; other builds throw std::runtime_error after checking the
// links and the stream.
std::vector<mlx::core::array> launch_chain(
    ChainPtr chain,
    std::vector<mlx::core::array> inputs,
    std::vector<mlx::core::array> gradient_inputs = {},
    Gradient gradient = {},
    mlx::core::StreamOrDevice s = {});

// The sources of a link that reads the chain's first n inputs, in order.
inline std::vector<int> first_inputs(size_t n) {
  std::vector<int> sources(n);
  std::iota(sources.begin(), sources.end(), 0);
  return sources;
}

// The outputs of one kernel launch: a chain of one link.
inline std::vector<mlx::core::array> launch(
    std::shared_ptr<const LaunchSpec> spec,
    std::vector<mlx::core::array> inputs,
    std::vector<mlx::core::array> gradient_inputs = {},
    Gradient gradient = {},
    mlx::core::StreamOrDevice s = {}) {
  auto chain = std::make_shared<const Chain>(
      Chain{{std::move(spec), first_inputs(inputs.size())}});
  return launch_chain(
      std::move(chain),
      std::move(inputs),
      std::move(gradient_inputs),
      std::move(gradient),
      s);
}

// MLX's CUDA backend is usable here (a GPU and a driver).
bool cuda_available();

// Streaming multiprocessors of MLX's CUDA device `device` (launch plans size
// their grids by it; MLX's device_info does not report it).
int sm_count(int device);

// Launches that took their view alternative so far in this process (tests).
uint64_t view_alternative_launches();

// Where output buffers come from: "pool" (default: device memory from a
// per-device CUDA memory pool, stream-ordered on MLX's stream) or "mlx" (MLX's
// allocator::malloc: unified memory).
void set_output_allocator(const std::string& name);
std::string output_allocator();

// Returns the unused memory of aotc's output pools to the driver.
void clear_cache();

class CudaLaunch : public mlx::core::Primitive {
 public:
  CudaLaunch(
      mlx::core::Stream stream,
      ChainPtr chain,
      size_t kernel_inputs,
      Gradient gradient)
      : mlx::core::Primitive(stream),
        chain_(std::move(chain)),
        kernel_inputs_(kernel_inputs),
        gradient_(std::move(gradient)) {}

  void eval_cpu(
      const std::vector<mlx::core::array>& inputs,
      std::vector<mlx::core::array>& outputs) override;
  void eval_gpu(
      const std::vector<mlx::core::array>& inputs,
      std::vector<mlx::core::array>& outputs) override;

  std::vector<mlx::core::array> jvp(
      const std::vector<mlx::core::array>& primals,
      const std::vector<mlx::core::array>& tangents,
      const std::vector<int>& argnums) override;
  std::vector<mlx::core::array> vjp(
      const std::vector<mlx::core::array>& primals,
      const std::vector<mlx::core::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mlx::core::array>& outputs) override;
  std::pair<std::vector<mlx::core::array>, std::vector<int>> vmap(
      const std::vector<mlx::core::array>& inputs,
      const std::vector<int>& axes) override;

  const char* name() const override {
    return "CudaLaunch";
  }
  bool is_equivalent(const mlx::core::Primitive& other) const override;
  std::vector<mlx::core::Shape> output_shapes(
      const std::vector<mlx::core::array>& inputs) override;

 private:
  ChainPtr chain_;
  // Inputs past the first kernel_inputs_ are passed to no kernel: they are
  // there so that gradient_ can differentiate with respect to them.
  size_t kernel_inputs_;
  Gradient gradient_;
};

} // namespace aotc
