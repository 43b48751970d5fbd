// The tiny GRPO run the rl tests share: the small test model over bytes (vocabulary 256), 32-token
// rows, one log line per rollout batch, no evaluation and no warmup. Each test sets its prompts, steps
// and rollout shape.
#pragma once
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../test_util.h"
#include "config/config.h"

namespace moetrain::testing {

inline config::Config tiny_rl_base(const TempDir& dir) {
  config::Config cfg;
  cfg.model = tiny_model_config();
  cfg.model.vocab_size = 256;
  cfg.model.max_seq_len = 32;
  cfg.data.seq_len = 32;
  cfg.run.out_dir = dir.str("run");
  cfg.train.log_every = 1;
  cfg.train.eval_every = 0;
  cfg.optim.warmup_steps = 0;
  return cfg;
}

// n one-digit sums "a+b=" with their answers; offset shifts which.
inline void write_prompts(const std::string& path, int n, int offset) {
  std::ofstream out(path);
  for (int i = 0; i < n; ++i) {
    const int a = (i + offset) % 5, b = (i * 3 + offset) % 4;
    out << nlohmann::json{{"prompt", std::to_string(a) + "+" + std::to_string(b) + "="}, {"answer", std::to_string(a + b)}}.dump()
        << "\n";
  }
}

// tiny_rl_base with 12 training and 6 held-out sums, 2 prompts x 4 completions of up to 5 tokens, 3 batches.
inline config::Config tiny_rl_config(const TempDir& dir) {
  config::Config cfg = tiny_rl_base(dir);
  cfg.run.threads = 1;
  cfg.train.steps = 3;
  cfg.optim.lr = 1e-2;
  cfg.optim.schedule = "constant";
  write_prompts(dir.str("train.jsonl"), 12, 0);
  write_prompts(dir.str("eval.jsonl"), 6, 7);
  cfg.rl.prompts = dir.str("train.jsonl");
  cfg.rl.eval_prompts = dir.str("eval.jsonl");
  cfg.rl.prompts_per_step = 2;
  cfg.rl.group_size = 4;
  cfg.rl.max_new_tokens = 5;
  cfg.rl.stop = "\n";
  cfg.rl.answer_from = "whole";
  return cfg;
}

// The rows of a run's metrics.jsonl, in order.
inline std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

}  // namespace moetrain::testing
