// What used to be accepted in silence (issue 29 item 5) is now refused or warned about: a run folder
// holding someone else's config.yaml, a checkpoint whose manifest config or tensors do not match,
// an absurd init scale, blend weights that overflow, and ranks started with different configs.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "ckpt/safetensors.h"
#include "ckpt/sha256.h"
#include "common/errors.h"
#include "train/trainer.h"
#include "data_fixture.h"
#include "../dist/dist_fixture.h"

using namespace moetrain;
using testing::one_line;
using Catch::Matchers::Contains;
using json = nlohmann::json;

namespace {

const std::string kBinary = MOETRAIN_BINARY;

// stderr of a command (stdout dropped).
testing::CommandResult stderr_of(const std::string& command) {
  return testing::run_command("{ OMP_NUM_THREADS=1 " + command + " 2>&1 >/dev/null; }");
}

// Replaces one file of a step folder and records its new size and sha256 in the manifest, as a writer
// that meant it would: only a check of the contents against the config can tell.
void replace_listed(const std::string& step_dir, const std::string& name, const std::string& bytes) {
  testing::write_bytes(files::join(step_dir, name), bytes);
  const std::string manifest = files::join(step_dir, "manifest.json");
  auto j = json::parse(files::read_file(manifest));
  for (auto& f : j["files"])
    if (f["name"] == name) f["size"] = bytes.size(), f["sha256"] = ckpt::sha256_hex(bytes.data(), bytes.size());
  testing::write_bytes(manifest, j.dump(2));
}

}  // namespace

CATCH_TEST_CASE("A run folder holding a config.yaml that is not a moetrain config is refused, the file untouched",
                "[train][reliability]") {
  testing::TempDir dir("silent-config-yaml");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 1;
  testing::write_config(cfg, dir.str("run.yaml"));
  const std::string theirs = "# my notes on this experiment\ndataset: web\nlearning_rate: 3e-4\n";
  testing::write_bytes(dir.str("run/config.yaml"), theirs);
  for (const std::string resume : {"", " --resume auto"}) {
    const auto r = stderr_of(kBinary + " train --config " + dir.str("run.yaml") + resume);
    CATCH_INFO(r.output);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK(one_line(r.output));
    CATCH_CHECK_THAT(r.output, Contains(dir.str("run")) && Contains("config.yaml that is not a moetrain run's config"));
    CATCH_CHECK(files::read_file(dir.str("run/config.yaml")) == theirs);
  }
  // A folder with files of its own (a scheduler's log) and no config.yaml is a run folder like any other.
  files::remove_tree(dir.str("run/config.yaml"));
  testing::write_bytes(dir.str("run/slurm-123.out"), "job started\n");
  const auto ok = stderr_of(kBinary + " train --config " + dir.str("run.yaml"));
  CATCH_INFO(ok.output);
  CATCH_CHECK(ok.exit_code == 0);
  CATCH_CHECK(files::read_file(dir.str("run/slurm-123.out")) == "job started\n");
}

CATCH_TEST_CASE("inspect and resume check a checkpoint against its manifest's config: the config, names, shapes, dtypes",
                "[ckpt][reliability]") {
  testing::TempDir dir("silent-inspect");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 1;
  train::train(cfg, {});
  const std::string step = dir.str("run/ckpt/step_00000001");
  const std::string inspect = kBinary + " inspect " + step + " --quiet";
  const auto fine = testing::run_command(inspect);
  CATCH_INFO(fine.output);
  CATCH_REQUIRE(fine.exit_code == 0);
  CATCH_CHECK_THAT(fine.output, Contains("every weight has the name, shape and dtype"));
  const std::string manifest_path = files::join(step, "manifest.json");
  const std::string manifest = files::read_file(manifest_path);
  const std::string weights = files::read_file(files::join(step, "model.safetensors"));
  testing::write_config(cfg, dir.str("run.yaml"));
  const std::string resume = kBinary + " train --config " + dir.str("run.yaml") + " --set train.steps=2 --resume " + step;

  // The manifest's config damaged: not a config any more, or a value out of range.
  for (const auto& [from, to] : std::vector<std::pair<std::string, std::string>>{
           {"n_layers: 2", "n_layers: [2"}, {"n_layers: 2", "n_layers: -2"}}) {
    auto j = json::parse(manifest);
    std::string text = j["config"].get<std::string>();
    CATCH_REQUIRE(text.find(from) != std::string::npos);
    text.replace(text.find(from), from.size(), to);
    j["config"] = text;
    testing::write_bytes(manifest_path, j.dump(2));
    CATCH_INFO(to);
    const auto r = testing::run_command(inspect);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK_THAT(r.output, Contains("manifest.json") && Contains("config") && !Contains("every file matches"));
    const auto resumed = stderr_of(resume);
    CATCH_CHECK(resumed.exit_code == 1);
    CATCH_CHECK(one_line(resumed.output));
    CATCH_CHECK_THAT(resumed.output, Contains("manifest.json") && Contains("'config'"));
  }
  testing::write_bytes(manifest_path, manifest);

  // A weight stored with another dtype, then with another shape, its checksum updated to match.
  ckpt::TensorMap tensors;
  const ckpt::SafetensorsFile file(files::join(step, "model.safetensors"));
  const std::string victim = "embed";
  CATCH_REQUIRE(file.contains(victim));
  for (const std::string damage : {"I32", "shape"}) {
    tensors.clear();
    for (const auto& info : file.tensors()) {
      auto t = file.load(info.name);
      if (info.name == victim) t = damage == "I32" ? t.to(torch::kInt) : t.narrow(0, 0, t.size(0) - 1).contiguous();
      tensors.emplace_back(info.name, t);
    }
    ckpt::save_safetensors(dir.str("damaged.safetensors"), tensors, file.metadata());
    replace_listed(step, "model.safetensors", files::read_file(dir.str("damaged.safetensors")));
    CATCH_INFO(damage);
    const auto r = testing::run_command(inspect);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK_THAT(r.output, Contains("MISMATCH") && Contains(victim) &&
                                   Contains(damage == "I32" ? "dtype Int" : "has shape"));
    const auto resumed = stderr_of(resume);
    CATCH_CHECK(resumed.exit_code == 1);
    CATCH_CHECK_THAT(resumed.output, Contains(victim));
  }
  replace_listed(step, "model.safetensors", weights);
  CATCH_CHECK(testing::run_command(inspect).exit_code == 0);
}

CATCH_TEST_CASE("An init scale or blend weights out of range are config errors naming the key", "[config][reliability]") {
  testing::TempDir dir("silent-config");
  const auto sources = testing::make_blend_sources(dir);
  auto cfg = testing::tiny_train_config(sources[0], dir.str("run"));
  testing::write_config(cfg, dir.str("run.yaml"));
  const std::string train = kBinary + " train --config " + dir.str("run.yaml");

  const auto init = stderr_of(train + " --set model.init_std=1e30");
  CATCH_CHECK(init.exit_code != 0);
  CATCH_CHECK(one_line(init.output));
  CATCH_CHECK_THAT(init.output, Contains("model.init_std") && Contains("1e+30"));

  // Weights whose sum overflows a double: refused, naming data.sources.
  const std::string two = "--set 'data.sources=[{dir: " + sources[0] + ", weight: 1e308}, {dir: " + sources[1] +
                          ", weight: 1e308}]'";
  const auto overflow = stderr_of(train + " " + two);
  CATCH_INFO(overflow.output);
  CATCH_CHECK(overflow.exit_code != 0);
  CATCH_CHECK(one_line(overflow.output));
  CATCH_CHECK_THAT(overflow.output, Contains("data.sources") && Contains("sum"));

  // A share too small to be drawn once in the run: it trains, with a warning naming the source.
  const std::string tiny_share = "--set 'data.sources=[{dir: " + sources[0] + ", weight: 1}, {dir: " + sources[1] +
                                 ", weight: 1e-12, name: rare}]' --set train.steps=2";
  const auto warned = testing::run_command("OMP_NUM_THREADS=1 " + train + " " + tiny_share);
  CATCH_INFO(warned.output);
  CATCH_CHECK(warned.exit_code == 0);
  CATCH_CHECK_THAT(warned.output, Contains("warning: data.sources[1] ('rare')") && Contains("may get none"));
}

CATCH_TEST_CASE("Ranks started with different configs refuse at rendezvous, naming the first differing key",
                "[dist][multiproc][reliability]") {
  testing::TempDir dir("silent-seed");
  const auto data = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data, dir.str("run"));
  cfg.train.steps = 2;
  testing::write_config(cfg, dir.str("run.yaml"));
  // Each rank gets its own run.seed from its RANK, as a launch script with a per-rank variable would.
  const std::string per_rank = "sh -c 'exec " + kBinary + " train --config " + dir.str("run.yaml") +
                               " --set run.seed=$((7 + RANK))'";
  const auto r = testing::run_command("OMP_NUM_THREADS=1 " + testing::launch(2, per_rank));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code != 0);
  CATCH_CHECK_THAT(r.output, Contains("run.seed=8") && Contains("rank 0 has 7") && Contains("different configs"));
  CATCH_CHECK(!files::exists(dir.str("run/ckpt")));
  // The same config on both ranks trains.
  const auto same = testing::run_command("OMP_NUM_THREADS=1 " +
                                         testing::launch(2, kBinary + " train --config " + dir.str("run.yaml")));
  CATCH_INFO(same.output);
  CATCH_CHECK(same.exit_code == 0);
}
