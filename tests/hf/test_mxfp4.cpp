// MXFP4 dequantization (gpt-oss's published experts) against values worked out by hand from the format:
// E2M1 nibbles (low first) times 2^(scale - 127), exactly; and the inputs it must refuse.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "hf/hf.h"

using namespace moetrain;
using Catch::Matchers::Contains;

CATCH_TEST_CASE("hf: MXFP4 blocks dequantize to E2M1 values times their block's power of two", "[hf]") {
  // Two rows of two blocks of 2 bytes (4 values a block). Byte 0x21: low nibble 1 (0.5), high 2 (1.0).
  auto blocks = torch::tensor({0x21, 0xF7,   // 0.5, 1.0 | 6.0, -6.0
                               0x80, 0x4B,   // 0.0, -0.0 | -1.5, 2.0
                               0x53, 0x9E,   // 1.5, 3.0 | -4.0, -0.5
                               0x06, 0xC0},  // 4.0, 0.0 | 0.0, -2.0
                              torch::kByte).view({2, 2, 2});
  auto scales = torch::tensor({127, 128,   // x1, x2
                               126, 0},    // x0.5, x2^-127
                              torch::kByte).view({2, 2});
  const auto got = hf::dequantize_mxfp4(blocks, scales, "test");
  const double tiny = std::ldexp(1.0, -127);
  const auto want = torch::tensor({0.5, 1.0, 6.0, -6.0, 0.0, -0.0, -3.0, 4.0,
                                   0.75, 1.5, -2.0, -0.25, 4.0 * tiny, 0.0, 0.0, -2.0 * tiny},
                                  torch::kDouble)
                        .view({2, 8});
  CATCH_REQUIRE(got.scalar_type() == torch::kFloat);
  CATCH_REQUIRE(got.sizes() == want.sizes());
  CATCH_CHECK(torch::equal(got.to(torch::kDouble), want));  // exact: every value is representable
  CATCH_CHECK(std::signbit(got[0][5].item<float>()));       // -0.0 keeps its sign

  // Every nibble at every scale that stays a normal fp32 matches the table, exactly.
  auto all = torch::arange(256, torch::kLong).to(torch::kByte).view({1, 1, 256});
  for (int s : {1, 100, 127, 200, 254}) {
    const auto v = hf::dequantize_mxfp4(all, torch::full({1, 1}, s, torch::kByte), "test").view({256, 2});
    const float e2m1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0f, -0.5, -1, -1.5, -2, -3, -4, -6};
    for (int b = 0; b < 256; ++b) {
      CATCH_CHECK(v[b][0].item<float>() == std::ldexp(e2m1[b & 15], s - 127));
      CATCH_CHECK(v[b][1].item<float>() == std::ldexp(e2m1[b >> 4], s - 127));
    }
  }

  CATCH_CHECK_THROWS_WITH(hf::dequantize_mxfp4(blocks, torch::full({2, 2}, 255, torch::kByte), "experts.gate_up_proj"),
                          Contains("experts.gate_up_proj") && Contains("255"));
  CATCH_CHECK_THROWS_WITH(hf::dequantize_mxfp4(blocks, torch::full({2, 3}, 127, torch::kByte), "experts.down_proj"),
                          Contains("experts.down_proj") && Contains("disagree"));
  CATCH_CHECK_THROWS_WITH(hf::dequantize_mxfp4(blocks.to(torch::kFloat), scales, "x"), Contains("U8"));
}
