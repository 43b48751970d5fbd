// `moetrain prepare-data`: text files -> byte-token shards train.bin and val.bin; with --rl, a .jsonl of
// {prompt, answer} -> the prompt set `moetrain rl` reads (data/prompts.h).
#include <cstdio>

#include "cli/args.h"
#include "common/errors.h"
#include "common/log.h"
#include "data/prompts.h"
#include "data/shard.h"

namespace moetrain::cli {

int run_prepare_data(const std::vector<std::string>& argv) {
  const Command command{"prepare-data",
                        "Tokenize text files with the byte tokenizer into DIR/train.bin and DIR/val.bin, or (--rl) "
                        "RL prompts into DIR/prompts.bin and DIR/prompts.answers.jsonl for rl.prompts.",
                        {{"text", "FILE", "input text file (repeatable; concatenated in order)", true},
                         {"rl", "FILE", "a .jsonl of {\"prompt\", \"answer\"} objects: write a prompt set instead of shards"},
                         {"out", "DIR", "output folder"},
                         {"val-fraction", "F", "share of the text (its end) kept for validation (default 0.05)"},
                         {"document-separator", "LINE",
                          "a line that is exactly LINE ends a document (default: each file is one document); "
                          "data.packing: documents packs whole documents"},
                         {"overwrite", "", "replace the shards (and loss masks), or the prompt set, already in the --out folder"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  if (args.has("rl")) {
    if (args.has("text")) throw UsageError("moetrain prepare-data takes --text or --rl, not both");
    const std::string out = args.require("out");
    const auto stats = data::prepare_prompt_set(args.get("rl"), out, args.has("overwrite"));
    log_line("wrote " + stats.shard + " (" + std::to_string(stats.prompts) + " prompts, " +
             format_count(double(stats.tokens)) + " tokens) and " + stats.answers);
    return 0;
  }
  if (!args.has("text")) throw UsageError("moetrain prepare-data needs at least one --text FILE (or --rl FILE)");
  const double val_fraction = args.get_double("val-fraction", 0.05);
  if (!(val_fraction > 0 && val_fraction < 1)) throw UsageError("--val-fraction must be in (0, 1)");
  const std::string out = args.require("out");
  const auto stats = data::prepare_text(args.all("text"), out, val_fraction, args.has("overwrite"),
                                        args.get("document-separator", ""));
  log_line("wrote " + out + "/train.bin (" + format_count(double(stats.train_tokens)) + " tokens, " +
           std::to_string(stats.train_documents) + " documents) and " + out + "/val.bin (" +
           format_count(double(stats.val_tokens)) + " tokens, " + std::to_string(stats.val_documents) + " documents)");
  return 0;
}

}  // namespace moetrain::cli
