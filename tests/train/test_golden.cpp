// The golden loss curve: a seeded tiny run must keep its losses through refactors. Regenerate
// tests/train/golden_losses.txt with MOETRAIN_UPDATE_GOLDEN=1 only when the math is meant to change,
// and say so in the commit.
#include <catch2/catch.hpp>

#include <cstdlib>
#include <sstream>

#include "train/trainer.h"
#include "train_fixture.h"

using namespace moetrain;

CATCH_TEST_CASE("A seeded tiny run keeps its golden loss curve", "[train]") {
  testing::TempDir dir("golden");
  auto cfg = testing::tiny_train_config(testing::make_corpus(dir), dir.str("run"));
  cfg.train.steps = 8;
  cfg.model.moe.router.score_func = "sigmoid";  // the routing features too: groups, bias, capacity
  cfg.model.moe.router.n_groups = 2;
  cfg.model.moe.router.topk_groups = 1;
  cfg.model.moe.router.bias_update_rate = 0.01;
  cfg.model.moe.capacity_factor = 1.0;
  cfg.model.moe.seq_aux_loss_coef = 0.01;
  cfg.model.moe.z_loss_coef = 0.001;
  const auto result = train::train(cfg, {});
  CATCH_REQUIRE(result.losses.size() == 8);

  const std::string path = std::string(MOETRAIN_SOURCE_DIR) + "/tests/train/golden_losses.txt";
  if (const char* update = std::getenv("MOETRAIN_UPDATE_GOLDEN"); update && std::string(update) == "1") {
    std::ostringstream out;
    out.precision(17);
    for (double loss : result.losses) out << loss << "\n";
    files::write_file_atomic(path, out.str());
    CATCH_WARN("golden losses rewritten: " << path);
    return;
  }
  std::istringstream in(files::read_file(path));
  std::vector<double> golden;
  for (double v; in >> v;) golden.push_back(v);
  CATCH_REQUIRE(golden.size() == result.losses.size());
  for (size_t i = 0; i < golden.size(); ++i) {
    CATCH_INFO("step " << i + 1);
    // Bitwise on the machine that wrote it; 1e-5 relative leaves room for another CPU's kernels
    // (summation order) while any change to the math moves these losses far more.
    CATCH_CHECK(result.losses[i] == Approx(golden[i]).epsilon(1e-5));
  }
}
