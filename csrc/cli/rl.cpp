// `moetrain rl`: GRPO from a YAML config (the rl.* keys), then a one-line summary.
#include <cstdio>

#include "cli/args.h"
#include "common/log.h"
#include "train/rl.h"

namespace moetrain::cli {

int run_rl(const std::vector<std::string>& argv) {
  const Command command{
      "rl",
      "Reinforcement learning with GRPO: rl.group_size sampled completions per prompt of rl.prompts, verifiable "
      "rewards, group-normalised advantages, a clipped surrogate. train.steps counts rollout batches.",
      run_options("YAML config with an rl section (see configs/rl-demo.yaml)", "rl.group_size=4")};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  args.require("config");
  const auto cfg = load_command_config(args);
  const auto result = train::rl::run(cfg, {args.get("resume"), args.has("overwrite")});
  std::string summary = "done: rollout batch " + std::to_string(result.last_step) + "/" + std::to_string(cfg.train.steps) +
                        (result.interrupted ? " (interrupted)" : "");
  if (!result.reward_means.empty())
    summary += " | reward " + format_double(result.reward_means.front(), 3) + " -> " + format_double(result.reward_means.back(), 3);
  if (result.first_eval_accuracy) summary += " | held-out accuracy before " + format_double(*result.first_eval_accuracy, 4);
  if (result.last_eval_accuracy) summary += " | after " + format_double(*result.last_eval_accuracy, 4);
  if (!result.last_checkpoint.empty()) summary += " | checkpoint " + result.last_checkpoint;
  log_line(summary);
  return 0;
}

}  // namespace moetrain::cli
