// A call that aotc serves from prebuilt kernels without going back to Python:
// the arguments in (per position an array, or nothing for None, strings and
// numbers, which the call's plan has fixed already), the output out.
#pragma once

#include <optional>
#include <vector>

#include "mlx/array.h"

namespace aotc {

using Arguments = std::vector<std::optional<mlx::core::array>>;

class NativeCall {
 public:
  virtual ~NativeCall() = default;
  virtual mlx::core::array operator()(const Arguments& args) const = 0;
};

} // namespace aotc
