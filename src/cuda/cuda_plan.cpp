#include "cuda/cuda_plan.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "mlx/ops.h"

namespace aotc {

namespace mx = mlx::core;

namespace {

[[noreturn]] void fail(const std::string& msg) {
  throw std::invalid_argument("[aotc.CudaPlan] " + msg);
}

} // namespace

CudaPlan::CudaPlan(int num_args)
    : num_args_(num_args), filled_(std::max(num_args, 0), true) {
  if (num_args < 0) {
    fail("the argument count is negative");
  }
}

bool CudaPlan::filled(int slot) const {
  return slot >= 0 && size_t(slot) < filled_.size() && filled_[slot];
}

void CudaPlan::check_argument_slot(int slot, const char* what) const {
  if (slot < 0 || slot >= num_args_) {
    fail(
        std::string(what) + " slot " + std::to_string(slot) +
        " is not one of the " + std::to_string(num_args_) + " arguments");
  }
}

void CudaPlan::astype(int slot, mx::Dtype dtype) {
  check_argument_slot(slot, "a cast's");
  conversions_.push_back({slot, dtype, std::nullopt});
}

void CudaPlan::broadcast_to(int slot, mx::Shape shape) {
  check_argument_slot(slot, "a broadcast's");
  conversions_.push_back({slot, std::nullopt, std::move(shape)});
}

void CudaPlan::launch(
    std::shared_ptr<const LaunchSpec> spec,
    std::vector<int> inputs,
    std::vector<int> outputs,
    std::vector<int> gradient_inputs,
    Gradient gradient) {
  if (!spec) {
    fail("a launch has no spec");
  }
  for (int slot : inputs) {
    if (!filled(slot)) {
      fail(
          "kernel '" + spec->kernel + "' reads slot " + std::to_string(slot) +
          ", which no argument or earlier launch fills");
    }
  }
  if (outputs.size() != spec->array_outputs()) {
    fail(
        "kernel '" + spec->kernel + "' has " +
        std::to_string(spec->array_outputs()) + " outputs" +
        (spec->scratch_outputs.empty() ? "" : " besides its scratch") + ", but " +
        std::to_string(outputs.size()) + " output slots are given");
  }
  for (int slot : gradient_inputs) {
    check_argument_slot(slot, "a gradient input's");
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    int slot = outputs[i];
    bool repeated =
        std::find(outputs.begin(), outputs.begin() + i, slot) != outputs.begin() + i;
    if (slot < num_args_ || filled(slot) || repeated) {
      fail(
          "kernel '" + spec->kernel + "' writes slot " + std::to_string(slot) +
          ", which already holds an argument or an output");
    }
  }
  // Checked: now record the outputs' slots.
  for (int slot : outputs) {
    if (size_t(slot) >= filled_.size()) {
      filled_.resize(slot + 1, false);
    }
    filled_[slot] = true;
  }
  // A launch overlapping the one before it joins that one's primitive, unless
  // that one has a gradient (only a chain's last launch may).
  const bool chained = spec->overlaps_previous && !steps_.empty() &&
      !steps_.back().gradient && steps_.back().gradient_inputs.empty();
  Step& step = chained ? steps_.back() : steps_.emplace_back();
  std::vector<int> sources;
  sources.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const int slot = inputs[i];
    if (needs_no_array(*spec, i)) {
      // An unread place (an absent mask's or sinks'): a null pointer, and no
      // input of the primitive, which MLX pays for at every call.
      sources.push_back(kNoSource);
    } else if (chained) {
      sources.push_back(source_of(step, slot));
    } else {
      // A launch of its own passes its inputs as given, repeats included.
      sources.push_back(int(step.inputs.size()));
      step.inputs.push_back(slot);
    }
  }
  if (step.chain.use_count() > 1) {
    // A call's primitive shares this chain: extend a copy.
    step.chain = std::make_shared<Chain>(*step.chain);
  }
  step.chain->push_back({std::move(spec), std::move(sources)});
  step.outputs.insert(step.outputs.end(), outputs.begin(), outputs.end());
  step.gradient_inputs = std::move(gradient_inputs);
  step.gradient = std::move(gradient);
}

int CudaPlan::source_of(Step& step, int slot) {
  auto produced = std::find(step.outputs.begin(), step.outputs.end(), slot);
  if (produced != step.outputs.end()) {
    return ~int(produced - step.outputs.begin());
  }
  auto given = std::find(step.inputs.begin(), step.inputs.end(), slot);
  if (given != step.inputs.end()) {
    return int(given - step.inputs.begin());
  }
  step.inputs.push_back(slot);
  return int(step.inputs.size()) - 1;
}

const std::string& CudaPlan::reader_of(const Step& step, size_t input) {
  for (auto& link : *step.chain) {
    auto& from = link.sources;
    if (std::find(from.begin(), from.end(), int(input)) != from.end()) {
      return link.spec->kernel;
    }
  }
  return step.chain->front().spec->kernel;
}

template <typename F>
auto CudaPlan::per_link(F field) const {
  std::vector<std::vector<decltype(field(std::declval<const ChainLink&>()))>> all;
  for (auto& step : steps_) {
    auto& links = all.emplace_back();
    for (auto& link : *step.chain) {
      links.push_back(field(link));
    }
  }
  return all;
}

std::vector<std::vector<std::vector<int>>> CudaPlan::primitive_sources() const {
  return per_link([](const ChainLink& link) { return link.sources; });
}

std::vector<std::vector<std::string>> CudaPlan::primitive_kernels() const {
  return per_link([](const ChainLink& link) { return link.spec->kernel; });
}

void CudaPlan::set_output(int slot) {
  if (!filled(slot)) {
    fail("the output slot " + std::to_string(slot) + " is never filled");
  }
  output_ = slot;
}

mx::array CudaPlan::operator()(const Arguments& args) const {
  if (args.size() != size_t(num_args_)) {
    fail(
        "the plan takes " + std::to_string(num_args_) + " arguments, got " +
        std::to_string(args.size()));
  }
  if (output_ < 0) {
    fail("the plan has no output slot");
  }
  // Slots point at the arguments or at arrays this call made (conversions,
  // outputs): the arguments are not copied. `made` never grows past its
  // reservation (two arrays a conversion at most, one an output slot), so the
  // pointers hold.
  std::vector<const mx::array*> env(filled_.size(), nullptr);
  for (size_t i = 0; i < args.size(); ++i) {
    env[i] = args[i] ? &*args[i] : nullptr;
  }
  std::vector<mx::array> made;
  made.reserve(2 * conversions_.size() + filled_.size() - args.size());
  auto keep = [&](mx::array x) { return &made.emplace_back(std::move(x)); };
  for (auto& c : conversions_) {
    auto& x = env[c.slot];
    if (!x) {
      continue;
    }
    if (c.dtype && x->dtype() != *c.dtype) {
      x = keep(mx::astype(*x, *c.dtype));
    }
    if (c.shape && x->shape() != *c.shape) {
      x = keep(mx::broadcast_to(*x, *c.shape));
    }
  }
  // `kernel` names the reader only when the slot is empty (error messages).
  auto take = [](const auto& from, int slot, auto kernel) -> const mx::array& {
    if (!from[slot]) {
      fail(
          "kernel '" + kernel() + "' needs slot " + std::to_string(slot) +
          ", but that argument is None");
    }
    return *from[slot];
  };
  for (auto& step : steps_) {
    std::vector<mx::array> inputs, gradient_inputs;
    inputs.reserve(step.inputs.size());
    for (size_t i = 0; i < step.inputs.size(); ++i) {
      inputs.push_back(
          take(env, step.inputs[i], [&] { return reader_of(step, i); }));
    }
    for (int slot : step.gradient_inputs) {
      gradient_inputs.push_back(
          take(args, slot, [&] { return step.chain->back().spec->kernel; }));
    }
    auto outputs = aotc::launch_chain(
        step.chain,
        std::move(inputs),
        std::move(gradient_inputs),
        step.gradient);
    for (size_t i = 0; i < outputs.size(); ++i) {
      env[step.outputs[i]] = keep(std::move(outputs[i]));
    }
  }
  if (!env[output_]) {
    fail("the output slot " + std::to_string(output_) + " was not filled");
  }
  return *env[output_];
}

} // namespace aotc
