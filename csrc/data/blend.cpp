// Blends: the weighted, hashed choice of a source per sequence, and opening data.dir or data.sources
// with every check a run makes before its first step.
#include "data/blend.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "common/errors.h"
#include "common/files.h"
#include "common/log.h"
#include "data/sampler.h"

namespace moetrain::data {
namespace {

// Separates the source choice from the window offset, both hashed from the global sequence id.
constexpr uint64_t kSourceSalt = 0x632be59bd9b4e019ULL;

std::string without_tag(const DataError& e) {
  std::string m = e.what();
  return m.rfind("[data] ", 0) == 0 ? m.substr(7) : m;
}

PackingOptions packing_of(const config::DataConfig& data) { return {data.packing == "documents", data.truncate}; }

// The checks of one split before training: vocabulary and one window, or with documents the packing
// (made now, kept by the split, and summarised in the log).
void check_split(const Dataset& split, int64_t model_vocab_size, const config::DataConfig& data) {
  if (split.n_shards() == 1) require_vocabulary(*split.shard(0), model_vocab_size);
  if (data.packing != "documents") {
    WindowIndex(split, data.seq_len);  // throws when no shard holds a window
    return;
  }
  log_line("[data] " + split.name() + ": " + split.packing(data.seq_len, data.truncate).describe());
}

}  // namespace

Blend::Blend(std::vector<BlendSource> sources, PackingOptions packing)
    : sources_(std::move(sources)), packing_(packing) {
  if (sources_.empty()) throw DataError("a blend needs at least one source");
  double largest = 0;
  for (const auto& s : sources_) {
    if (!(s.weight > 0) || !std::isfinite(s.weight))
      throw DataError("source '" + s.name + "': weight " + std::to_string(s.weight) + " must be a finite number > 0");
    largest = std::max(largest, s.weight);
  }
  // Relative to the largest weight, so that no sum overflows (weights of 1e308 are shares like any other).
  double total = 0;
  for (const auto& s : sources_) total += s.weight / largest;
  double running = 0;
  for (const auto& s : sources_) cumulative_.push_back((running += s.weight / largest) / total);
  cumulative_.back() = 1.0;
}

size_t Blend::choose(uint64_t seed, uint64_t global_sequence) const {
  if (sources_.size() == 1) return 0;
  const double u = double(mix64(seed ^ mix64(global_sequence + kSourceSalt)) >> 11) * 0x1p-53;  // [0, 1)
  const size_t i = size_t(std::upper_bound(cumulative_.begin(), cumulative_.end(), u) - cumulative_.begin());
  return std::min(i, sources_.size() - 1);
}

std::vector<uint64_t> Blend::count_sources(uint64_t seed, uint64_t first, uint64_t count) const {
  std::vector<uint64_t> counts(sources_.size(), 0);
  if (sources_.size() == 1) {
    counts[0] = count;
    return counts;
  }
  for (uint64_t id = first; id < first + count; ++id) ++counts[choose(seed, id)];
  return counts;
}

Blend open_blend(const config::DataConfig& data, int64_t model_vocab_size) {
  DatasetOptions options;
  options.vocab_bound = uint64_t(model_vocab_size);
  if (data.sources.empty()) {  // one folder: train and val both required, checked as before
    Dataset train = Dataset::open(data.dir, "train", options);
    Dataset val = Dataset::open(data.dir, "val", options);
    for (const Dataset* split : {&train, &val}) check_split(*split, model_vocab_size, data);
    return Blend({BlendSource{"data", 1.0, train, val}}, packing_of(data));
  }
  std::vector<BlendSource> sources;
  std::set<std::string> names;
  for (size_t i = 0; i < data.sources.size(); ++i) {
    const config::DataSource& entry = data.sources[i];
    std::string name = entry.name;
    if (name.empty()) {  // the folder's last component
      std::string dir = entry.dir;
      while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
      name = dir.substr(dir.rfind('/') == std::string::npos ? 0 : dir.rfind('/') + 1);
    }
    const std::string key = "data.sources[" + std::to_string(i) + "] ('" + name + "')";
    if (!names.insert(name).second)
      throw DataError(key + ": the name '" + name + "' is taken by an earlier source; give each a distinct name");
    if (!(entry.weight > 0)) throw DataError(key + ": weight " + std::to_string(entry.weight) + " must be > 0");
    if (!files::is_directory(entry.dir)) throw DataError(key + ": folder " + entry.dir + " does not exist");
    try {
      if (Dataset::shard_paths(entry.dir, "train").empty())
        throw DataError(entry.dir + " holds no train.bin or train-*.bin");
      BlendSource source{name, entry.weight, Dataset::open(entry.dir, "train", options), std::nullopt};
      if (source.train.size() == 0) throw DataError(source.train.name() + " holds no tokens: an empty source");
      check_split(source.train, model_vocab_size, data);
      if (!Dataset::shard_paths(entry.dir, "val").empty()) {
        source.val = Dataset::open(entry.dir, "val", options);
        check_split(*source.val, model_vocab_size, data);
      }
      sources.push_back(std::move(source));
    } catch (const DataError& e) {
      throw DataError(key + ": " + without_tag(e));
    }
  }
  if (std::none_of(sources.begin(), sources.end(), [](const BlendSource& s) { return s.val.has_value(); }))
    throw DataError("no folder of data.sources holds a val split (val.bin or val-*.bin): nothing to validate on");
  return Blend(std::move(sources), packing_of(data));
}

}  // namespace moetrain::data
