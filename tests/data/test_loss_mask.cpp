// Loss masks end to end: the mask file beside a shard (format and its errors), masked targets from the
// sampler and the eval batches, and the trainer's loss on a masked shard against a direct cross
// entropy over the learned targets only.
#include <catch2/catch.hpp>

#include <cstring>

#include "../test_util.h"
#include "common/errors.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "train/trainer.h"

using Catch::Matchers::Contains;
using namespace moetrain;
using moetrain::testing::TempDir;

namespace {

constexpr size_t kMaskHeaderBytes = 64;

// Tokens from a fixed hash; learned where (i % 7) >= 4: every window of 8+ targets holds learned ones.
std::vector<int64_t> hashed_tokens(int64_t n, int64_t vocab) {
  std::vector<int64_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tokens[size_t(i)] = int64_t(data::mix64(uint64_t(i)) % uint64_t(vocab));
  return tokens;
}
std::vector<uint8_t> striped_mask(int64_t n) {
  std::vector<uint8_t> mask(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) mask[size_t(i)] = (i % 7) >= 4;
  return mask;
}

// The mask entries as the file stores them, read without the Shard class.
std::vector<uint8_t> raw_mask(const std::string& shard_path) {
  const std::string bytes = files::read_file(data::mask_path_for(shard_path));
  return std::vector<uint8_t>(bytes.begin() + kMaskHeaderBytes, bytes.end());
}

// Mean cross entropy over the learned targets of windows at `starts`, computed directly: the rows
// whose target is learned are picked out and passed to cross_entropy with no ignore_index.
double direct_masked_loss(const model::TransformerImpl& model, const data::Shard& shard, const std::vector<uint8_t>& mask,
                          const std::vector<uint64_t>& starts, int seq_len, double* unmasked = nullptr) {
  torch::NoGradGuard no_grad;
  const int64_t B = int64_t(starts.size());
  auto windows = torch::empty({B, seq_len + 1}, torch::kLong);
  std::vector<int64_t> rows, targets;
  for (int64_t b = 0; b < B; ++b) {
    shard.read(starts[size_t(b)], uint64_t(seq_len) + 1, windows[b].data_ptr<int64_t>());
    for (int s = 0; s < seq_len; ++s) {
      if (mask[starts[size_t(b)] + 1 + s]) {
        rows.push_back(b * seq_len + s);
        targets.push_back(windows[b][s + 1].item<int64_t>());
      }
    }
  }
  auto logits = model.forward(windows.narrow(1, 0, seq_len)).logits_BSV;
  logits = logits.reshape({-1, logits.size(-1)});
  if (unmasked) *unmasked = torch::cross_entropy_loss(logits, windows.narrow(1, 1, seq_len).reshape(-1)).item<double>();
  return torch::cross_entropy_loss(logits.index_select(0, torch::tensor(rows)), torch::tensor(targets)).item<double>();
}

}  // namespace

CATCH_TEST_CASE("loss mask: written beside its shard, read back, no mask file means every token is learned", "[data]") {
  TempDir dir("mask-roundtrip");
  const std::string shard_path = dir.str("train.bin");
  data::write_shard(shard_path, hashed_tokens(100, 300), 300);
  {
    const data::Shard shard(shard_path);
    CATCH_CHECK_FALSE(shard.has_mask());
    std::vector<uint8_t> entries(10, 7);
    shard.read_mask(90, 10, entries.data());
    CATCH_CHECK(entries == std::vector<uint8_t>(10, 1));
  }
  const auto mask = striped_mask(100);
  data::write_mask(shard_path, mask);
  CATCH_REQUIRE(data::mask_path_for(shard_path) == dir.str("train.mask.bin"));
  CATCH_CHECK(data::mask_path_for("dir/tokens") == "dir/tokens.mask.bin");

  // The header, byte by byte, as shard.h documents it.
  const std::string bytes = files::read_file(dir.str("train.mask.bin"));
  CATCH_REQUIRE(bytes.size() == kMaskHeaderBytes + 100);
  CATCH_CHECK(bytes.substr(0, 8) == std::string("MOEMASK\0", 8));
  uint32_t version = 0, reserved = 1;
  uint64_t count = 0;
  std::memcpy(&version, bytes.data() + 8, 4);
  std::memcpy(&reserved, bytes.data() + 12, 4);
  std::memcpy(&count, bytes.data() + 16, 8);
  CATCH_CHECK(version == data::kMaskVersion);
  CATCH_CHECK(reserved == 0);
  CATCH_CHECK(count == 100);
  CATCH_CHECK(std::string(bytes.data() + 24) == "train.bin");
  CATCH_CHECK(raw_mask(shard_path) == mask);

  const data::Shard shard(shard_path);
  CATCH_REQUIRE(shard.has_mask());
  CATCH_CHECK(shard.mask_path() == dir.str("train.mask.bin"));
  std::vector<uint8_t> entries(100);
  shard.read_mask(0, 100, entries.data());
  CATCH_CHECK(entries == mask);
  CATCH_CHECK_THROWS_WITH(shard.read_mask(95, 6, entries.data()), Contains("past the end"));
  CATCH_CHECK_THROWS_WITH(data::write_mask(shard_path, {0, 1, 2}), Contains("0 or 1") && Contains("index 2"));
}

CATCH_TEST_CASE("loss mask: a wrong length, a foreign shard or a damaged header is refused, naming both files", "[data]") {
  TempDir dir("mask-errors");
  const std::string train = dir.str("train.bin"), val = dir.str("val.bin");
  data::write_shard(train, hashed_tokens(100, 300), 300);
  data::write_shard(val, hashed_tokens(50, 300), 300);

  // A mask written for 99 tokens beside a 100-token shard.
  data::write_mask(train, striped_mask(99));
  std::string msg = testing::error_of([&] { data::Shard shard(train); });
  CATCH_CHECK_THAT(msg, Contains("[data]") && Contains("train.mask.bin") && Contains(train) && Contains("99") &&
                            Contains("100"));
  CATCH_CHECK(msg.find('\n') == std::string::npos);

  // val's mask copied beside train: the header names val.bin.
  data::write_mask(val, striped_mask(50));
  files::rename_path(dir.str("val.mask.bin"), dir.str("train.mask.bin"));
  msg = testing::error_of([&] { data::Shard shard(train); });
  CATCH_CHECK_THAT(msg, Contains("train.mask.bin") && Contains("'val.bin'") && Contains(train));

  // Bytes missing after the header; a bad magic.
  data::write_mask(train, striped_mask(100));
  std::string bytes = files::read_file(dir.str("train.mask.bin"));
  testing::write_bytes(dir.str("train.mask.bin"), bytes.substr(0, bytes.size() - 3));
  CATCH_CHECK_THROWS_WITH(data::Shard(train), Contains("train.mask.bin") && Contains("97 bytes after the header"));
  bytes[0] = 'X';
  testing::write_bytes(dir.str("train.mask.bin"), bytes);
  CATCH_CHECK_THROWS_WITH(data::Shard(train), Contains("train.mask.bin") && Contains("magic"));
}

CATCH_TEST_CASE("loss mask: sampler and eval batches ignore the targets the mask does not learn", "[data]") {
  TempDir dir("mask-sampler");
  const std::string shard_path = dir.str("train.bin");
  const auto tokens = hashed_tokens(1000, 300);
  data::write_shard(shard_path, tokens, 300);
  // Learned only in [500, 800): most windows of 16 targets hold none and are redrawn.
  std::vector<uint8_t> mask(1000, 0);
  for (int i = 500; i < 800; ++i) mask[size_t(i)] = 1;
  data::write_mask(shard_path, mask);
  const data::Shard shard(shard_path);

  const int seq_len = 16;
  const data::Sampler sampler(shard, {7, seq_len, 4, 2, 0, 1});
  int redrawn = 0;
  for (int64_t step = 0; step < 5; ++step) {
    for (int micro = 0; micro < 2; ++micro) {
      const auto batch = sampler.batch(step, micro);
      CATCH_CHECK(torch::equal(batch.targets, sampler.batch(step, micro).targets));  // still a pure function
      for (int b = 0; b < 4; ++b) {
        const uint64_t id = sampler.global_sequence(step, micro, b), start = sampler.window_start(id);
        redrawn += start != sampler.offset(id);
        int learned = 0;
        for (int s = 0; s < seq_len; ++s) {
          const size_t t = size_t(start) + 1 + size_t(s);
          CATCH_CHECK(batch.inputs[b][s].item<int64_t>() == tokens[t - 1]);
          CATCH_CHECK(batch.targets[b][s].item<int64_t>() == (mask[t] ? tokens[t] : data::kIgnoreTarget));
          learned += mask[t];
        }
        CATCH_CHECK(learned > 0);
      }
    }
  }
  CATCH_CHECK(redrawn > 0);

  // Fixed eval windows are not redrawn; their unlearned targets are ignored.
  const auto eval = data::eval_batch(shard, 0, 1, 4, seq_len);
  for (int b = 0; b < 4; ++b) {
    const size_t start = size_t(b) * 250;
    for (int s = 0; s < seq_len; ++s) {
      const size_t t = start + 1 + size_t(s);
      CATCH_CHECK(eval.targets[b][s].item<int64_t>() == (mask[t] ? tokens[t] : data::kIgnoreTarget));
    }
  }

  // Without a mask nothing changes: the hashed starts, the shifted inputs.
  data::write_shard(dir.str("plain.bin"), tokens, 300);
  const data::Shard plain(dir.str("plain.bin"));
  const data::Sampler plain_sampler(plain, {7, seq_len, 4, 2, 0, 1});
  const auto batch = plain_sampler.batch(3, 1);
  for (int b = 0; b < 4; ++b) {
    const uint64_t id = plain_sampler.global_sequence(3, 1, b);
    CATCH_CHECK(plain_sampler.window_start(id) == plain_sampler.offset(id));
  }
  CATCH_CHECK(torch::equal(batch.inputs.narrow(1, 1, seq_len - 1), batch.targets.narrow(1, 0, seq_len - 1)));
  CATCH_CHECK(batch.targets.min().item<int64_t>() >= 0);

  // A mask that learns nothing: a clear error rather than a loss of 0/0, before the first batch.
  data::write_mask(shard_path, std::vector<uint8_t>(1000, 0));
  const data::Shard nothing(shard_path);
  CATCH_CHECK_THROWS_WITH(data::Sampler(nothing, {7, seq_len, 4, 2, 0, 1}),
                          Contains("train.mask.bin") && Contains("marks no token"));
  // One learned token no window can reach as a target (the first): the redraws give up, naming the mask.
  std::vector<uint8_t> first_only(1000, 0);
  first_only[0] = 1;
  data::write_mask(shard_path, first_only);
  const data::Shard unreachable(shard_path);
  const data::Sampler unreachable_sampler(unreachable, {7, seq_len, 4, 2, 0, 1});
  CATCH_CHECK_THROWS_WITH(unreachable_sampler.batch(0, 0), Contains("train.mask.bin") && Contains("no learned target"));
}

CATCH_TEST_CASE("loss mask: the trainer's step and validation losses are the mean over learned targets only",
                "[data][train]") {
  TempDir dir("mask-train");
  const int64_t vocab = 32;
  const auto train_tokens = hashed_tokens(2000, vocab), val_tokens = hashed_tokens(500, vocab);
  const auto train_mask = striped_mask(2000), val_mask = striped_mask(500);
  files::make_directories(dir.str("data"));
  data::write_shard(dir.str("data/train.bin"), train_tokens, vocab);
  data::write_shard(dir.str("data/val.bin"), val_tokens, vocab);
  data::write_mask(dir.str("data/train.bin"), train_mask);
  data::write_mask(dir.str("data/val.bin"), val_mask);

  config::Config cfg;
  cfg.model = testing::tiny_model_config();
  cfg.data.dir = dir.str("data");
  cfg.data.seq_len = 16;
  cfg.run.out_dir = dir.str("run");
  cfg.run.threads = 1;
  cfg.train.steps = 1;
  cfg.train.micro_batch_size = 4;
  cfg.train.log_every = 1;
  cfg.train.eval_every = 0;
  cfg.train.eval_batches = 1;
  const auto result = train::train(cfg, {});
  CATCH_REQUIRE(result.losses.size() == 1);

  // The same initial weights, the same step-0 windows, the loss computed directly.
  model::Transformer model(cfg.model);
  model->init_weights(cfg.run.seed);
  const data::Shard train_shard(dir.str("data/train.bin"));
  const data::Sampler sampler(train_shard, {cfg.run.seed, 16, 4, 1, 0, 1});
  std::vector<uint64_t> starts;
  for (int b = 0; b < 4; ++b) {
    const uint64_t id = sampler.global_sequence(0, 0, b);
    starts.push_back(sampler.offset(id));
    CATCH_REQUIRE(sampler.window_start(id) == starts.back());  // the stripes leave no window unlearned
  }
  double unmasked = 0;
  const double expected = direct_masked_loss(*model, train_shard, raw_mask(dir.str("data/train.bin")), starts, 16, &unmasked);
  CATCH_CHECK(std::abs(result.losses[0] - expected) < 1e-5 * expected);
  CATCH_CHECK(std::abs(unmasked - expected) > 1e-3);  // the mask makes a difference

  // Validation: evaluate() over the fixed windows (starts 0, 125, 250, 375 of 500 tokens).
  const data::Shard val_shard(dir.str("data/val.bin"));
  const double val = train::evaluate(*model, val_shard, 1, 4, 16, torch::kCPU);
  const double val_expected = direct_masked_loss(*model, val_shard, raw_mask(dir.str("data/val.bin")), {0, 125, 250, 375}, 16);
  CATCH_CHECK(std::abs(val - val_expected) < 1e-5 * val_expected);
  // The same four windows as two batches of two: still the mean over every learned target (as
  // `moetrain eval` reduces), not the mean of the two batch means.
  const double val_two = train::evaluate(*model, val_shard, 2, 2, 16, torch::kCPU);
  CATCH_CHECK(std::abs(val_two - val_expected) < 1e-5 * val_expected);
}

CATCH_TEST_CASE("loss mask: a micro-batch of one sequence keeps its inputs when targets are masked", "[data]") {
  // One row: inputs and targets were once two contiguous views of one buffer, so masking a target
  // wrote -100 over the next input token (an embedding lookup out of range at micro_batch_size 1).
  TempDir dir("mask-one-row");
  const std::string shard_path = dir.str("train.bin");
  const auto tokens = hashed_tokens(400, 300);
  data::write_shard(shard_path, tokens, 300);
  data::write_mask(shard_path, striped_mask(400));
  const data::Shard shard(shard_path);
  const int seq_len = 16;
  const data::Sampler sampler(shard, {7, seq_len, 1, 1, 0, 1});
  for (int64_t step = 0; step < 4; ++step) {
    const auto batch = sampler.batch(step, 0);
    const uint64_t start = sampler.window_start(sampler.global_sequence(step, 0, 0));
    for (int s = 0; s < seq_len; ++s) CATCH_CHECK(batch.inputs[0][s].item<int64_t>() == tokens[start + size_t(s)]);
    CATCH_CHECK(batch.targets.eq(data::kIgnoreTarget).any().item<bool>());
  }
  const auto eval = data::eval_batch(shard, 0, 2, 1, seq_len);
  CATCH_CHECK(eval.inputs.min().item<int64_t>() >= 0);
}
