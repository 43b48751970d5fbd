// The decoder-only MoE transformer: embedding -> blocks (attention + dense MLP or MoE) -> norm -> LM head.
// Legend: B batch, S sequence, D model dim, V vocabulary, E routed experts.
#pragma once
#include <torch/torch.h>

#include <string>
#include <vector>

#include "config/config.h"
#include "model/layers.h"
#include "moe/moe.h"

namespace moetrain::model {

struct BlockOutput {
  torch::Tensor x_BSD;
  std::optional<moe::MoEOutput> moe;  // the MoE layer's losses and statistics; empty for dense blocks
};

class BlockImpl : public torch::nn::Module {
 public:
  // `layer`: the block's global index (MTP depth k: n_layers + k - 1), which picks its attention window.
  BlockImpl(const config::ModelConfig& cfg, bool is_moe, moe::ExpertShard shard = {}, int layer = 0);
  BlockOutput forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                      const TokenLayout& layout = {}) const;
  // The new tokens of `step` through the block, attention reading and extending `cache` (generation).
  torch::Tensor decode(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                       const DecodeStep& step, LayerCache& cache) const;

  RMSNorm attn_norm{nullptr}, ffn_norm{nullptr};
  Attention attn{nullptr};   // model.attention = gqa
  MLAttention mla{nullptr};  // model.attention = mla (registered as "attn" too)
  moe::SwiGLU mlp{nullptr};  // dense blocks
  moe::MoE moe{nullptr};     // MoE blocks
  // model.moe.shared_gate (Qwen2-MoE): the block runs the shared experts itself, scaled per token by
  // sigmoid(h . shared_gate); both are registered under `moe` so names match the ungated layout.
  moe::SwiGLU gated_shared{nullptr};
  torch::Tensor shared_gate;  // (D)

 private:
  // The residual attention output x_BSD through ffn_norm and the MLP or MoE, added back.
  BlockOutput feed_forward(const torch::Tensor& x_BSD, ComputeDtype compute_dtype) const;
};
TORCH_MODULE(Block);

// One multi-token prediction module (DeepSeek-V3 report, section 2.2): depth k combines the previous
// depth's hidden state h (the main model's last block output, before the final norm, at k = 1) with the
// embedding of token i+k, runs one block and predicts token i+k+1 through its own norm (HF's
// shared_head.norm) and the model's LM head: h'_i = eh_proj [enorm(Emb(t_{i+k})); hnorm(h_i)].
class MTPModuleImpl : public torch::nn::Module {
 public:
  MTPModuleImpl(const config::ModelConfig& cfg, moe::ExpertShard shard, int depth = 1);
  RMSNorm enorm{nullptr}, hnorm{nullptr};
  torch::Tensor eh_proj;   // (2D, D): the embedding's half first, as DeepSeek's checkpoints store it
  Block block{nullptr};    // MoE when the model has MoE layers, else dense
  RMSNorm norm{nullptr};   // before the shared LM head
};
TORCH_MODULE(MTPModule);

struct ForwardOutput {
  torch::Tensor logits_BSV;                    // fp32; undefined from forward_hidden
  torch::Tensor hidden_BSD;                    // the final norm's output (forward_hidden only)
  torch::Tensor loss;                          // () fp32 next-token loss (forward_loss only)
  torch::Tensor balance_loss;                  // () fp32: sum over MoE layers of their weighted losses
  std::vector<moe::RouterStats> moe_stats;     // one per MoE layer, in layer order
  std::vector<int> moe_layers;                 // the block index of each entry of moe_stats (MTP depth k's
                                               // block is n_layers + k - 1, as HF numbers it)
  // model.mtp_depth > 0, the last stage, and forward_loss/forward_stage asked for it:
  torch::Tensor mtp_loss;                      // () fp32 model.mtp_loss_weight * mean over depths of mtp_losses
  std::vector<torch::Tensor> mtp_losses;       // () fp32 per depth: cross-entropy of token i+k+1 (mean or sum)
};

// The keys and values of every block for incremental decoding (train::generate): `capacity` slots per
// row, each block's share allocated on the first decode() call. Rows may be left-padded: row b's
// tokens start at slot start_B[b], its positions count from 0 there, and its padding is never attended
// to (a pad slot attends only to itself, so that no row is all masked).
struct KVCache {
  std::vector<LayerCache> layers;  // one per block
  int64_t capacity = 0;
  int64_t length = 0;              // slots filled in every row
  torch::Tensor start_B;           // int64 on the model's device
};

// What a parameter is to a parallel layout (csrc/dist reads it; the model only says it).
enum class ParamRole {
  replicated,  // every rank holds all of it
  expert,      // a routed expert's stacked weights: sharded over the experts' ranks
};
struct RoledParam {
  std::string name;
  torch::Tensor tensor;
  ParamRole role = ParamRole::replicated;
  // A tied embedding held by two pipeline stages (the first looks tokens up, the last is its head):
  // its two gradients are summed between the stages. The last stage's copy is `duplicate`: it is not
  // counted twice in the gradient norm nor written twice to checkpoints.
  bool tied_across_stages = false;
  bool duplicate = false;
  // Every use casts it to the compute dtype (the matmul weights). Norm and router weights (their math
  // is fp32) and the embedding (looked up in fp32) are not: under bf16 only these may be held in bf16,
  // their fp32 master weights kept by the optimizer (ZeRO-1, dist/optimizer.h).
  bool compute_dtype_only = true;
  // A hidden layer's weight matrix (attention and MLP projections, MTP's projection; routed experts'
  // stacked (E, in, out), each expert a matrix): optim.name muon orthogonalises its update. Not the
  // embedding, LM head, norms, biases, routers, gates or LoRA adapters (AdamW's, optim/muon.h).
  bool hidden_matrix = false;
  // Where a weight's columns hold several logical matrices: `column_heads` repeats of blocks of these
  // widths, matrix p gathering block p of every head (MLA's wkv_b, (kv_rank, H * (nope + v)): heads H,
  // widths {nope, v}). Empty: one matrix.
  std::vector<int64_t> column_widths;
  int64_t column_heads = 1;
};

// The blocks one pipeline stage holds, [first, end) of model.n_layers (end -1: all of them). The first
// stage also holds the embedding; the last the final norm and the LM head (a tied head is the
// embedding again, so the first and last stages both hold `embed`). The whole model is one stage.
struct LayerRange {
  int first = 0, end = -1;
};

struct ParamCounts {
  int64_t total = 0;   // every parameter (a tied head counted once)
  int64_t active = 0;  // used per token: routed experts count top_k of n_experts
};

class TransformerImpl : public torch::nn::Module {
 public:
  // MoE layers hold the routed experts of `shard` (all of them by default). The model is single-device
  // math: a sharded model runs once a parallel layout has installed its dispatchers (dist::parallelize).
  // A pipeline stage holds only the blocks of `range` (with their global names, "layers.<i>.") and
  // the ends that belong to it.
  explicit TransformerImpl(const config::ModelConfig& cfg, moe::ExpertShard shard = {}, LayerRange range = {});
  // positions_BS (optional, (B, S) int64, on the host or the model's device): each token's position in
  // its packed document (data.packing: documents; see TokenLayout): RoPE restarts and attention stays
  // within each document. On CUDA, host positions let the flash path's document table be made without
  // a wait.
  ForwardOutput forward(const torch::Tensor& tokens_BS, const torch::Tensor& positions_BS = {}) const;
  // The same up to the final norm: hidden_BSD instead of logits, for a loss that never holds them all.
  ForwardOutput forward_hidden(const torch::Tensor& tokens_BS, const torch::Tensor& positions_BS = {}) const;
  // An empty cache for `batch` rows of up to `capacity` tokens (at most model.max_seq_len), row b's
  // first start_B[b] slots being left padding (undefined: none).
  KVCache new_cache(int64_t batch, int64_t capacity, const std::vector<int64_t>& start_B = {}) const;
  // Incremental decoding: tokens_BS go into the cache's next S slots (the prompt, then one token at a
  // time), and the fp32 logits (B, V) of each row's last token come back, as forward() gives them for
  // the whole sequence so far. MTP modules take no part; MoE layers route the new tokens as forward does.
  torch::Tensor decode(const torch::Tensor& tokens_BS, KVCache& cache) const;
  // forward() and the next-token loss against targets_BS (token_cross_entropy: the mean over the
  // targets that are not ignore_index, or with sum their sum). With a loss chunk set, the LM head and
  // the loss run over that many tokens at a time (chunked_loss) and logits_BSV stays undefined.
  // With MTP modules (model.mtp_depth) and with_mtp, also their losses (mtp_loss, mtp_losses); evaluation
  // and generation leave them out. With packed documents (positions_BS), MTP depth k predicts token
  // i+k+1 only where it is in token i's document.
  ForwardOutput forward_loss(const torch::Tensor& tokens_BS, const torch::Tensor& targets_BS, int64_t ignore_index,
                             bool sum = false, bool with_mtp = true, const torch::Tensor& positions_BS = {}) const;
  // One pipeline stage's share of forward_loss: from the tokens (the first stage) or the previous
  // stage's activations x_BSD, through this stage's blocks; the last stage then takes the final norm,
  // the head and the loss against targets_BS (as forward_loss, logits never kept), the others return
  // their output activations in hidden_BSD. The whole model as one stage is forward_loss.
  // The MTP modules live on the last stage and need the tokens there: tokens_BS (the first stage's
  // input is the tokens already).
  // Every stage takes the batch's positions_BS (packed documents), as forward_loss.
  ForwardOutput forward_stage(const torch::Tensor& input, const torch::Tensor& targets_BS, int64_t ignore_index,
                              bool sum = false, bool with_mtp = true, const torch::Tensor& tokens_BS = {},
                              const torch::Tensor& positions_BS = {}) const;
  bool first_stage() const { return range_.first == 0; }
  bool last_stage() const { return range_.end == cfg_.n_layers; }
  LayerRange layer_range() const { return range_; }
  // Whether a checkpoint tensor name belongs to a part of the model another pipeline stage holds
  // (a block outside this stage's range, or an end this stage lacks): a stage loads only its own.
  bool held_by_another_stage(const std::string& name) const;
  // train.loss_chunk_tokens: 0 = the full logits.
  void set_loss_chunk(int64_t tokens) { loss_chunk_ = tokens; }
  // train.activation_checkpointing: "full" = while gradients are recorded, each block keeps only its
  // input and is recomputed in backward (see CheckpointedBlock in transformer.cpp); "selective" = the
  // matmul and attention outputs are kept and the cheap element-wise work (every RMSNorm, SwiGLU's
  // silu(gate) * up) is recomputed in backward; "none" keeps everything.
  void set_activation_checkpointing(const std::string& mode);
  // Next-token cross-entropy of the LM head over hidden_ND (N, D) against targets_N, as
  // token_cross_entropy of the full logits would give it (mean over kept targets, or their sum), but
  // computed over `chunk` rows at a time, forward and backward: at most chunk x V logits exist at
  // once, where a full (tokens x vocab) fp32 tensor would (train.loss_chunk_tokens).
  torch::Tensor chunked_loss(const torch::Tensor& hidden_ND, const torch::Tensor& targets_N, int64_t ignore_index,
                             int64_t chunk, bool sum = false) const;

  // Initial weights as a function of (seed, parameter name, global expert id) only, generated on the
  // CPU in fp32: the same start on any device and any later parallel layout. model.init_from is not the
  // model's business: the trainer loads those weights over these (hf::load_init_from).
  void init_weights(uint64_t seed);
  // Aux-loss-free balancing after an optimizer step: load_LE[i] is MoE layer i's tokens_per_expert
  // summed over the step's micro-batches.
  void update_router_bias(const std::vector<torch::Tensor>& load_LE);
  // Moves parameters to `device`; `compute_dtype` bf16 keeps fp32 master weights, computes in bf16.
  void place(torch::Device device, ComputeDtype compute_dtype);
  ParamCounts param_counts() const;  // of the whole model, whatever this rank holds
  // named_parameters() with what each is to a parallel layout: the routed experts' stacked weights
  // (those of every MoE layer's `experts` module) are ParamRole::expert, the rest replicated. The
  // structure says so, not the names.
  std::vector<RoledParam> roled_parameters() const;
  // The same, less the frozen ones (requires_grad false: a LoRA run's base): what the gradient
  // reduction, the optimizer, the gradient norm and the checkpoints see.
  std::vector<RoledParam> trainable_parameters() const;
  // train.lora (rank > 0): adds adapters to the weights of cfg.targets in every block (and MTP block)
  // this rank holds, seeded as init_weights seeds (init_lora), and freezes every other parameter. After
  // init_weights and any init_from load, before place(), which then holds the frozen matmul weights in
  // the compute dtype. Throws when the targets match no weight here.
  void add_lora(const config::LoraConfig& cfg, uint64_t seed);
  // The adapters' initial values as a function of (seed, name, global expert id): A uniform in
  // +-1/sqrt(in) (PEFT's Kaiming default), B zero, so that the adapted model starts as its base.
  void init_lora(uint64_t seed);
  bool lora_enabled() const { return lora_.rank > 0; }
  uint64_t lora_seed() const { return lora_seed_; }  // add_lora's seed (the base's too without init_from)
  const config::LoraConfig& lora_config() const { return lora_; }
  // Global id of this rank's first routed expert and how many it holds (all of them without EP).
  int64_t expert_offset() const { return expert_offset_; }
  int64_t local_experts() const;
  const config::ModelConfig& config() const { return cfg_; }
  ComputeDtype compute_dtype() const { return compute_dtype_; }
  void set_compute_dtype(ComputeDtype dtype) {
    compute_dtype_ = dtype;
    rope_ = rope_.cached_in(dtype.value_or(torch::kFloat));
  }

  torch::Tensor embed;    // (V, D); undefined on a pipeline stage that neither looks up, ties the head nor runs MTP
  torch::Tensor lm_head;  // (V, D); undefined when tied to embed, or off the last stage
  std::shared_ptr<torch::nn::Module> layers;  // this stage's blocks, registered as "<global index>"
  std::vector<Block> blocks;                  // the same, in order
  RMSNorm final_norm{nullptr};                // the last stage only
  std::shared_ptr<torch::nn::Module> mtp;     // the last stage's MTP modules, registered as "<k - 1>"
  std::vector<MTPModule> mtp_modules;         // the same, depth 1 first

 private:
  config::ModelConfig cfg_;
  int64_t expert_offset_ = 0;
  int ep_size_ = 1;
  Rope rope_;
  ComputeDtype compute_dtype_;
  int64_t loss_chunk_ = 0;
  bool activation_checkpointing_ = false;
  LayerRange range_;
  config::LoraConfig lora_;  // rank 0 until add_lora
  uint64_t lora_seed_ = 0;
  torch::Tensor embed_tokens(const torch::Tensor& tokens_BS) const;
  // The batch's TokenLayout on `device`: the variable-length flash path under a 16-bit compute dtype.
  TokenLayout layout_of(const torch::Tensor& positions_BS, torch::Device device) const;
  // The blocks from x_BSD on, their balance losses and router statistics added to `out`.
  torch::Tensor run_blocks(torch::Tensor x_BSD, const TokenLayout& layout, ForwardOutput& out) const;
  // The final norm, the head and the loss (chunked or over full logits) of the last stage.
  void head_and_loss(const torch::Tensor& x_BSD, const torch::Tensor& targets_BS, int64_t ignore_index, bool sum,
                     ForwardOutput& out) const;
  // The MTP modules from the last block's output x_BSD: their losses, balance losses and statistics.
  void mtp_losses(const torch::Tensor& x_BSD, const torch::Tensor& tokens_BS, const torch::Tensor& targets_BS,
                  int64_t ignore_index, bool sum, const TokenLayout& layout, ForwardOutput& out) const;
  // The LM head's summed cross-entropy over normed hidden_ND against targets_N (chunked or not).
  torch::Tensor head_loss_sum(const torch::Tensor& hidden_ND, const torch::Tensor& targets_N, int64_t ignore_index) const;
  void add_moe(const BlockOutput& block, int layer, ForwardOutput& out) const;
  BlockOutput checkpointed(const BlockImpl& block, const torch::Tensor& x_BSD, const Rope& rope,
                           ComputeDtype compute_dtype, const TokenLayout& layout) const;
};
TORCH_MODULE(Transformer);

// Writes into `merged`, a model of the same config and shard without adapters, the weights of `adapted`
// with each adapter folded in, W + (alpha / rank) A B (per expert for stacked experts), computed in fp32,
// and its buffers: a plain model that computes what the adapted one does (convert --merge-lora).
void merge_lora(const TransformerImpl& adapted, TransformerImpl& merged);

// The MTP module (0-based: depth k is k - 1) a parameter name belongs to ("mtp.<k-1>."), or -1.
int mtp_module_of(const std::string& param_name);

// Parameters excluded from weight decay: norms, biases, attention sinks and embeddings.
bool is_no_decay(const std::string& param_name);

// Next-token cross-entropy of (N, V) fp32 logits against (N,) targets, over the targets that are
// not ignore_index: their mean, or with sum = true their sum. The one loss of training, `train`'s
// validation and `eval`. Under LibTorch's deterministic mode (run.deterministic) it avoids NLLLoss,
// which has no deterministic CUDA kernel: each row's log-probability is gathered (its backward writes
// one value per row, no collisions) and reduced by a plain sum. Both agree to fp32 rounding.
torch::Tensor token_cross_entropy(const torch::Tensor& logits_NV, const torch::Tensor& targets_N, int64_t ignore_index,
                                  bool sum = false);

}  // namespace moetrain::model
