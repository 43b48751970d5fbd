// train.lora's keys: a YAML list of targets, and each refusal naming the key and what is allowed.
#include <catch2/catch.hpp>

#include "common/errors.h"
#include "config/config.h"

using Catch::Matchers::Contains;
using moetrain::config::parse_config;

CATCH_TEST_CASE("train.lora reads from YAML and --set, and refuses bad targets naming the key", "[config][lora]") {
  const auto cfg = parse_config("train:\n  lora:\n    rank: 8\n    alpha: 32\n    targets: [q, v, experts]\n", "x.yaml");
  CATCH_CHECK(cfg.train.lora.rank == 8);
  CATCH_CHECK(cfg.train.lora.alpha == 32);
  CATCH_CHECK(cfg.train.lora.targets == std::vector<std::string>{"q", "v", "experts"});
  // to_yaml writes it back as a list that parses to the same.
  CATCH_CHECK(parse_config(moetrain::config::to_yaml(cfg), "y.yaml").train.lora.targets == cfg.train.lora.targets);
  CATCH_CHECK(parse_config("", "x.yaml", {"train.lora.targets=[o]"}).train.lora.targets == std::vector<std::string>{"o"});
  CATCH_CHECK(parse_config("", "x.yaml").train.lora.rank == 0);  // off by default

  CATCH_REQUIRE_THROWS_WITH(parse_config("", "x.yaml", {"train.lora.rank=4", "train.lora.targets=[q, up]"}),
                            Contains("train.lora.targets holds \"up\"") && Contains("q, k, v, kv, o, experts"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("", "x.yaml", {"train.lora.targets=q"}),
                            Contains("train.lora.targets: expected a list of names"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("", "x.yaml", {"train.lora.rank=4", "train.lora.targets=[]"}),
                            Contains("needs train.lora.targets"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("", "x.yaml", {"train.lora.rank=4", "model.attention=mla", "train.lora.targets=[k]"}),
                            Contains("use kv"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("", "x.yaml", {"train.lora.alpha=0"}), Contains("train.lora.alpha = 0 must be > 0"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("", "x.yaml", {"train.lora.dropout=1"}), Contains("train.lora.dropout"));
  CATCH_REQUIRE_THROWS_WITH(
      parse_config("", "x.yaml", {"train.lora.rank=4", "train.lora.dropout=0.1", "train.activation_checkpointing=full"}),
      Contains("train.activation_checkpointing"));
}
