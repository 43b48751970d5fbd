// A whole shard's tokens and loss-mask entries, read through data::Shard: for tests that compare a
// written shard with what they expect.
#pragma once
#include <cstdint>
#include <vector>

#include "data/shard.h"

namespace moetrain::testing {

inline std::vector<int64_t> tokens_of(const data::Shard& shard) {
  std::vector<int64_t> tokens(shard.size());
  shard.read(0, shard.size(), tokens.data());
  return tokens;
}

inline std::vector<uint8_t> mask_of(const data::Shard& shard) {
  std::vector<uint8_t> mask(shard.size());
  shard.read_mask(0, shard.size(), mask.data());
  return mask;
}

}  // namespace moetrain::testing
