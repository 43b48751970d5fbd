// The MoE feed-forward layer, in five steps: route -> dispatch -> experts -> combine -> + shared.
// Legend: T tokens, D model dim, E routed experts, K experts per token, F expert hidden,
// R = T*K routed rows (token copies) sorted by expert.
#pragma once
#include <torch/torch.h>

#include "config/config.h"
#include "moe/router.h"

namespace moetrain::moe {

// SwiGLU: w2( silu(x w1) * (x w3) ). Dense MLP and (concatenated) shared experts.
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int d_model, int hidden);
  torch::Tensor forward(const torch::Tensor& x_TD, std::optional<torch::ScalarType> compute_dtype) const;

  torch::Tensor w1;  // (D, F)
  torch::Tensor w3;  // (D, F)
  torch::Tensor w2;  // (F, D)
};
TORCH_MODULE(SwiGLU);

// What dispatch() hands to combine(): nothing per call is kept on the layer.
struct DispatchHandle {
  torch::Tensor token_ids_R;  // (R,) int64, the token each sorted row came from
  torch::Tensor order_R;      // (R,) int64, flat (t*K + k) index of each sorted row
  torch::Tensor counts_E;     // (E,) int64 on the input's device, rows per expert
  int64_t num_tokens = 0;
};

struct Dispatched {
  torch::Tensor rows_RD;  // (R, D) token copies grouped by expert, in expert order
  DispatchHandle handle;
};

// Local (single-rank) dispatcher: sorts token copies by expert (stable, so ties keep token order).
Dispatched dispatch(const torch::Tensor& x_TD, const RoutingPlan& plan);
// Weighted sum of each token's expert outputs: out_TD[t] = sum_k w[t,k] * y[row of (t,k)].
torch::Tensor combine(const torch::Tensor& y_RD, const DispatchHandle& handle, const RoutingPlan& plan);

// Routed experts stored stacked, computed as one grouped GEMM per projection over sorted rows.
class ExpertsImpl : public torch::nn::Module {
 public:
  ExpertsImpl(int n_experts, int d_model, int hidden);
  torch::Tensor forward(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                        std::optional<torch::ScalarType> compute_dtype) const;
  // The per-expert-slice path (any device and dtype); forward() uses it off the CUDA bf16 fast path.
  torch::Tensor forward_sliced(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                               std::optional<torch::ScalarType> compute_dtype) const;

  torch::Tensor w1;  // (E, D, F)
  torch::Tensor w3;  // (E, D, F)
  torch::Tensor w2;  // (E, F, D)
};
TORCH_MODULE(Experts);

struct MoEOutput {
  torch::Tensor out_TD;
  torch::Tensor aux_loss;             // () fp32
  torch::Tensor tokens_per_expert_E;  // (E,) int64
};

class MoEImpl : public torch::nn::Module {
 public:
  MoEImpl(const config::MoEConfig& cfg, int d_model);
  MoEOutput forward(const torch::Tensor& x_TD, std::optional<torch::ScalarType> compute_dtype) const;

  Router router{nullptr};
  Experts experts{nullptr};
  SwiGLU shared{nullptr};  // n_shared_experts experts as one SwiGLU of n_shared * shared_hidden

 private:
  config::MoEConfig cfg_;
};
TORCH_MODULE(MoE);

}  // namespace moetrain::moe
