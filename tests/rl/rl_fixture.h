// The tiny GRPO run the rl tests share: the small test model over bytes (vocabulary 256), 32-token
// rows, one log line per rollout batch, no evaluation and no warmup. Each test sets its prompts, steps
// and rollout shape.
#pragma once
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

}  // namespace moetrain::testing
