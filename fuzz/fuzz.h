// What every fuzz target shares: a scratch folder for parsers that read paths, and the rule that
// decides a finding. A moetrain::Error is the clean refusal we want; anything else that escapes a
// parser (std::bad_alloc, nlohmann or YAML exceptions, c10::Error) aborts, so libFuzzer and the
// plain driver (fuzz/driver.cpp) both report it with the input that caused it.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "common/errors.h"
#include "common/files.h"

namespace moetrain::fuzz {

// One scratch folder per process, removed at exit (left behind after a crash, for inspection). In
// memory (/dev/shm) where there is one: rewriting a file on a journaling disk costs milliseconds.
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    std::string pattern = "/dev/shm/moetrain-fuzz-XXXXXX";
    if (::access("/dev/shm", W_OK) == 0 && ::mkdtemp(pattern.data())) return pattern;
    return files::make_temp_directory("fuzz");
  }();
  static const bool cleanup_registered = [] {
    return std::atexit([] {
      try {
        files::remove_tree(dir);
      } catch (...) {
      }
    }) == 0;
  }();
  (void)cleanup_registered;
  return dir;
}

// Writes bytes to name inside the scratch folder and returns the path.
inline std::string write_input(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = files::join(scratch_dir(), name);
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || (size > 0 && std::fwrite(data, 1, size, f) != size) || std::fclose(f) != 0) {
    std::fprintf(stderr, "[fuzz] cannot write %s\n", path.c_str());
    std::abort();
  }
  return path;
}

// Runs one parse; returns normally on success or a moetrain error, aborts on anything else.
template <typename Fn>
void expect_clean(Fn&& parse) {
  try {
    parse();
  } catch (const Error& e) {
    // A clear refusal: what a parser should do with bad bytes. MOETRAIN_FUZZ_VERBOSE=1 shows it
    // (to check that a seed gets past the parser).
    static const bool verbose = std::getenv("MOETRAIN_FUZZ_VERBOSE") != nullptr;
    if (verbose) std::fprintf(stderr, "[fuzz] refused: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[fuzz] FINDING: a non-moetrain exception escaped the parser: %s\n", e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "[fuzz] FINDING: an exception of unknown type escaped the parser\n");
    std::abort();
  }
}

}  // namespace moetrain::fuzz
