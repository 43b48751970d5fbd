// Bad sampling options are refused before a model is loaded: NaN or infinite temperatures would
// otherwise reach torch.multinomial as a LibTorch error (or sample garbage).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../test_util.h"
#include "common/errors.h"
#include "model/transformer.h"
#include "train/generate.h"

using namespace moetrain;
using Catch::Matchers::Contains;

CATCH_TEST_CASE("generate refuses a temperature that is not a finite number >= 0", "[cli]") {
  for (const std::string t : {"nan", "NaN", "inf", "-inf", "-0.5"}) {
    CATCH_INFO("--temperature " << t);
    auto r = testing::run_command("{ " + std::string(MOETRAIN_BINARY) +
                                  " generate --checkpoint /nonexistent --prompt hi --temperature " + t + " 2>&1 >/dev/null; }");
    CATCH_CHECK(r.exit_code == 2);
    CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
    CATCH_CHECK_THAT(r.output, Contains("--temperature " + t) && Contains("finite number >= 0"));
  }
  // The library refuses it too, whoever calls it.
  model::Transformer model(testing::tiny_model_config());
  train::GenerateOptions options;
  options.max_new_tokens = 2;
  options.temperature = std::numeric_limits<double>::quiet_NaN();
  CATCH_CHECK_THROWS_WITH(train::generate(*model, {1, 2}, options), Contains("temperature") && Contains("finite"));
  options.temperature = 0;
  CATCH_CHECK(train::generate(*model, {1, 2}, options).size() == 4);
}
