// A small corpus and config for tests that train: pseudo-English sentences, byte shards, a model that
// runs a step in milliseconds.
#pragma once
#include <fstream>
#include <random>

#include "../test_util.h"
#include "data/shard.h"

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

}  // namespace moetrain::testing
