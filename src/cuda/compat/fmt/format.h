// A minimal stand-in for {fmt}'s <fmt/format.h>.
//
// MLX's installed CUDA headers (mlx/backend/cuda/device.h -> lru_cache.h)
// include <fmt/format.h>, but MLX's wheels do not ship {fmt}. The headers only
// call fmt::format with
// "{}" placeholders in error paths that aotc never instantiates; this shim
// makes them parse and, if they ever are instantiated, formats "{}"
// placeholders with operator<<.
#pragma once

#include <sstream>
#include <string>
#include <string_view>
#include <utility>

namespace fmt {

namespace detail {

inline void format_rest(std::ostringstream& os, std::string_view f) {
  os << f;
}

template <typename T, typename... Rest>
void format_rest(
    std::ostringstream& os,
    std::string_view f,
    T&& value,
    Rest&&... rest) {
  auto pos = f.find("{}");
  if (pos == std::string_view::npos) {
    os << f;
    return;
  }
  os << f.substr(0, pos) << value;
  format_rest(os, f.substr(pos + 2), std::forward<Rest>(rest)...);
}

} // namespace detail

template <typename... Args>
std::string format(std::string_view f, Args&&... args) {
  std::ostringstream os;
  detail::format_rest(os, f, std::forward<Args>(args)...);
  return os.str();
}

} // namespace fmt
