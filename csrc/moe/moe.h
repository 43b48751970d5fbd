// The MoE feed-forward layer, in five steps: route -> dispatch -> experts -> combine -> + shared.
// Legend: T tokens, D model dim, E routed experts, K experts per token, F expert hidden,
// R = T*K routed rows (token copies) sorted by expert.
#pragma once
#include <torch/torch.h>

#include <memory>

#include "common/tensor.h"
#include "config/config.h"
#include "moe/lora.h"
#include "moe/router.h"

namespace moetrain::moe {

// silu(gate) * up, SwiGLU's element-wise part. With `recompute` (train.activation_checkpointing:
// selective) backward keeps only gate and up and recomputes the product from them, where autograd
// would also keep silu(gate); the same ops run again, so the gradients are the same bit for bit.
// `clamped`: gpt-oss's form (model.moe.activation swiglu_clamped), g * sigmoid(1.702 g) * (u + 1) with
// g = min(gate, 7), u = clamp(up, -7, 7).
torch::Tensor gated_product(const torch::Tensor& gate, const torch::Tensor& up, bool recompute, bool clamped = false);

// SwiGLU: w2( silu(x w1) * (x w3) ). Dense MLP and (concatenated) shared experts.
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int d_model, int hidden);
  torch::Tensor forward(const torch::Tensor& x_TD, std::optional<torch::ScalarType> compute_dtype) const;

  torch::Tensor w1;  // (D, F)
  torch::Tensor w3;  // (D, F)
  torch::Tensor w2;  // (F, D)
  bool recompute_elementwise = false;  // see gated_product
  // train.lora: adapters of w1, w3, w2 (moe/lora.h).
  LoraAdapter w1_lora, w3_lora, w2_lora;
  void add_lora(const config::LoraConfig& cfg);
};
TORCH_MODULE(SwiGLU);

// What dispatch() hands to combine(): nothing per call is kept on the layer.
struct DispatchHandle {
  torch::Tensor token_ids_R;  // (R,) int64, the token each sorted row came from
  torch::Tensor order_R;      // (R,) int64, flat (t*K + k) index of each sorted row
  torch::Tensor expert_ids_R; // (R,) int64, the expert of each sorted row
  torch::Tensor counts_E;     // (E,) int64 on the input's device, rows per expert after capacity
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  // With a capacity, sort_copies() leaves every copy in the rows above, the kept ones first (grouped by
  // expert) and the dropped ones after: how many are kept, sum(counts_E), is known on the device only,
  // and the host learns it where it reads the counts anyway. kept(n) is the handle of the first n.
  bool all_kept = true;
  DispatchHandle kept(int64_t n) const;
};

struct Dispatched {
  torch::Tensor rows_RD;  // (R, D) token copies grouped by expert, in expert order
  torch::Tensor dropped;  // () int64, copies dropped by capacity
  DispatchHandle handle;
};

// Per-expert capacity for T tokens: ceil(capacity_factor * T * K / E).
int64_t expert_capacity(double capacity_factor, int64_t num_tokens, int top_k, int n_experts);

// Local (single-rank) dispatcher: groups token copies by expert. Dropless (no capacity) keeps token
// order within an expert. With a capacity, each expert keeps its `capacity` copies of highest routing
// weight (ties: earlier tokens first) and drops the rest (one host read of the counts then).
Dispatched dispatch(const torch::Tensor& x_TD, const RoutingPlan& plan, std::optional<int64_t> capacity = {});
// The order, counts and drops without gathering the rows (rows_RD stays undefined), all on the device:
// with a capacity the handle holds every copy, the kept first (DispatchHandle::all_kept).
Dispatched sort_copies(const RoutingPlan& plan, int64_t num_tokens, std::optional<int64_t> capacity = {});
// The combine weights of the kept copies in dispatch order: (R,) fp32, with autograd to the router.
torch::Tensor copy_weights(const DispatchHandle& handle, const RoutingPlan& plan);
// Weighted sum of each token's expert outputs: out_TD[t] = sum_k w[t,k] * y[row of (t,k)] over kept rows.
torch::Tensor combine(const torch::Tensor& y_RD, const DispatchHandle& handle, const RoutingPlan& plan);

// Gather and scatter-sum of rows by index, free of atomic adds under LibTorch's deterministic mode:
// each element i has its own slot slot_I[i] < n_rows * slots_per_row (unique, row_I[i] * slots_per_row
// + something below slots_per_row), so sums go through a (n_rows, slots_per_row) buffer in slot order.
// gather_rows(x_ND, row_I, ...) = x_ND[row_I]; its backward sums each row's slots.
torch::Tensor gather_rows(const torch::Tensor& x_ND, const torch::Tensor& row_I, const torch::Tensor& slot_I,
                          int64_t slots_per_row);
// out_ND[n] = sum of v_ID[i] over i with row_I[i] = n.
torch::Tensor sum_rows(const torch::Tensor& v_ID, const torch::Tensor& row_I, const torch::Tensor& slot_I, int64_t n_rows,
                       int64_t slots_per_row);

// Routed experts stored stacked, computed as one grouped GEMM per projection over sorted rows.
class ExpertsImpl : public torch::nn::Module {
 public:
  // impl: "auto" | "grouped_mm" | "sliced" (model.moe.experts_impl); activation: model.moe.activation;
  // bias: model.moe.expert_bias.
  ExpertsImpl(int n_experts, int d_model, int hidden, std::string impl = "auto", const std::string& activation = "swiglu",
              bool bias = false);
  // counts_on_host: the same counts where the caller already read them (the sliced path then reads
  // nothing).
  torch::Tensor forward(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                        std::optional<torch::ScalarType> compute_dtype,
                        const std::vector<int64_t>* counts_on_host = nullptr) const;
  // One at::_grouped_mm per projection; offsets stay on the device (no host sync).
  torch::Tensor forward_grouped(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                                std::optional<torch::ScalarType> compute_dtype) const;
  // A matmul per non-empty expert over its rows (one host read of the counts unless given); any device
  // and dtype.
  torch::Tensor forward_sliced(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                               std::optional<torch::ScalarType> compute_dtype,
                               const std::vector<int64_t>* counts_on_host = nullptr) const;
  // Whether _grouped_mm's layout rules hold for these rows in this dtype (16-byte aligned strides;
  // bf16 on CUDA).
  bool grouped_supported(const torch::Tensor& rows_RD, std::optional<torch::ScalarType> compute_dtype) const;
  // The path forward() takes: "auto" is grouped_mm on CUDA where supported, sliced on the CPU (where
  // scripts/bench_moe.sh measured it 5-20% faster than the CPU _grouped_mm).
  std::string resolved_impl(const torch::Tensor& rows_RD, std::optional<torch::ScalarType> compute_dtype) const;

  torch::Tensor w1;  // (E, D, F)
  torch::Tensor w3;  // (E, D, F)
  torch::Tensor w2;  // (E, F, D)
  // model.moe.expert_bias (gpt-oss): added to the gate, up and down products of each row's expert;
  // undefined without. b2 is part of the expert's output, so the routing weight scales it in combine.
  torch::Tensor b1;  // (E, F)
  torch::Tensor b3;  // (E, F)
  torch::Tensor b2;  // (E, D)
  bool recompute_elementwise = false;  // see gated_product
  bool clamped_activation = false;     // model.moe.activation swiglu_clamped (see gated_product)
  // train.lora: stacked adapters of w1, w3, w2: A (E, D, r) and B (E, r, F) for w1 and w3, A (E, F, r) and
  // B (E, r, D) for w2. They run in the same path as the weights (one grouped GEMM per factor, or the
  // sliced path's per-expert matmuls) and are sharded with them (model::ParamRole::expert).
  LoraAdapter w1_lora, w3_lora, w2_lora;
  void add_lora(const config::LoraConfig& cfg);

 private:
  std::string impl_;
};
TORCH_MODULE(Experts);

struct MoEOutput {
  torch::Tensor out_TD;
  torch::Tensor balance_loss;  // () fp32: the configured coefficients times the router's losses
  RouterStats stats;
};

// Which routed experts a layer holds: [rank * E / ranks, (rank + 1) * E / ranks). The model is built
// for its shard and knows nothing else of the ranks; a whole model is the shard {1, 0}.
struct ExpertShard {
  int ranks = 1;
  int rank = 0;
};

// How a layer's tokens reach experts it does not hold and come back: the seam expert parallelism
// (csrc/dist/expert_parallel) plugs into, standing for steps 2-4. run() gets this layer's experts, the
// tokens x_TD, the copies sorted by global expert (handle: with a capacity, every copy, the kept ones
// first) and their combine weights weights_R in the handle's order (copy_weights: autograd reaches the
// router through them), and returns each token's weighted sum of
// its experts' outputs, (T, D) in the compute dtype: what combine() gives locally, to fp32 rounding.
// A layer holding every expert needs none.
class ExpertDispatcher {
 public:
  virtual ~ExpertDispatcher() = default;
  virtual torch::Tensor run(const ExpertsImpl& experts, const torch::Tensor& x_TD, const DispatchHandle& handle,
                            const torch::Tensor& weights_R, std::optional<torch::ScalarType> compute_dtype) const = 0;
};

class MoEImpl : public torch::nn::Module {
 public:
  // The layer holds the routed experts of `shard` (all of them by default); the router, the shared
  // experts and everything else are whole.
  MoEImpl(const config::MoEConfig& cfg, int d_model, ExpertShard shard = {});
  // x_TD holds T = B * seq_len tokens, sequence-major.
  MoEOutput forward(const torch::Tensor& x_TD, int64_t seq_len, std::optional<torch::ScalarType> compute_dtype) const;
  const config::MoEConfig& config() const { return cfg_; }
  const ExpertShard& shard() const { return shard_; }
  // Global id of this layer's first routed expert (0 for a whole layer).
  int64_t expert_offset() const { return int64_t(shard_.rank) * (cfg_.n_experts / shard_.ranks); }
  // Installed by a parallel layout (dist::parallelize); a sharded layer cannot run without one.
  void set_dispatcher(std::shared_ptr<const ExpertDispatcher> dispatcher) { dispatcher_ = std::move(dispatcher); }

  Router router{nullptr};
  Experts experts{nullptr};
  SwiGLU shared{nullptr};  // n_shared_experts experts as one SwiGLU of n_shared * shared_hidden

 private:
  config::MoEConfig cfg_;
  ExpertShard shard_;
  std::shared_ptr<const ExpertDispatcher> dispatcher_;
};
TORCH_MODULE(MoE);

}  // namespace moetrain::moe
