// RL prompt sets (`moetrain rl`'s rl.prompts): a .jsonl of {"prompt", "answer"} tokenized at load, or
// a set `moetrain prepare-data --rl` wrote once, so that a run does not re-tokenize and a set can be
// checked (and shipped) like any other data. The prepared set is our shard format plus a sidecar:
//   DIR/prompts.bin            a version-2 token shard (shard.h): each prompt's tokens one document
//   DIR/prompts.answers.jsonl  line 1 a header {"format": "moetrain-rl-prompts", "version": 1,
//                              "shard": "prompts.bin", "prompts": D, "tokens": N, "tokenizer": "byte",
//                              "checksum": FNV-1a 64 of the tokens (hex)}, then D lines {"answer": "..."}
//                              in document order
// The header ties the answers to their shard: another shard put beside them (other prompts, a different
// count, another tokenizer) is refused naming both files. Rewards need the prompt and completion text:
// both are decoded with the tokenizer the header names (the byte tokenizer is the one built in).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moetrain::data {

struct RLPrompt {
  std::string prompt, answer;  // the prompt as text (decoded from tokens for a prepared set)
  std::vector<int64_t> tokens;  // what the rollouts start from
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

// A prepared set: its shard (a .bin file) and answers, checked against each other; DataErrors name the
// file (and line).
std::vector<RLPrompt> read_prompt_set(const std::string& shard_path);

// rl.prompts / rl.eval_prompts: a folder holding prompts.bin, a .bin shard, or else a .jsonl.
std::vector<RLPrompt> load_prompts(const std::string& path);

}  // namespace moetrain::data
