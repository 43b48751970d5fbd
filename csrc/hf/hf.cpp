// Hugging Face import and export. One name map per family, built from the model config, drives both
// directions: each entry pairs one of our parameters (or one expert's slice of it) with one HF tensor
// and says how the layouts differ (HF Linear weights are (out, in); ours are (in, out)).
#include "hf/hf.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "ckpt/safetensors.h"
#include "common/files.h"
#include "common/json_brief.h"
#include "common/log.h"
#include "common/tensor.h"

namespace moetrain::hf {

using Json = nlohmann::ordered_json;

namespace {

constexpr const char* kConfigFile = "config.json";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";

struct FamilyInfo {
  Family family;
  const char* model_type;
  const char* architecture;
};
constexpr FamilyInfo kFamilies[] = {
    {Family::Mixtral, "mixtral", "MixtralForCausalLM"},
    {Family::Qwen2Moe, "qwen2_moe", "Qwen2MoeForCausalLM"},
    {Family::Qwen3Moe, "qwen3_moe", "Qwen3MoeForCausalLM"},
    {Family::Olmoe, "olmoe", "OlmoeForCausalLM"},
    {Family::DeepseekV3, "deepseek_v3", "DeepseekV3ForCausalLM"},
};
const FamilyInfo& info_of(Family f) {
  for (const auto& i : kFamilies)
    if (i.family == f) return i;
  throw HfError("unknown family");
}


std::string brief(const Json& v) { return brief_json(v); }

// ---------------------------------------------------------------------------------------------
// config.json fields, each read with an error that names the file and the field.

struct ConfigReader {
  std::string path;
  Json json;

  const Json* find(const std::string& field) const {
    auto it = json.find(field);
    return it == json.end() || it->is_null() ? nullptr : &*it;
  }
  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw HfError(path + ": field '" + field + "' " + what);
  }
  int64_t integer(const std::string& field, std::optional<int64_t> fallback = std::nullopt) const {
    const Json* v = find(field);
    if (!v) {
      if (fallback) return *fallback;
      fail(field, "is missing");
    }
    if (!v->is_number_integer()) fail(field, "= " + brief(*v) + " must be an integer");
    if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX)) fail(field, "= " + brief(*v) + " is out of range");
    return v->get<int64_t>();
  }
  int positive_int(const std::string& field, std::optional<int64_t> fallback = std::nullopt) const {
    const int64_t v = integer(field, fallback);
    if (v < 1 || v > INT32_MAX) fail(field, "= " + std::to_string(v) + " must be a positive integer");
    return int(v);
  }
  int non_negative_int(const std::string& field, int64_t fallback) const {
    const int64_t v = integer(field, fallback);
    if (v < 0 || v > INT32_MAX) fail(field, "= " + std::to_string(v) + " must be an integer in [0, " + std::to_string(INT32_MAX) + "]");
    return int(v);
  }
  double number(const std::string& field, std::optional<double> fallback = std::nullopt) const {
    const Json* v = find(field);
    if (!v) {
      if (fallback) return *fallback;
      fail(field, "is missing");
    }
    if (!v->is_number()) fail(field, "= " + brief(*v) + " must be a number");
    return v->get<double>();
  }
  bool boolean(const std::string& field, bool fallback) const {
    const Json* v = find(field);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(field, "= " + brief(*v) + " must be true or false");
    return v->get<bool>();
  }
  void require_equal(const std::string& field, const Json& expected, const Json& fallback, const std::string& why) const {
    const Json* v = find(field);
    const Json& actual = v ? *v : fallback;
    if (actual != expected) fail(field, "= " + brief(actual) + " is not supported (" + why + ")");
  }
};

// Dense layers of the Qwen families: mlp_only_layers must be the first k layers, every other layer MoE.
int qwen_dense_layers(const ConfigReader& r, int n_layers) {
  if (r.integer("decoder_sparse_step", 1) != 1)
    r.fail("decoder_sparse_step", "= " + std::to_string(r.integer("decoder_sparse_step")) +
                                      " is not supported (every layer after the dense ones must be MoE: 1)");
  const Json* only = r.find("mlp_only_layers");
  if (!only) return 0;
  if (!only->is_array()) r.fail("mlp_only_layers", "must be a list of layer indices");
  std::vector<int64_t> layers;
  for (const auto& v : *only) {
    if (!v.is_number_integer()) r.fail("mlp_only_layers", "must be a list of layer indices");
    layers.push_back(v.get<int64_t>());
  }
  std::sort(layers.begin(), layers.end());
  for (size_t i = 0; i < layers.size(); ++i)
    if (layers[i] != int64_t(i) || layers[i] >= n_layers)
      r.fail("mlp_only_layers", "= " + brief(*only) + " is not supported (the dense layers must be the first ones: [0, 1, ...])");
  return int(layers.size());
}

}  // namespace

std::string family_name(Family family) { return info_of(family).model_type; }

std::string family_names() {
  std::string names;
  for (const auto& i : kFamilies) names += std::string(names.empty() ? "" : ", ") + i.model_type;
  return names;
}

Family family_from_name(const std::string& name) {
  for (const auto& i : kFamilies)
    if (name == i.model_type || name == i.architecture) return i.family;
  throw HfError("unknown model family '" + name + "' (supported: " + family_names() + ")");
}

bool is_hf_path(const std::string& path) { return path.rfind("hf:", 0) == 0; }
std::string hf_dir(const std::string& path) { return is_hf_path(path) ? path.substr(3) : path; }

HfConfig read_config(const std::string& dir) {
  ConfigReader r;
  r.path = files::join(dir, kConfigFile);
  if (!files::exists(r.path)) throw HfError(r.path + " is missing: not a Hugging Face model folder");
  try {
    r.json = Json::parse(files::read_file(r.path));
  } catch (const Json::exception& e) {
    throw HfError(r.path + ": not valid JSON (" + e.what() + ")");
  }
  if (!r.json.is_object()) throw HfError(r.path + ": not a JSON object");

  // The family: architectures[0], else model_type.
  std::optional<Family> family;
  std::string architectures;
  for (const auto& i : kFamilies) architectures += std::string(architectures.empty() ? "" : ", ") + i.architecture;
  const Json* type = r.find("model_type");
  const std::string type_name = !type ? "" : type->is_string() ? type->get<std::string>() : brief(*type);
  std::vector<std::string> warnings;
  if (const Json* archs = r.find("architectures")) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string())
      r.fail("architectures", "must be a non-empty list of names");
    const auto arch = (*archs)[0].get<std::string>();
    for (const auto& i : kFamilies)
      if (arch == i.architecture) family = i.family;
    if (!family)
      r.fail("architectures", "= [\"" + arch + "\"]: architecture not supported (supported: " + architectures + ")");
    if (type && type_name != info_of(*family).model_type)
      warnings.push_back("warning: " + r.path + ": model_type \"" + type_name + "\" disagrees with architectures [\"" +
                         arch + "\"] (whose model_type is \"" + info_of(*family).model_type +
                         "\"); reading it as " + arch + ", as architectures says");
  } else if (type) {
    for (const auto& i : kFamilies)
      if (type_name == i.model_type) family = i.family;
    if (!family) r.fail("model_type", "= \"" + type_name + "\": model type not supported (supported: " + family_names() + ")");
  } else {
    r.fail("architectures", "is missing (and so is model_type)");
  }
  for (const auto& w : warnings) log_line(w);

  HfConfig out;
  out.family = *family;
  out.warnings = std::move(warnings);
  config::ModelConfig& m = out.model;
  m.vocab_size = r.positive_int("vocab_size");
  m.d_model = r.positive_int("hidden_size");
  m.n_layers = r.positive_int("num_hidden_layers");
  m.n_heads = r.positive_int("num_attention_heads");
  m.n_kv_heads = r.positive_int("num_key_value_heads", m.n_heads);
  m.head_dim = r.positive_int("head_dim", m.d_model / m.n_heads);
  m.max_seq_len = r.positive_int("max_position_embeddings");
  m.norm_eps = r.number("rms_norm_eps", 1e-6);
  m.tie_embeddings = r.boolean("tie_word_embeddings", false);
  m.attention = "gqa";
  m.mtp_depth = 0;
  if (const Json* act = r.find("hidden_act"); act && *act != "silu")
    r.fail("hidden_act", "= " + brief(*act) + " is not supported (SwiGLU experts: \"silu\")");
  // RoPE: transformers 5 nests it in rope_parameters; older configs have rope_theta and rope_scaling.
  // YaRN is read for DeepSeek-V3 only (whose attention scale follows it).
  {
    const bool in_parameters = r.find("rope_parameters") != nullptr;
    const std::string field = in_parameters ? "rope_parameters" : "rope_scaling";
    const Json* rope = r.find(field);
    if (rope && !rope->is_object()) r.fail(field, "must be an object");
    Json params = rope ? *rope : Json::object();
    auto number = [&](const std::string& key, std::optional<double> fallback) {
      if (!params.contains(key) || params[key].is_null()) {
        if (fallback) return *fallback;
        r.fail(field + "." + key, "is missing");
      }
      if (!params[key].is_number()) r.fail(field + "." + key, "= " + brief(params[key]) + " must be a number");
      return params[key].get<double>();
    };
    auto text = [&](const std::string& key, const std::string& fallback) {
      if (!params.contains(key) || params[key].is_null()) return fallback;
      if (!params[key].is_string()) r.fail(field + "." + key, "= " + brief(params[key]) + " must be a string");
      return params[key].get<std::string>();
    };
    const std::string type = text("rope_type", text("type", "default"));
    m.rope_theta = in_parameters ? number("rope_theta", std::nullopt) : r.number("rope_theta", 10000.0);
    if (type == "yarn" && out.family == Family::DeepseekV3) {
      m.yarn.factor = number("factor", std::nullopt);
      const double original = number("original_max_position_embeddings", std::nullopt);
      if (!(original >= 1 && original <= INT32_MAX) || original != std::floor(original))
        r.fail(field + ".original_max_position_embeddings", "= " + brief(params["original_max_position_embeddings"]) +
                                                               " must be a positive integer");
      m.yarn.original_max_seq_len = int(original);
      m.yarn.beta_fast = number("beta_fast", 32.0);
      m.yarn.beta_slow = number("beta_slow", 1.0);
      m.yarn.mscale = number("mscale", 1.0);
      m.yarn.mscale_all_dim = number("mscale_all_dim", 0.0);
      if (params.contains("attention_factor") && !params["attention_factor"].is_null())
        r.fail(field + ".attention_factor", "is not supported (derived from mscale and mscale_all_dim)");
      if (m.yarn.factor < 1) r.fail(field + ".factor", "must be >= 1");
    } else if (type != "default") {
      r.fail(field + ".rope_type", "= \"" + type + "\" is not supported (default RoPE" +
                                       (out.family == Family::DeepseekV3 ? " or yarn)" : ")"));
    }
  }
  const int n_experts_field = r.find("num_experts")         ? r.positive_int("num_experts")
                              : r.find("n_routed_experts") ? r.positive_int("n_routed_experts")
                                                           : r.positive_int("num_local_experts");
  m.moe.n_experts = n_experts_field;
  m.moe.top_k = r.positive_int("num_experts_per_tok");
  m.moe.router = config::RouterConfig{};
  m.moe.router.score_func = "softmax";
  m.moe.n_shared_experts = 0;
  m.moe.shared_hidden = 0;
  m.moe.shared_gate = false;
  m.qkv_bias = false;
  m.qk_norm = "none";
  m.dense_layers = 0;
  if (m.head_dim % 2 != 0) r.fail("head_dim", "= " + std::to_string(m.head_dim) + " must be even (RoPE)");

  switch (out.family) {
    case Family::Mixtral: {
      m.moe.expert_hidden = r.positive_int("intermediate_size");
      m.moe.router.normalize_topk = true;  // softmax over the top-k logits
      if (const Json* window = r.find("sliding_window");
          window && (!window->is_number_integer() || window->get<int64_t>() < m.max_seq_len))
        r.fail("sliding_window", "= " + brief(*window) + " is not supported (full causal attention: null)");
      break;
    }
    case Family::Qwen2Moe:
    case Family::Qwen3Moe: {
      m.moe.expert_hidden = r.positive_int("moe_intermediate_size");
      m.dense_hidden = r.positive_int("intermediate_size");
      m.dense_layers = qwen_dense_layers(r, m.n_layers);
      m.moe.router.normalize_topk = r.boolean("norm_topk_prob", out.family == Family::Qwen3Moe);
      r.require_equal("use_sliding_window", false, false, "full causal attention: false");
      if (out.family == Family::Qwen2Moe) {
        m.qkv_bias = r.boolean("qkv_bias", true);
        const int shared = r.non_negative_int("shared_expert_intermediate_size", 0);
        if (shared > 0) {
          m.moe.n_shared_experts = 1;
          m.moe.shared_hidden = shared;
          m.moe.shared_gate = true;
        }
      } else {
        m.qk_norm = "head";
        r.require_equal("attention_bias", false, false, "no attention biases in Qwen3-MoE here");
      }
      break;
    }
    case Family::Olmoe: {
      m.moe.expert_hidden = r.positive_int("intermediate_size");
      m.moe.router.normalize_topk = r.boolean("norm_topk_prob", false);
      m.qk_norm = "full";
      r.require_equal("clip_qkv", nullptr, nullptr, "q/k/v clipping is not implemented: null");
      r.require_equal("attention_bias", false, false, "no attention biases: false");
      if (int64_t(m.n_heads) * m.head_dim != m.d_model)
        r.fail("head_dim", "= " + std::to_string(m.head_dim) + ": OLMoE's q_norm spans hidden_size, so heads * head_dim must equal it");
      break;
    }
    case Family::DeepseekV3: {
      m.attention = "mla";
      m.mla.q_lora_rank = r.find("q_lora_rank") ? r.positive_int("q_lora_rank") : 0;  // null: a full-rank wq
      m.mla.kv_lora_rank = r.positive_int("kv_lora_rank");
      m.mla.qk_nope_head_dim = r.positive_int("qk_nope_head_dim");
      m.mla.qk_rope_head_dim = r.positive_int("qk_rope_head_dim");
      m.mla.v_head_dim = r.positive_int("v_head_dim");
      if (m.mla.qk_rope_head_dim % 2 != 0) r.fail("qk_rope_head_dim", "must be even (RoPE)");
      m.n_kv_heads = m.n_heads;               // unused by MLA
      m.head_dim = m.mla.qk_rope_head_dim;    // unused by MLA; even, as validation wants
      m.moe.expert_hidden = r.positive_int("moe_intermediate_size");
      m.dense_hidden = r.positive_int("intermediate_size");
      m.dense_layers = std::min(r.non_negative_int("first_k_dense_replace", 0), m.n_layers);
      if (r.integer("moe_layer_freq", 1) != 1) r.fail("moe_layer_freq", "is not supported (every layer after the dense ones is MoE: 1)");
      m.moe.n_shared_experts = r.non_negative_int("n_shared_experts", 0);
      m.moe.shared_hidden = m.moe.expert_hidden;
      m.moe.router.score_func = "sigmoid";
      m.moe.router.selection_bias = true;  // e_score_correction_bias
      m.moe.router.normalize_topk = r.boolean("norm_topk_prob", true);
      m.moe.router.routed_scaling = r.number("routed_scaling_factor", 1.0);
      m.moe.router.n_groups = r.positive_int("n_group", 1);
      m.moe.router.topk_groups = r.positive_int("topk_group", 1);
      r.require_equal("scoring_func", "sigmoid", "sigmoid", "DeepSeek-V3 routes by sigmoid scores");
      r.require_equal("topk_method", "noaux_tc", "noaux_tc", "group-limited top-k with the correction bias");
      r.require_equal("attention_bias", false, false, "no attention biases");
      if (m.moe.n_experts % m.moe.router.n_groups != 0)
        r.fail("n_group", "= " + std::to_string(m.moe.router.n_groups) + " must divide the number of routed experts");
      break;
    }
  }
  return out;
}

void apply_architecture(const config::ModelConfig& hf, config::ModelConfig& m) {
  const config::ModelConfig keep = m;
  m = hf;
  // Training keys stay the user's.
  m.init_std = keep.init_std;
  m.init_from = keep.init_from;
  m.moe.capacity_factor = keep.moe.capacity_factor;
  m.moe.aux_loss_coef = keep.moe.aux_loss_coef;
  m.moe.seq_aux_loss_coef = keep.moe.seq_aux_loss_coef;
  m.moe.z_loss_coef = keep.moe.z_loss_coef;
  m.moe.experts_impl = keep.moe.experts_impl;
  m.moe.router.bias_update_rate = keep.moe.router.bias_update_rate;
}

config::Config resolve_init_from(const config::Config& cfg) {
  if (cfg.model.init_from.empty()) return cfg;
  config::Config out = cfg;
  apply_architecture(read_config(hf_dir(cfg.model.init_from)).model, out.model);
  out.data.seq_len = std::min(out.data.seq_len, out.model.max_seq_len);
  config::validate(out);
  return out;
}

// ---------------------------------------------------------------------------------------------
// The name map.

namespace {

enum class Layout {
  Same,        // identical shapes
  Transposed,  // HF (out, in) Linear weight, ours (in, out)
  Row,         // HF (1, D), ours (D): Qwen2-MoE's shared_expert_gate
};

struct Entry {
  std::string ours;  // parameter (or buffer) name
  int expert = -1;   // >= 0: the slice [expert] of a stacked expert parameter
  std::string hf;    // tensor name in the HF files
  Layout layout = Layout::Same;
  // DeepSeek's RoPE dims are stored interleaved (pairs x0 x1, x2 x3, ...); ours rotate halves. > 0: the
  // HF rows come in groups of this size whose last qk_rope_head_dim rows are interleaved.
  int rope_group = 0;
};

std::vector<Entry> name_map(const config::ModelConfig& m, Family family) {
  std::vector<Entry> map;
  auto add = [&](std::string ours, std::string hf, Layout layout, int expert = -1, int rope_group = 0) {
    map.push_back({std::move(ours), expert, std::move(hf), layout, rope_group});
  };
  add("embed", "model.embed_tokens.weight", Layout::Same);
  const bool mixtral = family == Family::Mixtral;
  for (int i = 0; i < m.n_layers; ++i) {
    const std::string ours = "layers." + std::to_string(i) + ".";
    const std::string hf = "model.layers." + std::to_string(i) + ".";
    add(ours + "attn_norm.weight", hf + "input_layernorm.weight", Layout::Same);
    if (m.attention == "mla") {
      const std::string attn = hf + "self_attn.";
      const int qk_dim = m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim;
      if (m.mla.q_lora_rank > 0) {
        add(ours + "attn.wq_a", attn + "q_a_proj.weight", Layout::Transposed);
        add(ours + "attn.q_a_norm.weight", attn + "q_a_layernorm.weight", Layout::Same);
        add(ours + "attn.wq_b", attn + "q_b_proj.weight", Layout::Transposed, -1, qk_dim);
      } else {
        add(ours + "attn.wq", attn + "q_proj.weight", Layout::Transposed, -1, qk_dim);
      }
      add(ours + "attn.wkv_a", attn + "kv_a_proj_with_mqa.weight", Layout::Transposed, -1,
          m.mla.kv_lora_rank + m.mla.qk_rope_head_dim);
      add(ours + "attn.kv_a_norm.weight", attn + "kv_a_layernorm.weight", Layout::Same);
      add(ours + "attn.wkv_b", attn + "kv_b_proj.weight", Layout::Transposed);
      add(ours + "attn.wo", attn + "o_proj.weight", Layout::Transposed);
    } else {
      for (const char* p : {"q", "k", "v", "o"})
        add(ours + "attn.w" + p, hf + "self_attn." + p + "_proj.weight", Layout::Transposed);
    }
    if (m.qkv_bias)
      for (const char* p : {"q", "k", "v"}) add(ours + "attn." + p + "_bias", hf + "self_attn." + p + "_proj.bias", Layout::Same);
    if (m.qk_norm != "none") {
      add(ours + "attn.q_norm.weight", hf + "self_attn.q_norm.weight", Layout::Same);
      add(ours + "attn.k_norm.weight", hf + "self_attn.k_norm.weight", Layout::Same);
    }
    add(ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight", Layout::Same);
    if (i < m.dense_layers) {
      add(ours + "mlp.w1", hf + "mlp.gate_proj.weight", Layout::Transposed);
      add(ours + "mlp.w3", hf + "mlp.up_proj.weight", Layout::Transposed);
      add(ours + "mlp.w2", hf + "mlp.down_proj.weight", Layout::Transposed);
      continue;
    }
    const std::string moe = hf + (mixtral ? "block_sparse_moe." : "mlp.");
    add(ours + "moe.router.weight", moe + "gate.weight", Layout::Same);
    if (family == Family::DeepseekV3) add(ours + "moe.router.expert_bias", moe + "gate.e_score_correction_bias", Layout::Same);
    for (int e = 0; e < m.moe.n_experts; ++e) {
      const std::string expert = moe + "experts." + std::to_string(e) + ".";
      add(ours + "moe.experts.w1", expert + (mixtral ? "w1" : "gate_proj") + ".weight", Layout::Transposed, e);
      add(ours + "moe.experts.w3", expert + (mixtral ? "w3" : "up_proj") + ".weight", Layout::Transposed, e);
      add(ours + "moe.experts.w2", expert + (mixtral ? "w2" : "down_proj") + ".weight", Layout::Transposed, e);
    }
    if (m.moe.n_shared_experts > 0) {
      const std::string shared = moe + (family == Family::DeepseekV3 ? "shared_experts." : "shared_expert.");
      add(ours + "moe.shared.w1", shared + "gate_proj.weight", Layout::Transposed);
      add(ours + "moe.shared.w3", shared + "up_proj.weight", Layout::Transposed);
      add(ours + "moe.shared.w2", shared + "down_proj.weight", Layout::Transposed);
      if (m.moe.shared_gate) add(ours + "moe.shared_gate", moe + "shared_expert_gate.weight", Layout::Row);
    }
  }
  add("final_norm.weight", "model.norm.weight", Layout::Same);
  if (!m.tie_embeddings) add("lm_head", "lm_head.weight", Layout::Same);
  return map;
}

// The HF shape of an entry, from the shape of our tensor (or expert slice).
std::vector<int64_t> hf_shape(const torch::Tensor& ours, Layout layout) {
  switch (layout) {
    case Layout::Same: return ours.sizes().vec();
    case Layout::Transposed: return {ours.size(1), ours.size(0)};
    case Layout::Row: return {1, ours.size(0)};
  }
  return {};
}

// Row order that turns HF's interleaved RoPE rows into ours: in each group of `group` rows, the last
// `rope_dim` rows x0 x1 x2 x3 ... become x0 x2 ... x1 x3 ... (evens, then odds).
torch::Tensor deinterleave_rows(int64_t n_rows, int group, int rope_dim) {
  auto order = torch::arange(n_rows, torch::kLong);
  auto* p = order.data_ptr<int64_t>();
  for (int64_t start = 0; start + group <= n_rows; start += group) {
    const int64_t rope_start = start + group - rope_dim;
    for (int j = 0; j < rope_dim / 2; ++j) {
      p[rope_start + j] = rope_start + 2 * j;
      p[rope_start + rope_dim / 2 + j] = rope_start + 2 * j + 1;
    }
  }
  return order;
}

// Where each tensor of an HF folder lives: the index's weight_map, or the single file's header.
struct ShardIndex {
  std::string dir;
  std::string source;                          // the file that says where tensors are (for messages)
  std::map<std::string, std::string> file_of;  // tensor -> shard file name
  std::map<std::string, std::unique_ptr<ckpt::SafetensorsFile>> open;  // headers only

  explicit ShardIndex(const std::string& d) : dir(d) {
    const std::string index_path = files::join(dir, kIndexFile);
    if (files::exists(index_path)) {
      source = index_path;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(files::read_file(index_path));
      } catch (const nlohmann::json::exception& e) {
        throw HfError(index_path + ": not valid JSON (" + e.what() + ")");
      }
      if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object())
        throw HfError(index_path + ": field 'weight_map' is missing or not an object");
      for (const auto& [name, file] : j["weight_map"].items()) {
        if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos ||
            file.get<std::string>().find_first_not_of('.') == std::string::npos)  // "", "." or ".."
          throw HfError(index_path + ": weight_map['" + name + "'] = " + brief(file) + " must be a file name in the folder");
        file_of[name] = file.get<std::string>();
      }
      std::set<std::string> shards;
      for (const auto& [name, file] : file_of) shards.insert(file);
      for (const auto& file : shards)
        if (!files::exists(files::join(dir, file)))
          throw HfError(index_path + " names shard '" + file + "', which is missing from " + dir);
    } else {
      const std::string single = files::join(dir, kSingleFile);
      if (!files::exists(single))
        throw HfError(dir + " has neither " + kIndexFile + " nor " + kSingleFile + ": no weights to read");
      source = single;
      for (const auto& info : shard(kSingleFile).tensors()) file_of[info.name] = kSingleFile;
    }
  }

  const ckpt::SafetensorsFile& shard(const std::string& file) {
    auto& slot = open[file];
    if (!slot) {
      try {
        slot = std::make_unique<ckpt::SafetensorsFile>(files::join(dir, file));
      } catch (const CheckpointError& e) {
        throw HfError(std::string(e.what()).substr(7));  // drop "[ckpt] "
      }
    }
    return *slot;
  }
};

// DeepSeek-V3's multi-token prediction modules are stored as layers past num_hidden_layers.
bool is_mtp_layer(const std::string& name, int n_layers) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) != 0) return false;
  int64_t layer = -1;
  const char* digits = name.c_str() + prefix.size();
  const auto [end, ec] = std::from_chars(digits, name.c_str() + name.size(), layer);
  return end != digits && (ec == std::errc::result_out_of_range || (ec == std::errc() && layer >= n_layers));
}

bool read_rope_interleave(const std::string& dir) {
  const std::string path = files::join(dir, kConfigFile);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(files::read_file(path));
  } catch (const nlohmann::json::exception& e) {  // read_config parsed it; it changed since
    throw HfError(path + ": not valid JSON (" + e.what() + ")");
  }
  auto it = j.find("rope_interleave");
  return it == j.end() || it->is_null() || (it->is_boolean() && it->get<bool>());
}

}  // namespace

std::map<std::string, std::string> read_weight_map(const std::string& dir) { return ShardIndex(dir).file_of; }

void load_weights(const std::string& dir, Family family, model::TransformerImpl& model) {
  torch::NoGradGuard no_grad;
  const auto map = name_map(model.config(), family);
  ShardIndex index(dir);
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  const bool interleaved = family == Family::DeepseekV3 && read_rope_interleave(dir);
  std::set<std::string> used, written;
  // Under expert parallelism this rank holds experts [first, first + count) and reads only those.
  const int64_t first = model.expert_offset(), count = model.local_experts();
  for (const auto& entry : map) {
    if (!params.contains(entry.ours) && !buffers.contains(entry.ours))
      throw HfError("the model has no parameter '" + entry.ours + "' for HF tensor '" + entry.hf + "' (family " +
                    family_name(family) + ")");
    torch::Tensor target = params.contains(entry.ours) ? params[entry.ours] : buffers[entry.ours];
    if (entry.expert >= 0) {
      if (entry.expert < first || entry.expert >= first + count) {  // another rank's expert
        used.insert(entry.hf);
        continue;
      }
      target = target.select(0, entry.expert - first);
    }
    const auto it = index.file_of.find(entry.hf);
    if (it == index.file_of.end())
      throw HfError(index.source + ": tensor '" + entry.hf + "' is missing (expected shape " +
                    shape_text(hf_shape(target, entry.layout)) + " for " + family_name(family) + ")");
    const auto& shard = index.shard(it->second);
    if (!shard.contains(entry.hf))
      throw HfError(shard.path() + ": tensor '" + entry.hf + "' is missing, though " + index.source + " lists it there");
    const auto& info = shard.info(entry.hf);
    const auto expected = hf_shape(target, entry.layout);
    if (info.shape != expected)
      throw HfError(shard.path() + ": tensor '" + entry.hf + "' has shape " + shape_text(info.shape) + ", expected " +
                    shape_text(expected) + " from " + kConfigFile);
    if (info.dtype != torch::kFloat && info.dtype != torch::kBFloat16 && info.dtype != torch::kHalf)
      throw HfError(shard.path() + ": tensor '" + entry.hf + "' has dtype " + std::string(c10::toString(info.dtype)) +
                    "; expected F32, BF16 or F16");
    // One HF tensor in memory at a time, converted into the parameter (or expert slice) in place.
    torch::Tensor value = shard.load(entry.hf);
    if (interleaved && entry.rope_group > 0)
      value = value.index_select(0, deinterleave_rows(value.size(0), entry.rope_group, model.config().mla.qk_rope_head_dim));
    if (entry.layout == Layout::Transposed) value = value.t();
    if (entry.layout == Layout::Row) value = value.view({-1});
    target.copy_(value);
    used.insert(entry.hf);
    written.insert(entry.ours);
  }
  // The model was built uninitialized: every parameter must have come from the folder.
  for (const auto& p : params)
    if (!written.count(p.key()))
      throw HfError("no tensor of " + dir + " maps to parameter '" + p.key() + "' (family " + family_name(family) + ")");
  for (const auto& [name, file] : index.file_of) {
    if (used.count(name) || name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (family == Family::DeepseekV3 && is_mtp_layer(name, model.config().n_layers)) continue;  // MTP: not modelled
    throw HfError(files::join(dir, file) + ": tensor '" + name + "' maps to no parameter of this " +
                  family_name(family) + " model (an unsupported feature?)");
  }
}

LoadedHf load(const std::string& dir) {
  LoadedHf out;
  out.hf = read_config(dir);
  out.model = model::Transformer(out.hf.model);
  load_weights(dir, out.hf.family, *out.model);
  return out;
}

Family infer_family(const config::ModelConfig& m) {
  if (m.attention == "mla") return Family::DeepseekV3;
  if (m.qk_norm == "head") return Family::Qwen3Moe;
  if (m.qk_norm == "full") return Family::Olmoe;
  if (m.qkv_bias || m.moe.shared_gate) return Family::Qwen2Moe;
  return Family::Mixtral;
}

namespace {

// What the family can express; throws naming the key that it cannot.
void check_exportable(const config::ModelConfig& m, Family family) {
  const std::string name = family_name(family);
  auto refuse = [&](const std::string& key_value, const std::string& why) {
    throw HfError("cannot export to " + name + ": " + key_value + " (" + why + ")");
  };
  const auto& r = m.moe.router;
  if (family == Family::DeepseekV3) {
    if (m.attention != "mla") refuse("model.attention = " + m.attention, "DeepSeek-V3 has MLA");
    if (r.score_func != "sigmoid") refuse("model.moe.router.score_func = " + r.score_func, "DeepSeek-V3 routes by sigmoid");
    if (m.qk_norm != "none") refuse("model.qk_norm = " + m.qk_norm, "no q/k norms");
    if (m.qkv_bias) refuse("model.qkv_bias = true", "no attention biases");
    if (m.moe.shared_gate) refuse("model.moe.shared_gate = true", "DeepSeek-V3's shared experts are not gated");
    return;
  }
  if (m.attention != "gqa") refuse("model.attention = " + m.attention, "the family has grouped-query attention");
  if (m.yarn.factor > 1) refuse("model.yarn.factor > 1", "YaRN is exported for deepseek_v3 only");
  if (r.selection_bias) refuse("model.moe.router.selection_bias = true", "the family has no selection bias");
  if (r.score_func != "softmax") refuse("model.moe.router.score_func = " + r.score_func, "the family routes by softmax");
  if (r.routed_scaling != 1.0) refuse("model.moe.router.routed_scaling != 1", "the family has no routed scaling");
  if (r.n_groups != 1) refuse("model.moe.router.n_groups != 1", "the family has no group-limited routing");
  if (r.bias_update_rate > 0) refuse("model.moe.router.bias_update_rate > 0", "the family has no selection bias");
  const bool qwen = family == Family::Qwen2Moe || family == Family::Qwen3Moe;
  if (!qwen && m.dense_layers > 0) refuse("model.dense_layers = " + std::to_string(m.dense_layers), "every layer is MoE");
  if (family != Family::Qwen2Moe && m.moe.n_shared_experts > 0) refuse("model.moe.n_shared_experts > 0", "no shared experts");
  if (family != Family::Qwen2Moe && m.qkv_bias) refuse("model.qkv_bias = true", "no attention biases");
  if (family == Family::Qwen2Moe && m.moe.n_shared_experts > 0 && !m.moe.shared_gate)
    refuse("model.moe.shared_gate = false", "Qwen2-MoE's shared expert is always gated");
  if (family == Family::Qwen2Moe && m.moe.n_shared_experts == 0)
    refuse("model.moe.n_shared_experts = 0", "Qwen2-MoE always has a gated shared expert");
  if (family == Family::Mixtral && !r.normalize_topk)
    refuse("model.moe.router.normalize_topk = false", "Mixtral renormalizes the top-k weights");
  const std::string want_norm = family == Family::Qwen3Moe ? "head" : family == Family::Olmoe ? "full" : "none";
  if (m.qk_norm != want_norm) refuse("model.qk_norm = " + m.qk_norm, "the family has " + want_norm);
  if (family == Family::Olmoe && m.n_heads * config::head_dim(m) != m.d_model)
    refuse("model.n_heads * head_dim != model.d_model", "OLMoE's q_norm spans hidden_size");
}

Json config_json(const config::ModelConfig& m, Family family) {
  const auto& fi = info_of(family);
  Json j;
  j["architectures"] = {fi.architecture};
  j["model_type"] = fi.model_type;
  j["vocab_size"] = m.vocab_size;
  j["hidden_size"] = m.d_model;
  j["num_hidden_layers"] = m.n_layers;
  j["num_attention_heads"] = m.n_heads;
  j["num_key_value_heads"] = m.n_kv_heads;
  j["head_dim"] = config::head_dim(m);
  j["max_position_embeddings"] = m.max_seq_len;
  j["rms_norm_eps"] = m.norm_eps;
  j["rope_theta"] = m.rope_theta;  // transformers 4 reads this; 5 reads rope_parameters
  j["rope_parameters"] = {{"rope_theta", m.rope_theta}, {"rope_type", "default"}};
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = m.tie_embeddings;
  j["num_experts_per_tok"] = m.moe.top_k;
  j["attention_dropout"] = 0.0;
  j["torch_dtype"] = "float32";
  j["dtype"] = "float32";
  std::vector<int> dense;
  for (int i = 0; i < m.dense_layers; ++i) dense.push_back(i);
  switch (family) {
    case Family::Mixtral:
      j["intermediate_size"] = m.moe.expert_hidden;
      j["num_local_experts"] = m.moe.n_experts;
      j["sliding_window"] = nullptr;
      j["router_jitter_noise"] = 0.0;
      break;
    case Family::Qwen2Moe:
    case Family::Qwen3Moe:
      j["intermediate_size"] = m.dense_hidden;
      j["moe_intermediate_size"] = m.moe.expert_hidden;
      j["num_experts"] = m.moe.n_experts;
      j["norm_topk_prob"] = m.moe.router.normalize_topk;
      j["decoder_sparse_step"] = 1;
      j["mlp_only_layers"] = dense;
      j["use_sliding_window"] = false;
      if (family == Family::Qwen2Moe) {
        j["qkv_bias"] = m.qkv_bias;
        j["shared_expert_intermediate_size"] = m.moe.n_shared_experts * config::shared_hidden(m.moe);
      } else {
        j["attention_bias"] = false;
      }
      break;
    case Family::Olmoe:
      j["intermediate_size"] = m.moe.expert_hidden;
      j["num_experts"] = m.moe.n_experts;
      j["norm_topk_prob"] = m.moe.router.normalize_topk;
      j["clip_qkv"] = nullptr;
      j["attention_bias"] = false;
      break;
    case Family::DeepseekV3: {
      j.erase("head_dim");  // derived by transformers from qk_rope_head_dim
      j["q_lora_rank"] = m.mla.q_lora_rank > 0 ? Json(m.mla.q_lora_rank) : Json(nullptr);
      j["kv_lora_rank"] = m.mla.kv_lora_rank;
      j["qk_nope_head_dim"] = m.mla.qk_nope_head_dim;
      j["qk_rope_head_dim"] = m.mla.qk_rope_head_dim;
      j["v_head_dim"] = m.mla.v_head_dim;
      j["rope_interleave"] = true;
      j["intermediate_size"] = m.dense_hidden;
      j["moe_intermediate_size"] = m.moe.expert_hidden;
      j["n_routed_experts"] = m.moe.n_experts;
      j["n_shared_experts"] = m.moe.n_shared_experts;
      j["first_k_dense_replace"] = m.dense_layers;
      j["moe_layer_freq"] = 1;
      j["n_group"] = m.moe.router.n_groups;
      j["topk_group"] = m.moe.router.topk_groups;
      j["routed_scaling_factor"] = m.moe.router.routed_scaling;
      j["norm_topk_prob"] = m.moe.router.normalize_topk;
      j["scoring_func"] = "sigmoid";
      j["topk_method"] = "noaux_tc";
      j["num_nextn_predict_layers"] = 0;
      j["attention_bias"] = false;
      if (m.yarn.factor > 1) {
        Json yarn = {{"rope_type", "yarn"},
                     {"rope_theta", m.rope_theta},
                     {"factor", m.yarn.factor},
                     {"original_max_position_embeddings",
                      m.yarn.original_max_seq_len > 0 ? m.yarn.original_max_seq_len : m.max_seq_len},
                     {"beta_fast", m.yarn.beta_fast},
                     {"beta_slow", m.yarn.beta_slow},
                     {"mscale", m.yarn.mscale},
                     {"mscale_all_dim", m.yarn.mscale_all_dim}};
        j["rope_parameters"] = yarn;
        Json legacy = yarn;  // transformers 4
        legacy.erase("rope_theta");
        legacy.erase("rope_type");
        legacy["type"] = "yarn";
        j["rope_scaling"] = legacy;
      }
      break;
    }
  }
  return j;
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

}  // namespace

void export_model(const model::TransformerImpl& model, Family family, const std::string& dir, uint64_t max_shard_bytes) {
  torch::NoGradGuard no_grad;
  const auto& m = model.config();
  check_exportable(m, family);
  const auto map = name_map(m, family);
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  const int64_t n_experts = m.moe.n_experts;
  auto source = [&](const Entry& e) {
    torch::Tensor t;
    if (params.contains(e.ours))
      t = params[e.ours].detach();
    else if (buffers.contains(e.ours))
      t = buffers[e.ours].detach();
    else  // a DeepSeek router without its selection bias exports a zero bias
      t = torch::zeros({n_experts});
    return e.expert >= 0 ? t.select(0, e.expert) : t;
  };

  // Plan the shards from sizes alone, then materialize one shard at a time.
  std::vector<std::vector<size_t>> shards(1);
  uint64_t shard_bytes = 0, total_bytes = 0;
  for (size_t i = 0; i < map.size(); ++i) {
    const auto t = source(map[i]);
    const uint64_t bytes = uint64_t(t.numel()) * 4;  // exported as fp32
    if (!shards.back().empty() && shard_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(i);
    shard_bytes += bytes;
    total_bytes += bytes;
  }

  files::make_directories(dir);
  Json weight_map = Json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file = shard_name(s, shards.size());
    ckpt::TensorMap tensors;
    for (size_t i : shards[s]) {
      const Entry& e = map[i];
      torch::Tensor t = source(e).to(torch::kCPU).to(torch::kFloat);
      if (e.layout == Layout::Transposed) t = t.t();
      if (e.layout == Layout::Row) t = t.view({1, -1});
      if (e.rope_group > 0) {  // back to DeepSeek's interleaved RoPE rows (rope_interleave: true)
        auto order = deinterleave_rows(t.size(0), e.rope_group, m.mla.qk_rope_head_dim);
        t = t.index_select(0, torch::argsort(order));
      }
      tensors.emplace_back(e.hf, t.contiguous());
      weight_map[e.hf] = file;
    }
    try {
      ckpt::save_safetensors(files::join(dir, file), tensors, {{"format", "pt"}});
    } catch (const CheckpointError& err) {
      throw HfError(std::string(err.what()).substr(7));
    }
  }
  Json index;
  index["metadata"] = {{"total_size", total_bytes}};
  index["weight_map"] = weight_map;
  files::write_file_synced(files::join(dir, kIndexFile), index.dump(2) + "\n");
  files::write_file_synced(files::join(dir, kConfigFile), config_json(m, family).dump(2) + "\n");
}

namespace {
void load_init_from(model::TransformerImpl& model, const std::string& init_from) {
  const std::string dir = hf_dir(init_from);
  load_weights(dir, read_config(dir).family, model);
}
}  // namespace

void install_init_from() { model::set_pretrained_loader(&load_init_from); }

}  // namespace moetrain::hf
