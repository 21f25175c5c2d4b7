// The launch program's evaluation-time rules (see program.h). No Metal here.
#include "program.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

namespace aotc::metal {

namespace {

bool flat_batch_heads(const mx::array& a) {
  if (a.ndim() < 2) {
    return true;
  }
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  return a.flags().row_contiguous || shape[0] == 1 || shape[1] == 1 ||
      strides[0] == strides[1] * shape[1];
}

bool inner_contiguous(const mx::array& a) {
  return a.ndim() == 0 || a.strides().back() == 1;
}

// A (B, H, L, D) array laid out as (L, X, D), X being axis `axis` (0 or 1; the other has size 1).
bool seq_major(const mx::array& a, int axis) {
  if (a.ndim() != 4) {
    return false;
  }
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  return strides[3] == 1 && strides[2] == shape[3] * shape[axis] && strides[axis] == shape[3];
}

int64_t as_int(const Scalar& v) {
  return v.is_float ? static_cast<int64_t>(v.f) : v.i;
}

void check_value(const Value& v, const std::vector<mx::array>& inputs) {
  if (v.kind != Value::Kind::StrideOf && v.kind != Value::Kind::NotRowContiguous) {
    return;
  }
  if (v.input < 0 || static_cast<size_t>(v.input) >= inputs.size()) {
    throw std::invalid_argument("[aotc.metal_launch] a value reads an input that is not given");
  }
  if (v.kind == Value::Kind::StrideOf) {
    if (v.axes.empty()) {
      throw std::invalid_argument("[aotc.metal_launch] stride_of needs at least one axis");
    }
    int ndim = static_cast<int>(inputs[v.input].ndim());
    for (int axis : v.axes) {
      if (axis < 0 || axis >= ndim) {
        std::ostringstream msg;
        msg << "[aotc.metal_launch] stride_of axis " << axis << " of input " << v.input
            << ", which has " << ndim << " dimensions";
        throw std::invalid_argument(msg.str());
      }
    }
  }
}

} // namespace

bool fits(const mx::array& a, Layout layout) {
  switch (layout) {
    case Layout::Any:
      return true;
    case Layout::RowContiguous:
      return a.flags().row_contiguous;
    case Layout::InnerContiguous:
      return inner_contiguous(a);
    case Layout::FlatBatchHeads:
      return flat_batch_heads(a);
    case Layout::InnerContiguousFlatBatchHeads:
      return inner_contiguous(a) && flat_batch_heads(a);
    case Layout::RowContiguousOrSeqMajor:
      // MLX's q_copy_unless: the singleton of batch/heads lets the other swap with L.
      if (a.flags().row_contiguous) {
        return true;
      }
      if (a.ndim() == 4 && (a.shape(0) == 1 || a.shape(1) == 1)) {
        return seq_major(a, a.shape(0) == 1 ? 1 : 0);
      }
      return false;
    case Layout::RowContiguousOrSeqMajorOneBatch:
      return a.flags().row_contiguous || (a.ndim() == 4 && a.shape(0) == 1 && seq_major(a, 1));
  }
  return false;
}

int64_t stride_of(const mx::array& a, const Value& v) {
  for (size_t j = 0; j + 1 < v.axes.size(); ++j) {
    if (a.shape(v.axes[j]) > 1) {
      return a.strides(v.axes[j]);
    }
  }
  int last = v.axes.back();
  if (!v.zero_if_singleton || a.shape(last) > 1) {
    return a.strides(last);
  }
  return 0;
}

Scalar resolve(const Value& v, const std::vector<mx::array>& inputs) {
  switch (v.kind) {
    case Value::Kind::Int:
      return {false, v.int_value, 0.0};
    case Value::Kind::Float:
      return {true, 0, v.float_value};
    case Value::Kind::StrideOf:
      return {false, stride_of(inputs[v.input], v), 0.0};
    case Value::Kind::NotRowContiguous:
      return {false, inputs[v.input].flags().row_contiguous ? 0 : 1, 0.0};
  }
  return {};
}

std::vector<ConstantValue> resolve_constants(
    const std::vector<Constant>& constants,
    const std::vector<mx::array>& inputs) {
  std::vector<ConstantValue> out;
  out.reserve(constants.size());
  for (const auto& c : constants) {
    Scalar v = resolve(c.value, inputs);
    ConstantValue value;
    value.index = c.index;
    value.type = c.type;
    switch (c.type) {
      case ScalarType::Bool:
        value.b = v.is_float ? v.f != 0.0 : v.i != 0;
        break;
      case ScalarType::Int32:
      case ScalarType::UInt64:
        value.i = static_cast<int32_t>(as_int(v));
        break;
      case ScalarType::Float32:
        value.f = static_cast<float>(v.is_float ? v.f : static_cast<double>(v.i));
        break;
    }
    out.push_back(value);
  }
  return out;
}

std::string hash_name(const std::string& kernel, const std::vector<ConstantValue>& values) {
  std::ostringstream name;
  name << kernel;
  for (const auto& v : values) {
    name << "_fc" << v.index << "_";
    switch (v.type) {
      case ScalarType::Bool:
        name << (v.b ? 't' : 'n');
        break;
      case ScalarType::Int32:
      case ScalarType::UInt64:
        name << v.i;
        break;
      case ScalarType::Float32: {
        uint32_t bits = 0;
        std::memcpy(&bits, &v.f, sizeof(bits));
        name << "f" << bits;
        break;
      }
    }
  }
  return name.str();
}

void check_program(const Program& p, const std::vector<mx::array>& inputs) {
  if (p.layouts.size() != inputs.size()) {
    std::ostringstream msg;
    msg << "[aotc.metal_launch] the program takes " << p.layouts.size() << " inputs, got "
        << inputs.size();
    throw std::invalid_argument(msg.str());
  }
  if (p.outputs.empty()) {
    throw std::invalid_argument("[aotc.metal_launch] the program has no outputs");
  }
  for (const auto& d : p.dispatches) {
    for (const auto& c : d.constants) {
      check_value(c.value, inputs);
    }
    for (const auto& b : d.buffers) {
      if (!b.is_array) {
        check_value(b.value, inputs);
        continue;
      }
      size_t count = b.array.kind == ArrayRef::Kind::Input ? inputs.size()
          : b.array.kind == ArrayRef::Kind::Output         ? p.outputs.size()
                                                           : p.temporaries.size();
      if (b.array.index < 0 || static_cast<size_t>(b.array.index) >= count) {
        std::ostringstream msg;
        msg << "[aotc.metal_launch] " << d.kernel << " binds buffer(" << b.index
            << ") to an array that the program does not have";
        throw std::invalid_argument(msg.str());
      }
      if (b.written && b.array.kind == ArrayRef::Kind::Input) {
        throw std::invalid_argument("[aotc.metal_launch] inputs are read-only");
      }
    }
    for (size_t t : d.threadgroup) {
      if (t == 0) {
        throw std::invalid_argument("[aotc.metal_launch] a threadgroup dimension is 0");
      }
    }
  }
}

bool operator==(const Value& a, const Value& b) {
  return a.kind == b.kind && a.int_value == b.int_value && a.float_value == b.float_value &&
      a.input == b.input && a.axes == b.axes && a.zero_if_singleton == b.zero_if_singleton;
}

bool operator==(const Constant& a, const Constant& b) {
  return a.index == b.index && a.type == b.type && a.value == b.value;
}

bool operator==(const Buffer& a, const Buffer& b) {
  return a.index == b.index && a.is_array == b.is_array && a.array.kind == b.array.kind &&
      a.array.index == b.array.index && a.written == b.written && a.type == b.type &&
      a.value == b.value;
}

bool operator==(const Dispatch& a, const Dispatch& b) {
  return a.kernel == b.kernel && a.constants == b.constants && a.buffers == b.buffers &&
      a.grid == b.grid && a.threadgroup == b.threadgroup;
}

bool operator==(const ArraySpec& a, const ArraySpec& b) {
  return a.shape == b.shape && a.dtype == b.dtype;
}

bool operator==(const Program& a, const Program& b) {
  return a.layouts == b.layouts && a.outputs == b.outputs && a.temporaries == b.temporaries &&
      a.dispatches == b.dispatches;
}

} // namespace aotc::metal
