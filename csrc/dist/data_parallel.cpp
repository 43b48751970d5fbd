// Data parallelism around the step (see data_parallel.h).
#include "dist/data_parallel.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>

#include "common/errors.h"
#include "common/host_sync.h"

namespace moetrain::dist {

ReductionSettings reduction_settings(const config::ParallelConfig& parallel) {
  return {parallel.overlap_grad_reduce, std::max<int64_t>(1, int64_t(parallel.grad_bucket_mb * double(1 << 20)))};
}

// ---- GradientReducer ----------------------------------------------------------------------------

// Autograd calls it on a parameter once backward has accumulated that parameter's gradient.
class GradientReducer::Hook final : public torch::autograd::PostAccumulateGradHook {
 public:
  Hook(GradientReducer* reducer, size_t param) : reducer_(reducer), param_(param) {}
  void operator()(const torch::autograd::Variable& /*param*/) override { reducer_->on_accumulated(param_); }

 private:
  GradientReducer* reducer_;
  size_t param_;
};

GradientReducer::GradientReducer(std::vector<torch::Tensor> params, std::vector<std::string> names,
                                 std::vector<Bucket> buckets, bool overlap)
    : params_(std::move(params)), names_(std::move(names)), buckets_(std::move(buckets)), overlap_(overlap) {
  constexpr size_t kNone = size_t(-1);
  bucket_of_.assign(params_.size(), kNone);
  for (size_t b = 0; b < buckets_.size(); ++b)
    for (const size_t m : buckets_[b].members) {
      TORCH_CHECK(m < params_.size() && bucket_of_[m] == kNone, "[dist] gradient bucket ", b, " lists parameter ", m,
                  " twice or out of range");
      bucket_of_[m] = b;
    }
  std::vector<size_t> during, after;
  for (size_t b = 0; b < buckets_.size(); ++b) (buckets_[b].after_backward ? after : during).push_back(b);
  auto last_member = [&](size_t b) { return *std::max_element(buckets_[b].members.begin(), buckets_[b].members.end()); };
  std::stable_sort(during.begin(), during.end(), [&](size_t a, size_t b) { return last_member(a) > last_member(b); });
  order_ = during;
  order_.insert(order_.end(), after.begin(), after.end());
  waiting_.assign(buckets_.size(), 0);
  accumulated_.assign(params_.size(), false);
  pending_.resize(buckets_.size());
  launched_.assign(buckets_.size(), false);
  if (!overlap_) return;
  for (size_t i = 0; i < params_.size(); ++i)
    if (bucket_of_[i] != kNone && !buckets_[bucket_of_[i]].after_backward)
      torch::autograd::impl::set_post_acc_grad_hooks(params_[i], std::make_unique<Hook>(this, i));
}

GradientReducer::~GradientReducer() {
  if (!overlap_) return;
  for (auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradientReducer::arm() {
  if (!overlap_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  armed_ = true;
  for (size_t b = 0; b < buckets_.size(); ++b) waiting_[b] = int64_t(buckets_[b].members.size());
  std::fill(accumulated_.begin(), accumulated_.end(), false);
}

void GradientReducer::on_accumulated(size_t param) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return;  // an earlier micro-batch: its gradient only accumulates
  const size_t b = bucket_of_[param];
  if (accumulated_[param]) {
    // A second accumulation in the last backward: harmless until the bucket has left, wrong after.
    if (launched_[b])
      throw DistError("the gradient of " + names_[param] + " was accumulated again after its bucket was reduced " +
                      "(reached twice by the last micro-batch's backward); set parallel.overlap_grad_reduce: false");
    return;
  }
  accumulated_[param] = true;
  --waiting_[b];
  launch_ready();
}

void GradientReducer::launch_ready() {
  while (next_ < order_.size()) {
    const size_t b = order_[next_];
    if (buckets_[b].after_backward || waiting_[b] > 0) return;
    torch::NoGradGuard no_grad;
    measure(b);
    launch(b);
    ++next_;
    ++launched_during_backward_;
  }
}

void GradientReducer::measure(size_t b) {
  std::vector<torch::Tensor> grads;
  for (const size_t m : buckets_[b].members) {
    auto& p = params_[m];
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);  // not reached by this rank's backward
    if (p.numel() > 0) grads.push_back(p.grad());
  }
  if (grads.empty()) return;
  auto norms = at::_foreach_norm(grads, INFINITY);
  auto largest = torch::stack(norms).max().to(torch::kDouble);  // max propagates NaN
  max_abs_ = max_abs_.defined() ? torch::maximum(max_abs_, largest) : largest;
}

void GradientReducer::launch(size_t b) {
  pending_[b] = buckets_[b].launch();
  launched_[b] = true;
}

torch::Tensor GradientReducer::finish(const std::function<void()>& before_after_backward) {
  std::lock_guard<std::mutex> lock(mutex_);
  torch::NoGradGuard no_grad;
  armed_ = false;
  while (next_ < order_.size() && !buckets_[order_[next_]].after_backward) {
    measure(order_[next_]);
    launch(order_[next_++]);
  }
  for (size_t k = next_; k < order_.size(); ++k) measure(order_[k]);  // before the callback changes them
  if (before_after_backward) before_after_backward();
  while (next_ < order_.size()) launch(order_[next_++]);
  for (const size_t b : order_) {
    if (pending_[b]) pending_[b]->wait();
    pending_[b].reset();
    buckets_[b].complete();
  }
  const auto largest = max_abs_.defined() ? max_abs_
                                          : torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(params_.front().device()));
  max_abs_ = torch::Tensor();
  next_ = 0;
  std::fill(launched_.begin(), launched_.end(), false);
  last_overlapped_ = launched_during_backward_;
  launched_during_backward_ = 0;
  return largest;
}

// ---- DataParallel -------------------------------------------------------------------------------

DataParallel::DataParallel(std::shared_ptr<const Layout> layout, std::vector<model::RoledParam> params)
    : layout_(std::move(layout)) {
  for (auto& p : params) {
    names_.push_back(p.name);
    params_.push_back(p.tensor);
    sharded_.push_back(p.role == model::ParamRole::expert && layout_->ep_size() > 1);
    tied_.push_back(p.tied_across_stages);
    duplicate_.push_back(p.duplicate);
  }
}

void DataParallel::attach(GradBuffer& buffer, bool copy_stray) {
  torch::NoGradGuard no_grad;
  for (size_t k = 0; k < buffer.members.size(); ++k) {
    auto& p = params_[buffer.members[k]];
    const auto& view = buffer.views[k];
    if (p.grad().defined() && p.grad().data_ptr() == view.data_ptr()) continue;
    if (copy_stray) {
      if (p.grad().defined()) {
        view.copy_(p.grad());
      } else {
        view.zero_();
      }
    }
    p.mutable_grad() = view;
  }
}

bool DataParallel::zero_bucket_gradients() {
  if (grad_buffers_.empty()) return false;
  for (auto& buffer : grad_buffers_) {
    buffer->flat.zero_();
    attach(*buffer, /*copy_stray=*/false);
  }
  return true;
}

void DataParallel::sum_tied_gradients() {
  if (!layout_->tie || layout_->tie->world_size() == 1) return;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!tied_[i]) continue;
    auto& p = params_[i];
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    layout_->tie->all_reduce_sum(p.mutable_grad());
  }
}

Communicator* gradient_group(const Layout& layout, bool experts) {
  Communicator* group = experts ? (layout.grad_edp ? layout.grad_edp.get() : layout.edp.get())
                                : (layout.grad_dp ? layout.grad_dp.get() : layout.dp.get());
  return group ? group : layout.world.get();
}

std::vector<GradientReducer::Bucket> DataParallel::averaging_buckets(int64_t bucket_bytes) {
  std::vector<GradientReducer::Bucket> buckets;
  grad_buffers_.clear();
  const int dp = dp_size();
  auto make = [&](std::vector<size_t> members, Communicator* group, bool after_backward) {
    GradientReducer::Bucket b;
    b.members = std::move(members);
    b.after_backward = after_backward;
    if (dp == 1) {  // nothing to average (a tied embedding's sum is all there is)
      b.launch = [] { return std::unique_ptr<Pending>(); };
      b.complete = [] {};
      return b;
    }
    auto buffer = std::make_shared<GradBuffer>();
    int64_t total = 0;
    for (const size_t m : b.members) total += params_[m].numel();
    buffer->flat = torch::zeros({total}, params_[b.members.front()].options().dtype(torch::kFloat));
    buffer->members = b.members;
    int64_t offset = 0;
    for (const size_t m : b.members) {
      buffer->views.push_back(buffer->flat.narrow(0, offset, params_[m].numel()).view(params_[m].sizes()));
      offset += params_[m].numel();
    }
    attach(*buffer, /*copy_stray=*/false);
    grad_buffers_.push_back(buffer);
    b.launch = [this, buffer, group] {
      attach(*buffer, /*copy_stray=*/true);
      // An expert group of one rank (ep = dp) has nothing to add: its owner already holds the ep sum.
      return group->world_size() > 1 ? group->all_reduce_sum_async(buffer->flat) : std::unique_ptr<Pending>();
    };
    b.complete = [buffer, dp] { buffer->flat.mul_(1.0 / dp); };
    return b;
  };
  // Three kinds, each over its group and cut into buckets walking the parameters last to first, the
  // order in which backward completes them.
  enum Kind { kReplicated, kExpert, kTied };
  auto kind_of = [&](size_t i) { return tied_[i] ? kTied : sharded_[i] ? kExpert : kReplicated; };
  for (const Kind kind : {kReplicated, kExpert, kTied}) {
    Communicator* group = gradient_group(*layout_, kind == kExpert);
    std::vector<size_t> members;
    int64_t bytes = 0;
    for (size_t i = params_.size(); i-- > 0;) {
      if (kind_of(i) != kind) continue;
      const int64_t n = int64_t(params_[i].nbytes());
      if (!members.empty() && bytes + n > bucket_bytes) {
        buckets.push_back(make(std::move(members), group, kind == kTied));
        members.clear();
        bytes = 0;
      }
      members.push_back(i);
      bytes += n;
    }
    if (!members.empty()) buckets.push_back(make(std::move(members), group, kind == kTied));
  }
  return buckets;
}

void DataParallel::sum_load(std::vector<torch::Tensor>& load_LE, std::vector<torch::Tensor>& dropped_L) const {
  if (dp_size() == 1 || load_LE.empty()) return;
  auto all = torch::cat({torch::stack(load_LE), torch::stack(dropped_L).unsqueeze(1)}, 1);  // (L, E + 1)
  layout_->dp->all_reduce_sum(all);
  for (size_t l = 0; l < load_LE.size(); ++l) {
    load_LE[l] = all[int64_t(l)].narrow(0, 0, load_LE[l].size(0));
    dropped_L[l] = all[int64_t(l)][load_LE[l].size(0)];
  }
}

bool DataParallel::any(bool flag) const { return all_sum(*layout_->world, flag ? 1.0 : 0.0) > 0; }

double max_abs(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> defined;
  for (const auto& t : tensors)
    if (t.defined() && t.numel() > 0) defined.push_back(t);
  if (defined.empty()) return 0;
  std::vector<torch::Tensor> maxima;
  for (const auto& m : at::_foreach_norm(defined, INFINITY)) maxima.push_back(m.to(torch::kDouble));
  return host_double(torch::stack(maxima).max(), "dist.max_abs");  // max propagates NaN
}

}  // namespace moetrain::dist
