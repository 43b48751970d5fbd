// Hugging Face import and export. Each family is described once, in a table of traits (kFamilies):
// its config.json fields, tensor names and features. One name map, built from the model config and the
// traits, drives both directions: each entry pairs one of our parameters (or one expert's slice of it)
// with one HF tensor and says how the layouts differ (HF Linear weights are (out, in); ours are (in, out)).
#include "hf/hf.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>

#include "ckpt/checkpoint.h"
#include "ckpt/safetensors.h"
#include "common/files.h"
#include "common/json_brief.h"
#include "common/log.h"
#include "common/tensor.h"
#include "cost/memory.h"

namespace moetrain::hf {

using Json = nlohmann::ordered_json;

namespace {

constexpr const char* kConfigFile = "config.json";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";

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

// Dense layers as mlp_only_layers (Qwen): they must be the first k layers, every other layer MoE.
int mlp_only_dense_layers(const ConfigReader& r, int n_layers) {
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

// MLA's own fields (DeepSeek): code rather than traits, as no other family has latent attention.
void read_mla(const ConfigReader& r, config::ModelConfig& m) {
  m.attention = "mla";
  m.mla.q_lora_rank = r.find("q_lora_rank") ? r.positive_int("q_lora_rank") : 0;  // null: a full-rank wq
  m.mla.kv_lora_rank = r.positive_int("kv_lora_rank");
  m.mla.qk_nope_head_dim = r.positive_int("qk_nope_head_dim");
  m.mla.qk_rope_head_dim = r.positive_int("qk_rope_head_dim");
  m.mla.v_head_dim = r.positive_int("v_head_dim");
  if (m.mla.qk_rope_head_dim % 2 != 0) r.fail("qk_rope_head_dim", "must be even (RoPE)");
  m.n_kv_heads = m.n_heads;             // unused by MLA
  m.head_dim = m.mla.qk_rope_head_dim;  // unused by MLA; even, as validation wants
}

// Partial RoPE (GLM-4.5): partial_rotary_factor in rope_parameters (transformers 5) or at the top level,
// 0.5 where absent as transformers' Glm4MoeConfig sets it. transformers rotates int(head_dim * factor)
// dims; we return 0 for the whole head (model.rotary_dim's default).
int read_rotary_dim(const ConfigReader& r, int head_dim) {
  const Json* parameters = r.find("rope_parameters");
  const bool nested = parameters && parameters->is_object() && parameters->contains("partial_rotary_factor") &&
                      !(*parameters)["partial_rotary_factor"].is_null();
  const std::string field = nested ? "rope_parameters.partial_rotary_factor" : "partial_rotary_factor";
  const Json* value = nested ? &(*parameters)["partial_rotary_factor"] : r.find(field);
  if (value && !value->is_number()) r.fail(field, "= " + brief(*value) + " must be a number");
  const double factor = value ? value->get<double>() : 0.5;
  const double dims = std::floor(head_dim * factor);
  if (!(factor > 0 && factor <= 1) || dims < 2 || int(dims) % 2 != 0)
    r.fail(field, "= " + (value ? brief(*value) : std::string("0.5 (the default)")) + " is not supported (head_dim " +
                      std::to_string(head_dim) + " times it must be an even number of dims in [2, head_dim])");
  return int(dims) == head_dim ? 0 : int(dims);
}

// The factor config.json says for `rotary` of `head_dim` dims: the nearest double whose product with
// head_dim truncates back to `rotary`, as Python's int() does.
double partial_rotary_factor(int rotary, int head_dim) {
  double factor = double(rotary) / head_dim;
  while (std::floor(head_dim * factor) < rotary) factor = std::nextafter(factor, 2.0);
  return factor;
}

// gpt-oss's attention: a sink per head, and a window of sliding_window tokens (the query's own
// included, as transformers' sliding mask) on the layers layer_types names sliding_attention. Where
// layer_types is absent, transformers' GptOssConfig alternates them: sliding, full, sliding, ...
void read_layer_types(const ConfigReader& r, config::ModelConfig& m) {
  m.attention_sinks = true;
  m.sliding_window = r.find("sliding_window") ? r.positive_int("sliding_window") : 0;
  m.layer_types.clear();
  const Json* types = r.find("layer_types");
  if (types && (!types->is_array() || int64_t(types->size()) != m.n_layers))
    r.fail("layer_types", "= " + brief(*types) + " must list one type per layer (" + std::to_string(m.n_layers) + ")");
  for (int i = 0; i < m.n_layers; ++i) {
    const Json name = types ? (*types)[size_t(i)] : Json(i % 2 == 0 ? "sliding_attention" : "full_attention");
    if (name == "sliding_attention")
      m.layer_types.push_back("sliding");
    else if (name == "full_attention")
      m.layer_types.push_back("full");
    else
      r.fail("layer_types", "has " + brief(name) + " at layer " + std::to_string(i) +
                                ", not supported (\"sliding_attention\" or \"full_attention\")");
  }
  if (m.sliding_window == 0) m.layer_types.clear();  // no window: every layer attends fully
}

// ---------------------------------------------------------------------------------------------
// Each family described once: its names (config.json fields, tensor names) and the features it can
// express. read_config, name_map, check_exportable, infer_family and config_json consult this table.

// How config.json places the dense (non-MoE) layers, which must come first.
enum class DenseLayers {
  None,           // every layer is MoE
  MlpOnlyLayers,  // mlp_only_layers = [0, ..., k-1] with decoder_sparse_step 1 (Qwen)
  FirstKDense,    // first_k_dense_replace = k with moe_layer_freq 1 (DeepSeek)
};

enum class SharedExperts {
  None,
  OneGated,  // one shared expert behind a sigmoid gate, sized by shared_expert_intermediate_size (Qwen2-MoE)
  Ungated,   // n_shared_experts experts of the routed experts' size, summed into one (DeepSeek)
};

// A config.json field with the one value we can express: checked on read (why: the message's reason),
// written on export. why == nullptr: written only.
struct FixedField {
  const char* name;
  Json value;
  const char* why;
};

struct FamilyTraits {
  Family family;
  const char* model_type;    // HF's model_type, also our --family name
  const char* architecture;  // architectures[0]
  const char* display;       // the family in messages

  // Tensor names, under model.layers.N.
  const char* moe_prefix;                  // the MoE block
  const char* expert_proj[3];              // each expert's w1 (gate), w3 (up), w2 (down)
  const char* shared_prefix = nullptr;     // the shared expert(s), under moe_prefix
  const char* shared_gate = nullptr;       // the shared expert's gate, under moe_prefix
  const char* router_bias = nullptr;       // the selection bias, under moe_prefix; nullptr: none
  const char* router_prefix = "gate.";     // the router, under moe_prefix

  // config.json fields that differ between families.
  const char* expert_hidden_field;           // the routed experts' hidden size
  const char* dense_hidden_field = nullptr;  // the dense layers' hidden size; nullptr: no dense layers
  const char* n_experts_field;               // written on export (any family's name is read)
  const char* norm_topk_field = nullptr;     // nullptr: the top-k weights are always renormalized
  bool normalize_topk = true;                // norm_topk_prob's default
  std::vector<FixedField> fixed;

  // Features.
  const char* attention = "gqa";  // gqa | mla
  const char* qk_norm = "none";   // none | head (per head) | full (over the whole projection)
  const char* qk_norm_field = nullptr;  // a boolean field that turns the q/k norms on (default off); nullptr: always
  const char* qkv_bias_field = nullptr; // a boolean field for optional q/k/v biases; nullptr: none
  bool qkv_bias_default = false;        // ... its default
  const char* attn_bias_kind = "qkv";   // ... what it turns on (model.attn_bias): qkv | all (also o)
  bool partial_rotary = false;          // partial_rotary_factor (default 0.5): RoPE on the heads' first dims
  bool sliding_window = false;    // sliding_window: null or at least the context (full attention)
  DenseLayers dense_layers = DenseLayers::None;
  SharedExperts shared = SharedExperts::None;
  const char* score_func = "softmax";  // softmax | sigmoid
  bool group_limited = false;          // n_group, topk_group
  bool routed_scaling = false;         // routed_scaling_factor
  bool yarn = false;                   // YaRN RoPE scaling
  bool interleaved_rope = false;       // MLA's RoPE rows stored as pairs
  bool rope_interleave_field = false;  // ... unless config.json's rope_interleave says false
  // topk_method greedy (plain top-k) | group_limited_greedy (n_group, topk_group), groups scored by their
  // best expert (model.moe.router.group_score max), as DeepSeek-V2 routes; false: group_limited's
  // groups are scored by their two best (top2_sum).
  bool greedy_topk_methods = false;
  bool mtp_layers = false;             // num_nextn_predict_layers MTP layers past num_hidden_layers
  // gpt-oss's experts: one stacked tensor per projection for the layer, (E, in, out), gate and up columns
  // interleaved in gate_up_proj, each with a bias; the router has a bias (model.moe.expert_bias and
  // model.moe.router.logit_bias); published as MXFP4 blocks and scales, which import dequantizes.
  bool biased_stacked_experts = false;
  const char* activation = "swiglu";   // model.moe.activation
  // gpt-oss's attention: self_attn.sinks (model.attention_sinks), sliding_window on the layers layer_types
  // says ("sliding_attention" | "full_attention": model.sliding_window, model.layer_types).
  bool sinks_and_windows = false;
  // Defaults of config.json fields where transformers' config class has its own.
  int first_k_dense_default = 0;       // first_k_dense_replace
  int n_shared_default = 0;            // n_shared_experts
};

// One line per aspect: names; tensor names; config.json fields; fixed fields; features.
const std::vector<FamilyTraits> kFamilies = {
    {.family = Family::Mixtral, .model_type = "mixtral", .architecture = "MixtralForCausalLM", .display = "Mixtral",
     .moe_prefix = "block_sparse_moe.", .expert_proj = {"w1", "w3", "w2"},
     .expert_hidden_field = "intermediate_size", .n_experts_field = "num_local_experts",
     .fixed = {{"sliding_window", nullptr, nullptr}, {"router_jitter_noise", 0.0, nullptr}},
     .sliding_window = true},
    {.family = Family::Qwen2Moe, .model_type = "qwen2_moe", .architecture = "Qwen2MoeForCausalLM", .display = "Qwen2-MoE",
     .moe_prefix = "mlp.", .expert_proj = {"gate_proj", "up_proj", "down_proj"}, .shared_prefix = "shared_expert.",
     .shared_gate = "shared_expert_gate.",
     .expert_hidden_field = "moe_intermediate_size", .dense_hidden_field = "intermediate_size",
     .n_experts_field = "num_experts", .norm_topk_field = "norm_topk_prob", .normalize_topk = false,
     .fixed = {{"use_sliding_window", false, "full causal attention: false"}},
     .qkv_bias_field = "qkv_bias", .qkv_bias_default = true, .dense_layers = DenseLayers::MlpOnlyLayers,
     .shared = SharedExperts::OneGated},
    {.family = Family::Qwen3Moe, .model_type = "qwen3_moe", .architecture = "Qwen3MoeForCausalLM", .display = "Qwen3-MoE",
     .moe_prefix = "mlp.", .expert_proj = {"gate_proj", "up_proj", "down_proj"},
     .expert_hidden_field = "moe_intermediate_size", .dense_hidden_field = "intermediate_size",
     .n_experts_field = "num_experts", .norm_topk_field = "norm_topk_prob", .normalize_topk = true,
     .fixed = {{"use_sliding_window", false, "full causal attention: false"},
               {"attention_bias", false, "no attention biases in Qwen3-MoE here"}},
     .qk_norm = "head", .dense_layers = DenseLayers::MlpOnlyLayers},
    {.family = Family::Olmoe, .model_type = "olmoe", .architecture = "OlmoeForCausalLM", .display = "OLMoE",
     .moe_prefix = "mlp.", .expert_proj = {"gate_proj", "up_proj", "down_proj"},
     .expert_hidden_field = "intermediate_size", .n_experts_field = "num_experts", .norm_topk_field = "norm_topk_prob",
     .normalize_topk = false,
     .fixed = {{"clip_qkv", nullptr, "q/k/v clipping is not implemented: null"},
               {"attention_bias", false, "no attention biases: false"}},
     .qk_norm = "full"},
    {.family = Family::DeepseekV3, .model_type = "deepseek_v3", .architecture = "DeepseekV3ForCausalLM", .display = "DeepSeek-V3",
     .moe_prefix = "mlp.", .expert_proj = {"gate_proj", "up_proj", "down_proj"}, .shared_prefix = "shared_experts.",
     .router_bias = "gate.e_score_correction_bias",
     .expert_hidden_field = "moe_intermediate_size", .dense_hidden_field = "intermediate_size",
     .n_experts_field = "n_routed_experts", .norm_topk_field = "norm_topk_prob", .normalize_topk = true,
     .fixed = {{"scoring_func", "sigmoid", "DeepSeek-V3 routes by sigmoid scores"},
               {"topk_method", "noaux_tc", "group-limited top-k with the correction bias"},
               {"attention_bias", false, "no attention biases"}},
     .attention = "mla", .dense_layers = DenseLayers::FirstKDense, .shared = SharedExperts::Ungated,
     .score_func = "sigmoid", .group_limited = true, .routed_scaling = true, .yarn = true, .interleaved_rope = true,
     .rope_interleave_field = true, .mtp_layers = true},
    // transformers' DeepseekV2 never renormalizes the top-k weights (it reads no norm_topk_prob) and always
    // stores RoPE rows as pairs (it reads no rope_interleave).
    {.family = Family::DeepseekV2, .model_type = "deepseek_v2", .architecture = "DeepseekV2ForCausalLM", .display = "DeepSeek-V2",
     .moe_prefix = "mlp.", .expert_proj = {"gate_proj", "up_proj", "down_proj"}, .shared_prefix = "shared_experts.",
     .expert_hidden_field = "moe_intermediate_size", .dense_hidden_field = "intermediate_size",
     .n_experts_field = "n_routed_experts", .normalize_topk = false,
     .fixed = {{"scoring_func", "softmax", "DeepSeek-V2 routes by softmax scores"},
               {"norm_topk_prob", false, "transformers' DeepSeek-V2 never renormalizes the top-k weights: false"},
               {"attention_bias", false, "no attention biases"},
               {"mlp_bias", false, "no MLP biases"}},
     .attention = "mla", .dense_layers = DenseLayers::FirstKDense, .shared = SharedExperts::Ungated,
     .group_limited = true, .routed_scaling = true, .yarn = true, .interleaved_rope = true,
     .greedy_topk_methods = true},
    // GLM-4.5: grouped-query attention with partial RoPE (rotate-half within the rotated dims), optional
    // q/k/v biases and per-head q/k norms; DeepSeek-V3's sigmoid routing, shared experts and MTP layers.
    {.family = Family::Glm4Moe, .model_type = "glm4_moe", .architecture = "Glm4MoeForCausalLM", .display = "GLM-4.5",
     .moe_prefix = "mlp.", .expert_proj = {"gate_proj", "up_proj", "down_proj"}, .shared_prefix = "shared_experts.",
     .router_bias = "gate.e_score_correction_bias",
     .expert_hidden_field = "moe_intermediate_size", .dense_hidden_field = "intermediate_size",
     .n_experts_field = "n_routed_experts", .norm_topk_field = "norm_topk_prob", .normalize_topk = true,
     .qk_norm = "head", .qk_norm_field = "use_qk_norm", .qkv_bias_field = "attention_bias", .partial_rotary = true,
     .dense_layers = DenseLayers::FirstKDense, .shared = SharedExperts::Ungated, .score_func = "sigmoid",
     .group_limited = true, .routed_scaling = true, .mtp_layers = true, .first_k_dense_default = 1,
     .n_shared_default = 1},
    // gpt-oss: every layer MoE, clamped SwiGLU experts with biases stored stacked, a router with a bias and
    // softmax over the top-k logits, biases on q/k/v/o, YaRN without truncation.
    {.family = Family::GptOss, .model_type = "gpt_oss", .architecture = "GptOssForCausalLM", .display = "gpt-oss",
     .moe_prefix = "mlp.", .expert_proj = {"gate_up_proj", "gate_up_proj", "down_proj"}, .router_prefix = "router.",
     .expert_hidden_field = "intermediate_size", .n_experts_field = "num_local_experts",
     .fixed = {{"swiglu_limit", 7.0, "gpt-oss's clamped SwiGLU has the fixed limit 7.0"},
               {"swiglu_alpha", 1.702, "gpt-oss's clamped SwiGLU has the fixed alpha 1.702"}},
     .qkv_bias_field = "attention_bias", .qkv_bias_default = true, .attn_bias_kind = "all", .yarn = true,
     .biased_stacked_experts = true, .activation = "swiglu_clamped", .sinks_and_windows = true},
};

const FamilyTraits& traits_of(Family f) {
  for (const auto& t : kFamilies)
    if (t.family == f) return t;
  throw HfError("unknown family");
}

// The model_type of each family that has `feature`, comma-separated.
template <class Feature>
std::string model_types_with(Feature feature) {
  std::string names;
  for (const auto& t : kFamilies)
    if (feature(t)) names += std::string(names.empty() ? "" : ", ") + t.model_type;
  return names;
}

}  // namespace

std::string family_name(Family family) { return traits_of(family).model_type; }

std::string family_names() {
  return model_types_with([](const FamilyTraits&) { return true; });
}

Family family_from_name(const std::string& name) {
  for (const auto& t : kFamilies)
    if (name == t.model_type || name == t.architecture) return t.family;
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
  const FamilyTraits* family = nullptr;
  std::string architectures;
  for (const auto& t : kFamilies) architectures += std::string(architectures.empty() ? "" : ", ") + t.architecture;
  const Json* type = r.find("model_type");
  const std::string type_name = !type ? "" : type->is_string() ? type->get<std::string>() : brief(*type);
  std::vector<std::string> warnings;
  if (const Json* archs = r.find("architectures")) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string())
      r.fail("architectures", "must be a non-empty list of names");
    const auto arch = (*archs)[0].get<std::string>();
    for (const auto& t : kFamilies)
      if (arch == t.architecture) family = &t;
    if (!family)
      r.fail("architectures", "= [\"" + arch + "\"]: architecture not supported (supported: " + architectures + ")");
    if (type && type_name != family->model_type)
      warnings.push_back("warning: " + r.path + ": model_type \"" + type_name + "\" disagrees with architectures [\"" +
                         arch + "\"] (whose model_type is \"" + family->model_type +
                         "\"); reading it as " + arch + ", as architectures says");
  } else if (type) {
    for (const auto& t : kFamilies)
      if (type_name == t.model_type) family = &t;
    if (!family) r.fail("model_type", "= \"" + type_name + "\": model type not supported (supported: " + family_names() + ")");
  } else {
    r.fail("architectures", "is missing (and so is model_type)");
  }
  for (const auto& w : warnings) log_line(w);
  const FamilyTraits& t = *family;

  HfConfig out;
  out.family = t.family;
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
  // YaRN is read for the families that have it (DeepSeek-V3, whose attention scale follows it).
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
    if (type == "yarn" && t.yarn) {
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
      if (params.contains("truncate") && !params["truncate"].is_null()) {
        if (!params["truncate"].is_boolean()) r.fail(field + ".truncate", "= " + brief(params["truncate"]) + " must be true or false");
        m.yarn.truncate = params["truncate"].get<bool>();
      }
      if (params.contains("attention_factor") && !params["attention_factor"].is_null())
        r.fail(field + ".attention_factor", "is not supported (derived from mscale and mscale_all_dim)");
      if (m.yarn.factor < 1) r.fail(field + ".factor", "must be >= 1");
    } else if (type != "default") {
      r.fail(field + ".rope_type", "= \"" + type + "\" is not supported (default RoPE" + (t.yarn ? " or yarn)" : ")"));
    }
  }
  // Any family's name for the expert count is accepted.
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
  m.attn_bias = "none";
  m.rotary_dim = 0;
  m.qk_norm = "none";
  m.dense_layers = 0;
  if (m.head_dim % 2 != 0) r.fail("head_dim", "= " + std::to_string(m.head_dim) + " must be even (RoPE)");

  // What differs between families, in the order the fields are checked.
  if (std::string(t.attention) == "mla") read_mla(r, m);
  m.moe.expert_hidden = r.positive_int(t.expert_hidden_field);
  if (t.dense_hidden_field) m.dense_hidden = r.positive_int(t.dense_hidden_field);
  if (t.dense_layers == DenseLayers::MlpOnlyLayers) m.dense_layers = mlp_only_dense_layers(r, m.n_layers);
  if (t.dense_layers == DenseLayers::FirstKDense) {
    m.dense_layers = std::min(r.non_negative_int("first_k_dense_replace", t.first_k_dense_default), m.n_layers);
    if (r.integer("moe_layer_freq", 1) != 1) r.fail("moe_layer_freq", "is not supported (every layer after the dense ones is MoE: 1)");
  }
  if (t.shared == SharedExperts::Ungated) {
    m.moe.n_shared_experts = r.non_negative_int("n_shared_experts", t.n_shared_default);
    m.moe.shared_hidden = m.moe.expert_hidden;
  }
  m.moe.router.score_func = t.score_func;
  m.moe.activation = t.activation;
  m.moe.expert_bias = m.moe.router.logit_bias = t.biased_stacked_experts;
  m.moe.router.selection_bias = t.router_bias != nullptr;  // e_score_correction_bias
  m.moe.router.normalize_topk = t.norm_topk_field ? r.boolean(t.norm_topk_field, t.normalize_topk) : t.normalize_topk;
  if (t.routed_scaling) m.moe.router.routed_scaling = r.number("routed_scaling_factor", 1.0);
  bool grouped = t.group_limited;
  if (t.greedy_topk_methods) {
    const Json* method = r.find("topk_method");
    const std::string name = !method || method->is_null() ? "greedy" : method->is_string() ? method->get<std::string>() : "";
    if (name != "greedy" && name != "group_limited_greedy")
      r.fail("topk_method", "= " + (method ? brief(*method) : std::string("null")) +
                                " is not supported (\"greedy\" or \"group_limited_greedy\")");
    grouped = name == "group_limited_greedy";
    m.moe.router.group_score = "max";
  }
  if (grouped) {
    m.moe.router.n_groups = r.positive_int("n_group", 1);
    m.moe.router.topk_groups = r.positive_int("topk_group", 1);
  }
  for (const auto& f : t.fixed)
    if (f.why) r.require_equal(f.name, f.value, f.value, f.why);
  if (t.sliding_window)
    if (const Json* window = r.find("sliding_window");
        window && (!window->is_number_integer() || window->get<int64_t>() < m.max_seq_len))
      r.fail("sliding_window", "= " + brief(*window) + " is not supported (full causal attention: null)");
  if (t.qkv_bias_field) m.attn_bias = r.boolean(t.qkv_bias_field, t.qkv_bias_default) ? t.attn_bias_kind : "none";
  if (t.shared == SharedExperts::OneGated) {
    const int shared = r.non_negative_int("shared_expert_intermediate_size", 0);
    if (shared > 0) {
      m.moe.n_shared_experts = 1;
      m.moe.shared_hidden = shared;
      m.moe.shared_gate = true;
    }
  }
  m.qk_norm = !t.qk_norm_field || r.boolean(t.qk_norm_field, false) ? t.qk_norm : "none";
  if (t.partial_rotary) m.rotary_dim = read_rotary_dim(r, m.head_dim);
  if (m.qk_norm == "full" && int64_t(m.n_heads) * m.head_dim != m.d_model)
    r.fail("head_dim", "= " + std::to_string(m.head_dim) + ": " + t.display +
                           "'s q_norm spans hidden_size, so heads * head_dim must equal it");
  if (grouped && m.moe.n_experts % m.moe.router.n_groups != 0)
    r.fail("n_group", "= " + std::to_string(m.moe.router.n_groups) + " must divide the number of routed experts");
  if (t.mtp_layers) m.mtp_depth = r.non_negative_int("num_nextn_predict_layers", 0);
  if (t.sinks_and_windows) read_layer_types(r, m);
  return out;
}

void apply_architecture(const config::ModelConfig& hf, config::ModelConfig& m) {
  const config::ModelConfig keep = m;
  m = hf;
  // Training keys stay the user's.
  m.init_std = keep.init_std;
  m.init_from = keep.init_from;
  // Whether to train MTP modules is the run's choice: those the folder has are loaded (up to
  // model.mtp_depth), the rest start from the seeded init (load_weights).
  m.mtp_depth = keep.mtp_depth;
  m.mtp_loss_weight = keep.mtp_loss_weight;
  m.moe.capacity_factor = keep.moe.capacity_factor;
  m.moe.aux_loss_coef = keep.moe.aux_loss_coef;
  m.moe.seq_aux_loss_coef = keep.moe.seq_aux_loss_coef;
  m.moe.z_loss_coef = keep.moe.z_loss_coef;
  m.moe.experts_impl = keep.moe.experts_impl;
  m.moe.router.bias_update_rate = keep.moe.router.bias_update_rate;
}

config::Config resolve_init_from(const config::Config& cfg) {
  if (!is_hf_path(cfg.model.init_from)) return cfg;  // "" or ckpt:DIR, whose architecture is the config's own
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
  EvenColumns, // ours = HF[..., 0::2] (gpt-oss's gate_up_proj: gate columns); HF's last dim is twice ours
  OddColumns,  // ours = HF[..., 1::2] (... up columns)
};

struct Entry {
  std::string ours;  // parameter (or buffer) name
  int expert = -1;   // >= 0: the slice [expert] of a stacked expert parameter
  std::string hf;    // tensor name in the HF files
  Layout layout = Layout::Same;
  // DeepSeek's RoPE dims are stored interleaved (pairs x0 x1, x2 x3, ...); ours rotate halves. > 0: the
  // HF rows come in groups of this size whose last qk_rope_head_dim rows are interleaved.
  int rope_group = 0;
  int mtp = -1;              // >= 0: a tensor of that MTP module (its HF layer num_hidden_layers + mtp)
  bool shared_copy = false;  // an MTP layer's copy of the embedding or head: written on export, checked on import
  // Export in transformers 5's layout: 1 = the layer's stacked experts.gate_up_proj (E, 2F, D) from our
  // w1 and w3, 2 = its experts.down_proj (E, D, F) from w2 (`ours` names w1 or w2).
  int packed = 0;
  // A stacked HF tensor whose first dim is the global expert (gpt-oss): each rank reads its experts' rows.
  bool stacked = false;
};

std::vector<Entry> name_map(const config::ModelConfig& m, Family family) {
  std::vector<Entry> map;
  int mtp = -1;  // the MTP module whose entries are being added
  auto add = [&](std::string ours, std::string hf, Layout layout, int expert = -1, int rope_group = 0) {
    map.push_back({std::move(ours), expert, std::move(hf), layout, rope_group, mtp});
  };
  const FamilyTraits& t = traits_of(family);
  add("embed", "model.embed_tokens.weight", Layout::Same);
  // One block: ours under `ours`, HF's under `hf`; dense or MoE.
  auto add_block = [&](const std::string& ours, const std::string& hf, bool dense) {
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
    if (m.attn_bias != "none")
      for (const char* p : {"q", "k", "v"}) add(ours + "attn." + p + "_bias", hf + "self_attn." + p + "_proj.bias", Layout::Same);
    if (m.attn_bias == "all") add(ours + "attn.o_bias", hf + "self_attn.o_proj.bias", Layout::Same);
    if (m.attention_sinks) add(ours + "attn.sinks", hf + "self_attn.sinks", Layout::Same);
    if (m.qk_norm != "none") {
      add(ours + "attn.q_norm.weight", hf + "self_attn.q_norm.weight", Layout::Same);
      add(ours + "attn.k_norm.weight", hf + "self_attn.k_norm.weight", Layout::Same);
    }
    add(ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight", Layout::Same);
    if (dense) {
      add(ours + "mlp.w1", hf + "mlp.gate_proj.weight", Layout::Transposed);
      add(ours + "mlp.w3", hf + "mlp.up_proj.weight", Layout::Transposed);
      add(ours + "mlp.w2", hf + "mlp.down_proj.weight", Layout::Transposed);
      return;
    }
    const std::string moe = hf + t.moe_prefix;
    add(ours + "moe.router.weight", moe + t.router_prefix + "weight", Layout::Same);
    if (t.biased_stacked_experts) {  // gpt-oss: whole-layer tensors, biases beside the weights
      add(ours + "moe.router.bias", moe + t.router_prefix + "bias", Layout::Same);
      const std::string experts = moe + "experts.";
      for (const auto& [our_name, hf_name, layout] :
           {std::tuple{"w1", "gate_up_proj", Layout::EvenColumns}, std::tuple{"w3", "gate_up_proj", Layout::OddColumns},
            std::tuple{"b1", "gate_up_proj_bias", Layout::EvenColumns},
            std::tuple{"b3", "gate_up_proj_bias", Layout::OddColumns}, std::tuple{"w2", "down_proj", Layout::Same},
            std::tuple{"b2", "down_proj_bias", Layout::Same}}) {
        add(ours + "moe.experts." + our_name, experts + hf_name, layout);
        map.back().stacked = true;
      }
      return;  // no shared experts
    }
    // Exported even when our router has no selection bias (as zeros): the family's model always has it.
    if (t.router_bias) add(ours + "moe.router.expert_bias", moe + t.router_bias, Layout::Same);
    for (int e = 0; e < m.moe.n_experts; ++e) {
      const std::string expert = moe + "experts." + std::to_string(e) + ".";
      add(ours + "moe.experts.w1", expert + t.expert_proj[0] + ".weight", Layout::Transposed, e);
      add(ours + "moe.experts.w3", expert + t.expert_proj[1] + ".weight", Layout::Transposed, e);
      add(ours + "moe.experts.w2", expert + t.expert_proj[2] + ".weight", Layout::Transposed, e);
    }
    if (m.moe.n_shared_experts > 0) {
      if (!t.shared_prefix) throw HfError(std::string(t.model_type) + " has no shared experts");
      const std::string shared = moe + t.shared_prefix;
      add(ours + "moe.shared.w1", shared + "gate_proj.weight", Layout::Transposed);
      add(ours + "moe.shared.w3", shared + "up_proj.weight", Layout::Transposed);
      add(ours + "moe.shared.w2", shared + "down_proj.weight", Layout::Transposed);
      if (m.moe.shared_gate) {
        if (!t.shared_gate) throw HfError(std::string(t.model_type) + " has no shared expert gate");
        add(ours + "moe.shared_gate", moe + t.shared_gate + "weight", Layout::Row);
      }
    }
  };
  for (int i = 0; i < m.n_layers; ++i)
    add_block("layers." + std::to_string(i) + ".", "model.layers." + std::to_string(i) + ".", i < m.dense_layers);
  add("final_norm.weight", "model.norm.weight", Layout::Same);
  if (!m.tie_embeddings) add("lm_head", "lm_head.weight", Layout::Same);
  // DeepSeek-V3's MTP modules: layer num_hidden_layers + k, with copies of the embedding and head
  // (README_WEIGHTS.md of deepseek-ai/DeepSeek-V3: they share the main model's parameters).
  for (mtp = 0; mtp < m.mtp_depth; ++mtp) {
    if (!t.mtp_layers) throw HfError(std::string(t.model_type) + " has no multi-token prediction layers");
    const std::string ours = "mtp." + std::to_string(mtp) + ".";
    const std::string hf = "model.layers." + std::to_string(m.n_layers + mtp) + ".";
    add("embed", hf + "embed_tokens.weight", Layout::Same);
    map.back().shared_copy = true;
    add(ours + "enorm.weight", hf + "enorm.weight", Layout::Same);
    add(ours + "hnorm.weight", hf + "hnorm.weight", Layout::Same);
    add(ours + "eh_proj", hf + "eh_proj.weight", Layout::Transposed);
    add_block(ours + "block.", hf, /*dense=*/m.n_layers <= m.dense_layers);
    add(ours + "norm.weight", hf + "shared_head.norm.weight", Layout::Same);
    add(m.tie_embeddings ? "embed" : "lm_head", hf + "shared_head.head.weight", Layout::Same);
    map.back().shared_copy = true;
  }
  return map;
}

// The HF shape of an entry, from the shape of our tensor (or expert slice).
std::vector<int64_t> hf_shape(const torch::Tensor& ours, Layout layout) {
  switch (layout) {
    case Layout::Same: return ours.sizes().vec();
    case Layout::Transposed: return {ours.size(1), ours.size(0)};
    case Layout::Row: return {1, ours.size(0)};
    case Layout::EvenColumns:
    case Layout::OddColumns: {
      auto shape = ours.sizes().vec();
      shape.back() *= 2;
      return shape;
    }
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

namespace {

// transformers 5's own layout, which save_pretrained(save_original_format=False) writes and newer
// checkpoints ship: a MoE layer's routed experts as two stacked tensors, `experts.gate_up_proj`
// (E, 2F, D: each expert's gate rows, then its up rows) and `experts.down_proj` (E, D, F), under the
// module's name in the model, `mlp.` (Mixtral's checkpoints say block_sparse_moe, its model mlp, so its
// router is mlp.gate there too). Expert e's slice of them is its per-expert (out, in) weight.
struct PackedExpert {
  std::string tensor;        // the stacked tensor's name
  int64_t row_begin = 0;     // rows [row_begin, row_begin + rows) of expert e's (2F, D) or (D, F) slice
  int64_t rows = -1;         // -1: all of them
  bool gate_up = false;
};

// The module name transformers 5 gives a checkpoint's MoE block: Mixtral's block_sparse_moe is mlp.
std::string v5_name(const std::string& name) {
  const std::string old = ".block_sparse_moe.";
  const auto at = name.find(old);
  return at == std::string::npos ? name : name.substr(0, at) + ".mlp." + name.substr(at + old.size());
}

// Where a per-expert entry's weight lies in the stacked layout, if `hf` names a routed expert's
// projection: "<block>experts.<e>.<proj>.weight".
std::optional<PackedExpert> packed_expert(const Entry& entry, const FamilyTraits& t) {
  if (entry.expert < 0) return std::nullopt;
  const std::string marker = "experts." + std::to_string(entry.expert) + ".";
  const auto at = entry.hf.rfind(marker);
  if (at == std::string::npos) return std::nullopt;
  const std::string block = v5_name(entry.hf.substr(0, at));  // "model.layers.L.mlp."
  const std::string proj = entry.hf.substr(at + marker.size(), entry.hf.size() - at - marker.size() - 7);  // no ".weight"
  PackedExpert out;
  if (proj == t.expert_proj[2]) {
    out.tensor = block + "experts.down_proj";
    return out;
  }
  out.tensor = block + "experts.gate_up_proj";
  out.gate_up = true;
  out.row_begin = proj == t.expert_proj[0] ? 0 : 1;  // in halves; resolved once F is known
  return out;
}

}  // namespace

void load_weights(const std::string& dir, Family family, model::TransformerImpl& model) {
  torch::NoGradGuard no_grad;
  const auto map = name_map(model.config(), family);
  ShardIndex index(dir);
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  const bool interleaved =
      traits_of(family).interleaved_rope && (!traits_of(family).rope_interleave_field || read_rope_interleave(dir));
  std::set<std::string> used, written;
  std::map<std::string, torch::Tensor> packed_cache;  // one layer's stacked gate_up_proj and down_proj, once read
  // gpt-oss's stacked tensors (Entry::stacked): the last one read, whole, as gate_up_proj serves w1 then w3.
  std::string stacked_name;
  torch::Tensor stacked_value;
  auto read_stacked = [&](const Entry& entry, const std::vector<int64_t>& expected) {
    if (stacked_name == entry.hf) return stacked_value;
    auto load_listed = [&](const std::string& name) {
      const auto& shard = index.shard(index.file_of.at(name));
      if (!shard.contains(name))
        throw HfError(shard.path() + ": tensor '" + name + "' is missing, though " + index.source + " lists it there");
      return std::pair{shard.load(name), shard.path()};
    };
    const std::string blocks = entry.hf + "_blocks", scales = entry.hf + "_scales";
    torch::Tensor value;
    std::string what;
    if (index.file_of.count(entry.hf)) {
      auto [loaded, path] = load_listed(entry.hf);
      what = path + ": tensor '" + entry.hf + "'";
      if (loaded.scalar_type() != torch::kFloat && loaded.scalar_type() != torch::kBFloat16 &&
          loaded.scalar_type() != torch::kHalf)
        throw HfError(what + " has dtype " + std::string(c10::toString(loaded.scalar_type())) + "; expected F32, BF16 or F16");
      value = loaded;
      used.insert(entry.hf);
    } else if (index.file_of.count(blocks) && index.file_of.count(scales)) {
      // MXFP4 as gpt-oss publishes it: blocks (E, out, in / 32, 16) and scales (E, out, in / 32), which
      // dequantize to (E, out, in); transformers' convert_moe_packed_tensors transposes that to (E, in, out).
      auto [b, path] = load_listed(blocks);
      what = path + ": MXFP4 tensor '" + blocks + "'";
      value = dequantize_mxfp4(b, load_listed(scales).first, what).transpose(1, 2);
      used.insert({blocks, scales});
    } else {
      throw HfError(index.source + ": tensor '" + entry.hf + "' is missing, and so are its MXFP4 '" + blocks + "' and '" +
                    scales + "' (expected shape " + shape_text(expected) + " for " + family_name(family) + ")");
    }
    if (value.sizes().vec() != expected)
      throw HfError(what + " has shape " + shape_text(value.sizes()) + (index.file_of.count(entry.hf) ? "" : " dequantized") +
                    ", expected " + shape_text(expected) + " from " + kConfigFile);
    stacked_name = entry.hf;
    stacked_value = value;
    return value;
  };
  // Under expert parallelism this rank holds experts [first, first + count) and reads only those.
  const int64_t first = model.expert_offset(), count = model.local_experts();
  // An MTP module the folder lacks (its layer has no eh_proj) keeps the seeded init.
  std::set<int> absent_mtp;
  for (int k = 0; k < model.config().mtp_depth; ++k)
    if (!index.file_of.count("model.layers." + std::to_string(model.config().n_layers + k) + ".eh_proj.weight")) {
      absent_mtp.insert(k);
      log_line("[hf] " + dir + " has no MTP layer " + std::to_string(model.config().n_layers + k) + ": MTP module mtp." +
               std::to_string(k) + " keeps its seeded init");
    }
  for (const auto& entry : map) {
    // A tensor another stage or rank reads, in either layout.
    auto read_elsewhere = [&] {
      used.insert({entry.hf, v5_name(entry.hf)});
      if (auto p = packed_expert(entry, traits_of(family))) used.insert(p->tensor);
    };
    if (model.held_by_another_stage(entry.ours)) {  // another pipeline stage loads it
      read_elsewhere();
      continue;
    }
    if (entry.mtp >= 0 && absent_mtp.count(entry.mtp)) continue;
    if (!params.contains(entry.ours) && !buffers.contains(entry.ours))
      throw HfError("the model has no parameter '" + entry.ours + "' for HF tensor '" + entry.hf + "' (family " +
                    family_name(family) + ")");
    torch::Tensor target = params.contains(entry.ours) ? params[entry.ours] : buffers[entry.ours];
    if (entry.expert >= 0) {
      if (entry.expert < first || entry.expert >= first + count) {  // another rank's expert
        read_elsewhere();
        continue;
      }
      target = target.select(0, entry.expert - first);
    }
    if (entry.stacked) {  // this rank's experts' rows of the layer's tensor
      auto expected = hf_shape(target, entry.layout);
      expected[0] = model.config().moe.n_experts;
      auto value = read_stacked(entry, expected).narrow(0, first, count);
      if (entry.layout == Layout::EvenColumns) value = value.slice(-1, 0, std::nullopt, 2);
      if (entry.layout == Layout::OddColumns) value = value.slice(-1, 1, std::nullopt, 2);
      target.copy_(value);
      written.insert(entry.ours);
      continue;
    }
    // The entry's tensor, else its place in transformers 5's layout (stacked experts, Mixtral's mlp.).
    std::string name = entry.hf;
    auto expected = hf_shape(target, entry.layout);
    std::optional<PackedExpert> packed;
    if (!index.file_of.count(name)) {
      if (auto p = packed_expert(entry, traits_of(family)); p && index.file_of.count(p->tensor)) {
        packed = p;
        name = p->tensor;
        const int64_t out = expected[0], n_experts = model.config().moe.n_experts;
        expected = {n_experts, p->gate_up ? 2 * out : out, expected[1]};
        if (p->gate_up) {
          packed->row_begin *= out;
          packed->rows = out;
        }
      } else if (index.file_of.count(v5_name(name))) {
        name = v5_name(name);
      }
    }
    const auto it = index.file_of.find(name);
    if (it == index.file_of.end())
      throw HfError(index.source + ": tensor '" + entry.hf + "' is missing (expected shape " +
                    shape_text(hf_shape(target, entry.layout)) + " for " + family_name(family) + ")");
    const auto& shard = index.shard(it->second);
    if (!shard.contains(name))
      throw HfError(shard.path() + ": tensor '" + name + "' is missing, though " + index.source + " lists it there");
    const auto& info = shard.info(name);
    if (info.shape != expected)
      throw HfError(shard.path() + ": tensor '" + name + "' has shape " + shape_text(info.shape) + ", expected " +
                    shape_text(expected) + " from " + kConfigFile);
    if (info.dtype != torch::kFloat && info.dtype != torch::kBFloat16 && info.dtype != torch::kHalf)
      throw HfError(shard.path() + ": tensor '" + name + "' has dtype " + std::string(c10::toString(info.dtype)) +
                    "; expected F32, BF16 or F16");
    // One HF tensor in memory at a time, converted into the parameter (or expert slice) in place; a
    // stacked experts tensor is read once for all its experts' entries.
    torch::Tensor value;
    if (packed) {
      if (!packed_cache.count(name)) {
        if (packed_cache.size() >= 2) packed_cache.clear();  // the previous layer's pair
        packed_cache[name] = shard.load(name);
      }
      value = packed_cache[name].select(0, entry.expert);
      if (packed->rows >= 0) value = value.slice(0, packed->row_begin, packed->row_begin + packed->rows);
    } else {
      value = shard.load(name);
    }
    if (entry.shared_copy) {  // the main model's tensor, loaded before: a copy that differs is not ours to keep
      if (!torch::equal(value.to(target.device(), target.scalar_type()), target))
        log_line("[hf] warning: " + shard.path() + ": '" + entry.hf + "' differs from the main model's '" + entry.ours +
                 "', which the MTP module shares; the main model's is used");
      used.insert(entry.hf);
      continue;
    }
    if (interleaved && entry.rope_group > 0)
      value = value.index_select(0, deinterleave_rows(value.size(0), entry.rope_group, model.config().mla.qk_rope_head_dim));
    if (entry.layout == Layout::Transposed) value = value.t();
    if (entry.layout == Layout::Row) value = value.view({-1});
    target.copy_(value);
    used.insert(name);
    written.insert(entry.ours);
  }
  // The model was built uninitialized: every parameter must have come from the folder.
  for (const auto& p : params)
    if (!written.count(p.key()) && !absent_mtp.count(model::mtp_module_of(p.key())))
      throw HfError("no tensor of " + dir + " maps to parameter '" + p.key() + "' (family " + family_name(family) + ")");
  for (const auto& [name, file] : index.file_of) {
    if (used.count(name) || name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (traits_of(family).mtp_layers && is_mtp_layer(name, model.config().n_layers)) continue;  // MTP layers past model.mtp_depth
    throw HfError(files::join(dir, file) + ": tensor '" + name + "' maps to no parameter of this " +
                  family_name(family) + " model (an unsupported feature?)");
  }
}

LoadedHf load(const std::string& dir) {
  LoadedHf out;
  out.hf = read_config(dir);
  // The MTP depth of an import is the layers the shards hold. transformers' DeepseekV3Config says
  // num_nextn_predict_layers 1 by default, also where no layer was saved: a module made up from a seeded
  // init would be exported as if it had been trained.
  const int said = out.hf.model.mtp_depth;
  if (said > 0) {
    const auto file_of = read_weight_map(dir);
    int& depth = out.hf.model.mtp_depth;
    depth = 0;
    while (depth < said && file_of.count("model.layers." + std::to_string(out.hf.model.n_layers + depth) + ".eh_proj.weight"))
      ++depth;
    if (depth < said)
      log_line("[hf] " + dir + ": " + kConfigFile + " says num_nextn_predict_layers " + std::to_string(said) +
               ", but the shards hold " + std::to_string(depth) + " MTP layer" + (depth == 1 ? "" : "s") +
               ": imported with model.mtp_depth " + std::to_string(depth));
  }
  // Sizes our keys do not allow, or huge dimensions, are refused before anything is allocated: the
  // model is built on this machine's CPU in fp32.
  config::Config cfg;
  cfg.model = out.hf.model;
  cfg.data.seq_len = std::min(cfg.data.seq_len, cfg.model.max_seq_len);
  try {
    config::validate(cfg);
    cost::require_memory(cfg, /*expert_parallel=*/1, /*training=*/false);
  } catch (const ConfigError& e) {
    const std::string what = e.what(), prefix = "[config] ";
    throw HfError(files::join(dir, kConfigFile) + ": " + (what.rfind(prefix, 0) == 0 ? what.substr(prefix.size()) : what));
  }
  out.model = model::Transformer(out.hf.model);
  load_weights(dir, out.hf.family, *out.model);
  return out;
}

// The family of the model's most distinctive feature: MLA, then its q/k norm, then attention biases or
// a gated shared expert; a model with none of them exports to the first (plainest) family, Mixtral.
Family infer_family(const config::ModelConfig& m) {
  auto first_with = [](auto feature) -> const FamilyTraits* {
    for (const auto& t : kFamilies)
      if (feature(t)) return &t;
    return nullptr;
  };
  const FamilyTraits* t = nullptr;
  // gpt-oss's experts (biases, the clamped SwiGLU) or router bias: only it has them.
  if (m.moe.expert_bias || m.moe.router.logit_bias || m.moe.activation == "swiglu_clamped" || m.attention_sinks ||
      m.sliding_window > 0)
    t = first_with([](const FamilyTraits& f) { return f.biased_stacked_experts; });
  if (!t && m.attention != "gqa") {  // the MLA family that routes by the model's scores (V3: sigmoid, V2: softmax)
    t = first_with([&](const FamilyTraits& f) { return m.attention == f.attention && m.moe.router.score_func == f.score_func; });
    if (!t) t = first_with([&](const FamilyTraits& f) { return m.attention == f.attention; });
  }
  // GQA with partial RoPE, or with DeepSeek's sigmoid routing: GLM-4.5.
  if (!t && (config::rotary_dim(m) != config::head_dim(m) || m.moe.router.score_func == "sigmoid"))
    t = first_with([](const FamilyTraits& f) { return f.partial_rotary; });
  if (!t && m.qk_norm != "none")
    t = first_with([&](const FamilyTraits& f) { return m.qk_norm == f.qk_norm && !f.qk_norm_field; });
  if (!t && m.attn_bias != "none") t = first_with([](const FamilyTraits& f) { return f.qkv_bias_field != nullptr; });
  if (!t && m.moe.shared_gate) t = first_with([](const FamilyTraits& f) { return f.shared == SharedExperts::OneGated; });
  return t ? t->family : kFamilies.front().family;
}

namespace {

// What the family can express; throws naming the key that it cannot.
void check_exportable(const config::ModelConfig& m, Family family) {
  const FamilyTraits& t = traits_of(family);
  const std::string name = t.model_type, display = t.display;
  const bool mla = std::string(t.attention) == "mla";
  auto refuse = [&](const std::string& key_value, const std::string& why) {
    throw HfError("cannot export to " + name + ": " + key_value + " (" + why + ")");
  };
  const auto& r = m.moe.router;
  if (m.attention != t.attention)
    refuse("model.attention = " + m.attention, mla ? display + " has MLA" : "the family has grouped-query attention");
  if (!t.yarn && m.yarn.factor > 1)
    refuse("model.yarn.factor > 1", "YaRN is exported for " + model_types_with([](const FamilyTraits& f) { return f.yarn; }) + " only");
  if (!t.router_bias && r.selection_bias) refuse("model.moe.router.selection_bias = true", "the family has no selection bias");
  if (r.score_func != t.score_func)
    refuse("model.moe.router.score_func = " + r.score_func,
           std::string(t.score_func) == "sigmoid" ? display + " routes by sigmoid" : "the family routes by softmax");
  if (!t.routed_scaling && r.routed_scaling != 1.0) refuse("model.moe.router.routed_scaling != 1", "the family has no routed scaling");
  if (!t.group_limited && r.n_groups != 1) refuse("model.moe.router.n_groups != 1", "the family has no group-limited routing");
  const std::string group_score = t.greedy_topk_methods ? "max" : "top2_sum";
  if (r.n_groups != 1 && r.group_score != group_score)
    refuse("model.moe.router.group_score = " + r.group_score, display + " scores a group by " +
                                                                  (group_score == "max" ? "its best expert" : "its two best experts"));
  if (!t.router_bias && r.bias_update_rate > 0) refuse("model.moe.router.bias_update_rate > 0", "the family has no selection bias");
  if (t.dense_layers == DenseLayers::None && m.dense_layers > 0)
    refuse("model.dense_layers = " + std::to_string(m.dense_layers), "every layer is MoE");
  if (t.shared == SharedExperts::None && m.moe.n_shared_experts > 0) refuse("model.moe.n_shared_experts > 0", "no shared experts");
  if (m.attn_bias != "none" && t.qkv_bias_field && m.attn_bias != t.attn_bias_kind)
    refuse("model.attn_bias = " + m.attn_bias, std::string(t.attn_bias_kind) == "all"
                                                   ? display + " has biases on q, k, v and the output projection"
                                                   : display + " has no output projection bias");
  if (m.moe.activation != t.activation)
    refuse("model.moe.activation = " + m.moe.activation, display + "'s experts are " + t.activation);
  if (m.moe.expert_bias != t.biased_stacked_experts)
    refuse(std::string("model.moe.expert_bias = ") + (m.moe.expert_bias ? "true" : "false"),
           t.biased_stacked_experts ? display + "'s experts have biases" : "the family's experts have no biases");
  if (m.moe.router.logit_bias != t.biased_stacked_experts)
    refuse(std::string("model.moe.router.logit_bias = ") + (m.moe.router.logit_bias ? "true" : "false"),
           t.biased_stacked_experts ? display + "'s router has a bias" : "the family's router has no bias");
  if (!t.qkv_bias_field && m.attn_bias != "none") refuse("model.attn_bias = " + m.attn_bias, "no attention biases");
  if (m.attention_sinks != t.sinks_and_windows)
    refuse(std::string("model.attention_sinks = ") + (m.attention_sinks ? "true" : "false"),
           t.sinks_and_windows ? display + "'s attention has sinks" : "the family's attention has no sinks");
  if (!t.sinks_and_windows && m.sliding_window > 0)
    refuse("model.sliding_window = " + std::to_string(m.sliding_window), "the family attends over the whole context");
  if (!t.partial_rotary && config::rotary_dim(m) != config::head_dim(m) && !mla)
    refuse("model.rotary_dim = " + std::to_string(m.rotary_dim), display + " rotates whole heads");
  if (!t.mtp_layers && m.mtp_depth > 0)
    refuse("model.mtp_depth = " + std::to_string(m.mtp_depth),
           "multi-token prediction layers are exported for " + model_types_with([](const FamilyTraits& f) { return f.mtp_layers; }) + " only");
  if (t.shared == SharedExperts::OneGated && m.moe.n_shared_experts > 0 && !m.moe.shared_gate)
    refuse("model.moe.shared_gate = false", display + "'s shared expert is always gated");
  if (t.shared == SharedExperts::OneGated && m.moe.n_shared_experts == 0)
    refuse("model.moe.n_shared_experts = 0", display + " always has a gated shared expert");
  if (t.shared == SharedExperts::Ungated && m.moe.shared_gate)
    refuse("model.moe.shared_gate = true", display + "'s shared experts are not gated");
  if (!t.norm_topk_field && r.normalize_topk != t.normalize_topk)
    refuse(std::string("model.moe.router.normalize_topk = ") + (r.normalize_topk ? "true" : "false"),
           display + (t.normalize_topk ? " renormalizes the top-k weights" : " never renormalizes the top-k weights"));
  if (m.qk_norm != t.qk_norm && !(t.qk_norm_field && m.qk_norm == "none"))
    refuse("model.qk_norm = " + m.qk_norm, mla ? "no q/k norms" : "the family has " + std::string(t.qk_norm));
  if (std::string(t.qk_norm) == "full" && m.n_heads * config::head_dim(m) != m.d_model)
    refuse("model.n_heads * head_dim != model.d_model", display + "'s q_norm spans hidden_size");
}

// config.json in the family's vocabulary. The fields go in the order transformers' own configs list them.
Json config_json(const config::ModelConfig& m, Family family) {
  const FamilyTraits& t = traits_of(family);
  Json j;
  j["architectures"] = {t.architecture};
  j["model_type"] = t.model_type;
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
  if (std::string(t.attention) == "mla") {  // MLA's own fields (DeepSeek)
    j.erase("head_dim");                     // derived by transformers from qk_rope_head_dim
    j["q_lora_rank"] = m.mla.q_lora_rank > 0 ? Json(m.mla.q_lora_rank) : Json(nullptr);
    j["kv_lora_rank"] = m.mla.kv_lora_rank;
    j["qk_nope_head_dim"] = m.mla.qk_nope_head_dim;
    j["qk_rope_head_dim"] = m.mla.qk_rope_head_dim;
    j["v_head_dim"] = m.mla.v_head_dim;
    if (t.rope_interleave_field) j["rope_interleave"] = true;
  }
  if (t.dense_hidden_field) j[t.dense_hidden_field] = m.dense_hidden;
  j[t.expert_hidden_field] = m.moe.expert_hidden;
  j[t.n_experts_field] = m.moe.n_experts;
  if (t.shared == SharedExperts::Ungated) j["n_shared_experts"] = m.moe.n_shared_experts;
  if (t.dense_layers == DenseLayers::FirstKDense) {
    j["first_k_dense_replace"] = m.dense_layers;
    j["moe_layer_freq"] = 1;
  }
  if (t.group_limited) {
    j["n_group"] = m.moe.router.n_groups;
    j["topk_group"] = m.moe.router.topk_groups;
  }
  if (t.greedy_topk_methods) j["topk_method"] = m.moe.router.n_groups > 1 ? "group_limited_greedy" : "greedy";
  if (t.routed_scaling) j["routed_scaling_factor"] = m.moe.router.routed_scaling;
  if (t.norm_topk_field) j[t.norm_topk_field] = m.moe.router.normalize_topk;
  if (t.dense_layers == DenseLayers::MlpOnlyLayers) {
    std::vector<int> dense;
    for (int i = 0; i < m.dense_layers; ++i) dense.push_back(i);
    j["decoder_sparse_step"] = 1;
    j["mlp_only_layers"] = dense;
  }
  for (const auto& f : t.fixed) j[f.name] = f.value;
  if (t.mtp_layers) j["num_nextn_predict_layers"] = m.mtp_depth;
  if (t.qkv_bias_field) j[t.qkv_bias_field] = m.attn_bias == t.attn_bias_kind;
  if (t.qk_norm_field) j[t.qk_norm_field] = m.qk_norm != "none";
  if (t.partial_rotary) {
    j["partial_rotary_factor"] = partial_rotary_factor(config::rotary_dim(m), config::head_dim(m));
    j["rope_parameters"]["partial_rotary_factor"] = j["partial_rotary_factor"];
  }
  if (t.sinks_and_windows) {  // the window of each layer, as transformers' GptOssConfig names it
    j["sliding_window"] = m.sliding_window > 0 ? Json(m.sliding_window) : Json(nullptr);
    Json types = Json::array();
    for (int i = 0; i < m.n_layers; ++i)
      types.push_back(config::attention_window(m, i) > 0 ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
  }
  if (t.shared == SharedExperts::OneGated)
    j["shared_expert_intermediate_size"] = m.moe.n_shared_experts * config::shared_hidden(m.moe);
  if (t.yarn && m.yarn.factor > 1) {
    Json yarn = {{"rope_type", "yarn"},
                 {"rope_theta", m.rope_theta},
                 {"factor", m.yarn.factor},
                 {"original_max_position_embeddings",
                  m.yarn.original_max_seq_len > 0 ? m.yarn.original_max_seq_len : m.max_seq_len},
                 {"beta_fast", m.yarn.beta_fast},
                 {"beta_slow", m.yarn.beta_slow},
                 {"mscale", m.yarn.mscale},
                 {"mscale_all_dim", m.yarn.mscale_all_dim}};
    if (!m.yarn.truncate) yarn["truncate"] = false;  // gpt-oss; transformers' default is true
    j["rope_parameters"] = yarn;
    Json legacy = yarn;  // transformers 4
    legacy.erase("rope_theta");
    legacy.erase("rope_type");
    legacy["type"] = "yarn";
    j["rope_scaling"] = legacy;
  }
  return j;
}

// A file of DIR that transformers could load weights from: model.safetensors, its shards and index.
bool is_weight_file(const std::string& name) {
  const std::string suffix = ".safetensors";
  return name == kIndexFile || (name.rfind("model", 0) == 0 && name.size() > suffix.size() &&
                                name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0);
}

// Moves a finished export from `staging` into `dir`: the whole folder where `dir` is new, else file by
// file (into the folder itself, should it be a link), over the previous ones where the caller allowed
// that (convert --force). Weight files of a previous model that the new one lacks go: transformers
// would load a stale model.safetensors before the new index. Other files (a tokenizer) stay.
void move_into_place(const std::string& staging, const std::string& dir, const std::vector<std::string>& written) {
  if (!files::exists(dir)) {
    files::rename_path(staging, dir);
    files::fsync_path(files::parent(dir), true);
    return;
  }
  for (const auto& name : written) files::rename_path(files::join(staging, name), files::join(dir, name));
  for (const auto& name : files::list_directory(dir))
    if (is_weight_file(name) && std::find(written.begin(), written.end(), name) == written.end())
      files::remove_tree(files::join(dir, name));
  files::fsync_path(dir, true);
  files::remove_tree(staging);
}

std::string shard_name(size_t i, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

}  // namespace

void export_model(const model::TransformerImpl& model, Family family, const std::string& dir, uint64_t max_shard_bytes,
                  ExpertLayout expert_layout) {
  torch::NoGradGuard no_grad;
  const auto& m = model.config();
  check_exportable(m, family);
  std::vector<Entry> map;
  for (auto& e : name_map(m, family)) {
    if (e.layout == Layout::OddColumns) continue;  // interleaved into its EvenColumns partner's tensor
    if (expert_layout == ExpertLayout::Packed) {
      if (auto p = packed_expert(e, traits_of(family))) {  // one entry per layer's stacked tensor, at expert 0
        const std::string w = e.ours.substr(e.ours.size() - 2);
        if (e.expert != 0 || w == "w3") continue;
        Entry stacked = e;
        stacked.hf = p->tensor;
        stacked.expert = -1;
        stacked.layout = Layout::Same;  // built in HF's orientation
        stacked.packed = w == "w1" ? 1 : 2;
        map.push_back(stacked);
        continue;
      }
      e.hf = v5_name(e.hf);
    }
    map.push_back(e);
  }
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
    if (e.packed == 1)  // (E, D, F) w1 and w3 -> (E, 2F, D): each expert's gate rows, then its up rows
      return torch::cat({t.transpose(1, 2), params[e.ours.substr(0, e.ours.size() - 2) + "w3"].detach().transpose(1, 2)}, 1);
    if (e.packed == 2) return t.transpose(1, 2);  // (E, F, D) w2 -> (E, D, F)
    if (e.layout == Layout::EvenColumns) {  // gpt-oss: w1 and w3 (b1 and b3) -> gate, up, gate, up, ... columns
      const std::string up = e.ours.substr(0, e.ours.size() - 1) + "3";
      return torch::stack({t, params[up].detach()}, -1).flatten(-2);
    }
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

  // Everything is written into a sibling folder and moved into DIR at the end: an error (a full disk,
  // say) leaves DIR as it was, never half an export.
  std::string target = dir;
  while (target.size() > 1 && target.back() == '/') target.pop_back();
  if (files::exists(target) && !files::is_directory(target)) throw HfError(target + " exists and is not a folder");
  const std::string staging = target + ".partial-export";
  files::remove_tree(staging);  // left by an export that was killed
  files::make_directories(staging);
  try {
    std::vector<std::string> written;  // in the order they move into DIR: shards, index, config.json last
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
        ckpt::save_safetensors(files::join(staging, file), tensors, {{"format", "pt"}});
      } catch (const CheckpointError& err) {
        throw HfError(std::string(err.what()).substr(7));
      }
      written.push_back(file);
    }
    Json index;
    index["metadata"] = {{"total_size", total_bytes}};
    index["weight_map"] = weight_map;
    files::write_file_synced(files::join(staging, kIndexFile), index.dump(2) + "\n");
    files::write_file_synced(files::join(staging, kConfigFile), config_json(m, family).dump(2) + "\n");
    written.insert(written.end(), {kIndexFile, kConfigFile});
    move_into_place(staging, target, written);
  } catch (...) {
    try {
      files::remove_tree(staging);
    } catch (const Error&) {
    }
    throw;
  }
}

void load_init_from(model::TransformerImpl& model, const std::string& init_from) {
  if (init_from.rfind("ckpt:", 0) == 0) {  // one of our checkpoints (an SFT run before `moetrain rl`)
    const std::string where = init_from.substr(5);
    const auto step_dir = ckpt::find_checkpoint(where);
    if (!step_dir) throw CheckpointError("model.init_from = " + init_from + ": '" + where + "' holds no checkpoint");
    ckpt::load_model(*step_dir, model);
    return;
  }
  const std::string dir = hf_dir(init_from);
  load_weights(dir, read_config(dir).family, model);
}


torch::Tensor dequantize_mxfp4(const torch::Tensor& blocks, const torch::Tensor& scales, const std::string& what) {
  if (blocks.scalar_type() != torch::kByte || scales.scalar_type() != torch::kByte)
    throw HfError(what + ": MXFP4 blocks and scales must be U8, got " + std::string(c10::toString(blocks.scalar_type())) +
                  " and " + std::string(c10::toString(scales.scalar_type())));
  if (blocks.dim() < 2 || blocks.sizes().slice(0, blocks.dim() - 1) != scales.sizes())
    throw HfError(what + ": MXFP4 blocks " + shape_text(blocks.sizes()) + " and scales " + shape_text(scales.sizes()) +
                  " disagree (blocks must be the scales' shape plus the bytes of a block)");
  if (scales.numel() > 0 && scales.eq(255).any().item<bool>())
    throw HfError(what + ": an MXFP4 scale is 255, which the format reserves for NaN");
  // E2M1: sign, two exponent bits, one mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
  static const float kE2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  const auto table = torch::from_blob(const_cast<float*>(kE2M1), {16}, torch::kFloat).to(blocks.device());
  const auto bytes = blocks.to(torch::kLong);
  const auto low = table.index({bytes.bitwise_and(15)}), high = table.index({bytes.bitwise_right_shift(4)});
  auto values = torch::stack({low, high}, -1).flatten(-2);  // (..., G, 2B): low nibble first
  const auto exponent = (scales.to(torch::kInt) - 127).unsqueeze(-1);
  values = torch::ldexp(values, exponent);
  return values.flatten(-2);
}

ExpertLayout expert_layout_from_name(const std::string& name) {
  if (name == "per-expert") return ExpertLayout::PerExpert;
  if (name == "packed") return ExpertLayout::Packed;
  throw UsageError("--expert-layout must be per-expert or packed, got '" + name + "'");
}

bool is_peft_path(const std::string& path) { return path.rfind("peft:", 0) == 0; }
std::string peft_dir(const std::string& path) { return is_peft_path(path) ? path.substr(5) : path; }

// PEFT's LoRA (peft 0.21's LoraConfig and its saved state dict): a Linear's adapter is lora_A (r, in) and
// lora_B (out, r) with delta W = (lora_alpha / r) lora_B lora_A; ours is A (in, r), B (r, out) on the
// transposed weight, so lora_A = A^T and lora_B = B^T, with the HF weight's row order (DeepSeek's
// interleaved RoPE rows). transformers 5 holds a MoE layer's routed experts as two 3-D parameters,
// experts.gate_up_proj (E, 2F, D; gate rows then up rows) and experts.down_proj (E, D, F), which peft
// adapts through `target_parameters`: one wrapper per parameter with lora_A (E r, in) and lora_B
// (out, r E), expert e's factors being rows [e r, (e+1) r) of lora_A and columns e, e + E, e + 2E, ...
// of lora_B. Our gate (w1) and up (w3) adapters are two rank-r products; side by side on gate_up_proj
// they are one adapter of rank 2r, A = [A1^T; A3^T] and B = [[B1^T, 0], [0, B3^T]], exactly, which the
// config's rank_pattern and alpha_pattern (rank 2r, alpha 2 alpha: the same scale) declare. The stacked
// experts are `mlp.experts` in every family's transformers 5 model (Mixtral's checkpoints say
// block_sparse_moe; its model does not).
// On transformers 5, peft 0.21 rewrites a loaded config's target_modules named gate_proj, up_proj or
// down_proj (w1, w2, w3 for Mixtral) into the stacked experts' parameters, taking them for the per-expert
// Linears of transformers 4 adapters, whatever module they name. So the dense MLPs' and shared experts'
// projections are targeted by their weight, as target_parameters (a 2-D parameter's lora_A and lora_B are
// a Linear's, under the same names), which it leaves alone.
void export_peft(const model::TransformerImpl& model, Family family, const std::string& dir, const std::string& base) {
  torch::NoGradGuard no_grad;
  const auto& m = model.config();
  const auto& lora = model.lora_config();
  if (!model.lora_enabled()) throw HfError("--to peft: the model holds no LoRA adapters");
  check_exportable(m, family);
  const FamilyTraits& t = traits_of(family);
  if (t.biased_stacked_experts)  // its experts are (E, in, out) with interleaved gate/up: not peft's stacked form
    throw HfError("--to peft: " + std::string(t.display) + " adapters are not exported yet (merge them and export the model)");
  const auto map = name_map(m, family);
  auto params = model.named_parameters();
  const std::string prefix = "base_model.model.";
  auto fp32 = [](const torch::Tensor& x) { return x.detach().to(torch::kCPU).to(torch::kFloat); };

  ckpt::TensorMap tensors;
  std::vector<std::string> modules;     // target_modules: full module names, so that only these match
  std::vector<std::string> parameters;  // target_parameters: the dense MLPs', shared experts' and routed experts'
  bool experts = false;
  int skipped_mtp = 0;
  for (const auto& e : map) {
    if (e.expert >= 0 || e.shared_copy || !params.contains(e.ours + "_lora_a")) continue;
    if (e.mtp >= 0) {  // transformers builds no MTP layers: nothing there to adapt
      ++skipped_mtp;
      continue;
    }
    const std::string module = e.hf.substr(0, e.hf.size() - std::string(".weight").size());
    auto a = fp32(params[e.ours + "_lora_a"]).t().contiguous();  // (r, in)
    auto b = fp32(params[e.ours + "_lora_b"]).t().contiguous();  // (out, r)
    if (e.rope_group > 0) {
      const auto order = deinterleave_rows(b.size(0), e.rope_group, m.mla.qk_rope_head_dim);
      b = b.index_select(0, torch::argsort(order)).contiguous();
    }
    tensors.emplace_back(prefix + module + ".lora_A.weight", a);
    tensors.emplace_back(prefix + module + ".lora_B.weight", b);
    const std::string leaf = module.substr(module.rfind('.') + 1);
    if (leaf == "gate_proj" || leaf == "up_proj" || leaf == "down_proj")
      parameters.push_back(e.hf);
    else
      modules.push_back(module);
  }
  for (int i = 0; i < m.n_layers; ++i) {
    const std::string ours = "layers." + std::to_string(i) + ".moe.experts.";
    if (!params.contains(ours + "w1_lora_a")) continue;
    experts = true;
    const std::string module = prefix + "model.layers." + std::to_string(i) + ".mlp.experts.";
    const int64_t E = m.moe.n_experts, r = lora.rank;
    // lora_B (out, r E) from per-expert (E, out, r): column k E + e holds expert e's column k.
    auto interleave = [](const torch::Tensor& b_EOR) { return b_EOR.permute({1, 2, 0}).reshape({b_EOR.size(1), -1}).contiguous(); };
    const auto a1 = fp32(params[ours + "w1_lora_a"]), b1 = fp32(params[ours + "w1_lora_b"]);  // (E, D, r), (E, r, F)
    const auto a3 = fp32(params[ours + "w3_lora_a"]), b3 = fp32(params[ours + "w3_lora_b"]);
    const auto a2 = fp32(params[ours + "w2_lora_a"]), b2 = fp32(params[ours + "w2_lora_b"]);  // (E, F, r), (E, r, D)
    const int64_t F = b1.size(2);
    auto gate_up_a = torch::cat({a1.transpose(1, 2), a3.transpose(1, 2)}, 1).reshape({E * 2 * r, -1});  // (E 2r, D)
    auto gate_up_b = torch::zeros({E, 2 * F, 2 * r});
    gate_up_b.slice(1, 0, F).slice(2, 0, r).copy_(b1.transpose(1, 2));
    gate_up_b.slice(1, F, 2 * F).slice(2, r, 2 * r).copy_(b3.transpose(1, 2));
    // Nested wrappers, in target_parameters' order: the first (gate_up_proj) is the inner base_layer.
    tensors.emplace_back(module + "base_layer.lora_A.weight", gate_up_a.contiguous());
    tensors.emplace_back(module + "base_layer.lora_B.weight", interleave(gate_up_b));
    tensors.emplace_back(module + "lora_A.weight", a2.transpose(1, 2).reshape({E * r, -1}).contiguous());
    tensors.emplace_back(module + "lora_B.weight", interleave(b2.transpose(1, 2)));
  }
  if (tensors.empty()) throw HfError("--to peft: the model's adapters map to no " + std::string(t.model_type) + " module");
  if (skipped_mtp > 0)
    log_line("[convert] the adapters of " + std::to_string(skipped_mtp) +
             " multi-token prediction projections are not exported: transformers builds no MTP layers");

  Json config = Json::object();
  config["peft_type"] = "LORA";
  config["task_type"] = "CAUSAL_LM";
  config["base_model_name_or_path"] = base.empty() ? Json(nullptr) : Json(base);
  config["r"] = lora.rank;
  config["lora_alpha"] = lora.alpha;
  if (experts) parameters.insert(parameters.end(), {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"});
  // peft's adapters on parameters take no dropout (it cannot be factored out of the product).
  config["lora_dropout"] = parameters.empty() ? lora.dropout : 0.0;
  if (!parameters.empty() && lora.dropout > 0)
    log_line("[convert] peft's adapters on parameters (target_parameters: the MLPs' and experts') take no dropout: "
             "lora_dropout written as 0, not train.lora.dropout " + format_double(lora.dropout));
  config["target_modules"] = modules;
  config["target_parameters"] = parameters.empty() ? Json(nullptr) : Json(parameters);
  config["rank_pattern"] = experts ? Json{{"gate_up_proj", 2 * lora.rank}} : Json::object();
  config["alpha_pattern"] = experts ? Json{{"gate_up_proj", 2 * lora.alpha}} : Json::object();
  config["bias"] = "none";
  config["fan_in_fan_out"] = false;
  config["use_rslora"] = false;
  config["use_dora"] = false;
  config["init_lora_weights"] = true;
  config["inference_mode"] = true;
  config["modules_to_save"] = nullptr;

  std::string target = dir;
  while (target.size() > 1 && target.back() == '/') target.pop_back();
  if (files::exists(target) && !files::is_directory(target)) throw HfError(target + " exists and is not a folder");
  const std::string staging = target + ".partial-export";
  files::remove_tree(staging);
  files::make_directories(staging);
  try {
    try {
      ckpt::save_safetensors(files::join(staging, "adapter_model.safetensors"), tensors, {{"format", "pt"}});
    } catch (const CheckpointError& err) {
      throw HfError(std::string(err.what()).substr(7));
    }
    files::write_file_synced(files::join(staging, "adapter_config.json"), config.dump(2) + "\n");
    move_into_place(staging, target, {"adapter_model.safetensors", "adapter_config.json"});
  } catch (...) {
    try {
      files::remove_tree(staging);
    } catch (const Error&) {
    }
    throw;
  }
}

}  // namespace moetrain::hf
