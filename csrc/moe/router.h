// The router: scores every token against every routed expert and picks the top-k.
// Legend: T tokens, D model dim, E routed experts, K experts per token.
// Router math runs in fp32 whatever the model dtype, so routing does not flip under bf16 rounding.
#pragma once
#include <torch/torch.h>

#include "config/config.h"

namespace moetrain::moe {

struct RoutingPlan {
  torch::Tensor topk_ids_TK;          // (T, K) int64, expert id of each chosen copy
  torch::Tensor topk_weights_TK;      // (T, K) fp32, combine weights (differentiable)
  torch::Tensor tokens_per_expert_E;  // (E,) int64, copies routed to each expert
  torch::Tensor aux_loss;             // () fp32, switch load-balancing loss E * sum_e f_e * P_e
};

class RouterImpl : public torch::nn::Module {
 public:
  RouterImpl(const config::MoEConfig& cfg, int d_model);
  RoutingPlan route(const torch::Tensor& x_TD) const;

  torch::Tensor weight;  // (E, D)

 private:
  config::MoEConfig cfg_;
};
TORCH_MODULE(Router);

}  // namespace moetrain::moe
