// optim.name muon through the trainer: the loss falls, checkpoints hold the momenta and name the
// optimizer, a resume continues bit for bit, and a checkpoint of the other optimizer is refused.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "ckpt/safetensors.h"
#include "common/errors.h"
#include "train/trainer.h"
#include "train_fixture.h"

using namespace moetrain;
using Catch::Matchers::Contains;

CATCH_TEST_CASE("Muon trains the tiny model: the loss falls, the checkpoint holds momenta, resume is bit for bit",
                "[train][optim]") {
  testing::TempDir dir("muon-train");
  const auto data_dir = testing::make_corpus(dir);
  auto straight = testing::tiny_train_config(data_dir, dir.str("straight"));
  straight.optim.name = "muon";
  straight.optim.lr = 1e-2;
  straight.train.steps = 6;
  const auto full = train::train(straight, {});
  CATCH_REQUIRE(full.losses.size() == 6);
  CATCH_CHECK(full.losses.back() < full.losses.front());

  testing::check_resume_joins(straight, full, dir.str("resumed"), 3, [&] {
    const std::string step_dir = dir.str("resumed/ckpt/step_00000003");
    CATCH_CHECK(ckpt::read_manifest(step_dir).optimizer == "muon");
    ckpt::SafetensorsFile optim_file(files::join(step_dir, "optim.safetensors"));
    CATCH_CHECK(optim_file.contains("layers.0.attn.wq.momentum"));
    CATCH_CHECK(!optim_file.contains("layers.0.attn.wq.exp_avg"));
    CATCH_CHECK(optim_file.contains("layers.0.attn_norm.weight.exp_avg"));
    CATCH_CHECK(optim_file.contains("layers.0.attn_norm.weight.exp_avg_sq"));
    CATCH_CHECK(optim_file.contains("embed.exp_avg"));
    CATCH_CHECK(optim_file.load("layers.0.attn.wq.momentum").abs().sum().item<double>() > 0);
    bool expert_momentum = false;  // the routed experts' momenta, one tensor per global expert id
    for (const auto& name : files::list_directory(step_dir))
      if (name.rfind("optim-experts", 0) == 0)
        for (const auto& info : ckpt::SafetensorsFile(files::join(step_dir, name)).tensors())
          expert_momentum = expert_momentum || info.name.find("experts.w1[0].momentum") != std::string::npos;
    CATCH_CHECK(expert_momentum);
  });
}

CATCH_TEST_CASE("A checkpoint of one optimizer does not resume with the other: one line naming it and both",
                "[train][optim][ckpt]") {
  testing::TempDir dir("muon-mismatch");
  const auto data_dir = testing::make_corpus(dir);
  for (const std::string saved : {"adamw", "muon"}) {
    const std::string other = saved == "adamw" ? "muon" : "adamw";
    auto cfg = testing::tiny_train_config(data_dir, dir.str(saved));
    cfg.optim.name = saved;
    cfg.train.steps = 2;
    cfg.train.eval_every = 0;
    train::train(cfg, {});
    CATCH_CHECK(ckpt::read_manifest(dir.str(saved + "/ckpt/step_00000002")).optimizer == saved);
    auto resumed = cfg;
    resumed.train.steps = 4;
    resumed.optim.name = other;
    try {
      train::train(resumed, {"auto"});
      CATCH_FAIL("resumed " << saved << "'s checkpoint with " << other);
    } catch (const Error& e) {
      const std::string what = e.what();
      CATCH_INFO(what);
      CATCH_CHECK(testing::one_line(what));
      CATCH_CHECK_THAT(what, Contains("step_00000002") && Contains("optim.name = " + saved) &&
                                 Contains("optim.name = " + other));
    }
  }
  // A manifest from before optim.name (no "optimizer") holds AdamW's state.
  const std::string manifest_path = dir.str("adamw/ckpt/step_00000002/manifest.json");
  auto manifest = nlohmann::json::parse(files::read_file(manifest_path));
  manifest.erase("optimizer");
  files::write_file_atomic(manifest_path, manifest.dump());
  CATCH_CHECK(ckpt::read_manifest(dir.str("adamw/ckpt/step_00000002")).optimizer == "adamw");
}

// LoRA's adapters stay on AdamW (README, Muon): with the base frozen nothing is a hidden matrix, so a
// LoRA run with optim.name muon is the AdamW run, bit for bit, and its checkpoint holds AdamW moments.
CATCH_TEST_CASE("With LoRA and optim.name muon the adapters stay on AdamW: the same run bit for bit", "[train][optim][lora]") {
  testing::TempDir dir("muon-lora");
  const auto data_dir = testing::make_corpus(dir);
  std::vector<double> losses[2];
  for (const int muon : {0, 1}) {
    auto cfg = testing::tiny_train_config(data_dir, dir.str(muon ? "muon" : "adamw"));
    cfg.train.lora.rank = 4;
    cfg.train.lora.alpha = 8;
    cfg.train.steps = 3;
    cfg.optim.lr = 1e-2;
    cfg.optim.name = muon ? "muon" : "adamw";
    losses[muon] = train::train(cfg, {}).losses;
  }
  CATCH_REQUIRE(losses[0].size() == 3);
  CATCH_CHECK(losses[1] == losses[0]);
  ckpt::SafetensorsFile optim_file(dir.str("muon/ckpt/step_00000003/optim.safetensors"));
  bool any_adapter = false, any_momentum = false;
  for (const auto& info : optim_file.tensors()) {
    any_adapter = any_adapter || info.name.find("_lora_a.exp_avg") != std::string::npos;
    any_momentum = any_momentum || info.name.find(".momentum") != std::string::npos;
  }
  CATCH_CHECK(any_adapter);
  CATCH_CHECK(!any_momentum);
}
