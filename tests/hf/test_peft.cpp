// `convert --to peft:DIR` against peft itself: for each family, a tiny random model built by
// scripts/hf_reference.py gets LoRA adapters on every target it has (attention, dense MLP, shared and
// routed experts), filled with random values so that every factor shows; peft (from PyPI, in
// third_party/venv) loads the exported folder onto the transformers model, which must then give our
// adapted model's logits within 1e-4 (fp32 logits of size ~1, as the import tests), and differ from the
// base's by far more: an adapter peft placed wrongly, or not at all, cannot pass.
#include <catch2/catch.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "../train/train_fixture.h"
#include "ckpt/checkpoint.h"
#include "ckpt/safetensors.h"
#include "hf/hf.h"
#include "train/generate.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kBinary = MOETRAIN_BINARY;
const std::string kReference =
    "OMP_NUM_THREADS=1 " + kSource + "/third_party/venv/bin/python " + kSource + "/scripts/hf_reference.py ";

void reference(const std::string& args) {
  const auto r = testing::run_command(kReference + args);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  CATCH_REQUIRE(a.sizes() == b.sizes());
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

// A LoRA checkpoint on the HF folder `hf_dir` (model.init_from), every adapter random, in `run_dir`.
config::Config write_lora_checkpoint(const testing::TempDir& dir, const std::string& hf_dir, const std::string& run_dir,
                                     double dropout = 0) {
  auto cfg = testing::tiny_train_config(testing::make_corpus(dir), run_dir);
  cfg.model.init_from = "hf:" + hf_dir;
  cfg = hf::resolve_init_from(cfg);
  cfg.train.lora.rank = 3;  // odd, and unlike the expert count: a mixed-up reshape shows
  cfg.train.lora.alpha = 5;
  cfg.train.lora.dropout = dropout;
  model::Transformer model(cfg.model);
  model->init_weights(cfg.run.seed);
  hf::load_init_from(*model, cfg.model.init_from);
  model->add_lora(cfg.train.lora, cfg.run.seed);
  {
    torch::NoGradGuard no_grad;
    torch::manual_seed(11);
    for (auto& p : model->named_parameters())
      if (moe::is_lora_name(p.key())) p.value().copy_(0.3 * torch::randn_like(p.value()));
  }
  ckpt::save_weights_checkpoint(run_dir, *model, config::to_yaml(cfg), ckpt::Progress{});
  return cfg;
}

}  // namespace

CATCH_TEST_CASE("convert --to peft:DIR writes adapters that peft loads onto transformers' model with our logits",
                "[hf][lora]") {
  for (const std::string family : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2_lite", "deepseek_v2", "glm4_moe"}) {
    CATCH_INFO(family);
    testing::TempDir dir("peft-" + family);
    reference("make " + family + " " + dir.str("hf"));
    write_lora_checkpoint(dir, dir.str("hf"), dir.str("run"));
    const auto r = testing::run_command(kBinary + " convert --from " + dir.str("run") + " --to peft:" + dir.str("peft"));
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);

    const auto config = nlohmann::json::parse(std::ifstream(dir.str("peft/adapter_config.json")));
    CATCH_CHECK(config["peft_type"] == "LORA");
    CATCH_CHECK(config["r"] == 3);
    CATCH_CHECK(config["base_model_name_or_path"] == dir.str("hf"));
    CATCH_CHECK(!config["target_parameters"].is_null());  // every family here has routed experts

    reference("peft_logits " + dir.str("hf") + " " + dir.str("peft") + " " + dir.str("hf/reference.safetensors") + " " +
              dir.str("peft_logits.safetensors"));
    ckpt::SafetensorsFile theirs(dir.str("peft_logits.safetensors"));
    const auto tokens = ckpt::SafetensorsFile(dir.str("hf/reference.safetensors")).load("tokens");
    const auto ours = train::load_for_inference(dir.str("run"));
    torch::Tensor logits;
    {
      torch::NoGradGuard no_grad;
      logits = ours.model->forward(tokens).logits_BSV;
    }
    CATCH_CHECK(max_abs_diff(logits, theirs.load("logits")) < 1e-4);
    CATCH_CHECK(max_abs_diff(theirs.load("logits"), theirs.load("base")) > 0.1);
  }
}

CATCH_TEST_CASE("convert --to peft:DIR: only for LoRA checkpoints, never over a folder's files, dropout noted",
                "[hf][lora]") {
  testing::TempDir dir("peft-errors");
  reference("make qwen3_moe " + dir.str("hf"));
  write_lora_checkpoint(dir, dir.str("hf"), dir.str("run"), /*dropout=*/0.1);

  // Whole weights have no adapters to write.
  auto r = testing::run_command(kBinary + " convert --from hf:" + dir.str("hf") + " --to peft:" + dir.str("a"));
  CATCH_CHECK(r.exit_code != 0);
  CATCH_CHECK_THAT(r.output, Contains("adapters"));
  CATCH_CHECK(!files::exists(dir.str("a")));
  r = testing::run_command(kBinary + " convert --merge-lora --from " + dir.str("run") + " --to peft:" + dir.str("a"));
  CATCH_CHECK(r.exit_code != 0);
  CATCH_CHECK_THAT(r.output, Contains("--merge-lora"));

  // A folder that holds files is kept unless --force, which replaces only the adapter's two files.
  files::make_directories(dir.str("busy"));
  testing::write_bytes(dir.str("busy/README.md"), "mine");
  r = testing::run_command(kBinary + " convert --from " + dir.str("run") + " --to peft:" + dir.str("busy"));
  CATCH_CHECK(r.exit_code != 0);
  CATCH_CHECK_THAT(r.output, Contains("adapter_config.json"));
  CATCH_CHECK(!files::exists(dir.str("busy/adapter_config.json")));
  r = testing::run_command(kBinary + " convert --force --from " + dir.str("run") + " --to peft:" + dir.str("busy"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK(files::exists(dir.str("busy/README.md")));
  CATCH_CHECK(files::exists(dir.str("busy/adapter_model.safetensors")));
  // peft's stacked-expert adapters take no dropout: the export says what it wrote instead.
  CATCH_CHECK_THAT(r.output, Contains("lora_dropout written as 0"));
  const auto config = nlohmann::json::parse(std::ifstream(dir.str("busy/adapter_config.json")));
  CATCH_CHECK(config["lora_dropout"] == 0.0);
}
