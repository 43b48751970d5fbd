// `moetrain generate`: sample from a checkpoint (ours or hf:DIR), text through the byte tokenizer or
// token ids in and out (--prompt-ids, --print-ids) for models whose tokenizer lives elsewhere.
#include <cmath>
#include <cstdio>

#include "cli/args.h"
#include "common/errors.h"
#include "data/tokenizer.h"
#include "train/generate.h"

namespace moetrain::cli {

namespace {
// "1,2,3" -> {1, 2, 3}; anything else is a usage error naming the bad item.
std::vector<int64_t> parse_ids(const std::string& text) {
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
      throw UsageError("--prompt-ids: '" + item + "' is not a token id (expected non-negative integers like 1,2,3)");
    ids.push_back(id);
    start = comma + 1;
  }
  return ids;
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
       {"seed", "S", "sampling seed (default 0)"}}};
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

  if (args.has("prompt") == args.has("prompt-ids")) throw UsageError("give exactly one of --prompt and --prompt-ids");
  std::vector<int64_t> prompt;
  if (args.has("prompt-ids")) prompt = parse_ids(args.get("prompt-ids"));

  auto loaded = train::load_for_inference(args.require("checkpoint"));
  train::require_finite_weights(*loaded.model, loaded.step_dir);
  data::ByteTokenizer tokenizer;
  const bool text = !args.has("print-ids") || args.has("prompt");
  if (text && loaded.cfg.model.vocab_size != tokenizer.vocab_size)
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
