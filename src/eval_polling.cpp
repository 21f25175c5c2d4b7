#include "eval_polling.h"

#include <thread>

#include "mlx/transforms.h"

namespace aotc {

namespace mx = mlx::core;
using Clock = std::chrono::steady_clock;

bool eval_polling(
    std::vector<mx::array> arrays,
    std::optional<std::chrono::nanoseconds> spin) {
  mx::async_eval(arrays);
  const auto deadline = spin ? Clock::now() + *spin : Clock::time_point::max();
  // is_available() queries the array's event and, once it is signaled, marks
  // the array available and drops the event, as array::wait() does.
  size_t next = 0; // arrays before it are available
  while (next < arrays.size()) {
    if (arrays[next].is_available()) {
      ++next;
      continue;
    }
    if (Clock::now() >= deadline) {
      mx::eval(arrays);
      return false;
    }
    // MLX's completion and scheduler threads may need this core.
    std::this_thread::yield();
  }
  return true;
}

} // namespace aotc
