// logging.tensorboard: the event files a run writes, read back by the `tensorboard` package, hold every
// number of every metrics.jsonl record at its step (as fp32, TensorBoard's scalar type); and the
// CRC-32C that frames each record against the standard's check value.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "train/tensorboard.h"
#include "train/trainer.h"
#include "train_fixture.h"

using namespace moetrain;

CATCH_TEST_CASE("TensorBoard records: CRC-32C check values and TFRecord masking", "[train]") {
  const std::string digits = "123456789";
  CATCH_CHECK(train::crc32c(digits.data(), digits.size()) == 0xE3069283u);  // the CRC-32C check value
  CATCH_CHECK(train::crc32c("", 0) == 0u);
  const uint32_t c = train::crc32c(digits.data(), digits.size());
  CATCH_CHECK(train::masked_crc32c(digits.data(), digits.size()) == ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

CATCH_TEST_CASE("logging.tensorboard: every metrics.jsonl number at its step, read by the tensorboard package",
                "[train][python]") {
  if (!train::TensorBoardWriter::available()) {
    CATCH_WARN("built without protobuf: logging.tensorboard is refused, nothing to read back");
    return;
  }
  testing::TempDir dir("tensorboard");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  cfg.logging.tensorboard = true;
  cfg.train.steps = 6;
  const auto result = train::train(cfg, {});
  CATCH_REQUIRE(result.losses.size() == 6);

  const std::string source = MOETRAIN_SOURCE_DIR;
  auto r = testing::run_command(source + "/third_party/venv/bin/python " + source + "/tests/train/read_tensorboard.py " +
                                dir.str("run/tb") + " 2>/dev/null");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  const auto scalars = nlohmann::json::parse(r.output);
  auto value_at = [&](const std::string& tag, int64_t step) -> std::optional<double> {
    if (!scalars.contains(tag)) return std::nullopt;
    for (const auto& point : scalars[tag])
      if (point[0].get<int64_t>() == step) return point[1].get<double>();
    return std::nullopt;
  };
  std::ifstream metrics(dir.str("run/metrics.jsonl"));
  int records = 0, checked = 0;
  for (std::string line; std::getline(metrics, line); ++records) {
    const auto rec = nlohmann::json::parse(line);
    const int64_t step = rec["step"].get<int64_t>();
    for (const auto& [tag, value] : train::tensorboard_scalars(rec)) {
      CATCH_INFO("step " << step << " tag " << tag);
      const auto got = value_at(tag, step);
      CATCH_REQUIRE(got.has_value());
      CATCH_CHECK(*got == double(float(value)));  // fp32, exactly the record's value rounded
      ++checked;
    }
  }
  CATCH_CHECK(records == 6);
  CATCH_CHECK(checked > 6 * 8);
  for (const char* tag : {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "cost_usd", "val_loss", "moe/layer1/max_over_mean",
                          "moe/layer1/drop_fraction"})
    CATCH_CHECK(scalars.contains(tag));
  CATCH_CHECK(value_at("val_loss", 3).has_value());
}
