// Many shards as one split: the start-up pass (headers only), the bounded cache of open shards, and the
// index from a split-wide window start to (shard, start).
#include "data/dataset.h"

#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <sstream>

#include "common/errors.h"
#include "common/files.h"

namespace moetrain::data {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

struct Dataset::State {
  std::string name;
  std::vector<std::string> paths;
  std::vector<uint64_t> tokens;
  uint64_t total = 0;
  DatasetOptions options;
  bool keep_open = false;  // one shard: opened (and scanned) once, never closed
  std::mutex mutex;        // the cache below
  std::vector<std::shared_ptr<const Shard>> open;
  std::list<size_t> recent;  // open shards, most recently used first
  std::mutex packing_mutex;  // the plans below, made on first use
  std::map<std::pair<int, bool>, std::unique_ptr<const Packing>> packings;
};

std::vector<std::string> Dataset::shard_paths(const std::string& dir, const std::string& split) {
  const std::string single = split + ".bin", prefix = split + "-";
  bool has_single = false;
  std::vector<std::string> many;
  for (const auto& name : files::list_directory(dir)) {  // sorted by name
    if (name == single) has_single = true;
    else if (name.rfind(prefix, 0) == 0 && ends_with(name, ".bin") && !ends_with(name, ".mask.bin"))
      many.push_back(files::join(dir, name));
  }
  if (has_single && !many.empty())
    throw DataError(dir + " holds both " + single + " and " + std::to_string(many.size()) + " " + prefix +
                    "*.bin shard(s): keep one form of the " + split + " split");
  if (has_single) return {files::join(dir, single)};
  return many;
}

Dataset Dataset::borrow(const Shard& shard) {
  Dataset d;
  d.state_ = std::make_shared<State>();
  State& s = *d.state_;
  s.name = shard.path();
  s.paths = {shard.path()};
  s.tokens = {shard.size()};
  s.total = shard.size();
  s.keep_open = true;
  s.open = {std::shared_ptr<const Shard>(&shard, [](const Shard*) {})};
  return d;
}

Dataset Dataset::open(const std::string& dir, const std::string& split, DatasetOptions options) {
  if (options.max_open_shards < 1) throw DataError("max_open_shards must be at least 1");
  Dataset d;
  d.state_ = std::make_shared<State>();
  State& s = *d.state_;
  s.options = options;
  s.paths = files::is_directory(dir) ? shard_paths(dir, split) : std::vector<std::string>{};
  if (s.paths.empty())
    throw DataError("cannot open shard " + files::join(dir, split + ".bin") + ": no such file, nor any " + split +
                    "-*.bin in " + dir);
  if (s.paths.size() == 1) {  // today's single file: scanned whole at open, kept open
    auto shard = std::make_shared<const Shard>(s.paths[0], ShardOptions{true, options.vocab_bound});
    s.name = s.paths[0];
    s.tokens = {shard->size()};
    s.total = shard->size();
    s.keep_open = true;
    s.open = {shard};
    return d;
  }
  // Many: each header (and mask header) is read and checked now, then closed again.
  s.name = files::join(dir, split + "-*.bin") + " (" + std::to_string(s.paths.size()) + " shards)";
  s.open.resize(s.paths.size());
  for (const auto& path : s.paths) {
    const Shard shard(path, ShardOptions{false, options.vocab_bound});
    if (options.vocab_bound > 0) require_vocabulary(shard, int64_t(options.vocab_bound));  // header vocabularies
    s.tokens.push_back(shard.size());
    s.total += shard.size();
  }
  return d;
}

const std::string& Dataset::name() const { return state_->name; }
size_t Dataset::n_shards() const { return state_->paths.size(); }
const std::string& Dataset::shard_path(size_t i) const { return state_->paths.at(i); }
uint64_t Dataset::shard_tokens(size_t i) const { return state_->tokens.at(i); }
uint64_t Dataset::size() const { return state_->total; }

std::shared_ptr<const Shard> Dataset::shard(size_t i) const {
  State& s = *state_;
  if (s.keep_open) return s.open.at(i);
  std::lock_guard<std::mutex> lock(s.mutex);
  auto& slot = s.open.at(i);
  if (slot) {
    s.recent.remove(i);
    s.recent.push_front(i);
    return slot;
  }
  auto shard = std::make_shared<const Shard>(s.paths[i], ShardOptions{false, s.options.vocab_bound});
  if (shard->size() != s.tokens[i])
    throw DataError(s.paths[i] + ": holds " + std::to_string(shard->size()) + " tokens, but " +
                    std::to_string(s.tokens[i]) + " when this run started: it was rewritten while the run read it; "
                    "restore it and resume from the last checkpoint");
  if (s.recent.size() >= size_t(s.options.max_open_shards)) {  // close the least recently used
    s.open[s.recent.back()].reset();
    s.recent.pop_back();
  }
  slot = shard;
  s.recent.push_front(i);
  return shard;
}

const Packing& Dataset::packing(int seq_len, bool truncate) const {
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.packing_mutex);
  auto& plan = s.packings[{seq_len, truncate}];
  if (!plan) plan = std::make_unique<const Packing>(*this, seq_len, truncate);
  return *plan;
}

Packing::Packing(const Dataset& split, int seq_len, bool truncate) : seq_len_(seq_len), truncate_(truncate) {
  if (seq_len < 1) throw DataError(split.name() + ": packing into sequences of " + std::to_string(seq_len) + " tokens");
  // The documents in order, cut to seq_len, those without a learned target left out.
  std::vector<PackedDocument> docs;
  std::vector<uint8_t> mask;
  for (size_t i = 0; i < split.n_shards(); ++i) {
    const auto shard = split.shard(i);
    const std::vector<uint64_t> starts = shard->document_starts();  // throws naming the shard when it has none
    for (size_t d = 0; d < starts.size(); ++d) {
      const uint64_t begin = starts[d], end = d + 1 < starts.size() ? starts[d + 1] : shard->size();
      uint64_t length = end - begin;
      if (length > uint64_t(seq_len)) {
        if (!truncate)
          throw DataError(shard->path() + ": document " + std::to_string(d) + " (tokens " + std::to_string(begin) +
                          ".." + std::to_string(end) + ") holds " + std::to_string(length) +
                          " tokens, more than data.seq_len = " + std::to_string(seq_len) +
                          "; data.truncate: true keeps its first seq_len tokens instead");
        ++stats_.truncated;
        stats_.truncated_tokens += length - uint64_t(seq_len);
        length = uint64_t(seq_len);
      }
      bool learned = length > 1;  // token j predicts token j + 1 of the same document
      if (learned && shard->has_mask()) {
        mask.resize(length - 1);
        shard->read_mask(begin + 1, length - 1, mask.data());
        learned = std::find(mask.begin(), mask.end(), uint8_t(1)) != mask.end();
      }
      if (!learned) {
        ++stats_.dropped;
        continue;
      }
      docs.push_back(PackedDocument{uint32_t(i), uint32_t(length), begin});
    }
  }
  if (docs.empty())
    throw DataError(split.name() + ": none of its " + std::to_string(stats_.dropped) +
                    " documents has a learned target (each is a single token, or its loss mask learns none of it)");

  // First fit: a max tree over every sequence's free room; a sequence not opened yet has all seq_len.
  // There are never more sequences than documents, so the tree has a leaf for each.
  size_t leaves = 1;
  while (leaves < docs.size()) leaves <<= 1;
  std::vector<uint32_t> room(2 * leaves, uint32_t(seq_len));
  std::vector<uint64_t> home(docs.size());
  uint64_t opened = 0;
  for (size_t d = 0; d < docs.size(); ++d) {
    const uint32_t need = docs[d].length;
    size_t node = 1;
    while (node < leaves) node = room[2 * node] >= need ? 2 * node : 2 * node + 1;
    home[d] = node - leaves;
    opened = std::max<uint64_t>(opened, home[d] + 1);
    room[node] -= need;
    for (node /= 2; node >= 1; node /= 2) room[node] = std::max(room[2 * node], room[2 * node + 1]);
    stats_.tokens += need;
  }
  // Documents grouped by sequence, each sequence's in document order.
  first_.assign(opened + 1, 0);
  for (uint64_t h : home) ++first_[h + 1];
  for (uint64_t i = 0; i < opened; ++i) first_[i + 1] += first_[i];
  documents_.resize(docs.size());
  std::vector<uint64_t> next(first_.begin(), first_.end() - 1);
  for (size_t d = 0; d < docs.size(); ++d) documents_[next[home[d]]++] = docs[d];
  stats_.documents = docs.size();
  stats_.sequences = opened;
}

std::span<const PackedDocument> Packing::sequence(uint64_t i) const {
  if (i >= size())
    throw DataError("packed sequence " + std::to_string(i) + " of " + std::to_string(size()) + " does not exist");
  return {documents_.data() + first_[i], documents_.data() + first_[i + 1]};
}

std::string Packing::describe() const {
  const double slots = double(stats_.sequences) * seq_len_;
  std::ostringstream text;
  text.precision(3);
  text << "packed " << stats_.documents << " documents into " << stats_.sequences << " sequences of " << seq_len_
       << " tokens (" << 100.0 * (1.0 - double(stats_.tokens) / slots) << "% padding)";
  if (stats_.truncated)
    text << "; " << stats_.truncated << " longer than data.seq_len cut to it (" << stats_.truncated_tokens
         << " tokens left out)";
  if (stats_.dropped) text << "; " << stats_.dropped << " without a learned target left out";
  return text.str();
}

WindowIndex::WindowIndex(const Dataset& dataset, int seq_len) {
  if (dataset.n_shards() == 1) require_window(*dataset.shard(0), seq_len);
  cumulative_.reserve(dataset.n_shards() + 1);
  cumulative_.push_back(0);
  for (size_t i = 0; i < dataset.n_shards(); ++i) {
    const uint64_t tokens = dataset.shard_tokens(i);
    cumulative_.push_back(cumulative_.back() + (tokens > uint64_t(seq_len) ? tokens - uint64_t(seq_len) : 0));
  }
  if (n_starts() == 0)
    throw DataError(dataset.name() + ": no shard holds " + std::to_string(seq_len + 1) + " tokens; data.seq_len = " +
                    std::to_string(seq_len) + " needs at least " + std::to_string(seq_len + 1) + " (one window)");
}

std::pair<size_t, uint64_t> WindowIndex::locate(uint64_t k) const {
  // The shard whose range [cumulative_[i], cumulative_[i + 1]) holds k: empty ranges are skipped.
  const size_t i = size_t(std::upper_bound(cumulative_.begin(), cumulative_.end(), k) - cumulative_.begin()) - 1;
  return {i, k - cumulative_[i]};
}

}  // namespace moetrain::data
