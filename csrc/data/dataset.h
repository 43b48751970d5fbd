// A split of a data folder ("train" or "val") as one set of windows over its shards: either one file
// <split>.bin or many <split>-*.bin (name order), in any format shard.h reads. A window never straddles
// two shards (documents in different files are unrelated). Shards are opened on demand and at most
// DatasetOptions::max_open_shards at once, so a split of thousands of files holds a bounded number of
// descriptors; a start-up pass reads only each header. A single file is opened once and scanned whole.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/shard.h"

namespace moetrain::data {

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

}  // namespace moetrain::data
