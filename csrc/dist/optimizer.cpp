// The optimizer step across ranks (see optimizer.h): replicated AdamW or Muon (zero 0) and ZeRO stage 1.
#include "dist/optimizer.h"

#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>

#include "common/errors.h"
#include "common/host_sync.h"
#include "common/tensor.h"
#include "optim/muon.h"

namespace moetrain::dist {

namespace {

std::vector<std::pair<std::string, torch::Tensor>> named(const std::vector<model::RoledParam>& params) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : params) out.emplace_back(p.name, p.tensor);
  return out;
}

// ---- zero 0: every replica updates the whole parameter -----------------------------------------

// optim::AdamW or optim::Muon. Muon needs no communication here: every replica orthogonalises the whole
// averaged gradient of each matrix it holds, an expert shard's matrices where they live, a pipeline
// stage its own.
template <typename Local>
class Replicated final : public Optimizer {
 public:
  Replicated(DataParallel& parallel, Local local, const ReductionSettings& reduction)
      : parallel_(parallel),
        local_(std::move(local)),
        reducer_(parallel.params(), parallel.names(), parallel.averaging_buckets(reduction.bucket_bytes),
                 reduction.overlap && parallel.dp_size() > 1) {}

  void zero_grad() override {
    if (!parallel_.zero_bucket_gradients()) local_.zero_grad();
  }
  void before_last_backward() override { reducer_.arm(); }
  torch::Tensor reduce_gradients() override { return reducer_.finish([this] { parallel_.sum_tied_gradients(); }); }
  std::pair<int, int> overlapped_buckets() const override {
    return {reducer_.launched_during_backward(), reducer_.bucket_count()};
  }
  // After averaging, a stage's replicated gradients are equal on its dp ranks and an expert shard's on
  // its replicas: the first dp rank of each stage counts the replicated ones (a tied embedding's second
  // copy left out) and the first replica of each expert shard (edp rank 0) counts its experts.
  torch::Tensor norm_part() override {
    torch::NoGradGuard no_grad;
    const Layout& layout = parallel_.layout();
    const bool replicated_here = layout.dp_rank() == 0, experts_here = layout.edp->rank() == 0;
    std::vector<torch::Tensor> counted;
    for (size_t i = 0; i < parallel_.params().size(); ++i) {
      const auto& g = parallel_.params()[i].grad();
      if (!g.defined() || (layout.pp_size() > 1 && parallel_.duplicate()[i])) continue;
      if (parallel_.sharded()[i] ? experts_here : replicated_here) counted.push_back(g);
    }
    const auto device = parallel_.params().front().device();
    return counted.empty() ? torch::zeros({}, torch::TensorOptions().dtype(torch::kDouble).device(device))
                           : optim::sum_of_squares(counted).to(torch::kDouble);
  }
  void scale_gradients(double factor) override {
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> grads;
    for (const auto& p : parallel_.params())
      if (p.grad().defined()) grads.push_back(p.grad());
    if (!grads.empty()) at::_foreach_mul_(grads, factor);
  }
  void step(double lr) override { local_.step(lr); }
  int64_t step_count() const override { return local_.step_count(); }
  optim::OptimizerState checkpoint_state() override { return local_.state(); }
  void load_state(const std::function<void(optim::OptimizerState&)>& read) override { read(local_.state()); }
  std::vector<torch::Tensor> state_tensors() const override {
    std::vector<torch::Tensor> out;
    for (const auto& s : local_.states())
      for (const auto& t : {s.exp_avg, s.exp_avg_sq, s.momentum})
        if (t.defined()) out.push_back(t);
    return out;
  }

 private:
  DataParallel& parallel_;
  Local local_;
  GradientReducer reducer_;
};

// ---- zero 1: each replica updates its share ------------------------------------------------------

// The parameters sharded over one group of replicas. They are laid end to end in buckets of at most
// parallel.grad_bucket_mb of fp32 elements; each bucket is padded to a multiple of the group size n and split
// into n equal shares, rank i holding share i (Megatron-Core shards each bucket the same way, so
// that a bucket's reduce-scatter is one collective of bounded size). This rank's shares of all
// buckets lie end to end in its shard tensors (gradient, moments). Each bucket owns two persistent
// buffers, made once: its gradients (every member's .grad a view of it, so that backward accumulates
// in place and the reduce-scatter reads it as it is) and, from the first step, its weights (every
// member's data a view of it, so that the all-gather writes the parameters in place).
struct ShardGroup {
  struct Segment {  // where a parameter's elements meet this rank's share of a bucket
    size_t param;         // index into the optimizer's parameters
    int64_t param_begin;  // first element in the flattened parameter
    int64_t shard_begin;  // first element in this rank's shard tensors
    int64_t length;
  };
  struct Bucket {
    std::vector<size_t> members;   // parameters, in order
    std::vector<int64_t> offsets;  // their first element in the bucket
    int64_t padded = 0;            // the bucket's length, a multiple of n
    int64_t share = 0;             // padded / n
    int64_t shard_begin = 0;       // where this rank's share starts in the shard tensors
    std::vector<Segment> segments;
    torch::Tensor grad_flat;                // (padded) fp32: the members' gradients end to end
    std::vector<torch::Tensor> grad_views;  // each member's slice of it, shaped like the member
    torch::Tensor param_flat;               // (padded) in the held dtype: the members' weights end to end
    std::vector<torch::Tensor> param_views;
  };
  Communicator* comm = nullptr;  // the replicas; its rank 0 writes these moments into checkpoints
  bool in_norm = true;           // false: a tied embedding's second copy, counted on the first stage
  // The parameters are held in the compute dtype (their gradients in fp32) and `master` is this rank's
  // shares of their fp32 weights.
  bool masters = false;
  // optim.name muon's hidden matrices (Moonlight's distributed Muon): each member lies whole in one
  // owner rank's share, the members of a bucket given out largest first to the least loaded rank, and
  // a share is the largest owner's load (the rest padding). The reduce-scatter hands each owner the
  // fully reduced gradient of its matrices, which it orthogonalises with the momentum it alone keeps
  // (in exp_avg; no exp_avg_sq), and the all-gather brings the updated matrices to the other replicas.
  bool owned = false;
  std::vector<Bucket> buckets;
  int64_t shard_numel = 0;
  torch::Tensor grad, exp_avg, exp_avg_sq, master;  // (shard_numel) this rank's shares, fp32
};

class ShardedOptimizer final : public Optimizer {
 public:
  ShardedOptimizer(DataParallel& parallel, const std::vector<model::RoledParam>& params, const config::OptimConfig& cfg,
               const ReductionSettings& reduction, std::optional<torch::ScalarType> compute_dtype)
      : parallel_(parallel),
        cfg_(cfg),
        bucket_elements_(std::max<int64_t>(1, reduction.bucket_bytes / 4)),
        compute_dtype_(compute_dtype.value_or(torch::kFloat)) {
    for (const auto& p : params) {
      params_.push_back(p.tensor);
      names_.push_back(p.name);
      decay_.push_back(!model::is_no_decay(p.name));
      muon_.push_back(cfg.name == "muon" && p.hidden_matrix);
      columns_.emplace_back(p.column_heads, p.column_widths);
    }
    // Under a narrower compute dtype, the weights every use casts to it are held in that dtype, their
    // fp32 masters sharded here; the rest (norms, routers, the embedding: read in fp32) stay fp32.
    const bool narrow = compute_dtype_ != torch::kFloat && params_.front().scalar_type() == torch::kFloat;
    const Layout& layout = parallel.layout();
    std::vector<size_t> replicated, experts, duplicates, replicated_masters, expert_masters;
    std::vector<size_t> replicated_matrices, expert_matrices, replicated_matrix_masters, expert_matrix_masters;
    for (size_t i = 0; i < params_.size(); ++i) {
      const bool master = narrow && params[i].compute_dtype_only;
      if (parallel.duplicate()[i])
        duplicates.push_back(i);
      else if (parallel.sharded()[i] && muon_[i])
        (master ? expert_matrix_masters : expert_matrices).push_back(i);
      else if (parallel.sharded()[i])
        (master ? expert_masters : experts).push_back(i);
      else if (muon_[i])
        (master ? replicated_matrix_masters : replicated_matrices).push_back(i);
      else
        (master ? replicated_masters : replicated).push_back(i);
    }
    Communicator& replicas = *gradient_group(layout, /*experts=*/false);
    Communicator& expert_replicas = *gradient_group(layout, /*experts=*/true);
    add_group(replicated, replicas);
    add_group(replicated_masters, replicas, /*in_norm=*/true, /*masters=*/true);
    add_group(experts, expert_replicas);
    add_group(expert_masters, expert_replicas, /*in_norm=*/true, /*masters=*/true);
    add_group(duplicates, replicas, /*in_norm=*/false);
    add_group(replicated_matrices, replicas, true, false, /*owned=*/true);
    add_group(replicated_matrix_masters, replicas, true, /*masters=*/true, /*owned=*/true);
    add_group(expert_matrices, expert_replicas, true, false, /*owned=*/true);
    add_group(expert_matrix_masters, expert_replicas, true, /*masters=*/true, /*owned=*/true);
    std::vector<GradientReducer::Bucket> buckets;
    for (size_t gi = 0; gi < groups_.size(); ++gi)
      for (size_t bi = 0; bi < groups_[gi].buckets.size(); ++bi) {
        GradientReducer::Bucket b;
        b.members = groups_[gi].buckets[bi].members;
        for (const size_t m : b.members) b.after_backward = b.after_backward || parallel.tied()[m];
        b.launch = [this, gi, bi] { return launch_bucket(groups_[gi], groups_[gi].buckets[bi]); };
        b.complete = [this, gi, bi] { complete_bucket(groups_[gi], groups_[gi].buckets[bi]); };
        buckets.push_back(std::move(b));
      }
    reducer_ = std::make_unique<GradientReducer>(params_, names_, std::move(buckets), reduction.overlap);
  }

  void zero_grad() override {
    take_buffers();
    for (auto& g : groups_)
      for (auto& b : g.buckets) {
        b.grad_flat.zero_();
        attach_grads(b, /*copy_stray=*/false);
      }
  }

  void before_last_backward() override { reducer_->arm(); }
  torch::Tensor reduce_gradients() override { return reducer_->finish([this] { parallel_.sum_tied_gradients(); }); }
  std::pair<int, int> overlapped_buckets() const override {
    return {reducer_->launched_during_backward(), reducer_->bucket_count()};
  }

  // Every element of the job's gradient lies in exactly one rank's share (experts: one ep rank's
  // experts, one replica's share of them; a pipeline stage's parameters on that stage; a tied
  // embedding's second copy left out), so the squared norm is one sum over the world.
  torch::Tensor norm_part() override {
    torch::NoGradGuard no_grad;
    auto squares = torch::zeros({}, fp32());
    for (const auto& g : groups_)
      if (g.shard_numel > 0 && g.in_norm) squares += g.grad.pow(2).sum();
    return squares.to(torch::kDouble);
  }
  void scale_gradients(double factor) override {
    torch::NoGradGuard no_grad;
    for (auto& g : groups_)
      if (g.grad.defined()) g.grad.mul_(factor);
  }

  // AdamW on this rank's shares (the same element-wise update as zero 0, so each element moves as it
  // would there given the same gradient; on CUDA LibTorch's fused kernel over the bucket's segments,
  // as zero 0 uses it there), in place in the bucket's weight buffer, then every bucket's all-gather
  // fills the rest of its buffer in place: all launched, then waited on once. With masters, the update
  // runs on them and the weights travel in the compute dtype: each parameter becomes its master
  // rounded once, as zero 0's kept copy of it is.
  void step(double lr) override {
    torch::NoGradGuard no_grad;
    ++step_count_;
    const bool fused = params_.front().is_cuda();
    std::vector<std::unique_ptr<Pending>> gathers;
    for (auto& g : groups_) {
      for (auto& b : g.buckets) {
        rebind_params(b);
        auto mine = b.param_flat.narrow(0, g.comm->rank() * b.share, b.share);
        auto weights = g.masters ? g.master.narrow(0, b.shard_begin, b.share) : mine;
        if (g.owned) {  // the matrices this rank owns, each whole
          for (const auto& s : b.segments) {
            const auto shape = params_[s.param].sizes();
            optim::muon_update(weights.narrow(0, s.shard_begin - b.shard_begin, s.length).view(shape),
                               g.grad.narrow(0, s.shard_begin, s.length).view(shape),
                               g.exp_avg.narrow(0, s.shard_begin, s.length).view(shape), cfg_, lr, decay_[s.param],
                               columns_[s.param].first, columns_[s.param].second);
          }
          if (g.masters) mine.copy_(weights);
          if (g.comm->world_size() > 1) gathers.push_back(g.comm->all_gather_async(mine, b.param_flat));
          continue;
        }
        std::vector<torch::Tensor> w, grads, m, v;
        std::vector<bool> decay;
        for (const auto& s : b.segments) {
          w.push_back(weights.narrow(0, s.shard_begin - b.shard_begin, s.length));
          grads.push_back(g.grad.narrow(0, s.shard_begin, s.length));
          m.push_back(g.exp_avg.narrow(0, s.shard_begin, s.length));
          v.push_back(g.exp_avg_sq.narrow(0, s.shard_begin, s.length));
          decay.push_back(decay_[s.param]);
        }
        optim::adamw_step(w, grads, m, v, decay, cfg_, lr, step_count_, fused);
        if (g.masters) mine.copy_(weights);
        if (g.comm->world_size() > 1) gathers.push_back(g.comm->all_gather_async(mine, b.param_flat));
      }
    }
    for (auto& pending : gathers) pending->wait();
    // The parameters were written through their buffers, not through themselves: their version counters
    // move as a direct write's would (the compute-dtype copies of common/tensor.h check them).
    for (auto& p : params_) torch::autograd::impl::bump_version(p);
  }

  int64_t step_count() const override { return step_count_; }

  std::string sharding_summary() const override {
    int64_t weights = 0, elements = 0, kept = 0;
    for (const auto& g : groups_) {
      if (!g.masters || !g.master.defined()) continue;
      for (const auto& b : g.buckets) {
        weights += int64_t(b.members.size());
        for (const size_t m : b.members) elements += params_[m].numel();
        for (const auto& s : b.segments) kept += s.length;
      }
    }
    if (weights == 0) return {};
    return "[dist] ZeRO-1 sharded masters: " + std::to_string(weights) + " weights held in " +
           std::string(c10::toString(compute_dtype_)) + ", this rank keeps " + std::to_string(kept) + " of their " +
           std::to_string(elements) + " fp32 master elements";
  }

  optim::OptimizerState checkpoint_state() override {
    torch::NoGradGuard no_grad;
    optim::OptimizerState state;
    state.step_count = step_count_;
    state.optimizer = cfg_.name;
    for (size_t i = 0; i < params_.size(); ++i) {
      state.states.push_back({names_[i], params_[i], {}, {}, decay_[i], {}});
      state.states.back().muon = muon_[i];
    }
    for (auto& g : groups_) {
      const bool writes = g.comm->rank() == 0;  // ckpt: a stage's dp rank 0, or an expert shard's first replica
      for (const auto& b : g.buckets) {
        for (const int which : {0, 1, 2}) {  // exp_avg (an owned group's momentum), exp_avg_sq, the master weights
          if (which == 2 && !(g.masters && g.master.defined())) continue;
          if (which == 1 && g.owned) continue;
          const auto& shards = which == 0 ? g.exp_avg : which == 1 ? g.exp_avg_sq : g.master;
          auto mine = shards.narrow(0, b.shard_begin, b.share).contiguous();
          auto whole = g.comm->world_size() > 1 ? g.comm->all_gather(mine) : mine;
          if (!writes) continue;
          whole = whole.to(torch::kCPU);
          for (size_t k = 0; k < b.members.size(); ++k) {
            const auto& p = params_[b.members[k]];
            auto& s = state.states[b.members[k]];
            (which == 0 ? (g.owned ? s.momentum : s.exp_avg) : which == 1 ? s.exp_avg_sq : s.master) =
                whole.narrow(0, b.offsets[k], p.numel()).view(p.sizes()).clone();
          }
        }
      }
    }
    return state;
  }

  // Before the first step only: the checkpoint's weights went into the parameters, still fp32 then.
  void load_state(const std::function<void(optim::OptimizerState&)>& read) override {
    if (buffers_taken_)
      throw Error("[dist] internal: ZeRO-1 optimizer state loaded after training began (the master weights are taken)");
    torch::NoGradGuard no_grad;
    optim::OptimizerState whole;
    whole.optimizer = cfg_.name;
    const auto cpu = torch::TensorOptions().dtype(torch::kFloat);
    for (size_t i = 0; i < params_.size(); ++i) {
      if (muon_[i]) {
        whole.states.push_back({names_[i], params_[i], {}, {}, decay_[i], {}});
        whole.states.back().muon = true;
        whole.states.back().momentum = torch::zeros(params_[i].sizes(), cpu);
        continue;
      }
      whole.states.push_back({names_[i], params_[i], torch::zeros(params_[i].sizes(), cpu),
                              torch::zeros(params_[i].sizes(), cpu), decay_[i], {}});
    }
    whole.step_count = step_count_;
    read(whole);
    step_count_ = whole.step_count;
    for (auto& g : groups_)
      for (const auto& b : g.buckets)
        for (const auto& s : b.segments) {
          const auto& ps = whole.states[s.param];
          if (g.owned) {
            g.exp_avg.narrow(0, s.shard_begin, s.length).copy_(ps.momentum.reshape(-1).narrow(0, s.param_begin, s.length));
            continue;
          }
          g.exp_avg.narrow(0, s.shard_begin, s.length).copy_(ps.exp_avg.reshape(-1).narrow(0, s.param_begin, s.length));
          g.exp_avg_sq.narrow(0, s.shard_begin, s.length)
              .copy_(ps.exp_avg_sq.reshape(-1).narrow(0, s.param_begin, s.length));
        }
  }

  std::vector<torch::Tensor> state_tensors() const override {
    std::vector<torch::Tensor> out;
    for (const auto& g : groups_)
      for (const auto& t : {g.exp_avg, g.exp_avg_sq, g.master})
        if (t.defined()) out.push_back(t);
    return out;
  }

 private:
  torch::TensorOptions fp32() const { return params_.front().options().dtype(torch::kFloat); }

  // Each bucket's gradients are summed over the group by one reduce-scatter of its gradient buffer,
  // straight into this rank's share of the shard tensor, and scaled by 1/dp size, exactly as zero 0
  // averages them (the store backend sums in rank order either way, so each share equals that slice of
  // zero 0's gradient bit for bit).
  std::unique_ptr<Pending> launch_bucket(ShardGroup& g, ShardGroup::Bucket& b) {
    attach_grads(b, /*copy_stray=*/true);
    auto share = g.grad.narrow(0, b.shard_begin, b.share);
    if (g.comm->world_size() == 1) {
      share.copy_(b.grad_flat);
      return nullptr;
    }
    return g.comm->reduce_scatter_sum_async(b.grad_flat, share);
  }

  void complete_bucket(ShardGroup& g, ShardGroup::Bucket& b) {
    g.grad.narrow(0, b.shard_begin, b.share).mul_(1.0 / parallel_.dp_size());
  }

  // Points every member's .grad at its slice of the bucket's buffer; a gradient autograd put elsewhere
  // (none was defined when backward reached it) is copied in first.
  void attach_grads(ShardGroup::Bucket& b, bool copy_stray) {
    for (size_t k = 0; k < b.members.size(); ++k) {
      auto& p = params_[b.members[k]];
      const auto& view = b.grad_views[k];
      if (p.grad().defined() && p.grad().data_ptr() == view.data_ptr()) continue;
      if (copy_stray) {
        if (p.grad().defined())
          view.copy_(p.grad());
        else
          view.zero_();
      }
      p.mutable_grad() = view;
    }
  }

  // A parameter whose data was replaced since the buffers were made goes back into its slice.
  void rebind_params(ShardGroup::Bucket& b) {
    for (size_t k = 0; k < b.members.size(); ++k) {
      auto& p = params_[b.members[k]];
      const auto& view = b.param_views[k];
      if (p.data_ptr() == view.data_ptr()) continue;
      view.copy_(p.detach());
      p.set_data(view);
    }
  }

  // At the first step, after any checkpoint has been loaded into the (still fp32) parameters: each
  // bucket's weights move into its buffer, the parameters becoming views of it. The master groups keep
  // this rank's shares of the weights in fp32, and their parameters (and buffers) become compute-dtype.
  void take_buffers() {
    if (buffers_taken_) return;
    buffers_taken_ = true;
    torch::NoGradGuard no_grad;
    for (auto& g : groups_) {
      if (g.masters) g.master = torch::zeros({g.shard_numel}, fp32());
      for (auto& b : g.buckets) {
        if (g.masters)
          for (const auto& s : b.segments)
            g.master.narrow(0, s.shard_begin, s.length)
                .copy_(params_[s.param].detach().reshape(-1).narrow(0, s.param_begin, s.length));
        const auto held = g.masters ? compute_dtype_ : params_[b.members.front()].scalar_type();
        b.param_flat = torch::zeros({b.padded}, params_.front().options().dtype(held));
        for (size_t k = 0; k < b.members.size(); ++k) {
          auto& p = params_[b.members[k]];
          auto view = b.param_flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
          view.copy_(p.detach());
          if (g.masters) {
            forget_cached_casts(p);
            p.mutable_grad() = torch::Tensor();
          }
          p.set_data(view);
          // Autograd turns each use's gradient to fp32 before summing the uses (as zero 0's cast does) and
          // accumulates the micro-batches into the fp32 gradient buffer, which the reduce-scatter reads.
          if (g.masters) p.set_grad_dtype(torch::kFloat);
          b.param_views.push_back(view);
        }
      }
    }
  }

  void add_group(const std::vector<size_t>& members, Communicator& comm, bool in_norm = true, bool masters = false,
                 bool owned = false) {
    if (members.empty()) return;
    ShardGroup g;
    g.comm = &comm;
    g.in_norm = in_norm;
    g.masters = masters;
    g.owned = owned;
    const int64_t n = comm.world_size(), rank = comm.rank();
    std::vector<int64_t> group_load(n, 0);  // elements owned so far over the group's buckets
    auto close = [&](ShardGroup::Bucket& b, int64_t length) {
      if (owned) {
        // Largest first, each to the rank with the least of this bucket (then of the group): the same on
        // every replica, as it depends on the sizes alone.
        std::vector<size_t> order(b.members.size());
        for (size_t k = 0; k < order.size(); ++k) order[k] = k;
        std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) {
          return params_[b.members[x]].numel() > params_[b.members[y]].numel();
        });
        std::vector<int64_t> load(n, 0), owner(b.members.size(), 0);
        for (const size_t k : order) {
          int64_t best = 0;
          for (int64_t r = 1; r < n; ++r)
            if (load[r] < load[best] || (load[r] == load[best] && group_load[r] < group_load[best])) best = r;
          owner[k] = best;
          load[best] += params_[b.members[k]].numel();
          group_load[best] += params_[b.members[k]].numel();
        }
        b.share = std::max<int64_t>(1, *std::max_element(load.begin(), load.end()));
        b.padded = b.share * n;
        std::vector<int64_t> filled(n, 0);
        for (size_t k = 0; k < b.members.size(); ++k) {
          b.offsets[k] = owner[k] * b.share + filled[owner[k]];
          filled[owner[k]] += params_[b.members[k]].numel();
        }
      } else {
        b.padded = (length + n - 1) / n * n;
        b.share = b.padded / n;
      }
      b.shard_begin = g.shard_numel;
      const int64_t lo = rank * b.share, hi = lo + b.share;
      for (size_t k = 0; k < b.members.size(); ++k) {
        const int64_t begin = std::max(lo, b.offsets[k]);
        const int64_t end = std::min(hi, b.offsets[k] + params_[b.members[k]].numel());
        if (begin < end)
          b.segments.push_back({b.members[k], begin - b.offsets[k], b.shard_begin + begin - lo, end - begin});
      }
      g.shard_numel += b.share;
      g.buckets.push_back(std::move(b));
    };
    ShardGroup::Bucket bucket;
    int64_t length = 0;
    for (const size_t i : members) {
      const int64_t numel = params_[i].numel();
      if (!bucket.members.empty() && length + numel > bucket_elements_) {
        close(bucket, length);
        bucket = {};
        length = 0;
      }
      bucket.members.push_back(i);
      bucket.offsets.push_back(length);
      length += numel;
    }
    close(bucket, length);
    for (auto& b : g.buckets) {
      b.grad_flat = torch::zeros({b.padded}, fp32());
      for (size_t k = 0; k < b.members.size(); ++k) {
        const auto& p = params_[b.members[k]];
        b.grad_views.push_back(b.grad_flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes()));
      }
    }
    g.grad = torch::zeros({g.shard_numel}, fp32());
    g.exp_avg = torch::zeros({g.shard_numel}, fp32());
    if (!owned) g.exp_avg_sq = torch::zeros({g.shard_numel}, fp32());
    groups_.push_back(std::move(g));
  }

  DataParallel& parallel_;
  config::OptimConfig cfg_;
  int64_t bucket_elements_;  // fp32 elements per bucket (parallel.grad_bucket_mb)
  std::unique_ptr<GradientReducer> reducer_;
  std::vector<torch::Tensor> params_;
  std::vector<std::string> names_;
  std::vector<bool> decay_;
  std::vector<bool> muon_;  // optim.name muon and a hidden matrix: in an owned group
  std::vector<std::pair<int64_t, std::vector<int64_t>>> columns_;  // model::RoledParam's column_heads, column_widths
  std::vector<ShardGroup> groups_;
  int64_t step_count_ = 0;
  torch::ScalarType compute_dtype_;
  bool buffers_taken_ = false;
};

}  // namespace

std::unique_ptr<Optimizer> make_optimizer(DataParallel& parallel, const std::vector<model::RoledParam>& params,
                                          const config::OptimConfig& cfg, const config::ParallelConfig& layout,
                                          std::optional<torch::ScalarType> compute_dtype) {
  const auto reduction = reduction_settings(layout);
  if (layout.zero == 1 && parallel.dp_size() > 1)
    return std::make_unique<ShardedOptimizer>(parallel, params, cfg, reduction, compute_dtype);
  if (cfg.name == "muon")
    return std::make_unique<Replicated<optim::Muon>>(parallel, optim::Muon(params, cfg, model::is_no_decay), reduction);
  return std::make_unique<Replicated<optim::AdamW>>(parallel, optim::AdamW(named(params), cfg, model::is_no_decay), reduction);
}

}  // namespace moetrain::dist
