// Training FLOPs and parameter counts from the config, part by part (see flops.h for the conventions).
#include "cost/flops.h"

#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>

#include "common/errors.h"

namespace moetrain::cost {

namespace {

constexpr double kTrainingFactor = 3.0;  // forward + backward (gradients of inputs and of weights)

bool is_mla(const config::ModelConfig& m) { return m.attention == "mla"; }
bool has_moe_layers(const config::ModelConfig& m) { return m.dense_layers < m.n_layers; }
int n_moe_layers(const config::ModelConfig& m) { return m.n_layers - m.dense_layers; }

// Counts are computed in T: int64_t for exact counts (callers check the size first), double where a
// config may be absurd (model.d_model = 1e9 squared times the layers overflows int64).

// Weights of the attention projections (the matmul FLOPs per token are twice this).
template <typename T>
T attention_weights(const config::ModelConfig& m) {
  const T D = m.d_model, H = m.n_heads;
  if (!is_mla(m)) {
    const T hd = config::head_dim(m), G = m.n_kv_heads;
    return D * H * hd + 2 * D * G * hd + H * hd * D;
  }
  const auto& a = m.mla;
  const T qk = T(a.qk_nope_head_dim) + a.qk_rope_head_dim;
  const T q = a.q_lora_rank > 0 ? D * a.q_lora_rank + T(a.q_lora_rank) * H * qk : D * H * qk;
  const T kv = D * (T(a.kv_lora_rank) + a.qk_rope_head_dim) + T(a.kv_lora_rank) * H * (T(a.qk_nope_head_dim) + a.v_head_dim);
  const T o = H * a.v_head_dim * D;
  return q + kv + o;
}

// GQA's biases (model.attn_bias): q, k and v (qkv), and o (all); and its sinks (model.attention_sinks),
// one logit per query head. Added, not multiplied: no matmul FLOPs.
template <typename T>
T attention_bias_weights(const config::ModelConfig& m) {
  if (is_mla(m)) return 0;
  const T hd = config::head_dim(m), H = m.n_heads, G = m.n_kv_heads;
  const T sinks = m.attention_sinks ? H : T(0);
  if (m.attn_bias == "none") return sinks;
  return sinks + H * hd + 2 * G * hd + (m.attn_bias == "all" ? T(m.d_model) : T(0));
}

// MLA's norms on the query and key/value latents; GQA's q/k norms (per head, or over the projection).
template <typename T>
T attention_norm_weights(const config::ModelConfig& m) {
  if (is_mla(m)) return T(m.mla.q_lora_rank) + m.mla.kv_lora_rank;
  const T hd = config::head_dim(m);
  if (m.qk_norm == "head") return 2 * hd;
  if (m.qk_norm == "full") return (T(m.n_heads) + m.n_kv_heads) * hd;
  return 0;
}

template <typename T>
T swiglu_weights(T d_model, T hidden) { return 3 * d_model * hidden; }

// One routed expert: its SwiGLU and, with model.moe.expert_bias, the gate, up and down biases (added,
// not multiplied: no matmul FLOPs).
template <typename T>
T routed_expert_weights(const config::ModelConfig& m) {
  const T D = m.d_model, F = m.moe.expert_hidden;
  return swiglu_weights<T>(D, F) + (m.moe.expert_bias ? 2 * F + D : T(0));
}

// One MoE layer's router: the (E, D) matrix and, with model.moe.router.logit_bias, the logit bias.
template <typename T>
T router_weights(const config::ModelConfig& m) {
  const T E = m.moe.n_experts;
  return E * T(m.d_model) + (m.moe.router.logit_bias ? E : T(0));
}

// One MTP module's own parameters: its block, the 2D x D projection and three norms (on the hidden
// state, on the embedding, and before the shared head).
template <typename T>
T mtp_module_weights(const config::ModelConfig& m, bool active_only) {
  const T D = m.d_model;
  T block = attention_weights<T>(m) + attention_bias_weights<T>(m) + attention_norm_weights<T>(m) + 2 * D;
  if (has_moe_layers(m)) {
    const T experts = active_only ? m.moe.top_k : m.moe.n_experts;
    block += experts * routed_expert_weights<T>(m) +
             T(m.moe.n_shared_experts) * swiglu_weights<T>(D, config::shared_hidden(m.moe)) + router_weights<T>(m);
  } else {
    block += swiglu_weights<T>(D, m.dense_hidden);
  }
  return block + 2 * D * D + 3 * D;
}

template <typename T>
BasicParamCounts<T> count_params(const config::ModelConfig& m) {
  const T D = m.d_model, V = m.vocab_size, moe = n_moe_layers(m), L = m.n_layers;
  BasicParamCounts<T> p;
  p.embedding = V * D;
  p.lm_head = m.tie_embeddings ? 0 : V * D;
  p.attention = L * (attention_weights<T>(m) + attention_bias_weights<T>(m));
  p.norms = L * (2 * D + attention_norm_weights<T>(m)) + D;
  p.dense_mlp = T(m.dense_layers) * swiglu_weights<T>(D, m.dense_hidden);
  p.routed_experts = moe * m.moe.n_experts * routed_expert_weights<T>(m);
  p.routed_experts_active = moe * m.moe.top_k * routed_expert_weights<T>(m);
  p.shared_experts = moe * m.moe.n_shared_experts * swiglu_weights<T>(D, config::shared_hidden(m.moe));
  p.router = moe * router_weights<T>(m);
  p.mtp = T(m.mtp_depth) * mtp_module_weights<T>(m, /*active_only=*/false);
  p.mtp_active = T(m.mtp_depth) * mtp_module_weights<T>(m, /*active_only=*/true);
  const T common = p.embedding + p.lm_head + p.attention + p.norms + p.dense_mlp + p.shared_experts + p.router;
  p.total = common + p.routed_experts;
  p.active = common + p.routed_experts_active;
  p.active_non_embedding = m.tie_embeddings ? p.active : p.active - p.embedding;  // a tied table is the head
  return p;
}

}  // namespace

double attention_projection_forward(const config::ModelConfig& m) { return 2.0 * attention_weights<double>(m); }

double attention_scores_forward(const config::ModelConfig& m, int seq_len, bool causal, int window) {
  const double S = seq_len, H = m.n_heads;
  const double qk_dim = is_mla(m) ? m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim : config::head_dim(m);
  const double v_dim = is_mla(m) ? m.mla.v_head_dim : config::head_dim(m);
  const double per_key = 2.0 * H * qk_dim + 2.0 * H * v_dim;
  if (window <= 0 || window >= seq_len) return per_key * (causal ? S / 2.0 : S);
  // A query at position x in [0, S) of the continuous convention sees min(x, W) keys: their mean over
  // the sequence is (W^2 / 2 + W (S - W)) / S, which meets S / 2 at W = S.
  const double W = window;
  return per_key * (causal ? W - W * W / (2.0 * S) : W);
}

double attention_scores_forward_layers(const config::ModelConfig& m, int seq_len, bool causal, int first, int end) {
  double sum = 0;
  for (int layer = first; layer < end; ++layer)
    sum += attention_scores_forward(m, seq_len, causal, config::attention_window(m, layer));
  return sum;
}

double mean_keys_seen(double first, double count, int window) {
  if (!(count > 0)) return 0;
  const double last = first + count;  // queries at positions first .. last - 1 see position + 1 keys
  if (window <= 0) return first + (count + 1) / 2;
  const double W = window, ramp_end = std::clamp(W, first, last);  // positions below W - 1 see all theirs
  const double ramp = (ramp_end * (ramp_end + 1) - first * (first + 1)) / 2;
  return (ramp + W * (last - ramp_end)) / count;
}

double dense_mlp_forward(const config::ModelConfig& m) { return 2.0 * swiglu_weights<double>(m.d_model, m.dense_hidden); }

double routed_experts_forward(const config::ModelConfig& m) {
  return m.moe.top_k * 2.0 * swiglu_weights<double>(m.d_model, m.moe.expert_hidden);
}

double shared_experts_forward(const config::ModelConfig& m) {
  return m.moe.n_shared_experts * 2.0 * swiglu_weights<double>(m.d_model, config::shared_hidden(m.moe));
}

double router_forward(const config::ModelConfig& m) { return 2.0 * m.d_model * double(m.moe.n_experts); }

double lm_head_forward(const config::ModelConfig& m) { return 2.0 * m.d_model * double(m.vocab_size); }

double mtp_module_forward(const config::ModelConfig& m, int seq_len, bool causal, int depth) {
  const double projection = 2.0 * (2.0 * m.d_model) * m.d_model;
  double block = attention_projection_forward(m) +
                 attention_scores_forward(m, seq_len, causal, config::attention_window(m, m.n_layers + depth - 1));
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
  f.attention_scores = k * attention_scores_forward_layers(m, seq_len, /*causal=*/false, 0, m.n_layers);
  f.attention_scores_causal = k * attention_scores_forward_layers(m, seq_len, /*causal=*/true, 0, m.n_layers);
  f.dense_mlp = k * dense * dense_mlp_forward(m);
  f.routed_experts = k * moe * routed_experts_forward(m);
  f.shared_experts = k * moe * shared_experts_forward(m);
  f.router = k * moe * router_forward(m);
  f.lm_head = k * lm_head_forward(m);
  for (int depth = 1; depth <= m.mtp_depth; ++depth) {
    f.mtp += k * mtp_module_forward(m, seq_len, /*causal=*/false, depth);
    f.mtp_causal += k * mtp_module_forward(m, seq_len, /*causal=*/true, depth);
  }
  const double common = f.attention_projections + f.dense_mlp + f.routed_experts + f.shared_experts + f.router + f.lm_head;
  f.total = common + f.attention_scores;
  f.total_causal = common + f.attention_scores_causal;
  return f;
}

ParamCounts param_counts(const config::ModelConfig& m) {
  // Every part is below the approximate total (all terms are positive), so a total that fits in 2^62
  // means no intermediate product overflowed.
  const double approx = param_counts_approx(m).total + param_counts_approx(m).mtp;
  if (!(approx < 0x1p62)) {
    char count[32];
    std::snprintf(count, sizeof count, "%.3g", approx);
    throw ConfigError("model.d_model = " + std::to_string(m.d_model) + ", model.n_layers = " + std::to_string(m.n_layers) +
                      ", model.vocab_size = " + std::to_string(m.vocab_size) + ", model.moe.n_experts = " +
                      std::to_string(m.moe.n_experts) + ": about " + count +
                      " parameters, more than a 64-bit count holds");
  }
  return count_params<int64_t>(m);
}

BasicParamCounts<double> param_counts_approx(const config::ModelConfig& m) { return count_params<double>(m); }

double six_n_flops_per_token(const config::ModelConfig& m) {
  return 6.0 * double(param_counts(m).active_non_embedding);
}

}  // namespace moetrain::cost

namespace moetrain::cost {

namespace {

// One (rows x cols) matrix's Newton-Schulz FLOPs: 5 iterations of X X^T, A A and B X with m <= n.
double newton_schulz_flops(double rows, double cols) {
  const double m = std::min(rows, cols), n = std::max(rows, cols);
  return 5 * (4 * m * m * n + 2 * m * m * m);
}

// The hidden matrices of one block (and their count of each), as model::RoledParam::hidden_matrix
// and column_widths split them.
struct Matrices {
  std::vector<std::pair<double, double>> replicated, expert;  // (rows, cols); experts once, for all E
};
Matrices block_matrices(const config::ModelConfig& m, bool moe) {
  Matrices out;
  auto& r = out.replicated;
  const double D = m.d_model, H = m.n_heads;
  if (m.attention == "mla") {
    const auto& a = m.mla;
    const double qk = double(a.qk_nope_head_dim) + a.qk_rope_head_dim;
    if (a.q_lora_rank > 0) {
      r.push_back({D, a.q_lora_rank});
      r.push_back({a.q_lora_rank, H * qk});
    } else {
      r.push_back({D, H * qk});
    }
    r.push_back({D, a.kv_lora_rank});                      // wkv_a: the latent
    r.push_back({D, a.qk_rope_head_dim});                  //        the shared RoPE key
    r.push_back({a.kv_lora_rank, H * a.qk_nope_head_dim});  // wkv_b: the keys
    r.push_back({a.kv_lora_rank, H * a.v_head_dim});       //        the values
    r.push_back({H * a.v_head_dim, D});
  } else {
    const double hd = config::head_dim(m), G = m.n_kv_heads;
    r.insert(r.end(), {{D, H * hd}, {D, G * hd}, {D, G * hd}, {H * hd, D}});
  }
  auto swiglu = [&](std::vector<std::pair<double, double>>& into, double hidden) {
    into.insert(into.end(), {{D, hidden}, {D, hidden}, {hidden, D}});
  };
  if (!moe) {
    swiglu(r, m.dense_hidden);
    return out;
  }
  swiglu(out.expert, m.moe.expert_hidden);
  if (m.moe.n_shared_experts > 0) swiglu(r, double(m.moe.n_shared_experts) * config::shared_hidden(m.moe));
  return out;
}

void add(MuonCost& cost, const Matrices& matrices, double n_experts) {
  for (const auto& [rows, cols] : matrices.replicated) {
    cost.replicated_params += rows * cols;
    cost.replicated_flops += newton_schulz_flops(rows, cols);
  }
  for (const auto& [rows, cols] : matrices.expert) {
    cost.expert_params += n_experts * rows * cols;
    cost.expert_flops += n_experts * newton_schulz_flops(rows, cols);
  }
}

}  // namespace

MuonCost muon_cost(const config::ModelConfig& m, int first, int end) {
  const bool whole_model = end < 0;
  if (whole_model) end = m.n_layers;
  MuonCost cost;
  for (int l = first; l < end; ++l) add(cost, block_matrices(m, l >= m.dense_layers), m.moe.n_experts);
  if (whole_model)
    for (int k = 0; k < m.mtp_depth; ++k) {
      auto mtp = block_matrices(m, has_moe_layers(m));
      mtp.replicated.push_back({2.0 * m.d_model, double(m.d_model)});  // eh_proj
      add(cost, mtp, m.moe.n_experts);
    }
  return cost;
}

}  // namespace moetrain::cost
