// Training FLOPs per token and parameter counts, computed from the model config alone (no tensors),
// so that models far too large to build here (DeepSeek-V3) can be costed.
// Conventions: a matmul (m x k) @ (k x n) is 2*m*n*k FLOPs; training = forward + backward = 3x forward;
// only matmuls count (norms, RoPE, softmax, activations and the embedding lookup are left out).
#pragma once
#include <cstdint>

#include "config/config.h"

namespace moetrain::cost {

// ---------------------------------------------------------------------------------------------
// Forward FLOPs per token of one part in one layer. D = d_model, H = n_heads.

// Attention projections. GQA: wq (D x H*hd), wk and wv (D x G*hd), wo (H*hd x D).
// MLA: wq_a (D x q_lora) and wq_b (q_lora x H*(nope+rope)), or wq (D x H*(nope+rope)) when
// q_lora_rank = 0; wkv_a (D x (kv_lora + rope)), wkv_b (kv_lora x H*(nope+v)), wo (H*v x D).
double attention_projection_forward(const config::ModelConfig& m);
// Scores and weighted values against seq_len keys: 2*S*H*qk_dim (q.k) + 2*S*H*v_dim (p.v), with
// qk_dim = v_dim = head_dim for GQA and qk_dim = nope + rope, v_dim = v_head_dim for MLA. `causal`
// counts half (the average token attends to S/2 keys), the convention MFU figures usually use.
// A sliding layer's `window` W < S (config::attention_window; 0 = full) counts only the keys in it: W
// per query, or causal the mean of min(x, W) over positions x in [0, S), W - W^2 / (2S).
double attention_scores_forward(const config::ModelConfig& m, int seq_len, bool causal, int window = 0);
// The same summed over blocks [first, end), each with its own window (model.layer_types).
double attention_scores_forward_layers(const config::ModelConfig& m, int seq_len, bool causal, int first, int end);
// The mean over the query positions [first, first + count) of the keys each sees, position + 1, at most
// `window` (0: no limit): what one decoded or scored token of a sequence reads, counted exactly.
double mean_keys_seen(double first, double count, int window);
// Dense SwiGLU MLP: w1 and w3 (D x F), w2 (F x D): 6*D*F.
double dense_mlp_forward(const config::ModelConfig& m);
// Routed experts: top_k SwiGLU experts of hidden expert_hidden each: top_k * 6*D*F_e.
double routed_experts_forward(const config::ModelConfig& m);
// Shared experts: n_shared_experts SwiGLUs of hidden shared_hidden: n_shared * 6*D*F_s.
double shared_experts_forward(const config::ModelConfig& m);
// Router logits: D x E: 2*D*E.
double router_forward(const config::ModelConfig& m);
// LM head: D x V: 2*D*V.
double lm_head_forward(const config::ModelConfig& m);
// One multi-token-prediction module (DeepSeek-V3): the projection of [norm(h); norm(emb)] (2D x D),
// one transformer block (a MoE block when the model has MoE layers, else dense) and the shared LM
// head, which is computed again for each depth. The embedding is shared and costs no matmul.
// `depth` (1-based) picks the block's attention window: MTP depth k is block n_layers + k - 1.
double mtp_module_forward(const config::ModelConfig& m, int seq_len, bool causal, int depth = 1);

// ---------------------------------------------------------------------------------------------

// Training FLOPs per token (3x forward), each part summed over the layers it appears in.
struct FlopsPerToken {
  double attention_projections = 0;
  double attention_scores = 0;         // full (non-causal) convention
  double attention_scores_causal = 0;  // causal convention: half of the above
  double dense_mlp = 0;
  double routed_experts = 0;
  double shared_experts = 0;
  double router = 0;
  double lm_head = 0;
  double mtp = 0;         // all mtp_depth modules, attention full (apart from total, like their params)
  double mtp_causal = 0;  // ... attention causal
  double total = 0;         // main model, full attention (DeepSeek's accounting leaves MTP out)
  double total_causal = 0;  // main model, causal attention: what MFU is computed with
};
FlopsPerToken training_flops_per_token(const config::ModelConfig& m, int seq_len);

// Parameter counts. Active = used for one token: top_k of n_experts routed experts; the embedding
// counts as active (as in TransformerImpl::param_counts, which this matches for GQA models).
template <typename Count>
struct BasicParamCounts {
  Count embedding = 0;
  Count lm_head = 0;  // 0 when tied to the embedding
  Count attention = 0;
  Count norms = 0;  // per-layer norms, the final norm, MLA's latent norms and GQA's q/k norms
  Count dense_mlp = 0;
  Count routed_experts = 0;         // all experts
  Count routed_experts_active = 0;  // top_k of them per token
  Count shared_experts = 0;
  Count router = 0;
  Count mtp = 0;         // MTP modules' own parameters (they share embedding and head), apart from total
  Count mtp_active = 0;  // ... active per token
  Count total = 0;       // main model, without MTP
  Count active = 0;      // main model, without MTP
  Count active_non_embedding = 0;  // active minus the untied embedding (a lookup, not a matmul)
};
using ParamCounts = BasicParamCounts<int64_t>;
// Throws ConfigError naming the size keys when the count does not fit in 64 bits (model.d_model = 1e9
// with many layers).
ParamCounts param_counts(const config::ModelConfig& m);
// The same counts in double, which never overflows (exact below 2^53 parameters): for sizes that are
// checked before anything is built.
BasicParamCounts<double> param_counts_approx(const config::ModelConfig& m);

// optim.name muon: the hidden matrices' parameters (one fp32 momentum each, where AdamW keeps two
// moments) and the FLOPs of their Newton-Schulz orthogonalisation per optimizer step: 5 iterations
// of A = X X^T, A A and (bA + cA A) X on each logical matrix of m <= n (after the transpose), so
// 5 (4 m^2 n + 2 m^3); routed experts each on their own, MLA's wkv_a and wkv_b as two matrices each
// (optim/muon.h). The whole model with its MTP modules (end -1), or blocks [first, end) alone (a
// pipeline stage as `plan` counts it); `expert_*` for all routed experts (a rank holds 1/expert_parallel).
struct MuonCost {
  double replicated_params = 0, expert_params = 0;
  double replicated_flops = 0, expert_flops = 0;
};
MuonCost muon_cost(const config::ModelConfig& m, int first = 0, int end = -1);

// The usual estimate 6 * N: N = active non-embedding parameters (MTP excluded). It leaves out attention
// scores, so it sits below training_flops_per_token(...).total_causal.
double six_n_flops_per_token(const config::ModelConfig& m);

}  // namespace moetrain::cost
