// An evaluation that polls for completion before it sleeps.
//
// mx::eval waits on the stream's event; on MLX's CUDA backend that is a
// cudaEventBlockingSync event, and a thread that sleeps on one takes 25-48 us
// to wake once the GPU is done (measured on H100 and H200 hosts,
// bench/NOTES.md round 10). A decode step evaluated alone pays that on every
// evaluation. Polling the events (cudaEventQuery under is_available) returns
// within about a microsecond of completion, at the cost of a busy CPU core
// while it polls.
#pragma once

#include <chrono>
#include <optional>
#include <vector>

#include "mlx/array.h"

namespace aotc {

// Schedules `arrays` (mx::async_eval), then polls them until all are available
// or `spin` has passed (forever when it has no value); past that it waits as
// mx::eval does. Returns true when they completed while polling. Errors raised
// by the evaluation propagate as from mx::eval.
bool eval_polling(
    std::vector<mlx::core::array> arrays,
    std::optional<std::chrono::nanoseconds> spin);

} // namespace aotc
