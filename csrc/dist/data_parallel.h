// Data parallelism around a built model's step: the gradient average after backward, the job-wide
// views of the step's expert load, loss and gradient health, and the stop decision. What each
// parameter is to the layout comes from the model as data (model::ParamRole), not from its name:
// replicated weights are averaged over the world; a routed expert's weights live on one rank of its
// ep group and are averaged over the ranks holding the same experts (the edp group, dist::Layout).
// With a pipeline, "the world" of the gradients is this stage's data-parallel ranks (Layout::dp), and a
// tied embedding held by the first and last stages first sums its two gradients between them.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dist/communicator.h"
#include "model/transformer.h"

namespace moetrain::dist {

class DataParallel {
 public:
  DataParallel(std::shared_ptr<const Layout> layout, std::vector<model::RoledParam> params);

  int world_size() const { return layout_->world->world_size(); }
  int rank() const { return layout_->world->rank(); }
  Communicator& world() const { return *layout_->world; }
  // The replicas of this stage's parameters (the world without a pipeline).
  int dp_size() const { return layout_->dp_size(); }
  Communicator& dp() const { return *layout_->dp; }

  // Every rank's loss is the mean over its own tokens and the job's loss is their mean, so each
  // gradient is summed over the ranks that computed it and divided by the data-parallel size.
  // Replicated weights sum over the dp ranks; a routed expert's owner already holds the sum over its ep group (the
  // all-to-all's backward brought it), so experts sum over their replicas (the edp group). Gradients
  // travel in fused buckets of at most kBucketBytes. A parameter no token reached gets a zero gradient
  // first, so that every rank posts the same buckets.
  void average_gradients();
  // A tied embedding's gradient on the first and last pipeline stages: each holds its share (the
  // lookup's, the head's) and both end with their sum (collective over Layout::tie; a no-op without
  // a pipeline). Before average_gradients or the ZeRO reduction.
  void sum_tied_gradients();
  // Which parameters are a second copy (model::RoledParam::duplicate), parallel to params().
  const std::vector<bool>& duplicate() const { return duplicate_; }
  // Which parameters are sharded over the ep group (expert role at ep > 1), parallel to params(), and
  // the sum of a per-rank partial over that group: what a global gradient norm needs.
  const std::vector<bool>& sharded() const { return sharded_; }
  void sum_over_expert_group(torch::Tensor& t) const;
  // The step's expert load and drops summed over the stage's dp ranks (those holding the same
  // layers), so every rank moves its routers' balancing biases alike.
  void sum_load(std::vector<torch::Tensor>& load_LE, std::vector<torch::Tensor>& dropped_L) const;
  // Whether any rank raised `flag` (a stop signal), so that all act on it after the same step.
  bool any(bool flag) const;
  // Every rank's (loss, largest |gradient| before averaging), in one collective: a non-finite value
  // stays in the slot of the rank that produced it, so every rank takes the same decision and an
  // error can name the rank.
  std::vector<std::pair<double, double>> gather_health(double loss, double grad_max_abs) const;

  const std::vector<torch::Tensor>& params() const { return params_; }
  std::vector<torch::Tensor> grads() const;
  const Layout& layout() const { return *layout_; }
  const std::shared_ptr<const Layout>& shared_layout() const { return layout_; }

 private:
  static constexpr int64_t kBucketBytes = 32 << 20;
  void reduce_in_buckets(const std::vector<torch::Tensor>& grads, Communicator& group) const;

  std::shared_ptr<const Layout> layout_;
  std::vector<torch::Tensor> params_;
  std::vector<bool> sharded_;
  std::vector<bool> tied_, duplicate_;
};

// The largest |element| over tensors (NaN if any is NaN): one fused pass, one host read.
double max_abs(const std::vector<torch::Tensor>& tensors);

}  // namespace moetrain::dist
