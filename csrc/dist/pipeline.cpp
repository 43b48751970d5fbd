// Pipeline stages and the 1F1B schedule (see pipeline.h).
#include "dist/pipeline.h"

#include <deque>
#include <limits>

#include "common/errors.h"
#include "cost/flops.h"

namespace moetrain::dist {

std::vector<int> pipeline_layers(const config::Config& cfg) {
  const int P = cfg.parallel.pipeline_parallel, L = cfg.model.n_layers;
  if (auto given = config::explicit_pp_layers(cfg); !given.empty()) return given;
  if (P < 1 || P > L)
    throw ConfigError("parallel.pipeline_parallel = " + std::to_string(P) + " must be in [1, model.n_layers = " +
                      std::to_string(L) + "]");
  // Forward FLOPs per token of each block (the training factor 3 is common to all and drops out).
  const auto& m = cfg.model;
  const double attention = cost::attention_projection_forward(m) +
                           cost::attention_scores_forward(m, cfg.data.seq_len, /*causal=*/true);
  const double dense = attention + cost::dense_mlp_forward(m);
  const double moe = attention + cost::routed_experts_forward(m) + cost::shared_experts_forward(m) +
                     cost::router_forward(m);
  std::vector<double> prefix(size_t(L) + 1, 0.0);
  for (int i = 0; i < L; ++i) prefix[size_t(i) + 1] = prefix[size_t(i)] + (i < m.dense_layers ? dense : moe);
  const double head = cost::lm_head_forward(m);
  auto stage_cost = [&](int first, int end, bool last) { return prefix[size_t(end)] - prefix[size_t(first)] + (last ? head : 0); };
  // best[p][i]: the smallest possible largest stage cost placing the first i blocks on p stages.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(size_t(P) + 1, std::vector<double>(size_t(L) + 1, inf));
  std::vector<std::vector<int>> cut(size_t(P) + 1, std::vector<int>(size_t(L) + 1, 0));
  best[0][0] = 0;
  for (int p = 1; p <= P; ++p)
    for (int i = p; i <= L - (P - p); ++i)
      for (int j = p - 1; j < i; ++j) {  // stage p holds blocks [j, i)
        const double c = std::max(best[size_t(p) - 1][size_t(j)], stage_cost(j, i, p == P));
        if (c < best[size_t(p)][size_t(i)]) best[size_t(p)][size_t(i)] = c, cut[size_t(p)][size_t(i)] = j;
      }
  std::vector<int> layers(static_cast<size_t>(P), 0);
  for (int p = P, i = L; p >= 1; --p) {
    const int j = cut[size_t(p)][size_t(i)];
    layers[size_t(p) - 1] = i - j;
    i = j;
  }
  return layers;
}

std::vector<int> stage_bounds(const std::vector<int>& layers_per_stage) {
  std::vector<int> bounds{0};
  for (int n : layers_per_stage) bounds.push_back(bounds.back() + n);
  return bounds;
}

PipelineSchedule::PipelineSchedule(std::shared_ptr<const Layout> layout, std::vector<int64_t> activation_shape,
                                   torch::TensorOptions activation_options)
    : layout_(std::move(layout)), shape_(std::move(activation_shape)), options_(activation_options) {}

std::vector<int> PipelineSchedule::order(int stage, int stages, int n) {
  const int warmup = std::min(stages - stage - 1, n);
  std::vector<int> out;
  for (int m = 0; m < warmup; ++m) out.push_back(m);
  for (int m = 0; m < n - warmup; ++m) out.push_back(warmup + m), out.push_back(-m - 1);
  for (int m = n - warmup; m < n; ++m) out.push_back(-m - 1);
  return out;
}

torch::Tensor PipelineSchedule::receive(int from) {
  auto t = torch::empty(shape_, options_);
  layout_->pp->recv(t, from);
  return t;
}

void PipelineSchedule::train(int n, const std::function<StageForward(int, const torch::Tensor&)>& forward) {
  Communicator& pp = *layout_->pp;
  const int stage = pp.rank(), P = pp.world_size();
  const bool first = stage == 0, last = stage == P - 1;
  const int prev = first ? -1 : stage - 1, next = last ? -1 : stage + 1;
  struct InFlight {
    torch::Tensor input, output, loss;
  };
  std::deque<InFlight> in_flight;  // forwards whose backward is still to run, oldest first

  auto run_forward = [&](int m, torch::Tensor input) {
    if (input.defined()) input.requires_grad_(true);
    auto f = forward(m, input);
    TORCH_CHECK(last || f.output.defined(), "[dist] pipeline stage ", stage, " produced no activations for micro-batch ", m);
    in_flight.push_back({input, last ? torch::Tensor() : f.output, f.loss});
    return last ? torch::Tensor() : f.output.detach().contiguous();
  };
  // Backward of the oldest micro-batch in flight from the gradient of its output; returns the gradient
  // of its input (undefined on the first stage).
  auto run_backward = [&](const torch::Tensor& grad_output) {
    InFlight f = std::move(in_flight.front());
    in_flight.pop_front();
    std::vector<torch::Tensor> roots, grads;
    if (f.output.defined()) roots.push_back(f.output), grads.push_back(grad_output);
    if (f.loss.defined() && f.loss.requires_grad()) roots.push_back(f.loss), grads.push_back(torch::ones_like(f.loss));
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    if (first) return torch::Tensor();
    TORCH_CHECK(f.input.grad().defined(), "[dist] pipeline stage ", stage, ": no gradient reached the stage's input");
    return f.input.grad().contiguous();
  };

  // The phases of 1F1B (order() lists the same sequence); sends and receives that meet the same
  // neighbour at the same moment go as one send_recv.
  const int warmup = std::min(P - stage - 1, n), steady = n - warmup;
  for (int m = 0; m < warmup; ++m) {
    auto input = first ? torch::Tensor() : receive(prev);
    pp.send(run_forward(m, input), next);
  }
  torch::Tensor input = steady > 0 && !first ? receive(prev) : torch::Tensor();
  for (int i = 0; i < steady; ++i) {
    auto output = run_forward(warmup + i, input);
    torch::Tensor grad_output;
    if (!last) {
      grad_output = torch::empty(shape_, options_);
      pp.send_recv(output, next, grad_output, next);
    }
    auto grad_input = run_backward(grad_output);
    const bool more = i + 1 < steady;
    if (first) continue;
    if (more) {
      input = torch::empty(shape_, options_);
      pp.send_recv(grad_input, prev, input, prev);
    } else {
      pp.send(grad_input, prev);
    }
  }
  for (int i = 0; i < warmup; ++i) {
    auto grad_output = receive(next);
    auto grad_input = run_backward(grad_output);
    if (!first) pp.send(grad_input, prev);
  }
}

void PipelineSchedule::forward_only(int n, const std::function<StageForward(int, const torch::Tensor&)>& forward) {
  Communicator& pp = *layout_->pp;
  const int stage = pp.rank(), P = pp.world_size();
  for (int m = 0; m < n; ++m) {
    auto input = stage == 0 ? torch::Tensor() : receive(stage - 1);
    auto f = forward(m, input);
    if (stage < P - 1) pp.send(f.output.contiguous(), stage + 1);
  }
}

}  // namespace moetrain::dist
