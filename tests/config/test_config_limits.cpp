// Config input at the edges: an integer its key's type cannot hold says which bound it passes, and
// YAML nested far deeper than any config (up to yaml-cpp's own recursion limit and past it) is refused
// naming the file, in files and in --set alike.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "common/errors.h"
#include "config/config.h"
#include "../test_util.h"

using Catch::Matchers::Contains;
using moetrain::ConfigError;
using namespace moetrain::config;

namespace {

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    parse_config(yaml, "configs/x.yaml", overrides);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

std::string nested_list(int depth) { return std::string(size_t(depth), '[') + "1" + std::string(size_t(depth), ']'); }

std::string nested_map(int depth) {
  std::string s;
  for (int i = 0; i < depth; ++i) s += "{a: ";
  return s + "1" + std::string(size_t(depth), '}');
}

}  // namespace

CATCH_TEST_CASE("An integer out of its key's range names the key and the bound it passes", "[config]") {
  CATCH_CHECK(error_of("model:\n  n_layers: 9223372036854775807\n") ==
              "[config] configs/x.yaml:2:13: model.n_layers: 9223372036854775807 is larger than the maximum 2147483647");
  CATCH_CHECK_THAT(error_of("model:\n  d_model: 2147483648\n"),
                   Contains("model.d_model: 2147483648 is larger than the maximum 2147483647"));
  CATCH_CHECK_THAT(error_of("model:\n  d_model: -99999999999\n"),
                   Contains("model.d_model: -99999999999 is smaller than the minimum -2147483648"));
  CATCH_CHECK_THAT(error_of("run:\n  seed: 18446744073709551616\n"),
                   Contains("run.seed: 18446744073709551616 is larger than the maximum 18446744073709551615"));
  CATCH_CHECK_THAT(error_of("", {"run.seed=-1"}),
                   Contains("--set run.seed=-1: run.seed: -1 is smaller than the minimum 0"));
  CATCH_CHECK_THAT(error_of("", {"train.steps=+9223372036854775807"}),
                   Contains("train.steps: 9223372036854775807 is larger than the maximum 2147483647"));
  // Not an integer at all is still a type error.
  CATCH_CHECK_THAT(error_of("", {"train.steps=1e9"}), Contains("expected an integer, got \"1e9\""));
  CATCH_CHECK_THAT(error_of("", {"train.steps=12ab"}), Contains("expected an integer, got \"12ab\""));
  // In range still parses.
  CATCH_CHECK(parse_config("run:\n  seed: 18446744073709551615\n", "x.yaml").run.seed == 18446744073709551615ull);
}

CATCH_TEST_CASE("YAML nested beyond 64 levels is refused naming the file, whatever the depth", "[config]") {
  for (int depth : {65, 100, 1999, 2500, 200000}) {
    CATCH_INFO("depth " << depth);
    CATCH_CHECK_THAT(error_of("run:\n  name: " + nested_list(depth) + "\n"),
                     Contains("[config] configs/x.yaml:") && Contains("nested more than 64 levels deep"));
    CATCH_CHECK_THAT(error_of("model: " + nested_map(depth) + "\n"),
                     Contains("configs/x.yaml:") && Contains("nested more than 64 levels deep"));
    CATCH_CHECK_THAT(error_of("", {"model.d_model=" + nested_list(depth)}),
                     Contains("--set model.d_model=[[[") && Contains("nested more than 64 levels deep"));
  }
  // Block style, each level indented one more space.
  std::string block = "run:\n";
  for (int i = 0; i < 80; ++i) block += std::string(size_t(i + 2), ' ') + "k" + std::to_string(i) + ":\n";
  CATCH_CHECK_THAT(error_of(block), Contains("configs/x.yaml:") && Contains("nested more than 64 levels deep"));
  // The deepest real config (4 levels) and a modest nested value are fine or a plain type error.
  CATCH_CHECK(parse_config("model:\n  moe:\n    router:\n      score_func: sigmoid\n", "x.yaml").model.moe.router.score_func ==
              "sigmoid");
  CATCH_CHECK_THAT(error_of("run:\n  name: " + nested_list(10) + "\n"), Contains("expected a string, got a sequence"));
}
