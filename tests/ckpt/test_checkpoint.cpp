// Checkpoints: bitwise round trip of weights and optimizer state, refusal of damaged files, retention.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <fstream>

#include "../test_util.h"
#include "ckpt/checkpoint.h"
#include "common/errors.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

struct Trained {
  model::Transformer model{nullptr};
  std::unique_ptr<optim::AdamW> opt;
};

std::vector<std::pair<std::string, torch::Tensor>> named(model::Transformer& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& p : m->named_parameters()) out.emplace_back(p.key(), p.value());
  return out;
}

Trained make(uint64_t seed, int steps) {
  Trained t;
  t.model = model::Transformer(testing::tiny_model_config());
  t.model->init_weights(seed);
  t.opt = std::make_unique<optim::AdamW>(named(t.model), config::OptimConfig{}, model::is_no_decay);
  for (int s = 0; s < steps; ++s) {
    t.opt->zero_grad();
    auto out = t.model->forward(torch::randint(0, 32, {2, 8}, torch::kLong));
    (out.logits_BSV.pow(2).mean() + out.balance_loss).backward();
    t.opt->step(1e-2);
  }
  return t;
}

}  // namespace

CATCH_TEST_CASE("Checkpoint round trip restores weights and optimizer state bit for bit", "[ckpt]") {
  testing::TempDir dir("ckpt-roundtrip");
  auto a = make(1, 3);
  const auto step_dir = ckpt::save_checkpoint(dir.str(), *a.model, a.opt->state(), "run: {}\n", {3, 300, 1.5});
  CATCH_CHECK(step_dir == dir.str("ckpt/step_00000003"));
  auto found = ckpt::find_checkpoint(dir.str());
  CATCH_REQUIRE(found);
  CATCH_CHECK(*found == step_dir);
  auto manifest = ckpt::open_checkpoint(*found);
  CATCH_CHECK(manifest.progress.step == 3);
  CATCH_CHECK(manifest.progress.tokens == 300);
  CATCH_CHECK(manifest.config_yaml == "run: {}\n");
  std::vector<std::string> names;
  for (const auto& f : manifest.files) names.push_back(f.name);
  CATCH_CHECK(names == std::vector<std::string>{"model.safetensors", "experts-00000-of-00001.safetensors",
                                                "optim.safetensors", "optim-experts-00000-of-00001.safetensors",
                                                "rng-00000.safetensors"});
  CATCH_CHECK((manifest.world_size == 1 && manifest.expert_parallel == 1 && manifest.format_version == 2));

  auto b = make(2, 0);  // different weights, empty optimizer state
  ckpt::load_model(*found, *b.model);
  ckpt::load_optimizer(*found, b.opt->state(), *b.model);
  auto pa = a.model->named_parameters(), pb = b.model->named_parameters();
  for (const auto& p : pa) CATCH_CHECK(torch::equal(p.value(), pb[p.key()]));
  CATCH_CHECK(b.opt->step_count() == 3);
  for (size_t i = 0; i < a.opt->states().size(); ++i) {
    CATCH_CHECK(torch::equal(a.opt->states()[i].exp_avg, b.opt->states()[i].exp_avg));
    CATCH_CHECK(torch::equal(a.opt->states()[i].exp_avg_sq, b.opt->states()[i].exp_avg_sq));
  }
  CATCH_CHECK_FALSE(files::exists(dir.str("ckpt/.tmp-step_00000003")));
}

CATCH_TEST_CASE("A truncated, altered or missing checkpoint file is refused, naming it", "[ckpt]") {
  testing::TempDir dir("ckpt-corrupt");
  auto a = make(1, 1);
  const auto step_dir = ckpt::save_checkpoint(dir.str(), *a.model, a.opt->state(), "", {1, 0, 0});
  const auto model_file = step_dir + "/model.safetensors";
  const auto size = *files::file_size(model_file);

  {  // flip one byte in the middle of the weights
    std::fstream f(model_file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(std::streamoff(size - 100));
    char c;
    f.read(&c, 1);
    c ^= 0x01;
    f.seekp(std::streamoff(size - 100));
    f.write(&c, 1);
  }
  CATCH_REQUIRE_THROWS_WITH(ckpt::open_checkpoint(step_dir), Contains("model.safetensors") && Contains("sha256"));
  CATCH_CHECK_NOTHROW(ckpt::open_checkpoint(step_dir, "size"));  // size-only verification cannot see it

  CATCH_REQUIRE(::truncate(model_file.c_str(), off_t(size - 10)) == 0);
  CATCH_REQUIRE_THROWS_WITH(ckpt::open_checkpoint(step_dir, "size"), Contains("model.safetensors") && Contains("truncated"));

  files::remove_tree(step_dir + "/optim.safetensors");
  CATCH_REQUIRE(::truncate(model_file.c_str(), off_t(size)) == 0);
  CATCH_REQUIRE_THROWS_WITH(ckpt::open_checkpoint(step_dir, "size"), Contains("optim.safetensors") && Contains("missing"));
}

CATCH_TEST_CASE("Loading into a model of another shape names the tensor and both shapes", "[ckpt]") {
  testing::TempDir dir("ckpt-shape");
  auto a = make(1, 0);
  const auto step_dir = ckpt::save_checkpoint(dir.str(), *a.model, a.opt->state(), "", {0, 0, 0});
  auto cfg = testing::tiny_model_config();
  cfg.moe.expert_hidden = 12;
  model::Transformer other(cfg);
  CATCH_REQUIRE_THROWS_WITH(ckpt::load_model(step_dir, *other),
                            Contains("layers.1.moe.experts.w1[0]") && Contains("[16, 8]") && Contains("[16, 12]"));
}

CATCH_TEST_CASE("Retention keeps the newest checkpoints and never the one latest names", "[ckpt]") {
  testing::TempDir dir("ckpt-retention");
  auto a = make(1, 0);
  for (int step = 1; step <= 4; ++step) ckpt::save_checkpoint(dir.str(), *a.model, a.opt->state(), "", {step, 0, 0});
  ckpt::apply_retention(dir.str(), 2);
  CATCH_CHECK_FALSE(files::exists(dir.str("ckpt/step_00000001")));
  CATCH_CHECK_FALSE(files::exists(dir.str("ckpt/step_00000002")));
  CATCH_CHECK(files::exists(dir.str("ckpt/step_00000003")));
  CATCH_CHECK(*ckpt::find_checkpoint(dir.str()) == dir.str("ckpt/step_00000004"));
}
