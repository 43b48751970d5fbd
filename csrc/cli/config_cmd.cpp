// `moetrain config`: print a config resolved (defaults + file + overrides, validated), or the key reference.
#include <cstdio>

#include "cli/args.h"
#include "common/errors.h"
#include "config/config.h"

namespace moetrain::cli {

int run_config(const std::vector<std::string>& argv) {
  const Command command{"config",
                        "Print the resolved, validated config as YAML, or the reference of every key.",
                        {{"config", "FILE", "YAML config (omit for the defaults)"},
                         {"set", "KEY=VALUE", "override one config key (repeatable)", true},
                         {"world-size", "N", "resolve the batch keys as a job of N ranks runs them (default: as written)"},
                         {"reference", "", "print every key with its type, default and meaning (markdown)"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  if (args.has("reference")) {
    std::fputs(config::reference_markdown().c_str(), stdout);
    return 0;
  }
  auto cfg = load_command_config(args, InitFrom::if_present);
  if (args.has("world-size")) {
    const int world_size = args.get_int("world-size", 1);
    if (world_size < 1) throw UsageError("--world-size expects a positive number of ranks, got '" + args.get("world-size") + "'");
    cfg = config::for_world_size(cfg, world_size);
  }
  std::fputs(config::to_yaml(cfg).c_str(), stdout);
  return 0;
}

}  // namespace moetrain::cli
