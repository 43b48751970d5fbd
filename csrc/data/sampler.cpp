// Stateless sampling: a batch is computed from (seed, step, micro, rank) alone, so resuming a run needs
// only the step counter and changing the world size never makes two ranks read the same sequence id.
#include "data/sampler.h"

#include <algorithm>
#include <bit>

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
  // Two buffers: with one row both slices are contiguous already, and contiguous() would return views
  // of one storage, so masking a target would overwrite the next input token.
  Batch batch{windows_BW.slice(1, 0, seq_len).clone(), windows_BW.slice(1, 1, seq_len + 1).clone(), {}};
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

// One row of a packed batch: a packed sequence of a split.
struct PackedRow {
  const Dataset* split = nullptr;
  std::span<const PackedDocument> documents;
};

// Reads packed sequences into (inputs, targets, positions): each document where the packing put it,
// its positions from 0, its targets its own next tokens (kIgnoreTarget where its mask does not learn
// them, and at its last token); padding is token 0 at position 0 with no target.
Batch packed_to_batch(const std::vector<PackedRow>& rows, int seq_len) {
  const int64_t B = int64_t(rows.size()), S = seq_len;
  Batch batch{torch::zeros({B, S}, torch::kInt64), torch::full({B, S}, kIgnoreTarget, torch::kInt64),
              torch::zeros({B, S}, torch::kInt64)};
  int64_t* in = batch.inputs.data_ptr<int64_t>();
  int64_t* target = batch.targets.data_ptr<int64_t>();
  int64_t* position = batch.positions.data_ptr<int64_t>();
  std::vector<uint8_t> learned;
  for (int64_t b = 0; b < B; ++b) {
    int64_t at = b * S;
    for (const PackedDocument& doc : rows[size_t(b)].documents) {
      const auto shard = rows[size_t(b)].split->shard(doc.shard);
      const int64_t L = doc.length;
      TORCH_CHECK(at + L <= (b + 1) * S, "[data] a packed sequence holds more than ", S, " tokens");
      shard->read(doc.start, uint64_t(L), in + at);
      learned.assign(size_t(L), uint8_t(1));
      if (shard->has_mask() && L > 1) shard->read_mask(doc.start + 1, uint64_t(L - 1), learned.data());
      for (int64_t j = 0; j < L; ++j) {
        position[at + j] = j;
        if (j + 1 < L && learned[size_t(j)]) target[at + j] = in[at + j + 1];
      }
      at += L;
    }
  }
  return batch;
}

// A bijection of [0, n) keyed by `key`: a four-round Feistel network on the smallest even number of
// bits that covers n, walked back into [0, n) (each step stays in the cycle of i, so this ends and is
// still a bijection). A pure function, where a shuffled list would be state to keep or rebuild.
uint64_t permute(uint64_t i, uint64_t n, uint64_t key) {
  if (n <= 1) return 0;
  int bits = 64 - std::countl_zero(n - 1);
  bits = std::max(2, bits + (bits & 1));
  const int half = bits / 2;
  const uint64_t low = (uint64_t(1) << half) - 1;
  uint64_t x = i;
  do {
    uint64_t left = x >> half, right = x & low;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t mixed = left ^ (mix64(key ^ mix64(right + round * 0x9e3779b97f4a7c15ULL)) & low);
      left = right;
      right = mixed;
    }
    x = (left << half) | right;
  } while (x >= n);
  return x;
}

// Separates the epoch keys of packed sequences from the other hashes of the seed.
constexpr uint64_t kEpochSalt = 0xd1b54a32d192ed03ULL;

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
    if (blend_.packing().documents) {  // the plan is the split's: made once, shared with every reader
      packings_.push_back(&source.train.packing(opt_.seq_len, blend_.packing().truncate));
      continue;
    }
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

uint64_t Sampler::packed_sequence(uint64_t global_sequence) const {
  const uint64_t n = packings_.at(source(global_sequence))->size();
  if (blend_.size() > 1) return mix64(opt_.seed ^ mix64(global_sequence + kSequenceSalt)) % n;
  const uint64_t epoch = global_sequence / n;
  return permute(global_sequence % n, n, mix64(opt_.seed ^ mix64(epoch + kEpochSalt)));
}

Batch Sampler::batch(int64_t step, int micro) const {
  if (step < 0 || micro < 0 || micro >= opt_.grad_accum) {
    throw DataError("sampler for " + blend_.source(0).train.name() + ": step " + std::to_string(step) + ", micro " +
                    std::to_string(micro) + " out of range (grad_accum " + std::to_string(opt_.grad_accum) + ")");
  }
  if (blend_.packing().documents) {
    std::vector<PackedRow> rows(static_cast<size_t>(opt_.micro_batch_size));
    for (int i = 0; i < opt_.micro_batch_size; ++i) {
      const uint64_t id = global_sequence(step, micro, i);
      const size_t s = source(id);
      rows[size_t(i)] = {&blend_.source(s).train, packings_[s]->sequence(packed_sequence(id))};
    }
    return packed_to_batch(rows, opt_.seq_len);
  }
  std::vector<Window> windows(static_cast<size_t>(opt_.micro_batch_size));
  for (int i = 0; i < opt_.micro_batch_size; ++i) {
    const uint64_t id = global_sequence(step, micro, i);
    const size_t s = source(id);
    windows[size_t(i)] = locate(blend_.source(s).train, windows_[s], window_start(id));
  }
  return windows_to_batch(windows, opt_.seq_len);
}

Batch eval_batch(const Dataset& split, int index, int n_batches, int batch_size, int seq_len, PackingOptions packing) {
  if (n_batches < 1 || index < 0 || index >= n_batches || batch_size < 1 || seq_len < 1) {
    throw DataError("eval batch " + std::to_string(index) + " of " + std::to_string(n_batches) + " from " +
                    split.name() + ": invalid arguments (batch_size " + std::to_string(batch_size) + ", seq_len " +
                    std::to_string(seq_len) + ")");
  }
  if (packing.documents) {  // sequence j of n_batches * batch_size: evenly spread, repeated when fewer
    const Packing& plan = split.packing(seq_len, packing.truncate);
    const uint64_t n_rows = uint64_t(n_batches) * uint64_t(batch_size);
    std::vector<PackedRow> rows(static_cast<size_t>(batch_size));
    for (int b = 0; b < batch_size; ++b) {
      const uint64_t j = uint64_t(index) * uint64_t(batch_size) + uint64_t(b);
      rows[size_t(b)] = {&split, plan.sequence(uint64_t((unsigned __int128)j * plan.size() / n_rows))};
    }
    return packed_to_batch(rows, seq_len);
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

Batch packed_batch(const Dataset& split, const Packing& plan, uint64_t first, uint64_t count) {
  std::vector<PackedRow> rows;
  for (uint64_t i = first; i < first + count; ++i) rows.push_back({&split, plan.sequence(i)});
  return packed_to_batch(rows, plan.seq_len());
}

Batch eval_batch(const Shard& shard, int index, int n_batches, int batch_size, int seq_len) {
  return eval_batch(Dataset::borrow(shard), index, n_batches, batch_size, seq_len, {});
}

}  // namespace moetrain::data
