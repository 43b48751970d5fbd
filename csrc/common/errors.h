// Error types. Everything below the CLI throws these; the CLI turns them into one line on stderr and
// a non-zero exit. Messages start with the component in brackets: "[config] ...", "[ckpt] ...".
#pragma once
#include <stdexcept>
#include <string>

namespace moetrain {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ConfigError : Error {
  explicit ConfigError(const std::string& m) : Error("[config] " + m) {}
};
struct DataError : Error {
  explicit DataError(const std::string& m) : Error("[data] " + m) {}
};
struct CheckpointError : Error {
  explicit CheckpointError(const std::string& m) : Error("[ckpt] " + m) {}
};
struct DistError : Error {
  explicit DistError(const std::string& m) : Error("[dist] " + m) {}
};
struct UsageError : Error {
  explicit UsageError(const std::string& m) : Error("[cli] " + m) {}
};

}  // namespace moetrain
