// `moetrain train`: load the config, train, print a one-line summary.
#include <cstdio>

#include "cli/args.h"
#include "common/log.h"
#include "train/trainer.h"

namespace moetrain::cli {

int run_train(const std::vector<std::string>& argv) {
  const Command command{
      "train",
      "Train the model a YAML config describes; checkpoints and metrics.jsonl go to run.out_dir.",
      run_options("YAML config (see configs/ and the README's reference)", "train.steps=20")};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  args.require("config");
  const auto cfg = load_command_config(args);
  const auto result = train::train(cfg, {args.get("resume"), args.has("overwrite")});
  const int64_t ran = result.last_step - result.first_step;
  std::string summary = "done: step " + std::to_string(result.last_step) + "/" + std::to_string(cfg.train.steps) +
                        (result.interrupted ? " (interrupted)" : "");
  if (ran == 0)
    summary += " | the run was already complete: nothing to train";
  else
    summary += " | " + std::to_string(ran) + " steps this run at " + format_count(result.tokens_per_s) + " tok/s";
  if (!result.losses.empty()) summary += " | final loss " + format_double(result.losses.back(), 4);
  if (ran > 0)
    summary += " | " + format_count(double(result.tokens)) + " tokens in " + format_duration(result.elapsed_s) + ", " +
               format_double(result.gpu_hours, 3) + " device-hours, $" + format_double(result.cost_usd, 3) +
               ", mean MFU " + format_double(100 * result.mean_mfu, 3) + "%" + (result.mean_mfu > 1 ? " (!)" : "");
  if (result.final_val_loss > 0) summary += " | val_loss " + format_double(result.final_val_loss, 4);
  if (!result.last_checkpoint.empty()) summary += " | checkpoint " + result.last_checkpoint;
  log_line(summary);
  return 0;
}

}  // namespace moetrain::cli
