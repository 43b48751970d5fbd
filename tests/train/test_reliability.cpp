// A run is never lost: a fresh run refuses to write over an earlier one, a missing `latest` is not a
// fresh start, a diverged step is never applied or saved, a preemption during evaluation stops within
// a batch, and a checkpoint folder is verified like the untrusted input it is.
#include <catch2/catch.hpp>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "ckpt/safetensors.h"
#include "ckpt/sha256.h"
#include "common/errors.h"
#include "train/trainer.h"
#include "train_fixture.h"

using namespace moetrain;
using testing::one_line;
using Catch::Matchers::Contains;
using json = nlohmann::json;

namespace {

const std::string kBinary = MOETRAIN_BINARY;

// Sets an environment variable for the scope (the fault-injection hooks read it).
struct ScopedEnv {
  std::string name;
  ScopedEnv(const std::string& n, const std::string& value) : name(n) { ::setenv(n.c_str(), value.c_str(), 1); }
  ~ScopedEnv() { ::unsetenv(name.c_str()); }
};

std::vector<json> metrics_of(const std::string& run) {
  std::vector<json> records;
  std::ifstream in(files::join(run, "metrics.jsonl"));
  for (std::string line; std::getline(in, line);) records.push_back(json::parse(line));
  return records;
}

std::string latest_of(const std::string& run) { return files::read_file(files::join(run, "ckpt/latest")); }

// Every weight of a step folder, by name, as loaded by a fresh model of the run's config.
std::map<std::string, torch::Tensor> weights_of(const config::Config& cfg, const std::string& step_dir) {
  model::Transformer m(cfg.model);
  ckpt::load_model(step_dir, *m);
  std::map<std::string, torch::Tensor> w;
  for (const auto& p : m->named_parameters()) w[p.key()] = p.value().clone();
  return w;
}

// Rewrites a step folder's manifest through `edit` (the files themselves stay as they are).
void edit_manifest(const std::string& step_dir, const std::function<void(json&)>& edit) {
  const std::string path = files::join(step_dir, "manifest.json");
  auto j = json::parse(files::read_file(path));
  edit(j);
  testing::write_bytes(path, j.dump(2));
}

}  // namespace

CATCH_TEST_CASE("A fresh run into a folder that holds a run refuses, --overwrite moves it aside", "[train][reliability]") {
  testing::TempDir dir("reliability-clobber");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 2;
  train::train(cfg, {});
  const std::string metrics_before = files::read_file(dir.str("run/metrics.jsonl"));
  const std::string latest_before = latest_of(dir.str("run"));

  // Without --resume: one error naming the folder and both ways on; nothing is touched.
  try {
    train::train(cfg, {});
    CATCH_FAIL("a second fresh run into the same folder was not refused");
  } catch (const Error& e) {
    const std::string msg = e.what();
    CATCH_CHECK_THAT(msg, Contains(dir.str("run")) && Contains("--resume auto") && Contains("new run.out_dir") &&
                              Contains("--overwrite"));
  }
  CATCH_CHECK(files::read_file(dir.str("run/metrics.jsonl")) == metrics_before);
  CATCH_CHECK(latest_of(dir.str("run")) == latest_before);

  // The same from the command line: exit 1 and one line.
  testing::write_config(cfg, dir.str("input.yaml"));
  auto cli = testing::run_command(kBinary + " train --config " + dir.str("input.yaml"));
  CATCH_CHECK(cli.exit_code == 1);
  CATCH_CHECK(one_line(cli.output));
  CATCH_CHECK_THAT(cli.output, Contains("already holds a run"));
  CATCH_CHECK(testing::run_command(kBinary + " train --config " + dir.str("input.yaml") + " --resume auto --overwrite")
                  .exit_code == 2);

  // A metrics file alone (a run killed before its first checkpoint) is a run too.
  auto cfg2 = cfg;
  cfg2.run.out_dir = dir.str("run2");
  files::make_directories(cfg2.run.out_dir);
  testing::write_bytes(dir.str("run2/metrics.jsonl"), "{\"step\": 1, \"loss\": 5.0}\n");
  CATCH_CHECK_THROWS_AS(train::train(cfg2, {}), Error);

  // --overwrite: the earlier run is moved aside whole, and the new one starts from step 0.
  const auto fresh = train::train(cfg, {"", /*overwrite=*/true});
  CATCH_CHECK(fresh.first_step == 0);
  CATCH_CHECK(files::read_file(dir.str("run.replaced-1/metrics.jsonl")) == metrics_before);
  CATCH_CHECK(latest_of(dir.str("run.replaced-1")) == latest_before);
  CATCH_CHECK(files::exists(dir.str("run/ckpt/latest")));
}

CATCH_TEST_CASE("A lost ckpt/latest resumes from the newest checkpoint that verifies, never from step 0",
                "[train][reliability]") {
  testing::TempDir dir("reliability-latest");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 6;
  cfg.checkpoint.every = 2;
  train::train(cfg, {});
  const std::string ckpt = dir.str("run/ckpt");

  // latest gone: step 6 is complete and verifies, so the run goes on from it.
  files::remove_tree(files::join(ckpt, "latest"));
  cfg.train.steps = 8;
  auto resumed = train::train(cfg, {"auto"});
  CATCH_CHECK(resumed.first_step == 6);
  CATCH_CHECK(resumed.last_step == 8);

  // latest unreadable (a device) and the newest folder damaged: the newest that verifies is taken.
  files::remove_tree(files::join(ckpt, "latest"));
  CATCH_REQUIRE(::symlink("/dev/urandom", files::join(ckpt, "latest").c_str()) == 0);
  const std::string victim = files::join(ckpt, "step_00000008/model.safetensors");
  const auto bytes = files::read_file(victim);
  testing::write_bytes(victim, bytes.substr(0, bytes.size() / 2));
  cfg.train.steps = 9;
  resumed = train::train(cfg, {"auto"});
  CATCH_CHECK(resumed.first_step == 6);

  // No step folder verifies: refused, naming the folder; nothing trains and metrics stay as they were.
  for (const auto& name : files::list_directory(ckpt))
    if (name.rfind("step_", 0) == 0) testing::write_bytes(files::join(ckpt, name + "/model.safetensors"), "x");
  files::remove_tree(files::join(ckpt, "latest"));
  const std::string metrics = files::read_file(dir.str("run/metrics.jsonl"));
  try {
    train::train(cfg, {"auto"});
    CATCH_FAIL("a run whose checkpoints all fail verification started again");
  } catch (const CheckpointError& e) {
    CATCH_CHECK_THAT(std::string(e.what()), Contains("latest") && Contains("verifies") && Contains(ckpt));
  }
  CATCH_CHECK(files::read_file(dir.str("run/metrics.jsonl")) == metrics);
}

CATCH_TEST_CASE("A non-finite loss or gradient is never applied, logged as skipped, and never saved",
                "[train][reliability]") {
  testing::TempDir dir("reliability-nonfinite");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("skip"));
  cfg.train.steps = 5;
  cfg.checkpoint.every = 1;

  // skip: a NaN gradient at step 3 (the loss is finite) changes nothing; the run goes on.
  {
    ScopedEnv fault("MOETRAIN_TEST_NONFINITE", "grad@3");
    const auto result = train::train(cfg, {});
    CATCH_CHECK(result.last_step == 5);
    CATCH_CHECK(result.skipped_steps == 1);
  }
  const auto records = metrics_of(dir.str("skip"));
  CATCH_REQUIRE(records.size() == 5);
  CATCH_CHECK(records[2]["skipped"] == true);
  CATCH_CHECK_THAT(records[2]["nonfinite"].get<std::string>(), Contains("gradients on rank 0"));
  CATCH_CHECK(!records[1].contains("skipped"));
  // No checkpoint at the skipped step; AdamW counted two updates by step 2 and three by step 4 (step
  // 3's was never applied), and the weights stay finite.
  CATCH_CHECK(!files::exists(dir.str("skip/ckpt/step_00000003")));
  const auto adam_steps = [&](const std::string& step) {
    return ckpt::SafetensorsFile(dir.str("skip/ckpt/" + step + "/optim.safetensors")).metadata().at("step_count");
  };
  CATCH_CHECK(adam_steps("step_00000002") == "2");
  CATCH_CHECK(adam_steps("step_00000004") == "3");
  for (const auto& [name, w] : weights_of(cfg, dir.str("skip/ckpt/step_00000005"))) {
    CATCH_INFO(name);
    CATCH_CHECK(torch::isfinite(w).all().item<bool>());
  }

  // stop: a NaN loss at step 3 ends the run naming the step, the rank and the last good checkpoint.
  cfg.run.out_dir = dir.str("stop");
  cfg.train.nonfinite = "stop";
  {
    ScopedEnv fault("MOETRAIN_TEST_NONFINITE", "loss@3");
    try {
      train::train(cfg, {});
      CATCH_FAIL("train.nonfinite = stop did not stop");
    } catch (const Error& e) {
      CATCH_CHECK_THAT(std::string(e.what()), Contains("step 3") && Contains("loss nan on rank 0") &&
                                                  Contains("last good checkpoint: " + dir.str("stop/ckpt/step_00000002")));
    }
  }
  CATCH_CHECK(latest_of(dir.str("stop")) == "step_00000002\n");
  CATCH_CHECK(!files::exists(dir.str("stop/ckpt/step_00000003")));

  // skip with a limit: more consecutive skipped steps than train.max_skipped_steps stop the run, and
  // keep_last never rotates the last good checkpoint away.
  cfg.run.out_dir = dir.str("limit");
  cfg.train.nonfinite = "skip";
  cfg.train.max_skipped_steps = 1;
  cfg.checkpoint.keep_last = 1;
  {
    ScopedEnv fault("MOETRAIN_TEST_NONFINITE", "grad@3,4");
    try {
      train::train(cfg, {});
      CATCH_FAIL("two skipped steps in a row with max_skipped_steps = 1 did not stop");
    } catch (const Error& e) {
      CATCH_CHECK_THAT(std::string(e.what()), Contains("step 4") && Contains("2 steps in a row") &&
                                                  Contains("last good checkpoint: " + dir.str("limit/ckpt/step_00000002")));
    }
  }
  CATCH_CHECK(latest_of(dir.str("limit")) == "step_00000002\n");
  CATCH_CHECK(!files::exists(dir.str("limit/ckpt/step_00000003")));
  CATCH_CHECK(ckpt::open_checkpoint(dir.str("limit/ckpt/step_00000002")).progress.step == 2);
}

CATCH_TEST_CASE("A diverging run writes no checkpoint during a streak of skipped steps and names the one before it",
                "[train][reliability]") {
  // The adversarial run of issue 29: optim.lr 1e6 and a checkpoint every step. Steps are skipped as the
  // weights blow up; none of them may be saved, the stop names the checkpoint written before the
  // streak began, keep_last 1 keeps it, and the advice says how to go on from it.
  testing::TempDir dir("reliability-diverge");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 40;
  cfg.checkpoint.every = 1;
  cfg.checkpoint.keep_last = 1;
  cfg.optim.lr = 1e6;
  cfg.optim.warmup_steps = 0;
  cfg.optim.grad_clip = 0;
  std::string error;
  try {
    train::train(cfg, {});
  } catch (const Error& e) {
    error = e.what();
  }
  CATCH_INFO(error);
  CATCH_REQUIRE(!error.empty());  // it diverged and stopped
  const auto records = metrics_of(dir.str("run"));
  int64_t first_skipped = 0;
  for (const auto& r : records) {
    if (!r.contains("skipped")) continue;
    const int64_t step = r["step"].get<int64_t>();
    if (first_skipped == 0) first_skipped = step;
    char name[32];
    std::snprintf(name, sizeof name, "step_%08lld", static_cast<long long>(step));
    CATCH_INFO(name);
    CATCH_CHECK(!files::exists(dir.str("run/ckpt/" + std::string(name))));
  }
  CATCH_REQUIRE(first_skipped > 0);
  // The newest checkpoint comes before the streak that stopped the run, and is the one named.
  const std::string latest = latest_of(dir.str("run"));
  const int64_t good = std::stoll(latest.substr(5));
  CATCH_CHECK(good < records.back()["step"].get<int64_t>());
  CATCH_CHECK(!records[size_t(good - 1)].contains("skipped"));
  const std::string good_dir = dir.str("run/ckpt/" + latest.substr(0, latest.size() - 1));
  CATCH_CHECK(ckpt::open_checkpoint(good_dir).progress.step == good);
  CATCH_CHECK_THAT(error, Contains("last good checkpoint: " + good_dir) && Contains("--resume " + good_dir) &&
                              Contains("optim.lr (now 1e+06)"));
}

CATCH_TEST_CASE("SIGTERM during a long evaluation stops within a batch, saves and exits 0", "[train][reliability][slow]") {
  testing::TempDir dir("reliability-eval-signal");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 3;
  cfg.train.eval_every = 1;
  cfg.train.eval_batches = 200000;  // minutes of evaluation after step 1
  testing::write_config(cfg, dir.str("input.yaml"));
  // Nothing is logged before step 1's evaluation ends, so the signal comes 4 s after the start (scaled
  // by MOETRAIN_TEST_TIME_SCALE): the set-up and the step take about a second, the evaluation minutes.
  auto r = testing::run_command("( OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " train --config " +
                                dir.str("input.yaml") + " > " + dir.str("log") + " 2>&1 & pid=$!; sleep " +
                                std::to_string(testing::scaled_seconds(4)) + "; start=$(date +%s%N);"
                                " kill -TERM $pid; wait $pid; echo exit=$?;"
                                " echo took_ms=$(( ($(date +%s%N) - start) / 1000000 )) )");
  CATCH_INFO(r.output << files::read_file(dir.str("log")));
  CATCH_CHECK_THAT(r.output, Contains("exit=0"));
  const auto took_ms = std::stoll(r.output.substr(r.output.find("took_ms=") + 8));
  // The README's bound, one step + one evaluation batch + one save: 20 s here (scaled).
  CATCH_CHECK(took_ms < testing::scaled_seconds(20) * 1000);
  CATCH_CHECK_THAT(files::read_file(dir.str("log")), Contains("received SIGTERM"));
  CATCH_CHECK(latest_of(dir.str("run")) == "step_00000001\n");
  CATCH_CHECK(testing::run_command(kBinary + " inspect " + dir.str("run") + " --quiet").exit_code == 0);
}

CATCH_TEST_CASE("inspect and loading refuse a checkpoint folder the manifest does not describe", "[ckpt][reliability]") {
  testing::TempDir dir("reliability-inspect");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 1;
  train::train(cfg, {});
  const std::string step = dir.str("run/ckpt/step_00000001");
  const std::string inspect = kBinary + " inspect " + step + " --quiet";
  CATCH_REQUIRE(testing::run_command(inspect).exit_code == 0);

  // A data file the manifest does not list.
  testing::write_bytes(files::join(step, "extra.safetensors"), "stray");
  auto stray = testing::run_command(inspect);
  CATCH_CHECK(stray.exit_code == 1);
  CATCH_CHECK_THAT(stray.output, Contains("extra.safetensors") && Contains("not in its manifest") && !Contains("every file matches"));
  CATCH_CHECK_THROWS_WITH(ckpt::open_checkpoint(step), Contains("extra.safetensors"));
  files::remove_tree(files::join(step, "extra.safetensors"));

  // A tensor file whose size and checksum are in the manifest but whose header does not parse.
  const std::string model_file = files::join(step, "model.safetensors");
  const std::string good = files::read_file(model_file);
  std::string bad = good;
  bad[8] = '!';  // the JSON header's first byte
  testing::write_bytes(model_file, bad);
  edit_manifest(step, [&](json& j) {
    for (auto& f : j["files"])
      if (f["name"] == "model.safetensors") f["sha256"] = ckpt::sha256_hex(bad.data(), bad.size());
  });
  auto unreadable = testing::run_command(inspect);
  CATCH_CHECK(unreadable.exit_code == 1);
  CATCH_CHECK_THAT(unreadable.output, Contains("unreadable") && !Contains("every file matches"));
  testing::write_bytes(model_file, good);

  // The model file not covered by the manifest: inspect and every load refuse it.
  edit_manifest(step, [](json& j) {
    json kept = json::array();
    for (auto& f : j["files"])
      if (f["name"] != "model.safetensors") kept.push_back(f);
    j["files"] = kept;
  });
  CATCH_CHECK(testing::run_command(inspect).exit_code == 1);
  auto gen = testing::run_command(kBinary + " generate --checkpoint " + step + " --prompt the --max-new-tokens 2");
  CATCH_CHECK(gen.exit_code == 1);
  CATCH_CHECK_THAT(gen.output, Contains("model.safetensors"));
  CATCH_CHECK_THROWS_WITH(weights_of(cfg, step), Contains("not listed"));

  // A manifest listing no files.
  edit_manifest(step, [](json& j) { j["files"] = json::array(); });
  auto empty = testing::run_command(inspect);
  CATCH_CHECK(empty.exit_code == 1);
  CATCH_CHECK_THAT(empty.output, Contains("lists no files"));
}

CATCH_TEST_CASE("A manifest is checked like any input: names, step, layout, types", "[ckpt][reliability]") {
  testing::TempDir dir("reliability-manifest");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 1;
  train::train(cfg, {});
  const std::string step = dir.str("run/ckpt/step_00000001");
  const std::string original = files::read_file(files::join(step, "manifest.json"));
  auto refused = [&](const std::function<void(json&)>& edit, const std::string& field) {
    testing::write_bytes(files::join(step, "manifest.json"), original);
    edit_manifest(step, edit);
    try {
      ckpt::read_manifest(step);
      CATCH_FAIL("accepted a manifest with a bad " + field);
    } catch (const CheckpointError& e) {
      CATCH_CHECK_THAT(std::string(e.what()), Contains("manifest.json") && Contains(field));
    }
  };
  refused([](json& j) { j["files"][0]["name"] = "../../../../etc/passwd"; }, "files[0].name");
  refused([](json& j) { j["files"][0]["name"] = "sub/model.safetensors"; }, "files[0].name");
  refused([](json& j) { j["files"][1]["name"] = j["files"][0]["name"]; }, "files[1].name");
  refused([](json& j) { j["files"][0]["sha256"] = "abc"; }, "files[0].sha256");
  refused([](json& j) { j["files"][0]["size"] = -5; }, "files[0].size");
  refused([](json& j) { j["step"] = 7; }, "step");
  refused([](json& j) { j["step"] = "one"; }, "step");
  refused([](json& j) { j["tokens"] = 1e300; }, "tokens");
  refused([](json& j) { j["elapsed_s"] = -1.0; }, "elapsed_s");
  refused([](json& j) { j["layout"]["world_size"] = 0; }, "layout.world_size");
  refused([](json& j) { j["layout"]["expert_parallel"] = 3; j["layout"]["world_size"] = 4; }, "layout.expert_parallel");
  refused([](json& j) { j.erase("config"); }, "config");
  refused([](json& j) { j["files"] = "model.safetensors"; }, "files");
  testing::write_bytes(files::join(step, "manifest.json"), original);
  CATCH_CHECK(ckpt::read_manifest(step).progress.step == 1);
}

CATCH_TEST_CASE("Files read whole are regular files of bounded size", "[common][reliability]") {
  testing::TempDir dir("reliability-files");
  CATCH_CHECK_THROWS_WITH(files::read_file("/dev/zero"), Contains("/dev/zero") && Contains("is a character device, not a regular file"));
  CATCH_CHECK_THROWS_WITH(files::read_file(dir.path), Contains("a directory"));
  testing::write_bytes(dir.str("big"), std::string(5000, 'x'));
  CATCH_CHECK_THROWS_WITH(files::read_file(dir.str("big"), 4096), Contains("5000 bytes"));
  CATCH_CHECK(files::read_file(dir.str("big")).size() == 5000);
  auto cli = testing::run_command(kBinary + " train --config /dev/zero");
  CATCH_CHECK(cli.exit_code == 1);
  CATCH_CHECK(one_line(cli.output));
  CATCH_CHECK_THAT(cli.output, Contains("/dev/zero"));
}
