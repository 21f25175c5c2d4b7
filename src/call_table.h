// aotc's per-call dispatch without Python: native calls keyed by the
// signature of a call's Python arguments (array shapes and dtypes; None,
// strings and numbers by value) and the default device. A hit runs the native
// call; a miss returns nothing, and the Python side decides, then adds the
// call it made. Used under the GIL only (every entry point is a Python call).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/array.h"
#include "mlx/device.h"
#include "native_call.h"

namespace aotc {

// The MLX array `h` holds, or nullptr.
inline mlx::core::array* as_array(nanobind::handle h) {
  return nanobind::isinstance<mlx::core::array>(h)
      ? nanobind::inst_ptr<mlx::core::array>(h)
      : nullptr;
}

// A native call's arguments from Python's: arrays where given, nothing for the
// rest (None, strings, numbers: fixed by the call's plan).
inline Arguments arguments_of(const nanobind::args& args) {
  Arguments out;
  out.reserve(args.size());
  for (nanobind::handle h : args) {
    auto* x = as_array(h);
    out.emplace_back(x ? std::optional<mlx::core::array>(*x) : std::nullopt);
  }
  return out;
}

class CallTable {
 public:
  explicit CallTable(size_t limit) : limit_(limit) {}

  // The call's output, or nothing when no native call has this signature.
  std::optional<mlx::core::array> call(const nanobind::args& args) {
    Arguments arrays;
    if (!signature(args, key_, &arrays)) {
      return std::nullopt;
    }
    auto it = calls_.find(key_);
    if (it == calls_.end()) {
      return std::nullopt;
    }
    return (*it->second)(arrays);
  }

  // Serve calls with the signature of `args` by `call`; false where the
  // arguments have no signature (a type other than array, None, str, number).
  bool add(const nanobind::args& args, std::shared_ptr<NativeCall> call) {
    std::vector<int64_t> key;
    if (!signature(args, key, nullptr)) {
      return false;
    }
    if (calls_.size() >= limit_ && !calls_.count(key)) {
      calls_.clear(); // signatures churn only in unusual programs
    }
    calls_[std::move(key)] = std::move(call);
    return true;
  }

  void clear() {
    calls_.clear();
  }
  size_t size() const {
    return calls_.size();
  }

 private:
  struct KeyHash {
    size_t operator()(const std::vector<int64_t>& key) const noexcept {
      uint64_t h = 0x9e3779b97f4a7c15ull;
      for (int64_t w : key) {
        h ^= uint64_t(w) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
      }
      return size_t(h);
    }
  };

  static bool signature(
      const nanobind::args& args,
      std::vector<int64_t>& key,
      Arguments* arrays) {
    namespace nb = nanobind;
    namespace mx = mlx::core;
    key.clear();
    auto device = mx::default_device();
    key.push_back(int64_t(device.type));
    key.push_back(device.index);
    if (arrays) {
      arrays->reserve(args.size());
    }
    for (nb::handle h : args) {
      PyObject* o = h.ptr();
      if (auto* array = as_array(h)) {
        auto& x = *array;
        key.push_back(1);
        key.push_back(int64_t(x.dtype().val()));
        key.push_back(x.ndim());
        for (auto d : x.shape()) {
          key.push_back(d);
        }
        if (arrays) {
          arrays->emplace_back(x);
        }
        continue;
      }
      if (o == Py_None) {
        key.push_back(0);
      } else if (PyBool_Check(o)) {
        key.push_back(2);
        key.push_back(o == Py_True);
      } else if (PyLong_Check(o)) {
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) {
          return false;
        }
        key.push_back(3);
        key.push_back(v);
      } else if (PyFloat_Check(o)) {
        key.push_back(4);
        key.push_back(std::bit_cast<int64_t>(PyFloat_AS_DOUBLE(o)));
      } else if (PyUnicode_Check(o)) {
        Py_ssize_t n = 0;
        const char* s = PyUnicode_AsUTF8AndSize(o, &n);
        if (!s) {
          PyErr_Clear();
          return false;
        }
        key.push_back(5);
        key.push_back(n);
        for (Py_ssize_t i = 0; i < n; i += 8) {
          int64_t w = 0;
          std::memcpy(&w, s + i, size_t(std::min<Py_ssize_t>(8, n - i)));
          key.push_back(w);
        }
      } else {
        return false;
      }
      if (arrays) {
        arrays->emplace_back(std::nullopt);
      }
    }
    return true;
  }

  size_t limit_;
  std::unordered_map<std::vector<int64_t>, std::shared_ptr<NativeCall>, KeyHash>
      calls_;
  std::vector<int64_t> key_; // reused by call(): no allocation per call
};

} // namespace aotc
