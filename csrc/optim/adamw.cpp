// AdamW, the warmup + cosine schedule and gradient clipping.
#include "optim/adamw.h"

#include "common/host_sync.h"

#include <cmath>

namespace moetrain::optim {

AdamW::AdamW(const std::vector<std::pair<std::string, torch::Tensor>>& named_params, const config::OptimConfig& cfg,
             const std::function<bool(const std::string&)>& no_decay, std::optional<bool> fused,
             const std::vector<bool>& muon)
    : cfg_(cfg) {
  TORCH_CHECK(muon.empty() || muon.size() == named_params.size(), "[optim] AdamW: ", muon.size(), " Muon flags for ",
              named_params.size(), " parameters");
  bool all_cuda = !named_params.empty();
  for (const auto& np : named_params) all_cuda = all_cuda && np.second.is_cuda();
  fused_ = fused.value_or(all_cuda);
  for (size_t i = 0; i < named_params.size(); ++i) {
    const auto& [name, p] = named_params[i];
    const auto opts = p.options().dtype(torch::kFloat);
    ParamState s{name, p, {}, {}, !no_decay(name), {}, false, {}};
    if (!muon.empty() && muon[i]) {
      s.muon = true;
      s.momentum = torch::zeros(p.sizes(), opts);
    } else {
      s.exp_avg = torch::zeros(p.sizes(), opts);
      s.exp_avg_sq = torch::zeros(p.sizes(), opts);
    }
    state_.states.push_back(std::move(s));
  }
}

void AdamW::zero_grad() {
  for (auto& s : state_.states)
    if (s.param.grad().defined()) s.param.mutable_grad() = torch::Tensor();
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++state_.step_count;
  std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;
  std::vector<bool> decay;
  for (auto& s : state_.states) {
    if (s.muon || !s.param.grad().defined()) continue;  // Muon's hidden matrices: optim::Muon updates them
    params.push_back(s.param.detach());
    grads.push_back(s.param.grad());
    exp_avgs.push_back(s.exp_avg);
    exp_avg_sqs.push_back(s.exp_avg_sq);
    decay.push_back(s.decay);
  }
  adamw_step(params, grads, exp_avgs, exp_avg_sqs, decay, cfg_, lr, state_.step_count, fused_);
}

void adamw_step(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                const std::vector<bool>& decay, const config::OptimConfig& cfg, double lr, int64_t step_count, bool fused) {
  torch::NoGradGuard no_grad;
  if (!fused) {
    for (size_t i = 0; i < params.size(); ++i)
      adamw_update(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], cfg, lr, step_count, decay[i]);
    return;
  }
  // Two launches, with and without weight decay. The kernel reads each tensor's step count (fp32)
  // and forms the bias corrections itself; the counts are views of one tensor, filled once.
  for (const bool with_decay : {true, false}) {
    std::vector<torch::Tensor> p, g, m, v;
    for (size_t i = 0; i < params.size(); ++i) {
      if (decay[i] != with_decay) continue;
      p.push_back(params[i]);
      g.push_back(grads[i]);
      m.push_back(exp_avgs[i]);
      v.push_back(exp_avg_sqs[i]);
    }
    if (p.empty()) continue;
    auto steps = torch::full({int64_t(p.size())}, double(step_count), p.front().options().dtype(torch::kFloat));
    std::vector<torch::Tensor> step_views;
    for (int64_t i = 0; i < steps.size(0); ++i) step_views.push_back(steps[i]);
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, step_views, lr, cfg.beta1, cfg.beta2,
                      with_decay ? cfg.weight_decay : 0.0, cfg.eps, /*amsgrad=*/false, /*maximize=*/false);
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

// The sum of the tensors' squared elements in fp32: one multi-tensor norm over all of them (a few
// kernels whatever their number, where a norm per tensor would launch two per parameter).
torch::Tensor sum_of_squares(const std::vector<torch::Tensor>& grads) {
  if (grads.empty()) return torch::zeros({});
  std::vector<torch::Tensor> fp32;
  for (const auto& g : grads) fp32.push_back(g.scalar_type() == torch::kFloat ? g : g.to(torch::kFloat));
  return torch::stack(at::_foreach_norm(fp32, 2)).pow(2).sum();
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> grads;
  for (const auto& p : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return 0.0;
  const double norm = std::sqrt(host_double(sum_of_squares(grads), "step.grad_norm"));
  if (max_norm > 0 && norm > max_norm) at::_foreach_mul_(grads, max_norm / (norm + 1e-6));
  return norm;
}

}  // namespace moetrain::optim
