// Inputs the fuzz target fuzz/fuzz_config.cpp found to hang or crash the config parser: each must now
// end in one ConfigError, quickly.
#include <catch2/catch.hpp>

#include <string>

#include "common/errors.h"
#include "config/config.h"

using Catch::Matchers::Contains;

CATCH_TEST_CASE("a ',' outside [] or {} is one error, not a hang (yaml-cpp 0.7's LoadAll loops on it)", "[config][fuzz]") {
  for (const std::string yaml : {",", ", ,", "- a\n,"}) {
    CATCH_INFO(yaml);
    CATCH_REQUIRE_THROWS_WITH(moetrain::config::parse_config(yaml, "x.yaml"),
                              Contains("x.yaml: holds more than one YAML document"));
  }
  CATCH_REQUIRE_THROWS_WITH(moetrain::config::parse_config("run:\n  seed: 1\n---\nrun:\n  seed: 2\n", "x.yaml"),
                            Contains("x.yaml: holds more than one YAML document"));
  CATCH_CHECK(moetrain::config::parse_config("# only a comment\n", "x.yaml").run.seed ==
              moetrain::config::Config{}.run.seed);
}
