// AdamW with decoupled weight decay (Loshchilov & Hutter), the learning-rate schedule and global
// gradient-norm clipping. State is keyed by parameter name so checkpoints are layout-independent.
#pragma once
#include <torch/torch.h>

#include <functional>

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
};

class AdamW {
 public:
  // `no_decay(name)` says which parameters skip weight decay.
  AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const config::OptimConfig& cfg,
        const std::function<bool(const std::string&)>& no_decay);
  void step(double lr);
  void zero_grad();
  int64_t step_count() const { return step_count_; }
  void set_step_count(int64_t n) { step_count_ = n; }
  std::vector<ParamState>& states() { return states_; }
  const std::vector<ParamState>& states() const { return states_; }

 private:
  config::OptimConfig cfg_;
  std::vector<ParamState> states_;
  int64_t step_count_ = 0;
};

// Linear warmup to optim.lr over warmup_steps, then cosine decay to min_lr at total_steps (or constant).
double learning_rate(const config::OptimConfig& cfg, int64_t step, int64_t total_steps);

// Global L2 norm of all gradients (fp32 accumulation); scales them to max_norm when above it (max_norm > 0).
// Under expert parallelism, params marked in `sharded` differ across ranks: their squared sum goes
// through `sum_sharded` (a sum over the ranks that share them) so that every rank clips alike.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm, const std::vector<bool>& sharded = {},
                      const std::function<void(torch::Tensor&)>& sum_sharded = nullptr);

}  // namespace moetrain::optim
