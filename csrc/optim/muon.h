// Muon (Jordan et al. 2024) as Moonlight (Liu et al. 2025) runs it at scale: a hidden matrix's update is
// its Nesterov momentum orthogonalised by 5 quintic Newton-Schulz iterations and scaled to AdamW's
// update RMS by 0.2 sqrt(max(rows, cols)), so that optim.lr and optim.weight_decay carry over from AdamW,
// with decoupled weight decay. The rest (model::RoledParam::hidden_matrix false: the embedding, LM head,
// norms, biases, routers and gates, LoRA adapters) takes AdamW with the optim.* settings, as Moonlight
// and Kimi K2 do. Routed experts' stacked (E, in, out) weights are E matrices, orthogonalised each on its
// own by one batched Newton-Schulz; a weight holding several logical matrices (MLA's wkv_a and wkv_b) is
// orthogonalised per logical matrix.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/transformer.h"
#include "optim/adamw.h"

namespace moetrain::optim {

// Keller Jordan's quintic coefficients: X <- a X + (b A + c A A) X with A = X X^T.
constexpr double kNewtonSchulzA = 3.4445, kNewtonSchulzB = -4.7750, kNewtonSchulzC = 2.0315;
constexpr int kNewtonSchulzSteps = 5;

// An approximately orthogonal matrix U V^T of g = U S V^T: g divided by its Frobenius norm (+ 1e-7),
// transposed when rows > cols so that X X^T is the smaller Gram matrix, then `steps` quintic
// iterations. Over the last two dims: a (E, rows, cols) tensor is E matrices, each normalised and
// iterated on its own through batched matmuls. Computes in bf16 on CUDA and fp32 elsewhere; returns
// fp32 in the shape of g.
torch::Tensor newton_schulz(const torch::Tensor& g, int steps = kNewtonSchulzSteps);

// The update direction of a hidden matrix from its Nesterov momentum `update` (rows, cols) or (E, rows,
// cols): newton_schulz of each logical matrix times 0.2 sqrt(max(its rows, its cols)). With
// `column_widths`, the columns hold `column_heads` repeats of blocks of these widths and logical matrix
// p gathers block p of every head (model::RoledParam).
torch::Tensor muon_direction(const torch::Tensor& update, int64_t column_heads = 1,
                             const std::vector<int64_t>& column_widths = {});

// One Muon step of `param` in place from `grad`: momentum = mu momentum + grad; the Nesterov update
// grad + mu momentum goes through muon_direction; weight decay (when `decay`) shrinks the weight by
// 1 - lr weight_decay, then param -= lr direction.
void muon_update(torch::Tensor param, const torch::Tensor& grad, torch::Tensor momentum, const config::OptimConfig& cfg,
                 double lr, bool decay, int64_t column_heads = 1, const std::vector<int64_t>& column_widths = {});

// optim.name muon over one process's parameters: the interface of AdamW. Its state holds a momentum
// for each hidden matrix (ParamState::muon) and AdamW's two moments for the rest; one step count.
class Muon {
 public:
  // `fused`: the AdamW part's kernel, as AdamW chooses it (CUDA: fused by default).
  Muon(const std::vector<model::RoledParam>& params, const config::OptimConfig& cfg,
       const std::function<bool(const std::string&)>& no_decay, std::optional<bool> fused = std::nullopt);
  void step(double lr);
  void zero_grad() { adamw_.zero_grad(); }
  int64_t step_count() const { return adamw_.step_count(); }
  std::vector<ParamState>& states() { return adamw_.states(); }
  const std::vector<ParamState>& states() const { return adamw_.states(); }
  OptimizerState& state() { return adamw_.state(); }
  const OptimizerState& state() const { return adamw_.state(); }

 private:
  struct Columns {
    int64_t heads = 1;
    std::vector<int64_t> widths;
  };
  config::OptimConfig cfg_;
  // Every parameter's state and the step count: the hidden matrices' momenta, and AdamW, which updates
  // the rest.
  AdamW adamw_;
  std::vector<Columns> columns_;  // per state
};

}  // namespace moetrain::optim
