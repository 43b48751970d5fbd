// scripts/launch.sh under a stop signal: it passes the signal on to every rank once, waits for them to
// save, exits 0 with no error, and --resume auto then continues exactly where the ranks stopped.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "ckpt/checkpoint.h"
#include "common/files.h"
#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;
using Catch::Matchers::Contains;

// (No ';' in the name: CTest's discovery would split it there into two entries that run nothing.)
CATCH_TEST_CASE("SIGTERM to launch.sh during a 2-rank run: both ranks save, it waits for them and exits 0, "
                "and the resume continues exactly",
                "[dist][ckpt][launcher]") {
  // The launcher alone (kill PID), or its process group (kill -- -PGID), as `timeout` and Ctrl-C in a
  // terminal send it: then the launcher gets the signal, possibly twice, and the ranks none directly.
  const std::string target = GENERATE(as<std::string>(), "launcher", "process group");
  CATCH_INFO("SIGTERM to the " << target);
  TempDir dir("launcher-sigterm");
  const auto data_dir = make_corpus(dir);
  auto cfg = equivalence_config(data_dir, dir.str("run"));
  cfg.train.steps = 400;
  cfg.optim.decay_steps = 400;
  cfg.train.micro_batch_size = 2;
  cfg.parallel.expert_parallel = 2;
  cfg.parallel.timeout_s = int(scaled_seconds(60));
  write_config(cfg, dir.str("input.yaml"));
  // Each rank leaves its pid, to check afterwards that none outlived the launcher.
  auto rank_command = [&](const std::string& extra) {
    return "bash -c 'echo $$ > " + dir.str("pid.") + "$RANK; exec " + std::string(MOETRAIN_BINARY) + " train --config " +
           dir.str("input.yaml") + " --resume auto" + extra + "'";
  };
  // The launcher in its own process group (job control), signalled a second into training; what it
  // printed goes to a file, so that ranks it might leave behind cannot hold this test's output open.
  const std::string launcher_log = dir.str("launcher.log");
  const std::string script =
      "set -m\n"
      "OMP_NUM_THREADS=1 " + std::string(MOETRAIN_SOURCE_DIR) + "/scripts/launch.sh --nproc 2 -- " + rank_command("") +
      " > " + launcher_log + " 2>&1 &\n"
      "launcher=$!\n"
      "set +m\n"
      "while [ ! -s " + dir.str("run/metrics.jsonl") + " ] && kill -0 $launcher 2>/dev/null; do sleep 0.1; done\n"
      "sleep 1\n" +
      (target == "launcher" ? "kill -TERM $launcher\n" : "kill -TERM -- -$launcher\n") +
      "wait $launcher\n"
      "echo \"launcher exit=$?\"\n"
      "[ -e " + dir.str("run/ckpt/latest") + " ] && echo \"latest when the launcher ended: $(cat " + dir.str("run/ckpt/latest") + ")\"\n"
      "for r in 0 1; do\n"
      "  pid=$(cat " + dir.str("pid.") + "$r)\n"
      "  if kill -0 $pid 2>/dev/null; then echo \"rank $r outlived the launcher\"; kill -9 $pid; fi\n"
      "done\n";
  write_bytes(dir.str("stop.sh"), script);
  auto r = run_command(hang_guard() + "bash " + dir.str("stop.sh"));
  const std::string log = files::read_file(launcher_log);
  CATCH_INFO(r.output << "\nlaunch.sh's output:\n" << log.substr(log.size() > 3000 ? log.size() - 3000 : 0));
  CATCH_CHECK_THAT(r.output, Contains("launcher exit=0"));
  CATCH_CHECK_FALSE(Contains("outlived the launcher").match(r.output));
  CATCH_CHECK_THAT(log, Contains("launch.sh: received SIGTERM, passing it to every rank"));
  CATCH_CHECK_FALSE(Contains("unbound variable").match(log));
  CATCH_CHECK_FALSE(Contains("launch.sh: rank").match(log));  // no rank failed
  CATCH_CHECK_FALSE(Contains("launch.sh: line").match(log));  // no shell error
  CATCH_CHECK_THAT(log, Contains("[rank 0] received SIGTERM: saved"));

  // The checkpoint the signal wrote, whole when the launcher ended: both ranks' expert shards.
  CATCH_REQUIRE_THAT(r.output, Contains("latest when the launcher ended: step_"));
  const auto step_dir = *ckpt::find_checkpoint(dir.str("run"));
  const auto stopped = ckpt::read_manifest(step_dir);
  CATCH_REQUIRE(stopped.progress.step > 0);
  CATCH_REQUIRE(stopped.progress.step < 400);
  CATCH_CHECK(stopped.world_size == 2);
  for (const std::string shard : {"experts-00000-of-00002.safetensors", "experts-00001-of-00002.safetensors"})
    CATCH_CHECK(files::exists(files::join(step_dir, shard)));
  auto inspect = run_command(std::string(MOETRAIN_BINARY) + " inspect " + dir.str("run") + " --quiet");
  CATCH_INFO(inspect.output);
  CATCH_CHECK(inspect.exit_code == 0);

  // Resumed to a few steps past the stop, it gives a straight run's losses to that step, bit for bit
  // (the same processes, the same ops).
  const int64_t until = stopped.progress.step + 3;
  auto resume = run_command("OMP_NUM_THREADS=1 " + launch(2, rank_command(" --set train.steps=" + std::to_string(until))));
  CATCH_INFO(resume.output.substr(resume.output.size() > 2000 ? resume.output.size() - 2000 : 0));
  CATCH_REQUIRE(resume.exit_code == 0);
  CATCH_CHECK_THAT(resume.output, Contains("resumed from") && Contains(step_dir.substr(step_dir.rfind('/') + 1)));
  check_equals_straight_run(cfg, dir.str("run"), dir.str("straight"), until);
}
