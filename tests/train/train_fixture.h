// A small corpus and config for tests that train: pseudo-English sentences, byte shards, a model that
// runs a step in milliseconds.
#pragma once
#include <catch2/catch.hpp>

#include <fstream>
#include <functional>
#include <random>

#include "../test_util.h"
#include "data/shard.h"
#include "train/trainer.h"

namespace moetrain::testing {

// Writes ~40 KB of seeded pseudo-English text to dir/corpus.txt and prepares dir/data/{train,val}.bin.
inline std::string make_corpus(const TempDir& dir) {
  const char* words[] = {"the", "expert", "router", "sends", "each", "token", "to", "two", "of", "eight",
                         "experts", "and", "a", "shared", "one", "always", "runs", "loss", "falls", "slowly"};
  std::mt19937 rng(2024);
  std::ofstream out(dir.str("corpus.txt"));
  for (int line = 0; line < 1200; ++line) {
    const int n = 4 + int(rng() % 6);
    for (int w = 0; w < n; ++w) out << (w ? " " : "") << words[rng() % 20];
    out << ".\n";
  }
  out.close();
  data::prepare_text({dir.str("corpus.txt")}, dir.str("data"), 0.1);
  return dir.str("data");
}

// The same text as make_corpus, one document per line (version-2 byte shards, data.packing: documents),
// in dir/docs/{train,val}.bin: the last tenth of the lines is validation.
inline std::string make_document_corpus(const TempDir& dir) {
  make_corpus(dir);
  std::ifstream in(dir.str("corpus.txt"));
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line + "\n");
  const size_t n_val = lines.size() / 10;
  files::make_directories(dir.str("docs"));
  for (const char* split : {"train", "val"}) {
    const bool val = std::string(split) == "val";
    std::vector<int64_t> tokens;
    std::vector<uint64_t> starts;
    for (size_t i = val ? lines.size() - n_val : 0; i < (val ? lines.size() : lines.size() - n_val); ++i) {
      starts.push_back(tokens.size());
      for (unsigned char c : lines[i]) tokens.push_back(c);
    }
    data::write_shard(dir.str(std::string("docs/") + split + ".bin"), tokens, 256, starts);
  }
  return dir.str("docs");
}

inline config::Config tiny_train_config(const std::string& data_dir, const std::string& out_dir) {
  config::Config cfg;
  cfg.model = tiny_model_config();
  cfg.model.vocab_size = 256;
  cfg.data.dir = data_dir;
  cfg.data.seq_len = 16;
  cfg.run.out_dir = out_dir;
  cfg.run.threads = 1;
  cfg.train.steps = 6;
  cfg.train.micro_batch_size = 4;
  cfg.train.grad_accum = 2;
  cfg.train.log_every = 1;
  cfg.train.eval_every = 3;
  cfg.train.eval_batches = 2;
  cfg.optim.warmup_steps = 2;
  cfg.optim.lr = 3e-3;
  return cfg;
}

// The two halves of a run resumed from a checkpoint (check_resume_joins).
struct ResumedRun {
  config::Config first_cfg, second_cfg;
  train::TrainResult first, second;
};

// Trains `straight` (train.steps N, run already as `full`) again into `out_dir` in two runs: to step
// `split` with the schedule's horizon kept at N (as train.steps = N gives it), then resumed ("auto") to N.
// Checks that the second run starts at `split` and that the joined losses equal the straight run's bit
// for bit (the same ops on the same bits). `after_first` looks at the first run's folder before the resume.
inline ResumedRun check_resume_joins(const config::Config& straight, const train::TrainResult& full,
                                     const std::string& out_dir, int64_t split = 3,
                                     const std::function<void()>& after_first = {}) {
  const int64_t steps = straight.train.steps;
  ResumedRun run;
  run.first_cfg = straight;
  run.first_cfg.run.out_dir = out_dir;
  run.first_cfg.train.steps = int(split);
  run.first_cfg.optim.decay_steps = int(steps);
  run.first = train::train(run.first_cfg, {});
  if (after_first) after_first();
  run.second_cfg = run.first_cfg;
  run.second_cfg.train.steps = int(steps);
  run.second = train::train(run.second_cfg, {"auto"});
  CATCH_CHECK(run.second.first_step == split);
  std::vector<double> joined = run.first.losses;
  joined.insert(joined.end(), run.second.losses.begin(), run.second.losses.end());
  CATCH_REQUIRE(joined.size() == full.losses.size());
  for (size_t i = 0; i < joined.size(); ++i) {
    CATCH_INFO("step " << i + 1);
    CATCH_CHECK(joined[i] == full.losses[i]);
  }
  return run;
}

}  // namespace moetrain::testing
