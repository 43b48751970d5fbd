// MuonClip's QK-clip (see qk_clip.h): the per-head factors are computed on the device, so a step with
// the clip on reads nothing on the host.
#include "optim/qk_clip.h"

#include <cmath>
#include <limits>

namespace moetrain::optim {

namespace {

// Calls gqa(AttentionImpl&) or mla(MLAttentionImpl&) for every attention layer, in module order (the
// same on every replica of a stage).
template <typename Gqa, typename Mla>
void for_each_attention(torch::nn::Module& model, Gqa&& gqa, Mla&& mla) {
  for (const auto& m : model.modules(/*include_self=*/true)) {
    if (auto* a = dynamic_cast<model::AttentionImpl*>(m.get())) gqa(*a);
    if (auto* a = dynamic_cast<model::MLAttentionImpl*>(m.get())) mla(*a);
  }
}

// gamma = tau / S_max where S_max > tau, else exactly 1 (a NaN or -inf maximum leaves the head alone).
torch::Tensor clip_factors(const torch::Tensor& max_logit_H, double tau) {
  const auto m = max_logit_H.to(torch::kFloat);
  return torch::where(m > tau, torch::full_like(m, tau).div_(m), torch::ones_like(m));
}

// Multiplies the last dim of `weight` (a (in, out) matrix's columns, or a bias) by column_scale, in its dtype.
void scale_columns(torch::Tensor& weight, const torch::Tensor& column_scale) {
  weight.mul_(column_scale.to(weight.scalar_type()));
}

// Per-column factors for heads of `widths` columns each: block p of head h takes factors[p][h].
torch::Tensor per_column(const std::vector<torch::Tensor>& factors_H, const std::vector<int64_t>& widths) {
  std::vector<torch::Tensor> blocks;
  for (size_t p = 0; p < widths.size(); ++p) blocks.push_back(factors_H[p].unsqueeze(1).expand({-1, widths[p]}));
  return torch::cat(blocks, 1).reshape({-1});  // (H, sum widths) -> (H * sum widths)
}

}  // namespace

void track_max_logits(torch::nn::Module& model, bool on) {
  for_each_attention(
      model, [&](model::AttentionImpl& a) { a.track_max_logits = on; },
      [&](model::MLAttentionImpl& a) { a.track_max_logits = on; });
}

torch::Tensor take_max_logits(torch::nn::Module& model) {
  std::vector<torch::Tensor> parts;
  auto take = [&](auto& a, int64_t heads, const torch::Device& device) {
    auto m = a.max_logit_H.defined()
                 ? a.max_logit_H
                 : torch::full({heads}, -std::numeric_limits<float>::infinity(),
                               torch::TensorOptions().dtype(torch::kFloat).device(device));
    parts.push_back(m);
    a.max_logit_H = torch::Tensor();
  };
  for_each_attention(
      model, [&](model::AttentionImpl& a) { take(a, a.n_heads(), a.wq.device()); },
      [&](model::MLAttentionImpl& a) { take(a, a.n_heads(), a.wo.device()); });
  return parts.empty() ? torch::Tensor() : torch::cat(parts);
}

void qk_clip(model::AttentionImpl& a, const torch::Tensor& max_logit_H, double tau) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(max_logit_H.numel() == a.n_heads(), "[optim] qk_clip: ", a.n_heads(), " heads, got maxima of shape ",
              max_logit_H.sizes());
  TORCH_CHECK(!a.q_norm && !a.k_norm, "[optim] qk_clip: model.qk_norm renormalises the rescaled projections");
  const auto gamma = clip_factors(max_logit_H, tau).to(a.wq.device());
  const int64_t Hd = a.head_dim();
  if (a.n_kv_heads() == a.n_heads()) {  // K2's split: the logit is bilinear in q and k
    const auto column = per_column({gamma.sqrt()}, {Hd});
    for (auto* t : {&a.wq, &a.q_bias, &a.wk, &a.k_bias})
      if (t->defined()) scale_columns(*t, column);
    return;
  }
  const auto column = per_column({gamma}, {Hd});  // the shared key head stays as it is
  for (auto* t : {&a.wq, &a.q_bias})
    if (t->defined()) scale_columns(*t, column);
}

void qk_clip(model::MLAttentionImpl& a, const torch::Tensor& max_logit_H, double tau) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(max_logit_H.numel() == a.n_heads(), "[optim] qk_clip: ", a.n_heads(), " heads, got maxima of shape ",
              max_logit_H.sizes());
  const auto gamma = clip_factors(max_logit_H, tau).to(a.wo.device());
  const auto root = gamma.sqrt();
  // Queries (wq, or wq_b after the latent): per head [q_C (N) | q_R (P)].
  const auto query = per_column({root, gamma}, {a.nope_dim(), a.rope_dim()});
  scale_columns(a.wq.defined() ? a.wq : a.wq_b, query);
  // Keys and values from the latent (wkv_b): per head [k_C (N) | v (Vd)]; the values keep theirs.
  const auto key = per_column({root, torch::ones_like(gamma)}, {a.nope_dim(), a.v_dim()});
  scale_columns(a.wkv_b, key);
}

torch::Tensor qk_clip(torch::nn::Module& model, const torch::Tensor& max_logits, double tau) {
  int64_t offset = 0;
  auto next = [&](int64_t heads) {
    auto part = max_logits.narrow(0, offset, heads);
    offset += heads;
    return part;
  };
  for_each_attention(
      model, [&](model::AttentionImpl& a) { qk_clip(a, next(a.n_heads()), tau); },
      [&](model::MLAttentionImpl& a) { qk_clip(a, next(a.n_heads()), tau); });
  TORCH_CHECK(offset == max_logits.numel(), "[optim] qk_clip: ", max_logits.numel(), " maxima for ", offset,
              " attention heads");
  const auto m = max_logits.to(torch::kFloat);
  return torch::stack({m.max(), (m > tau).sum().to(torch::kFloat)});
}

}  // namespace moetrain::optim
