// Fuzz target: a loss mask (64-byte header, one byte per token) beside a fixed, valid 16-token shard.
#include <algorithm>
#include <vector>

#include "data/shard.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  static const std::string shard_path = [] {
    const std::string p = files::join(fuzz::scratch_dir(), "train.bin");
    std::vector<int64_t> tokens(16);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int64_t(i * 7 % 256);
    data::write_shard(p, tokens, 256);
    return p;
  }();
  fuzz::write_input("train.mask.bin", data, size);
  fuzz::expect_clean([&] {
    data::Shard shard(shard_path);
    std::vector<uint8_t> mask(shard.size());
    shard.read_mask(0, shard.size(), mask.data());
    for (uint8_t m : mask)
      if (m > 1) {
        std::fprintf(stderr, "[fuzz] FINDING: read_mask returned %d, not 0 or 1\n", int(m));
        std::abort();
      }
  });
  return 0;
}
