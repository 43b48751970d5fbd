// `moetrain generate`: sample from a checkpoint (ours or hf:DIR), text through the byte tokenizer or
// token ids in and out (--prompt-ids, --print-ids) for models whose tokenizer lives elsewhere; or a
// batch of prompts from a JSONL file (--prompts), one JSON line out per prompt.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "common/errors.h"
#include "data/tokenizer.h"
#include "train/generate.h"

namespace moetrain::cli {

namespace {
// "1,2,3" -> {1, 2, 3}; anything else is a usage error naming the bad item.
std::vector<int64_t> parse_ids(const std::string& text, const std::string& flag = "--prompt-ids") {
  std::vector<int64_t> ids;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string item = text.substr(start, comma - start);
    size_t used = 0;
    int64_t id = -1;
    try {
      id = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || id < 0)
      throw UsageError(flag + ": '" + item + "' is not a token id (expected non-negative integers like 1,2,3)");
    ids.push_back(id);
    start = comma + 1;
  }
  return ids;
}
// One prompt a line: {"prompt_ids": [ints]} or {"prompt": "text"} (byte tokenizer); blank lines are
// skipped. A bad line is a one-line error naming the file, the line and the field. Read before the
// checkpoint loads; text is tokenized after (encode_prompts), once the vocabulary is known.
struct PromptLine {
  std::string where;         // "FILE line N"
  std::vector<int64_t> ids;  // prompt_ids
  std::string text;          // prompt
};

std::vector<PromptLine> read_prompts(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UsageError("--prompts: cannot read '" + path + "'");
  std::vector<PromptLine> prompts;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    PromptLine prompt{path + " line " + std::to_string(number), {}, {}};
    const std::string& where = prompt.where;
    nlohmann::json row;
    try {
      row = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      row = nullptr;
    }
    if (!row.is_object())
      throw UsageError(where + ": not a JSON object (expected {\"prompt_ids\": [1, 2, 3]} or {\"prompt\": \"text\"})");
    const bool ids = row.contains("prompt_ids"), text = row.contains("prompt");
    if (ids == text) throw UsageError(where + ": give exactly one of the fields 'prompt_ids' and 'prompt'");
    if (ids) {
      const auto& v = row["prompt_ids"];
      bool good = v.is_array() && !v.empty();
      for (size_t i = 0; good && i < v.size(); ++i) good = v[i].is_number_integer() && v[i].get<int64_t>() >= 0;
      if (!good) throw UsageError(where + ": field 'prompt_ids' must be a non-empty array of non-negative integers");
      for (const auto& id : v) prompt.ids.push_back(id.get<int64_t>());
    } else {
      if (!row["prompt"].is_string() || row["prompt"].get<std::string>().empty())
        throw UsageError(where + ": field 'prompt' must be a non-empty string");
      prompt.text = row["prompt"].get<std::string>();
    }
    prompts.push_back(std::move(prompt));
  }
  if (prompts.empty()) throw UsageError("--prompts: '" + path + "' holds no prompt");
  return prompts;
}

// The token ids of each line; ids beyond the vocabulary are named with their line.
std::vector<std::vector<int64_t>> encode_prompts(const std::vector<PromptLine>& lines, int64_t vocab_size) {
  data::ByteTokenizer tokenizer;
  std::vector<std::vector<int64_t>> prompts;
  for (const auto& line : lines) {
    if (line.ids.empty() && vocab_size != tokenizer.vocab_size)
      throw UsageError(line.where + ": field 'prompt' is text, but this checkpoint's vocabulary (" +
                       std::to_string(vocab_size) + ") is not the byte tokenizer's 256: use 'prompt_ids'");
    prompts.push_back(line.ids.empty() ? tokenizer.encode(line.text) : line.ids);
    for (auto id : prompts.back())
      if (id >= vocab_size)
        throw UsageError(line.where + ": field 'prompt_ids' holds token " + std::to_string(id) +
                         ", outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
  }
  return prompts;
}
}  // namespace

int run_generate(const std::vector<std::string>& argv) {
  const Command command{
      "generate",
      "Sample a continuation of a prompt from a checkpoint (a run folder, its ckpt/ or a step folder).",
      {{"checkpoint", "DIR", "run folder, ckpt/ folder, step folder, or hf:DIR (a Hugging Face folder)"},
       {"prompt", "TEXT", "text to continue (byte tokenizer)"},
       {"prompt-ids", "1,2,3", "token ids to continue, instead of --prompt"},
       {"print-ids", "", "print the token ids (prompt and continuation, comma-separated) instead of text"},
       {"max-new-tokens", "N", "tokens to sample (default 200)"},
       {"temperature", "T", "softmax temperature; 0 = greedy (default 0.8)"},
       {"top-k", "K", "sample among the K most likely tokens; 0 = all (default 0)"},
       {"top-p", "P", "sample among the most likely tokens holding probability P; 1 = all (default 1)"},
       {"seed", "S", "sampling seed (default 0)"},
       {"prompts", "FILE", "JSONL, one {\"prompt_ids\": [..]} or {\"prompt\": \"..\"} a line: run as one batch, "
                           "one JSON line out per prompt"},
       {"eos-id", "ID", "stop a row after this token (default: none)"},
       {"stop", "1,2", "stop a row after any of these token ids"},
       {"no-cache", "", "recompute the whole context for every token instead of using the KV cache"},
       {"timing", "", "print the generation's tokens per second to stderr (after an untimed one-token warm-up; loading excluded)"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  train::GenerateOptions options;
  options.max_new_tokens = args.get_int("max-new-tokens", options.max_new_tokens);
  options.temperature = args.get_double("temperature", options.temperature);
  options.top_k = args.get_int("top-k", options.top_k);
  options.seed = args.get_u64("seed", options.seed);
  if (options.max_new_tokens < 0) throw UsageError("--max-new-tokens must be >= 0");
  if (!std::isfinite(options.temperature) || options.temperature < 0)  // NaN passes a plain "< 0"
    throw UsageError("--temperature " + args.get("temperature") + " must be a finite number >= 0 (0 = greedy)");
  if (options.top_k < 0) throw UsageError("--top-k must be >= 0");
  options.top_p = args.get_double("top-p", options.top_p);
  if (!(options.top_p > 0 && options.top_p <= 1))
    throw UsageError("--top-p " + args.get("top-p") + " must be in (0, 1] (1 = every token)");
  options.use_cache = !args.has("no-cache");
  if (args.has("stop")) options.stop_ids = parse_ids(args.get("stop"), "--stop");
  if (args.has("eos-id")) {
    const auto eos = parse_ids(args.get("eos-id"), "--eos-id");
    if (eos.size() != 1) throw UsageError("--eos-id takes one token id, got '" + args.get("eos-id") + "' (use --stop for several)");
    options.stop_ids.push_back(eos[0]);
  }

  const int sources = int(args.has("prompt")) + int(args.has("prompt-ids")) + int(args.has("prompts"));
  if (sources != 1) throw UsageError("give exactly one of --prompt, --prompt-ids and --prompts");
  std::vector<int64_t> prompt;
  if (args.has("prompt-ids")) prompt = parse_ids(args.get("prompt-ids"));
  std::vector<PromptLine> prompt_lines;
  if (args.has("prompts")) prompt_lines = read_prompts(args.get("prompts"));

  auto loaded = train::load_for_inference(args.require("checkpoint"));
  train::require_finite_weights(*loaded.model, loaded.step_dir);
  data::ByteTokenizer tokenizer;
  const bool byte_vocab = loaded.cfg.model.vocab_size == tokenizer.vocab_size;
  if (args.has("prompts")) {
    const auto prompts = encode_prompts(prompt_lines, loaded.cfg.model.vocab_size);
    if (args.has("timing")) {  // one untimed token first: the weights paged in, the thread pool up
      auto warm_up = options;
      warm_up.max_new_tokens = 1;
      train::generate_batch(*loaded.model, prompts, warm_up);
    }
    const auto started = std::chrono::steady_clock::now();
    const auto rows = train::generate_batch(*loaded.model, prompts, options);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    if (args.has("timing")) {
      size_t generated = 0;
      for (size_t i = 0; i < rows.size(); ++i) generated += rows[i].size() - prompts[i].size();
      std::fprintf(stderr, "[generate] %zu rows, %zu new tokens in %.3f s: %.2f tokens/s (%s)\n", rows.size(), generated,
                   seconds, double(generated) / seconds, options.use_cache ? "KV cache" : "recompute");
    }
    for (size_t i = 0; i < rows.size(); ++i) {
      nlohmann::json out;
      out["index"] = i;
      out["prompt_ids"] = prompts[i];
      const std::vector<int64_t> completion(rows[i].begin() + int64_t(prompts[i].size()), rows[i].end());
      out["completion_ids"] = completion;
      if (byte_vocab) out["completion"] = tokenizer.decode(completion);
      const std::string line = out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
      std::fputs(line.c_str(), stdout);
    }
    return 0;
  }
  const bool text = !args.has("print-ids") || args.has("prompt");
  if (text && !byte_vocab)
    throw UsageError("this checkpoint's vocabulary has " + std::to_string(loaded.cfg.model.vocab_size) +
                     " tokens, not the byte tokenizer's 256: use --prompt-ids and --print-ids");
  if (args.has("prompt")) prompt = tokenizer.encode(args.get("prompt"));
  const auto tokens = train::generate(*loaded.model, prompt, options);
  if (args.has("print-ids")) {
    std::string line;
    for (size_t i = 0; i < tokens.size(); ++i) line += (i ? "," : "") + std::to_string(tokens[i]);
    std::fputs(line.c_str(), stdout);
  } else {
    std::fputs(tokenizer.decode(tokens).c_str(), stdout);
  }
  std::fputc('\n', stdout);
  return 0;
}

}  // namespace moetrain::cli
