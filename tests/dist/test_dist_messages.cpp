// What a surviving rank prints when its peer dies: its own one-line [dist] error, not LibTorch's
// c10d warning with a stack trace before it.
#include <catch2/catch.hpp>

#include <regex>

#include "dist_fixture.h"

using namespace moetrain;
using Catch::Matchers::Contains;

CATCH_TEST_CASE("rank 0 killed during a save: rank 1 ends with its [dist] line alone, no c10 stack trace", "[dist]") {
  testing::TempDir dir("dist-kill-save");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::equivalence_config(data_dir, dir.str("run"));
  cfg.train.steps = 100000;
  cfg.train.micro_batch_size = 2;
  cfg.checkpoint.every = 1;
  cfg.parallel.timeout_s = 60;  // rank 1 meets the closed connection, long before any timeout
  const std::string yaml = testing::write_config(cfg, dir.str("input.yaml"));
  // Rank 0 kills itself once its first checkpoint's temporary folder appears.
  const std::string ckpt = files::join(cfg.run.out_dir, "ckpt");
  const std::string command = "bash -c 'if [ $RANK = 0 ]; then (until ls -a " + ckpt +
                              " 2>/dev/null | grep -q tmp-step; do sleep 0.01; done; kill -9 $$) & fi; exec " +
                              std::string(MOETRAIN_BINARY) + " train --config " + yaml + "'";
  auto r = testing::run_command("OMP_NUM_THREADS=1 timeout 300 " + std::string(MOETRAIN_SOURCE_DIR) +
                                "/scripts/launch.sh --grace 60 --nproc 2 -- " + command);
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code != 0);
  CATCH_CHECK(r.exit_code != 124);  // not the outer bound
  CATCH_CHECK_THAT(r.output, Contains("launch.sh: rank 0") && Contains("killed by signal 9"));
  CATCH_CHECK_THAT(r.output, Contains("[rank 1] moetrain: [dist]") && Contains("rank 0"));
  CATCH_CHECK_THAT(r.output, !Contains("Exception raised from") && !Contains("frame #") && !Contains("TCPStore.cpp"));
}

// A stalled peer (not a dead one): the store backend holds to NCCL's watchdog contract. Rank 1 pauses
// at the start of step 3 far longer than parallel.timeout_s; rank 0, waiting in a collective, must exit
// non-zero within the timeout plus a margin, with the watchdog's one line naming the operation, its
// round, the group and its ranks.
CATCH_TEST_CASE("A rank that stalls: its peer exits non-zero within parallel.timeout_s with one line naming the collective",
                "[dist]") {
  testing::TempDir dir("dist-stall");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::equivalence_config(data_dir, dir.str("run"));
  cfg.train.steps = 100000;
  cfg.train.micro_batch_size = 2;
  cfg.train.log_every = 1;
  cfg.checkpoint.every = 0;
  const int timeout_s = int(testing::scaled_seconds(10));
  cfg.parallel.timeout_s = timeout_s;
  const std::string yaml = testing::write_config(cfg, dir.str("input.yaml"));
  const std::string metrics = files::join(cfg.run.out_dir, "metrics.jsonl");
  const std::string stalled_at = dir.str("stalled_at"), ended_at = dir.str("rank0_ended_at");
  // Rank 0 notes when step 2 is logged (rank 1 then stalls before step 3) and when it exits itself;
  // rank 1 is the CLI itself (exec), so that the launcher's kill ends it.
  const std::string command =
      "bash -c 'if [ $RANK = 0 ]; then (while [ \"$(wc -l < " + metrics + " 2>/dev/null || echo 0)\" -lt 2 ] && [ ! -e " +
      ended_at + " ]; do sleep 0.05; done; date +%s.%N > " + stalled_at + ") & " + std::string(MOETRAIN_BINARY) +
      " train --config " + yaml + "; rc=$?; date +%s.%N > " + ended_at + "; exit $rc; else exec " +
      std::string(MOETRAIN_BINARY) + " train --config " + yaml + "; fi'";
  auto r = testing::run_command("OMP_NUM_THREADS=1 MOETRAIN_TEST_STALL_AT=step@3:1=600 " + testing::hang_guard() +
                                std::string(MOETRAIN_SOURCE_DIR) + "/scripts/launch.sh --grace 5 --nproc 2 -- " + command);
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code != 0);
  CATCH_CHECK(r.exit_code != 124);  // not the outer bound
  CATCH_REQUIRE(files::exists(stalled_at));
  CATCH_REQUIRE(files::exists(ended_at));
  const double took = std::stod(files::read_file(ended_at)) - std::stod(files::read_file(stalled_at));
  CATCH_INFO("rank 0 exited " << took << " s after rank 1 stalled (timeout " << timeout_s << " s)");
  CATCH_CHECK(took < timeout_s + testing::scaled_seconds(15));
  // One line: the operation and its round, the group and its ranks, the timeout.
  const std::string marker = "[rank 0] moetrain: [dist] ";
  const auto at = r.output.find(marker);
  CATCH_REQUIRE(at != std::string::npos);
  const std::string line = r.output.substr(at, r.output.find('\n', at) - at);
  CATCH_INFO(line);
  CATCH_CHECK(std::regex_search(line, std::regex(R"(\] [a-z_/]+ #[0-9]+ on [a-z]+(\[[0-9,]+\])? \(world ranks 0,1; this is rank 0\): )")));
  CATCH_CHECK_THAT(line, Contains("not finished after parallel.timeout_s = " + std::to_string(timeout_s) + " s"));
  CATCH_CHECK_THAT(r.output, !Contains("Exception raised from") && !Contains("frame #"));
}
