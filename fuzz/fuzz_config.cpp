// Fuzz target: a YAML run config and --set overrides. The input is the YAML text, then optionally
// overrides, each after a NUL byte ("model.moe.top_k=4").
#include <vector>

#include "config/config.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  const std::string input(reinterpret_cast<const char*>(data), size);
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t nul; (nul = input.find('\0', start)) != std::string::npos; start = nul + 1)
    parts.push_back(input.substr(start, nul - start));
  parts.push_back(input.substr(start));
  const std::string yaml = parts.front();
  const std::vector<std::string> overrides(parts.begin() + 1, parts.end());
  fuzz::expect_clean([&] { config::parse_config(yaml, "fuzz.yaml", overrides); });
  return 0;
}
