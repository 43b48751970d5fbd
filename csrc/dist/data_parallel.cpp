// Data parallelism around the step (see data_parallel.h).
#include "dist/data_parallel.h"

#include <cmath>

namespace moetrain::dist {

DataParallel::DataParallel(std::shared_ptr<const Layout> layout, std::vector<model::RoledParam> params)
    : layout_(std::move(layout)) {
  for (auto& p : params) {
    params_.push_back(p.tensor);
    sharded_.push_back(p.role == model::ParamRole::expert && layout_->ep_size() > 1);
    tied_.push_back(p.tied_across_stages);
    duplicate_.push_back(p.duplicate);
  }
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

void DataParallel::average_gradients() {
  if (dp_size() == 1) return;
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> replicated, experts;
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& p = params_[i];
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);  // an expert no token reached
    (sharded_[i] ? experts : replicated).push_back(p.grad());
  }
  reduce_in_buckets(replicated, *layout_->dp);
  reduce_in_buckets(experts, *layout_->edp);
}

void DataParallel::sum_over_expert_group(torch::Tensor& t) const {
  if (layout_->ep_size() > 1) layout_->ep->all_reduce_sum(t);
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

std::vector<std::pair<double, double>> DataParallel::gather_health(double loss, double grad_max_abs) const {
  const int W = world_size();
  if (W == 1) return {{loss, grad_max_abs}};
  auto slots = torch::zeros({2, W}, torch::kDouble);
  slots[0][rank()] = loss;
  slots[1][rank()] = grad_max_abs;
  slots = slots.to(params_.front().device());
  layout_->world->all_reduce_sum(slots);
  slots = slots.to(torch::kCPU);
  std::vector<std::pair<double, double>> per_rank;
  for (int r = 0; r < W; ++r) per_rank.emplace_back(slots[0][r].item<double>(), slots[1][r].item<double>());
  return per_rank;
}

std::vector<torch::Tensor> DataParallel::grads() const {
  std::vector<torch::Tensor> g;
  for (const auto& p : params_) g.push_back(p.grad());
  return g;
}

void DataParallel::reduce_in_buckets(const std::vector<torch::Tensor>& grads, Communicator& group) const {
  const double scale = 1.0 / dp_size();
  size_t i = 0;
  while (i < grads.size()) {
    std::vector<torch::Tensor> bucket;
    int64_t bytes = 0;
    while (i < grads.size() && (bucket.empty() || bytes + int64_t(grads[i].nbytes()) <= kBucketBytes)) {
      bytes += int64_t(grads[i].nbytes());
      bucket.push_back(grads[i++]);
    }
    std::vector<torch::Tensor> flat;
    for (const auto& g : bucket) flat.push_back(g.reshape(-1));
    auto fused = torch::cat(flat);
    if (group.world_size() > 1) group.all_reduce_sum(fused);
    fused.mul_(scale);
    int64_t offset = 0;
    for (auto& g : bucket) {
      g.copy_(fused.narrow(0, offset, g.numel()).view_as(g));
      offset += g.numel();
    }
  }
}

double max_abs(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> defined;
  for (const auto& t : tensors)
    if (t.defined() && t.numel() > 0) defined.push_back(t);
  if (defined.empty()) return 0;
  std::vector<torch::Tensor> maxima;
  for (const auto& m : at::_foreach_norm(defined, INFINITY)) maxima.push_back(m.to(torch::kDouble));
  return torch::stack(maxima).max().item<double>();  // max propagates NaN
}

}  // namespace moetrain::dist
