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
  testing::check_resume_joins(straight, full, dir.str("resumed"));
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

// run.deterministic on the CPU: the deterministic MoE and loss paths train the same model as the
// default ones (to fp32 rounding: only a token's K expert outputs are added in another order), repeat
// bit for bit, resume bit for bit, and leave LibTorch's mode as the config says once done.
CATCH_TEST_CASE("run.deterministic trains the default run's model and resumes bit for bit", "[train]") {
  testing::TempDir dir("train-deterministic");
  const auto data_dir = testing::make_corpus(dir);
  auto base = testing::tiny_train_config(data_dir, dir.str("default"));
  base.model.moe.capacity_factor = 1.0;  // dropping copies too
  const auto plain = train::train(base, {});

  auto det = base;
  det.run.deterministic = true;
  det.run.out_dir = dir.str("deterministic");
  const auto a = train::train(det, {});
  CATCH_CHECK(at::globalContext().deterministicAlgorithms());
  det.run.out_dir = dir.str("again");
  const auto b = train::train(det, {});
  CATCH_REQUIRE(a.losses.size() == plain.losses.size());
  for (size_t i = 0; i < a.losses.size(); ++i) {
    CATCH_INFO("step " << i + 1);
    CATCH_CHECK(a.losses[i] == b.losses[i]);
    // Six steps of fp32 AdamW on a model of order-1 losses: 1e-4 relative covers the reordered sums.
    CATCH_CHECK(a.losses[i] == Approx(plain.losses[i]).epsilon(1e-4));
  }
  // Resume from step 3 under the mode: the same losses bit for bit.
  testing::check_resume_joins(det, a, dir.str("resumed"));

  train::train(base, {"auto"});  // a run without the key turns the mode off again
  CATCH_CHECK(!at::globalContext().deterministicAlgorithms());
}

// train.loss_chunk_tokens trains the same model as the full logits (to fp32 rounding in the loss's
// sum; 1e-5 relative over 6 steps) and resumes bit for bit like any run.
CATCH_TEST_CASE("train.loss_chunk_tokens trains the full-logits run's model", "[train]") {
  testing::TempDir dir("train-loss-chunk");
  const auto data_dir = testing::make_corpus(dir);
  auto base = testing::tiny_train_config(data_dir, dir.str("full"));
  const auto full = train::train(base, {});
  auto chunked = base;
  chunked.train.loss_chunk_tokens = 24;  // micro-batches of 4 x 16 tokens: chunks of 24, 24 and 16
  chunked.run.out_dir = dir.str("chunked");
  const auto got = train::train(chunked, {});
  CATCH_REQUIRE(got.losses.size() == full.losses.size());
  for (size_t i = 0; i < got.losses.size(); ++i) {
    CATCH_INFO("step " << i + 1);
    CATCH_CHECK(got.losses[i] == Approx(full.losses[i]).epsilon(1e-5));
  }
  CATCH_CHECK(got.final_val_loss == Approx(full.final_val_loss).epsilon(1e-5));
}
