// `moetrain convert` writes only into a new or empty folder unless --force, and never into a trained
// run's checkpoints: neither a user's config.json beside an export nor a run's `latest` is replaced.
#include <catch2/catch.hpp>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "ckpt/checkpoint.h"
#include "hf/hf.h"
#include "model/transformer.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

const std::string kBinary = MOETRAIN_BINARY;

// A Mixtral-shaped tiny model (no dense layer, no shared expert), so that it exports as mixtral.
config::Config tiny_run_config(const std::string& out_dir) {
  config::Config cfg;
  cfg.model = testing::tiny_model_config();
  cfg.model.dense_layers = 0;
  cfg.model.moe.n_shared_experts = 0;
  cfg.data.seq_len = 16;
  cfg.run.out_dir = out_dir;
  config::validate(cfg);
  return cfg;
}

// A run folder with one checkpoint at `step`, as training leaves it: ckpt/step_XXXXXXXX and latest.
void write_run(const std::string& dir, int64_t step) {
  const auto cfg = tiny_run_config(dir);
  model::Transformer model(cfg.model);
  model->init_weights(3);
  ckpt::Progress progress;
  progress.step = step;
  ckpt::save_weights_checkpoint(dir, *model, config::to_yaml(cfg), progress);
}

testing::CommandResult convert(const std::string& args) {
  return testing::run_command("OMP_NUM_THREADS=1 " + kBinary + " convert " + args);
}

size_t lines(const std::string& s) { return size_t(std::count(s.begin(), s.end(), '\n')); }

}  // namespace

CATCH_TEST_CASE("convert --to hf:DIR refuses a folder holding files unless --force, which replaces only "
                "config.json and the weights", "[cli][hf]") {
  testing::TempDir dir("convert-hf-target");
  const std::string run = dir.str("run"), out = dir.str("hf");
  write_run(run, 4);
  files::make_directories(out);
  const std::string mine = "{\"my\": \"own config\"}\n";
  testing::write_bytes(files::join(out, "config.json"), mine);
  testing::write_bytes(files::join(out, "tokenizer.json"), "{}\n");
  testing::write_bytes(files::join(out, "model.safetensors"), "stale weights");

  auto r = convert("--from " + run + " --to hf:" + out);
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK(lines(r.output) == 1);
  CATCH_CHECK_THAT(r.output, Contains("[convert] --to hf:" + out + " is not empty (it holds config.json, "
                                      "model.safetensors, tokenizer.json)") &&
                                 Contains("--force"));
  CATCH_CHECK(files::read_file(files::join(out, "config.json")) == mine);
  CATCH_CHECK(files::read_file(files::join(out, "model.safetensors")) == "stale weights");
  CATCH_CHECK_FALSE(files::exists(out + ".partial-export"));

  // --force: config.json and the weights are the export's, the stale model.safetensors (which
  // transformers would load before the index) is gone, the tokenizer stays.
  r = convert("--from " + run + " --to hf:" + out + " --force");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK(nlohmann::json::parse(files::read_file(files::join(out, "config.json")))["model_type"] == "mixtral");
  CATCH_CHECK(files::read_file(files::join(out, "tokenizer.json")) == "{}\n");
  CATCH_CHECK_FALSE(files::exists(files::join(out, "model.safetensors")));
  CATCH_CHECK_FALSE(files::exists(out + ".partial-export"));
  {
    model::Transformer expected(tiny_run_config(run).model);
    ckpt::load_model(*ckpt::find_checkpoint(run), *expected);
    auto back = hf::load(out);
    for (const auto& p : expected->named_parameters()) CATCH_CHECK(torch::equal(p.value(), back.model->named_parameters()[p.key()]));
  }

  // New and empty folders need no --force; a file where the folder goes is refused.
  r = convert("--from " + run + " --to hf:" + dir.str("new/nested"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 0);
  files::make_directories(dir.str("empty"));
  r = convert("--from " + run + " --to hf:" + dir.str("empty"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK(files::exists(dir.str("empty/config.json")));
  testing::write_bytes(dir.str("a-file"), "x");
  r = convert("--from " + run + " --to hf:" + dir.str("a-file") + " --force");
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK_THAT(r.output, Contains("is a file, not a folder"));
  CATCH_CHECK(files::read_file(dir.str("a-file")) == "x");
}

CATCH_TEST_CASE("convert --to RUN never writes into a trained run's checkpoints, even with --force", "[cli][hf]") {
  testing::TempDir dir("convert-run-target");
  const std::string hf_dir = dir.str("hf"), trained = dir.str("trained");
  {
    model::Transformer model(tiny_run_config(trained).model);
    model->init_weights(5);
    hf::export_model(*model, hf::Family::Mixtral, hf_dir);
  }
  write_run(trained, 4);
  const std::string latest = files::join(trained, "ckpt/latest");
  const std::string was = files::read_file(latest);

  for (const std::string force : {"", " --force"}) {
    auto r = convert("--from hf:" + hf_dir + " --to " + trained + force);
    CATCH_INFO(r.output);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK(lines(r.output) == 1);
    CATCH_CHECK_THAT(r.output, Contains("[convert] --to " + trained + " holds a run's checkpoints (ckpt/: latest, "
                                        "step_00000004)") &&
                                   Contains("even with --force"));
    CATCH_CHECK(files::read_file(latest) == was);
    CATCH_CHECK_FALSE(files::exists(files::join(trained, "ckpt/step_00000000")));
    CATCH_CHECK(*ckpt::find_checkpoint(trained) == files::join(trained, "ckpt/step_00000004"));
  }

  // A folder with other files (no checkpoints): refused without --force; with it, the checkpoint is
  // written beside them.
  const std::string notes = dir.str("notes");
  files::make_directories(notes);
  testing::write_bytes(files::join(notes, "README.txt"), "mine\n");
  auto r = convert("--from hf:" + hf_dir + " --to " + notes);
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK_THAT(r.output, Contains("[convert] --to " + notes + " is not empty (it holds README.txt)") &&
                                 Contains("--force"));
  CATCH_CHECK_FALSE(files::exists(files::join(notes, "ckpt")));
  r = convert("--from hf:" + hf_dir + " --to " + notes + " --force");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK(*ckpt::find_checkpoint(notes) == files::join(notes, "ckpt/step_00000000"));
  CATCH_CHECK(files::read_file(files::join(notes, "README.txt")) == "mine\n");

  // An empty folder is as good as a new one.
  files::make_directories(dir.str("empty"));
  r = convert("--from hf:" + hf_dir + " --to " + dir.str("empty"));
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK(*ckpt::find_checkpoint(dir.str("empty")) == dir.str("empty/ckpt/step_00000000"));
}
