// AdamW with decoupled weight decay (Loshchilov & Hutter), the learning-rate schedule and global
// gradient-norm clipping. State is keyed by parameter name so checkpoints are layout-independent.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <optional>

#include <string>
#include <vector>

#include "config/config.h"

namespace moetrain::optim {

struct ParamState {
  std::string name;
  torch::Tensor param;
  torch::Tensor exp_avg;     // first moment, fp32, shape of param
  torch::Tensor exp_avg_sq;  // second moment, fp32, shape of param
  bool decay = true;
  // The fp32 weights, when the optimizer keeps them apart from `param` (ZeRO-1 with the parameter
  // held in bf16): checkpoints write these in its place.
  torch::Tensor master;
  // optim.name muon, a hidden matrix (optim/muon.h): `momentum` is its state, written to checkpoints as
  // "<name>.momentum"; exp_avg and exp_avg_sq are not used.
  bool muon = false;
  torch::Tensor momentum;  // fp32, shape of param
};

// What a checkpoint holds of an optimizer, whatever the layout: every parameter's moments in the
// shape of the parameter this rank holds, and the step count. A moment may be undefined where this
// rank does not write it (a ZeRO-1 shard that another rank saves).
struct OptimizerState {
  std::vector<ParamState> states;
  int64_t step_count = 0;
  std::string optimizer = "adamw";  // optim.name: checkpoints record it, a resume checks it
};

class AdamW {
 public:
  // `no_decay(name)` says which parameters skip weight decay. `fused`: LibTorch's fused multi-tensor
  // kernel (at::_fused_adamw_, one launch per decay group) instead of the per-tensor ops; by default
  // where every parameter is on CUDA. The CPU keeps the per-tensor ops by default so that its runs
  // (and the golden curve) stay the same to the last bit; both agree to fp32 rounding (tested).
  // `muon[i]` (optim::Muon, which holds an AdamW for all its parameters): parameter i is a hidden matrix
  // whose state is a Muon momentum instead of the two moments, and which step() leaves to Muon.
  AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const config::OptimConfig& cfg,
        const std::function<bool(const std::string&)>& no_decay, std::optional<bool> fused = std::nullopt,
        const std::vector<bool>& muon = {});
  bool fused() const { return fused_; }
  void step(double lr);
  void zero_grad();
  int64_t step_count() const { return state_.step_count; }
  void set_step_count(int64_t n) { state_.step_count = n; }
  std::vector<ParamState>& states() { return state_.states; }
  const std::vector<ParamState>& states() const { return state_.states; }
  OptimizerState& state() { return state_; }
  const OptimizerState& state() const { return state_; }

 private:
  config::OptimConfig cfg_;
  OptimizerState state_;
  bool fused_ = false;
};

// One AdamW update of `param` in place from `grad` at 1-based step `step_count`: the moments advance,
// weight decay (when `decay`) shrinks the weight, then the bias-corrected step. Element-wise, so a
// slice of a parameter (a ZeRO-1 shard) updates exactly as that slice of the whole would.
void adamw_update(torch::Tensor param, const torch::Tensor& grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                  const config::OptimConfig& cfg, double lr, int64_t step_count, bool decay);

// One AdamW step over parallel lists (each parameter or slice of one, its gradient and fp32 moments;
// `decay[i]` says whether item i takes weight decay) at 1-based step `step_count`. `fused`: LibTorch's
// multi-tensor kernel, at::_fused_adamw_ (two launches, with and without decay; CUDA); else
// adamw_update per item. Both compute the same update; their roundings differ in the last bits.
void adamw_step(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                const std::vector<bool>& decay, const config::OptimConfig& cfg, double lr, int64_t step_count, bool fused);

// Linear warmup to optim.lr over warmup_steps, then cosine decay to min_lr at total_steps (or constant).
double learning_rate(const config::OptimConfig& cfg, int64_t step, int64_t total_steps);

// The sum of the tensors' squared elements, accumulated in fp32 (a () tensor on their device; 0 on the
// CPU when there are none).
torch::Tensor sum_of_squares(const std::vector<torch::Tensor>& tensors);
// L2 norm of one process's gradients (fp32 accumulation); scales them to max_norm when above it
// (max_norm > 0). Across ranks the step gathers dist::Optimizer::norm_part with its health instead.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace moetrain::optim
