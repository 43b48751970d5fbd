// A preemption at any point of a two-rank run: SIGTERM or SIGINT delivered to one rank (or both) in
// the first step, in the middle of training, just after a stop vote, during an evaluation batch or its
// vote, and during a save. Every rank must agree on when to stop: each ends within one step plus the
// save, exits 0, and leaves a checkpoint that verifies and resumes. The signal is raised by the rank
// itself at the named point (MOETRAIN_TEST_SIGNAL_AT, csrc/common/fault.h), so each case lands exactly
// where it says, every time; each case runs twice.
#include <catch2/catch.hpp>

#include "ckpt/checkpoint.h"
#include "dist_fixture.h"

using namespace moetrain;
using testing::count_of;
using Catch::Matchers::Contains;

namespace {

struct SignalCase {
  std::string at;          // MOETRAIN_TEST_SIGNAL_AT
  int64_t saved_step = 0;  // the checkpoint the stop must leave
};

}  // namespace

CATCH_TEST_CASE("A signal to one rank at any point of a two-rank run: every rank stops at the same step, saves, exits 0",
                "[dist][multiproc][signals][slow]") {
  testing::TempDir dir("signals");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, "");
  cfg.train.steps = 8;
  cfg.train.micro_batch_size = 2;
  cfg.train.eval_every = 2;
  cfg.train.eval_batches = 4;
  cfg.checkpoint.every = 2;
  cfg.parallel.timeout_s = 60;
  cfg.parallel.expert_parallel = 2;
  const std::vector<SignalCase> cases = {
      {"step@1:1", 1},              // the first step
      {"step@3:1", 3},              // mid-training, between checkpoints
      {"step@3:1/INT", 3},          // the same with SIGINT
      {"step@3", 3},                // both ranks at once
      {"voted@3:1", 4},             // just after a stop vote: the next step's vote sees it
      {"voted@4:0", 4},             // on rank 0, before the evaluation of the step: its first vote stops
      {"eval@2:1", 2},              // an evaluation batch, before its vote
      {"eval_voted@2:1", 2},        // just after an evaluation batch's vote
      {"eval_voted@4:0/INT", 4},    // the same on rank 0, with SIGINT
      {"shards_written@2:1", 3},    // during a save, its files written, not committed
      {"renamed@4:0", 5},           // during a save, the folder renamed, latest not yet moved
  };
  for (int repeat = 0; repeat < 2; ++repeat) {
    for (const auto& c : cases) {
      CATCH_INFO("MOETRAIN_TEST_SIGNAL_AT=" << c.at << " (repeat " << repeat << ")");
      const std::string run = dir.str("run-" + std::to_string(repeat) + "-" + c.at);
      cfg.run.out_dir = run;
      const std::string yaml = testing::write_config(cfg, files::join(run, "input.yaml"));
      const auto r = testing::run_command("OMP_NUM_THREADS=1 MOETRAIN_TEST_SIGNAL_AT=" + c.at + " " +
                                          testing::launch(2, std::string(MOETRAIN_BINARY) + " train --config " + yaml));
      CATCH_INFO(r.output);
      CATCH_CHECK(r.exit_code == 0);
      CATCH_CHECK(count_of(r.output, "[rank 0] received") == 1);  // rank 0 logs for the job
      CATCH_CHECK(!Contains("error").match(r.output));
      char latest[32];
      std::snprintf(latest, sizeof latest, "step_%08lld\n", static_cast<long long>(c.saved_step));
      CATCH_CHECK(files::read_file(files::join(run, "ckpt/latest")) == latest);
      const auto inspect = testing::run_command(std::string(MOETRAIN_BINARY) + " inspect " + run + " --quiet");
      CATCH_CHECK(inspect.exit_code == 0);
    }
  }
  // The stopped run resumes where it stopped and finishes.
  const std::string run = dir.str("run-1-voted@3:1");
  cfg.run.out_dir = run;
  const std::string yaml = testing::write_config(cfg, files::join(run, "input.yaml"));
  const auto resumed = testing::run_command("OMP_NUM_THREADS=1 " + testing::launch(2, std::string(MOETRAIN_BINARY) +
                                                                                          " train --config " + yaml +
                                                                                          " --resume auto"));
  CATCH_INFO(resumed.output);
  CATCH_CHECK(resumed.exit_code == 0);
  CATCH_CHECK_THAT(resumed.output, Contains("resumed from") && Contains("step_00000004"));
  CATCH_CHECK(files::read_file(files::join(run, "ckpt/latest")) == "step_00000008\n");
}

CATCH_TEST_CASE("SIGTERM to every process of a launched run's group (the launcher passing it on too) saves",
                "[dist][multiproc][signals]") {
  // A stop that signals the whole process group (systemd, a container stop, Ctrl-C's SIGINT in a
  // terminal) reaches each rank more than once within a moment: directly and through the launcher.
  // That is one preemption: the ranks finish the step, save and exit 0.
  testing::TempDir dir("signals-group");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 100000;
  cfg.train.micro_batch_size = 2;
  cfg.train.eval_every = 0;
  cfg.parallel.timeout_s = 60;
  const std::string yaml = testing::write_config(cfg, dir.str("run/input.yaml"));
  const std::string log = dir.str("log");
  // setsid: the launcher (under its `timeout` guard) leads a process group of its own.
  const auto r = testing::run_command(
      "( OMP_NUM_THREADS=1 setsid " + testing::launch(2, std::string(MOETRAIN_BINARY) + " train --config " + yaml) + " > " +
      log + " 2>&1 & pid=$!; for i in $(seq 3000); do grep -qE 'step +3/' " + log +
      " && break; sleep 0.1; done; kill -TERM -$pid; wait $pid; echo exit=$? )");
  const std::string output = files::read_file(log);
  CATCH_INFO(r.output << output);
  CATCH_CHECK_THAT(r.output, Contains("exit=0"));
  CATCH_CHECK_THAT(output, Contains("[rank 0] received SIGTERM: saved"));
  CATCH_CHECK(!Contains("unbound variable").match(output));
  const std::string latest = files::read_file(dir.str("run/ckpt/latest"));
  CATCH_CHECK(latest.rfind("step_", 0) == 0);
  CATCH_CHECK(testing::run_command(std::string(MOETRAIN_BINARY) + " inspect " + dir.str("run") + " --quiet").exit_code == 0);
}
