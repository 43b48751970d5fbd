// optim.name muon across ranks: data parallel, expert parallel (each rank's experts orthogonalised where
// they live), ZeRO-1 (each matrix by its owner replica) and pipeline stages (each its own) against one
// process; a ZeRO-1 checkpoint resumes at zero 0 on another layout.
#include <catch2/catch.hpp>

#include "ckpt/checkpoint.h"
#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;

// Tolerances as for AdamW's layouts (test_dist.cpp): fp32, the same math in another order, so 1e-5
// relative on every loss and weight tensor, 1e-4 on the optimizer state (momenta and moments).
CATCH_TEST_CASE("Muon at (world, ep) = (2,1), (4,2) at zero 0 and 1, and with 2 pipeline stages (pp 2, and pp 2 with "
                "ep 2) equals one process",
                "[dist][train][optim]") {
  testing::TempDir dir("muon-dist");
  const auto data_dir = testing::make_corpus(dir);
  auto muon = [&](const std::string& name) {
    auto cfg = equivalence_config(data_dir, dir.str(name));
    cfg.optim.name = "muon";
    cfg.optim.lr = 1e-2;
    return cfg;
  };
  const auto one = train_at(muon("w1"), 1, 1);
  CATCH_INFO(one.output.substr(one.output.size() > 2000 ? one.output.size() - 2000 : 0));
  CATCH_REQUIRE(one.exit_code == 0);
  CATCH_REQUIRE(one.losses.size() == 20);
  CATCH_CHECK(one.losses.back() < one.losses.front());
  for (const int zero : {0, 1})
    for (auto [world, ep] : std::vector<std::pair<int, int>>{{2, 1}, {4, 2}}) {
      const std::string name = "w" + std::to_string(world) + "ep" + std::to_string(ep) + "zero" + std::to_string(zero);
      auto cfg = muon(name);
      cfg.parallel.zero = zero;
      check_same_run(train_at(cfg, world, ep), one, name);
    }

  // Pipeline: 4 blocks (the first dense) over 2 stages, the head untied.
  auto staged = [&](const std::string& name, int pp) {
    auto cfg = muon(name);
    cfg.model.n_layers = 4;
    cfg.model.dense_layers = 1;
    cfg.train.grad_accum = 4;
    cfg.train.steps = 12;
    cfg.optim.decay_steps = 12;
    cfg.parallel.pipeline_parallel = pp;
    return cfg;
  };
  const auto one_staged = train_at(staged("pp1", 1), 1, 1);
  CATCH_REQUIRE(one_staged.exit_code == 0);
  CATCH_REQUIRE(one_staged.losses.size() == 12);
  for (auto [world, ep] : std::vector<std::pair<int, int>>{{2, 1}, {4, 2}}) {
    const std::string name = "pp2w" + std::to_string(world) + "ep" + std::to_string(ep);
    const auto got = train_at(staged(name, 2), world, ep);
    CATCH_CHECK_THAT(got.output, Catch::Matchers::Contains("pipeline 2 stages"));
    check_same_run(got, one_staged, name, "step_00000012");
  }
}

// The checkpoint is layout-free: (world 4, ep 2, zero 1) writes each matrix's whole momentum, which a run
// at (world 2, ep 1, zero 0) continues as if it had run there from the start.
CATCH_TEST_CASE("A Muon ZeRO-1 checkpoint at (4, 2) resumes at (2, 1) zero 0 as a straight run there", "[dist][ckpt][optim]") {
  testing::TempDir dir("muon-dist-ckpt");
  const auto data_dir = testing::make_corpus(dir);
  auto config_of = [&](const std::string& name, int zero, int steps) {
    auto cfg = equivalence_config(data_dir, dir.str(name));
    cfg.optim.name = "muon";
    cfg.optim.lr = 1e-2;
    cfg.optim.decay_steps = 20;
    cfg.parallel.zero = zero;
    cfg.train.steps = steps;
    return cfg;
  };
  const auto saved = train_at(config_of("w4ep2-zero1", 1, 10), 4, 2);
  CATCH_INFO(saved.output.substr(saved.output.size() > 3000 ? saved.output.size() - 3000 : 0));
  CATCH_REQUIRE(saved.exit_code == 0);
  CATCH_CHECK(ckpt::read_manifest(files::join(saved.run_dir, "ckpt/step_00000010")).optimizer == "muon");
  const auto straight = train_at(config_of("w2ep1-straight", 0, 20), 2, 1);
  CATCH_REQUIRE(straight.exit_code == 0);
  resume_copy(dir.str("w4ep2-zero1"), config_of("w2ep1-resumed", 0, 20), 2, 1, "step_00000010");
  check_resumed_losses(dir.str("w2ep1-resumed"), straight, 10);
}

// Under bf16, ZeRO-1's owner updates the fp32 master of its matrices and the all-gather carries bf16,
// as for AdamW (test_dist.cpp): zero 0 rounds the same master to the same bf16 weights and feeds the
// same fp32 gradient to the same Newton-Schulz, so with clipping off (its scale's last bit depends on
// the norm's summation order) the two runs agree to the last bit.
CATCH_TEST_CASE("Muon with ZeRO-1 in bf16 (sharded fp32 masters) trains as zero 0 in bf16 to the last bit",
                "[dist][train][optim]") {
  testing::TempDir dir("muon-dist-bf16");
  const auto data_dir = testing::make_corpus(dir);
  auto config_of = [&](const std::string& name, int zero) {
    auto cfg = equivalence_config(data_dir, dir.str(name));
    cfg.optim.name = "muon";
    cfg.optim.lr = 1e-2;
    cfg.optim.grad_clip = 0;
    cfg.run.dtype = "bf16";
    cfg.parallel.zero = zero;
    cfg.train.steps = 10;
    return cfg;
  };
  const auto zero0 = train_at(config_of("zero0", 0), 2, 1);
  CATCH_REQUIRE(zero0.exit_code == 0);
  const auto zero1 = train_at(config_of("zero1", 1), 2, 1);
  CATCH_INFO(zero1.output.substr(zero1.output.size() > 3000 ? zero1.output.size() - 3000 : 0));
  CATCH_REQUIRE(zero1.exit_code == 0);
  CATCH_CHECK_THAT(zero1.output, Catch::Matchers::Contains("ZeRO-1 sharded masters"));
  CATCH_REQUIRE(zero1.losses.size() == zero0.losses.size());
  for (size_t i = 0; i < zero0.losses.size(); ++i) {
    CATCH_INFO("step " << i + 1 << ": " << zero1.losses[i] << " vs " << zero0.losses[i]);
    CATCH_CHECK(zero1.losses[i] == zero0.losses[i]);
  }
  CATCH_CHECK(max_relative_difference(zero1, zero0, "model", "step_00000010") == 0);
  CATCH_CHECK(max_relative_difference(zero1, zero0, "optim", "step_00000010") == 0);
}
