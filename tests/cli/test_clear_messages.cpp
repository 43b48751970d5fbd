// Failures that LibTorch would report in its own words are caught earlier and named: non-finite weights
// before generate samples from them, optimizer values that float32 cannot hold at config load.
#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>

#include "../test_util.h"
#include "ckpt/checkpoint.h"
#include "common/errors.h"
#include "model/transformer.h"
#include "train/generate.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {
const std::string kBinary = MOETRAIN_BINARY;
size_t lines(const std::string& s) { return size_t(std::count(s.begin(), s.end(), '\n')); }
}  // namespace

CATCH_TEST_CASE("generate on a checkpoint with NaN or inf weights names the tensor, not the sampler's complaint",
                "[cli]") {
  testing::TempDir dir("generate-nonfinite");
  config::Config cfg;
  cfg.model = testing::tiny_model_config();
  cfg.data.seq_len = 16;
  cfg.run.out_dir = dir.str("run");
  config::validate(cfg);
  model::Transformer model(cfg.model);
  model->init_weights(3);
  const std::string bad = "layers.1.moe.router.weight";
  {
    torch::NoGradGuard no_grad;
    auto params = model->named_parameters();
    CATCH_REQUIRE(params.contains(bad));
    params[bad].view({-1})[0] = std::numeric_limits<float>::quiet_NaN();
    params[bad].view({-1})[1] = std::numeric_limits<float>::infinity();
  }
  ckpt::save_weights_checkpoint(cfg.run.out_dir, *model, config::to_yaml(cfg), {});

  for (const std::string temperature : {"0.8", "0"}) {
    auto r = testing::run_command("OMP_NUM_THREADS=1 " + kBinary + " generate --checkpoint " + cfg.run.out_dir +
                                  " --prompt-ids 1,2,3 --print-ids --max-new-tokens 4 --temperature " + temperature);
    CATCH_INFO(r.output);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK(lines(r.output) == 1);
    CATCH_CHECK_THAT(r.output, Contains("holds non-finite weights: tensor '" + bad + "' has 1 NaN and 1 inf of") &&
                                   Contains("step_00000000"));
    CATCH_CHECK_THAT(r.output, !Contains("probability tensor"));
  }
  // The check itself, on a model whose weights are finite: nothing to say.
  model::Transformer fine(cfg.model);
  fine->init_weights(3);
  CATCH_CHECK_NOTHROW(train::require_finite_weights(*fine, "fine"));
  CATCH_CHECK_THROWS_AS(train::require_finite_weights(*model, "bad"), CheckpointError);
}

CATCH_TEST_CASE("optimizer values float32 cannot hold are config errors naming the key", "[config]") {
  auto error_of = [](const std::vector<std::string>& sets) -> std::string {
    try {
      config::parse_config("{}", "<test>", sets);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "";
  };
  CATCH_CHECK_THAT(error_of({"optim.lr=1e39"}), Contains("optim.lr = 1e+39 is beyond float32's range"));
  CATCH_CHECK_THAT(error_of({"optim.weight_decay=1e39"}), Contains("optim.weight_decay = 1e+39 is beyond"));
  CATCH_CHECK_THAT(error_of({"optim.eps=1e39"}), Contains("optim.eps = 1e+39 is beyond"));
  CATCH_CHECK_THAT(error_of({"optim.grad_clip=1e39"}), Contains("optim.grad_clip = 1e+39 is beyond"));
  CATCH_CHECK_THAT(error_of({"optim.lr=1e30", "optim.weight_decay=1e10"}), Contains("optim.lr * optim.weight_decay"));
  CATCH_CHECK_THAT(error_of({"optim.lr=1e25", "optim.beta1=0.99999999999999"}), Contains("optim.lr / (1 - optim.beta1)"));
  CATCH_CHECK(error_of({"optim.lr=3e37", "optim.weight_decay=0", "optim.min_lr=0"}).empty());  // large, but a float

  // From the command line: one line, before any model or data is touched.
  testing::TempDir dir("lr-overflow");
  auto r = testing::run_command("OMP_NUM_THREADS=1 " + kBinary + " train --config " + std::string(MOETRAIN_SOURCE_DIR) +
                                "/configs/tiny.yaml --set optim.lr=1e39 --set run.out_dir=" + dir.str("run"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code != 0);
  CATCH_CHECK(lines(r.output) == 1);
  CATCH_CHECK_THAT(r.output, Contains("[config] optim.lr = 1e+39 is beyond float32's range"));
  CATCH_CHECK_FALSE(files::exists(dir.str("run")));
}
