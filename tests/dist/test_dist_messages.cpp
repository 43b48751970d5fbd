// What a surviving rank prints when its peer dies: its own one-line [dist] error, not LibTorch's
// c10d warning with a stack trace before it.
#include <catch2/catch.hpp>

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
