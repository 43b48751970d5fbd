// The training sampler. The batch at optimizer step s, micro-batch m, for rank r is a pure function of
// (seed, s, m, r): resuming needs only the step, and any world size draws disjoint sequences.
// With the blend's packing.documents (data.packing: documents), a sequence is one of its source's packed sequences (dataset.h, Packing)
// instead of a window. With one source, epoch e = id / n (n packed sequences) reads them all once, in
// an order permuted by (seed, e); with a blend, each id draws one of its source's, hashed like a window.
// Each sequence is a window of seq_len + 1 tokens at an offset hashed from (seed, global sequence id):
// the source of a blend is hashed from the id too (blend.h), then the offset picks one of that source's
// window starts (dataset.h: every start of every shard, so shards weigh by their size; a window never
// crosses from one shard into the next). With one source and one shard this is the single-file sampler.
// With a loss mask (shard.h), targets whose token is not learned are kIgnoreTarget, and a training
// window whose targets are all unlearned is redrawn, so that no micro-batch is without a loss.
#pragma once
#include <torch/torch.h>

#include <cstdint>

#include "data/blend.h"
#include "data/dataset.h"
#include "data/shard.h"

namespace moetrain::data {

// A target the loss skips: torch's cross_entropy ignore_index (its default, -100).
constexpr int64_t kIgnoreTarget = -100;

struct Batch {
  torch::Tensor inputs;   // (B, S) int64
  torch::Tensor targets;  // (B, S) int64, inputs shifted by one; kIgnoreTarget where the mask says 0
  // data.packing: documents: (B, S) int64, each token's position in its document (0 at its first
  // token; padding is 0 too, a document of its own), from which the model restarts RoPE and attends
  // within documents only; a document's last token and padding have target kIgnoreTarget. Undefined
  // for windows of the token stream (positions 0..S-1, causal over the whole row).
  torch::Tensor positions;
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
  Sampler(const Shard& shard, SamplerOptions opt);  // one shard (borrowed); throws DataError if too short
  Sampler(const Blend& blend, SamplerOptions opt);
  Batch batch(int64_t step, int micro) const;
  // The blend source a global sequence id reads from.
  size_t source(uint64_t global_sequence) const { return blend_.choose(opt_.seed, global_sequence); }
  // Window start for a global sequence id, as an index into its source's WindowIndex (with one shard:
  // the offset in it; exposed for tests).
  uint64_t offset(uint64_t global_sequence) const;
  // data.packing: documents: the packed sequence of its source that a global sequence id reads.
  uint64_t packed_sequence(uint64_t global_sequence) const;
  // The start the batch uses: offset(), or with a mask the first of the redraws
  // offset(mix64(id) + k), k = 1, 2, ..., whose window has a learned target.
  uint64_t window_start(uint64_t global_sequence) const;
  // Global id of sequence i of (step, micro, rank): disjoint across ranks and micro-batches. The ids
  // of step s are [s * sequences_per_step(), (s + 1) * sequences_per_step()).
  uint64_t global_sequence(int64_t step, int micro, int i) const;
  uint64_t sequences_per_step() const;

 private:
  Blend blend_;
  std::vector<WindowIndex> windows_;       // per source of the blend (stream)
  std::vector<const Packing*> packings_;  // per source of the blend (documents)
  SamplerOptions opt_;
};

// Fixed validation batches: evaluation k reads the same windows every time (evenly spaced over the
// split), so validation losses are comparable across steps and runs. With packing.documents, the
// same packed sequences (evenly spaced over the split's, in order).
Batch eval_batch(const Dataset& split, int index, int n_batches, int batch_size, int seq_len,
                 PackingOptions packing = {});
Batch eval_batch(const Shard& shard, int index, int n_batches, int batch_size, int seq_len);
// Packed sequences [first, first + count) of a split's plan as one batch (moetrain eval reads them all).
Batch packed_batch(const Dataset& split, const Packing& plan, uint64_t first, uint64_t count);

// splitmix64: the hash behind every deterministic choice here.
uint64_t mix64(uint64_t x);

}  // namespace moetrain::data
