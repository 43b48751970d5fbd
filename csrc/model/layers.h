// Transformer building blocks: RMSNorm, rotary position embedding (with YaRN), grouped-query attention
// (optional q/k/v biases and q/k norms) and multi-head latent attention.
// Legend: B batch, S sequence, D model dim, H query heads, G key/value heads, Hd head dim.
// Parameters stay in their storage dtype (fp32 master weights); `compute_dtype` (bf16 on the GPU)
// casts weights and activations for the matmuls, norms and softmax run in fp32.
#pragma once
#include <torch/torch.h>

#include <optional>

#include "common/tensor.h"
#include "config/config.h"
#include "moe/lora.h"

namespace moetrain::model {

using ComputeDtype = std::optional<torch::ScalarType>;
struct TokenLayout;

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int dim, double eps);
  torch::Tensor forward(const torch::Tensor& x) const;  // statistics in fp32, output in x's dtype
  torch::Tensor weight;  // (D)
  // train.activation_checkpointing: selective. Backward keeps only x (and the weight) and reruns the
  // same ops, where autograd would also keep the normalized x.
  bool recompute = false;
 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

// Rotary tables for positions [0, max_seq_len), rotate-half convention (as in Llama/Mixtral), with
// YaRN's frequency interpolation and cos/sin scaling when yarn.factor > 1. The tables may be narrower
// than the heads they rotate (partial RoPE, model.rotary_dim): the first Hd of each head turn, the rest pass.
struct Rope {
  torch::Tensor cos_SHd;  // (max_seq_len, Hd) fp32
  torch::Tensor sin_SHd;  // (max_seq_len, Hd) fp32
  // The tables as apply() reads them, in one dtype (the compute dtype): cos, and sin with rotate-half's
  // sign folded into its first half.
  torch::Tensor cos_cached, signed_sin_cached;  // (max_seq_len, Hd)
  static Rope make(int max_seq_len, int head_dim, double theta, torch::Device device,
                   const config::YarnConfig& yarn = {});
  // The same tables, cached in `dtype`.
  Rope cached_in(torch::ScalarType dtype) const;
  // x: (B, H, S, Hd), positions [offset, offset + S).
  torch::Tensor apply(const torch::Tensor& x, int64_t offset = 0) const;
  // x: (B, H, S, Hd) at the positions of `layout` (its packed documents' own, or [0, S)).
  torch::Tensor apply(const torch::Tensor& x, const TokenLayout& layout) const;
};

// Where the tokens of a batch sit. By default each row is one sequence: positions 0..S-1, each token
// attending to every earlier one. Packed documents (data.packing: documents) give each token its
// position in its own document: RoPE takes its angle from it, and a token attends only to the earlier
// tokens of its document. Two tokens i > j of a row share a document exactly when their positions
// differ by i - j (positions restart at 0 and count up by one), so the positions alone say it.
// Attention over packed documents: on CUDA in bf16 or fp16, flash attention's variable-length kernel
// (the wheel's _flash_attention_forward/backward) over the documents as one flattened batch, which
// never builds a mask; elsewhere (the CPU, fp32, a head dim flash cannot take, deterministic mode)
// SDPA with the block-diagonal causal mask.
struct TokenLayout {
  torch::Tensor positions_BS;  // int64 on the model's device; undefined: one sequence per row
  torch::Tensor mask_B1SS;     // bool, true where row token i may attend to token j (the mask path)
  // The variable-length path: where each document starts among the B * S flattened tokens, and the
  // end (int32, documents + 1, on the device), and the longest document. Undefined elsewhere.
  torch::Tensor cu_seqlens;
  int64_t max_length = 0;

  // positions_BS (host or device) for a model on `device`: undefined gives the default layout. With
  // varlen (CUDA, a 16-bit compute dtype) and host positions, the document table is made on the host
  // and copied without a wait, and the mask is made only if an attention cannot take the table.
  static TokenLayout packed(const torch::Tensor& positions_BS, torch::Device device = torch::kCPU, bool varlen = false);
  bool is_packed() const { return positions_BS.defined(); }
  // The first n tokens of each row (an MTP depth's window): always the mask path.
  TokenLayout first(int64_t n) const;
  // The mask, made from the positions when the layout was made without it.
  torch::Tensor mask() const;
  // Attention over (q, k, v) (B, heads, S, Hd): causal, or within documents. GQA's grouped heads are
  // read in place (enable_gqa); scale as SDPA takes it (unset: 1 / sqrt(Hd)). `window` > 0: query i
  // attends only to keys j > i - window (model.sliding_window); `sinks` (H) fp32: each head's sink
  // logit joins the softmax's denominator (model.attention_sinks).
  torch::Tensor attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                       std::optional<double> scale = std::nullopt, bool enable_gqa = false, int64_t window = 0,
                       const torch::Tensor& sinks = {}) const;
};

// One attention layer's share of a KV cache (incremental decoding, model/transformer.h KVCache),
// allocated by the layer on its first decode call for `DecodeStep::capacity` slots per row.
struct LayerCache {
  torch::Tensor k_BGCHd, v_BGCHd;  // GQA: (B, G, capacity, Hd), keys after q/k norm and RoPE
  torch::Tensor latent_BCR;        // MLA: (B, capacity, Rkv), the compressed latent after its norm
  torch::Tensor k_pe_BCP;          // MLA: (B, capacity, P), the shared RoPE key after RoPE
};

// Where one decode call's S new tokens go: cache slots [start, start + S) of every row, at RoPE
// positions positions_BS, each attending to the slots mask_B1SL allows (L = start + S).
struct DecodeStep {
  int64_t start = 0;
  int64_t capacity = 0;        // slots per row the cache is allocated with
  torch::Tensor positions_BS;  // int64
  torch::Tensor mask_B1SL;     // bool, true where the new token may attend to the slot
};

// Whether flash attention's variable-length kernel takes (q, k, v) here: CUDA, bf16 or fp16, one head
// dim for all three, a multiple of 8 up to 256, and flash enabled (run.deterministic turns it off).
bool varlen_flash_applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v);

// The largest pre-softmax logit of each query head, (H) fp32: q (B, H, S, Dq) against k (B, G, S, Dq)
// (H a multiple of G, consecutive query heads sharing a key head) times `scale`, over the pairs `layout`
// lets attend (causal; within their documents when packed; within `window` when > 0). No autograd; chunks
// of query rows keep the memory at O(B H chunk S). optim.qk_clip_tau (optim/qk_clip.h) tracks it in the
// training forward.
torch::Tensor max_logits(const torch::Tensor& q, const torch::Tensor& k, double scale, const TokenLayout& layout = {},
                         int64_t window = 0);

// Attention of q (B, H, S, Hd) over k, v (B, G, L, Hd) where bool mask_B1SL allows, with each head's sink
// logit (sinks (H), undefined: none) in the softmax's denominator; scale unset: 1 / sqrt(Hd). The masked
// path of TokenLayout::attend, and the KV-cache decode's.
torch::Tensor attend_masked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& mask_B1SL, std::optional<double> scale, const torch::Tensor& sinks);

class AttentionImpl : public torch::nn::Module {
 public:
  // `window`: this block's config::attention_window (0 = full causal attention).
  explicit AttentionImpl(const config::ModelConfig& cfg, int window = 0);
  torch::Tensor forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                        const TokenLayout& layout = {}) const;
  // The same for the new tokens of `step`, their keys and values written into `cache`, attending to
  // the cached ones: what forward() gives these tokens over the whole sequence, to fp32 rounding.
  torch::Tensor decode(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                       const DecodeStep& step, LayerCache& cache) const;

  torch::Tensor wq;  // (D, H*Hd)
  torch::Tensor wk;  // (D, G*Hd)
  torch::Tensor wv;  // (D, G*Hd)
  torch::Tensor wo;  // (H*Hd, D)
  torch::Tensor q_bias, k_bias, v_bias;  // (H*Hd), (G*Hd), (G*Hd); defined with model.attn_bias qkv or all
  torch::Tensor o_bias;                  // (D); defined with model.attn_bias all
  torch::Tensor sinks;                   // (H) fp32 logits; defined with model.attention_sinks
  // model.qk_norm: "head" normalizes each head over Hd (weights (Hd)); "full" the whole projection
  // (weights (H*Hd) and (G*Hd)); both before RoPE. Null with "none".
  RMSNorm q_norm{nullptr}, k_norm{nullptr};
  // train.lora: adapters of wq, wk, wv, wo (undefined where not targeted; moe/lora.h). Targets q, k, v
  // (kv: both), o.
  moe::LoraAdapter wq_lora, wk_lora, wv_lora, wo_lora;
  void add_lora(const config::LoraConfig& cfg);
  int n_heads() const { return n_heads_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return head_dim_; }
  int window() const { return window_; }
  // optim.qk_clip_tau > 0: each forward with grad mode on (training, not evaluation) folds its heads'
  // max_logits into max_logit_H, (H) fp32 on the device, until optim::take_max_logits takes it.
  bool track_max_logits = false;
  mutable torch::Tensor max_logit_H;

 private:
  int n_heads_, n_kv_heads_, head_dim_;
  int window_;
  std::string qk_norm_;
  // x (B, S, D) in the compute dtype -> (B, n, S, Hd): projection, optional bias, optional q/k norm.
  torch::Tensor heads(const torch::Tensor& x, const torch::Tensor& w, const moe::LoraAdapter& lora,
                      const torch::Tensor& bias, int n, const RMSNorm& norm, ComputeDtype compute_dtype) const;
  // The heads' output y (B, S, H*Hd) through wo (and o_bias) -> (B, S, D).
  torch::Tensor output(const torch::Tensor& y, ComputeDtype compute_dtype) const;
};
TORCH_MODULE(Attention);

// YaRN's attention scale m(s) = 0.1 s ln(factor) + 1 (1 for factor <= 1).
double yarn_mscale(double factor, double mscale);

// Multi-head latent attention (DeepSeek-V2/V3). Queries come from x (full rank, or through a rank-Rq
// latent and its norm); keys and values from a shared rank-Rkv latent and its norm; a P-dim RoPE key
// is shared by all heads. Legend adds: N = qk_nope_head_dim, P = qk_rope_head_dim, Vd = v_head_dim.
class MLAttentionImpl : public torch::nn::Module {
 public:
  explicit MLAttentionImpl(const config::ModelConfig& cfg);
  // `rope` has P dims.
  torch::Tensor forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                        const TokenLayout& layout = {}) const;
  // The new tokens of `step`: their latent and RoPE key are cached (not the full keys and values, as
  // DeepSeek's inference does). A decode step (one new token a row) attends to the cached latents with
  // wkv_b absorbed into the query and the output; a prefill expands them with wkv_b and uses SDPA.
  torch::Tensor decode(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                       const DecodeStep& step, LayerCache& cache) const;

  torch::Tensor wq;                   // (D, H*(N+P)); defined when model.mla.q_lora_rank = 0
  torch::Tensor wq_a;                 // (D, Rq)
  RMSNorm q_a_norm{nullptr};          // (Rq)
  torch::Tensor wq_b;                 // (Rq, H*(N+P))
  torch::Tensor wkv_a;                // (D, Rkv + P): the latent, then the shared RoPE key
  RMSNorm kv_a_norm{nullptr};         // (Rkv)
  torch::Tensor wkv_b;                // (Rkv, H*(N+Vd))
  torch::Tensor wo;                   // (H*Vd, D)
  // train.lora: adapters of the projections. Targets q (wq, or wq_a and wq_b), kv (wkv_a, wkv_b), o (wo).
  moe::LoraAdapter wq_lora, wq_a_lora, wq_b_lora, wkv_a_lora, wkv_b_lora, wo_lora;
  void add_lora(const config::LoraConfig& cfg);
  int n_heads() const { return n_heads_; }
  int nope_dim() const { return nope_dim_; }
  int rope_dim() const { return rope_dim_; }
  int v_dim() const { return v_dim_; }
  double softmax_scale() const { return softmax_scale_; }
  // As AttentionImpl's: the logits of the whole query and key (nope and rope parts) with the softmax scale.
  bool track_max_logits = false;
  mutable torch::Tensor max_logit_H;

 private:
  int n_heads_, nope_dim_, rope_dim_, v_dim_, kv_rank_;
  double softmax_scale_;
};
TORCH_MODULE(MLAttention);

}  // namespace moetrain::model
