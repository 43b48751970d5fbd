// Pipeline stages and the 1F1B schedule (see pipeline.h).
#include "dist/pipeline.h"

#include <deque>

#include "common/errors.h"

namespace moetrain::dist {

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

void PipelineSchedule::train(int n, const std::function<StageForward(int, const torch::Tensor&)>& forward,
                             const std::function<void(int)>& before_backward) {
  Communicator& pp = *layout_->pp;
  const int stage = pp.rank(), P = pp.world_size();
  const bool first = stage == 0, last = stage == P - 1;
  const int prev = first ? -1 : stage - 1, next = last ? -1 : stage + 1;
  struct InFlight {
    int micro;
    torch::Tensor input, output, loss;
  };
  std::deque<InFlight> in_flight;  // forwards whose backward is still to run, oldest first

  auto run_forward = [&](int m, torch::Tensor input) {
    if (input.defined()) input.requires_grad_(true);
    auto f = forward(m, input);
    TORCH_CHECK(last || f.output.defined(), "[dist] pipeline stage ", stage, " produced no activations for micro-batch ", m);
    in_flight.push_back({m, input, last ? torch::Tensor() : f.output, f.loss});
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
    if (before_backward) before_backward(f.micro);
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
