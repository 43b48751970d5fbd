// Data parallelism around a built model's step: the gradient average after backward, the job-wide
// views of the step's expert load, loss and gradient health, and the stop decision. What each
// parameter is to the layout comes from the model as data (model::ParamRole), not from its name:
// replicated weights are averaged over the world; a routed expert's weights live on one rank of its
// ep group and are averaged over the ranks holding the same experts (the edp group, dist::Layout).
// With a pipeline, "the world" of the gradients is this stage's data-parallel ranks (Layout::dp), and a
// tied embedding held by the first and last stages first sums its two gradients between them.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "dist/communicator.h"
#include "model/transformer.h"

namespace moetrain::dist {

// How a step's gradients are reduced (parallel.overlap_grad_reduce, parallel.grad_bucket_mb).
struct ReductionSettings {
  bool overlap = true;
  int64_t bucket_bytes = int64_t(32) << 20;
};
ReductionSettings reduction_settings(const config::ParallelConfig& parallel);

// Reduces a step's gradients bucket by bucket, in one fixed order that is the same on every rank: NCCL
// needs every rank to issue its collectives in the same order, while the order in which backward
// completes the gradients may differ between ranks (an MoE layer's ranks see different tokens). A
// bucket is a list of parameters whose gradients travel as one collective; its owner (zero 0: an
// all-reduce; zero 1: a reduce-scatter) says how, through two callbacks.
//
// With overlap, arm() goes before a step's last backward (the gradients of the earlier micro-batches
// only accumulate). From then on, as soon as autograd has accumulated every gradient of the next bucket
// in the order (each parameter's post-accumulate-grad hook), that bucket is launched, during backward;
// NCCL runs it on its own stream while backward goes on. finish() after backward launches the buckets
// left, in the same order (a gradient backward did not reach is zero), and waits for all of them.
// Without overlap finish() does everything. Both paths issue the same collectives on the same data.
//
// The order: the buckets by their last parameter, last first (backward completes the last layers
// first), then the buckets marked after_backward (a tied embedding: its two stages' gradients are
// summed between finish()'s two halves).
class GradientReducer {
 public:
  struct Bucket {
    std::vector<size_t> members;  // indices into the reducer's parameters
    bool after_backward = false;
    // Starts the collective over the members' gradients (all defined when it is called).
    std::function<std::unique_ptr<Pending>()> launch;
    // After the collective: puts its result where the update reads it.
    std::function<void()> complete;
  };

  GradientReducer(std::vector<torch::Tensor> params, std::vector<std::string> names, std::vector<Bucket> buckets,
                  bool overlap);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  // Before the step's last backward: the hooks launch buckets as they complete (no-op without overlap).
  void arm();
  // After backward: launches what is left in order, calling `before_after_backward` before the
  // after_backward buckets, and waits for every bucket. Returns the largest |gradient| this rank held
  // before any reduction (NaN if any was NaN), a () fp64 tensor on the device: every bucket is
  // measured just before its launch, so that a non-finite gradient can be traced to the rank that
  // produced it.
  torch::Tensor finish(const std::function<void()>& before_after_backward);
  // Of the last finished step's buckets, how many the hooks launched during backward (the overlap that
  // took place), and how many there are.
  int launched_during_backward() const { return last_overlapped_; }
  int bucket_count() const { return int(buckets_.size()); }

 private:
  class Hook;
  void on_accumulated(size_t param);
  void launch_ready();  // with mutex_ held
  void launch(size_t bucket);
  void measure(size_t bucket);

  std::vector<torch::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<Bucket> buckets_;
  bool overlap_;
  std::vector<size_t> order_;                      // bucket indices in launch order
  std::vector<size_t> bucket_of_;                  // per parameter
  std::mutex mutex_;                               // hooks may run on autograd's device threads
  bool armed_ = false;
  size_t next_ = 0;                                // position in order_ of the next launch
  std::vector<int64_t> waiting_;                   // per bucket: members not yet accumulated since arm()
  std::vector<bool> accumulated_;                  // per parameter, since arm()
  std::vector<std::unique_ptr<Pending>> pending_;  // per bucket, once launched (none: nothing to wait for)
  std::vector<bool> launched_;                     // per bucket, this step
  torch::Tensor max_abs_;                          // running max of |gradient| before reduction
  int launched_during_backward_ = 0, last_overlapped_ = 0;
};

class DataParallel {
 public:
  DataParallel(std::shared_ptr<const Layout> layout, std::vector<model::RoledParam> params);

  int world_size() const { return layout_->world->world_size(); }
  int rank() const { return layout_->world->rank(); }
  Communicator& world() const { return *layout_->world; }
  // The replicas of this stage's parameters (the world without a pipeline).
  int dp_size() const { return layout_->dp_size(); }
  Communicator& dp() const { return *layout_->dp; }

  // The buckets of the gradient average (zero 0), for a GradientReducer over params(). Every rank's
  // loss is the mean over its own tokens and the job's loss is their mean, so each gradient is summed
  // over the ranks that computed it and divided by the data-parallel size. Replicated weights sum over
  // the dp ranks; a routed expert's owner already holds the sum over its ep group (the all-to-all's
  // backward brought it), so experts sum over their replicas (the edp group). A bucket holds at most
  // bucket_bytes of one kind, fused into one tensor for its all-reduce; a tied embedding has buckets of
  // its own, reduced after sum_tied_gradients.
  //
  // With more than one data-parallel rank each bucket's gradients live in one fp32 buffer: every
  // parameter's .grad is a view of its slice, so autograd accumulates into it in place and the
  // all-reduce runs on the buffer itself, with no gather into a fused tensor and no copy back
  // (zero_bucket_gradients() then replaces zero_grad).
  std::vector<GradientReducer::Bucket> averaging_buckets(int64_t bucket_bytes);
  // Zeroes the bucket buffers and points every parameter's .grad at its slice again; false (and
  // nothing done) when averaging_buckets made no buffers.
  bool zero_bucket_gradients();
  // A tied embedding's gradient on the first and last pipeline stages: each holds its share (the
  // lookup's, the head's) and both end with their sum (collective over Layout::tie; a no-op without
  // a pipeline). Before the tied embedding's bucket is reduced.
  void sum_tied_gradients();
  // Which parameters are a tied embedding's copy (model::RoledParam::tied_across_stages).
  const std::vector<bool>& tied() const { return tied_; }
  std::vector<std::string> names() const { return names_; }
  // Which parameters are a second copy (model::RoledParam::duplicate), parallel to params().
  const std::vector<bool>& duplicate() const { return duplicate_; }
  // Which parameters are sharded over the ep group (expert role at ep > 1), parallel to params().
  const std::vector<bool>& sharded() const { return sharded_; }
  // The step's expert load and drops summed over the stage's dp ranks (those holding the same
  // layers), so every rank moves its routers' balancing biases alike.
  void sum_load(std::vector<torch::Tensor>& load_LE, std::vector<torch::Tensor>& dropped_L) const;
  // Whether any rank raised `flag` (a stop signal), so that all act on it after the same step.
  bool any(bool flag) const;

  const std::vector<torch::Tensor>& params() const { return params_; }
  const Layout& layout() const { return *layout_; }
  const std::shared_ptr<const Layout>& shared_layout() const { return layout_; }

 private:
  std::shared_ptr<const Layout> layout_;
  std::vector<torch::Tensor> params_;
  std::vector<std::string> names_;
  struct GradBuffer {
    torch::Tensor flat;                // fp32, the bucket's gradients end to end
    std::vector<size_t> members;
    std::vector<torch::Tensor> views;  // each member's slice, shaped like it
  };
  std::vector<std::shared_ptr<GradBuffer>> grad_buffers_;
  // Points each member's .grad at its slice; a gradient autograd put elsewhere is copied in first.
  void attach(GradBuffer& buffer, bool copy_stray);
  std::vector<bool> sharded_;
  std::vector<bool> tied_, duplicate_;
};

// The group a gradient bucket is reduced over: the replicas of an expert's weights (edp) or of a
// replicated weight (dp), through the communicators split for gradients alone (Layout::grad_edp,
// grad_dp) where the layout has them.
Communicator* gradient_group(const Layout& layout, bool experts);

// The largest |element| over tensors (NaN if any is NaN): one fused pass, one host read.
double max_abs(const std::vector<torch::Tensor>& tensors);

}  // namespace moetrain::dist
