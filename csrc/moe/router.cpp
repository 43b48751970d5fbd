// Softmax top-k routing with the switch (GShard) load-balancing loss.
#include "moe/router.h"

namespace moetrain::moe {

RouterImpl::RouterImpl(const config::MoEConfig& cfg, int d_model) : cfg_(cfg) {
  weight = register_parameter("weight", torch::empty({cfg.n_experts, d_model}));
}

RoutingPlan RouterImpl::route(const torch::Tensor& x_TD) const {
  TORCH_CHECK(x_TD.dim() == 2 && x_TD.size(1) == weight.size(1), "[moe] router expects (T, ",
              weight.size(1), ") input, got ", x_TD.sizes());
  const int64_t T = x_TD.size(0), E = cfg_.n_experts, K = cfg_.top_k;
  const auto dtype = torch::promote_types(x_TD.scalar_type(), torch::kFloat);  // fp32 (fp64 in gradient checks)
  auto logits_TE = torch::mm(x_TD.to(dtype), weight.to(dtype).t());
  auto probs_TE = torch::softmax(logits_TE, /*dim=*/1);
  auto [topk_weights_TK, topk_ids_TK] = torch::topk(probs_TE, K, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
  if (cfg_.normalize_topk) topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(1, true);

  RoutingPlan plan;
  plan.topk_ids_TK = topk_ids_TK;
  plan.topk_weights_TK = topk_weights_TK;
  plan.tokens_per_expert_E = torch::bincount(topk_ids_TK.reshape(-1), {}, E);
  if (T == 0) {
    plan.aux_loss = torch::zeros({}, logits_TE.options());
  } else {
    // f_e: fraction of the T*K copies sent to e (no gradient); P_e: mean router probability of e.
    auto fraction_E = plan.tokens_per_expert_E.to(dtype) / double(T * K);
    auto mean_prob_E = probs_TE.mean(0);
    plan.aux_loss = double(E) * (fraction_E * mean_prob_E).sum();
  }
  return plan;
}

}  // namespace moetrain::moe
