// Training FLOPs and parameter counts from the config, part by part (see flops.h for the conventions).
#include "cost/flops.h"

namespace moetrain::cost {

namespace {

constexpr double kTrainingFactor = 3.0;  // forward + backward (gradients of inputs and of weights)

bool is_mla(const config::ModelConfig& m) { return m.attention == "mla"; }
bool has_moe_layers(const config::ModelConfig& m) { return m.dense_layers < m.n_layers; }
int n_moe_layers(const config::ModelConfig& m) { return m.n_layers - m.dense_layers; }

// Weights of the attention projections (the matmul FLOPs per token are twice this).
int64_t attention_weights(const config::ModelConfig& m) {
  const int64_t D = m.d_model, H = m.n_heads;
  if (!is_mla(m)) {
    const int64_t hd = config::head_dim(m), G = m.n_kv_heads;
    return D * H * hd + 2 * D * G * hd + H * hd * D;
  }
  const auto& a = m.mla;
  const int64_t qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
  const int64_t q = a.q_lora_rank > 0 ? D * a.q_lora_rank + int64_t(a.q_lora_rank) * H * qk : D * H * qk;
  const int64_t kv = D * (a.kv_lora_rank + a.qk_rope_head_dim) +
                     int64_t(a.kv_lora_rank) * H * (a.qk_nope_head_dim + a.v_head_dim);
  const int64_t o = H * a.v_head_dim * D;
  return q + kv + o;
}

// MLA's norms on the query and key/value latents.
int64_t attention_norm_weights(const config::ModelConfig& m) {
  return is_mla(m) ? int64_t(m.mla.q_lora_rank) + m.mla.kv_lora_rank : 0;
}

int64_t swiglu_weights(int64_t d_model, int64_t hidden) { return 3 * d_model * hidden; }

// One MTP module's own parameters: its block, the 2D x D projection and three norms (on the hidden
// state, on the embedding, and before the shared head).
int64_t mtp_module_weights(const config::ModelConfig& m, bool active_only) {
  const int64_t D = m.d_model;
  int64_t block = attention_weights(m) + attention_norm_weights(m) + 2 * D;
  if (has_moe_layers(m)) {
    const int experts = active_only ? m.moe.top_k : m.moe.n_experts;
    block += experts * swiglu_weights(D, m.moe.expert_hidden) +
             m.moe.n_shared_experts * swiglu_weights(D, config::shared_hidden(m.moe)) + int64_t(m.moe.n_experts) * D;
  } else {
    block += swiglu_weights(D, m.dense_hidden);
  }
  return block + 2 * D * D + 3 * D;
}

}  // namespace

double attention_projection_forward(const config::ModelConfig& m) { return 2.0 * double(attention_weights(m)); }

double attention_scores_forward(const config::ModelConfig& m, int seq_len, bool causal) {
  const double S = seq_len, H = m.n_heads;
  const double qk_dim = is_mla(m) ? m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim : config::head_dim(m);
  const double v_dim = is_mla(m) ? m.mla.v_head_dim : config::head_dim(m);
  const double full = 2.0 * S * H * qk_dim + 2.0 * S * H * v_dim;
  return causal ? full / 2.0 : full;
}

double dense_mlp_forward(const config::ModelConfig& m) { return 2.0 * double(swiglu_weights(m.d_model, m.dense_hidden)); }

double routed_experts_forward(const config::ModelConfig& m) {
  return m.moe.top_k * 2.0 * double(swiglu_weights(m.d_model, m.moe.expert_hidden));
}

double shared_experts_forward(const config::ModelConfig& m) {
  return m.moe.n_shared_experts * 2.0 * double(swiglu_weights(m.d_model, config::shared_hidden(m.moe)));
}

double router_forward(const config::ModelConfig& m) { return 2.0 * m.d_model * double(m.moe.n_experts); }

double lm_head_forward(const config::ModelConfig& m) { return 2.0 * m.d_model * double(m.vocab_size); }

double mtp_module_forward(const config::ModelConfig& m, int seq_len, bool causal) {
  const double projection = 2.0 * (2.0 * m.d_model) * m.d_model;
  double block = attention_projection_forward(m) + attention_scores_forward(m, seq_len, causal);
  if (has_moe_layers(m))
    block += routed_experts_forward(m) + shared_experts_forward(m) + router_forward(m);
  else
    block += dense_mlp_forward(m);
  return projection + block + lm_head_forward(m);
}

FlopsPerToken training_flops_per_token(const config::ModelConfig& m, int seq_len) {
  const double k = kTrainingFactor, L = m.n_layers, dense = m.dense_layers, moe = n_moe_layers(m);
  FlopsPerToken f;
  f.attention_projections = k * L * attention_projection_forward(m);
  f.attention_scores = k * L * attention_scores_forward(m, seq_len, /*causal=*/false);
  f.attention_scores_causal = k * L * attention_scores_forward(m, seq_len, /*causal=*/true);
  f.dense_mlp = k * dense * dense_mlp_forward(m);
  f.routed_experts = k * moe * routed_experts_forward(m);
  f.shared_experts = k * moe * shared_experts_forward(m);
  f.router = k * moe * router_forward(m);
  f.lm_head = k * lm_head_forward(m);
  f.mtp = k * m.mtp_depth * mtp_module_forward(m, seq_len, /*causal=*/false);
  f.mtp_causal = k * m.mtp_depth * mtp_module_forward(m, seq_len, /*causal=*/true);
  const double common = f.attention_projections + f.dense_mlp + f.routed_experts + f.shared_experts + f.router + f.lm_head;
  f.total = common + f.attention_scores;
  f.total_causal = common + f.attention_scores_causal;
  return f;
}

ParamCounts param_counts(const config::ModelConfig& m) {
  const int64_t D = m.d_model, V = m.vocab_size, moe = n_moe_layers(m);
  ParamCounts p;
  p.embedding = V * D;
  p.lm_head = m.tie_embeddings ? 0 : V * D;
  p.attention = m.n_layers * attention_weights(m);
  p.norms = m.n_layers * (2 * D + attention_norm_weights(m)) + D;
  p.dense_mlp = m.dense_layers * swiglu_weights(D, m.dense_hidden);
  p.routed_experts = moe * m.moe.n_experts * swiglu_weights(D, m.moe.expert_hidden);
  p.routed_experts_active = moe * m.moe.top_k * swiglu_weights(D, m.moe.expert_hidden);
  p.shared_experts = moe * m.moe.n_shared_experts * swiglu_weights(D, config::shared_hidden(m.moe));
  p.router = moe * m.moe.n_experts * D;
  p.mtp = m.mtp_depth * mtp_module_weights(m, /*active_only=*/false);
  p.mtp_active = m.mtp_depth * mtp_module_weights(m, /*active_only=*/true);
  const int64_t common = p.embedding + p.lm_head + p.attention + p.norms + p.dense_mlp + p.shared_experts + p.router;
  p.total = common + p.routed_experts;
  p.active = common + p.routed_experts_active;
  p.active_non_embedding = m.tie_embeddings ? p.active : p.active - p.embedding;  // a tied table is the head
  return p;
}

double six_n_flops_per_token(const config::ModelConfig& m) {
  return 6.0 * double(param_counts(m).active_non_embedding);
}

}  // namespace moetrain::cost
