// The router: scores every token against every routed expert and picks the top-k, optionally within
// the best groups (DeepSeek-V3) and with an aux-loss-free selection bias. Also computes the balancing
// losses and routing statistics of the call.
// Legend: T tokens, D model dim, E routed experts, K experts per token, B sequences, S = T / B.
// Router math runs in fp32 (fp64 for fp64 inputs) whatever the model dtype.
#pragma once
#include <torch/torch.h>

#include <functional>

#include "config/config.h"

namespace moetrain::moe {

// Balancing losses (unweighted) and statistics of one router call.
struct RouterStats {
  torch::Tensor aux_loss;             // () switch/GShard loss over the batch: E * sum_e f_e * P_e
  torch::Tensor seq_aux_loss;         // () the same per sequence, averaged over sequences (DeepSeek-V3)
  torch::Tensor z_loss;               // () mean_t logsumexp(logits_t)^2
  torch::Tensor entropy;              // () mean_t entropy of the token's normalized scores (nats)
  torch::Tensor tokens_per_expert_E;  // (E,) int64 copies routed to each expert (before capacity)
  torch::Tensor dropped;              // () int64 copies dropped by capacity (zero when dropless)
};

struct RoutingPlan {
  torch::Tensor topk_ids_TK;      // (T, K) int64, chosen experts, best first
  torch::Tensor topk_weights_TK;  // (T, K) fp32, combine weights (normalized if asked, times routed_scaling)
  RouterStats stats;
};

class RouterImpl : public torch::nn::Module {
 public:
  RouterImpl(const config::MoEConfig& cfg, int d_model);
  // x_TD holds T = B * seq_len tokens, sequence-major; seq_len only shapes the sequence-wise loss.
  RoutingPlan route(const torch::Tensor& x_TD, int64_t seq_len) const;
  // Aux-loss-free balancing: expert_bias += rate * sign(mean(load) - load). No-op when the rate is 0.
  void update_bias(const torch::Tensor& tokens_per_expert_E);
  // The seam for data parallelism: a hook that sums per-expert counts over the data-parallel ranks in
  // place and returns how many ranks there are. With one, the switch loss's expert fractions f_e are
  // those of the global batch, so that the ranks' averaged gradients equal one process's.
  using GlobalCounts = std::function<int64_t(torch::Tensor& counts_E)>;
  void set_global_counts(GlobalCounts hook) { global_counts_ = std::move(hook); }
  // Routing replay (rl.routing_replay): sees each call's chosen experts (T, K) int64 and returns those the
  // tokens use (same shape; a row holding a negative id keeps the router's own choice). Their combine
  // weights are the scores there, normalised as configured. Unset: the router's own choice.
  using Replay = std::function<torch::Tensor(const torch::Tensor& topk_ids_TK)>;
  void set_replay(Replay hook) { replay_ = std::move(hook); }
  // The tokens that count in the balancing losses and their statistics (counts, P_e, z-loss, entropy):
  // rl's update batches are right-padded, and padding must weigh on neither the gradient nor the
  // comparison of data-parallel layouts. (T,) bool, true = counts; undefined (the default, all of
  // `train`) = every token, the unmasked formulas as they were. Selection, dispatch and
  // tokens_per_expert_E still see every token.
  void set_balance_mask(torch::Tensor mask_T) { balance_mask_T_ = std::move(mask_T); }

  torch::Tensor weight;       // (E, D)
  torch::Tensor bias;         // (E,) learned logit bias (model.moe.router.logit_bias); undefined without
  torch::Tensor expert_bias;  // (E,) fp32 buffer, selection only; defined when bias_update_rate > 0 or selection_bias

 private:
  config::MoEConfig cfg_;
  GlobalCounts global_counts_;
  Replay replay_;
  torch::Tensor balance_mask_T_;
};
TORCH_MODULE(Router);

}  // namespace moetrain::moe
