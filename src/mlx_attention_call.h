// MLX's own fused attention as a native call: where aotc decided that a
// signature falls back to mx.fast.scaled_dot_product_attention, later calls of
// it go there from the CallTable as served ones go to their plan, without the
// Python decision path (1-3 us a call on the H200 host: bench/fallback_cost.py).
#pragma once

#include <optional>
#include <string>

#include "mlx/fast.h"
#include "native_call.h"

namespace aotc {

class MlxAttentionCall final : public NativeCall {
 public:
  // `mask_mode`: "" or "causal" where the call's mask is none or that string;
  // an array mask comes with each call.
  MlxAttentionCall(float scale, std::string mask_mode)
      : scale_(scale), mask_mode_(std::move(mask_mode)) {}

  // The arguments of sdpa_vector's table: q, k, v, mask, sinks, scale.
  mlx::core::array operator()(const Arguments& args) const override {
    const std::optional<mlx::core::array>& mask = args.at(3);
    return mlx::core::fast::scaled_dot_product_attention(
        *args.at(0),
        *args.at(1),
        *args.at(2),
        scale_,
        mask ? "array" : mask_mode_,
        mask,
        args.at(4));
  }

 private:
  float scale_;
  std::string mask_mode_;
};

} // namespace aotc
