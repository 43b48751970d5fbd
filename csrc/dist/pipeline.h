// Pipeline parallelism: the blocks are split into consecutive stages (cost::pipeline_layers), each rank runs
// its stage's share of every micro-batch, and activations and their gradients cross between
// neighbouring stages point to point (Layout::pp). The schedule is 1F1B (PipeDream-Flush, Narayanan et
// al. 2021; Megatron-Core's non-interleaved schedule): stage s of P first runs P - s - 1 forwards, then
// alternates one forward with one backward, then drains the remaining backwards. A stage holds the
// activations of at most P - s micro-batches at once, not of all of them, and the result is exactly
// gradient accumulation over the step's micro-batches.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "config/config.h"
#include "dist/communicator.h"

namespace moetrain::dist {

// What one stage's forward of a micro-batch gives the schedule.
struct StageForward {
  torch::Tensor output;  // activations for the next stage (undefined on the last stage)
  torch::Tensor loss;    // what this stage's backward starts from besides the output's gradient: the
                         // last stage's loss, another stage's own additive losses (the MoE balance
                         // loss), already divided by the micro-batch count; may be undefined
};

class PipelineSchedule {
 public:
  // `activation` is the shape, dtype and device of what crosses between stages (one micro-batch's
  // residual stream, (B, S, D)); every stage knows it, so nothing but the values is sent.
  PipelineSchedule(std::shared_ptr<const Layout> layout, std::vector<int64_t> activation_shape,
                   torch::TensorOptions activation_options);

  // Forward and backward of micro-batches 0 .. n - 1 in the 1F1B order. `forward(m, input)` runs this
  // stage on micro-batch m; `input` is the previous stage's output (requires grad), undefined on the
  // first stage. Backward of micro-batch m starts from the output's gradient (received from the next
  // stage) and the stage's own loss; the gradient of the input goes back to the previous stage.
  // `before_backward(m)`, if given, runs just before micro-batch m's backward (backward runs them in
  // order 0 .. n - 1 on every stage, so m = n - 1 is the step's last).
  void train(int n, const std::function<StageForward(int micro, const torch::Tensor& input)>& forward,
             const std::function<void(int micro)>& before_backward = nullptr);
  // Forward of micro-batches 0 .. n - 1 only (evaluation): outputs go on, nothing comes back.
  void forward_only(int n, const std::function<StageForward(int micro, const torch::Tensor& input)>& forward);

  // The order train() runs its work in, for stage `stage` of `stages` with n micro-batches:
  // +m = forward of micro-batch m, -m - 1 = its backward (exposed for tests).
  static std::vector<int> order(int stage, int stages, int n);
  // Bytes this rank has sent to its neighbours since the layout was made.
  int64_t bytes_sent() const { return layout_->pp->p2p_bytes_sent(); }

 private:
  torch::Tensor receive(int from);
  std::shared_ptr<const Layout> layout_;
  std::vector<int64_t> shape_;
  torch::TensorOptions options_;
};

}  // namespace moetrain::dist
