// `moetrain rl` under the modes `train` has: bf16 compute and LoRA (ZeRO-1 is in test_grpo_dist.cpp), each
// a few rollout batches with finite metrics and an exact resume at a batch boundary, LoRA changing only the
// adapters; train.nonfinite's skip and stop; logging.tensorboard.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <optional>

#include "ckpt/checkpoint.h"
#include "common/errors.h"
#include "ckpt/safetensors.h"
#include "hf/hf.h"
#include "model/transformer.h"
#include "rl_fixture.h"
#include "train/rl.h"
#include "train/tensorboard.h"

using namespace moetrain;
using namespace moetrain::testing;
namespace rl = moetrain::train::rl;

namespace {

// Runs cfg straight to train.steps and again in two parts (a resume after `first` batches); the rows of
// both runs must agree exactly. Returns the straight run's rows.
std::vector<nlohmann::json> check_exact_resume(config::Config cfg, const TempDir& dir, int64_t first) {
  cfg.checkpoint.every = 1;
  config::validate(cfg);
  rl::run(cfg, {});
  const auto straight = read_metrics(files::join(cfg.run.out_dir, "metrics.jsonl"));
  const int64_t steps = cfg.train.steps;
  cfg.run.out_dir = dir.str("split");
  cfg.train.steps = int(first);
  rl::run(cfg, {});
  cfg.train.steps = int(steps);
  rl::run(cfg, {"auto", false});
  const auto split = read_metrics(dir.str("split/metrics.jsonl"));
  CATCH_REQUIRE(straight.size() == size_t(steps));
  CATCH_REQUIRE(split.size() == size_t(steps));
  for (size_t i = 0; i < split.size(); ++i) {
    CATCH_INFO("rollout batch " << i + 1);
    for (const char* key : {"reward_mean", "loss", "grad_norm", "kl", "entropy"}) CATCH_CHECK(split[i][key] == straight[i][key]);
  }
  return straight;
}

void check_finite(const std::vector<nlohmann::json>& rows) {
  for (const auto& row : rows)
    for (const char* key : {"reward_mean", "reward_std", "loss", "grad_norm", "kl", "clip_fraction", "entropy"}) {
      CATCH_INFO(key << " at step " << row["step"]);
      CATCH_CHECK(std::isfinite(row[key].get<double>()));
    }
}

// Rewards that vary with the completion's length, so that every batch has advantages to learn from.
void varied_rewards(config::Config& cfg) {
  cfg.rl.eval_prompts = "";
  cfg.rl.reward = "command";
  cfg.rl.reward_command = "awk '{ print length($0) % 3 }'";
}

}  // namespace

CATCH_TEST_CASE("moetrain rl under bf16 logs finite metrics, learns, and resumes exactly", "[rl]") {
  TempDir dir("rl-bf16");
  auto cfg = tiny_rl_config(dir);
  varied_rewards(cfg);
  cfg.run.dtype = "bf16";
  cfg.rl.kl_coef = 0.05;
  cfg.train.steps = 4;
  const auto rows = check_exact_resume(cfg, dir, 2);
  check_finite(rows);
  double grad_norm = 0;
  for (const auto& row : rows) grad_norm += row["grad_norm"].get<double>();
  CATCH_CHECK(grad_norm > 0);
}

CATCH_TEST_CASE("moetrain rl with LoRA trains only the adapters, keeps the base and resumes exactly", "[rl][lora]") {
  TempDir dir("rl-lora");
  auto cfg = tiny_rl_config(dir);
  varied_rewards(cfg);
  cfg.model.dense_layers = 0;  // a shape Hugging Face's Mixtral holds: the LoRA base is an HF folder
  cfg.model.moe.n_shared_experts = 0;
  {
    model::Transformer base(cfg.model);
    base->init_weights(77);
    hf::export_model(*base, hf::infer_family(cfg.model), dir.str("base"));
  }
  cfg.model.init_from = "hf:" + dir.str("base");
  cfg.train.lora.rank = 4;
  cfg.train.lora.alpha = 8;
  cfg.rl.kl_coef = 0.05;  // the reference is the base alone
  cfg.train.steps = 4;
  // A resume reloads the base from its folder: were the run's base to move in memory, the resumed
  // batches would differ from the straight run's.
  const auto rows = check_exact_resume(cfg, dir, 2);
  check_finite(rows);
  // The checkpoint holds the adapters (and buffers) only, and names the base it trained on.
  const std::string step_dir = dir.str("run/ckpt/step_00000004");
  const auto manifest = ckpt::read_manifest(step_dir);
  CATCH_REQUIRE(manifest.lora_base);
  CATCH_CHECK(manifest.lora_base->init_from == cfg.model.init_from);
  int64_t moved = 0;
  for (const auto& f : manifest.files) {
    if (f.name.rfind("rng-", 0) == 0) continue;
    ckpt::SafetensorsFile file(files::join(step_dir, f.name));
    for (const auto& info : file.tensors()) {
      CATCH_INFO(f.name << ": " << info.name);
      CATCH_CHECK((info.name.find("_lora_") != std::string::npos || info.name.find("bias") != std::string::npos));
      // B starts at zero: a non-zero B is an adapter that trained.
      const bool weights = f.name.rfind("model", 0) == 0 || f.name.rfind("experts-", 0) == 0;
      if (weights && info.name.size() > 7 && info.name.compare(info.name.size() - 7, 7, "_lora_b") == 0)
        moved += file.load(info.name).abs().max().item<double>() > 0;
    }
  }
  CATCH_CHECK(moved > 0);
  // KL to the base: zero before the first update (B = 0), positive once the adapters moved.
  CATCH_CHECK(rows.back()["kl"].get<double>() > 0);
}

CATCH_TEST_CASE("train.nonfinite under rl: skip goes on and counts, stop and a long streak end with one line", "[rl]") {
  TempDir dir("rl-nonfinite");
  auto cfg = tiny_rl_config(dir);
  varied_rewards(cfg);
  cfg.train.steps = 4;
  cfg.checkpoint.every = 1;
  struct FaultAt {  // MOETRAIN_TEST_NONFINITE for one run
    explicit FaultAt(const char* spec) { ::setenv("MOETRAIN_TEST_NONFINITE", spec, 1); }
    ~FaultAt() { ::unsetenv("MOETRAIN_TEST_NONFINITE"); }
  };
  {
    FaultAt fault("loss@2");
    config::validate(cfg);
    rl::run(cfg, {});
  }
  const auto rows = read_metrics(dir.str("run/metrics.jsonl"));
  CATCH_REQUIRE(rows.size() == 4);
  CATCH_CHECK(rows[1]["skipped_updates"] == 1);
  CATCH_CHECK(!rows[0].contains("skipped_updates"));
  CATCH_CHECK(!rows[2].contains("skipped_updates"));
  // No checkpoint while a streak of skipped updates is open, as in train: batch 2's only update was skipped.
  CATCH_CHECK(files::exists(dir.str("run/ckpt/step_00000001")));
  CATCH_CHECK_FALSE(files::exists(dir.str("run/ckpt/step_00000002")));
  CATCH_CHECK(files::exists(dir.str("run/ckpt/step_00000003")));

  auto expect_stop = [&](const std::string& name, const char* spec, const std::string& says) {
    cfg.run.out_dir = dir.str(name);
    FaultAt fault(spec);
    try {
      rl::run(cfg, {});
      CATCH_FAIL(name << ": the run did not stop");
    } catch (const Error& e) {
      const std::string what = e.what();
      CATCH_CHECK(testing::one_line(what));
      CATCH_CHECK_THAT(what, Catch::Matchers::Contains("[rl] rollout batch 3 update") && Catch::Matchers::Contains(says) &&
                                 Catch::Matchers::Contains("step_00000002"));  // the last good checkpoint
    }
    CATCH_CHECK(read_metrics(dir.str(name + "/metrics.jsonl")).size() == 2);
    CATCH_CHECK(files::read_file(dir.str(name + "/ckpt/latest")) == "step_00000002\n");
  };
  cfg.train.nonfinite = "stop";
  expect_stop("stop", "loss@3", "train.nonfinite = stop");
  cfg.train.nonfinite = "skip";
  cfg.train.max_skipped_steps = 1;
  cfg.rl.updates_per_batch = 2;  // both updates of batch 3 fail: two in a row
  expect_stop("streak", "loss@3", "more than train.max_skipped_steps = 1");
}

CATCH_TEST_CASE("logging.tensorboard under rl: each metrics.jsonl number at its rollout batch", "[rl][python]") {
  if (!train::TensorBoardWriter::available()) {
    CATCH_WARN("built without protobuf: logging.tensorboard is refused, nothing to read back");
    return;
  }
  TempDir dir("rl-tensorboard");
  auto cfg = tiny_rl_config(dir);
  cfg.logging.tensorboard = true;
  config::validate(cfg);
  rl::run(cfg, {});
  const std::string source = MOETRAIN_SOURCE_DIR;
  const auto r = run_command(source + "/third_party/venv/bin/python " + source + "/tests/train/read_tensorboard.py " +
                             dir.str("run/tb") + " 2>/dev/null");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  const auto scalars = nlohmann::json::parse(r.output);
  int checked = 0;
  for (const auto& rec : read_metrics(dir.str("run/metrics.jsonl")))
    for (const auto& [tag, value] : train::tensorboard_scalars(rec)) {
      CATCH_INFO("step " << rec["step"] << " tag " << tag);
      CATCH_REQUIRE(scalars.contains(tag));
      std::optional<double> got;
      for (const auto& point : scalars[tag])
        if (point[0] == rec["step"]) got = point[1].get<double>();
      CATCH_REQUIRE(got.has_value());
      CATCH_CHECK(*got == double(float(value)));  // fp32, exactly the record's value rounded
      ++checked;
    }
  CATCH_CHECK(checked > 3 * 10);
  for (const char* tag : {"reward_mean", "accuracy", "kl", "entropy", "eval_accuracy"}) CATCH_CHECK(scalars.contains(tag));
}
