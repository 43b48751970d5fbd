// A small command-line parser for the subcommands: --name value, --name=value, repeatable options
// and flags; unknown options are usage errors with a did-you-mean.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"

namespace moetrain::cli {

struct Option {
  std::string name;     // without the leading dashes
  std::string metavar;  // empty for a flag
  std::string help;
  bool repeatable = false;
};

struct Command {
  std::string name;      // the subcommand; "" for an executable of its own
  std::string synopsis;  // one line: what it does
  std::vector<Option> options;
  std::string program = "moetrain";
  // How a user types it: "moetrain train", or the program alone.
  std::string invocation() const { return name.empty() ? program : program + " " + name; }
};

class Args {
 public:
  Args(const Command& command, const std::vector<std::string>& argv);  // throws UsageError
  bool help() const { return help_; }
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string get(const std::string& name, const std::string& fallback = "") const;
  std::string require(const std::string& name) const;  // throws UsageError naming the option
  const std::vector<std::string>& all(const std::string& name) const;
  int get_int(const std::string& name, int fallback) const;
  double get_double(const std::string& name, double fallback) const;
  uint64_t get_u64(const std::string& name, uint64_t fallback) const;

 private:
  const Command& command_;
  std::map<std::string, std::vector<std::string>> values_;
  bool help_ = false;
};

std::string usage(const Command& command);

// The options of a command that runs from a config into run.out_dir (`train`, `rl`): --config, --set
// (set_example shows one override), --resume, --overwrite.
std::vector<Option> run_options(const std::string& config_help, const std::string& set_example);

// The config a command runs from --config FILE and its --set overrides. With model.init_from: hf:DIR
// the model's architecture comes from DIR/config.json (hf::resolve_init_from), so `train`,
// `bench-step` and `cost` all build and count the checkpoint's model, never the template's
// placeholder. `config` passes InitFrom::if_present: it prints a template whose folder is absent as
// written (with a note on stderr), so templates can be checked without the model.
enum class InitFrom { required, if_present };
config::Config load_command_config(const Args& args, InitFrom mode = InitFrom::required);

// Runs a command's body the way every moetrain executable does: each error becomes one line on stderr
// prefixed with `program`, exit status 2 for usage errors and 1 otherwise.
int run_reporting_errors(const char* program, const std::function<int()>& body);

// Subcommands: each returns the process exit code.
int run_train(const std::vector<std::string>& argv);
int run_rl(const std::vector<std::string>& argv);
int run_generate(const std::vector<std::string>& argv);
int run_prepare_data(const std::vector<std::string>& argv);
int run_config(const std::vector<std::string>& argv);
int run_cost(const std::vector<std::string>& argv);
int run_plan(const std::vector<std::string>& argv);
int run_convert(const std::vector<std::string>& argv);
int run_inspect(const std::vector<std::string>& argv);
int run_eval(const std::vector<std::string>& argv);
int run_inspect_data(const std::vector<std::string>& argv);
int run_bench_step(const std::vector<std::string>& argv);

}  // namespace moetrain::cli
