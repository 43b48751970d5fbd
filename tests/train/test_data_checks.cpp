// The trainer's data checks: everything about the shards that can be known at open is checked before
// the first step (vocabularies, one validation window, a validation mask that learns nothing), and a
// shard truncated while the run reads it ends the run with one line naming it, the last checkpoint
// intact.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstring>

#include "train/trainer.h"
#include "train_fixture.h"

using namespace moetrain;
using testing::count_of;
using Catch::Matchers::Contains;

namespace {

const std::string kBinary = MOETRAIN_BINARY;

// Nothing of a run was written: the data was refused before training started.
void require_untouched(const std::string& out_dir) {
  CATCH_CHECK_FALSE(files::exists(files::join(out_dir, "metrics.jsonl")));
  CATCH_CHECK_FALSE(files::exists(files::join(out_dir, "ckpt")));
}

}  // namespace

CATCH_TEST_CASE("Shards are checked before the first step: val window, val vocabulary, tokens past the vocabulary",
                "[train][data]") {
  testing::TempDir dir("train-data-checks");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  const std::string val = files::join(data_dir, "val.bin"), train_bin = files::join(data_dir, "train.bin");
  const std::string val_kept = files::read_file(val), train_kept = files::read_file(train_bin);

  CATCH_SECTION("a val shard shorter than one window") {
    data::write_shard(val, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, 256);
    CATCH_REQUIRE_THROWS_WITH(train::train(cfg, {}), Contains("[data]") && Contains(val) && Contains("10 tokens") &&
                                                         Contains("data.seq_len = 16") && Contains("needs at least 17"));
    require_untouched(cfg.run.out_dir);
  }
  CATCH_SECTION("a val shard of a larger vocabulary than the model's") {
    data::write_shard(val, std::vector<int64_t>(100, 7), 300);
    CATCH_REQUIRE_THROWS_WITH(train::train(cfg, {}),
                              Contains(val) && Contains("300-token") && Contains("model.vocab_size = 256"));
    require_untouched(cfg.run.out_dir);
  }
  CATCH_SECTION("a train token at or past the header's vocabulary (the header says 100, the text has 'z' = 122)") {
    std::string bytes = train_kept;
    const uint64_t vocab = 100;
    std::memcpy(bytes.data() + 24, &vocab, 8);
    testing::write_bytes(train_bin, bytes);
    size_t position = 32;  // the first token >= 100
    while (position < bytes.size() && uint8_t(bytes[position]) < vocab) ++position;
    CATCH_REQUIRE(position < bytes.size());
    CATCH_REQUIRE_THROWS_WITH(train::train(cfg, {}), Contains(train_bin) &&
                                                         Contains("position " + std::to_string(position - 32)) &&
                                                         Contains("[0, 100)"));
    require_untouched(cfg.run.out_dir);
  }
}

CATCH_TEST_CASE("A val mask that learns nothing warns once at start, and the run trains on with no val_loss", "[train][data][cli]") {
  testing::TempDir dir("train-val-mask");
  const auto data_dir = testing::make_corpus(dir);
  const std::string val = files::join(data_dir, "val.bin");
  data::write_mask(val, std::vector<uint8_t>(data::Shard(val).size(), 0));
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  cfg.train.steps = 4;
  cfg.train.eval_every = 2;
  testing::write_config(cfg, dir.str("run.yaml"));
  auto r = testing::run_command("OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " train --config " + dir.str("run.yaml"));
  CATCH_INFO(r.output);
  // The run trains on: no val_loss anywhere, and its checkpoints are kept.
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK(r.output.find("| val_loss") == std::string::npos);
  CATCH_CHECK(files::read_file(dir.str("run/metrics.jsonl")).find("val_loss") == std::string::npos);
  CATCH_CHECK(files::read_file(dir.str("run/ckpt/latest")) == "step_00000004\n");
  CATCH_CHECK(count_of(r.output, "marks no token of " + val) == 1);
  CATCH_CHECK(count_of(r.output, "warning: " + data::mask_path_for(val)) == 1);
  // eval has nothing to report either: one line naming the mask, before it loads the model.
  auto eval = testing::run_command("{ " + kBinary + " eval --checkpoint " + dir.str("run") + " --data " + data_dir +
                                   " 2>&1 >/dev/null; }");
  CATCH_CHECK(eval.exit_code == 1);
  CATCH_CHECK(count_of(eval.output, "\n") == 1);
  CATCH_CHECK_THAT(eval.output, Contains(data::mask_path_for(val)) && Contains("marks no token"));
}

CATCH_TEST_CASE("train.bin truncated mid-run: exit 1, one line naming it, the last checkpoint intact", "[train][data][cli]") {
  testing::TempDir dir("train-truncated");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  cfg.train.steps = 1000000;  // runs until the truncation stops it (or the hang guard)
  cfg.train.eval_every = 0;
  cfg.train.log_every = 1000;
  cfg.checkpoint.every = 2;
  testing::write_config(cfg, dir.str("run.yaml"));
  const std::string train_bin = files::join(data_dir, "train.bin");
  // The run in the background; once its first checkpoint is committed the shard is cut in place (or
  // at once if the run has ended without one).
  const std::string script =
      "( OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " train --config " + dir.str("run.yaml") + " > " +
      dir.str("out.txt") + " 2> " + dir.str("err.txt") + "; echo $? > " + dir.str("rc.txt") + " ) & " +
      "while [ ! -e " + dir.str("run/ckpt/latest") + " ] && [ ! -e " + dir.str("rc.txt") + " ]; do sleep 0.1; done; " +
      "truncate -s 2000 " + train_bin + "; wait";
  testing::run_command(script);
  const std::string rc = files::read_file(dir.str("rc.txt")), err = files::read_file(dir.str("err.txt"));
  CATCH_INFO("stderr: " << err << "\nstdout: " << files::read_file(dir.str("out.txt")));
  CATCH_CHECK(std::stoi(rc) == 1);  // not 135 (SIGBUS) nor 124/137 (the hang guard)
  CATCH_CHECK(std::count(err.begin(), err.end(), '\n') == 1);
  CATCH_CHECK_THAT(err, Contains("moetrain: [data] " + train_bin) && Contains("truncated"));
  auto inspect = testing::run_command(kBinary + " inspect " + dir.str("run") + " --quiet");
  CATCH_INFO(inspect.output);
  CATCH_CHECK(inspect.exit_code == 0);
}
