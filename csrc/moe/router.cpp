// Routing: softmax or sigmoid scores, optional group-limited or node-limited selection and selection bias, top-k,
// and the balancing losses (switch, sequence-wise, z-loss) with routing statistics.
#include "moe/router.h"

#include <limits>

namespace moetrain::moe {

RouterImpl::RouterImpl(const config::MoEConfig& cfg, int d_model) : cfg_(cfg) {
  weight = register_parameter("weight", torch::empty({cfg.n_experts, d_model}));
  if (cfg.router.logit_bias) bias = register_parameter("bias", torch::empty({cfg.n_experts}));
  const auto& rc = cfg.router;
  if (rc.max_groups_per_token > 0)
    TORCH_CHECK(rc.expert_groups >= rc.max_groups_per_token && cfg.n_experts % rc.expert_groups == 0 &&
                    cfg.top_k <= rc.max_groups_per_token * (cfg.n_experts / rc.expert_groups),
                "[moe] model.moe.router.max_groups_per_token = ", rc.max_groups_per_token, " over ", rc.expert_groups,
                " expert groups of ", cfg.n_experts, " experts cannot route top_k = ", cfg.top_k,
                " (the groups come from parallel.expert_parallel and parallel.ranks_per_node when the config is loaded)");
  if (cfg.router.bias_update_rate > 0 || cfg.router.selection_bias) expert_bias = register_buffer("expert_bias", torch::zeros({cfg.n_experts}));
}

namespace {

// Copies routed to each expert, without a host sync (bincount on CUDA would read the max).
torch::Tensor count_per_expert(const torch::Tensor& ids, int64_t n_experts) {
  auto flat = ids.reshape(-1);
  return torch::zeros({n_experts}, flat.options()).scatter_add_(0, flat, torch::ones_like(flat));
}

// E * sum_e f_e * P_e over the leading dimension's groups, averaged: counts_GE copies, probs_GE mean scores.
torch::Tensor balance_product(const torch::Tensor& counts_GE, const torch::Tensor& mean_probs_GE, int64_t copies,
                              int64_t n_experts) {
  auto fraction_GE = counts_GE.to(mean_probs_GE.scalar_type()) / double(copies);
  return double(n_experts) * (fraction_GE * mean_probs_GE).sum(-1).mean();
}

}  // namespace

RoutingPlan RouterImpl::route(const torch::Tensor& x_TD, int64_t seq_len) const {
  TORCH_CHECK(x_TD.dim() == 2 && x_TD.size(1) == weight.size(1), "[moe] router expects (T, ", weight.size(1),
              ") input, got ", x_TD.sizes());
  const int64_t T = x_TD.size(0), E = cfg_.n_experts, K = cfg_.top_k;
  const auto& rc = cfg_.router;
  const auto dtype = torch::promote_types(x_TD.scalar_type(), torch::kFloat);  // fp32 (fp64 in gradient checks)
  auto logits_TE = torch::mm(x_TD.to(dtype), weight.to(dtype).t());
  // gpt-oss: top-k of the biased logits, then a softmax over the k; the same as the softmax over all E
  // renormalized over the chosen k (normalize_topk), which is what follows.
  if (bias.defined()) logits_TE = logits_TE + bias.to(dtype);
  auto scores_TE = rc.score_func == "sigmoid" ? torch::sigmoid(logits_TE) : torch::softmax(logits_TE, 1);

  // Selection: scores plus the balancing bias, restricted to the best groups; weights use plain scores.
  torch::Tensor choice_TE = scores_TE.detach();
  if (expert_bias.defined()) choice_TE = choice_TE + expert_bias.to(dtype);
  if (rc.n_groups > 1) {
    const int64_t per_group = E / rc.n_groups;
    auto grouped = choice_TE.view({T, rc.n_groups, per_group});
    const int64_t best = rc.group_score == "max" ? 1 : std::min<int64_t>(2, per_group);
    auto group_score_TG = std::get<0>(grouped.topk(best, -1)).sum(-1);
    auto best_groups = std::get<1>(group_score_TG.topk(rc.topk_groups, -1));
    auto eligible_TG = torch::zeros({T, rc.n_groups}, choice_TE.options().dtype(torch::kBool))
                           .scatter_(1, best_groups, true);
    auto eligible_TE = eligible_TG.unsqueeze(-1).expand({T, rc.n_groups, per_group}).reshape({T, E});
    choice_TE = choice_TE.masked_fill(eligible_TE.logical_not(), -std::numeric_limits<double>::infinity());
  }
  if (rc.max_groups_per_token > 0) {
    // Node-limited (DeepSeek-V3 section 2.1.2): a group is the experts of one EP rank or node, scored by
    // the sum of its best ceil(K / M) selection scores; the token's top-k comes from the best M groups.
    const int64_t G = rc.expert_groups, M = rc.max_groups_per_token, per_group = E / G;
    const int64_t best_per_group = std::min<int64_t>((K + M - 1) / M, per_group);
    auto grouped = choice_TE.view({T, G, per_group});
    auto group_score_TG = std::get<0>(grouped.topk(best_per_group, -1)).sum(-1);
    auto best_groups = std::get<1>(group_score_TG.topk(M, -1));
    auto eligible_TG = torch::zeros({T, G}, choice_TE.options().dtype(torch::kBool)).scatter_(1, best_groups, true);
    auto eligible_TE = eligible_TG.unsqueeze(-1).expand({T, G, per_group}).reshape({T, E});
    choice_TE = choice_TE.masked_fill(eligible_TE.logical_not(), -std::numeric_limits<double>::infinity());
  }
  RoutingPlan plan;
  plan.topk_ids_TK = std::get<1>(choice_TE.topk(K, 1, /*largest=*/true, /*sorted=*/true));
  if (replay_) {  // rl.routing_replay: the experts recorded for these tokens, where there are any
    auto forced_TK = replay_(plan.topk_ids_TK).to(plan.topk_ids_TK.device());
    TORCH_CHECK(forced_TK.sizes() == plan.topk_ids_TK.sizes(), "[moe] routing replay gave ", forced_TK.sizes(),
                " expert ids for a call routing ", plan.topk_ids_TK.sizes());
    auto keep_T1 = (forced_TK < 0).any(1, /*keepdim=*/true);
    plan.topk_ids_TK = torch::where(keep_T1, plan.topk_ids_TK, forced_TK.clamp(0, E - 1));
  }
  auto weights_TK = scores_TE.gather(1, plan.topk_ids_TK);
  if (rc.normalize_topk) weights_TK = weights_TK / (weights_TK.sum(1, true) + 1e-20);
  plan.topk_weights_TK = weights_TK * rc.routed_scaling;

  // Balancing losses and statistics over the per-token normalized scores p.
  RouterStats& st = plan.stats;
  st.tokens_per_expert_E = count_per_expert(plan.topk_ids_TK, E);
  st.dropped = torch::zeros({}, plan.topk_ids_TK.options());
  if (T == 0) {
    auto zero = torch::zeros({}, logits_TE.options());
    st.aux_loss = st.seq_aux_loss = st.z_loss = st.entropy = zero;
    return plan;
  }
  auto probs_TE = rc.score_func == "softmax" ? scores_TE : scores_TE / scores_TE.sum(1, true);
  if (balance_mask_T_.defined()) {  // padding excluded: the same losses over the counted tokens alone
    TORCH_CHECK(balance_mask_T_.dim() == 1 && balance_mask_T_.size(0) == T, "[moe] router: a balance mask of ",
                balance_mask_T_.sizes(), " for a call routing ", T, " tokens");
    const auto keep_T1 = balance_mask_T_.to(probs_TE.device()).to(dtype).unsqueeze(1);
    const auto one_hot_TE = torch::zeros({T, E}, probs_TE.options()).scatter_(1, plan.topk_ids_TK, 1.0) * keep_T1;
    // f_e over the counted copies of the global batch; P_e this rank's share of the global mean score
    // (summed over its counted tokens, divided by all ranks' and times the ranks), so that the ranks'
    // mean is the one-process loss however the padding falls.
    auto counts_E = one_hot_TE.sum(0).to(torch::kLong);
    const int64_t ranks = global_counts_ ? global_counts_(counts_E) : 1;
    const auto copies = counts_E.sum().to(dtype).clamp_min(1);
    const auto share_E = (probs_TE * keep_T1).sum(0) * (double(ranks * K) / copies);
    st.aux_loss = double(E) * (counts_E.to(dtype) / copies * share_E).sum();
    TORCH_CHECK(seq_len > 0 && T % seq_len == 0, "[moe] router: ", T, " tokens are not whole sequences of ", seq_len);
    const int64_t B = T / seq_len;
    const auto keep_BS1 = keep_T1.view({B, seq_len, 1});
    const auto lens_B1 = keep_BS1.sum(1).clamp_min(1);
    st.seq_aux_loss = balance_product(one_hot_TE.view({B, seq_len, E}).sum(1) / lens_B1,
                                      (probs_TE.view({B, seq_len, E}) * keep_BS1).sum(1) / lens_B1, K, E);
    const auto kept = keep_T1.sum().clamp_min(1);
    // Over the global batch's counted tokens too, when the ranks' counts are summed: its mean per rank.
    const auto z_per = global_counts_ ? copies / double(K * ranks) : kept;
    st.z_loss = (torch::logsumexp(logits_TE, 1, true).pow(2) * keep_T1).sum() / z_per;
    st.entropy = (-(probs_TE * torch::log(probs_TE.clamp_min(1e-30))).sum(1, true) * keep_T1).sum().detach() / kept;
    return plan;
  }
  // f_e from the global batch, P_e from this rank's tokens: the ranks' mean of this loss is the
  // one-process loss E * sum_e f_e * P_e, and so are the gradients.
  torch::Tensor counts_E = st.tokens_per_expert_E;
  int64_t copies = T * K;
  if (global_counts_) {
    counts_E = counts_E.clone();
    copies *= global_counts_(counts_E);
  }
  st.aux_loss = balance_product(counts_E.unsqueeze(0), probs_TE.mean(0, true), copies, E);
  TORCH_CHECK(seq_len > 0 && T % seq_len == 0, "[moe] router: ", T, " tokens are not whole sequences of ", seq_len);
  const int64_t B = T / seq_len;
  auto one_hot_TE = torch::zeros({T, E}, probs_TE.options()).scatter_(1, plan.topk_ids_TK, 1.0);
  st.seq_aux_loss = balance_product(one_hot_TE.view({B, seq_len, E}).sum(1), probs_TE.view({B, seq_len, E}).mean(1),
                                    seq_len * K, E);
  st.z_loss = torch::logsumexp(logits_TE, 1).pow(2).mean();
  st.entropy = -(probs_TE * torch::log(probs_TE.clamp_min(1e-30))).sum(1).mean().detach();
  return plan;
}

void RouterImpl::update_bias(const torch::Tensor& tokens_per_expert_E) {
  if (!expert_bias.defined()) return;
  torch::NoGradGuard no_grad;
  auto load = tokens_per_expert_E.to(expert_bias.device()).to(torch::kFloat);
  expert_bias.add_(torch::sign(load.mean() - load), cfg_.router.bias_update_rate);
}

}  // namespace moetrain::moe
