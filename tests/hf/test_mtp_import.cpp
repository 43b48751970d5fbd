// DeepSeek-V3 folders and their MTP layers: the depth of an import is the layers the shards hold (a
// config.json saying num_nextn_predict_layers 1 over shards without one is transformers' default), and
// an export never writes an MTP module that was neither imported nor trained. transformers itself
// checks the exports: an MTP layer it was not told of is an "unexpected" weight.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "ckpt/checkpoint.h"
#include "ckpt/safetensors.h"
#include "hf/hf.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kBinary = MOETRAIN_BINARY;
const std::string kPython = "OMP_NUM_THREADS=1 " + kSource + "/third_party/venv/bin/python ";

void reference(const std::string& args) {
  const auto r = testing::run_command(kPython + kSource + "/scripts/hf_reference.py " + args);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

testing::CommandResult convert(const std::string& args) {
  return testing::run_command("OMP_NUM_THREADS=1 " + kBinary + " convert " + args);
}

// The keys transformers reports as unexpected when it loads DIR, one per line after "unexpected:".
std::string unexpected_in_transformers(const std::string& dir) {
  const auto r = testing::run_command(
      kPython + "-c \"import sys, transformers; _, info = transformers.AutoModelForCausalLM.from_pretrained("
                "sys.argv[1], output_loading_info=True); print('unexpected:', *sorted(info['unexpected_keys']), "
                "sep='\\n')\" " + dir + " 2>/dev/null");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  const auto at = r.output.find("unexpected:\n");
  CATCH_REQUIRE(at != std::string::npos);
  return r.output.substr(at + 12);
}

bool has_tensor_of_layer(const std::string& dir, int layer) {
  const std::string prefix = "model.layers." + std::to_string(layer) + ".";
  for (const auto& [name, file] : hf::read_weight_map(dir))
    if (name.rfind(prefix, 0) == 0) return true;
  return false;
}

int nextn_layers(const std::string& dir) {
  return nlohmann::json::parse(files::read_file(files::join(dir, "config.json")))["num_nextn_predict_layers"].get<int>();
}

}  // namespace

CATCH_TEST_CASE("hf: num_nextn_predict_layers 1 over shards without an MTP layer imports no MTP module and "
                "exports none", "[hf][mtp]") {
  testing::TempDir dir("hf-mtp-absent");
  const std::string hf_dir = dir.str("hf");
  reference("make deepseek_v3 " + hf_dir);  // 3 layers, no MTP layer
  const std::string config_path = files::join(hf_dir, "config.json");
  auto config = nlohmann::json::parse(files::read_file(config_path));
  config["num_nextn_predict_layers"] = 1;  // DeepseekV3Config's default, as most such folders say
  testing::write_bytes(config_path, config.dump(2));

  auto loaded = hf::load(hf_dir);
  CATCH_CHECK(loaded.model->config().mtp_depth == 0);
  for (const auto& p : loaded.model->named_parameters()) CATCH_CHECK(p.key().rfind("mtp.", 0) != 0);

  // Straight to an HF folder, and through our checkpoint: no layer 3, num_nextn_predict_layers 0, and
  // transformers loads both without an unexpected weight.
  auto r = convert("--from hf:" + hf_dir + " --to hf:" + dir.str("direct"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("num_nextn_predict_layers 1, but the shards hold 0 MTP layers"));
  r = convert("--from hf:" + hf_dir + " --to " + dir.str("run"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  r = convert("--from " + dir.str("run") + " --to hf:" + dir.str("back"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  for (const std::string out : {dir.str("direct"), dir.str("back")}) {
    CATCH_INFO(out);
    CATCH_CHECK_FALSE(has_tensor_of_layer(out, 3));
    CATCH_CHECK(nextn_layers(out) == 0);
    CATCH_CHECK(unexpected_in_transformers(out).empty());
  }

  // model.mtp_depth set explicitly (init_from): the module is made, from the seeded init, to be trained.
  auto m = loaded.hf.model;
  m.mtp_depth = 1;
  model::Transformer with_mtp(m);
  with_mtp->init_weights(1);
  const auto seeded = with_mtp->named_parameters()["mtp.0.eh_proj"].clone();
  hf::load_init_from(*with_mtp, "hf:" + hf_dir);
  CATCH_CHECK(torch::equal(with_mtp->named_parameters()["mtp.0.eh_proj"], seeded));
}

CATCH_TEST_CASE("hf: an imported MTP layer survives convert through our checkpoint, bit for bit", "[hf][mtp]") {
  testing::TempDir dir("hf-mtp-kept");
  const std::string hf_dir = dir.str("hf");
  reference("make deepseek_v3_mtp " + hf_dir);
  auto r = convert("--from hf:" + hf_dir + " --to " + dir.str("run"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK_THAT(ckpt::read_manifest(*ckpt::find_checkpoint(dir.str("run"))).config_yaml, Contains("mtp_depth: 1"));
  r = convert("--from " + dir.str("run") + " --to hf:" + dir.str("back"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK(nextn_layers(dir.str("back")) == 1);
  const auto original = hf::read_weight_map(hf_dir), back = hf::read_weight_map(dir.str("back"));
  int compared = 0;
  for (const auto& [name, file] : original) {
    if (name.rfind("model.layers.3.", 0) != 0) continue;
    CATCH_INFO(name);
    CATCH_REQUIRE(back.count(name));
    CATCH_CHECK(torch::equal(ckpt::SafetensorsFile(files::join(hf_dir, file)).load(name),
                             ckpt::SafetensorsFile(files::join(dir.str("back"), back.at(name))).load(name)));
    ++compared;
  }
  CATCH_CHECK(compared > 10);
}
