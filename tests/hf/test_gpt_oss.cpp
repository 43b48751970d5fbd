// gpt-oss (family gpt_oss) in and out: its config.json fields (sinks, windows and layer_types included)
// map to our keys and what they cannot mean is refused in one line; its experts, stacked (E, in, out) with gate and up columns interleaved and
// biases beside them, import from bf16/fp32 tensors or MXFP4 blocks (a hand-made tensor whose values
// are known), export as fp32 and re-import bit for bit; YaRN without truncation.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <numbers>

#include "../test_util.h"
#include "ckpt/safetensors.h"
#include "hf/hf.h"
#include "model/layers.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

// A tiny gpt-oss of ours: every layer MoE, D = F = 32 (MXFP4 blocks span 32 inputs).
config::ModelConfig tiny_gpt_oss() {
  auto m = testing::tiny_model_config();
  m.d_model = 32;
  m.head_dim = 8;
  m.dense_layers = 0;
  m.tie_embeddings = false;
  m.attn_bias = "all";
  m.max_seq_len = 64;
  m.rope_theta = 150000.0;
  m.yarn.factor = 4.0;
  m.yarn.original_max_seq_len = 16;
  m.yarn.truncate = false;
  m.moe.n_shared_experts = 0;
  m.moe.expert_hidden = 32;
  m.moe.activation = "swiglu_clamped";
  m.moe.expert_bias = true;
  m.moe.router.logit_bias = true;
  m.attention_sinks = true;
  m.sliding_window = 4;
  m.layer_types = {"sliding", "full"};
  return m;
}

// The published gpt-oss-20b config.json, less what we do not read.
nlohmann::json gpt_oss_20b_json() {
  std::vector<std::string> layer_types;
  for (int i = 0; i < 24; ++i) layer_types.push_back(i % 2 == 0 ? "sliding_attention" : "full_attention");
  return {{"architectures", {"GptOssForCausalLM"}},
          {"attention_bias", true},
          {"experts_per_token", 4},
          {"head_dim", 64},
          {"hidden_act", "silu"},
          {"hidden_size", 2880},
          {"intermediate_size", 2880},
          {"layer_types", layer_types},
          {"max_position_embeddings", 131072},
          {"model_type", "gpt_oss"},
          {"num_attention_heads", 64},
          {"num_experts_per_tok", 4},
          {"num_hidden_layers", 24},
          {"num_key_value_heads", 8},
          {"num_local_experts", 32},
          {"quantization_config", {{"quant_method", "mxfp4"}}},
          {"rms_norm_eps", 1e-05},
          {"rope_scaling",
           {{"beta_fast", 32.0}, {"beta_slow", 1.0}, {"factor", 32.0}, {"original_max_position_embeddings", 4096},
            {"rope_type", "yarn"}, {"truncate", false}}},
          {"rope_theta", 150000},
          {"sliding_window", 128},
          {"swiglu_limit", 7.0},
          {"tie_word_embeddings", false},
          {"vocab_size", 201088}};
}

void write_json(const std::string& dir, const nlohmann::json& j) {
  files::make_directories(dir);
  std::ofstream(files::join(dir, "config.json")) << j.dump(2);
}

// Hand-made MXFP4 contents with values known without the dequantizer: row r of expert e (an output of
// the projection) holds, at input i, E2M1 code (e + r + i) % 16 (low nibble first) times 2^-(r % 3).
const float kE2M1[16] = {0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0f, -0.5, -1, -1.5, -2, -3, -4, -6};
std::pair<torch::Tensor, torch::Tensor> mxfp4_of(int64_t E, int64_t rows, int64_t inputs) {
  auto blocks = torch::zeros({E, rows, inputs / 32, 16}, torch::kByte);
  auto scales = torch::zeros({E, rows, inputs / 32}, torch::kByte);
  auto b = blocks.accessor<uint8_t, 4>();
  auto s = scales.accessor<uint8_t, 3>();
  for (int64_t e = 0; e < E; ++e)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < inputs; i += 2) {
        b[e][r][i / 32][(i % 32) / 2] = uint8_t(((e + r + i) % 16) | (((e + r + i + 1) % 16) << 4));
        s[e][r][i / 32] = uint8_t(127 - r % 3);
      }
  return {blocks, scales};
}
float mxfp4_value(int64_t e, int64_t r, int64_t i) { return std::ldexp(kE2M1[(e + r + i) % 16], -int(r % 3)); }

}  // namespace

CATCH_TEST_CASE("hf: gpt-oss's config.json fields map to our keys, and what they cannot mean is refused", "[hf][gpt_oss]") {
  testing::TempDir dir("gpt-oss-config");
  write_json(dir.str("20b"), gpt_oss_20b_json());
  const auto hf = hf::read_config(dir.str("20b"));
  const auto& m = hf.model;
  CATCH_CHECK(hf.family == hf::Family::GptOss);
  CATCH_CHECK(hf::family_name(hf.family) == "gpt_oss");
  CATCH_CHECK((m.n_layers == 24 && m.d_model == 2880 && m.n_heads == 64 && m.n_kv_heads == 8 && m.head_dim == 64));
  CATCH_CHECK((m.moe.n_experts == 32 && m.moe.top_k == 4 && m.moe.expert_hidden == 2880));
  CATCH_CHECK((m.dense_layers == 0 && m.moe.n_shared_experts == 0 && !m.tie_embeddings));
  CATCH_CHECK(m.attn_bias == "all");
  CATCH_CHECK(m.moe.activation == "swiglu_clamped");
  CATCH_CHECK((m.moe.expert_bias && m.moe.router.logit_bias && m.moe.router.normalize_topk));
  CATCH_CHECK(m.moe.router.score_func == "softmax");
  CATCH_CHECK((m.rope_theta == 150000.0 && m.yarn.factor == 32.0 && m.yarn.original_max_seq_len == 4096));
  CATCH_CHECK((m.yarn.beta_fast == 32.0 && m.yarn.beta_slow == 1.0 && !m.yarn.truncate));
  CATCH_CHECK((m.yarn.mscale == 1.0 && m.yarn.mscale_all_dim == 0.0));  // cos/sin scaled by m(1)
  CATCH_CHECK(m.norm_eps == 1e-5);
  CATCH_CHECK((m.attention_sinks && m.sliding_window == 128));
  CATCH_REQUIRE(m.layer_types.size() == 24);
  for (int i = 0; i < 24; ++i) CATCH_CHECK(config::attention_window(m, i) == (i % 2 == 0 ? 128 : 0));
  CATCH_CHECK(hf::infer_family(m) == hf::Family::GptOss);
  // Without layer_types, transformers' GptOssConfig alternates sliding and full layers, sliding first.
  {
    auto j = gpt_oss_20b_json();
    j.erase("layer_types");
    write_json(dir.str("default-types"), j);
    const auto d = hf::read_config(dir.str("default-types")).model;
    for (int i = 0; i < 24; ++i) CATCH_CHECK(config::attention_window(d, i) == (i % 2 == 0 ? 128 : 0));
  }

  // One-line errors naming config.json and the field.
  auto refused = [&](const std::string& name, nlohmann::json j) {
    write_json(dir.str(name), j);
    return testing::error_of([&] { hf::read_config(dir.str(name)); });
  };
  auto j = gpt_oss_20b_json();
  j["swiglu_limit"] = 8.0;
  auto e = refused("limit", j);
  CATCH_CHECK_THAT(e, Contains("config.json") && Contains("'swiglu_limit'") && Contains("7"));
  CATCH_CHECK(testing::one_line(e));
  j = gpt_oss_20b_json();
  j["swiglu_alpha"] = 1.5;
  CATCH_CHECK_THAT(refused("alpha", j), Contains("config.json") && Contains("'swiglu_alpha'") && Contains("1.702"));
  j = gpt_oss_20b_json();
  j["rope_scaling"]["rope_type"] = "linear";
  CATCH_CHECK_THAT(refused("linear", j), Contains("config.json") && Contains("rope_scaling.rope_type") && Contains("linear"));
  j = gpt_oss_20b_json();
  j["rope_scaling"]["truncate"] = "no";
  CATCH_CHECK_THAT(refused("truncate", j), Contains("config.json") && Contains("rope_scaling.truncate"));
  j = gpt_oss_20b_json();
  j["layer_types"][3] = "chunked_attention";
  e = refused("types", j);
  CATCH_CHECK_THAT(e, Contains("config.json") && Contains("'layer_types'") && Contains("chunked_attention"));
  CATCH_CHECK(testing::one_line(e));
  j = gpt_oss_20b_json();
  j["layer_types"].erase(0);
  CATCH_CHECK_THAT(refused("types-count", j), Contains("config.json") && Contains("'layer_types'") && Contains("24"));
  j = gpt_oss_20b_json();
  j["attention_bias"] = false;
  write_json(dir.str("no-bias"), j);
  CATCH_CHECK(hf::read_config(dir.str("no-bias")).model.attn_bias == "none");
}

CATCH_TEST_CASE("hf: gpt-oss's stacked experts export interleaved, re-import bit for bit, and MXFP4 experts import "
                "to their known values", "[hf][gpt_oss]") {
  testing::TempDir dir("gpt-oss-experts");
  const auto m = tiny_gpt_oss();
  model::Transformer ours(m);
  ours->init_weights(3);
  {  // biases away from their zero init, so that a misplaced one shows
    torch::NoGradGuard g;
    for (auto& p : ours->named_parameters())
      if (p.key().ends_with(".b1") || p.key().ends_with(".b3") || p.key().ends_with(".b2") || p.key().ends_with("bias"))
        p.value().normal_(0, 0.5);
  }
  const std::string exported = dir.str("exported");
  hf::export_model(*ours, hf::Family::GptOss, exported, /*max_shard_bytes=*/30000);

  // The layout transformers' GptOssExperts holds: gate_up_proj (E, D, 2F), gate column 2f, up column 2f + 1.
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, file] : hf::read_weight_map(exported))
    tensors[name] = ckpt::SafetensorsFile(files::join(exported, file)).load(name);
  auto params = ours->named_parameters();
  const std::string hf1 = "model.layers.1.mlp.", our1 = "layers.1.moe.";
  const auto gate_up = tensors.at(hf1 + "experts.gate_up_proj");
  CATCH_CHECK(gate_up.scalar_type() == torch::kFloat);  // exported fp32, never MXFP4
  CATCH_REQUIRE(gate_up.sizes() == torch::IntArrayRef({4, 32, 64}));
  CATCH_CHECK(torch::equal(gate_up.select(2, 6), params[our1 + "experts.w1"].select(2, 3)));
  CATCH_CHECK(torch::equal(gate_up.select(2, 7), params[our1 + "experts.w3"].select(2, 3)));
  const auto gate_up_bias = tensors.at(hf1 + "experts.gate_up_proj_bias");
  CATCH_REQUIRE(gate_up_bias.sizes() == torch::IntArrayRef({4, 64}));
  CATCH_CHECK(torch::equal(gate_up_bias.select(1, 10), params[our1 + "experts.b1"].select(1, 5)));
  CATCH_CHECK(torch::equal(gate_up_bias.select(1, 11), params[our1 + "experts.b3"].select(1, 5)));
  CATCH_CHECK(torch::equal(tensors.at(hf1 + "experts.down_proj"), params[our1 + "experts.w2"]));  // (E, F, D)
  CATCH_CHECK(torch::equal(tensors.at(hf1 + "experts.down_proj_bias"), params[our1 + "experts.b2"]));
  CATCH_CHECK(torch::equal(tensors.at(hf1 + "router.weight"), params[our1 + "router.weight"]));
  CATCH_CHECK(torch::equal(tensors.at(hf1 + "router.bias"), params[our1 + "router.bias"]));
  CATCH_CHECK(torch::equal(tensors.at("model.layers.0.self_attn.o_proj.bias"), params["layers.0.attn.o_bias"]));
  for (const auto& [name, t] : tensors) CATCH_CHECK(name.find("experts.0.") == std::string::npos);
  const auto config = nlohmann::json::parse(files::read_file(files::join(exported, "config.json")));
  CATCH_CHECK(config["model_type"] == "gpt_oss");
  CATCH_CHECK(config["attention_bias"] == true);
  CATCH_CHECK(config["swiglu_limit"] == 7.0);
  CATCH_CHECK(config["rope_parameters"]["truncate"] == false);
  CATCH_CHECK(config["rope_scaling"]["truncate"] == false);
  CATCH_CHECK(config["sliding_window"] == 4);
  CATCH_CHECK(config["layer_types"] == nlohmann::json({"sliding_attention", "full_attention"}));
  CATCH_CHECK(torch::equal(tensors.at("model.layers.1.self_attn.sinks"), params["layers.1.attn.sinks"]));

  // Re-import: every parameter exactly.
  auto again = hf::load(exported);
  CATCH_CHECK(again.hf.family == hf::Family::GptOss);
  auto back = again.model->named_parameters();
  CATCH_REQUIRE(back.size() == params.size());
  for (const auto& p : params) {
    CATCH_INFO(p.key());
    CATCH_CHECK(torch::equal(p.value(), back[p.key()]));
  }

  // The same folder with layer 1's experts as MXFP4, as gpt-oss publishes them: gate_up_proj_blocks
  // (E, 2F, D / 32, 16) and down_proj_blocks (E, D, F / 32, 16), one output row each.
  const std::string quantized = dir.str("mxfp4");
  files::make_directories(quantized);
  ckpt::TensorMap single;
  for (auto& [name, t] : tensors)
    if (name != hf1 + "experts.gate_up_proj" && name != hf1 + "experts.down_proj") single.emplace_back(name, t);
  const auto [gu_blocks, gu_scales] = mxfp4_of(4, 64, 32);
  const auto [down_blocks, down_scales] = mxfp4_of(4, 32, 32);
  single.emplace_back(hf1 + "experts.gate_up_proj_blocks", gu_blocks);
  single.emplace_back(hf1 + "experts.gate_up_proj_scales", gu_scales);
  single.emplace_back(hf1 + "experts.down_proj_blocks", down_blocks);
  single.emplace_back(hf1 + "experts.down_proj_scales", down_scales);
  ckpt::save_safetensors(files::join(quantized, "model.safetensors"), single, {{"format", "pt"}});
  files::write_file_atomic(files::join(quantized, "config.json"), files::read_file(files::join(exported, "config.json")));
  auto loaded = hf::load(quantized);
  auto q = loaded.model->named_parameters();
  const auto w1 = q[our1 + "experts.w1"], w3 = q[our1 + "experts.w3"], w2 = q[our1 + "experts.w2"];
  bool exact = true;
  for (int64_t e = 0; e < 4; ++e)
    for (int64_t d = 0; d < 32; ++d)
      for (int64_t f = 0; f < 32; ++f) {
        // gate_up row 2f (gate) and 2f + 1 (up) at input d; down_proj row d at input f.
        exact = exact && w1[e][d][f].item<float>() == mxfp4_value(e, 2 * f, d);
        exact = exact && w3[e][d][f].item<float>() == mxfp4_value(e, 2 * f + 1, d);
        exact = exact && w2[e][f][d].item<float>() == mxfp4_value(e, d, f);
      }
  CATCH_CHECK(exact);
  CATCH_CHECK(torch::equal(q[our1 + "experts.b1"], params[our1 + "experts.b1"]));  // the biases stay bf16/fp32 tensors
  CATCH_CHECK(torch::equal(q["layers.0.moe.experts.w1"], params["layers.0.moe.experts.w1"]));

  // A blocks tensor of the wrong shape is one line naming it.
  ckpt::TensorMap wrong = single;
  for (auto& [name, t] : wrong)
    if (name == hf1 + "experts.down_proj_blocks") t = t.narrow(1, 0, 16).contiguous();
  for (auto& [name, t] : wrong)
    if (name == hf1 + "experts.down_proj_scales") t = t.narrow(1, 0, 16).contiguous();
  ckpt::save_safetensors(files::join(quantized, "model.safetensors"), wrong, {{"format", "pt"}});
  const auto e = testing::error_of([&] { hf::load(quantized); });
  CATCH_CHECK_THAT(e, Contains("experts.down_proj_blocks") && Contains("shape"));
  CATCH_CHECK(testing::one_line(e));
}

CATCH_TEST_CASE("hf: what gpt-oss cannot express is refused on export, and other families refuse its features",
                "[hf][gpt_oss]") {
  testing::TempDir dir("gpt-oss-refuse");
  auto refused = [&](const config::ModelConfig& m, hf::Family family) {
    model::Transformer model(m);
    model->init_weights(1);
    return testing::error_of([&] { hf::export_model(*model, family, dir.str("out")); });
  };
  auto m = tiny_gpt_oss();
  m.moe.expert_bias = false;
  CATCH_CHECK_THAT(refused(m, hf::Family::GptOss), Contains("model.moe.expert_bias = false"));
  m = tiny_gpt_oss();
  m.attention_sinks = false;
  CATCH_CHECK_THAT(refused(m, hf::Family::GptOss), Contains("model.attention_sinks = false"));
  m = tiny_gpt_oss();
  m.attn_bias = "qkv";
  CATCH_CHECK_THAT(refused(m, hf::Family::GptOss), Contains("model.attn_bias = qkv"));
  m = tiny_gpt_oss();
  m.moe.activation = "swiglu";
  CATCH_CHECK_THAT(refused(m, hf::Family::GptOss), Contains("model.moe.activation = swiglu"));
  m = tiny_gpt_oss();
  m.moe.n_shared_experts = 1;
  m.moe.shared_hidden = 8;
  CATCH_CHECK_THAT(refused(m, hf::Family::GptOss), Contains("model.moe.n_shared_experts"));
  auto mixtral = testing::tiny_model_config();
  mixtral.dense_layers = 0;
  mixtral.moe.n_shared_experts = 0;
  mixtral.moe.expert_bias = true;
  CATCH_CHECK_THAT(refused(mixtral, hf::Family::Mixtral), Contains("model.moe.expert_bias = true"));
  mixtral.moe.expert_bias = false;
  mixtral.moe.router.logit_bias = true;
  CATCH_CHECK_THAT(refused(mixtral, hf::Family::Mixtral), Contains("model.moe.router.logit_bias = true"));
  mixtral.moe.router.logit_bias = false;
  mixtral.attention_sinks = true;
  CATCH_CHECK_THAT(refused(mixtral, hf::Family::Mixtral), Contains("model.attention_sinks = true"));
  CATCH_CHECK(hf::infer_family(mixtral) == hf::Family::GptOss);
  mixtral.attention_sinks = false;
  mixtral.sliding_window = 4;
  CATCH_CHECK_THAT(refused(mixtral, hf::Family::Mixtral), Contains("model.sliding_window = 4"));
  CATCH_CHECK(!files::exists(dir.str("out")));
}

CATCH_TEST_CASE("model.yarn.truncate false keeps the ramp's ends fractional, as transformers' truncate false does",
                "[hf][gpt_oss]") {
  // gpt-oss-20b's RoPE: head_dim 64, theta 150000, factor 32 over 4096, beta_fast 32, beta_slow 1.
  const int hd = 64, S = 40;
  const double theta = 150000, factor = 32, original = 4096;
  config::YarnConfig yarn;
  yarn.factor = factor;
  yarn.original_max_seq_len = int(original);
  for (bool truncate : {true, false}) {
    CATCH_INFO("truncate " << truncate);
    yarn.truncate = truncate;
    const auto rope = model::Rope::make(S, hd, theta, torch::kCPU, yarn);
    auto dim_of = [&](double rotations) { return hd * std::log(original / (rotations * 2 * std::numbers::pi)) / (2 * std::log(theta)); };
    double low = dim_of(32), high = dim_of(1);
    if (truncate) low = std::floor(low), high = std::ceil(high);
    low = std::max(low, 0.0), high = std::min(high, double(hd - 1));
    const double scale = 0.1 * std::log(factor) + 1;
    double worst = 0;
    for (int i = 0; i < hd / 2; ++i) {
      const double base = std::pow(theta, -2.0 * i / hd);
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double inv_freq = base / factor * ramp + base * (1 - ramp);
      for (int p = 0; p < S; ++p) {
        worst = std::max(worst, std::abs(rope.cos_SHd[p][i].item<double>() - std::cos(p * inv_freq) * scale));
        worst = std::max(worst, std::abs(rope.sin_SHd[p][i + hd / 2].item<double>() - std::sin(p * inv_freq) * scale));
      }
    }
    CATCH_CHECK(worst < 1e-6);  // fp32 tables
  }
  yarn.truncate = true;
  const auto floored = model::Rope::make(S, hd, theta, torch::kCPU, yarn);
  yarn.truncate = false;
  const auto fractional = model::Rope::make(S, hd, theta, torch::kCPU, yarn);
  CATCH_CHECK(!torch::allclose(floored.cos_SHd, fractional.cos_SHd, 1e-4, 1e-4));
}
