// Python bindings of aotc's Metal launch primitive: parses the plain-data program that
// aotc/families/<family>/metal.py writes (`MetalPlan.wire()`, version 1) into metal_launch.h's
// structs once, when the graph is built.
#include "metal_bindings.h"

#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "metal_launch.h"
#include "mlx/dtype.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

namespace am = aotc::metal;
namespace mx = mlx::core;

constexpr int kWireVersion = 1;

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  throw std::invalid_argument("[aotc.metal_launch] " + where + ": " + what);
}

nb::handle field(nb::handle obj, const char* key, const std::string& where) {
  if (!nb::isinstance<nb::dict>(obj)) {
    bad(where, "expected a dict");
  }
  nb::dict d = nb::borrow<nb::dict>(obj);
  if (!d.contains(key)) {
    bad(where, std::string("missing key '") + key + "'");
  }
  return d[key];
}

std::string text(nb::handle obj, const std::string& where) {
  if (!nb::isinstance<nb::str>(obj)) {
    bad(where, "expected a string");
  }
  return nb::cast<std::string>(obj);
}

int64_t integer(nb::handle obj, const std::string& where) {
  if (!nb::isinstance<nb::int_>(obj) || nb::isinstance<nb::bool_>(obj)) {
    bad(where, "expected an integer");
  }
  return nb::cast<int64_t>(obj);
}

std::vector<nb::handle> items(nb::handle obj, const std::string& where) {
  if (!nb::isinstance<nb::list>(obj) && !nb::isinstance<nb::tuple>(obj)) {
    bad(where, "expected a list");
  }
  std::vector<nb::handle> out;
  for (nb::handle item : obj) {
    out.push_back(item);
  }
  return out;
}

mx::Dtype dtype(nb::handle obj, const std::string& where) {
  static const std::unordered_map<std::string, mx::Dtype> dtypes = {
      {"bool", mx::bool_},       {"uint8", mx::uint8},     {"uint16", mx::uint16},
      {"uint32", mx::uint32},    {"uint64", mx::uint64},   {"int8", mx::int8},
      {"int16", mx::int16},      {"int32", mx::int32},     {"int64", mx::int64},
      {"float16", mx::float16},  {"bfloat16", mx::bfloat16}, {"float32", mx::float32},
  };
  auto name = text(obj, where);
  auto it = dtypes.find(name);
  if (it == dtypes.end()) {
    bad(where, "unknown dtype '" + name + "'");
  }
  return it->second;
}

am::ScalarType scalar_type(nb::handle obj, const std::string& where) {
  auto name = text(obj, where);
  if (name == "bool") {
    return am::ScalarType::Bool;
  }
  if (name == "int32") {
    return am::ScalarType::Int32;
  }
  if (name == "uint64") {
    return am::ScalarType::UInt64;
  }
  if (name == "float32") {
    return am::ScalarType::Float32;
  }
  bad(where, "unknown scalar type '" + name + "' (bool, int32, uint64, float32)");
}

am::Layout layout(nb::handle obj, const std::string& where) {
  static const std::unordered_map<std::string, am::Layout> layouts = {
      {"any", am::Layout::Any},
      {"row_contiguous", am::Layout::RowContiguous},
      {"inner_contiguous", am::Layout::InnerContiguous},
      {"flat_batch_heads", am::Layout::FlatBatchHeads},
      {"inner_contiguous_flat_batch_heads", am::Layout::InnerContiguousFlatBatchHeads},
      {"row_contiguous_or_seq_major", am::Layout::RowContiguousOrSeqMajor},
      {"row_contiguous_or_seq_major_one_batch", am::Layout::RowContiguousOrSeqMajorOneBatch},
  };
  auto name = text(obj, where);
  auto it = layouts.find(name);
  if (it == layouts.end()) {
    bad(where, "unknown layout '" + name + "'");
  }
  return it->second;
}

// A literal (bool, int, float) or {"stride_of": i, "axes": [...], "singleton": "last"|"zero"}
// or {"not_row_contiguous": i}.
am::Value value(nb::handle obj, const std::string& where) {
  am::Value v;
  if (nb::isinstance<nb::bool_>(obj)) {
    v.kind = am::Value::Kind::Int;
    v.int_value = nb::cast<bool>(obj) ? 1 : 0;
  } else if (nb::isinstance<nb::int_>(obj)) {
    v.kind = am::Value::Kind::Int;
    v.int_value = nb::cast<int64_t>(obj);
  } else if (nb::isinstance<nb::float_>(obj)) {
    v.kind = am::Value::Kind::Float;
    v.float_value = nb::cast<double>(obj);
  } else if (nb::isinstance<nb::dict>(obj)) {
    nb::dict d = nb::borrow<nb::dict>(obj);
    if (d.contains("stride_of")) {
      v.kind = am::Value::Kind::StrideOf;
      v.input = static_cast<int>(integer(d["stride_of"], where + ".stride_of"));
      for (nb::handle axis : items(field(obj, "axes", where), where + ".axes")) {
        v.axes.push_back(static_cast<int>(integer(axis, where + ".axes")));
      }
      auto singleton = text(field(obj, "singleton", where), where + ".singleton");
      if (singleton != "last" && singleton != "zero") {
        bad(where, "singleton must be 'last' or 'zero'");
      }
      v.zero_if_singleton = singleton == "zero";
    } else if (d.contains("not_row_contiguous")) {
      v.kind = am::Value::Kind::NotRowContiguous;
      v.input = static_cast<int>(integer(d["not_row_contiguous"], where));
    } else {
      bad(where, "a value dict needs 'stride_of' or 'not_row_contiguous'");
    }
  } else {
    bad(where, "expected a number or a value dict");
  }
  return v;
}

am::Constant constant(nb::handle obj, const std::string& where) {
  am::Constant c;
  c.index = static_cast<int>(integer(field(obj, "index", where), where + ".index"));
  c.type = scalar_type(field(obj, "type", where), where + ".type");
  if (c.type == am::ScalarType::UInt64) {
    bad(where, "function constants are bool, int32 or float32");
  }
  c.value = value(field(obj, "value", where), where + ".value");
  return c;
}

am::Buffer buffer(nb::handle obj, const std::string& where) {
  am::Buffer b;
  b.index = static_cast<int>(integer(field(obj, "index", where), where + ".index"));
  nb::dict d = nb::borrow<nb::dict>(obj);
  if (d.contains("array")) {
    b.is_array = true;
    auto ref = items(d["array"], where + ".array");
    if (ref.size() != 2) {
      bad(where, "array must be [kind, index]");
    }
    auto kind = text(ref[0], where + ".array");
    if (kind == "input") {
      b.array.kind = am::ArrayRef::Kind::Input;
    } else if (kind == "output") {
      b.array.kind = am::ArrayRef::Kind::Output;
    } else if (kind == "temporary") {
      b.array.kind = am::ArrayRef::Kind::Temporary;
    } else {
      bad(where, "array kind must be input, output or temporary");
    }
    b.array.index = static_cast<int>(integer(ref[1], where + ".array"));
    auto access = text(field(obj, "access", where), where + ".access");
    if (access != "read" && access != "write") {
      bad(where, "access must be 'read' or 'write'");
    }
    b.written = access == "write";
  } else {
    b.type = scalar_type(field(obj, "type", where), where + ".type");
    b.value = value(field(obj, "value", where), where + ".value");
  }
  return b;
}

std::array<size_t, 3> triple(nb::handle obj, const std::string& where) {
  auto xs = items(obj, where);
  if (xs.size() != 3) {
    bad(where, "expected 3 sizes");
  }
  std::array<size_t, 3> out{};
  for (size_t j = 0; j < 3; ++j) {
    auto x = integer(xs[j], where);
    if (x < 0) {
      bad(where, "sizes must not be negative");
    }
    out[j] = static_cast<size_t>(x);
  }
  return out;
}

am::ArraySpec array_spec(nb::handle obj, const std::string& where) {
  am::ArraySpec spec;
  for (nb::handle dim : items(field(obj, "shape", where), where + ".shape")) {
    spec.shape.push_back(static_cast<int32_t>(integer(dim, where + ".shape")));
  }
  spec.dtype = dtype(field(obj, "dtype", where), where + ".dtype");
  return spec;
}

am::Program program(nb::handle obj) {
  auto version = integer(field(obj, "version", "program"), "program.version");
  if (version != kWireVersion) {
    std::ostringstream msg;
    msg << "version " << version << " is not " << kWireVersion
        << " (aotc's Python and its extension come from different builds)";
    bad("program", msg.str());
  }
  am::Program p;
  for (nb::handle in : items(field(obj, "inputs", "program"), "program.inputs")) {
    p.layouts.push_back(layout(field(in, "layout", "inputs[]"), "inputs[].layout"));
  }
  for (nb::handle out : items(field(obj, "outputs", "program"), "program.outputs")) {
    p.outputs.push_back(array_spec(out, "outputs[]"));
  }
  for (nb::handle t : items(field(obj, "temporaries", "program"), "program.temporaries")) {
    p.temporaries.push_back(array_spec(t, "temporaries[]"));
  }
  int j = 0;
  for (nb::handle d : items(field(obj, "dispatches", "program"), "program.dispatches")) {
    std::string where = "dispatches[" + std::to_string(j++) + "]";
    am::Dispatch dispatch;
    dispatch.kernel = text(field(d, "kernel", where), where + ".kernel");
    for (nb::handle c : items(field(d, "constants", where), where + ".constants")) {
      dispatch.constants.push_back(constant(c, where + ".constants[]"));
    }
    for (nb::handle b : items(field(d, "buffers", where), where + ".buffers")) {
      dispatch.buffers.push_back(buffer(b, where + ".buffers[]"));
    }
    dispatch.grid = triple(field(d, "grid", where), where + ".grid");
    dispatch.threadgroup = triple(field(d, "threadgroup", where), where + ".threadgroup");
    p.dispatches.push_back(std::move(dispatch));
  }
  return p;
}

} // namespace

void aotc_register_metal(nb::module_& m) {
  nb::class_<am::Program>(
      m, "MetalProgram", "A launch program parsed once by metal_program(), for metal_launch().");
  m.def(
      "metal_program",
      [](nb::handle wire) { return program(wire); },
      "wire"_a,
      "Parse a program (MetalPlan.wire()) once; metal_launch() takes the result.");
  m.def(
      "metal_launch",
      [](const std::string& library_path,
         std::vector<mx::array> inputs,
         nb::handle program_or_wire,
         mx::StreamOrDevice s) {
        if (nb::isinstance<am::Program>(program_or_wire)) {
          return am::launch(
              library_path, std::move(inputs), nb::cast<const am::Program&>(program_or_wire), s);
        }
        return am::launch(library_path, std::move(inputs), program(program_or_wire), s);
      },
      "library_path"_a,
      "inputs"_a,
      "program"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Run the dispatches of `program` (a MetalProgram, or the wire dict of MetalPlan.wire()) "
      "from the metallib at `library_path` on `inputs`; returns the outputs as lazy arrays.");
  m.def(
      "metal_max_threads",
      [](const std::string& library_path,
         const std::string& kernel,
         nb::handle constants,
         mx::StreamOrDevice s) {
        std::vector<am::Constant> parsed;
        for (nb::handle c : items(constants, "constants")) {
          parsed.push_back(constant(c, "constants[]"));
        }
        return am::max_threads_per_threadgroup(library_path, kernel, parsed, s);
      },
      "library_path"_a,
      "kernel"_a,
      "constants"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "maxTotalThreadsPerThreadgroup of `kernel` specialised with `constants` "
      "([{index, type, value}] with graph-time values).");
  m.def(
      "metal_architecture",
      [](mx::StreamOrDevice s) { return am::architecture(s); },
      nb::kw_only(),
      "stream"_a = nb::none(),
      "The GPU architecture string MLX's heuristics read, e.g. 'applegpu_g15s'.");
}
