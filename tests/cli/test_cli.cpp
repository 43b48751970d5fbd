// The moetrain binary as a user runs it: help, one-line errors with non-zero exits, and an end-to-end
// prepare-data -> train -> resume -> generate on a small corpus.
#include <catch2/catch.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "../train/train_fixture.h"

using namespace moetrain;
using testing::one_line;
using Catch::Matchers::Contains;

namespace {
const std::string kBinary = MOETRAIN_BINARY;
const std::string kTiny = std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml";

testing::CommandResult moetrain_cli(const std::string& args) { return testing::run_command(kBinary + " " + args); }

std::vector<double> losses(const std::string& metrics_path) {
  std::vector<double> out;
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}
}  // namespace

CATCH_TEST_CASE("moetrain --help and subcommand --help", "[cli]") {
  auto r = moetrain_cli("--help");
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("train") && Contains("generate") && Contains("prepare-data"));
  for (const char* sub : {"train", "generate", "prepare-data", "config"}) {
    auto h = moetrain_cli(std::string(sub) + " --help");
    CATCH_CHECK(h.exit_code == 0);
    CATCH_CHECK_THAT(h.output, Contains("usage: moetrain"));
  }
}

CATCH_TEST_CASE("Bad input gives one clear line and a non-zero exit", "[cli]") {
  auto typo = moetrain_cli("train --config " + kTiny + " --set modle.n_layers=2");
  CATCH_CHECK(typo.exit_code != 0);
  CATCH_CHECK_THAT(typo.output, Contains("modle"));
  CATCH_CHECK(one_line(typo.output));

  auto range = moetrain_cli("train --config " + kTiny + " --set model.moe.top_k=999");
  CATCH_CHECK(range.exit_code != 0);
  CATCH_CHECK_THAT(range.output, Contains("top_k"));
  CATCH_CHECK(one_line(range.output));

  auto missing = moetrain_cli("train --config no/such/file.yaml");
  CATCH_CHECK(missing.exit_code != 0);
  CATCH_CHECK_THAT(missing.output, Contains("no/such/file.yaml"));
  CATCH_CHECK(one_line(missing.output));

  auto option = moetrain_cli("train --confg x.yaml");
  CATCH_CHECK(option.exit_code == 2);
  CATCH_CHECK_THAT(option.output, Contains("--confg") && Contains("--config"));

  auto command = moetrain_cli("trian");
  CATCH_CHECK(command.exit_code == 2);
  CATCH_CHECK_THAT(command.output, Contains("trian"));

  auto no_ckpt = moetrain_cli("generate --checkpoint no/such/run --prompt hi");
  CATCH_CHECK(no_ckpt.exit_code != 0);
  CATCH_CHECK_THAT(no_ckpt.output, Contains("no/such/run"));
  CATCH_CHECK(one_line(no_ckpt.output));
}

CATCH_TEST_CASE("CLI: prepare-data, train, resume equals straight, generate", "[cli][slow]") {
  testing::TempDir dir("cli-e2e");
  testing::make_corpus(dir);  // writes corpus.txt
  auto prep = moetrain_cli("prepare-data --text " + dir.str("corpus.txt") + " --out " + dir.str("shards"));
  CATCH_REQUIRE(prep.exit_code == 0);
  const std::string common = "train --config " + kTiny + " --set data.dir=" + dir.str("shards") +
                             " --set model.n_layers=2 --set model.d_model=32 --set model.n_heads=4"
                             " --set model.n_kv_heads=2 --set model.dense_hidden=64 --set model.moe.expert_hidden=32"
                             " --set data.seq_len=32 --set train.global_batch_size=4 --set train.eval_batches=2"
                             " --set train.log_every=1 --set train.eval_every=5 --set run.threads=1"
                             " --set checkpoint.every=5 --set optim.decay_steps=10";
  // --resume auto on a run folder that does not exist yet starts from step 0.
  auto straight = moetrain_cli(common + " --set train.steps=10 --set run.out_dir=" + dir.str("straight") + " --resume auto");
  CATCH_REQUIRE(straight.exit_code == 0);
  CATCH_CHECK_THAT(straight.output, Contains("done:"));
  auto half = moetrain_cli(common + " --set train.steps=5 --set run.out_dir=" + dir.str("resumed"));
  CATCH_REQUIRE(half.exit_code == 0);
  auto rest = moetrain_cli(common + " --set train.steps=10 --set run.out_dir=" + dir.str("resumed") + " --resume auto");
  CATCH_REQUIRE(rest.exit_code == 0);
  CATCH_CHECK_THAT(rest.output, Contains("resumed from"));
  const auto a = losses(dir.str("straight/metrics.jsonl")), b = losses(dir.str("resumed/metrics.jsonl"));
  CATCH_REQUIRE(a.size() == 10);
  CATCH_CHECK(a == b);  // bitwise, loss for loss (JSON keeps 17 significant digits)

  auto gen = moetrain_cli("generate --checkpoint " + dir.str("resumed") +
                          " --prompt 'the ' --max-new-tokens 12 --temperature 0");
  CATCH_REQUIRE(gen.exit_code == 0);
  CATCH_CHECK(gen.output.rfind("the ", 0) == 0);
  CATCH_CHECK(gen.output.size() >= 4 + 12);
}

CATCH_TEST_CASE("SIGTERM during training saves a checkpoint at the current step and exits 0", "[cli][slow]") {
  testing::TempDir dir("cli-sigterm");
  testing::make_corpus(dir);
  CATCH_REQUIRE(moetrain_cli("prepare-data --text " + dir.str("corpus.txt") + " --out " + dir.str("shards")).exit_code == 0);
  const std::string run = dir.str("run");
  // A long run: the shell waits for its first metrics line (training has started, handlers are
  // installed), then sends SIGTERM and reports the exit status.
  const std::string train = kBinary + " train --config " + kTiny + " --set data.dir=" + dir.str("shards") +
                            " --set model.n_layers=2 --set model.d_model=32 --set model.n_heads=4"
                            " --set model.n_kv_heads=2 --set model.dense_hidden=64 --set model.moe.expert_hidden=32"
                            " --set data.seq_len=32 --set train.global_batch_size=4 --set train.log_every=1"
                            " --set train.steps=1000000 --set run.threads=1 --set run.out_dir=" + run;
  auto r = testing::run_command("(" + testing::hang_guard() + train + " > " + dir.str("log") + " 2>&1 & pid=$!; while"
                                " [ ! -s " + run + "/metrics.jsonl ] && kill -0 $pid 2>/dev/null; do sleep 0.1; done; kill -TERM $pid;"
                                " wait $pid; echo exit=$?)");
  CATCH_CHECK_THAT(r.output, Contains("exit=0"));
  const auto log = files::read_file(dir.str("log"));
  CATCH_CHECK_THAT(log, Contains("received SIGTERM"));
  const std::string latest = files::read_file(run + "/ckpt/latest");
  CATCH_CHECK(latest.rfind("step_", 0) == 0);
  CATCH_CHECK(latest != "step_01000000\n");
  // The checkpoint written on the signal is complete: it verifies and loads.
  auto sample = moetrain_cli("generate --checkpoint " + run + " --prompt the --max-new-tokens 4 --temperature 0");
  CATCH_CHECK(sample.exit_code == 0);
}
