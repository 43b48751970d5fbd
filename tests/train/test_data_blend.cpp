// Training on many shards and on a blend of sources: resume is bit for bit, metrics.jsonl counts the
// tokens of each source and reports each source's validation loss next to the overall one.
#include <catch2/catch.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "data_fixture.h"
#include "train/trainer.h"

using namespace moetrain;

namespace {

std::vector<nlohmann::json> read_metrics(const std::string& run_dir) {
  std::ifstream in(files::join(run_dir, "metrics.jsonl"));
  std::vector<nlohmann::json> rows;
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

}  // namespace

CATCH_TEST_CASE("A blend of a sharded and a single-file source resumes bit for bit and logs per source",
                "[train][data]") {
  testing::TempDir dir("train-blend");
  const auto sources = testing::make_blend_sources(dir);
  auto config = [&](const std::string& out, int steps) {
    auto cfg = testing::tiny_train_config(sources[0], dir.str(out));
    cfg.data.sources = {{sources[0], 3.0, "prose"}, {sources[1], 1.0, ""}};
    cfg.train.steps = steps;
    cfg.optim.decay_steps = 6;
    return cfg;
  };
  const auto full = train::train(config("straight", 6), {});
  CATCH_REQUIRE(full.losses.size() == 6);
  const auto a = train::train(config("resumed", 3), {});
  const auto b = train::train(config("resumed", 6), {"auto"});
  CATCH_CHECK(b.first_step == 3);
  std::vector<double> joined = a.losses;
  joined.insert(joined.end(), b.losses.begin(), b.losses.end());
  CATCH_REQUIRE(joined.size() == 6);
  for (size_t i = 0; i < 6; ++i) {
    CATCH_INFO("step " << i + 1);
    CATCH_CHECK(joined[i] == full.losses[i]);  // bitwise
  }

  const auto straight = read_metrics(dir.str("straight")), resumed = read_metrics(dir.str("resumed"));
  CATCH_REQUIRE(straight.size() == 6);
  CATCH_REQUIRE(resumed.size() == 6);
  for (size_t i = 0; i < 6; ++i) {
    const auto& row = straight[i];
    const int64_t prose = row["tokens/prose"].get<int64_t>(), words = row["tokens/words"].get<int64_t>();
    CATCH_CHECK(prose + words == row["tokens"].get<int64_t>());  // every token from one source
    CATCH_CHECK(prose > 0);
    CATCH_CHECK(resumed[i]["tokens/prose"] == row["tokens/prose"]);  // counted again from step 0
    CATCH_CHECK(resumed[i]["tokens/words"] == row["tokens/words"]);
  }
  // Evaluations (steps 3 and 6): each source with a val split, and the overall loss per token lies
  // between them (both sources evaluate the same number of tokens without masks).
  for (const auto& row : straight) {
    if (!row.contains("val_loss")) continue;
    CATCH_REQUIRE(row.contains("val_loss/prose"));
    CATCH_REQUIRE(row.contains("val_loss/words"));
    const double lo = std::min(row["val_loss/prose"].get<double>(), row["val_loss/words"].get<double>());
    const double hi = std::max(row["val_loss/prose"].get<double>(), row["val_loss/words"].get<double>());
    CATCH_CHECK(row["val_loss"].get<double>() >= lo - 1e-12);
    CATCH_CHECK(row["val_loss"].get<double>() <= hi + 1e-12);
    CATCH_CHECK(row["val_loss"].get<double>() ==
                Approx((row["val_loss/prose"].get<double>() + row["val_loss/words"].get<double>()) / 2).epsilon(1e-9));
  }
  CATCH_CHECK(straight[2].contains("val_loss"));
}

CATCH_TEST_CASE("A folder of train-*.bin shards trains and resumes bit for bit", "[train][data]") {
  testing::TempDir dir("train-many");
  const auto sources = testing::make_blend_sources(dir);
  const std::string sharded = sources[1];  // train-00000.bin ... and val.bin
  auto config = [&](const std::string& out, int steps) {
    auto cfg = testing::tiny_train_config(sharded, dir.str(out));
    cfg.train.steps = steps;
    cfg.optim.decay_steps = 6;
    return cfg;
  };
  const auto full = train::train(config("straight", 6), {});
  const auto a = train::train(config("resumed", 3), {});
  const auto b = train::train(config("resumed", 6), {"auto"});
  std::vector<double> joined = a.losses;
  joined.insert(joined.end(), b.losses.begin(), b.losses.end());
  CATCH_REQUIRE(joined.size() == 6);
  for (size_t i = 0; i < 6; ++i) CATCH_CHECK(joined[i] == full.losses[i]);
  CATCH_CHECK(full.losses.back() < full.losses.front());
  CATCH_CHECK(!read_metrics(dir.str("straight"))[0].contains("tokens/words"));  // no blend, no per-source keys
}
