// Fuzz target: a token shard (32-byte header, then tokens), opened and read through a window.
#include <algorithm>
#include <vector>

#include "data/shard.h"
#include "fuzz.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace moetrain;
  const std::string path = fuzz::write_input("tokens.bin", data, size);
  fuzz::expect_clean([&] {
    data::Shard shard(path);
    const uint64_t n = std::min<uint64_t>(shard.size(), 64);
    std::vector<int64_t> tokens(n);
    std::vector<uint8_t> mask(n);
    shard.read(shard.size() - n, n, tokens.data());
    shard.read_mask(shard.size() - n, n, mask.data());
    bool refused = false;
    try {
      shard.read(0, shard.size() + 1, tokens.data());  // past the end: must throw, not read
    } catch (const DataError&) {
      refused = true;
    }
    if (!refused) {
      std::fprintf(stderr, "[fuzz] FINDING: a read past the end of the shard was not refused\n");
      std::abort();
    }
  });
  return 0;
}
