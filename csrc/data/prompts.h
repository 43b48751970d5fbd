// RL prompt sets (`moetrain rl`'s rl.prompts): a .jsonl of {"prompt", "answer"} tokenized at load with
// the byte tokenizer, or a prepared set, so that a run does not re-tokenize and a set can be checked (and
// shipped) like any other data. A prepared set is our shard format plus a sidecar:
//   DIR/prompts.bin            a version-2 token shard (shard.h): each prompt's tokens one document
//   DIR/prompts.answers.jsonl  line 1 a header {"format": "moetrain-rl-prompts", "version": 1,
//                              "shard": "prompts.bin", "prompts": D, "tokens": N, "tokenizer": "byte",
//                              "checksum": FNV-1a 64 of the tokens (hex)}, then D lines {"answer": "..."}
//                              in document order
// The header ties the answers to their shard: another shard put beside them (other prompts, a different
// count, another tokenizer) is refused naming both files. `moetrain prepare-data --rl` writes byte sets;
// scripts/prepare_data.py --rl writes sets of a Hugging Face tokenizer, whose header also names
//   "tokenizer_sha256"         of the tokenizer.json the prompts were tokenized with,
//   "token_table", "token_table_sha256"  DIR/prompts.tokens.json (tokenizer.h's TokenTable), which decodes
//                              prompts and completions for the rewards, and its sha256,
//   "stop_ids"                 the tokens that end a completion (the model's EOS, an end of turn).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/tokenizer.h"

namespace moetrain::data {

struct RLPrompt {
  std::string prompt, answer;  // the prompt as text (decoded from tokens for a prepared set)
  std::vector<int64_t> tokens;  // what the rollouts start from
};

// A loaded prompt set and what decodes its completions.
struct PromptSet {
  std::vector<RLPrompt> prompts;
  std::string tokenizer = "byte";   // the header's name; "byte" for the byte tokenizer
  std::string tokenizer_sha256;     // of the Hugging Face tokenizer.json ("" for byte sets)
  std::string table_sha256;         // of the token table ("" for byte sets): two sets decode alike when equal
  TokenTable table = TokenTable::bytes();
  std::vector<int64_t> stop_ids;    // the tokens that end a completion; byte sets have none (rl.stop names bytes)
  bool is_bytes() const { return table_sha256.empty(); }
};

// One {"prompt": ..., "answer": ...} object per line (blank lines skipped), byte-tokenized; a bad line
// is a DataError naming file:line. A non-string answer is kept as its JSON text.
std::vector<RLPrompt> read_prompt_jsonl(const std::string& path);

// "dir/prompts.bin" -> "dir/prompts.answers.jsonl" (a name without .bin gets ".answers.jsonl" appended).
std::string answers_path_for(const std::string& shard_path);

struct PromptSetStats {
  uint64_t prompts = 0, tokens = 0;
  std::string shard, answers;  // the paths written
};
// `moetrain prepare-data --rl`: reads the .jsonl and writes <out_dir>/prompts.bin and its answers. A
// folder that already holds a prompt set is refused unless overwrite is set.
PromptSetStats prepare_prompt_set(const std::string& jsonl_path, const std::string& out_dir, bool overwrite = false);

// A prepared set: its shard (a .bin file), answers and token table, checked against each other; DataErrors
// name the file (and line).
PromptSet read_prompt_set(const std::string& shard_path);

// rl.prompts / rl.eval_prompts: a folder holding prompts.bin, a .bin shard, or else a .jsonl (byte-tokenized).
PromptSet load_prompts(const std::string& path);

}  // namespace moetrain::data
