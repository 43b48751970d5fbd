// moetrain: one binary, one subcommand per job. Every error becomes one line on stderr and a
// non-zero exit status (2 for usage errors, 1 otherwise); nothing below this file calls exit().
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cli/args.h"
#include "common/errors.h"

namespace {

struct Subcommand {
  const char* name;
  const char* summary;
  int (*run)(const std::vector<std::string>&);
};

const Subcommand kSubcommands[] = {
    {"train", "train a model from a YAML config (checkpoints, metrics, resume)", moetrain::cli::run_train},
    {"rl", "reinforcement learning with GRPO from a YAML config (rollouts, verifiable rewards, rl.*)", moetrain::cli::run_rl},
    {"generate", "sample text (or token ids) from a checkpoint or a Hugging Face folder", moetrain::cli::run_generate},
    {"eval", "mean next-token loss and perplexity of a checkpoint over a token shard", moetrain::cli::run_eval},
    {"inspect", "a checkpoint's manifest, tensors and parameter counts; verifies its checksums", moetrain::cli::run_inspect},
    {"convert", "convert between our checkpoints and Hugging Face folders (hf:DIR)", moetrain::cli::run_convert},
    {"inspect-data", "what a data folder holds (format, shards, tokens, documents, vocabulary); verifies headers", moetrain::cli::run_inspect_data},
    {"prepare-data", "turn text files into token shards (train.bin, val.bin)", moetrain::cli::run_prepare_data},
    {"config", "print a resolved config, or the reference of every key", moetrain::cli::run_config},
    {"cost", "estimate a training run's FLOPs, GPU-hours, days and price from a config", moetrain::cli::run_cost},
    {"plan", "the memory per rank a config needs on a layout, term by term, and what fits a GPU", moetrain::cli::run_plan},
    {"bench-step", "time real training steps of a config: tokens/s and MFU on this hardware", moetrain::cli::run_bench_step},
};

void print_help() {
  std::printf("moetrain: Mixture-of-Experts transformer training on LibTorch\n\n");
  std::printf("usage: moetrain <command> [options]   (moetrain <command> --help for its options)\n\ncommands:\n");
  for (const auto& s : kSubcommands) std::printf("  %-14s %s\n", s.name, s.summary);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    print_help();
    return argc < 2 ? 2 : 0;
  }
  const std::string name = argv[1];
  std::vector<std::string> args(argv + 2, argv + argc);
  for (const auto& s : kSubcommands)
    if (name == s.name) return moetrain::cli::run_reporting_errors("moetrain", [&] { return s.run(args); });
  std::fprintf(stderr, "moetrain: unknown command '%s' (see moetrain --help)\n", name.c_str());
  return 2;
}
