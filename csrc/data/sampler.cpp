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

struct Window {
  std::shared_ptr<const Shard> shard;
  uint64_t start = 0;
};

// Reads windows of seq_len + 1 tokens into (inputs, targets); targets whose token a shard's mask does
// not learn become kIgnoreTarget.
Batch windows_to_batch(const std::vector<Window>& windows, int seq_len) {
  const int64_t n_sequences = int64_t(windows.size());
  torch::Tensor windows_BW = torch::empty({n_sequences, seq_len + 1}, torch::kInt64);
  int64_t* p = windows_BW.data_ptr<int64_t>();
  bool masked = false;
  for (int64_t b = 0; b < n_sequences; ++b) {
    windows[b].shard->read(windows[b].start, uint64_t(seq_len) + 1, p + b * (seq_len + 1));
    masked = masked || windows[b].shard->has_mask();
  }
  Batch batch{windows_BW.slice(1, 0, seq_len).contiguous(), windows_BW.slice(1, 1, seq_len + 1).contiguous()};
  if (masked) {
    torch::Tensor learned_BS = torch::empty({n_sequences, seq_len}, torch::kUInt8);
    uint8_t* m = learned_BS.data_ptr<uint8_t>();
    for (int64_t b = 0; b < n_sequences; ++b)
      windows[b].shard->read_mask(windows[b].start + 1, uint64_t(seq_len), m + b * seq_len);
    batch.targets.masked_fill_(learned_BS.eq(0), kIgnoreTarget);
  }
  return batch;
}

bool window_has_learned_target(const Window& w, int seq_len, std::vector<uint8_t>& scratch) {
  if (!w.shard->has_mask()) return true;
  scratch.resize(size_t(seq_len));
  w.shard->read_mask(w.start + 1, uint64_t(seq_len), scratch.data());
  return std::find(scratch.begin(), scratch.end(), uint8_t(1)) != scratch.end();
}

Window locate(const Dataset& split, const WindowIndex& index, uint64_t k) {
  const auto [shard, start] = index.locate(k);
  return {split.shard(shard), start};
}

}  // namespace

uint64_t mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

Sampler::Sampler(const Shard& shard, SamplerOptions opt)
    : Sampler(Blend({BlendSource{shard.path(), 1.0, Dataset::borrow(shard), std::nullopt}}), opt) {}

Sampler::Sampler(const Blend& blend, SamplerOptions opt) : blend_(blend), opt_(opt) {
  const std::string& first = blend_.source(0).train.name();
  if (opt_.seq_len < 1 || opt_.micro_batch_size < 1 || opt_.grad_accum < 1 || opt_.world_size < 1 ||
      opt_.rank < 0 || opt_.rank >= opt_.world_size) {
    throw DataError("sampler for " + first + ": invalid options (seq_len " + std::to_string(opt_.seq_len) +
                    ", micro_batch_size " + std::to_string(opt_.micro_batch_size) + ", grad_accum " +
                    std::to_string(opt_.grad_accum) + ", rank " + std::to_string(opt_.rank) + " of world_size " +
                    std::to_string(opt_.world_size) + ")");
  }
  for (const auto& source : blend_.sources()) {
    windows_.emplace_back(source.train, opt_.seq_len);
    if (source.train.n_shards() != 1) continue;  // many shards: masks are checked as windows are read
    const auto shard = source.train.shard(0);
    if (shard->has_mask() && shard->scanned() && shard->learned_tokens() == 0)
      throw DataError(shard->mask_path() + " marks no token of " + shard->path() +
                      " as learned: training would have no loss");
  }
}

uint64_t Sampler::sequences_per_step() const {
  return uint64_t(opt_.grad_accum) * uint64_t(opt_.world_size) * uint64_t(opt_.micro_batch_size);
}

uint64_t Sampler::global_sequence(int64_t step, int micro, int i) const {
  return ((uint64_t(step) * uint64_t(opt_.grad_accum) + uint64_t(micro)) * uint64_t(opt_.world_size) +
          uint64_t(opt_.rank)) * uint64_t(opt_.micro_batch_size) + uint64_t(i);
}

uint64_t Sampler::offset(uint64_t global_sequence) const {
  // Any start k in [0, n_starts) leaves room for the seq_len + 1 token window in its shard.
  return mix64(opt_.seed ^ mix64(global_sequence + kSequenceSalt)) % windows_[source(global_sequence)].n_starts();
}

uint64_t Sampler::window_start(uint64_t global_sequence) const {
  const size_t s = source(global_sequence);
  const Dataset& split = blend_.source(s).train;
  const uint64_t start = offset(global_sequence);
  std::vector<uint8_t> scratch;
  if (window_has_learned_target(locate(split, windows_[s], start), opt_.seq_len, scratch)) return start;
  for (int k = 1; k <= kMaxRedraws; ++k) {  // redraws stay in the sequence's source
    const uint64_t redrawn =
        mix64(opt_.seed ^ mix64(mix64(global_sequence) + uint64_t(k) + kSequenceSalt)) % windows_[s].n_starts();
    if (window_has_learned_target(locate(split, windows_[s], redrawn), opt_.seq_len, scratch)) return redrawn;
  }
  const std::string drawn = ": no learned target in " + std::to_string(kMaxRedraws + 1) + " windows of seq_len " +
                            std::to_string(opt_.seq_len) + " drawn for sequence " + std::to_string(global_sequence);
  if (split.n_shards() == 1)
    throw DataError(split.shard(0)->mask_path() + drawn + "; the mask marks (almost) no token of " +
                    split.shard(0)->path() + " as learned");
  throw DataError(split.name() + drawn + "; their loss masks mark (almost) no token as learned");
}

Batch Sampler::batch(int64_t step, int micro) const {
  if (step < 0 || micro < 0 || micro >= opt_.grad_accum) {
    throw DataError("sampler for " + blend_.source(0).train.name() + ": step " + std::to_string(step) + ", micro " +
                    std::to_string(micro) + " out of range (grad_accum " + std::to_string(opt_.grad_accum) + ")");
  }
  std::vector<Window> windows(static_cast<size_t>(opt_.micro_batch_size));
  for (int i = 0; i < opt_.micro_batch_size; ++i) {
    const uint64_t id = global_sequence(step, micro, i);
    const size_t s = source(id);
    windows[size_t(i)] = locate(blend_.source(s).train, windows_[s], window_start(id));
  }
  return windows_to_batch(windows, opt_.seq_len);
}

Batch eval_batch(const Dataset& split, int index, int n_batches, int batch_size, int seq_len) {
  if (n_batches < 1 || index < 0 || index >= n_batches || batch_size < 1 || seq_len < 1) {
    throw DataError("eval batch " + std::to_string(index) + " of " + std::to_string(n_batches) + " from " +
                    split.name() + ": invalid arguments (batch_size " + std::to_string(batch_size) + ", seq_len " +
                    std::to_string(seq_len) + ")");
  }
  const WindowIndex windows(split, seq_len);  // throws when no shard holds a window
  const uint64_t window = uint64_t(seq_len) + 1;
  const uint64_t n_windows = uint64_t(n_batches) * uint64_t(batch_size);
  const uint64_t n_valid_starts = windows.n_starts();
  // One shard: window j of n_windows starts at j * stride; when the shard is too short for disjoint
  // windows the starts are spread evenly over every valid start instead (the windows then overlap).
  // Many shards: spread evenly over every valid start of every shard.
  const uint64_t stride = split.n_shards() == 1 ? split.size() / n_windows : 0;
  std::vector<Window> starts(static_cast<size_t>(batch_size));
  for (int b = 0; b < batch_size; ++b) {
    const uint64_t j = uint64_t(index) * uint64_t(batch_size) + uint64_t(b);
    const uint64_t k = stride >= window ? j * stride : uint64_t((unsigned __int128)j * n_valid_starts / n_windows);
    starts[size_t(b)] = stride >= window ? Window{split.shard(0), k} : locate(split, windows, k);
  }
  return windows_to_batch(starts, seq_len);
}

Batch eval_batch(const Shard& shard, int index, int n_batches, int batch_size, int seq_len) {
  return eval_batch(Dataset::borrow(shard), index, n_batches, batch_size, seq_len);
}

}  // namespace moetrain::data
