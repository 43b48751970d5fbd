// `moetrain config`: print a config resolved (defaults + file + overrides, validated), or the key reference.
#include <cstdio>

#include "cli/args.h"
#include "config/config.h"

namespace moetrain::cli {

int run_config(const std::vector<std::string>& argv) {
  const Command command{"config",
                        "Print the resolved, validated config as YAML, or the reference of every key.",
                        {{"config", "FILE", "YAML config (omit for the defaults)"},
                         {"set", "KEY=VALUE", "override one config key (repeatable)", true},
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
  const auto cfg = args.has("config") ? config::load_config(args.get("config"), args.all("set"))
                                      : config::parse_config("{}", "<defaults>", args.all("set"));
  std::fputs(config::to_yaml(cfg).c_str(), stdout);
  return 0;
}

}  // namespace moetrain::cli
