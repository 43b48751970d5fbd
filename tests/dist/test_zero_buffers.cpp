// ZeRO-1's persistent bucket buffers and the communicators split for gradient traffic (issue 24, items 5
// and 7): the parameters and gradients stay views of one buffer per bucket from step to step, the
// updates equal zero 0's bit for bit, the default all_gather_async (in place or not) gathers in rank
// order, and the gradient groups are other objects than the layout's dp/ep/edp with the same ranks.
#include <catch2/catch.hpp>

#include "common/tensor.h"
#include "dist/communicator.h"
#include "dist/data_parallel.h"
#include "dist/optimizer.h"
#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;
using Catch::Matchers::Contains;

namespace {

// The gradient groups of `layout` against the groups they stand in for: distinct objects (so NCCL gives
// them communicators of their own), the same ranks in the same order.
void check_gradient_groups(const dist::Layout& layout) {
  CATCH_REQUIRE(layout.grad_dp);
  CATCH_REQUIRE(layout.grad_edp);
  for (const auto* group : {layout.grad_dp.get(), layout.grad_edp.get()}) {
    for (const auto& other : {layout.world, layout.dp, layout.ep, layout.edp, layout.pp, layout.tie})
      CATCH_CHECK(group != other.get());
  }
  CATCH_CHECK(layout.grad_dp.get() != layout.grad_edp.get());
  auto same_ranks = [](const dist::Communicator& a, const dist::Communicator& b) {
    CATCH_INFO(a.name() << " against " << b.name());
    CATCH_REQUIRE(a.world_size() == b.world_size());
    CATCH_CHECK(a.rank() == b.rank());
    for (int r = 0; r < a.world_size(); ++r) CATCH_CHECK(a.world_rank_of(r) == b.world_rank_of(r));
  };
  same_ranks(*layout.grad_dp, *layout.dp);
  same_ranks(*layout.grad_edp, *layout.edp);
  CATCH_CHECK(dist::gradient_group(layout, false) == layout.grad_dp.get());
  CATCH_CHECK(dist::gradient_group(layout, true) == layout.grad_edp.get());
}

// Three weights of one "model" and a loss whose gradient differs by rank: sum(cast(p) * data(rank)).
struct Toy {
  std::vector<torch::Tensor> params;
  std::vector<model::RoledParam> roled;
  explicit Toy(uint64_t seed) {
    torch::manual_seed(int64_t(seed));
    const std::vector<std::vector<int64_t>> shapes = {{5, 3}, {7}, {4, 4}, {9, 2}};
    for (size_t i = 0; i < shapes.size(); ++i) {
      params.push_back(torch::randn(shapes[i]).requires_grad_(true));
      roled.push_back({"layers.0.w" + std::to_string(i), params.back()});
    }
  }
  torch::Tensor loss(int rank, int step, model::ComputeDtype dtype) const {
    auto total = torch::zeros({});
    for (size_t i = 0; i < params.size(); ++i) {
      torch::manual_seed(1000 * step + 10 * rank + int64_t(i));
      const auto data = torch::randn(params[i].sizes());
      total = total + (cast(params[i], dtype).to(torch::kFloat) * data).pow(2).sum();
    }
    return total;
  }
};

const void* grad_ptr(const torch::Tensor& p) { return p.grad().defined() ? p.grad().data_ptr() : nullptr; }

}  // namespace

CATCH_TEST_CASE("Gradient buckets get communicators of their own, with dp's and edp's ranks (world 1)", "[dist]") {
  auto layout = dist::make_layout(dist::make_single(), 1);
  check_gradient_groups(layout);
  // A layout made by hand has none: the buckets use dp and edp themselves.
  dist::Layout by_hand;
  by_hand.world = dist::make_single();
  by_hand.edp = dist::make_single();
  CATCH_CHECK(dist::gradient_group(by_hand, false) == by_hand.world.get());
  CATCH_CHECK(dist::gradient_group(by_hand, true) == by_hand.edp.get());
}

// Run by the next case in 4 processes (hidden).
CATCH_TEST_CASE("dist worker: gradient groups and all_gather_async", "[.dist-worker-grad-groups]") {
  std::shared_ptr<dist::Communicator> world = store_world();
  const int W = world->world_size(), me = world->rank();
  CATCH_REQUIRE(W == 4);
  for (auto [ep, pp] : std::vector<std::pair<int, int>>{{1, 1}, {2, 1}, {4, 1}, {1, 2}, {2, 2}}) {
    CATCH_INFO("ep " << ep << " pp " << pp << " rank " << me);
    auto layout = dist::make_layout(world, ep, pp);
    check_gradient_groups(layout);
    // The same sums as the groups they stand in for.
    auto a = torch::tensor({double(me + 1)}), b = a.clone();
    layout.grad_edp->all_reduce_sum(a);
    layout.edp->all_reduce_sum(b);
    CATCH_CHECK(torch::equal(a, b));
  }
  // all_gather_async, the base class's: into a separate output and in place (`in` this rank's share of `out`).
  auto mine = torch::arange(3, torch::kFloat) + 10.0 * me;
  auto out = torch::full({3 * W}, -1.0f);
  world->all_gather_async(mine, out)->wait();
  auto in_place = torch::full({3 * W}, -1.0f);
  in_place.narrow(0, 3 * me, 3).copy_(mine);
  auto share = in_place.narrow(0, 3 * me, 3);
  world->all_gather_async(share, in_place)->wait();
  for (int r = 0; r < W; ++r) {
    CATCH_CHECK(torch::equal(out.narrow(0, 3 * r, 3), torch::arange(3, torch::kFloat) + 10.0 * r));
    CATCH_CHECK(torch::equal(in_place.narrow(0, 3 * r, 3), torch::arange(3, torch::kFloat) + 10.0 * r));
  }
  auto wrong = torch::zeros({3 * W + 1});
  CATCH_CHECK_THROWS_WITH(world->all_gather_async(mine, wrong), Contains("expected 4 x 3"));
}

CATCH_TEST_CASE("Gradient groups at world 4 (ep 1, 2, 4, and pp 2) and all_gather_async in place", "[dist]") {
  auto r = testing::run_command("OMP_NUM_THREADS=1 " +
                                launch(4, std::string(MOETRAIN_TESTS_BINARY) + " '[.dist-worker-grad-groups]'"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("[rank 3]") && Contains("All tests passed"));
}

// Run by the next case in 2 processes (hidden). zero 0 and zero 1 side by side on the same weights
// and losses, clipping off: every weight bit for bit (AdamW is element-wise and the store backend's
// reduce-scatter is the all-reduce's slice), in fp32 and with bf16-held weights (their fp32 masters
// sharded). At zero 1 each weight and gradient is a view of its bucket's buffer, the same memory at
// every step, members end to end.
CATCH_TEST_CASE("dist worker: ZeRO-1 bucket buffers", "[.dist-worker-zero-buffers]") {
  std::shared_ptr<dist::Communicator> world = store_world();
  const int me = world->rank();
  CATCH_REQUIRE(world->world_size() == 2);
  auto layout = std::make_shared<const dist::Layout>(dist::make_layout(world, 1));
  config::OptimConfig optim;
  optim.grad_clip = 0;
  optim.weight_decay = 0.1;
  for (const model::ComputeDtype dtype : {model::ComputeDtype{}, model::ComputeDtype{torch::kBFloat16}}) {
    for (const double bucket_mb : {32.0, 100.0 / double(1 << 20)}) {  // one bucket; 25 fp32 elements each
      for (const bool overlap : {false, true}) {
        CATCH_INFO((dtype ? "bf16" : "fp32") << ", bucket " << bucket_mb << " MiB, overlap " << overlap);
        Toy zero0(7), zero1(7);
        config::ParallelConfig parallel;
        parallel.grad_bucket_mb = bucket_mb;
        parallel.overlap_grad_reduce = overlap;
        dist::DataParallel dp0(layout, zero0.roled), dp1(layout, zero1.roled);
        parallel.zero = 0;
        auto opt0 = dist::make_optimizer(dp0, zero0.roled, optim, parallel, dtype);
        parallel.zero = 1;
        auto opt1 = dist::make_optimizer(dp1, zero1.roled, optim, parallel, dtype);
        std::vector<const void*> data, grads;
        for (int step = 1; step <= 4; ++step) {
          CATCH_INFO("step " << step);
          for (auto* pair : {&opt0, &opt1}) {
            auto& opt = **pair;
            const auto& toy = pair == &opt0 ? zero0 : zero1;
            opt.zero_grad();
            opt.before_last_backward();
            toy.loss(me, step, dtype).backward();
            opt.reduce_gradients();
            opt.norm_part();  // the step computes it (no clipping here)
            opt.step(1e-2);
          }
          for (size_t i = 0; i < zero0.params.size(); ++i) {
            const auto& p0 = zero0.params[i];
            const auto& p1 = zero1.params[i];
            CATCH_INFO("weight " << i);
            CATCH_CHECK(p1.scalar_type() == (dtype ? *dtype : torch::kFloat));
            CATCH_CHECK(torch::equal(p1, p0.detach().to(p1.scalar_type())));
          }
          std::vector<const void*> now_data, now_grads;
          for (const auto& p : zero1.params) now_data.push_back(p.data_ptr()), now_grads.push_back(grad_ptr(p));
          if (step > 1) {
            CATCH_CHECK(now_data == data);
            CATCH_CHECK(now_grads == grads);
          }
          data = now_data;
          grads = now_grads;
        }
        if (bucket_mb >= 1) {  // one bucket: the members end to end in both buffers
          for (size_t i = 0; i + 1 < zero1.params.size(); ++i) {
            const auto& p = zero1.params[i];
            const auto* next = static_cast<const char*>(p.data_ptr()) + p.nbytes();
            CATCH_CHECK(next == zero1.params[i + 1].data_ptr());
            const auto* next_grad = static_cast<const char*>(p.grad().data_ptr()) + p.grad().nbytes();
            CATCH_CHECK(next_grad == zero1.params[i + 1].grad().data_ptr());
          }
        }
        // The checkpoint is still layout-free: whole moments, zero 0's.
        auto state0 = opt0->checkpoint_state(), state1 = opt1->checkpoint_state();
        if (me == 0)
          for (size_t i = 0; i < state0.states.size(); ++i) {
            CATCH_CHECK(torch::equal(state1.states[i].exp_avg, state0.states[i].exp_avg));
            CATCH_CHECK(torch::equal(state1.states[i].exp_avg_sq, state0.states[i].exp_avg_sq));
          }
      }
    }
  }
}

CATCH_TEST_CASE("ZeRO-1 keeps weights and gradients in persistent bucket buffers and updates as zero 0, bit for bit",
                "[dist]") {
  auto r = testing::run_command("OMP_NUM_THREADS=1 " +
                                launch(2, std::string(MOETRAIN_TESTS_BINARY) + " '[.dist-worker-zero-buffers]'"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("[rank 1]") && Contains("All tests passed"));
}
