// Hugging Face checkpoints in and out: config.json <-> our ModelConfig per family, and the family's
// tensor names <-> our parameter names. Import streams tensor by tensor from the safetensors shards
// into the model (never a second copy of the model); export writes shards of a bounded size.
// Families: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3 (MLA, also without the query low-rank),
// DeepSeek-V2 and V2-Lite (MLA, softmax routing, greedy or group-limited by each group's best expert),
// GLM-4.5 and GLM-4.5-Air (GQA with partial RoPE and q/k/v biases, DeepSeek-V3's routing, MTP layers),
// gpt-oss (attention sinks and biases, sliding windows, YaRN, clamped SwiGLU experts with biases stored
// stacked, MXFP4 on import).
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include "common/errors.h"
#include "config/config.h"
#include "model/transformer.h"

namespace moetrain::hf {

struct HfError : Error {
  explicit HfError(const std::string& m) : Error("[hf] " + m) {}
};

enum class Family { Mixtral, Qwen2Moe, Qwen3Moe, Olmoe, DeepseekV3, DeepseekV2, Glm4Moe, GptOss };

// mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v3 | deepseek_v2 | glm4_moe | gpt_oss (HF's model_type)
std::string family_name(Family family);
// The model_type of every family, comma-separated: what --family and error messages list.
std::string family_names();
Family family_from_name(const std::string& name);  // throws HfError listing the names

// "hf:DIR" -> true; hf_dir("hf:DIR") = "DIR".
bool is_hf_path(const std::string& path);
std::string hf_dir(const std::string& path);

struct HfConfig {
  Family family;
  config::ModelConfig model;  // the architecture keys set from config.json, the rest at their defaults
  std::vector<std::string> warnings;  // what read_config also logged: fields that disagree but load
};

// Reads DIR/config.json. An unknown architecture, a missing field or a value we cannot express is an
// HfError naming the file and the field. The family is architectures[0] (model_type where that is
// absent); a model_type naming another family is logged as a warning that names both.
HfConfig read_config(const std::string& dir);

// Sets the architecture keys of `model` from `hf` and leaves the training keys (balancing
// coefficients, capacity, experts_impl, init_std, init_from) as they are.
void apply_architecture(const config::ModelConfig& hf, config::ModelConfig& model);

// For `model.init_from: hf:DIR`: the config with its model architecture taken from DIR/config.json,
// data.seq_len clamped to the model's context, validated. Returns cfg unchanged when init_from is "".
config::Config resolve_init_from(const config::Config& cfg);

// Where each tensor of DIR lives (tensor name -> shard file name): model.safetensors.index.json's
// weight_map, whose shards must exist, else model.safetensors's header. Bad input is an HfError.
std::map<std::string, std::string> read_weight_map(const std::string& dir);

// Streams the weights of DIR (model.safetensors.index.json and its shards, or model.safetensors)
// into `model`, whose config must be the one read_config(DIR) gave. Routed experts may be stored per
// expert or stacked, as transformers 5 holds them (see ExpertLayout), layer by layer. bf16, fp16 and fp32 inputs are
// converted to the parameters' dtype. A missing shard or tensor, a wrong shape or a tensor that maps
// to no parameter is an HfError naming the file and the tensor.
void load_weights(const std::string& dir, Family family, model::TransformerImpl& model);

// A model built from DIR's config.json with DIR's weights, on the CPU in fp32. Its MTP depth is the
// number of MTP layers the shards hold (at most num_nextn_predict_layers), so none starts untrained.
struct LoadedHf {
  HfConfig hf;
  model::Transformer model{nullptr};
};
LoadedHf load(const std::string& dir);

// The family a model of this config exports to: mla -> deepseek_v3 (softmax: deepseek_v2), partial
// RoPE or sigmoid routing -> glm4_moe, qk_norm head -> qwen3_moe, full -> olmoe, attention biases or a
// gated shared expert -> qwen2_moe, otherwise mixtral.
Family infer_family(const config::ModelConfig& model);

// Writes DIR/config.json (the family's architecture and field names), DIR/model-XXXXX-of-YYYYY.safetensors
// shards of at most max_shard_bytes each (a larger tensor gets a shard of its own) and
// DIR/model.safetensors.index.json. Throws HfError if the model has a feature the family lacks.
// The files are written into DIR.partial-export and moved into DIR once complete, so an error leaves
// DIR as it was. Into a DIR that holds files, they replace config.json and the model*.safetensors
// weights (and their index) and keep the rest: whether that is allowed is the caller's call.
// How an export stores routed experts: one tensor per expert and projection, as every family's published
// checkpoints do (experts.<e>.gate_proj.weight ...), or transformers 5's stacked layout
// (mlp.experts.gate_up_proj (E, 2F, D) and mlp.experts.down_proj (E, D, F); Mixtral's block_sparse_moe
// becomes mlp), which save_pretrained(save_original_format=False) writes. load_weights reads both.
enum class ExpertLayout { PerExpert, Packed };
ExpertLayout expert_layout_from_name(const std::string& name);  // per-expert | packed; UsageError otherwise

void export_model(const model::TransformerImpl& model, Family family, const std::string& dir,
                  uint64_t max_shard_bytes = 2'000'000'000ull, ExpertLayout expert_layout = ExpertLayout::PerExpert);

// MXFP4 (OCP Microscaling, as gpt-oss publishes its experts): `blocks` (..., G, B) uint8 holds G
// blocks of 2B four-bit E2M1 values per row, two a byte, low nibble first; `scales` (..., G) uint8 one
// E8M0 exponent per block (2^(s - 127)). Returns the values as fp32, (..., G * 2B): exact, as every
// E2M1 value times a power of two in fp32's range is. A shape mismatch, or the scale 255 (NaN in the
// format), is an HfError naming `what`.
torch::Tensor dequantize_mxfp4(const torch::Tensor& blocks, const torch::Tensor& scales, const std::string& what);

// "peft:DIR" -> true; peft_dir("peft:DIR") = "DIR".
bool is_peft_path(const std::string& path);
std::string peft_dir(const std::string& path);

// Writes a LoRA model's adapters as a PEFT adapter folder for `family`'s transformers model:
// DIR/adapter_config.json and DIR/adapter_model.safetensors (fp32), which peft loads onto the base
// (`base`, written as base_model_name_or_path). Attention adapters target their Linear modules by full
// name; the dense MLPs' and shared experts' target their Linears' weights, and routed experts'
// transformers 5's stacked experts.gate_up_proj and experts.down_proj, as peft's target_parameters
// (gate and up together as one adapter of twice the rank). Adapters of MTP layers, which transformers does not build,
// are left out (logged). Staged like export_model: an error leaves DIR as it was.
void export_peft(const model::TransformerImpl& model, Family family, const std::string& dir, const std::string& base);

// `model.init_from: hf:DIR`: streams DIR's weights into `model` (built from the config that
// resolve_init_from gave), over its seeded initial weights.
void load_init_from(model::TransformerImpl& model, const std::string& init_from);

}  // namespace moetrain::hf
