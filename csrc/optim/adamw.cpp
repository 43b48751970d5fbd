// AdamW, the warmup + cosine schedule and gradient clipping.
#include "optim/adamw.h"

#include <cmath>

namespace moetrain::optim {

AdamW::AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const config::OptimConfig& cfg,
             const std::function<bool(const std::string&)>& no_decay, std::optional<bool> fused)
    : cfg_(cfg) {
  bool all_cuda = !named_params.empty();
  for (const auto& np : named_params) all_cuda = all_cuda && np.second.is_cuda();
  fused_ = fused.value_or(all_cuda);
  for (const auto& [name, p] : named_params) {
    auto opts = p.options().dtype(torch::kFloat);
    state_.states.push_back({name, p, torch::zeros(p.sizes(), opts), torch::zeros(p.sizes(), opts), !no_decay(name)});
  }
}

void AdamW::zero_grad() {
  for (auto& s : state_.states)
    if (s.param.grad().defined()) s.param.mutable_grad() = torch::Tensor();
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++state_.step_count;
  if (!fused_) {
    for (auto& s : state_.states)
      if (s.param.grad().defined())
        adamw_update(s.param, s.param.grad(), s.exp_avg, s.exp_avg_sq, cfg_, lr, state_.step_count, s.decay);
    return;
  }
  // Two launches, with and without weight decay. The kernel reads each tensor's step count (fp32)
  // and forms the bias corrections itself; the counts are views of one tensor, filled once.
  for (const bool decay : {true, false}) {
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;
    for (auto& s : state_.states) {
      if (s.decay != decay || !s.param.grad().defined()) continue;
      params.push_back(s.param.detach());
      grads.push_back(s.param.grad());
      exp_avgs.push_back(s.exp_avg);
      exp_avg_sqs.push_back(s.exp_avg_sq);
    }
    if (params.empty()) continue;
    auto steps = torch::full({int64_t(params.size())}, double(state_.step_count),
                             params.front().options().dtype(torch::kFloat));
    std::vector<torch::Tensor> step_views;
    for (int64_t i = 0; i < steps.size(0); ++i) step_views.push_back(steps[i]);
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, step_views, lr, cfg_.beta1,
                      cfg_.beta2, decay ? cfg_.weight_decay : 0.0, cfg_.eps, /*amsgrad=*/false, /*maximize=*/false);
  }
}

void adamw_update(torch::Tensor param, const torch::Tensor& grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq,
                  const config::OptimConfig& cfg, double lr, int64_t step_count, bool decay) {
  torch::NoGradGuard no_grad;
  const double bias1 = 1.0 - std::pow(cfg.beta1, double(step_count));
  const double bias2 = 1.0 - std::pow(cfg.beta2, double(step_count));
  auto g = grad.to(torch::kFloat);
  exp_avg.mul_(cfg.beta1).add_(g, 1.0 - cfg.beta1);
  exp_avg_sq.mul_(cfg.beta2).addcmul_(g, g, 1.0 - cfg.beta2);
  auto denom = (exp_avg_sq.sqrt() / std::sqrt(bias2)).add_(cfg.eps);
  if (decay && cfg.weight_decay > 0) param.mul_(1.0 - lr * cfg.weight_decay);
  param.addcdiv_(exp_avg.to(param.scalar_type()), denom.to(param.scalar_type()), -lr / bias1);
}

double learning_rate(const config::OptimConfig& cfg, int64_t step, int64_t total_steps) {
  if (step < cfg.warmup_steps) return cfg.lr * double(step + 1) / double(cfg.warmup_steps);
  if (cfg.schedule == "constant") return cfg.lr;
  const double decay_steps = std::max<int64_t>(1, total_steps - cfg.warmup_steps);
  const double progress = std::min(1.0, double(step - cfg.warmup_steps) / decay_steps);
  return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + std::cos(M_PI * progress));
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm, const NormReduction& over) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> squares, sharded_squares;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& g = params[i].grad();
    if (!g.defined() || (i < over.skip.size() && over.skip[i])) continue;
    (i < over.sharded.size() && over.sharded[i] ? sharded_squares : squares).push_back(g.to(torch::kFloat).pow(2).sum());
  }
  if (squares.empty() && sharded_squares.empty() && !over.sum_sharded && !over.sum_total) return 0.0;
  auto total = squares.empty() ? torch::zeros({}) : torch::stack(squares).sum();
  if (over.sum_sharded) {
    auto part = sharded_squares.empty() ? torch::zeros({}, total.options()) : torch::stack(sharded_squares).sum();
    part = part.to(total.device()).reshape({1}).contiguous();
    over.sum_sharded(part);
    total = total.to(part.device()) + part[0];
  }
  if (over.sum_total) {
    auto all = total.reshape({1}).contiguous();
    over.sum_total(all);
    total = all[0];
  }
  const double norm = total.sqrt().item<double>();
  if (max_norm > 0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().mul_(scale);
  }
  return norm;
}

}  // namespace moetrain::optim
