// Muon for the hidden matrices, AdamW for the rest (see muon.h).
#include "optim/muon.h"

#include <cmath>

#include "common/errors.h"

namespace moetrain::optim {

torch::Tensor newton_schulz(const torch::Tensor& g, int steps) {
  TORCH_CHECK(g.dim() >= 2, "[optim] newton_schulz: a matrix or a batch of them, got shape ", g.sizes());
  torch::NoGradGuard no_grad;
  auto x = g.to(g.is_cuda() ? torch::kBFloat16 : torch::kFloat);
  const bool transposed = g.size(-2) > g.size(-1);
  if (transposed) x = x.transpose(-2, -1);
  // Each matrix by its own norm (fp32 accumulation), so that every singular value is at most 1.
  const std::vector<int64_t> matrix_dims{-2, -1};
  const auto norm =
      torch::linalg_vector_norm(x.to(torch::kFloat), 2, at::IntArrayRef(matrix_dims), /*keepdim=*/true, torch::kFloat);
  x = (x / (norm + 1e-7).to(x.scalar_type())).contiguous();
  for (int i = 0; i < steps; ++i) {
    const auto a = torch::matmul(x, x.transpose(-2, -1));
    const auto b = kNewtonSchulzB * a + kNewtonSchulzC * torch::matmul(a, a);
    x = kNewtonSchulzA * x + torch::matmul(b, x);
  }
  if (transposed) x = x.transpose(-2, -1);
  return x.to(torch::kFloat).contiguous();
}

namespace {

// Orthogonalised and scaled to AdamW's update RMS (Moonlight: 0.2 sqrt(max(rows, cols))).
torch::Tensor scaled_orthogonal(const torch::Tensor& m) {
  const double scale = 0.2 * std::sqrt(double(std::max(m.size(-2), m.size(-1))));
  return newton_schulz(m).mul_(scale);
}

}  // namespace

torch::Tensor muon_direction(const torch::Tensor& update, int64_t column_heads,
                             const std::vector<int64_t>& column_widths) {
  torch::NoGradGuard no_grad;
  if (column_widths.empty()) return scaled_orthogonal(update);
  int64_t per_head = 0;
  for (const int64_t w : column_widths) per_head += w;
  TORCH_CHECK(per_head * column_heads == update.size(-1), "[optim] muon: ", column_heads, " heads of column blocks ",
              c10::IntArrayRef(column_widths), " do not make the ", update.size(-1), " columns of a weight of shape ",
              update.sizes());
  // (..., rows, heads, per_head): logical matrix p is block p of every head, (..., rows, heads * width).
  auto lead = update.sizes().vec();
  lead.pop_back();
  auto split_shape = lead;
  split_shape.insert(split_shape.end(), {column_heads, per_head});
  const auto blocks = update.reshape(split_shape);
  auto out = torch::empty(split_shape, update.options().dtype(torch::kFloat));
  int64_t offset = 0;
  for (const int64_t w : column_widths) {
    auto matrix_shape = lead;
    matrix_shape.push_back(column_heads * w);
    const auto part = blocks.narrow(-1, offset, w).reshape(matrix_shape);
    auto head_shape = lead;
    head_shape.insert(head_shape.end(), {column_heads, w});
    out.narrow(-1, offset, w).copy_(scaled_orthogonal(part).view(head_shape));
    offset += w;
  }
  return out.view(update.sizes());
}

void muon_update(torch::Tensor param, const torch::Tensor& grad, torch::Tensor momentum, const config::OptimConfig& cfg,
                 double lr, bool decay, int64_t column_heads, const std::vector<int64_t>& column_widths) {
  torch::NoGradGuard no_grad;
  const auto g = grad.to(torch::kFloat);
  momentum.mul_(cfg.momentum).add_(g);
  const auto direction = muon_direction(g.add(momentum, cfg.momentum), column_heads, column_widths);
  if (decay && cfg.weight_decay > 0) param.mul_(1.0 - lr * cfg.weight_decay);
  param.add_(direction.to(param.scalar_type()), -lr);
}

namespace {

std::vector<std::pair<std::string, torch::Tensor>> named(const std::vector<model::RoledParam>& params) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : params) out.emplace_back(p.name, p.tensor);
  return out;
}

std::vector<bool> hidden_matrices(const std::vector<model::RoledParam>& params) {
  std::vector<bool> out;
  for (const auto& p : params) out.push_back(p.hidden_matrix);
  return out;
}

}  // namespace

Muon::Muon(const std::vector<model::RoledParam>& params, const config::OptimConfig& cfg,
           const std::function<bool(const std::string&)>& no_decay, std::optional<bool> fused)
    : cfg_(cfg), adamw_(named(params), cfg, no_decay, fused, hidden_matrices(params)) {
  adamw_.state().optimizer = "muon";
  for (const auto& p : params) columns_.push_back({p.column_heads, p.column_widths});
}

void Muon::step(double lr) {
  torch::NoGradGuard no_grad;
  auto& states = adamw_.states();
  for (size_t i = 0; i < states.size(); ++i) {
    auto& s = states[i];
    if (s.muon && s.param.grad().defined())
      muon_update(s.param.detach(), s.param.grad(), s.momentum, cfg_, lr, s.decay, columns_[i].heads,
                  columns_[i].widths);
  }
  adamw_.step(lr);  // the rest, and the step count
}

}  // namespace moetrain::optim
