// A rank whose rendezvous master never comes: one line naming the address and parallel.timeout_s,
// within about that many seconds, and none of LibTorch's stack traces.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "../test_util.h"

using namespace moetrain;
using Catch::Matchers::Contains;

CATCH_TEST_CASE("No rendezvous master: one line naming MASTER_ADDR:MASTER_PORT, within parallel.timeout_s", "[dist][cli]") {
  testing::TempDir dir("rendezvous");
  const std::string port = std::to_string(20000 + ::getpid() % 20000);  // nobody listens there
  const std::string command = "RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + port +
                              " OMP_NUM_THREADS=1 " + testing::hang_guard() + std::string(MOETRAIN_BINARY) + " train --config " +
                              std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml --set run.out_dir=" +
                              dir.str("run") + " --set parallel.timeout_s=3";
  const auto start = std::chrono::steady_clock::now();
  auto r = testing::run_command("{ " + command + " 2>&1 >/dev/null; }");  // stderr only
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  CATCH_CHECK_THAT(r.output, Contains("moetrain: [dist] no rendezvous master at 127.0.0.1:" + port) &&
                                 Contains("parallel.timeout_s = 3 s") && Contains("rank 0"));
  CATCH_CHECK_FALSE(Contains("Exception raised from").match(r.output));
  CATCH_CHECK(seconds >= 2.5);
  CATCH_CHECK(seconds < testing::scaled_seconds(20));  // set-up and 3 s, not the default 600 s
}
