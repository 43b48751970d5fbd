// A split of a data folder ("train" or "val") as one set of windows over its shards: either one file
// <split>.bin or many <split>-*.bin (name order), in any format shard.h reads. A window never straddles
// two shards (documents in different files are unrelated). Shards are opened on demand and at most
// DatasetOptions::max_open_shards at once, so a split of thousands of files holds a bounded number of
// descriptors; a start-up pass reads only each header. A single file is opened once and scanned whole.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "data/shard.h"

namespace moetrain::data {

class Packing;

// data.packing and data.truncate: windows of the token stream, or whole documents packed (Packing).
struct PackingOptions {
  bool documents = false;
  bool truncate = true;
};

struct DatasetOptions {
  int max_open_shards = 64;  // many-shard splits: descriptors held at once (least recently used closed)
  uint64_t vocab_bound = 0;  // the model's vocabulary, for formats without one in the header (ShardOptions)
};

class Dataset {
 public:
  // One shard already open (moetrain eval of a file, tests); it must outlive the Dataset.
  static Dataset borrow(const Shard& shard);
  // The split's shards in dir; throws DataError naming the folder when it holds none, or both forms.
  static Dataset open(const std::string& dir, const std::string& split, DatasetOptions options = {});
  // The paths of the split's shards (sorted by name), empty when there are none; both forms is an error.
  static std::vector<std::string> shard_paths(const std::string& dir, const std::string& split);

  // "dir/train.bin", or "dir/train-*.bin (N shards)": for messages.
  const std::string& name() const;
  size_t n_shards() const;
  const std::string& shard_path(size_t i) const;
  uint64_t shard_tokens(size_t i) const;
  uint64_t size() const;  // tokens over every shard
  // Shard i, opened now if it is not open (its header must still say what the start-up pass read).
  std::shared_ptr<const Shard> shard(size_t i) const;
  // The split's documents packed into sequences of seq_len (data.packing: documents), computed on the
  // first call and kept: training and every evaluation read the same plan.
  const Packing& packing(int seq_len, bool truncate) const;

 private:
  struct State;
  std::shared_ptr<State> state_;
};

// Where windows of seq_len + 1 tokens may start: shard i offers max(0, tokens_i - seq_len) starts, and
// start k of the whole split is start k - (starts before shard i) of shard i. With one shard, k is the
// offset in it: the single-file sampler's arithmetic, unchanged.
class WindowIndex {
 public:
  // Throws DataError when no shard holds a window (with one shard: require_window's message).
  WindowIndex(const Dataset& dataset, int seq_len);
  uint64_t n_starts() const { return cumulative_.back(); }
  std::pair<size_t, uint64_t> locate(uint64_t k) const;  // (shard, start in it) of start k < n_starts()

 private:
  std::vector<uint64_t> cumulative_;  // cumulative_[i] = starts in shards before i; back() = all
};

// data.packing: documents. A packed sequence holds whole documents, each attending only to itself with
// positions from 0 (the model gets them as Batch::positions): document d of length L fills L input
// slots, its targets are its own next tokens, and its last token predicts nothing. The documents of a
// split (every shard's, in order) are packed first-fit: each goes into the first sequence with room
// for it, so the order is kept where it can be and a sequence is filled by later short documents.
// A document longer than seq_len is cut to its first seq_len tokens (truncate) or refused. A document
// with no learned target (one token, or a loss mask that learns none of it) is left out: every packed
// sequence has a target, so no micro-batch and no validation batch is without a loss.
struct PackedDocument {
  uint32_t shard = 0;   // index in the split
  uint32_t length = 0;  // tokens taken (at most seq_len)
  uint64_t start = 0;   // first token in the shard
};

struct PackingStats {
  uint64_t documents = 0;          // packed
  uint64_t truncated = 0;          // longer than seq_len, cut (truncate: true)
  uint64_t truncated_tokens = 0;   // the tokens those cuts left out
  uint64_t dropped = 0;            // no learned target
  uint64_t sequences = 0;          // packed sequences
  uint64_t tokens = 0;             // tokens they hold; sequences * seq_len - tokens is padding
};

class Packing {
 public:
  // Reads every shard's document table (and loss mask, where there is one); throws DataError naming
  // the shard when it marks no documents, or (truncate false) naming the first document longer than
  // seq_len, or when no document has a learned target.
  Packing(const Dataset& split, int seq_len, bool truncate);
  uint64_t size() const { return first_.size() - 1; }  // packed sequences
  std::span<const PackedDocument> sequence(uint64_t i) const;
  const PackingStats& stats() const { return stats_; }
  int seq_len() const { return seq_len_; }
  bool truncate() const { return truncate_; }
  // "packed 1200 documents into 80 sequences of 512 tokens (6.1% padding); 3 truncated (410 tokens
  // left out), 2 without a learned target left out": for the run's log.
  std::string describe() const;

 private:
  int seq_len_ = 0;
  bool truncate_ = true;
  std::vector<PackedDocument> documents_;  // by sequence, in document order within each
  std::vector<uint64_t> first_;            // sequence i is documents_[first_[i], first_[i + 1])
  PackingStats stats_;
};

}  // namespace moetrain::data
