// Expert parallelism with gpt-oss's biases (model.moe.expert_bias, model.moe.router.logit_bias): the
// expert biases shard with their experts, and an ep 2 layer gives a whole layer's outputs and
// gradients (router weight and bias, each rank's slice of the expert biases) on the same tokens.
#include <catch2/catch.hpp>

#include "dist/communicator.h"
#include "dist/expert_parallel.h"
#include "moe/moe.h"
#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;
using Catch::Matchers::Contains;

namespace {
double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }
}  // namespace

CATCH_TEST_CASE("dist worker: expert biases at ep 2", "[.dist-worker-expert-bias]") {
  std::shared_ptr<dist::Communicator> world = store_world();
  CATCH_REQUIRE(world->world_size() == 2);
  auto layout = std::make_shared<const dist::Layout>(dist::make_layout(world, 2));
  auto cfg = tiny_model_config().moe;
  cfg.n_experts = 8;
  cfg.top_k = 3;
  cfg.n_shared_experts = 0;
  cfg.activation = "swiglu_clamped";
  cfg.expert_bias = true;
  cfg.router.logit_bias = true;
  const int64_t D = 16, T = 20;
  torch::manual_seed(7);
  moe::MoE whole(cfg, D);  // the same weights on every rank
  moe::MoE part(cfg, D, dist::expert_shard(*layout));
  dist::parallelize(*part, layout);
  same_weights(*whole, *part);
  CATCH_REQUIRE(part->experts->b1.size(0) == 4);  // this rank's 4 experts' biases
  CATCH_REQUIRE(part->experts->b2.size(0) == 4);
  const int me = world->rank();
  CATCH_INFO("rank " << me);
  torch::manual_seed(100 + me);  // each rank its own tokens
  const auto x = torch::randn({T, D});
  auto run = [&](const moe::MoE& layer) {
    auto xi = x.clone().requires_grad_(true);
    auto out = layer->forward(xi, T, std::nullopt);
    out.out_TD.pow(2).sum().backward();
    return std::make_pair(out.out_TD.detach(), xi.grad().clone());
  };
  const auto [want, want_grad] = run(whole);
  const auto [got, got_grad] = run(part);
  // fp32, the same products summed in another order: 1e-5 of the largest.
  CATCH_CHECK(max_abs(got - want) <= 1e-5 * max_abs(want));
  CATCH_CHECK(max_abs(got_grad - want_grad) <= 1e-5 * max_abs(want_grad));
  CATCH_CHECK(max_abs(part->router->bias.grad() - whole->router->bias.grad()) <= 1e-5 * max_abs(whole->router->bias.grad()));
  // An expert's bias gradient sums over the tokens of every rank that reached it: the whole layer on
  // this rank's tokens gives this rank's share, so the ranks' sums are compared.
  const int64_t first = part->expert_offset();
  for (const char* name : {"b1", "b3", "b2", "w2"}) {
    CATCH_INFO(name);
    auto mine = part->experts->named_parameters()[name].grad();
    auto reference = whole->experts->named_parameters()[name].grad().clone();
    world->all_reduce_sum(reference);
    const auto slice = reference.narrow(0, first, mine.size(0));
    CATCH_CHECK(max_abs(mine - slice) <= 1e-5 * std::max(1.0, max_abs(slice)));
  }
}

CATCH_TEST_CASE("Expert biases shard with their experts: ep 2 equals a whole layer, outputs and gradients",
                "[dist][expert_bias]") {
  auto r = testing::run_command("OMP_NUM_THREADS=1 " +
                                launch(2, std::string(MOETRAIN_TESTS_BINARY) + " '[.dist-worker-expert-bias]'"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("[rank 1]") && Contains("All tests passed"));
}
