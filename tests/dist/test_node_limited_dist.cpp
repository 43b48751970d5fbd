// Expert parallelism sends one row per (token, destination rank), not per (token, expert), and
// node-limited routing (model.moe.router.max_groups_per_token) bounds the destinations: the layer's
// outputs and gradients (router weight included) against one process, the all-to-all bytes against
// their exact count, and training at ep 2 and ep 4 against one process routing with the same groups.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>

#include "dist/communicator.h"
#include "dist/expert_parallel.h"
#include "moe/moe.h"
#include "train/trainer.h"
#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;
using Catch::Matchers::Contains;

namespace {

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }

// One layout (ep ranks per group, world 4) and one routing limit: every rank's output, input gradient
// and router-weight gradient equal a whole layer's on the same tokens, and the bytes every rank sent
// by all-to-all equal the count of (token, other rank) rows and (token, expert) copies.
void check_layer(const std::shared_ptr<const dist::Layout>& layout, int max_groups, bool deterministic) {
  const int me = layout->world->rank(), ep = layout->ep_size();
  auto cfg = tiny_model_config().moe;
  cfg.n_experts = 8;
  const int64_t D = 16, T = 24, P = ep, EL = cfg.n_experts / P;
  cfg.top_k = int(max_groups > 0 ? std::min<int64_t>(4, max_groups * EL) : 4);  // what the groups can hold
  cfg.router.max_groups_per_token = max_groups;
  cfg.router.expert_groups = ep;
  torch::manual_seed(7);
  moe::MoE whole(cfg, D);  // the same weights on every rank
  moe::MoE part(cfg, D, dist::expert_shard(*layout));
  dist::parallelize(*part, layout);
  same_weights(*whole, *part);  // seeded above: the same on every rank
  CATCH_INFO("rank " << me << " ep " << ep << " max_groups_per_token " << max_groups
                     << (deterministic ? " deterministic" : ""));
  torch::manual_seed(100 + me);  // each rank its own tokens
  const auto x = torch::randn({T, D});
  const auto bytes_before = layout->ep->all_to_all_bytes_sent();
  auto run = [&](const moe::MoE& layer) {
    testing::DeterministicMode mode(deterministic && layer.get() == part.get());
    auto xi = x.clone().requires_grad_(true);
    for (auto& q : layer->parameters()) q.mutable_grad() = torch::Tensor();
    auto out = layer->forward(xi, T, std::nullopt);
    out.out_TD.pow(2).sum().backward();
    return std::make_tuple(out.out_TD.detach(), xi.grad().clone(), layer->router->weight.grad().clone(),
                           out.stats.tokens_per_expert_E);
  };
  const auto [want, want_grad, want_router, load] = run(whole);
  const auto [got, got_grad, got_router, got_load] = run(part);
  const double bytes = double(layout->ep->all_to_all_bytes_sent() - bytes_before);
  // fp32, the same products summed in another order (per rank, then over ranks): 1e-5 of the largest.
  CATCH_CHECK(max_abs(got - want) <= 1e-5 * max_abs(want));
  CATCH_CHECK(max_abs(got_grad - want_grad) <= 1e-5 * max_abs(want_grad));
  CATCH_CHECK(max_abs(got_router - want_router) <= 1e-5 * max_abs(want_router));

  // The count: this rank's rows (distinct (token, other rank)) and copies to other ranks, from the plan.
  const auto ids = whole->router->route(x, T).topk_ids_TK.contiguous();
  int64_t rows = 0, copies = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::set<int64_t> ranks, others;
    for (int64_t k = 0; k < cfg.top_k; ++k) {
      const int64_t rank = ids[t][k].item<int64_t>() / EL;
      ranks.insert(rank);
      if (rank != layout->ep_rank()) others.insert(rank), ++copies;
    }
    rows += int64_t(others.size());
    if (max_groups > 0) CATCH_CHECK(int(ranks.size()) <= max_groups);
  }
  // Summed over the group, what a rank receives another sent: rows cross four times (rows out and
  // back, forward and backward) at D fp32; a copy's row index (int64) once and its weight (fp32) twice;
  // the sizes, EL + 1 int64 to each peer.
  const double group_rows = dist::all_sum(*layout->ep, double(rows));
  const double group_copies = dist::all_sum(*layout->ep, double(copies));
  const double want_bytes = 4 * group_rows * D * 4 + group_copies * (8 + 4 + 4) + double(P * (P - 1) * (EL + 1) * 8);
  CATCH_CHECK(dist::all_sum(*layout->ep, bytes) == want_bytes);
  // The per-copy exchange it replaces moved every copy's row four times.
  CATCH_CHECK(group_rows < group_copies);
  if (me == 0)  // the per-copy exchange: every copy's row four times, E / P int64 counts to each peer
    std::printf("ep %d, max_groups_per_token %d: %.0f rows for %.0f copies sent; %.0f bytes, per copy it was %.0f\n", ep,
                max_groups, group_rows, group_copies, want_bytes, 4 * group_copies * D * 4 + double(P * (P - 1) * EL * 8));
}

}  // namespace

CATCH_TEST_CASE("dist worker: one row per (token, rank)", "[.dist-worker-dedup]") {
  std::shared_ptr<dist::Communicator> world = store_world();
  CATCH_REQUIRE(world->world_size() == 4);
  for (int ep : {4, 2}) {  // one layout each: its groups are made once
    auto layout = std::make_shared<const dist::Layout>(dist::make_layout(world, ep));
    for (int max_groups : {0, 1, 2}) check_layer(layout, max_groups, false);
    check_layer(layout, 0, true);  // the sums free of atomic adds give the same
  }
}

CATCH_TEST_CASE("Expert parallel sends one row per (token, rank) both ways, with exact outputs and gradients",
                "[dist]") {
  auto r = testing::run_command("OMP_NUM_THREADS=1 " +
                                launch(4, std::string(MOETRAIN_TESTS_BINARY) + " '[.dist-worker-dedup]'"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("[rank 3]") && Contains("All tests passed"));
}

namespace {

// One process training with the routing groups an EP run derives: the model takes them from the
// config (model.moe.router.expert_groups), not from its ranks.
Run train_one_process(config::Config cfg, int expert_groups) {
  cfg.train.micro_batch_size = 4;
  cfg.parallel.expert_parallel = 1;
  cfg.model.moe.router.expert_groups = expert_groups;
  files::make_directories(cfg.run.out_dir);
  train::train(cfg, {});
  Run run;
  run.exit_code = 0;
  run.run_dir = cfg.run.out_dir;
  run.losses = metrics_losses(cfg.run.out_dir);
  return run;
}

}  // namespace

// Tolerances as in test_dist.cpp's layout tests: 1e-5 relative on losses and weights, 1e-4 on Adam's moments.
CATCH_TEST_CASE("Node-limited training at ep 2, ep 4 and ep 4 in nodes of 2 equals one process", "[dist][train]") {
  testing::TempDir dir("node-limited");
  const auto data_dir = testing::make_corpus(dir);
  auto limited = [&](const std::string& name, int max_groups) {
    auto cfg = equivalence_config(data_dir, dir.str(name));
    cfg.model.moe.router.max_groups_per_token = max_groups;
    return cfg;
  };
  const auto free_routing = train_one_process(limited("free", 0), 0);
  const auto one_in_2 = train_one_process(limited("one-in-2", 1), 2);
  const auto one_in_4 = train_one_process(limited("one-in-4", 1), 4);
  CATCH_REQUIRE(one_in_2.losses.size() == 20);
  CATCH_CHECK(one_in_2.losses.back() < one_in_2.losses.front());
  // The limit changes the routing, hence the run.
  double change = 0;
  for (size_t i = 0; i < free_routing.losses.size(); ++i)
    change = std::max(change, std::abs(free_routing.losses[i] - one_in_2.losses[i]));
  CATCH_CHECK(change > 1e-4);

  check_same_run(train_at(limited("w2ep2", 1), 2, 2), one_in_2, "world 2, ep 2, one group of 2");
  check_same_run(train_at(limited("w4ep4", 1), 4, 4), one_in_4, "world 4, ep 4, one group of 4");
  auto nodes = limited("w4ep4nodes", 1);
  nodes.parallel.ranks_per_node = 2;
  check_same_run(train_at(nodes, 4, 4), one_in_2, "world 4, ep 4, nodes of 2 ranks, one node of 2");
}
