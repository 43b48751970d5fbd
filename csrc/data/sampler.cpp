// Stateless sampling: a batch is computed from (seed, step, micro, rank) alone, so resuming a run needs
// only the step counter and changing the world size never makes two ranks read the same sequence id.
#include "data/sampler.h"

#include <algorithm>

#include "common/errors.h"

namespace moetrain::data {
namespace {

// Separates the sequence-id stream from other uses of mix64(seed ^ ...).
constexpr uint64_t kSequenceSalt = 0x9e3779b97f4a7c15ULL;

// A window whose every target is unlearned gets another draw, at most this many times.
constexpr int kMaxRedraws = 64;

// Reads windows of seq_len + 1 tokens at the given starts into (inputs, targets); with a mask, targets
// whose token is not learned become kIgnoreTarget.
Batch windows_to_batch(const Shard& shard, const std::vector<uint64_t>& starts, int seq_len) {
  const int64_t n_sequences = int64_t(starts.size());
  torch::Tensor windows_BW = torch::empty({n_sequences, seq_len + 1}, torch::kInt64);
  int64_t* p = windows_BW.data_ptr<int64_t>();
  for (int64_t b = 0; b < n_sequences; ++b) shard.read(starts[b], uint64_t(seq_len) + 1, p + b * (seq_len + 1));
  Batch batch{windows_BW.slice(1, 0, seq_len).contiguous(), windows_BW.slice(1, 1, seq_len + 1).contiguous()};
  if (shard.has_mask()) {
    torch::Tensor learned_BS = torch::empty({n_sequences, seq_len}, torch::kUInt8);
    uint8_t* m = learned_BS.data_ptr<uint8_t>();
    for (int64_t b = 0; b < n_sequences; ++b) shard.read_mask(starts[b] + 1, uint64_t(seq_len), m + b * seq_len);
    batch.targets.masked_fill_(learned_BS.eq(0), kIgnoreTarget);
  }
  return batch;
}

bool window_has_learned_target(const Shard& shard, uint64_t start, int seq_len, std::vector<uint8_t>& scratch) {
  scratch.resize(size_t(seq_len));
  shard.read_mask(start + 1, uint64_t(seq_len), scratch.data());
  return std::find(scratch.begin(), scratch.end(), uint8_t(1)) != scratch.end();
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
  require_window(shard, opt_.seq_len);
  if (shard.has_mask() && shard.learned_tokens() == 0)
    throw DataError(shard.mask_path() + " marks no token of " + shard.path() + " as learned: training would have no loss");
}

uint64_t Sampler::global_sequence(int64_t step, int micro, int i) const {
  return ((uint64_t(step) * uint64_t(opt_.grad_accum) + uint64_t(micro)) * uint64_t(opt_.world_size) +
          uint64_t(opt_.rank)) * uint64_t(opt_.micro_batch_size) + uint64_t(i);
}

uint64_t Sampler::offset(uint64_t global_sequence) const {
  // Any start in [0, size - seq_len) leaves room for the seq_len + 1 token window.
  return mix64(opt_.seed ^ mix64(global_sequence + kSequenceSalt)) % (shard_.size() - uint64_t(opt_.seq_len));
}

uint64_t Sampler::window_start(uint64_t global_sequence) const {
  const uint64_t start = offset(global_sequence);
  if (!shard_.has_mask()) return start;
  std::vector<uint8_t> scratch;
  if (window_has_learned_target(shard_, start, opt_.seq_len, scratch)) return start;
  for (int k = 1; k <= kMaxRedraws; ++k) {
    const uint64_t redrawn = offset(mix64(global_sequence) + uint64_t(k));
    if (window_has_learned_target(shard_, redrawn, opt_.seq_len, scratch)) return redrawn;
  }
  throw DataError(shard_.mask_path() + ": no learned target in " + std::to_string(kMaxRedraws + 1) +
                  " windows of seq_len " + std::to_string(opt_.seq_len) + " drawn for sequence " +
                  std::to_string(global_sequence) + "; the mask marks (almost) no token of " + shard_.path() +
                  " as learned");
}

Batch Sampler::batch(int64_t step, int micro) const {
  if (step < 0 || micro < 0 || micro >= opt_.grad_accum) {
    throw DataError("sampler for " + shard_.path() + ": step " + std::to_string(step) + ", micro " +
                    std::to_string(micro) + " out of range (grad_accum " + std::to_string(opt_.grad_accum) + ")");
  }
  std::vector<uint64_t> starts(static_cast<size_t>(opt_.micro_batch_size));
  for (int i = 0; i < opt_.micro_batch_size; ++i) starts[size_t(i)] = window_start(global_sequence(step, micro, i));
  return windows_to_batch(shard_, starts, opt_.seq_len);
}

Batch eval_batch(const Shard& shard, int index, int n_batches, int batch_size, int seq_len) {
  if (n_batches < 1 || index < 0 || index >= n_batches || batch_size < 1 || seq_len < 1) {
    throw DataError("eval batch " + std::to_string(index) + " of " + std::to_string(n_batches) + " from " +
                    shard.path() + ": invalid arguments (batch_size " + std::to_string(batch_size) + ", seq_len " +
                    std::to_string(seq_len) + ")");
  }
  require_window(shard, seq_len);
  const uint64_t window = uint64_t(seq_len) + 1;
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
