// `moetrain generate`: sample text from a checkpoint with the byte tokenizer.
#include <cstdio>

#include "cli/args.h"
#include "common/errors.h"
#include "data/tokenizer.h"
#include "train/generate.h"

namespace moetrain::cli {

int run_generate(const std::vector<std::string>& argv) {
  const Command command{
      "generate",
      "Sample a continuation of a prompt from a checkpoint (a run folder, its ckpt/ or a step folder).",
      {{"checkpoint", "DIR", "run folder, ckpt/ folder or step folder"},
       {"prompt", "TEXT", "text to continue (byte tokenizer)"},
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
  if (options.temperature < 0) throw UsageError("--temperature must be >= 0");
  if (options.top_k < 0) throw UsageError("--top-k must be >= 0");

  auto loaded = train::load_for_inference(args.require("checkpoint"));
  data::ByteTokenizer tokenizer;
  if (loaded.cfg.model.vocab_size != tokenizer.vocab_size)
    throw UsageError("this checkpoint's vocabulary has " + std::to_string(loaded.cfg.model.vocab_size) +
                     " tokens, not the byte tokenizer's 256");
  const auto prompt = tokenizer.encode(args.require("prompt"));
  const auto tokens = train::generate(*loaded.model, prompt, options);
  std::fputs(tokenizer.decode(tokens).c_str(), stdout);
  std::fputc('\n', stdout);
  return 0;
}

}  // namespace moetrain::cli
