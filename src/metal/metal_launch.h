// aotc's Metal launch primitive: runs named kernels of a prebuilt metallib from an MLX graph.
//
// Generic, in the spirit of mx.fast.metal_kernel but precompiled: a `Program` (program.h) says
// which functions of the metallib to dispatch, with which function constants, what each buffer
// index holds (an input, an output, an intermediate, or the bytes of a scalar that may be read
// from an input's strides at evaluation time), and the grid and threadgroup sizes. Kernel
// families write programs in Python (`MetalPlan.wire()` in aotc/families/sdpa_vector/metal.py);
// metal_bindings.cpp parses them.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "program.h"

namespace aotc::metal {

class MetalLaunch : public mx::Primitive {
 public:
  MetalLaunch(mx::Stream stream, std::string library_path, Program program);

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs)
      override;

  const char* name() const override {
    return "AotcMetalLaunch";
  }
  bool is_equivalent(const mx::Primitive& other) const override;

  const Program& program() const {
    return program_;
  }

 private:
  std::string library_path_;
  Program program_;
};

// The key under which MLX's Device caches the library (one per artifact path).
std::string library_key(const std::string& library_path);

// Validates `program` against `inputs` and returns its outputs (lazy arrays of the graph).
std::vector<mx::array> launch(
    const std::string& library_path,
    std::vector<mx::array> inputs,
    Program program,
    mx::StreamOrDevice s = {});

// `maxTotalThreadsPerThreadgroup` of `kernel` specialised with `constants` (graph-time values
// only); the pipeline stays cached under the name a launch with the same values uses.
size_t max_threads_per_threadgroup(
    const std::string& library_path,
    const std::string& kernel,
    const std::vector<Constant>& constants,
    mx::StreamOrDevice s = {});

// The GPU architecture string MLX's heuristics read (`applegpu_g15s`, ...).
std::string architecture(mx::StreamOrDevice s = {});

} // namespace aotc::metal
