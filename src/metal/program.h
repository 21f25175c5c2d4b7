// The launch program of aotc's Metal primitive, and the rules it applies to inputs at evaluation
// time (layouts, strides, function constant values). Plain MLX core code with no Metal in it, so
// that it also builds and runs against Linux MLX (tests/test_metal_typecheck.py runs it there).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "mlx/array.h"

namespace aotc::metal {

namespace mx = mlx::core;

// A scalar known when the graph is built, or read from an input at evaluation time.
struct Value {
  enum class Kind { Int, Float, StrideOf, NotRowContiguous };
  Kind kind = Kind::Int;
  int64_t int_value = 0;
  double float_value = 0.0;
  int input = -1; // StrideOf, NotRowContiguous: which input
  // StrideOf: the stride of the first of `axes` whose size is > 1; when all have size 1, the
  // stride of the last of them, or 0 when `zero_if_singleton`.
  std::vector<int> axes;
  bool zero_if_singleton = false;
};

enum class ScalarType { Bool, Int32, UInt64, Float32 };

// `[[function_constant(index)]]` of the kernel.
struct Constant {
  int index = 0;
  ScalarType type = ScalarType::Bool; // Bool, Int32 or Float32
  Value value;
};

struct ArrayRef {
  enum class Kind { Input, Output, Temporary };
  Kind kind = Kind::Input;
  int index = 0;
};

// `[[buffer(index)]]` of the kernel: an array, or the bytes of one scalar.
struct Buffer {
  int index = 0;
  bool is_array = false;
  ArrayRef array; // is_array
  bool written = false; // is_array: bound as an output (MLX tracks it for barriers)
  ScalarType type = ScalarType::Int32; // !is_array
  Value value; // !is_array
};

struct Dispatch {
  std::string kernel;
  std::vector<Constant> constants;
  std::vector<Buffer> buffers;
  std::array<size_t, 3> grid{1, 1, 1}; // threadgroups per grid
  std::array<size_t, 3> threadgroup{1, 1, 1}; // threads per threadgroup
};

// What an input's strides must allow; an input that does not fit is copied to a row-contiguous
// array at evaluation time (the predicates are those of MLX's sdpa_vector eval_gpu).
enum class Layout {
  Any,
  RowContiguous,
  InnerContiguous, // strides[-1] == 1
  FlatBatchHeads, // axes 0 and 1 can be walked as one: B == 1, H == 1 or s0 == s1 * H
  InnerContiguousFlatBatchHeads,
  RowContiguousOrSeqMajor, // row-contiguous, or (L, B*H, D) with B == 1 or H == 1
  RowContiguousOrSeqMajorOneBatch, // row-contiguous, or (L, H, D) with B == 1
};

struct ArraySpec {
  mx::Shape shape;
  mx::Dtype dtype = mx::float32;
};

struct Program {
  std::vector<Layout> layouts; // one per input
  std::vector<ArraySpec> outputs;
  std::vector<ArraySpec> temporaries;
  std::vector<Dispatch> dispatches;
};

bool operator==(const Value& a, const Value& b);
bool operator==(const Constant& a, const Constant& b);
bool operator==(const Buffer& a, const Buffer& b);
bool operator==(const Dispatch& a, const Dispatch& b);
bool operator==(const ArraySpec& a, const ArraySpec& b);
bool operator==(const Program& a, const Program& b);

// A value resolved against the inputs of one evaluation.
struct Scalar {
  bool is_float = false;
  int64_t i = 0;
  double f = 0.0;
};

// A function constant's value in the type the kernel declares.
struct ConstantValue {
  int index = 0;
  ScalarType type = ScalarType::Bool;
  bool b = false;
  int32_t i = 0;
  float f = 0.0f;
};

// Whether `a`'s strides are what a kernel expecting `layout` can walk (MLX's copy_unless rules).
bool fits(const mx::array& a, Layout layout);

// StrideOf, as MLX's sdpa host code reads strides (see Value).
int64_t stride_of(const mx::array& a, const Value& v);

Scalar resolve(const Value& v, const std::vector<mx::array>& inputs);

std::vector<ConstantValue> resolve_constants(
    const std::vector<Constant>& constants,
    const std::vector<mx::array>& inputs);

// The name MLX caches a specialised pipeline under: the kernel name plus every index and value.
std::string hash_name(const std::string& kernel, const std::vector<ConstantValue>& values);

// Throws std::invalid_argument when `program` cannot run on `inputs`.
void check_program(const Program& program, const std::vector<mx::array>& inputs);

} // namespace aotc::metal
