// Training on packed documents (data.packing: documents) through the CLI: the plan in the log, a
// validation loss, a too-long document refused with data.truncate: false, eval of whole documents, and
// expert parallelism at (world 2, ep 2) and a two-stage pipeline equal to one process, as every layout
// is in stream mode.
#include <catch2/catch.hpp>

#include "../dist/dist_fixture.h"

using namespace moetrain;
using Catch::Matchers::Contains;
using testing::train_at;

namespace {

config::Config packed_config(const std::string& data_dir, const std::string& out_dir) {
  auto cfg = testing::equivalence_config(data_dir, out_dir);
  cfg.model.max_seq_len = 64;
  cfg.data.seq_len = 64;
  cfg.data.packing = "documents";
  cfg.train.steps = 8;
  cfg.train.eval_every = 4;
  return cfg;
}

}  // namespace

CATCH_TEST_CASE("Packed documents train through the CLI: the plan is logged and validation is measured",
                "[train][packing]") {
  testing::TempDir dir("packed-train");
  const auto data_dir = testing::make_document_corpus(dir);
  const auto run = train_at(packed_config(data_dir, dir.str("run")), 1, 1);
  CATCH_INFO(run.output);
  CATCH_REQUIRE(run.exit_code == 0);
  CATCH_CHECK_THAT(run.output, Contains("train.bin: packed 1080 documents into") && Contains("val.bin: packed 120 documents"));
  CATCH_REQUIRE(run.losses.size() == 8);
  CATCH_CHECK(run.losses.back() < run.losses.front());
  std::ifstream metrics(files::join(run.run_dir, "metrics.jsonl"));
  int validations = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto j = nlohmann::json::parse(line);
    if (!j.contains("val_loss")) continue;
    ++validations;
    CATCH_CHECK(std::isfinite(j["val_loss"].get<double>()));
  }
  CATCH_CHECK(validations == 2);

  // eval --packing documents reads every validation document once, whole up to seq_len: its targets
  // are each document's tokens but the first (and none past seq_len).
  const data::Shard val(files::join(data_dir, "val.bin"));
  const auto starts = val.document_starts();
  uint64_t expected = 0;
  for (size_t d = 0; d < starts.size(); ++d)
    expected += std::min<uint64_t>((d + 1 < starts.size() ? starts[d + 1] : val.size()) - starts[d], 64) - 1;
  const auto eval = testing::run_command(std::string(MOETRAIN_BINARY) + " eval --checkpoint " + run.run_dir + " --data " +
                                         data_dir + " --packing documents --json");
  CATCH_INFO(eval.output);
  CATCH_REQUIRE(eval.exit_code == 0);
  const auto j = nlohmann::json::parse(eval.output.substr(eval.output.rfind("\n{") + 1));
  CATCH_CHECK(j["tokens"].get<uint64_t>() == expected);
  CATCH_CHECK(j["packing"] == "documents");
  CATCH_CHECK(std::isfinite(j["loss"].get<double>()));

  auto strict = packed_config(data_dir, dir.str("strict"));
  strict.data.seq_len = 24;  // shorter than most lines
  strict.data.truncate = false;
  const auto refused = train_at(strict, 1, 1);
  CATCH_CHECK(refused.exit_code != 0);
  CATCH_CHECK_THAT(refused.output, Contains("train.bin: document") && Contains("more than data.seq_len = 24"));
}

CATCH_TEST_CASE("Packed documents at (world 2, ep 2) and with two pipeline stages train as one process",
                "[dist][train][packing]") {
  testing::TempDir dir("packed-dist");
  const auto data_dir = testing::make_document_corpus(dir);
  const auto one = train_at(packed_config(data_dir, dir.str("w1")), 1, 1);
  CATCH_INFO(one.output);
  CATCH_REQUIRE(one.exit_code == 0);
  testing::check_same_run(train_at(packed_config(data_dir, dir.str("w2ep2")), 2, 2), one, "w2ep2",
                          "step_00000008");
  // Two pipeline stages: every stage takes the batch's positions, the last its MTP-free loss.
  auto staged = packed_config(data_dir, dir.str("pp2"));
  staged.parallel.pipeline_parallel = 2;
  testing::check_same_run(train_at(staged, 2, 1), one, "pp2", "step_00000008");
}
