// Option parsing shared by the subcommands.
#include "cli/args.h"

#include <algorithm>
#include <cstdio>
#include <new>
#include <sstream>

#include "common/errors.h"
#include "common/files.h"
#include "hf/hf.h"

namespace moetrain::cli {

namespace {
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

template <typename T, typename Parse>
T parse_number(const std::string& option, const std::string& text, const char* what, Parse parse) {
  try {
    size_t used = 0;
    T value = parse(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw UsageError("--" + option + " expects " + what + ", got '" + text + "'");
}
}  // namespace

Args::Args(const Command& command, const std::vector<std::string>& argv) : command_(command) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      help_ = true;
      continue;
    }
    if (arg.rfind("--", 0) != 0)
      throw UsageError(command.invocation() + ": unexpected argument '" + arg + "' (see " + command.invocation() +
                       " --help)");
    std::string name = arg.substr(2), value;
    bool inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    auto it = std::find_if(command.options.begin(), command.options.end(), [&](const Option& o) { return o.name == name; });
    if (it == command.options.end()) {
      std::string best;
      size_t best_d = 3;
      for (const auto& o : command.options)
        if (size_t d = edit_distance(name, o.name); d < best_d) best_d = d, best = o.name;
      throw UsageError(command.invocation() + ": unknown option '--" + name + "'" +
                       (best.empty() ? "" : " (did you mean '--" + best + "'?)"));
    }
    if (it->metavar.empty()) {
      if (inline_value) throw UsageError("--" + name + " takes no value");
      value = "true";
    } else if (!inline_value) {
      if (i + 1 >= argv.size()) throw UsageError("--" + name + " needs a value: --" + name + " " + it->metavar);
      value = argv[++i];
    }
    auto& slot = values_[name];
    if (!slot.empty() && !it->repeatable) throw UsageError("--" + name + " is given more than once");
    slot.push_back(value);
  }
}

std::string Args::get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second.back();
}

std::string Args::require(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) throw UsageError(command_.invocation() + " needs --" + name + " (see --help)");
  return it->second.back();
}

const std::vector<std::string>& Args::all(const std::string& name) const {
  static const std::vector<std::string> none;
  auto it = values_.find(name);
  return it == values_.end() ? none : it->second;
}

int Args::get_int(const std::string& name, int fallback) const {
  if (!has(name)) return fallback;
  return parse_number<int>(name, get(name), "an integer", [](const std::string& s, size_t* n) { return std::stoi(s, n); });
}

double Args::get_double(const std::string& name, double fallback) const {
  if (!has(name)) return fallback;
  return parse_number<double>(name, get(name), "a number", [](const std::string& s, size_t* n) { return std::stod(s, n); });
}

uint64_t Args::get_u64(const std::string& name, uint64_t fallback) const {
  if (!has(name)) return fallback;
  const std::string text = get(name);
  if (!text.empty() && text[0] == '-') throw UsageError("--" + name + " expects a non-negative integer, got '" + text + "'");
  return parse_number<uint64_t>(name, text, "a non-negative integer",
                                [](const std::string& s, size_t* n) { return std::stoull(s, n); });
}

std::string usage(const Command& command) {
  std::ostringstream out;
  out << "usage: " << command.invocation() << " [options]\n\n" << command.synopsis << "\n\noptions:\n";
  size_t width = 6;
  for (const auto& o : command.options) width = std::max(width, o.name.size() + o.metavar.size() + 1);
  auto line = [&](const std::string& left, const std::string& help) {
    out << "  --" << left << std::string(width + 2 - left.size(), ' ') << help << "\n";
  };
  for (const auto& o : command.options) line(o.name + (o.metavar.empty() ? "" : " " + o.metavar), o.help);
  line("help", "show this help");
  return out.str();
}

std::vector<Option> run_options(const std::string& config_help, const std::string& set_example) {
  return {{"config", "FILE", config_help},
          {"set", "KEY=VALUE", "override one config key, e.g. --set " + set_example + " (repeatable)", true},
          {"resume", "auto|DIR", "continue from the newest checkpoint of run.out_dir (auto) or from DIR"},
          {"overwrite", "", "start afresh in a run.out_dir that holds a run, moving that run aside to <out_dir>.replaced-N"}};
}

config::Config load_command_config(const Args& args, InitFrom mode) {
  const auto cfg = args.has("config") ? config::load_config(args.get("config"), args.all("set"))
                                      : config::parse_config("{}", "<defaults>", args.all("set"));
  if (mode == InitFrom::if_present && hf::is_hf_path(cfg.model.init_from) &&
      !files::exists(files::join(hf::hf_dir(cfg.model.init_from), "config.json"))) {
    std::fprintf(stderr, "note: model.init_from = %s has no config.json yet: the model keys printed are the file's "
                 "placeholders, not the checkpoint's architecture\n", cfg.model.init_from.c_str());
    return cfg;
  }
  return hf::resolve_init_from(cfg);
}

namespace {
std::string one_line(std::string s) {
  for (auto& c : s)
    if (c == '\n') c = ' ';
  return s;
}

// An allocation that failed although the sizes passed the checks before allocating (which count a
// floor): the allocator's own sentence from "tried to allocate" on, and what makes a run smaller.
std::string out_of_memory(const std::string& allocator_text) {
  std::string what = allocator_text;
  if (const auto at = what.find("tried to allocate"); at != std::string::npos) what = what.substr(at);
  return "out of memory (" + one_line(what) + "): `moetrain plan` gives a config's peak per rank; lower "
         "train.micro_batch_size or data.seq_len, set train.activation_checkpointing: full, or a smaller model";
}
}  // namespace

int run_reporting_errors(const char* program, const std::function<int()>& body) {
  try {
    return body();
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%s: %s\n", program, one_line(e.what()).c_str());
    return 2;
  } catch (const c10::OutOfMemoryError& e) {  // CUDA's allocator
    std::fprintf(stderr, "%s: %s\n", program, out_of_memory(e.what_without_backtrace()).c_str());
    return 1;
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    const bool cpu_out_of_memory =  // "not enough memory" or "can't allocate memory", by the allocator's path
        what.find("DefaultCPUAllocator") != std::string::npos && what.find("tried to allocate") != std::string::npos;
    std::fprintf(stderr, "%s: %s\n", program, (cpu_out_of_memory ? out_of_memory(what) : one_line(what)).c_str());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "%s: %s\n", program, out_of_memory("std::bad_alloc").c_str());
    return 1;
  } catch (const std::exception& e) {  // moetrain::Error and the rest
    std::fprintf(stderr, "%s: %s\n", program, one_line(e.what()).c_str());
    return 1;
  }
}

}  // namespace moetrain::cli
