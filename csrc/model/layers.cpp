// RMSNorm, RoPE and grouped-query causal attention through scaled_dot_product_attention.
#include "model/layers.h"

namespace moetrain::model {

RMSNormImpl::RMSNormImpl(int dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) const {
  auto xf = x.to(torch::promote_types(x.scalar_type(), torch::kFloat));  // fp32, or fp64 in gradient checks
  auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps_);
  return (normed * weight.to(normed.scalar_type())).to(x.scalar_type());
}

Rope Rope::make(int max_seq_len, int head_dim, double theta, torch::Device device) {
  auto inv_freq = torch::pow(theta, -torch::arange(0, head_dim, 2, torch::kDouble) / double(head_dim));
  auto angles = torch::outer(torch::arange(max_seq_len, torch::kDouble), inv_freq);  // (S, Hd/2)
  auto full = torch::cat({angles, angles}, 1);                                       // (S, Hd)
  return {full.cos().to(torch::kFloat).to(device), full.sin().to(torch::kFloat).to(device)};
}

torch::Tensor Rope::apply(const torch::Tensor& x, int64_t offset) const {
  const int64_t S = x.size(2), half = x.size(3) / 2;
  TORCH_CHECK(offset + S <= cos_SHd.size(0), "[model] sequence of ", offset + S,
              " positions exceeds model.max_seq_len = ", cos_SHd.size(0));
  auto cos = cos_SHd.narrow(0, offset, S).to(x.scalar_type());
  auto sin = sin_SHd.narrow(0, offset, S).to(x.scalar_type());
  auto rotated = torch::cat({-x.narrow(3, half, half), x.narrow(3, 0, half)}, 3);
  return x * cos + rotated * sin;
}

AttentionImpl::AttentionImpl(const config::ModelConfig& cfg)
    : n_heads_(cfg.n_heads), n_kv_heads_(cfg.n_kv_heads), head_dim_(config::head_dim(cfg)), qk_norm_(cfg.qk_norm) {
  wq = register_parameter("wq", torch::empty({cfg.d_model, n_heads_ * head_dim_}));
  wk = register_parameter("wk", torch::empty({cfg.d_model, n_kv_heads_ * head_dim_}));
  wv = register_parameter("wv", torch::empty({cfg.d_model, n_kv_heads_ * head_dim_}));
  wo = register_parameter("wo", torch::empty({n_heads_ * head_dim_, cfg.d_model}));
  if (cfg.qkv_bias) {
    q_bias = register_parameter("q_bias", torch::zeros({n_heads_ * head_dim_}));
    k_bias = register_parameter("k_bias", torch::zeros({n_kv_heads_ * head_dim_}));
    v_bias = register_parameter("v_bias", torch::zeros({n_kv_heads_ * head_dim_}));
  }
  if (qk_norm_ == "head") {
    q_norm = register_module("q_norm", RMSNorm(head_dim_, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, cfg.norm_eps));
  } else if (qk_norm_ == "full") {
    q_norm = register_module("q_norm", RMSNorm(n_heads_ * head_dim_, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(n_kv_heads_ * head_dim_, cfg.norm_eps));
  }
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype) const {
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1);
  auto x = cast(x_BSD, compute_dtype);
  // (B, n, S, Hd): projection, optional bias, optional q/k norm (over the projection or per head).
  auto heads = [&](const torch::Tensor& w, const torch::Tensor& bias, int n, const RMSNorm& norm) {
    auto y = torch::matmul(x, cast(w, compute_dtype));
    if (bias.defined()) y = y + cast(bias, compute_dtype);
    if (norm && qk_norm_ == "full") y = norm->forward(y);
    y = y.view({B, S, n, head_dim_});
    if (norm && qk_norm_ == "head") y = norm->forward(y);
    return y.transpose(1, 2);
  };
  auto q = rope.apply(heads(wq, q_bias, n_heads_, q_norm));
  auto k = rope.apply(heads(wk, k_bias, n_kv_heads_, k_norm));
  auto v = heads(wv, v_bias, n_kv_heads_, RMSNorm(nullptr));
  if (n_kv_heads_ != n_heads_) {  // each key/value head serves n_heads / n_kv_heads query heads
    k = k.repeat_interleave(n_heads_ / n_kv_heads_, 1);
    v = v.repeat_interleave(n_heads_ / n_kv_heads_, 1);
  }
  auto y = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true);
  y = y.transpose(1, 2).reshape({B, S, n_heads_ * head_dim_});
  return torch::matmul(y, cast(wo, compute_dtype));
}

}  // namespace moetrain::model
