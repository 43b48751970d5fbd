// Training: the loss falls, N steps + resume to 2N equals 2N straight bit for bit, metrics are written.
#include <catch2/catch.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "train/generate.h"
#include "train/trainer.h"
#include "train_fixture.h"

using namespace moetrain;

CATCH_TEST_CASE("Resumed training equals uninterrupted training bit for bit", "[train]") {
  testing::TempDir dir("train-resume");
  const auto data_dir = testing::make_corpus(dir);

  auto straight = testing::tiny_train_config(data_dir, dir.str("straight"));
  straight.train.steps = 6;
  const auto full = train::train(straight, {});
  CATCH_REQUIRE(full.losses.size() == 6);
  CATCH_CHECK(full.losses.back() < full.losses.front());

  // The first half stops at step 3 (train.steps=3 with the schedule horizon kept at 6 steps, as
  // train.steps=6 gives it), the second resumes to 6.
  auto first = testing::tiny_train_config(data_dir, dir.str("resumed"));
  first.train.steps = 3;
  first.optim.decay_steps = 6;
  const auto a = train::train(first, {});
  auto second = first;
  second.train.steps = 6;
  const auto b = train::train(second, {"auto"});
  CATCH_CHECK(b.first_step == 3);
  std::vector<double> joined = a.losses;
  joined.insert(joined.end(), b.losses.begin(), b.losses.end());
  CATCH_REQUIRE(joined.size() == 6);
  for (size_t i = 0; i < 6; ++i) {
    CATCH_INFO("step " << i + 1);
    CATCH_CHECK(joined[i] == full.losses[i]);  // bitwise: same ops on the same bits
  }
  // metrics.jsonl of the resumed run holds each step once, in order.
  std::ifstream metrics(dir.str("resumed/metrics.jsonl"));
  std::string line;
  int64_t expect = 1;
  while (std::getline(metrics, line)) {
    auto j = nlohmann::json::parse(line);
    CATCH_CHECK(j["step"].get<int64_t>() == expect++);
    for (const char* key : {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "aux_loss", "elapsed_s", "mfu",
                            "gpu_hours", "cost_usd"})
      CATCH_CHECK(j.contains(key));
  }
  CATCH_CHECK(expect == 7);
  CATCH_CHECK(files::exists(dir.str("resumed/config.yaml")));
}

CATCH_TEST_CASE("Greedy generation from a checkpoint is deterministic and extends the prompt", "[train]") {
  testing::TempDir dir("train-generate");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  cfg.train.steps = 2;
  train::train(cfg, {});
  auto loaded = train::load_for_inference(dir.str("run"));
  CATCH_CHECK(loaded.manifest.progress.step == 2);
  train::GenerateOptions opt;
  opt.temperature = 0;
  opt.max_new_tokens = 20;  // longer than max_seq_len (16): the context window slides
  const std::vector<int64_t> prompt = {'t', 'h', 'e'};
  auto a = train::generate(*loaded.model, prompt, opt);
  auto b = train::generate(*loaded.model, prompt, opt);
  CATCH_CHECK(a.size() == 23);
  CATCH_CHECK(a == b);
  CATCH_CHECK(std::equal(prompt.begin(), prompt.end(), a.begin()));
}
