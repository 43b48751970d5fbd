// Multi-token prediction under the parallel layouts: expert parallelism (the MTP block's routed experts
// are sharded like any MoE layer's) and the pipeline (the modules live on the last stage, which needs
// the embedding: tied across the stages like a tied head). Each equals one process, with the
// tolerances of the other layout tests (test_dist.cpp, test_pipeline.cpp).
#include <catch2/catch.hpp>

#include <fstream>

#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;
using Catch::Matchers::Contains;

namespace {

// Each logged step's "mtp_loss" list.
std::vector<std::vector<double>> mtp_losses(const std::string& run_dir) {
  std::vector<std::vector<double>> out;
  std::ifstream metrics(files::join(run_dir, "metrics.jsonl"));
  std::string line;
  while (std::getline(metrics, line)) out.push_back(nlohmann::json::parse(line).at("mtp_loss").get<std::vector<double>>());
  return out;
}

void check_same_mtp(const Run& got, const Run& want) {
  const auto a = mtp_losses(got.run_dir), b = mtp_losses(want.run_dir);
  CATCH_REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CATCH_REQUIRE(a[i].size() == b[i].size());
    for (size_t k = 0; k < a[i].size(); ++k) CATCH_CHECK(std::abs(a[i][k] - b[i][k]) <= 1e-5 * b[i][k]);
  }
}

}  // namespace

CATCH_TEST_CASE("MTP training at (world 2, ep 2) equals one process", "[dist][train][mtp]") {
  testing::TempDir dir("mtp-ep");
  const auto data_dir = testing::make_corpus(dir);
  auto config_of = [&](const std::string& name) {
    auto cfg = equivalence_config(data_dir, dir.str(name));
    cfg.model.mtp_depth = 2;
    cfg.train.steps = 10;
    cfg.optim.decay_steps = 10;
    return cfg;
  };
  const auto one = train_at(config_of("w1"), 1, 1);
  CATCH_INFO(one.output);
  CATCH_REQUIRE(one.exit_code == 0);
  CATCH_REQUIRE(one.losses.size() == 10);
  const auto two = train_at(config_of("w2ep2"), 2, 2);
  CATCH_INFO(two.output);
  CATCH_REQUIRE(two.exit_code == 0);
  CATCH_REQUIRE(two.losses.size() == 10);
  for (size_t i = 0; i < one.losses.size(); ++i)
    CATCH_CHECK(std::abs(two.losses[i] - one.losses[i]) <= 1e-5 * std::abs(one.losses[i]));
  check_same_mtp(two, one);
  // The MTP block's experts are in the checkpoint by global id, whichever rank held them.
  CATCH_CHECK(checkpoint_tensors(two, "model", "step_00000010").count("mtp.1.block.moe.experts.w1[7]"));
  CATCH_CHECK(max_relative_difference(two, one, "model", "step_00000010") <= 1e-5);
  CATCH_CHECK(max_relative_difference(two, one, "optim", "step_00000010") <= 1e-4);
}

CATCH_TEST_CASE("MTP training at (pp 2), tied and untied, equals one process", "[dist][pipeline][train][mtp]") {
  testing::TempDir dir("mtp-pp");
  const auto data_dir = testing::make_corpus(dir);
  for (bool tie : {true, false}) {
    auto config_of = [&](const std::string& name, int pp) {
      auto cfg = equivalence_config(data_dir, dir.str(name));
      cfg.model.n_layers = 4;
      cfg.model.dense_layers = 1;
      cfg.model.tie_embeddings = tie;
      cfg.model.mtp_depth = 1;
      cfg.train.grad_accum = 4;
      cfg.train.steps = 8;
      cfg.optim.decay_steps = 8;
      cfg.parallel.pipeline_parallel = pp;
      return cfg;
    };
    const std::string tag = tie ? "tied" : "untied";
    CATCH_INFO(tag);
    const auto one = train_at(config_of(tag + "-pp1", 1), 1, 1);
    CATCH_REQUIRE(one.exit_code == 0);
    const auto got = train_at(config_of(tag + "-pp2", 2), 2, 1);
    CATCH_INFO(got.output.substr(got.output.size() > 3000 ? got.output.size() - 3000 : 0));
    CATCH_REQUIRE(got.exit_code == 0);
    CATCH_CHECK_THAT(got.output, Contains("pipeline 2 stages"));
    CATCH_REQUIRE(got.losses.size() == one.losses.size());
    for (size_t i = 0; i < one.losses.size(); ++i)
      CATCH_CHECK(std::abs(got.losses[i] - one.losses[i]) <= 1e-5 * std::abs(one.losses[i]));
    check_same_mtp(got, one);
    CATCH_CHECK(max_relative_difference(got, one, "model", "step_00000008") <= 1e-5);
    CATCH_CHECK(max_relative_difference(got, one, "optim", "step_00000008") <= 1e-4);
  }
}
