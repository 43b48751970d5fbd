// Hugging Face import and export against transformers itself: for each family a tiny random model
// built by scripts/hf_reference.py (every feature the family has) must give our logits within 1e-4 of
// transformers' (fp32), our export must reload in transformers with the same logits, and greedy
// generation must pick the same tokens. Also: fine-tuning from an import, and the errors users meet.
#include <catch2/catch.hpp>

#include <cstdio>
#include <fstream>
#include <tuple>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "ckpt/safetensors.h"
#include "data/shard.h"
#include "hf/hf.h"
#include "train/generate.h"
#include "train/trainer.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kBinary = MOETRAIN_BINARY;
constexpr double kTolerance = 1e-4;  // fp32 logits, ours vs transformers'

// Runs scripts/hf_reference.py with the project's venv; fails the test with its output on error.
void reference(const std::string& args) {
  const auto r = testing::run_command("OMP_NUM_THREADS=1 " + kSource + "/third_party/venv/bin/python " + kSource +
                                      "/scripts/hf_reference.py " + args);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

torch::Tensor load_tensor(const std::string& file, const std::string& name) {
  return ckpt::SafetensorsFile(file).load(name);
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  CATCH_REQUIRE(a.sizes() == b.sizes());
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

torch::Tensor our_logits(const model::TransformerImpl& model, const torch::Tensor& tokens) {
  torch::NoGradGuard no_grad;
  return model.forward(tokens).logits_BSV;
}

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  auto c = t.reshape(-1).to(torch::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// Every tensor of an HF folder by name, across its shards.
std::map<std::string, torch::Tensor> folder_tensors(const std::string& dir) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, file] : hf::read_weight_map(dir)) out[name] = load_tensor(files::join(dir, file), name);
  return out;
}

// Import, compare, export, reload in transformers, compare; greedy generation. With `bitwise`, the
// export holds every tensor of the original folder with the same values, bit for bit.
void check_family(const std::string& family, const std::string& model_type = "", bool bitwise = false) {
  testing::TempDir dir("hf-" + family);
  const std::string hf_dir = dir.str("hf"), exported = dir.str("exported");
  reference("make " + family + " " + hf_dir);
  const std::string ref = files::join(hf_dir, "reference.safetensors");
  const auto tokens = load_tensor(ref, "tokens");

  auto loaded = hf::load(hf_dir);
  CATCH_REQUIRE(hf::family_name(loaded.hf.family) == (model_type.empty() ? family : model_type));
  const auto logits = our_logits(*loaded.model, tokens);
  const double import_diff = max_abs_diff(logits, load_tensor(ref, "logits"));

  // Small shards so that the index and several files are exercised.
  hf::export_model(*loaded.model, loaded.hf.family, exported, /*max_shard_bytes=*/20000);
  CATCH_REQUIRE(files::exists(files::join(exported, "model-00002-of-00003.safetensors")) ==
                files::exists(files::join(exported, "model-00003-of-00003.safetensors")));
  CATCH_REQUIRE(files::exists(files::join(exported, "model.safetensors.index.json")));
  reference("logits " + exported + " " + ref + " " + dir.str("exported_logits.safetensors"));
  const double export_diff = max_abs_diff(load_tensor(dir.str("exported_logits.safetensors"), "logits"), logits);
  std::printf("[hf] %-10s max |logit diff|: import %.3g, export %.3g\n", family.c_str(), import_diff, export_diff);
  CATCH_CHECK(import_diff < kTolerance);
  CATCH_CHECK(export_diff < kTolerance);

  // The loss `eval` reports (the summed token cross-entropy of forward_loss, as train/evaluate.cpp takes
  // it, over the tokens) against transformers' labels= loss on the same tokens: within 1e-5 relative, a
  // few fp32 roundings of a mean over 22 tokens.
  {
    torch::NoGradGuard no_grad;
    const int64_t n = tokens.size(1) - 1;
    const double ours = loaded.model->forward_loss(tokens.narrow(1, 0, n), tokens.narrow(1, 1, n), -100, /*sum=*/true,
                                                   /*with_mtp=*/false).loss.item<double>() / double(tokens.size(0) * n);
    const double theirs = load_tensor(ref, "loss").item<double>();
    CATCH_INFO("eval loss: ours " << ours << ", transformers " << theirs);
    CATCH_CHECK(std::abs(ours - theirs) <= 1e-5 * std::abs(theirs));
  }

  // Greedy continuation of the reference prompt, token for token.
  const auto greedy = to_vector(load_tensor(ref, "greedy"));
  const size_t prompt_len = 5;
  train::GenerateOptions options;
  options.temperature = 0;
  options.max_new_tokens = int(greedy.size() - prompt_len);
  const std::vector<int64_t> prompt(greedy.begin(), greedy.begin() + prompt_len);
  CATCH_CHECK(train::generate(*loaded.model, prompt, options) == greedy);

  // The imported model trains: every parameter (MTP modules' included) gets a finite, non-zero gradient.
  {
    auto out = loaded.model->forward_loss(tokens.narrow(1, 0, 11), tokens.narrow(1, 1, 11), -100);
    auto loss = out.loss + out.balance_loss;
    if (out.mtp_loss.defined()) loss = loss + out.mtp_loss;
    loss.backward();
    for (const auto& p : loaded.model->named_parameters()) {
      CATCH_INFO(p.key());
      CATCH_REQUIRE(p.value().grad().defined());
      CATCH_CHECK(torch::isfinite(p.value().grad()).all().item<bool>());
      CATCH_CHECK(p.value().grad().abs().sum().item<double>() > 0);
    }
  }

  // Round trip without transformers: re-importing the export gives the same parameters exactly.
  auto again = hf::load(exported);
  auto a = loaded.model->named_parameters(), b = again.model->named_parameters();
  CATCH_REQUIRE(a.size() == b.size());
  for (const auto& p : a) CATCH_CHECK(torch::equal(p.value(), b[p.key()]));
  if (bitwise) {
    const auto original = folder_tensors(hf_dir), back = folder_tensors(exported);
    CATCH_CHECK(original.size() == back.size());
    for (const auto& [name, t] : original) {
      CATCH_INFO(name);
      CATCH_REQUIRE(back.count(name));
      CATCH_CHECK(torch::equal(t, back.at(name)));
    }
  }
}

// A tiny Mixtral-shaped model of ours, exported: a valid HF folder without Python.
config::ModelConfig tiny_mixtral() {
  auto m = testing::tiny_model_config();
  m.dense_layers = 0;
  m.moe.n_shared_experts = 0;
  m.tie_embeddings = false;
  return m;
}
void write_tiny_mixtral(const std::string& dir, uint64_t shard_bytes = 8000) {
  model::Transformer model(tiny_mixtral());
  model->init_weights(3);
  hf::export_model(*model, hf::Family::Mixtral, dir, shard_bytes);
}

}  // namespace

CATCH_TEST_CASE("hf: Mixtral imports with transformers' logits, exports back, generates greedily", "[hf]") {
  check_family("mixtral");
}
CATCH_TEST_CASE("hf: Qwen2-MoE (qkv biases, gated shared expert, raw top-k, a dense layer) round trip", "[hf]") {
  check_family("qwen2_moe");
}
CATCH_TEST_CASE("hf: Qwen3-MoE (per-head q/k norms, own head_dim, tied head, a dense layer) round trip", "[hf]") {
  check_family("qwen3_moe");
}
CATCH_TEST_CASE("hf: OLMoE (q/k norms over the whole projection, raw top-k) round trip", "[hf]") {
  check_family("olmoe");
}

CATCH_TEST_CASE("hf: DeepSeek-V3 (MLA with query low-rank, YaRN, sigmoid group-limited routing with the correction "
                "bias, routed scaling, shared and dense layers) round trip", "[hf]") {
  check_family("deepseek_v3");
}
// DeepSeek-V3's MTP layer (num_nextn_predict_layers 1): imported into model.mtp_depth 1 and exported
// back bit for bit. transformers does not model it: the logits and greedy tokens are the main model's.
CATCH_TEST_CASE("hf: DeepSeek-V3 with its MTP layer (num_nextn_predict_layers 1) round trip bit for bit", "[hf][mtp]") {
  check_family("deepseek_v3_mtp", "deepseek_v3", /*bitwise=*/true);
  testing::TempDir dir("hf-mtp");
  reference("make deepseek_v3_mtp " + dir.str("hf"));
  CATCH_CHECK(hf::read_config(dir.str("hf")).model.mtp_depth == 1);
  // Fine-tuning a model without MTP from it skips the layer; one with two depths loads the first and
  // keeps the seeded init for the second, saying so.
  auto loaded = hf::load(dir.str("hf"));
  for (int depth : {0, 2}) {
    auto m = loaded.hf.model;
    m.mtp_depth = depth;
    model::Transformer model(m);
    model->init_weights(1);
    const auto fresh = depth > 0 ? model->named_parameters()["mtp.1.eh_proj"].clone() : torch::Tensor();
    hf::load_init_from(*model, "hf:" + dir.str("hf"));
    CATCH_CHECK(torch::equal(model->named_parameters()["layers.2.attn.wo"], loaded.model->named_parameters()["layers.2.attn.wo"]));
    if (depth == 0) continue;
    CATCH_CHECK(torch::equal(model->named_parameters()["mtp.0.eh_proj"], loaded.model->named_parameters()["mtp.0.eh_proj"]));
    CATCH_CHECK(torch::equal(model->named_parameters()["mtp.1.eh_proj"], fresh));
  }
  // Another family cannot hold MTP layers.
  auto mixtral = tiny_mixtral();
  mixtral.mtp_depth = 1;
  model::Transformer with_mtp(mixtral);
  CATCH_CHECK_THROWS_WITH(hf::export_model(*with_mtp, hf::Family::Mixtral, dir.str("mixtral")),
                          Contains("model.mtp_depth = 1"));
}

CATCH_TEST_CASE("hf: DeepSeek-V2-Lite shape (MLA without query low-rank) round trip", "[hf]") {
  check_family("deepseek_v2_lite", "deepseek_v3");
}

CATCH_TEST_CASE("hf: DeepSeek-V2 (MLA with query low-rank, YaRN with mscale 0.707, softmax routing limited to the "
                "groups of the best experts, raw weights times 16, shared and dense layers) round trip", "[hf]") {
  check_family("deepseek_v2");
  // What transformers' DeepseekV2 cannot mean is refused, naming the field; an MLA model with softmax
  // routing exports to it, one with sigmoid routing to DeepSeek-V3.
  testing::TempDir dir("hf-deepseek-v2-fields");
  reference("make deepseek_v2 " + dir.str("hf"));
  const std::string config_path = dir.str("hf/config.json");
  const auto original = nlohmann::json::parse(files::read_file(config_path));
  for (const auto& [field, value, expected] :
       std::vector<std::tuple<std::string, nlohmann::json, std::string>>{{"topk_method", "noaux_tc", "group_limited_greedy"},
                                                                         {"norm_topk_prob", true, "never renormalizes"},
                                                                         {"scoring_func", "sigmoid", "softmax"}}) {
    auto config = original;
    config[field] = value;
    testing::write_bytes(config_path, config.dump());
    const auto msg = testing::error_of([&] { hf::read_config(dir.str("hf")); });
    CATCH_CHECK_THAT(msg, Contains("config.json") && Contains(field) && Contains(expected));
  }
  testing::write_bytes(config_path, original.dump());
  const auto m = hf::read_config(dir.str("hf")).model;
  CATCH_CHECK(m.moe.router.group_score == "max");
  CATCH_CHECK(!m.moe.router.normalize_topk);
  CATCH_CHECK(hf::infer_family(m) == hf::Family::DeepseekV2);
  auto sigmoid = m;
  sigmoid.moe.router.score_func = "sigmoid";
  CATCH_CHECK(hf::infer_family(sigmoid) == hf::Family::DeepseekV3);
  auto top2 = m;
  top2.moe.router.group_score = "top2_sum";
  model::Transformer v3_groups(top2);
  CATCH_CHECK_THROWS_WITH(hf::export_model(*v3_groups, hf::Family::DeepseekV2, dir.str("out")),
                          Contains("model.moe.router.group_score = top2_sum") && Contains("its best expert"));
}
CATCH_TEST_CASE("hf: DeepSeek-V2-Lite (transformers' DeepseekV2: MLA without query low-rank, greedy softmax top-k) "
                "round trip", "[hf]") {
  check_family("deepseek_v2_greedy", "deepseek_v2");
}

// GLM-4.5 (transformers' Glm4Moe): grouped-query attention that rotates only the first half of each q/k
// head (rotate-half within those dims), q/k/v biases but none on o_proj, optional per-head q/k norms,
// DeepSeek-V3's sigmoid routing with the correction bias, groups, scaling and shared experts.
CATCH_TEST_CASE("hf: GLM-4.5 (partial RoPE, q/k/v biases, sigmoid routing with the correction bias, a shared expert, "
                "one dense layer) round trip", "[hf]") {
  check_family("glm4_moe", "", /*bitwise=*/true);
}
CATCH_TEST_CASE("hf: GLM-4.5 with per-head q/k norms, RoPE on a quarter of the head, no dense layer, 4 groups, raw "
                "top-k weights times 2.5, round trip", "[hf]") {
  check_family("glm4_moe_qk_norm", "glm4_moe", /*bitwise=*/true);
}
// gpt-oss: sinks, windows shorter than the 12-token sequence, YaRN without truncation, biased clamped
// SwiGLU experts stored stacked, a router with a bias; the MXFP4 variant's experts are stored as MXFP4
// blocks and scales, whose dequantized values transformers' model holds.
CATCH_TEST_CASE("hf: gpt-oss (sinks, q/k/v/o biases, a window of 5 on alternating layers, YaRN without truncation, "
                "top-2 of 4) round trip bit for bit", "[hf][gpt_oss]") {
  check_family("gpt_oss", "gpt_oss", /*bitwise=*/true);
}
CATCH_TEST_CASE("hf: gpt-oss with a window of 3 on every layer, no attention biases, plain RoPE, top-3 of 6 round trip",
                "[hf][gpt_oss]") {
  check_family("gpt_oss_sliding", "gpt_oss", /*bitwise=*/true);
}
CATCH_TEST_CASE("hf: gpt-oss with MXFP4-stored experts round trip", "[hf][gpt_oss]") {
  check_family("gpt_oss_mxfp4", "gpt_oss");
}

CATCH_TEST_CASE("hf: GLM-4.5 with its MTP layer (num_nextn_predict_layers 1) round trip bit for bit", "[hf][mtp]") {
  check_family("glm4_moe_mtp", "glm4_moe", /*bitwise=*/true);
}

CATCH_TEST_CASE("hf: GLM-4.5's config.json fields map to our keys, and what they cannot mean is refused", "[hf]") {
  testing::TempDir dir("hf-glm4-moe-fields");
  reference("make glm4_moe_mtp " + dir.str("hf"));
  const std::string config_path = dir.str("hf/config.json");
  const auto original = nlohmann::json::parse(files::read_file(config_path));
  const auto m = hf::read_config(dir.str("hf")).model;
  CATCH_CHECK(m.head_dim == 16);
  CATCH_CHECK(m.rotary_dim == 8);  // partial_rotary_factor 0.5
  CATCH_CHECK(m.attn_bias == "qkv");
  CATCH_CHECK(m.qk_norm == "none");
  CATCH_CHECK(m.dense_layers == 1);
  CATCH_CHECK(m.mtp_depth == 1);
  CATCH_CHECK(m.moe.n_shared_experts == 1);
  CATCH_CHECK(m.moe.router.score_func == "sigmoid");
  CATCH_CHECK(m.moe.router.selection_bias);
  CATCH_CHECK(m.moe.router.normalize_topk);
  CATCH_CHECK(hf::infer_family(m) == hf::Family::Glm4Moe);
  // The factor at the top level (older configs), and absent: transformers' default 0.5.
  for (const auto& [factor, rotary] : std::vector<std::pair<nlohmann::json, int>>{{0.25, 4}, {nullptr, 8}, {1.0, 0}}) {
    CATCH_INFO(factor.dump());
    auto config = original;
    config["rope_parameters"].erase("partial_rotary_factor");
    if (!factor.is_null()) config["partial_rotary_factor"] = factor;
    testing::write_bytes(config_path, config.dump());
    CATCH_CHECK(hf::read_config(dir.str("hf")).model.rotary_dim == rotary);
  }
  {  // transformers' Glm4MoeConfig defaults: one dense first layer, one shared expert
    auto config = original;
    config.erase("first_k_dense_replace");
    config.erase("n_shared_experts");
    testing::write_bytes(config_path, config.dump());
    const auto defaults = hf::read_config(dir.str("hf")).model;
    CATCH_CHECK(defaults.dense_layers == 1);
    CATCH_CHECK(defaults.moe.n_shared_experts == 1);
  }
  for (const auto& [field, value, expected] : std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
           {"partial_rotary_factor", 0.3125, "even number of dims"},
           {"partial_rotary_factor", "half", "must be a number"},
           {"attention_bias", "yes", "true or false"},
           {"use_qk_norm", 1, "true or false"},
           {"hidden_act", "gelu", "silu"}}) {
    CATCH_INFO(field);
    auto config = original;
    config["rope_parameters"].erase("partial_rotary_factor");
    config[field] = value;
    testing::write_bytes(config_path, config.dump());
    const auto msg = testing::error_of([&] { hf::read_config(dir.str("hf")); });
    CATCH_CHECK_THAT(msg, Contains("config.json") && Contains(field) && Contains(expected));
    CATCH_CHECK(msg.find('\n') == std::string::npos);
  }
  testing::write_bytes(config_path, original.dump());

  // What GLM-4.5 cannot hold is refused naming our key; partial RoPE no other family can hold.
  auto with_o_bias = m;
  with_o_bias.attn_bias = "all";
  model::Transformer o_bias(with_o_bias);
  CATCH_CHECK_THROWS_WITH(hf::export_model(*o_bias, hf::Family::Glm4Moe, dir.str("out")),
                          Contains("model.attn_bias = all") && Contains("output projection"));
  auto clamped = m;  // gpt-oss's expert activation
  clamped.moe.activation = "swiglu_clamped";
  model::Transformer clamped_model(clamped);
  CATCH_CHECK_THROWS_WITH(hf::export_model(*clamped_model, hf::Family::Glm4Moe, dir.str("out")),
                          Contains("model.moe.activation = swiglu_clamped"));
  auto softmax = m;
  softmax.moe.router.score_func = "softmax";
  softmax.moe.router.selection_bias = false;
  model::Transformer softmax_model(softmax);
  CATCH_CHECK_THROWS_WITH(hf::export_model(*softmax_model, hf::Family::Glm4Moe, dir.str("out")),
                          Contains("model.moe.router.score_func = softmax"));
  CATCH_CHECK(hf::infer_family(softmax) == hf::Family::Glm4Moe);  // by its partial RoPE
  auto full_norm = m;
  full_norm.qk_norm = "full";
  model::Transformer full_norm_model(full_norm);
  CATCH_CHECK_THROWS_WITH(hf::export_model(*full_norm_model, hf::Family::Glm4Moe, dir.str("out")),
                          Contains("model.qk_norm = full"));
  auto qwen = testing::tiny_model_config();
  qwen.rotary_dim = 2;
  qwen.dense_layers = 0;
  qwen.moe.n_shared_experts = 0;
  model::Transformer partial(qwen);
  CATCH_CHECK_THROWS_WITH(hf::export_model(*partial, hf::Family::Qwen3Moe, dir.str("out")),
                          Contains("model.rotary_dim = 2") && Contains("whole heads"));
  CATCH_CHECK(!files::exists(dir.str("out")));
}

CATCH_TEST_CASE("hf: bf16 and fp16 shards import as their fp32 values", "[hf]") {
  testing::TempDir dir("hf-dtypes");
  write_tiny_mixtral(dir.str("hf"), /*shard_bytes=*/1'000'000);
  // Rewrite the single shard in bf16 (first half of the tensors) and fp16 (the rest).
  const std::string shard = dir.str("hf/model-00001-of-00001.safetensors");
  ckpt::TensorMap low;
  {
    ckpt::SafetensorsFile file(shard);
    for (size_t i = 0; i < file.tensors().size(); ++i) {
      const auto& info = file.tensors()[i];
      low.emplace_back(info.name, file.load(info.name).to(i % 2 ? torch::kHalf : torch::kBFloat16));
    }
  }
  ckpt::save_safetensors(shard, low);
  auto loaded = hf::load(dir.str("hf"));
  ckpt::SafetensorsFile file(shard);
  auto params = loaded.model->named_parameters();
  CATCH_CHECK(torch::equal(params["embed"], file.load("model.embed_tokens.weight").to(torch::kFloat)));
  CATCH_CHECK(torch::equal(params["layers.1.moe.experts.w2"][3],
                           file.load("model.layers.1.block_sparse_moe.experts.3.w2.weight").to(torch::kFloat).t()));
  CATCH_CHECK(params["embed"].scalar_type() == torch::kFloat);
}

CATCH_TEST_CASE("hf: a missing shard, a wrong shape, an unknown architecture are one-line errors", "[hf]") {
  testing::TempDir dir("hf-errors");
  const std::string hf_dir = dir.str("hf");
  write_tiny_mixtral(hf_dir);

  // Unknown architecture: names the file and the field.
  const std::string config_path = files::join(hf_dir, "config.json");
  const std::string config_text = files::read_file(config_path);
  auto config = nlohmann::json::parse(config_text);
  config["architectures"] = {"FooForCausalLM"};
  testing::write_bytes(config_path, config.dump());
  auto msg = testing::error_of([&] { hf::load(hf_dir); });
  CATCH_CHECK_THAT(msg, Contains("config.json") && Contains("architectures") && Contains("FooForCausalLM"));

  // An unsupported value: names the field.
  config = nlohmann::json::parse(config_text);
  config["sliding_window"] = 4;
  testing::write_bytes(config_path, config.dump());
  msg = testing::error_of([&] { hf::load(hf_dir); });
  CATCH_CHECK_THAT(msg, Contains("sliding_window"));

  // Wrong shape: config.json says larger experts than the tensors hold.
  config = nlohmann::json::parse(config_text);
  config["intermediate_size"] = 12;
  testing::write_bytes(config_path, config.dump());
  msg = testing::error_of([&] { hf::load(hf_dir); });
  CATCH_CHECK_THAT(msg, Contains("experts.0.w1.weight") && Contains("shape") && Contains("[12, 16]"));
  testing::write_bytes(config_path, config_text);

  // Missing shard: names the index and the shard.
  const auto index = nlohmann::json::parse(files::read_file(files::join(hf_dir, "model.safetensors.index.json")));
  const std::string shard_name = index["weight_map"]["model.layers.1.block_sparse_moe.gate.weight"];
  CATCH_REQUIRE(shard_name != "model-00001-of-00001.safetensors");  // several shards
  const std::string shard = files::join(hf_dir, shard_name);
  files::rename_path(shard, shard + ".moved");
  msg = testing::error_of([&] { hf::load(hf_dir); });
  CATCH_CHECK_THAT(msg, Contains("model.safetensors.index.json") && Contains(shard_name) && Contains("missing"));
  CATCH_CHECK(msg.find('\n') == std::string::npos);

  // The same through the CLI: one line, exit 1.
  const auto r = testing::run_command(kBinary + " generate --checkpoint hf:" + hf_dir + " --prompt-ids 1,2 --print-ids");
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK_THAT(r.output, Contains("[hf]") && Contains(shard_name));
}

CATCH_TEST_CASE("hf: model_type and architectures are checked against each other, messages list what is supported",
                "[hf]") {
  testing::TempDir dir("hf-family");
  const std::string hf_dir = dir.str("hf");
  write_tiny_mixtral(hf_dir);
  const std::string config_path = files::join(hf_dir, "config.json");
  const auto original = nlohmann::json::parse(files::read_file(config_path));

  // Agreeing fields: no warning.
  CATCH_CHECK(hf::read_config(hf_dir).warnings.empty());

  // model_type llama next to MixtralForCausalLM loads as Mixtral, with a warning naming both.
  auto config = original;
  config["model_type"] = "llama";
  testing::write_bytes(config_path, config.dump());
  const auto read = hf::read_config(hf_dir);
  CATCH_CHECK(read.family == hf::Family::Mixtral);
  CATCH_REQUIRE(read.warnings.size() == 1);
  CATCH_CHECK_THAT(read.warnings[0], Contains("config.json") && Contains("\"llama\"") && Contains("MixtralForCausalLM") &&
                                         Contains("\"mixtral\""));

  // Only a model_type, and an unknown one: the message lists model types, not architectures.
  config = original;
  config.erase("architectures");
  config["model_type"] = "llama";
  testing::write_bytes(config_path, config.dump());
  auto msg = testing::error_of([&] { hf::read_config(hf_dir); });
  CATCH_CHECK_THAT(msg, Contains("model_type") && Contains("llama") && Contains("deepseek_v3") && Contains("qwen3_moe"));
  CATCH_CHECK_THAT(msg, !Contains("ForCausalLM"));
  // An unknown architecture lists architectures.
  config = original;
  config["architectures"] = {"LlamaForCausalLM"};
  testing::write_bytes(config_path, config.dump());
  msg = testing::error_of([&] { hf::read_config(hf_dir); });
  CATCH_CHECK_THAT(msg, Contains("LlamaForCausalLM") && Contains("DeepseekV3ForCausalLM"));

  // `convert --help` offers every family export knows, DeepSeek-V3 included.
  const auto help = testing::run_command(kBinary + " convert --help");
  CATCH_CHECK(help.exit_code == 0);
  for (const char* family : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe"})
    CATCH_CHECK_THAT(help.output, Contains(family));
}

// Inputs from fuzzing (fuzz/fuzz_hf_config.cpp, fuzz_hf_index.cpp) and the review that went with it:
// each was a raw nlohmann exception, undefined behaviour or a megabyte message, and is now one HfError.
CATCH_TEST_CASE("hf: fuzzed config.json and index values are one-line errors naming the field", "[hf][fuzz]") {
  testing::TempDir dir("hf-fuzz");
  const std::string hf_dir = dir.str("hf");
  write_tiny_mixtral(hf_dir);
  const std::string config_path = files::join(hf_dir, "config.json");
  auto mixtral = nlohmann::json::parse(files::read_file(config_path));
  mixtral.erase("rope_parameters");  // rope_theta and rope_scaling, as transformers 4 writes them
  auto error_with = [&](const nlohmann::json& config) {
    testing::write_bytes(config_path, config.dump());
    return testing::error_of([&] { hf::read_config(hf_dir); });
  };

  // A non-string rope type (the fuzzer's input): was nlohmann's type_error.302 from json::value().
  CATCH_REQUIRE(error_with(mixtral).empty());
  auto config = mixtral;
  config["rope_scaling"] = {{"type", "yarn"}, {"factor", 4.0}, {"rope_type", 4}};
  CATCH_CHECK_THAT(error_with(config), Contains("[hf]") && Contains("field 'rope_scaling.rope_type' = 4 must be a string"));
  config["rope_scaling"] = {{"type", 1}};
  CATCH_CHECK_THAT(error_with(config), Contains("field 'rope_scaling.type' = 1 must be a string"));

  // YaRN's original context as a huge double: was int(1e100), undefined behaviour.
  config = mixtral;
  config["architectures"] = {"DeepseekV3ForCausalLM"};
  for (const char* key : {"head_dim", "num_local_experts"}) config.erase(key);
  config.update({{"q_lora_rank", 8}, {"kv_lora_rank", 8}, {"qk_nope_head_dim", 4}, {"qk_rope_head_dim", 2},
                 {"v_head_dim", 4}, {"intermediate_size", 24}, {"moe_intermediate_size", 8}, {"n_routed_experts", 4},
                 {"rope_scaling", {{"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 1e100}}}});
  CATCH_CHECK_THAT(error_with(config), Contains("'rope_scaling.original_max_position_embeddings' = 1e+100 must be a positive integer"));
  config["rope_scaling"]["original_max_position_embeddings"] = 8;
  CATCH_CHECK(error_with(config).empty());
  // Counts beyond int: were truncated silently (2^32 + 1 shared experts became 1).
  config["n_shared_experts"] = 4294967297ll;
  CATCH_CHECK_THAT(error_with(config), Contains("field 'n_shared_experts' = 4294967297 must be an integer in [0, "));

  // OLMoE's heads * head_dim: 8 * 536870914 overflowed int to 16 = hidden_size and was accepted.
  config = mixtral;
  config["architectures"] = {"OlmoeForCausalLM"};
  config.update({{"num_attention_heads", 8}, {"num_key_value_heads", 2}, {"head_dim", 536870914}, {"num_experts", 4}});
  CATCH_CHECK_THAT(error_with(config), Contains("field 'head_dim' = 536870914: OLMoE's q_norm spans hidden_size"));

  // A deeply nested value is named in a few characters, not echoed whole.
  config = mixtral;
  config["num_hidden_layers"] = nlohmann::json::array();
  for (int i = 0; i < 1000; ++i) config["num_hidden_layers"] = nlohmann::json::array({config["num_hidden_layers"]});
  const std::string nested = error_with(config);
  CATCH_CHECK_THAT(nested, Contains("field 'num_hidden_layers' = [[...]] must be an integer"));
  testing::write_bytes(config_path, mixtral.dump());

  // weight_map naming "..", "." or "" (the folder itself, its parent): refused as not a file name.
  const std::string index_path = files::join(hf_dir, "model.safetensors.index.json");
  auto index = nlohmann::json::parse(files::read_file(index_path));
  for (const char* name : {"..", ".", ""}) {
    auto bad = index;
    bad["weight_map"]["model.norm.weight"] = name;
    testing::write_bytes(index_path, bad.dump());
    CATCH_CHECK_THAT(testing::error_of([&] { hf::read_weight_map(hf_dir); }),
                     Contains("weight_map['model.norm.weight'] = \"" + std::string(name) + "\" must be a file name"));
  }
}

CATCH_TEST_CASE("hf: convert to our checkpoint and back, generate and eval through the CLI", "[hf]") {
  testing::TempDir dir("hf-cli");
  const std::string hf_dir = dir.str("hf");
  write_tiny_mixtral(hf_dir);
  auto run = [](const std::string& args) { return testing::run_command(kBinary + " " + args); };

  auto r = run("convert --from hf:" + hf_dir + " --to " + dir.str("run"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  r = run("convert --from " + dir.str("run") + " --to hf:" + dir.str("back") + " --shard-size 6000");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  auto a = hf::load(hf_dir), b = hf::load(dir.str("back"));
  for (const auto& p : a.model->named_parameters()) CATCH_CHECK(torch::equal(p.value(), b.model->named_parameters()[p.key()]));

  // Greedy is deterministic and the same from the HF folder and from our checkpoint.
  const std::string gen = " --prompt-ids 3,1,4,1,5 --print-ids --temperature 0 --max-new-tokens 6";
  auto from_hf = run("generate --checkpoint hf:" + hf_dir + gen);
  auto from_ckpt = run("generate --checkpoint " + dir.str("run") + gen + " --seed 9");
  CATCH_INFO(from_hf.output);
  CATCH_REQUIRE(from_hf.exit_code == 0);
  CATCH_CHECK(from_hf.output == from_ckpt.output);
  CATCH_CHECK(from_hf.output.rfind("3,1,4,1,5,", 0) == 0);
  CATCH_CHECK(std::count(from_hf.output.begin(), from_hf.output.end(), ',') == 10);
  r = run("generate --checkpoint hf:" + hf_dir + " --prompt-ids 3,x --print-ids");
  CATCH_CHECK(r.exit_code == 2);
  CATCH_CHECK_THAT(r.output, Contains("'x'"));

  // eval: loss and perplexity over a shard, the same from both forms.
  std::vector<int64_t> tokens;
  for (int i = 0; i < 300; ++i) tokens.push_back((i * 7 + i / 5) % 32);
  files::make_directories(dir.str("data"));
  data::write_shard(dir.str("data/val.bin"), tokens, 32);
  auto e1 = run("eval --checkpoint hf:" + hf_dir + " --data " + dir.str("data") + " --seq-len 16 --json");
  auto e2 = run("eval --checkpoint " + dir.str("run") + " --data " + dir.str("data/val.bin") + " --seq-len 16 --json");
  CATCH_INFO(e1.output);
  CATCH_REQUIRE(e1.exit_code == 0);
  const auto j = nlohmann::json::parse(e1.output);
  CATCH_CHECK(j["tokens"] == 299);
  CATCH_CHECK(std::abs(j["perplexity"].get<double>() - std::exp(j["loss"].get<double>())) < 1e-6);
  CATCH_CHECK(std::abs(nlohmann::json::parse(e2.output)["loss"].get<double>() - j["loss"].get<double>()) < 1e-9);
  // Near uniform over 32 tokens for a random model: about log(32) = 3.47.
  CATCH_CHECK(j["loss"].get<double>() > 2.5);
  CATCH_CHECK(j["loss"].get<double>() < 5.0);
}

namespace {

// A tiny Qwen2-MoE (the family with the most features) in hf_dir, a learnable shard (a repeating
// pattern of 24 tokens) and a fine-tuning config that starts from the former and reads the latter.
config::Config finetune_config(const testing::TempDir& dir, const std::string& hf_dir) {
  reference("make qwen2_moe " + hf_dir);
  std::vector<int64_t> tokens;
  for (int i = 0; i < 4000; ++i) tokens.push_back((i % 24) * 3 + 1);
  files::make_directories(dir.str("data"));
  data::write_shard(dir.str("data/train.bin"), tokens, 96);
  data::write_shard(dir.str("data/val.bin"), std::vector<int64_t>(tokens.begin(), tokens.begin() + 400), 96);
  config::Config cfg;
  cfg.model.init_from = "hf:" + hf_dir;
  cfg.data.dir = dir.str("data");
  cfg.data.seq_len = 32;
  cfg.run.threads = 1;
  cfg.train.eval_every = 0;
  cfg.train.eval_batches = 1;
  cfg.optim.warmup_steps = 2;
  cfg.optim.lr = 3e-3;
  return cfg;
}

}  // namespace

CATCH_TEST_CASE("hf: fine-tuning from an imported model lowers the loss, and the result exports", "[hf]") {
  testing::TempDir dir("hf-finetune");
  const std::string hf_dir = dir.str("hf");
  auto cfg = finetune_config(dir, hf_dir);
  cfg.run.out_dir = dir.str("run");
  cfg.train.steps = 10;
  cfg.train.micro_batch_size = 4;
  cfg.train.log_every = 5;
  cfg = hf::resolve_init_from(cfg);
  CATCH_REQUIRE(cfg.model.d_model == 32);
  CATCH_REQUIRE(cfg.model.moe.shared_gate);

  // Step 0's loss is the imported model's: the same as transformers' on those tokens would be.
  const auto result = train::train(cfg, {});
  CATCH_REQUIRE(result.losses.size() == 10);
  CATCH_CHECK(result.losses.back() < result.losses.front() - 0.5);

  // The fine-tuned checkpoint exports and reloads in transformers with our logits.
  auto loaded = train::load_for_inference(cfg.run.out_dir);
  hf::export_model(*loaded.model, hf::Family::Qwen2Moe, dir.str("exported"));
  const std::string ref = files::join(hf_dir, "reference.safetensors");
  reference("logits " + dir.str("exported") + " " + ref + " " + dir.str("logits.safetensors"));
  const auto diff = max_abs_diff(load_tensor(dir.str("logits.safetensors"), "logits"),
                                 our_logits(*loaded.model, load_tensor(ref, "tokens")));
  CATCH_CHECK(diff < kTolerance);
}

CATCH_TEST_CASE("hf: fine-tuning at (world 2, ep 2) and (pp 2) imports each rank's own share and follows one process",
                "[hf][dist]") {
  testing::TempDir dir("hf-finetune-ep");
  auto cfg = finetune_config(dir, dir.str("hf"));
  cfg.train.steps = 6;
  cfg.train.global_batch_size = 4;
  cfg.train.log_every = 1;
  cfg.parallel.timeout_s = 60;
  auto run = [&](int world, int pp = 1, int grad_accum = 0) {
    auto c = cfg;
    c.run.out_dir = dir.str("w" + std::to_string(world) + "pp" + std::to_string(pp) + "ga" + std::to_string(grad_accum));
    c.parallel.expert_parallel = world / pp;
    c.parallel.pipeline_parallel = pp;  // each stage imports only its own blocks
    if (grad_accum > 0) c.train.grad_accum = grad_accum;
    const std::string yaml = testing::write_config(c, files::join(c.run.out_dir, "input.yaml"));
    const std::string train = std::string(MOETRAIN_BINARY) + " train --config " + yaml;
    auto r = testing::run_command("OMP_NUM_THREADS=1 " + testing::hang_guard() +
                                  (world == 1 ? train : std::string(MOETRAIN_SOURCE_DIR) + "/scripts/launch.sh --nproc " +
                                                            std::to_string(world) + " -- " + train));
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
    std::vector<double> losses;
    std::ifstream metrics(files::join(c.run.out_dir, "metrics.jsonl"));
    for (std::string line; std::getline(metrics, line);) losses.push_back(nlohmann::json::parse(line)["loss"].get<double>());
    return losses;
  };
  auto same = [](const std::vector<double>& got, const std::vector<double>& want) {
    CATCH_REQUIRE(got.size() == 6);
    CATCH_REQUIRE(want.size() == 6);
    for (size_t i = 0; i < want.size(); ++i) {
      CATCH_INFO("step " << i + 1 << ": " << got[i] << " vs " << want[i]);
      CATCH_CHECK(std::abs(got[i] - want[i]) <= 1e-5 * std::abs(want[i]));
    }
  };
  same(run(2), run(1));
  // Two pipeline stages, each importing its own blocks (and the tied or untied ends it holds), follow
  // one process with the same two micro-batches per step.
  same(run(2, 2, 2), run(1, 1, 2));
}
