// `moetrain inspect-data DIR`: what a data folder holds (per split: format, shards, tokens, documents,
// vocabulary bound, loss masks), read the way training reads it; every header is verified, and with the
// default full check every token and mask entry too. Damage is one line naming the file and field, exit 1.
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "common/errors.h"
#include "common/files.h"
#include "data/dataset.h"
#include "data/shard.h"

namespace moetrain::cli {
namespace {

struct SplitSummary {
  std::string split, format, first_shard;
  size_t shards = 0, masks = 0;
  uint64_t tokens = 0, documents = 0, vocab_bound = 0, smallest_shard = UINT64_MAX;
  bool documents_known = true, vocab_from_header = true;
};

}  // namespace

int run_inspect_data(const std::vector<std::string>& argv) {
  const Command command{"inspect-data",
                        "Print what a data folder holds (train and val splits: format, shards, tokens, documents, "
                        "vocabulary bound, masks) and verify every header; exit 1 naming the file and field on damage.",
                        {{"dir", "DIR", "the folder (or the first argument): train.bin / train-*.bin, val.bin / "
                                        "val-*.bin in the moetrain, llm.c or Megatron (.bin + .idx) format"},
                         {"headers-only", "", "check headers only (fast on a large corpus); the vocabulary bound of "
                                              "llm.c and Megatron shards is then the dtype's range"},
                         {"json", "", "print one JSON object"}}};
  std::vector<std::string> rest = argv;
  if (!rest.empty() && rest.front().rfind("--", 0) != 0) rest.insert(rest.begin(), "--dir");
  Args args(command, rest);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  const std::string dir = args.require("dir");
  if (!files::is_directory(dir)) throw DataError(dir + " is not a folder");
  const bool scan = !args.has("headers-only");

  std::vector<SplitSummary> splits;
  for (const char* split : {"train", "val"}) {
    SplitSummary s;
    s.split = split;
    for (const auto& path : data::Dataset::shard_paths(dir, split)) {
      const data::Shard shard(path, data::ShardOptions{scan, 0});  // one open at a time
      const std::string format = data::format_name(shard.format());
      s.format = s.format.empty() || s.format == format ? format : "mixed";
      if (s.first_shard.empty()) s.first_shard = path;
      ++s.shards;
      s.masks += shard.has_mask() ? 1 : 0;
      s.tokens += shard.size();
      s.smallest_shard = std::min<uint64_t>(s.smallest_shard, shard.size());
      s.vocab_bound = std::max(s.vocab_bound, shard.vocab_size());
      s.vocab_from_header = s.vocab_from_header && shard.vocab_in_header();
      if (shard.has_documents()) s.documents += shard.documents();
      else s.documents_known = false;
    }
    if (s.shards > 0) splits.push_back(s);
  }
  if (splits.empty()) throw DataError(dir + " holds no train.bin, train-*.bin, val.bin or val-*.bin");

  auto bound_source = [&](const SplitSummary& s) {
    return std::string(s.vocab_from_header ? "header" : scan ? "largest token + 1" : "token dtype's range");
  };
  if (args.has("json")) {
    nlohmann::json j = {{"dir", dir}, {"verified", scan ? "every token" : "headers"}};
    for (const auto& s : splits) {
      j[s.split] = {{"format", s.format}, {"shards", s.shards}, {"tokens", s.tokens}, {"masks", s.masks},
                    {"vocab_bound", s.vocab_bound}, {"vocab_bound_from", bound_source(s)},
                    {"smallest_shard_tokens", s.smallest_shard}};
      j[s.split]["documents"] = s.documents_known ? nlohmann::json(s.documents) : nlohmann::json(nullptr);
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("%s (verified: %s)\n", dir.c_str(), scan ? "headers and every token" : "headers only");
  std::printf("%-6s %-9s %8s %14s %10s  %-26s %5s\n", "split", "format", "shards", "tokens", "documents",
              "vocabulary bound", "masks");
  for (const auto& s : splits) {
    const std::string bound = std::to_string(s.vocab_bound) + " (" + bound_source(s) + ")";
    std::printf("%-6s %-9s %8zu %14s %10s  %-26s %5zu\n", s.split.c_str(), s.format.c_str(), s.shards,
                std::to_string(s.tokens).c_str(), s.documents_known ? std::to_string(s.documents).c_str() : "-",
                bound.c_str(), s.masks);
  }
  return 0;
}

}  // namespace moetrain::cli
