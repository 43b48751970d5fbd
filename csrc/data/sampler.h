// The training sampler. The batch at optimizer step s, micro-batch m, for rank r is a pure function of
// (seed, s, m, r): resuming needs only the step, and any world size draws disjoint sequences.
// Each sequence is a window of seq_len + 1 tokens at an offset hashed from (seed, global sequence id).
// With a loss mask (shard.h), targets whose token is not learned are kIgnoreTarget, and a training
// window whose targets are all unlearned is redrawn, so that no micro-batch is without a loss.
#pragma once
#include <torch/torch.h>

#include <cstdint>

#include "data/shard.h"

namespace moetrain::data {

// A target the loss skips: torch's cross_entropy ignore_index (its default, -100).
constexpr int64_t kIgnoreTarget = -100;

struct Batch {
  torch::Tensor inputs;   // (B, S) int64
  torch::Tensor targets;  // (B, S) int64, inputs shifted by one; kIgnoreTarget where the mask says 0
};

struct SamplerOptions {
  uint64_t seed = 0;
  int seq_len = 256;
  int micro_batch_size = 16;   // sequences per micro-batch per rank
  int grad_accum = 1;          // micro-batches per step
  int rank = 0;
  int world_size = 1;
};

class Sampler {
 public:
  Sampler(const Shard& shard, SamplerOptions opt);  // throws DataError if the shard is too short
  Batch batch(int64_t step, int micro) const;
  // Window start for a global sequence id (exposed for tests).
  uint64_t offset(uint64_t global_sequence) const;
  // The start the batch uses: offset(), or with a mask the first of the redraws
  // offset(mix64(id) + k), k = 1, 2, ..., whose window has a learned target.
  uint64_t window_start(uint64_t global_sequence) const;
  // Global id of sequence i of (step, micro, rank): disjoint across ranks and micro-batches.
  uint64_t global_sequence(int64_t step, int micro, int i) const;

 private:
  const Shard& shard_;
  SamplerOptions opt_;
};

// Fixed validation batches: evaluation k reads the same windows every time (evenly spaced over the
// shard), so validation losses are comparable across steps and runs.
Batch eval_batch(const Shard& shard, int index, int n_batches, int batch_size, int seq_len);

// splitmix64: the hash behind every deterministic choice here.
uint64_t mix64(uint64_t x);

}  // namespace moetrain::data
