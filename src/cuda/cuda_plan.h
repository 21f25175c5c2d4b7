// A launch plan of aotc's CUDA kernels as one native call: the conversions of
// the arguments (casts, mask broadcasts), then the launches over numbered
// slots. Slots [0, num_args) hold the call's arguments; each launch writes its
// outputs to further slots. Made once per (call signature, scale) by the
// family's Python plan; a call then runs without Python.
//
// Needs no CUDA headers: builds without the CUDA primitive compile it too (a
// plan with launches then fails at its first launch, as cuda_launch does).
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cuda/cuda_launch.h"
#include "native_call.h"

namespace aotc {

class CudaPlan : public NativeCall {
 public:
  explicit CudaPlan(int num_args);

  // env[slot] = astype(env[slot], dtype), where the argument is present and
  // of another dtype. Kernels see the converted arrays; gradients the
  // arguments as given.
  void astype(int slot, mlx::core::Dtype dtype);
  // env[slot] = broadcast_to(env[slot], shape), where the argument is present.
  void broadcast_to(int slot, mlx::core::Shape shape);
  // A launch reading `inputs` (slots), writing `outputs` (fresh slots, one per
  // output of the spec that is not scratch); `gradient_inputs` are argument
  // slots appended for `gradient` (see launch()).
  void launch(
      std::shared_ptr<const LaunchSpec> spec,
      std::vector<int> inputs,
      std::vector<int> outputs,
      std::vector<int> gradient_inputs,
      Gradient gradient);
  void set_output(int slot);

  mlx::core::array operator()(const Arguments& args) const override;

  int num_args() const {
    return num_args_;
  }

  // The kernels of each primitive a call builds, in order: a launch that
  // overlaps the one before it shares that one's primitive.
  std::vector<std::vector<std::string>> primitive_kernels() const;
  // Per primitive, per launch, where each kernel input comes from
  // (ChainLink::sources: the primitive's input i, or ~j its output j).
  std::vector<std::vector<std::vector<int>>> primitive_sources() const;

 private:
  struct Conversion {
    int slot;
    std::optional<mlx::core::Dtype> dtype;
    std::optional<mlx::core::Shape> shape;
  };
  // A primitive's worth of launches: one, or a chain whose later launches
  // overlap the launch before them (LaunchSpec::overlaps_previous).
  struct Step {
    std::shared_ptr<Chain> chain = std::make_shared<Chain>();
    std::vector<int> inputs; // slots of the chain's inputs
    std::vector<int> outputs; // slots of its outputs, all links' in order
    std::vector<int> gradient_inputs;
    Gradient gradient;
  };

  void check_argument_slot(int slot, const char* what) const;
  // Where a chained launch's input `slot` comes from in `step`'s chain (see
  // ChainLink), adding it to the chain's inputs when new.
  static int source_of(Step& step, int slot);
  // field(link) for every launch of every primitive.
  template <typename F>
  auto per_link(F field) const;
  // The kernel of `step` that reads its input `input` (error messages).
  static const std::string& reader_of(const Step& step, size_t input);
  bool filled(int slot) const;

  int num_args_;
  std::vector<bool> filled_; // per slot: an argument or an earlier launch fills it
  std::vector<Conversion> conversions_;
  std::vector<Step> steps_;
  int output_ = -1;
};

} // namespace aotc
