// `moetrain plan` with train.lora: the frozen base in the compute dtype with no gradient and no moments,
// the adapters counted from the shapes of the weights they adapt.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "cost/flops.h"
#include "cost/plan.h"

using namespace moetrain;

CATCH_TEST_CASE("plan counts LoRA: a frozen base in bf16, adapters with fp32 gradients and moments", "[cost][lora]") {
  config::Config cfg;
  cfg.model = testing::tiny_model_config();  // 1 dense + 1 MoE block, GQA, 4 experts, 1 shared
  cfg.run.dtype = "bf16";
  cfg.data.seq_len = 16;
  const auto full = cost::plan_memory(cfg, 1);
  cfg.train.lora.rank = 2;
  cfg.train.lora.targets = {"q", "kv", "o", "experts", "shared_experts", "dense_mlp"};
  const auto lora = cost::plan_memory(cfg, 1);
  // By hand: r (in + out) per adapted weight. D 16, H 4, G 2, head dim 4; dense hidden 24; experts 4 of
  // hidden 8; one shared expert of hidden 8.
  const double r = 2, D = 16, q = r * (D + 16), kv = r * (D + 8), o = r * (16 + D);
  const double attention = q + 2 * kv + o;
  const double adapters = 2 * attention + 3 * r * (D + 24) + 4 * 3 * r * (D + 8) + 3 * r * (D + 8);
  CATCH_CHECK(lora.params_per_rank == Approx(full.params_per_rank + adapters));
  CATCH_CHECK(lora.gradients == Approx(4 * adapters));
  CATCH_CHECK(lora.optimizer == Approx(8 * adapters));
  CATCH_CHECK(lora.compute_copy == Approx(2 * adapters));
  // The base: 2 bytes where every use casts it, 4 for the norms, routers and the embedding.
  CATCH_CHECK(lora.weights < full.weights);
  CATCH_CHECK(lora.weights > 0.5 * full.weights);
  CATCH_CHECK(lora.peak < full.peak);
}
