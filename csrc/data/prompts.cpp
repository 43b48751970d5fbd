// RL prompt sets: the .jsonl reader, and the prepared set (a token shard of one document per prompt,
// the answers in a sidecar whose header names the shard, its sizes and a checksum of its tokens).
#include "data/prompts.h"

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ckpt/sha256.h"
#include "common/errors.h"
#include "common/files.h"
#include "data/shard.h"
#include "data/tokenizer.h"

using json = nlohmann::json;

namespace moetrain::data {
namespace {

constexpr const char* kFormat = "moetrain-rl-prompts";
constexpr int kVersion = 1;
constexpr const char* kShardName = "prompts.bin";

std::string base_name(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// FNV-1a 64, one step per token id: a shard swapped for one of the same sizes still differs here.
std::string checksum(const std::vector<int64_t>& tokens) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int64_t t : tokens) h = (h ^ uint64_t(t)) * 0x100000001b3ull;
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace

std::vector<RLPrompt> read_prompt_jsonl(const std::string& path) {
  if (!files::exists(path)) throw DataError("[rl] prompts file '" + path + "' does not exist");
  std::ifstream in(path);
  if (!in) throw DataError("[rl] cannot read prompts file '" + path + "'");
  const ByteTokenizer tok;
  std::vector<RLPrompt> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto where = path + ":" + std::to_string(n);
    auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_string() || !j.contains("answer"))
      throw DataError("[rl] " + where + ": expected a JSON object with a string \"prompt\" and an \"answer\"");
    RLPrompt p;
    p.prompt = j["prompt"].get<std::string>();
    p.answer = j["answer"].is_string() ? j["answer"].get<std::string>() : j["answer"].dump();
    if (p.prompt.empty()) throw DataError("[rl] " + where + ": the prompt is empty");
    p.tokens = tok.encode(p.prompt);
    out.push_back(std::move(p));
  }
  if (out.empty()) throw DataError("[rl] prompts file '" + path + "' holds no prompt");
  return out;
}

std::string answers_path_for(const std::string& shard_path) {
  const std::string stem = ends_with(shard_path, ".bin") ? shard_path.substr(0, shard_path.size() - 4) : shard_path;
  return stem + ".answers.jsonl";
}

PromptSetStats prepare_prompt_set(const std::string& jsonl_path, const std::string& out_dir, bool overwrite) {
  PromptSetStats stats;
  stats.shard = files::join(out_dir, kShardName);
  stats.answers = answers_path_for(stats.shard);
  if (!overwrite)  // before any work: a run may be reading the set that is there
    for (const auto& path : {stats.shard, stats.answers})
      if (files::exists(path))
        throw DataError(out_dir + " already holds a prompt set (" + base_name(path) +
                        "); pass --overwrite to replace it, or choose another --out folder");
  const auto prompts = read_prompt_jsonl(jsonl_path);
  std::vector<int64_t> tokens;
  std::vector<uint64_t> starts;
  std::string answers;
  for (const auto& p : prompts) {
    starts.push_back(tokens.size());
    tokens.insert(tokens.end(), p.tokens.begin(), p.tokens.end());
    answers += json{{"answer", p.answer}}.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  }
  const json header{{"format", kFormat}, {"version", kVersion},           {"shard", kShardName},
                    {"prompts", prompts.size()}, {"tokens", tokens.size()}, {"tokenizer", "byte"},
                    {"checksum", checksum(tokens)}};
  files::make_directories(out_dir);
  // The shard first, its answers last: a set cut off half-way has answers that do not match, which the
  // reader refuses, never answers that pair with the wrong prompts.
  write_shard(stats.shard, tokens, uint64_t(ByteTokenizer::vocab_size), starts);
  files::write_file_atomic(stats.answers, header.dump() + "\n" + answers);
  stats.prompts = prompts.size();
  stats.tokens = tokens.size();
  return stats;
}

PromptSet read_prompt_set(const std::string& shard_path) {
  const std::string what = "rl prompt set " + shard_path;
  if (!files::exists(shard_path))
    throw DataError(what + " does not exist (moetrain prepare-data --rl FILE.jsonl --out DIR writes DIR/prompts.bin)");
  const Shard shard(shard_path);  // the header, size and every token's vocabulary are checked here
  if (!shard.has_documents())
    throw DataError(what + " marks no documents: a prompt set holds each prompt as one document (version 2 of the "
                    "shard format, as moetrain prepare-data --rl writes it)");
  const std::string answers_path = answers_path_for(shard_path);
  if (!files::exists(answers_path))
    throw DataError(what + " has no answers beside it: " + answers_path + " does not exist");
  std::ifstream in(answers_path);
  if (!in) throw DataError("cannot read " + answers_path);
  std::string line;
  if (!std::getline(in, line)) throw DataError(answers_path + " is empty: its first line is the prompt set's header");
  const auto header = json::parse(line, nullptr, /*allow_exceptions=*/false);
  if (!header.is_object() || header.value("format", "") != kFormat || !header.contains("version") ||
      !header["version"].is_number_integer())
    throw DataError(answers_path + ":1: expected the header {\"format\": \"" + std::string(kFormat) + "\", \"version\": ...}");
  if (header["version"].get<int>() != kVersion)
    throw DataError(answers_path + ":1: version " + header["version"].dump() + " is not one this build reads (" +
                    std::to_string(kVersion) + ")");
  auto field = [&](const char* key) {
    if (!header.contains(key)) throw DataError(answers_path + ":1: the header lacks \"" + std::string(key) + "\"");
    return header[key];
  };
  PromptSet set;
  set.tokenizer = field("tokenizer").is_string() ? field("tokenizer").get<std::string>() : "";
  std::vector<int64_t> tokens(shard.size());
  shard.read(0, shard.size(), tokens.data());
  const auto starts = shard.document_starts();
  const json holds{{"shard", base_name(shard_path)}, {"prompts", starts.size()}, {"tokens", shard.size()},
                   {"checksum", checksum(tokens)}};
  for (const auto& [key, value] : holds.items())
    if (field(key.c_str()) != value)
      throw DataError(answers_path + " belongs to another shard: its header says " + key + " " + field(key.c_str()).dump() +
                      ", " + shard_path + " has " + value.dump());
  if (header.contains("token_table")) {  // a Hugging Face tokenizer's set (scripts/prepare_data.py --rl)
    auto text_field = [&](const char* key) {
      if (!field(key).is_string() || field(key).get<std::string>().empty())
        throw DataError(answers_path + ":1: \"" + std::string(key) + "\" must be a non-empty string");
      return field(key).get<std::string>();
    };
    const auto table_name = text_field("token_table");
    if (table_name.find('/') != std::string::npos)
      throw DataError(answers_path + ":1: \"token_table\" names a file beside it, not a path: '" + table_name + "'");
    const auto table_path = files::join(files::parent(shard_path), table_name);
    set.table_sha256 = text_field("token_table_sha256");
    set.tokenizer_sha256 = text_field("tokenizer_sha256");
    if (!files::exists(table_path)) throw DataError(answers_path + " names the token table " + table_path + ", which does not exist");
    const auto held = ckpt::sha256_file(table_path);
    if (held != set.table_sha256)
      throw DataError(table_path + " is not the token table " + answers_path + " names: its sha256 is " + held.substr(0, 16) +
                      "..., the header's " + set.table_sha256.substr(0, 16) + "...");
    set.table = TokenTable::read(table_path);
    if (shard.vocab_size() > uint64_t(set.table.size()))
      throw DataError(shard_path + ": vocabulary " + std::to_string(shard.vocab_size()) + " is larger than the " +
                      std::to_string(set.table.size()) + " tokens of " + table_path);
    const auto& stops = field("stop_ids");
    if (!stops.is_array() || stops.empty())
      throw DataError(answers_path + ":1: \"stop_ids\" must be a non-empty list of token ids");
    for (const auto& id : stops) {
      if (!id.is_number_unsigned()) throw DataError(answers_path + ":1: \"stop_ids\" holds " + id.dump() + ", not a token id");
      set.stop_ids.push_back(id.get<int64_t>());
    }
  } else {
    if (set.tokenizer != "byte")
      throw DataError(answers_path + ": the prompts were tokenized with '" + set.tokenizer +
                      "' and the header names no token table to decode them (scripts/prepare_data.py --rl writes one)");
    if (shard.vocab_size() > uint64_t(ByteTokenizer::vocab_size))
      throw DataError(shard_path + ": vocabulary " + std::to_string(shard.vocab_size()) +
                      " is not the byte tokenizer's 256 that " + answers_path + " names");
  }
  std::vector<RLPrompt> out;
  for (int n = 2; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto where = answers_path + ":" + std::to_string(n);
    const auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("answer") || !j["answer"].is_string())
      throw DataError(where + ": expected a JSON object with a string \"answer\"");
    if (out.size() == starts.size())
      throw DataError(where + ": more answers than the " + std::to_string(starts.size()) + " prompts of " + shard_path);
    const size_t i = out.size();
    const uint64_t end = i + 1 < starts.size() ? starts[i + 1] : shard.size();
    RLPrompt p;
    p.tokens.assign(tokens.begin() + int64_t(starts[i]), tokens.begin() + int64_t(end));
    p.prompt = set.table.decode_text(p.tokens);
    p.answer = j["answer"].get<std::string>();
    out.push_back(std::move(p));
  }
  if (out.size() != starts.size())
    throw DataError(answers_path + " holds " + std::to_string(out.size()) + " answers for the " +
                    std::to_string(starts.size()) + " prompts of " + shard_path);
  set.prompts = std::move(out);
  return set;
}

PromptSet load_prompts(const std::string& path) {
  if (files::is_directory(path)) return read_prompt_set(files::join(path, kShardName));
  if (ends_with(path, ".bin")) return read_prompt_set(path);
  PromptSet set;
  set.prompts = read_prompt_jsonl(path);
  return set;
}

}  // namespace moetrain::data
