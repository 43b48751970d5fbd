// Inputs the fuzz targets fuzz/fuzz_shard.cpp and fuzz_loss_mask.cpp found: each must be a clean
// result or one DataError. (The read_mask case is undefined behaviour that only a sanitizer build,
// MOETRAIN_SANITIZE=ON or scripts/fuzz.sh, reports.)
#include <catch2/catch.hpp>

#include <vector>

#include "common/errors.h"
#include "data/shard.h"
#include "../test_util.h"

using namespace moetrain;

CATCH_TEST_CASE("data: an empty read of a shard without a mask passes no null pointer to memset", "[data][fuzz]") {
  testing::TempDir dir("shard-fuzz");
  const std::string path = dir.str("empty.bin");
  data::write_shard(path, {}, 256);  // the fuzzer's input: a valid header of 0 tokens
  data::Shard shard(path);
  CATCH_REQUIRE(shard.size() == 0);
  std::vector<uint8_t> mask;  // data() is null
  shard.read_mask(0, 0, mask.data());
  CATCH_CHECK_THROWS_AS(shard.read_mask(0, 1, mask.data()), DataError);
}
