// A blend of data sources (data.sources): each has a weight, a train split and optionally a val split.
// Which source a training sequence comes from is hashed from (seed, global sequence id) against the
// normalised weights, so it is a pure function like the window itself: resumes and any layout draw the
// same sources, and over N sequences source s is drawn ~ Binomial(N, w_s / sum w) times.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/dataset.h"

namespace moetrain::data {

struct BlendSource {
  std::string name;   // metrics keys tokens/<name>, val_loss/<name>
  double weight = 1;  // > 0; normalised over the blend
  Dataset train;
  std::optional<Dataset> val;  // absent when the source's folder holds no val split
};

class Blend {
 public:
  // Throws DataError on a weight <= 0 or none at all.
  explicit Blend(std::vector<BlendSource> sources, PackingOptions packing = {});
  size_t size() const { return sources_.size(); }
  const BlendSource& source(size_t i) const { return sources_.at(i); }
  const std::vector<BlendSource>& sources() const { return sources_; }
  // data.packing and data.truncate: how training and validation batches are cut from every source.
  const PackingOptions& packing() const { return packing_; }
  // The source of a global sequence id; 0 without hashing when there is one source.
  size_t choose(uint64_t seed, uint64_t global_sequence) const;
  // The fraction of sequences source i is drawn for (its weight over the sum), in [0, 1].
  double share(size_t i) const { return cumulative_.at(i) - (i ? cumulative_[i - 1] : 0.0); }
  // Sequences [first, first + count) drawn from each source (count per source).
  std::vector<uint64_t> count_sources(uint64_t seed, uint64_t first, uint64_t count) const;

 private:
  std::vector<BlendSource> sources_;
  PackingOptions packing_;
  std::vector<double> cumulative_;  // normalised running sums of the weights; back() = 1
};

// The run's data: data.sources when set (each folder's train split, its val split if any), else the one
// folder data.dir (train and val both required, as before). Each error is one line naming the key or the
// folder: a weight <= 0, an unknown folder, a source without train shards or without tokens, shards of a
// larger vocabulary than model_vocab_size, a train split with no window of seq_len + 1 tokens. With
// data.packing: documents, each split is packed now (Packing's errors, and its summary in the log).
Blend open_blend(const config::DataConfig& data, int64_t model_vocab_size);

}  // namespace moetrain::data
