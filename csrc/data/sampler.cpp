// Stateless sampling: a batch is computed from (seed, step, micro, rank) alone, so resuming a run needs
// only the step counter and changing the world size never makes two ranks read the same sequence id.
#include "data/sampler.h"

#include "common/errors.h"

namespace moetrain::data {
namespace {

// Separates the sequence-id stream from other uses of mix64(seed ^ ...).
constexpr uint64_t kSequenceSalt = 0x9e3779b97f4a7c15ULL;

// Reads windows of seq_len + 1 tokens at the given starts into (inputs, targets).
Batch windows_to_batch(const Shard& shard, const std::vector<uint64_t>& starts, int seq_len) {
  const int64_t n_sequences = int64_t(starts.size());
  torch::Tensor windows_BW = torch::empty({n_sequences, seq_len + 1}, torch::kInt64);
  int64_t* p = windows_BW.data_ptr<int64_t>();
  for (int64_t b = 0; b < n_sequences; ++b) shard.read(starts[b], uint64_t(seq_len) + 1, p + b * (seq_len + 1));
  return Batch{windows_BW.slice(1, 0, seq_len).contiguous(), windows_BW.slice(1, 1, seq_len + 1).contiguous()};
}

}  // namespace

uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

Sampler::Sampler(const Shard& shard, SamplerOptions opt) : shard_(shard), opt_(opt) {
  if (opt_.seq_len < 1 || opt_.micro_batch_size < 1 || opt_.grad_accum < 1 || opt_.world_size < 1 ||
      opt_.rank < 0 || opt_.rank >= opt_.world_size) {
    throw DataError("sampler for " + shard.path() + ": invalid options (seq_len " + std::to_string(opt_.seq_len) +
                    ", micro_batch_size " + std::to_string(opt_.micro_batch_size) + ", grad_accum " +
                    std::to_string(opt_.grad_accum) + ", rank " + std::to_string(opt_.rank) + " of world_size " +
                    std::to_string(opt_.world_size) + ")");
  }
  const uint64_t needed = uint64_t(opt_.seq_len) + 1;
  if (shard.size() < needed) {
    throw DataError(shard.path() + " has " + std::to_string(shard.size()) + " tokens; seq_len " +
                    std::to_string(opt_.seq_len) + " needs at least " + std::to_string(needed));
  }
}

uint64_t Sampler::global_sequence(int64_t step, int micro, int i) const {
  return ((uint64_t(step) * uint64_t(opt_.grad_accum) + uint64_t(micro)) * uint64_t(opt_.world_size) +
          uint64_t(opt_.rank)) * uint64_t(opt_.micro_batch_size) + uint64_t(i);
}

uint64_t Sampler::offset(uint64_t global_sequence) const {
  // Any start in [0, size - seq_len) leaves room for the seq_len + 1 token window.
  return mix64(opt_.seed ^ mix64(global_sequence + kSequenceSalt)) % (shard_.size() - uint64_t(opt_.seq_len));
}

Batch Sampler::batch(int64_t step, int micro) const {
  if (step < 0 || micro < 0 || micro >= opt_.grad_accum) {
    throw DataError("sampler for " + shard_.path() + ": step " + std::to_string(step) + ", micro " +
                    std::to_string(micro) + " out of range (grad_accum " + std::to_string(opt_.grad_accum) + ")");
  }
  std::vector<uint64_t> starts(static_cast<size_t>(opt_.micro_batch_size));
  for (int i = 0; i < opt_.micro_batch_size; ++i) starts[size_t(i)] = offset(global_sequence(step, micro, i));
  return windows_to_batch(shard_, starts, opt_.seq_len);
}

Batch eval_batch(const Shard& shard, int index, int n_batches, int batch_size, int seq_len) {
  if (n_batches < 1 || index < 0 || index >= n_batches || batch_size < 1 || seq_len < 1) {
    throw DataError("eval batch " + std::to_string(index) + " of " + std::to_string(n_batches) + " from " +
                    shard.path() + ": invalid arguments (batch_size " + std::to_string(batch_size) + ", seq_len " +
                    std::to_string(seq_len) + ")");
  }
  const uint64_t window = uint64_t(seq_len) + 1;
  if (shard.size() < window) {
    throw DataError(shard.path() + " has " + std::to_string(shard.size()) + " tokens; seq_len " +
                    std::to_string(seq_len) + " needs at least " + std::to_string(window));
  }
  // Window j of n_windows starts at j * stride; when the shard is too short for disjoint windows the
  // starts are spread evenly over every valid start instead (the windows then overlap).
  const uint64_t n_windows = uint64_t(n_batches) * uint64_t(batch_size);
  const uint64_t stride = shard.size() / n_windows;
  const uint64_t n_valid_starts = shard.size() - window + 1;
  std::vector<uint64_t> starts(static_cast<size_t>(batch_size));
  for (int b = 0; b < batch_size; ++b) {
    const uint64_t j = uint64_t(index) * uint64_t(batch_size) + uint64_t(b);
    starts[size_t(b)] = stride >= window ? j * stride
                                         : uint64_t((unsigned __int128)j * n_valid_starts / n_windows);
  }
  return windows_to_batch(shard, starts, seq_len);
}

}  // namespace moetrain::data
