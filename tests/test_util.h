// Helpers shared by the tests: fresh temporary folders, a tiny model config, running the CLI.
#pragma once
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

#include "common/files.h"
#include "config/config.h"

namespace moetrain::testing {

// A new empty folder under the system temp dir, removed when the object goes out of scope.
struct TempDir {
  std::string path;
  explicit TempDir(const std::string& tag) : path(files::make_temp_directory("test-" + tag)) {}
  ~TempDir() {
    try {
      files::remove_tree(path);
    } catch (...) {
    }
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string str(const std::string& child = "") const { return child.empty() ? path : files::join(path, child); }
};

// A model small enough for exhaustive checks: 2 layers (1 dense, 1 MoE), 4 experts top-2, 1 shared.
inline config::ModelConfig tiny_model_config() {
  config::ModelConfig m;
  m.vocab_size = 32;
  m.d_model = 16;
  m.n_layers = 2;
  m.n_heads = 4;
  m.n_kv_heads = 2;
  m.max_seq_len = 16;
  m.dense_layers = 1;
  m.dense_hidden = 24;
  m.moe.n_experts = 4;
  m.moe.top_k = 2;
  m.moe.expert_hidden = 8;
  m.moe.n_shared_experts = 1;
  m.moe.shared_hidden = 8;
  return m;
}

// `m` with multi-head latent attention of these ranks and per-head dims (q_lora_rank 0: a full wq).
inline config::ModelConfig with_mla(config::ModelConfig m, int q_lora_rank, int kv_lora_rank, int qk_nope_head_dim,
                                    int qk_rope_head_dim, int v_head_dim) {
  m.attention = "mla";
  m.mla.q_lora_rank = q_lora_rank;
  m.mla.kv_lora_rank = kv_lora_rank;
  m.mla.qk_nope_head_dim = qk_nope_head_dim;
  m.mla.qk_rope_head_dim = qk_rope_head_dim;
  m.mla.v_head_dim = v_head_dim;
  return m;
}

// Sets LibTorch's deterministic mode (run.deterministic) for a scope and restores it as it was.
struct DeterministicMode {
  explicit DeterministicMode(bool on) : was(at::globalContext().deterministicAlgorithms()) {
    at::globalContext().setDeterministicAlgorithms(on, /*warn_only=*/false);
  }
  ~DeterministicMode() { at::globalContext().setDeterministicAlgorithms(was, false); }
  DeterministicMode(const DeterministicMode&) = delete;
  DeterministicMode& operator=(const DeterministicMode&) = delete;
  bool was;
};

// Writes `cfg` as YAML to `path` for `moetrain train --config` and creates its run folder; returns path.
inline std::string write_config(const config::Config& cfg, const std::string& path) {
  files::make_directories(cfg.run.out_dir);
  files::write_file_atomic(path, config::to_yaml(cfg));
  return path;
}

// Writes raw bytes to a file (replacing it): for building damaged inputs in tests.
inline void write_bytes(const std::string& path, const std::string& bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) throw std::runtime_error("test: cannot write " + path);
  std::fwrite(bytes.data(), 1, bytes.size(), f);
  std::fclose(f);
}

// Overwrites bytes [offset, offset + n) of a file: for damaging inputs in place.
inline void patch(const std::string& path, size_t offset, const void* data, size_t n) {
  std::string bytes = files::read_file(path);
  std::memcpy(bytes.data() + offset, data, n);
  write_bytes(path, bytes);
}

// How many times slower than an idle 2-core machine this one may run: MOETRAIN_TEST_TIME_SCALE
// (a number >= 1, default 1). Every wall-clock bound in the tests is multiplied by it.
inline double time_scale() {
  const char* v = std::getenv("MOETRAIN_TEST_TIME_SCALE");
  if (!v || !*v) return 1;
  char* end = nullptr;
  const double scale = std::strtod(v, &end);
  if (*end != '\0' || !std::isfinite(scale) || scale < 1)
    throw std::invalid_argument("test: MOETRAIN_TEST_TIME_SCALE must be a number >= 1, got '" + std::string(v) + "'");
  return scale;
}

// A bound of `seconds` on an idle machine, as this machine gets it.
inline double scaled_seconds(double seconds) { return seconds * time_scale(); }

// The seconds hang_guard() allows one command: longer than CTest's limit on a whole test case (TIMEOUT
// 900 in CMakeLists.txt), so it only ever ends a hang, when the test binary runs outside CTest.
inline int hang_guard_seconds() { return int(std::ceil(scaled_seconds(1200))); }

// A `timeout` prefix for a command that could hang (SIGTERM, then SIGKILL 30 s later). --foreground:
// a signal a test sends to the guarded command then reaches it once; plain `timeout` passes it on to
// the command and again to its process group, and a second SIGTERM stops moetrain without saving.
inline std::string hang_guard() {
  return "timeout --foreground -k 30 " + std::to_string(hang_guard_seconds()) + " ";
}

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs a shell command, capturing stdout and stderr.
inline CommandResult run_command(const std::string& command) {
  CommandResult r;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Whether a command's output is exactly one non-empty line (trailing newlines aside): the CLI's promise
// for every error.
inline bool one_line(std::string s) {
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return !s.empty() && s.find('\n') == std::string::npos;
}

// The message of what f throws ("" when it throws nothing): for checking an error's one line.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// How many times `what` occurs in `text` (overlapping occurrences count).
inline int count_of(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace moetrain::testing
