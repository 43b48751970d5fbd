// Config loading: one descriptor table (key path, type, field accessor, meaning, allowed range)
// drives YAML parsing, --set overrides, validation, to_yaml, flatten and the reference docs, so a
// key is declared exactly once.
#include "config/config.h"

#include <yaml-cpp/depthguard.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <variant>

#include "common/errors.h"
#include "common/files.h"

namespace moetrain::config {

namespace {

// ---------------------------------------------------------------------------------------------
// The descriptor table.

// The most blocks a model may have: plan, cost and the pipeline split work block by block, and no
// real model comes near it (DeepSeek-V3 has 61).
constexpr int kMaxLayers = 100000;

// Accessors return a reference to the field; the variant alternative is the key's value type.
using Field = std::variant<int& (*)(Config&), uint64_t& (*)(Config&), double& (*)(Config&),
                           bool& (*)(Config&), std::string& (*)(Config&), std::optional<double>& (*)(Config&),
                           std::vector<DataSource>& (*)(Config&), std::vector<std::string>& (*)(Config&)>;
enum FieldKind { kInt = 0, kUInt64, kDouble, kBool, kString, kOptDouble, kSources, kStrings };

// What a single value may be, independent of other keys (relations live in validate()).
struct Allowed {
  std::optional<double> lo, hi;
  bool lo_open = false, hi_open = false;
  std::vector<std::string> one_of;  // non-empty: an enum string
  bool repeats = false;             // lists only: an item may appear more than once
  bool non_empty = false;           // strings only
};

Allowed any() { return {}; }
Allowed at_least(double lo) {
  Allowed a;
  a.lo = lo;
  return a;
}
Allowed above(double lo) {
  Allowed a = at_least(lo);
  a.lo_open = true;
  return a;
}
Allowed above_to(double lo, double hi) {
  Allowed a = above(lo);
  a.hi = hi;
  return a;
}
Allowed in_half_open(double lo, double hi) {
  Allowed a = at_least(lo);
  a.hi = hi;
  a.hi_open = true;
  return a;
}
Allowed from_to(double lo, double hi) {
  Allowed a = at_least(lo);
  a.hi = hi;
  return a;
}
Allowed one_of(std::vector<std::string> values) {
  Allowed a;
  a.one_of = std::move(values);
  return a;
}
// A list whose every item is one of `values` (kStrings keys).
Allowed each_of(std::vector<std::string> values) { return one_of(std::move(values)); }
// The same where an item may repeat (a per-layer pattern).
Allowed each_of_repeating(std::vector<std::string> values) {
  Allowed a = one_of(std::move(values));
  a.repeats = true;
  return a;
}
Allowed non_empty() {
  Allowed a;
  a.non_empty = true;
  return a;
}

struct KeyDesc {
  std::string path;
  Field field;
  std::string meaning;
  Allowed allowed;
};

// The path text and the accessor come from the same tokens, so they cannot disagree.
#define MOETRAIN_KEY(path, meaning, allowed) \
  KeyDesc { #path, Field(+[](Config& c) -> auto& { return c.path; }), meaning, allowed }

// Keys of one section are contiguous and in struct declaration order (to_yaml relies on the former).
const std::vector<KeyDesc>& keys() {
  static const std::vector<KeyDesc> table = {
      MOETRAIN_KEY(run.name, "Name of the run, shown in logs and summaries.", non_empty()),
      MOETRAIN_KEY(run.out_dir, "Output directory of the run (checkpoints, logs).", non_empty()),
      MOETRAIN_KEY(run.seed, "Random seed for initialization, data order and sampling; any 64-bit unsigned value.",
                   any()),
      MOETRAIN_KEY(run.device, "Device to train on.", one_of({"cpu", "cuda"})),
      MOETRAIN_KEY(run.dtype, "Compute dtype of matmuls and activations; weights and optimizer state stay fp32 (bf16 is mixed precision with fp32 master weights). Router math always runs in fp32.",
                   one_of({"fp32", "bf16"})),
      MOETRAIN_KEY(run.threads, "CPU intra-op threads; 0 = OMP_NUM_THREADS if a launcher set it, else cores / ranks on this node.", at_least(0)),
      MOETRAIN_KEY(run.deterministic,
                   "Deterministic kernels only: LibTorch's deterministic mode (an op without a deterministic "
                   "kernel is an error), cuBLAS's fixed workspace, SDPA's math backend on CUDA, and the MoE's "
                   "dispatch, combine and loss without atomic adds. CPU runs are bit-exact without it; on a GPU "
                   "it makes reruns and resumes bit-exact at some cost in speed.",
                   any()),
      MOETRAIN_KEY(run.keep_compute_copies,
                   "Under dtype bf16: cast each weight once per update and keep the copy for every use until the "
                   "next (2 bytes per parameter held all along); false = cast at every use, each copy living only "
                   "while autograd needs it (with full activation checkpointing, one block's at a time). The "
                   "results are the same bit for bit.",
                   any()),

      MOETRAIN_KEY(model.vocab_size, "Vocabulary size: rows of the token embedding (and of the LM head).",
                   at_least(2)),
      MOETRAIN_KEY(model.d_model, "Width of the residual stream.", at_least(1)),
      MOETRAIN_KEY(model.n_layers,
                   "Number of transformer blocks (plan, cost and the pipeline split work block by block).",
                   from_to(1, kMaxLayers)),
      MOETRAIN_KEY(model.n_heads, "Attention (query) heads per block.", at_least(1)),
      MOETRAIN_KEY(model.n_kv_heads, "Key/value heads for grouped-query attention; must divide model.n_heads.",
                   at_least(1)),
      MOETRAIN_KEY(model.head_dim,
                   "Dimension of each attention head; 0 = model.d_model / model.n_heads (which must then "
                   "divide evenly). Must be even for RoPE.",
                   at_least(0)),
      MOETRAIN_KEY(model.attention,
                   "Attention: gqa (grouped-query, model.n_kv_heads) or mla (DeepSeek's multi-head latent "
                   "attention, model.mla.*; model.n_kv_heads and model.head_dim are then unused).",
                   one_of({"gqa", "mla"})),
      MOETRAIN_KEY(model.attn_bias,
                   "Biases of the GQA projections: none; qkv = on the q, k and v projections (Qwen2-MoE, GLM-4.5); "
                   "all = on the output projection too.",
                   one_of({"none", "qkv", "all"})),
      MOETRAIN_KEY(model.qk_norm,
                   "RMSNorm on queries and keys before RoPE: none; head = over each head's dimensions "
                   "(Qwen3-MoE); full = over the whole q and k projections (OLMoE).",
                   one_of({"none", "head", "full"})),
      MOETRAIN_KEY(model.rotary_dim,
                   "GQA's partial RoPE: only the first rotary_dim dims of each query and key head are rotated "
                   "(rotate-half within them; GLM-4.5: half the head), the rest pass unrotated; 0 = the whole "
                   "head. Even, at most the head dim.",
                   at_least(0)),
      MOETRAIN_KEY(model.attention_sinks,
                   "GQA attention sinks (gpt-oss): a learned logit per query head (parameter layers.N.attn.sinks, "
                   "initialized to 0) joins each query's softmax denominator with no value, so a head may attend "
                   "to nothing. Not with model.attention = mla.",
                   any()),
      MOETRAIN_KEY(model.sliding_window,
                   "GQA sliding-window attention: in a sliding layer (model.layer_types) query i attends to keys j "
                   "with i - sliding_window < j <= i (within its document when packed); 0 = every layer full.",
                   at_least(0)),
      MOETRAIN_KEY(model.layer_types,
                   "Attention of each block, cycled over model.n_layers when shorter (gpt-oss: [sliding, full]; "
                   "MTP depth k is block n_layers + k - 1); its length must divide model.n_layers. Empty = every "
                   "block sliding when model.sliding_window > 0.",
                   each_of_repeating({"sliding", "full"})),
      MOETRAIN_KEY(model.max_seq_len, "Longest context: the length of the RoPE table.", at_least(1)),
      MOETRAIN_KEY(model.dense_layers,
                   "The first dense_layers blocks use a dense SwiGLU MLP, the rest MoE; at most model.n_layers.",
                   at_least(0)),
      MOETRAIN_KEY(model.dense_hidden, "Hidden size of the dense SwiGLU MLP.", at_least(1)),
      MOETRAIN_KEY(model.rope_theta, "RoPE base frequency.", above(0)),
      MOETRAIN_KEY(model.norm_eps, "Epsilon added inside the normalization layers.", above(0)),
      MOETRAIN_KEY(model.tie_embeddings, "The LM head shares the token embedding matrix.", any()),
      MOETRAIN_KEY(model.init_std,
                   "Standard deviation of the normal weight initialization (at most 1: a larger scale overflows "
                   "the activations before the first step).",
                   above_to(0, 1)),
      MOETRAIN_KEY(model.mtp_depth,
                   "Multi-token prediction depth (DeepSeek-V3): module k (1..D) joins the previous depth's hidden "
                   "state with the embedding of token i+k, runs one block (MoE when the model has MoE layers) and "
                   "predicts token i+k+1 through its own norm and the shared LM head; trained with the loss "
                   "model.mtp_loss_weight adds. Lives on the last pipeline stage; generation uses the main model "
                   "only, `eval` reports the main loss (and each depth's with --mtp). 0 = off.",
                   at_least(0)),
      MOETRAIN_KEY(model.mtp_loss_weight,
                   "lambda: the training loss adds lambda times the mean over the MTP depths of their "
                   "cross-entropies (DeepSeek-V3 used 0.3 for its first 10T tokens, then 0.1).",
                   at_least(0)),
      MOETRAIN_KEY(model.init_from,
                   "Initial weights: \"\" = the seeded random init; hf:DIR = a Hugging Face folder (config.json "
                   "and safetensors of a family `moetrain convert --help` lists), whose config.json then sets the "
                   "architecture keys of model.* (training keys such as the balancing coefficients stay); "
                   "ckpt:DIR = the weights of a moetrain run or checkpoint of this same architecture (an SFT run "
                   "before `moetrain rl`).",
                   any()),

      MOETRAIN_KEY(model.mla.q_lora_rank,
                   "MLA: rank of the query down-projection (wq_a, then a norm and wq_b); 0 = one full-rank wq.",
                   at_least(0)),
      MOETRAIN_KEY(model.mla.kv_lora_rank,
                   "MLA: rank of the joint key/value latent (wkv_a down, wkv_b up; the latent is what is cached).",
                   at_least(1)),
      MOETRAIN_KEY(model.mla.qk_nope_head_dim, "MLA: per-head query/key dimensions without RoPE.", at_least(1)),
      MOETRAIN_KEY(model.mla.qk_rope_head_dim,
                   "MLA: per-head query/key dimensions with RoPE (the key part is shared by all heads); even.",
                   at_least(1)),
      MOETRAIN_KEY(model.mla.v_head_dim, "MLA: per-head value dimensions.", at_least(1)),

      MOETRAIN_KEY(model.yarn.factor,
                   "YaRN context extension (DeepSeek-V3): how many times the pretraining context the RoPE "
                   "frequencies are stretched to; 1 = plain RoPE.",
                   at_least(1)),
      MOETRAIN_KEY(model.yarn.original_max_seq_len,
                   "YaRN: the context the model was pretrained at; 0 = model.max_seq_len.", at_least(0)),
      MOETRAIN_KEY(model.yarn.beta_fast,
                   "YaRN: frequencies with more than beta_fast rotations over the original context keep their value.",
                   above(0)),
      MOETRAIN_KEY(model.yarn.beta_slow,
                   "YaRN: frequencies with fewer than beta_slow rotations are fully interpolated (divided by the "
                   "factor); a linear ramp lies between.",
                   above(0)),
      MOETRAIN_KEY(model.yarn.mscale,
                   "YaRN: cos/sin are scaled by m(mscale) / m(mscale_all_dim), m(s) = 0.1 s ln(factor) + 1 "
                   "(by m(1) when either is 0).",
                   at_least(0)),
      MOETRAIN_KEY(model.yarn.mscale_all_dim,
                   "YaRN: with MLA, the softmax scale is multiplied by m(mscale_all_dim)^2; 0 = unchanged.",
                   at_least(0)),
      MOETRAIN_KEY(model.yarn.truncate,
                   "YaRN: round the ramp's ends to whole dimensions (floor the first, ceil the last) as DeepSeek-V3 "
                   "does; false keeps them fractional (gpt-oss).",
                   any()),

      MOETRAIN_KEY(model.moe.n_experts,
                   "Routed experts per MoE layer; must be divisible by parallel.expert_parallel.", at_least(1)),
      MOETRAIN_KEY(model.moe.top_k, "Experts chosen per token; at most model.moe.n_experts.", at_least(1)),
      MOETRAIN_KEY(model.moe.expert_hidden, "SwiGLU hidden size of each routed expert.", at_least(1)),
      MOETRAIN_KEY(model.moe.activation,
                   "The routed experts' gated product: swiglu = silu(gate) * up; swiglu_clamped (gpt-oss) = "
                   "g * sigmoid(1.702 g) * (u + 1) with g = min(gate, 7) and u = up clamped to [-7, 7].",
                   one_of({"swiglu", "swiglu_clamped"})),
      MOETRAIN_KEY(model.moe.n_shared_experts,
                   "Always-on shared experts per MoE layer, summed with the routed output; 0 = none.",
                   at_least(0)),
      MOETRAIN_KEY(model.moe.shared_hidden,
                   "Hidden size of each shared expert; 0 = model.moe.expert_hidden.", at_least(0)),
      MOETRAIN_KEY(model.moe.shared_gate,
                   "Scale the shared experts' output per token by sigmoid(x . w_gate), a learned (d_model) vector "
                   "(Qwen2-MoE).",
                   any()),
      MOETRAIN_KEY(model.moe.capacity_factor,
                   "null = dropless (every routed copy is computed); a number sets each expert's capacity to "
                   "ceil(capacity_factor * tokens * top_k / n_experts) per layer call. Overflow drops the copies "
                   "with the lowest routing weight (ties: later tokens first); a dropped copy contributes nothing "
                   "and its token passes on through the residual.",
                   above(0)),
      MOETRAIN_KEY(model.moe.aux_loss_coef,
                   "Coefficient of the switch/GShard load-balancing loss over the batch, E * sum_e f_e * P_e; 0 = off.",
                   at_least(0)),
      MOETRAIN_KEY(model.moe.seq_aux_loss_coef,
                   "Coefficient of DeepSeek-V3's sequence-wise balance loss (the same product per sequence, "
                   "averaged over sequences); 0 = off.",
                   at_least(0)),
      MOETRAIN_KEY(model.moe.z_loss_coef,
                   "Coefficient of the router z-loss, mean over tokens of logsumexp(router logits)^2; 0 = off.",
                   at_least(0)),
      MOETRAIN_KEY(model.moe.experts_impl,
                   "How routed experts compute: grouped_mm (one at::_grouped_mm per projection), sliced (a matmul "
                   "per expert over its rows), auto (grouped_mm on CUDA in bf16, sliced on the CPU, where "
                   "scripts/bench_moe.sh measures it fastest).",
                   one_of({"auto", "grouped_mm", "sliced"})),
      MOETRAIN_KEY(model.moe.expert_bias,
                   "Learned biases on each routed expert's gate, up and down projections (gpt-oss); the down "
                   "bias is part of the expert's output, which the routing weight then scales.",
                   any()),
      MOETRAIN_KEY(model.moe.router.score_func,
                   "Router scores: softmax over experts, or an independent sigmoid per expert (DeepSeek-V3).",
                   one_of({"softmax", "sigmoid"})),
      MOETRAIN_KEY(model.moe.router.normalize_topk, "Renormalize the k chosen routing weights to sum to 1.", any()),
      MOETRAIN_KEY(model.moe.router.routed_scaling,
                   "Factor applied to the routing weights of the routed experts (DeepSeek-V3 uses 2.5).", above(0)),
      MOETRAIN_KEY(model.moe.router.n_groups,
                   "Group-limited routing: experts are split into n_groups equal groups; 1 = off. Must divide "
                   "model.moe.n_experts.",
                   at_least(1)),
      MOETRAIN_KEY(model.moe.router.topk_groups,
                   "With groups: only the best topk_groups groups (by model.moe.router.group_score) are eligible "
                   "for a token's top-k.",
                   at_least(1)),
      MOETRAIN_KEY(model.moe.router.group_score,
                   "With groups: a group's score is the sum of its two best expert scores (top2_sum, DeepSeek-V3's "
                   "selection scores with the bias) or its best one (max, DeepSeek-V2's group_limited_greedy).",
                   one_of({"top2_sum", "max"})),
      MOETRAIN_KEY(model.moe.router.bias_update_rate,
                   "Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for choosing "
                   "experts only (not for the weights), moved after each optimizer step by "
                   "rate * sign(mean load - expert load); 0 = off.",
                   at_least(0)),
      MOETRAIN_KEY(model.moe.router.selection_bias,
                   "Keep the per-expert selection bias even when model.moe.router.bias_update_rate = 0 (a fixed, "
                   "imported bias such as DeepSeek-V3's e_score_correction_bias).",
                   any()),
      MOETRAIN_KEY(model.moe.router.logit_bias,
                   "A learned per-expert bias added to the router logits before top-k and before the weights' "
                   "softmax or sigmoid (gpt-oss's router.bias); it trains, unlike the selection bias, which "
                   "only picks experts.",
                   any()),
      MOETRAIN_KEY(model.moe.router.max_groups_per_token,
                   "Node-limited routing (DeepSeek-V3 section 2.1.2): each token's top-k experts lie in at most "
                   "this many expert groups, a group being the experts of one expert-parallel rank (n_experts / "
                   "parallel.expert_parallel, contiguous) or, with parallel.ranks_per_node, of one node's ranks. A "
                   "group's score is the sum of its best ceil(top_k / max_groups_per_token) selection scores and the "
                   "best groups are eligible; rows then cross to at most this many ranks or nodes. At most the "
                   "groups; not with model.moe.router.n_groups > 1. 0 = off.",
                   at_least(0)),

      MOETRAIN_KEY(data.dir, "Directory holding train.bin and val.bin (written by moetrain prepare-data).",
                   non_empty()),
      MOETRAIN_KEY(data.seq_len, "Tokens per training sequence; at most model.max_seq_len.", at_least(1)),
      MOETRAIN_KEY(data.sources,
                   "A blend of folders, each {dir, weight, name (optional, default: the folder's name)}; when "
                   "non-empty it replaces data.dir. Each training sequence comes from one source, chosen by a hash "
                   "of (run.seed, sequence id) with probability weight / sum of weights; every folder needs a "
                   "train split, its val split (if any) is evaluated on its own. metrics.jsonl logs tokens/<name> "
                   "and val_loss/<name>. Weights must be > 0.",
                   any()),
      MOETRAIN_KEY(data.packing,
                   "How training and validation sequences are cut. stream: windows of data.seq_len + 1 tokens at "
                   "hashed offsets of the token stream, across document boundaries. documents: whole documents "
                   "(the boundaries prepare_data writes) packed first-fit into sequences of data.seq_len tokens, "
                   "each attending only to itself with RoPE positions from 0, read once per epoch in a seeded order "
                   "(with one source); a document with no learned target is left out.",
                   one_of({"stream", "documents"})),
      MOETRAIN_KEY(data.truncate,
                   "With data.packing: documents, a document longer than data.seq_len keeps its first seq_len "
                   "tokens (true; the count is logged) or stops the run with an error naming it (false).",
                   any()),

      MOETRAIN_KEY(optim.name,
                   "The optimizer. adamw: AdamW for every weight. muon: Muon (Nesterov momentum, 5 Newton-Schulz "
                   "iterations, the update scaled to AdamW's RMS by 0.2 * sqrt(max(rows, cols)), decoupled weight "
                   "decay) for the hidden matrices (attention and MLP projections, each routed expert on its own, "
                   "MLA's wkv_a and wkv_b split per logical matrix) and AdamW with the optim.* settings for the "
                   "rest (embedding, LM head, norms, biases, routers, LoRA adapters). Under parallel.zero 1 each "
                   "matrix is orthogonalised by one owner replica on the reduced gradient, the owners balanced by size.",
                   one_of({"adamw", "muon"})),
      MOETRAIN_KEY(optim.lr, "Peak learning rate, reached at the end of warmup.", above(0)),
      MOETRAIN_KEY(optim.min_lr, "Floor of the cosine decay; at most optim.lr.", at_least(0)),
      MOETRAIN_KEY(optim.warmup_steps, "Steps of linear learning-rate warmup.", at_least(0)),
      MOETRAIN_KEY(optim.schedule, "Learning-rate schedule after the linear warmup.",
                   one_of({"cosine", "constant"})),
      MOETRAIN_KEY(optim.decay_steps,
                   "Steps over which the cosine decays to optim.min_lr; 0 = train.steps. Set it to keep the "
                   "schedule fixed when train.steps is overridden (a shortened or extended run).",
                   at_least(0)),
      MOETRAIN_KEY(optim.weight_decay, "AdamW decoupled weight decay; not applied to norms, biases or embeddings.",
                   at_least(0)),
      MOETRAIN_KEY(optim.beta1, "AdamW decay rate of the first moment.", in_half_open(0, 1)),
      MOETRAIN_KEY(optim.beta2, "AdamW decay rate of the second moment.", in_half_open(0, 1)),
      MOETRAIN_KEY(optim.eps, "AdamW epsilon added to the denominator.", above(0)),
      MOETRAIN_KEY(optim.grad_clip, "Maximum global gradient norm; 0 = no clipping.", at_least(0)),
      MOETRAIN_KEY(optim.momentum, "Muon's Nesterov momentum (optim.name muon); AdamW uses optim.beta1.",
                   in_half_open(0, 1)),
      MOETRAIN_KEY(optim.qk_clip_tau,
                   "MuonClip's QK-clip (Kimi K2; K2 used 100): after each step, a head whose largest pre-softmax "
                   "logit in the step's training forwards exceeded tau has its query and key weights rescaled to "
                   "bring it to tau (MHA and MLA's head-specific parts as K2; with GQA the query head alone takes "
                   "the factor). With optim.name adamw or muon. Not with train.lora, model.qk_norm or parallel.zero 1 "
                   "under run.dtype bf16. 0 = off (no tracking).",
                   at_least(0)),

      MOETRAIN_KEY(train.steps, "Optimizer steps to run.", at_least(1)),
      MOETRAIN_KEY(train.micro_batch_size, "Sequences per micro-batch per rank.", at_least(1)),
      MOETRAIN_KEY(train.grad_accum,
                   "Micro-batches accumulated per optimizer step; 0 = global_batch_size / (world size * "
                   "micro_batch_size), Megatron's convention (needs train.global_batch_size).",
                   at_least(0)),
      MOETRAIN_KEY(train.global_batch_size,
                   "Sequences per optimizer step over all ranks; when set, the config trains alike at any world "
                   "size: train.micro_batch_size becomes global_batch_size / (world size * grad_accum), or with "
                   "grad_accum = 0 the micro-batch stays and grad_accum is derived. 0 = micro_batch_size * "
                   "grad_accum * world size.",
                   at_least(0)),
      MOETRAIN_KEY(train.loss_chunk_tokens,
                   "Run the LM head and the loss over this many tokens at a time, forward and backward, so that "
                   "the (tokens x vocabulary) fp32 logits never exist whole (training, validation and eval); the "
                   "same loss and gradients to fp32 rounding. 0 = all tokens at once.",
                   at_least(0)),
      MOETRAIN_KEY(train.activation_checkpointing,
                   "full = each transformer block keeps only its input and is recomputed in backward (activation "
                   "memory of one block instead of all; about one more forward of compute). selective = the matmul "
                   "and attention outputs are kept and the element-wise work (every RMSNorm, SwiGLU's silu(gate) * "
                   "up) is recomputed in backward. Gradients equal those without it. none = keep every activation.",
                   one_of({"none", "full", "selective"})),
      MOETRAIN_KEY(train.log_every, "Steps between training log lines.", at_least(1)),
      MOETRAIN_KEY(train.eval_every, "Steps between validation evaluations; 0 = only at the end.", at_least(0)),
      MOETRAIN_KEY(train.eval_batches, "Validation micro-batches per evaluation.", at_least(1)),
      MOETRAIN_KEY(train.nonfinite,
                   "A step whose loss or gradient is not finite on any rank never updates the model: skip = "
                   "log it (\"skipped\": true in metrics.jsonl) and go on; stop = exit 1 at once. Nothing is "
                   "saved from such a step. Under `moetrain rl` a step is one optimizer update.",
                   one_of({"skip", "stop"})),
      MOETRAIN_KEY(train.max_skipped_steps,
                   "With train.nonfinite = skip: consecutive skipped steps tolerated; one more stops the run "
                   "with an error naming the last good checkpoint.",
                   at_least(0)),
      MOETRAIN_KEY(train.lora.rank,
                   "LoRA: rank of the low-rank adapters trained on a frozen base (y = x W + dropout(x) A B * "
                   "alpha / rank, B starting at zero); 0 = off, every weight trains. With LoRA the base weights "
                   "take no gradient and no optimizer state and are held in the compute dtype (the matmul "
                   "weights; norms, routers and the embedding stay fp32); the adapters train in fp32, and "
                   "checkpoints hold only the adapters, their optimizer state and a reference to the base.",
                   at_least(0)),
      MOETRAIN_KEY(train.lora.alpha, "LoRA: the adapters' output is scaled by alpha / rank.", above(0)),
      MOETRAIN_KEY(train.lora.dropout,
                   "LoRA: dropout probability on the adapters' input while training (not with "
                   "train.activation_checkpointing = full).",
                   in_half_open(0, 1)),
      MOETRAIN_KEY(train.lora.targets,
                   "LoRA: the weights that get adapters. q, k, v, o: GQA's wq, wk, wv, wo (kv = k and v); with "
                   "model.attention = mla, q (wq, or wq_a and wq_b with a q latent), kv (wkv_a and wkv_b) and o "
                   "(wo); experts: each routed expert's w1, w3, w2 (stacked per expert, sharded with them); "
                   "shared_experts: the shared experts' w1, w3, w2; dense_mlp: the dense blocks' w1, w3, w2.",
                   each_of({"q", "k", "v", "kv", "o", "experts", "shared_experts", "dense_mlp"})),

      MOETRAIN_KEY(logging.tensorboard,
                   "Also write TensorBoard event files under <out_dir>/tb/ (rank 0, flushed at every log step): "
                   "every number of each metrics.jsonl record (loss, lr, grad_norm, tokens_per_s, mfu, cost, "
                   "val_loss, per-source losses and tokens) and each MoE layer's load max/mean, drop fraction "
                   "and balance loss.", any()),

      MOETRAIN_KEY(parallel.backend,
                   "Communication backend: nccl (CUDA tensors), store (tensors staged through host memory and the "
                   "c10d TCPStore; it stands in for gloo, whose headers the torch wheel lacks, and on cuda lets "
                   "several ranks share one GPU), single (one process); auto = single "
                   "when the launcher started one process, else nccl on cuda and store on cpu.",
                   one_of({"auto", "nccl", "store", "single"})),
      MOETRAIN_KEY(parallel.expert_parallel,
                   "Ranks the routed experts are sharded across (ep); must divide the world size and "
                   "model.moe.n_experts. The world holds world/ep replicas of every expert.", at_least(1)),
      MOETRAIN_KEY(parallel.zero,
                   "ZeRO stage: 0 = every data-parallel replica holds AdamW's moments for all it computes; 1 = the "
                   "moments (and the update) are sharded over the replicas of each parameter (the world for "
                   "replicated weights, the expert-data-parallel group for routed experts): gradients are "
                   "reduce-scattered, each rank updates its shard and the weights are all-gathered. Under "
                   "run.dtype bf16 the fp32 master weights are sharded too: the matmul weights are held in bf16 "
                   "(their gradients accumulated in fp32) and the all-gather carries bf16.",
                   from_to(0, 1)),
      MOETRAIN_KEY(parallel.pipeline_parallel,
                   "Pipeline stages (pp): the blocks are split into pp consecutive stages, the embedding on the "
                   "first, the final norm, LM head and loss on the last; a step runs its micro-batches through "
                   "them in the 1F1B schedule (train.grad_accum >= pp). The world is pp x data-parallel ranks "
                   "(expert parallel and ZeRO within each stage's data-parallel ranks); rank r is stage r / "
                   "(world / pp).", at_least(1)),
      MOETRAIN_KEY(parallel.ranks_per_node,
                   "Expert-parallel ranks per node, for node-limited routing: model.moe.router.max_groups_per_token "
                   "then counts nodes of ranks_per_node consecutive EP ranks instead of single ranks. Must divide "
                   "parallel.expert_parallel. 0 = unset (one group per EP rank).",
                   at_least(0)),
      MOETRAIN_KEY(parallel.pp_layers,
                   "Blocks per pipeline stage as a comma-separated list (\"6,5,5\": pipeline_parallel counts "
                   "summing to model.n_layers); \"\" = balanced by the cost model's per-layer FLOPs, the LM head "
                   "counted on the last stage.", any()),
      MOETRAIN_KEY(parallel.overlap_grad_reduce,
                   "Reduce the gradients during the backward pass of a step's last micro-batch: each bucket is "
                   "launched as soon as autograd has accumulated all its gradients (NCCL: on its own stream, "
                   "overlapping the rest of backward), in one fixed order on every rank; false = all after "
                   "backward. The results are the same either way.", any()),
      MOETRAIN_KEY(parallel.grad_bucket_mb,
                   "Gradient bytes per reduction bucket in MiB (one collective each; ZeRO-1 shards each bucket "
                   "over the replicas). Smaller buckets start reducing earlier in backward; larger ones make "
                   "fewer, more efficient collectives.", above(0)),
      MOETRAIN_KEY(parallel.timeout_s,
                   "Seconds the rendezvous and each collective may wait for a peer before every rank stops with "
                   "an error naming the operation.", at_least(1)),

      MOETRAIN_KEY(checkpoint.every, "Steps between checkpoints; 0 = only at the end.", at_least(0)),
      MOETRAIN_KEY(checkpoint.keep_last, "Most recent checkpoints to keep; 0 = keep all.", at_least(0)),
      MOETRAIN_KEY(checkpoint.keep_every,
                   "Milestones kept beyond keep_last: checkpoints whose step is a multiple of it; 0 = none.",
                   at_least(0)),
      MOETRAIN_KEY(checkpoint.verify,
                   "Check when loading a checkpoint: full = sizes and sha256, size = sizes only.",
                   one_of({"full", "size"})),
      MOETRAIN_KEY(checkpoint.async,
                   "Write checkpoints on a background thread from a CPU copy while training goes on (at most one "
                   "save in flight: 3x this rank's parameter bytes of extra host memory); committed atomically "
                   "at a later step. The last checkpoint of a run is always written synchronously.",
                   any()),

      MOETRAIN_KEY(cost.gpu,
                   "Hardware whose dense bf16 peak the live MFU is measured against (h100, h200, h800, a100, "
                   "b200; cpu = this CPU's fp32 matmul rate, measured at start).",
                   one_of({"cpu", "h100", "h200", "h800", "a100", "b200"})),
      MOETRAIN_KEY(cost.price_per_gpu_hour, "Price of one GPU hour, for the cost estimate.", at_least(0)),

      MOETRAIN_KEY(rl.prompts,
                   "`moetrain rl`: a .jsonl file of prompts, one object per line with \"prompt\" and \"answer\" "
                   "(text, byte-tokenized), or a prompt set (its folder or its prompts.bin) that `moetrain prepare-data --rl` "
                   "(bytes) or scripts/prepare_data.py --rl (a Hugging Face tokenizer, with its token table and stop tokens) "
                   "wrote; sampled without replacement in a seeded order, epoch after epoch.", any()),
      MOETRAIN_KEY(rl.eval_prompts,
                   "Held-out prompts (a .jsonl or a prepared set, as rl.prompts): greedy exact-match accuracy before the first rollout, "
                   "every train.eval_every rollout batches and at the end (eval_accuracy in metrics.jsonl); \"\" = none.",
                   any()),
      MOETRAIN_KEY(rl.eval_limit, "Evaluate at most this many of rl.eval_prompts (the first ones); 0 = all.", at_least(0)),
      MOETRAIN_KEY(rl.prompts_per_step,
                   "Prompts per rollout batch over all data-parallel ranks (each rank samples its share); must be a "
                   "multiple of the data-parallel world size.", at_least(1)),
      MOETRAIN_KEY(rl.group_size, "G: completions sampled per prompt; advantages are normalised within each group.",
                   at_least(2)),
      MOETRAIN_KEY(rl.max_new_tokens, "Most tokens of a completion.", at_least(1)),
      MOETRAIN_KEY(rl.temperature, "Sampling temperature of the rollouts.", above(0)),
      MOETRAIN_KEY(rl.stop,
                   "Byte sets: characters (bytes) any of which ends a completion (kept in it); \"\" = none. A subword "
                   "set's completions end at the stop tokens it names instead, and rl.stop must be \"\".", any()),
      MOETRAIN_KEY(rl.advantage,
                   "group_norm: (r - mean) / (std + 1e-4) within each group (GRPO); mean_only: r - mean (Dr. GRPO).",
                   one_of({"group_norm", "mean_only"})),
      MOETRAIN_KEY(rl.clip_eps, "PPO clip: the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high].", above_to(0, 1)),
      MOETRAIN_KEY(rl.clip_eps_high, "The upper clip (DAPO's clip-higher); 0 = rl.clip_eps.", at_least(0)),
      MOETRAIN_KEY(rl.loss_aggregation,
                   "token: the surrogate averaged over every response token of the batch (DAPO); sequence: over each "
                   "response's tokens, then over responses (GRPO).", one_of({"token", "sequence"})),
      MOETRAIN_KEY(rl.ratio,
                   "token: one importance ratio per token (GRPO); sequence: the geometric mean of a response's token "
                   "ratios, clipped per response (GSPO).", one_of({"token", "sequence"})),
      MOETRAIN_KEY(rl.kl_coef,
                   "Weight of the k3 KL estimate to a frozen reference (the initial weights: model.init_from or the "
                   "seeded init); 0 = no penalty and no reference is built.", at_least(0)),
      MOETRAIN_KEY(rl.updates_per_batch,
                   "Optimizer steps per rollout batch, each over the whole batch against the old-policy "
                   "log-probs taken at rollout time.", at_least(1)),
      MOETRAIN_KEY(rl.micro_batch_rows,
                   "Completions per forward and backward pass on each rank (the old-policy, reference and update "
                   "passes), the gradients accumulated over the passes: what bounds the logits' and activations' "
                   "memory. The update is the same up to summation order, except that the MoE balancing losses are "
                   "taken per pass (and weighted by its rows). 0 = all of the rank's completions in one pass.",
                   at_least(0)),
      MOETRAIN_KEY(rl.reward,
                   "exact_answer: 1 when the answer extracted from the completion (rl.answer_from) equals the prompt's "
                   "answer (whitespace trimmed), else 0; command: rl.reward_command.", one_of({"exact_answer", "command"})),
      MOETRAIN_KEY(rl.answer_from,
                   "Where exact_answer finds the answer: tag = the text of the last <T>...</T> with T = "
                   "rl.answer_tag; boxed = the last \\boxed{...}; whole = the completion less its stop character.",
                   one_of({"tag", "boxed", "whole"})),
      MOETRAIN_KEY(rl.answer_tag, "The tag of rl.answer_from = tag.", non_empty()),
      MOETRAIN_KEY(rl.format_reward,
                   "Added to the reward of a completion that follows DeepSeek-R1's template "
                   "<think>...</think><answer>...</answer> (surrounding whitespace allowed); 0 = off.", at_least(0)),
      MOETRAIN_KEY(rl.reward_command,
                   "rl.reward = command: a shell command that reads one JSON object per completion on stdin "
                   "({\"prompt\", \"completion\", \"answer\"}) and writes one number per line on stdout.", any()),
      MOETRAIN_KEY(rl.reward_timeout_s, "Seconds the reward command may take for one rollout batch.", above(0)),
      MOETRAIN_KEY(rl.routing_replay,
                   "Record each token's experts during the rollout and route the update's forward passes through "
                   "them (routing_mismatch in metrics.jsonl: the fraction of token-expert choices that differ).",
                   any()),
  };
  return table;
}

#undef MOETRAIN_KEY

const KeyDesc* find_key(const std::string& path) {
  for (const auto& k : keys())
    if (k.path == path) return &k;
  return nullptr;
}

// A section is any proper prefix of a key path ("model", "model.moe").
bool is_section(const std::string& path) {
  for (const auto& k : keys())
    if (k.path.size() > path.size() && k.path.compare(0, path.size(), path) == 0 && k.path[path.size()] == '.')
      return true;
  return false;
}

std::vector<std::string> split_path(const std::string& path) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    size_t dot = path.find('.', start);
    parts.push_back(path.substr(start, dot - start));
    if (dot == std::string::npos) return parts;
    start = dot + 1;
  }
}

std::string leaf_name(const std::string& path) { return split_path(path).back(); }

// ---------------------------------------------------------------------------------------------
// Value text.

std::string format_number(double v) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);  // shortest text that reads back exactly
  return std::string(buf, end);
}

std::string in_quotes(const std::string& s) { return "\"" + s + "\""; }

// data.sources as flow YAML, which a --set reads back: [{dir: "a", weight: 0.7, name: "web"}].
std::string sources_text(const std::vector<DataSource>& sources) {
  std::string out = "[";
  for (size_t i = 0; i < sources.size(); ++i) {
    YAML::Emitter dir, name;
    dir << YAML::DoubleQuoted << sources[i].dir;
    name << YAML::DoubleQuoted << sources[i].name;
    out += std::string(i ? ", " : "") + "{dir: " + dir.c_str() + ", weight: " + format_number(sources[i].weight) +
           ", name: " + name.c_str() + "}";
  }
  return out + "]";
}

std::string join(const std::vector<std::string>& items, const std::string& sep);

std::string value_text(const KeyDesc& k, const Config& cfg) {
  Config& c = const_cast<Config&>(cfg);  // accessors are shared with the setters; only read here
  return std::visit(
      [&](auto get) -> std::string {
        const auto& v = get(c);
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>)
          return v;
        else if constexpr (std::is_same_v<T, bool>)
          return v ? "true" : "false";
        else if constexpr (std::is_same_v<T, double>)
          return format_number(v);
        else if constexpr (std::is_same_v<T, std::optional<double>>)
          return v ? format_number(*v) : "null";
        else if constexpr (std::is_same_v<T, std::vector<DataSource>>)
          return sources_text(v);
        else if constexpr (std::is_same_v<T, std::vector<std::string>>)
          return "[" + join(v, ", ") + "]";
        else
          return std::to_string(v);
      },
      k.field);
}

std::string bounds_text(const Allowed& a) {
  // Whole bounds as integers ("100000", where the shortest text would be "1e+05").
  auto bound = [](double v) {
    return v == std::trunc(v) && std::abs(v) < 1e15 ? std::to_string(int64_t(v)) : format_number(v);
  };
  if (a.lo && a.hi)
    return std::string("in ") + (a.lo_open ? "(" : "[") + bound(*a.lo) + ", " + bound(*a.hi) + (a.hi_open ? ")" : "]");
  if (a.lo) return std::string(a.lo_open ? "> " : ">= ") + bound(*a.lo);
  if (a.hi) return std::string(a.hi_open ? "< " : "<= ") + bound(*a.hi);
  return "";
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string type_text(const KeyDesc& k) {
  static const char* names[] = {"int", "uint64", "double", "bool", "string", "double or null",
                                "list of {dir, weight, name}", "list of strings"};
  if (k.field.index() == kStrings) return "list of (" + join(k.allowed.one_of, ", ") + ")";
  if (!k.allowed.one_of.empty()) return "enum (" + join(k.allowed.one_of, ", ") + ")";
  std::string t = names[k.field.index()];
  if (k.allowed.non_empty) t += ", non-empty";
  std::string b = bounds_text(k.allowed);
  return b.empty() ? t : t + " " + b;
}

// ---------------------------------------------------------------------------------------------
// Setting a key from a YAML node.

// from_chars takes no leading '+', which YAML numbers may have.
std::string strip_plus(const std::string& s) {
  return s.size() > 1 && s[0] == '+' && (std::isdigit((unsigned char)s[1]) || s[1] == '.') ? s.substr(1) : s;
}

template <typename T>
bool parse_integer(const std::string& text, T& out) {
  std::string s = strip_plus(text);
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && ec == std::errc() && end == s.data() + s.size();
}

// For integer text that T cannot hold, which bound it passes ("larger than the maximum 2147483647");
// nullopt for text that is not an integer at all.
template <typename T>
std::optional<std::string> integer_bound_text(const std::string& text) {
  const std::string s = strip_plus(text);
  const bool negative = !s.empty() && s[0] == '-';
  const size_t digits = negative ? 1 : 0;
  if (s.size() == digits || !std::all_of(s.begin() + digits, s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  if (negative && s.find_first_not_of('0', 1) == std::string::npos) return std::nullopt;  // "-0" for an unsigned key
  if (negative) return "smaller than the minimum " + std::to_string(std::numeric_limits<T>::min());
  return "larger than the maximum " + std::to_string(std::numeric_limits<T>::max());
}

bool parse_double(const std::string& text, double& out) {
  std::string s = strip_plus(text);
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), out);
  return !s.empty() && ec == std::errc() && end == s.data() + s.size();
}

const char* expected_text(const KeyDesc& k) {
  switch (k.field.index()) {
    case kInt: return "an integer";
    case kUInt64: return "an unsigned 64-bit integer";
    case kDouble: return "a number";
    case kBool: return "true or false";
    case kOptDouble: return "a number or null";
    case kSources: return "a list of {dir, weight, name} mappings";
    case kStrings: return "a list of names";
    default: return "a string";
  }
}

std::string node_kind_text(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Map: return "a mapping";
    case YAML::NodeType::Sequence: return "a sequence";
    case YAML::NodeType::Scalar: return in_quotes(n.Scalar());
    default: return "nothing (null)";
  }
}

// data.sources from a sequence of mappings (null = no blend); each entry names its index and field.
void set_sources(const std::string& path, const YAML::Node& node, std::vector<DataSource>& out,
                 const std::string& where) {
  out.clear();
  if (node.IsNull()) return;
  if (!node.IsSequence())
    throw ConfigError(where + ": " + path + ": expected a list of {dir, weight, name} mappings, got " +
                      node_kind_text(node));
  for (size_t i = 0; i < node.size(); ++i) {
    const YAML::Node item = node[i];
    const std::string entry = path + "[" + std::to_string(i) + "]";
    if (!item.IsMap())
      throw ConfigError(where + ": " + entry + ": expected a mapping {dir, weight, name}, got " + node_kind_text(item));
    DataSource source;
    bool has_dir = false;
    for (const auto& field : item) {
      const YAML::Node key = field.first, value = field.second;
      const std::string name = key.IsScalar() ? key.Scalar() : "?";
      if ((name != "dir" && name != "weight" && name != "name") || !value.IsScalar())
        throw ConfigError(where + ": " + entry + "." + name + ": " +
                          (value.IsScalar() ? "unknown field; expected dir, weight or name"
                                            : "expected a scalar, got " + node_kind_text(value)));
      if (name == "weight" && !parse_double(value.Scalar(), source.weight))
        throw ConfigError(where + ": " + entry + ".weight: expected a number, got " + node_kind_text(value));
      if (name == "dir") source.dir = value.Scalar(), has_dir = true;
      if (name == "name") source.name = value.Scalar();
    }
    if (!has_dir) throw ConfigError(where + ": " + entry + ": needs a dir (the folder of the source's shards)");
    out.push_back(source);
  }
}

// `where` is "file:line:col" or "--set ..."; returns by throwing on a mismatch of type.
void set_from_node(const KeyDesc& k, const YAML::Node& node, Config& cfg, const std::string& where) {
  auto fail = [&]() -> void {
    throw ConfigError(where + ": " + k.path + ": expected " + expected_text(k) + ", got " + node_kind_text(node));
  };
  if (k.field.index() == kOptDouble && node.IsNull()) {
    std::get<kOptDouble>(k.field)(cfg).reset();
    return;
  }
  if (k.field.index() == kSources) {
    set_sources(k.path, node, std::get<kSources>(k.field)(cfg), where);
    return;
  }
  if (k.field.index() == kStrings) {  // a sequence of scalars (null = empty)
    auto& out = std::get<kStrings>(k.field)(cfg);
    out.clear();
    if (node.IsNull()) return;
    if (!node.IsSequence()) fail();
    for (size_t i = 0; i < node.size(); ++i) {
      if (!node[i].IsScalar())
        throw ConfigError(where + ": " + k.path + "[" + std::to_string(i) + "]: expected a name, got " +
                          node_kind_text(node[i]));
      out.push_back(node[i].Scalar());
    }
    return;
  }
  if (!node.IsScalar()) fail();
  const std::string& text = node.Scalar();
  std::visit(
      [&](auto get) {
        auto& field = get(cfg);
        using T = std::decay_t<decltype(field)>;
        if constexpr (std::is_same_v<T, std::string>) {
          field = text;
        } else if constexpr (std::is_same_v<T, bool>) {
          if (text == "true" || text == "True" || text == "TRUE")
            field = true;
          else if (text == "false" || text == "False" || text == "FALSE")
            field = false;
          else
            fail();
        } else if constexpr (std::is_same_v<T, double>) {
          if (!parse_double(text, field)) fail();
        } else if constexpr (std::is_same_v<T, std::optional<double>>) {
          double v = 0;
          if (!parse_double(text, v)) fail();
          field = v;
        } else if constexpr (std::is_same_v<T, std::vector<DataSource>> ||
                             std::is_same_v<T, std::vector<std::string>>) {
          fail();  // handled above
        } else {
          T v{};
          if (!parse_integer(text, v)) {
            if (auto bound = integer_bound_text<T>(text))
              throw ConfigError(where + ": " + k.path + ": " + strip_plus(text) + " is " + *bound);
            fail();
          }
          field = v;
        }
      },
      k.field);
}

// ---------------------------------------------------------------------------------------------
// Unknown keys: suggest the closest known path.

// Optimal-string-alignment distance: Levenshtein plus adjacent transpositions ("modle" -> "model" is 1).
size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i)
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  return d[a.size()][b.size()];
}

// Candidates are every key and section path. A path close to the whole unknown path wins; a key with
// the same (or nearly the same) last name in another section also counts, one edit dearer.
std::optional<std::string> suggest(const std::string& unknown_path) {
  std::vector<std::string> candidates;
  for (const auto& k : keys()) {
    auto parts = split_path(k.path);
    std::string prefix;
    for (size_t i = 0; i + 1 < parts.size(); ++i) {
      prefix += (i ? "." : "") + parts[i];
      if (std::find(candidates.begin(), candidates.end(), prefix) == candidates.end()) candidates.push_back(prefix);
    }
    candidates.push_back(k.path);
  }
  std::string leaf = leaf_name(unknown_path);
  size_t threshold = std::clamp<size_t>(leaf.size() / 3, 1, 3);
  std::optional<std::string> best;
  size_t best_score = threshold + 1;
  for (const auto& c : candidates) {
    size_t score = std::min(edit_distance(unknown_path, c), edit_distance(leaf, leaf_name(c)) + 1);
    if (score < best_score) {
      best_score = score;
      best = c;
    }
  }
  return best;
}

[[noreturn]] void unknown_key(const std::string& where, const std::string& path) {
  std::string msg = where + ": unknown key '" + path + "'";
  if (auto s = suggest(path)) msg += " (did you mean '" + *s + "'?)";
  throw ConfigError(msg);
}

// ---------------------------------------------------------------------------------------------
// Reading a YAML document.

std::string location(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

void apply_mapping(const YAML::Node& map, const std::string& prefix, Config& cfg, const std::string& source) {
  std::set<std::string> seen;
  for (const auto& entry : map) {
    const YAML::Node key_node = entry.first;  // copies: yaml-cpp iterators hand out temporaries
    const YAML::Node value = entry.second;
    if (!key_node.IsScalar())
      throw ConfigError(location(source, key_node.Mark()) + ": " + (prefix.empty() ? "top level" : prefix) +
                        ": keys must be plain names, got " + node_kind_text(key_node));
    const std::string& name = key_node.Scalar();
    std::string path = prefix.empty() ? name : prefix + "." + name;
    if (name.find('.') != std::string::npos)
      throw ConfigError(location(source, key_node.Mark()) + ": key '" + name +
                        "' contains '.'; in a file, nest each key under its section");
    if (!seen.insert(name).second)
      throw ConfigError(location(source, key_node.Mark()) + ": duplicate key '" + path + "'");
    if (const KeyDesc* k = find_key(path)) {
      set_from_node(*k, value, cfg, location(source, value.Mark()));
    } else if (is_section(path)) {
      if (value.IsNull()) continue;  // an empty section keeps its defaults
      if (!value.IsMap())
        throw ConfigError(location(source, value.Mark()) + ": " + path + ": expected a mapping (a section), got " +
                          node_kind_text(value));
      apply_mapping(value, path, cfg, source);
    } else if (path == "model.qkv_bias") {
      // Replaced by model.attn_bias; every run folder and checkpoint written before holds it, so it is
      // still read (true = qkv, false = none) and a resume or an inference from them keeps working.
      bool on = false;
      if (!value.IsScalar() || !YAML::convert<bool>::decode(value, on))
        throw ConfigError(location(source, value.Mark()) + ": model.qkv_bias (now model.attn_bias: none | qkv | "
                          "all) expects true or false, got " + node_kind_text(value));
      cfg.model.attn_bias = on ? "qkv" : "none";
    } else {
      unknown_key(source, path);
    }
  }
}

// A config nests four levels (model.moe.router.score_func); far deeper YAML is damage or an attack
// on the parser's recursion. yaml-cpp itself stops at 2000 levels (YAML::DeepRecursion).
constexpr int kMaxYamlDepth = 64;
// A config has a few hundred nodes. Aliases let a 1 KB file stand for billions of them (a "billion
// laughs": each level a list of aliases of the one before), and a walk of the document follows every
// alias, so the walk stops after this many nodes.
constexpr size_t kMaxYamlNodes = 100000;

std::string too_deep_text() {
  return "YAML nested more than " + std::to_string(kMaxYamlDepth) +
         " levels deep (a moetrain config nests at most 4, as in model.moe.router.score_func)";
}

std::string too_many_nodes_text() {
  return "YAML of more than " + std::to_string(kMaxYamlNodes) +
         " nodes, counting each *alias as a copy of what it names (a moetrain config has a few hundred)";
}

struct ShapeError {
  YAML::Mark mark;
  std::string text;
};

// The first node deeper than kMaxYamlDepth (the top level is depth 1), or the node at which the walk
// passes kMaxYamlNodes, if any: recurses at most kMaxYamlDepth + 1 levels and visits at most
// kMaxYamlNodes + 1 nodes, however the aliases multiply them.
std::optional<ShapeError> bad_shape(const YAML::Node& node, size_t& visited, int depth = 1) {
  if (depth > kMaxYamlDepth) return ShapeError{node.Mark(), too_deep_text()};
  if (++visited > kMaxYamlNodes) return ShapeError{node.Mark(), too_many_nodes_text()};
  if (node.IsMap()) {
    for (const auto& entry : node) {
      const YAML::Node key = entry.first, value = entry.second;
      if (auto e = bad_shape(key, visited, depth + 1)) return e;
      if (auto e = bad_shape(value, visited, depth + 1)) return e;
    }
  } else if (node.IsSequence()) {
    for (const auto& item : node)
      if (auto e = bad_shape(YAML::Node(item), visited, depth + 1)) return e;
  }
  return std::nullopt;
}

std::optional<ShapeError> bad_shape(const YAML::Node& node) {
  size_t visited = 0;
  return bad_shape(node, visited);
}

void apply_override(const std::string& override_text, Config& cfg) {
  constexpr size_t kShownChars = 80;  // a huge override is named by its start, not echoed whole
  const std::string where = "--set " + (override_text.size() <= kShownChars ? override_text
                                                                           : override_text.substr(0, kShownChars) + "...");
  size_t eq = override_text.find('=');
  std::string path = override_text.substr(0, eq);
  path.erase(0, path.find_first_not_of(" \t"));
  path.erase(path.find_last_not_of(" \t") + 1);
  if (eq == std::string::npos || path.empty())
    throw ConfigError("malformed override '" + override_text +
                      "': expected key.path=value (e.g. --set model.moe.top_k=4)");
  const KeyDesc* k = find_key(path);
  if (!k) {
    if (is_section(path)) {
      for (const auto& d : keys())
        if (d.path.rfind(path + ".", 0) == 0)
          throw ConfigError(where + ": '" + path + "' is a section; set one of its keys, e.g. '" + d.path + "'");
    }
    unknown_key(where, path);
  }
  YAML::Node value;
  try {
    value = YAML::Load(override_text.substr(eq + 1));
  } catch (const YAML::DeepRecursion&) {
    throw ConfigError(where + ": " + too_deep_text());
  } catch (const YAML::Exception& e) {
    throw ConfigError(where + ": " + e.msg);
  }
  if (auto e = bad_shape(value)) throw ConfigError(where + ": " + e->text);
  set_from_node(*k, value, cfg, where);
}

constexpr uint64_t kMaxConfigBytes = uint64_t(16) << 20;

// The number of YAML documents in text, counting no further than limit.
size_t count_documents(const std::string& text, size_t limit) {
  struct Ignore : YAML::EventHandler {
    void OnDocumentStart(const YAML::Mark&) override {}
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
    void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
    void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnMapEnd() override {}
  } ignore;
  std::istringstream stream(text);
  YAML::Parser parser(stream);
  size_t n = 0;
  while (n < limit && parser.HandleNextDocument(ignore)) ++n;
  return n;
}

std::string read_file(const std::string& path) {
  // A regular file of bounded size (files::read_file): `--config /dev/zero` is an error, not an allocation.
  try {
    return files::read_file(path, kMaxConfigBytes);
  } catch (const Error& e) {
    std::string why = e.what();
    if (why.rfind("[io] cannot read ", 0) == 0) why = why.substr(17);
    throw ConfigError("cannot read config file " + why);
  }
}

std::string escape_markdown_cell(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '|') out += '\\';
    out += ch;
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides) {
  // yaml-cpp 0.7's LoadAll never returns on a ',' outside [] or {} (it sees endless empty documents),
  // so the documents are counted with a bound before the one document is loaded.
  std::vector<YAML::Node> docs;
  size_t n_docs = 0;
  try {
    n_docs = count_documents(yaml_text, 2);
    if (n_docs == 1) docs.push_back(YAML::Load(yaml_text));
  } catch (const YAML::DeepRecursion& e) {
    throw ConfigError(location(source, e.mark) + ": " + too_deep_text());
  } catch (const YAML::ParserException& e) {
    throw ConfigError(location(source, e.mark) + ": " + e.msg);
  } catch (const YAML::Exception& e) {
    throw ConfigError(source + ": " + e.msg);
  }
  if (n_docs > 1)
    throw ConfigError(source + ": holds more than one YAML document (a '---' line, or a ',' outside [] or {}, "
                      "starts another); expected one");

  for (const auto& doc : docs)
    if (auto e = bad_shape(doc)) throw ConfigError(location(source, e->mark) + ": " + e->text);
  Config cfg;
  if (!docs.empty() && !docs[0].IsNull()) {  // an empty file is all defaults
    const YAML::Node& root = docs[0];
    if (!root.IsMap())
      throw ConfigError(location(source, root.Mark()) +
                        ": the top level must be a mapping of sections (run, model, data, ...), got " +
                        node_kind_text(root));
    try {
      apply_mapping(root, "", cfg, source);
    } catch (const YAML::Exception& e) {
      throw ConfigError(location(source, e.mark) + ": " + e.msg);
    }
  }
  for (const auto& o : overrides) apply_override(o, cfg);
  validate(cfg);
  cfg.model.moe.router.expert_groups = expert_groups(cfg);
  return cfg;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  return parse_config(read_file(path), path, overrides);
}

void validate(const Config& cfg) {
  // Each key on its own, in table order.
  for (const auto& k : keys()) {
    const Allowed& a = k.allowed;
    std::string text = value_text(k, cfg);
    if (k.field.index() == kStrings) {
      std::set<std::string> seen;
      for (const auto& item : std::get<kStrings>(k.field)(const_cast<Config&>(cfg))) {
        if (std::find(a.one_of.begin(), a.one_of.end(), item) == a.one_of.end())
          throw ConfigError(k.path + " holds " + in_quotes(item) + ": each item must be one of: " + join(a.one_of, ", "));
        if (!a.repeats && !seen.insert(item).second) throw ConfigError(k.path + " holds " + in_quotes(item) + " twice");
      }
      continue;
    }
    if (k.field.index() == kString) {
      if (!a.one_of.empty() && std::find(a.one_of.begin(), a.one_of.end(), text) == a.one_of.end())
        throw ConfigError(k.path + " = " + in_quotes(text) + " must be one of: " + join(a.one_of, ", "));
      if (a.non_empty && text.empty()) throw ConfigError(k.path + " = \"\" must not be empty");
      continue;
    }
    double v;
    Config& c = const_cast<Config&>(cfg);  // accessors are shared with the setters; only read here
    if (k.field.index() == kInt)
      v = std::get<kInt>(k.field)(c);
    else if (k.field.index() == kDouble)
      v = std::get<kDouble>(k.field)(c);
    else if (k.field.index() == kOptDouble && std::get<kOptDouble>(k.field)(c))
      v = *std::get<kOptDouble>(k.field)(c);
    else
      continue;
    if (!std::isfinite(v)) throw ConfigError(k.path + " = " + text + " must be a finite number");
    bool ok = (!a.lo || (a.lo_open ? v > *a.lo : v >= *a.lo)) && (!a.hi || (a.hi_open ? v < *a.hi : v <= *a.hi));
    if (!ok) throw ConfigError(k.path + " = " + text + " must be " + bounds_text(a));
  }

  // Relations between keys; the per-key checks above rule out zero divisors.
  const ModelConfig& m = cfg.model;
  auto kv = [](const char* path, auto v) { return std::string(path) + " = " + std::to_string(v); };
  if (m.n_heads % m.n_kv_heads != 0)
    throw ConfigError(kv("model.n_kv_heads", m.n_kv_heads) + " must divide " + kv("model.n_heads", m.n_heads));
  if (m.head_dim == 0 && m.d_model % m.n_heads != 0)
    throw ConfigError(kv("model.d_model", m.d_model) + " must be divisible by " + kv("model.n_heads", m.n_heads) +
                      " when model.head_dim = 0 (or set model.head_dim)");
  if (m.head_dim % 2 != 0)
    throw ConfigError(kv("model.head_dim", m.head_dim) + " must be even (RoPE rotates pairs of dimensions)");
  if (m.head_dim == 0 && (m.d_model / m.n_heads) % 2 != 0)
    throw ConfigError("head dim model.d_model / model.n_heads = " + std::to_string(m.d_model) + " / " +
                      std::to_string(m.n_heads) + " = " + std::to_string(m.d_model / m.n_heads) +
                      " must be even (RoPE rotates pairs of dimensions); change model.d_model or set model.head_dim");
  if (m.rotary_dim % 2 != 0)
    throw ConfigError(kv("model.rotary_dim", m.rotary_dim) + " must be even (RoPE rotates pairs of dimensions)");
  if (m.attention == "gqa" && m.rotary_dim > head_dim(m))
    throw ConfigError(kv("model.rotary_dim", m.rotary_dim) + " must be at most the head dim (" +
                      std::to_string(head_dim(m)) + ")");
  if (m.attention == "mla" && m.rotary_dim != 0)
    throw ConfigError(kv("model.rotary_dim", m.rotary_dim) + " must be 0 with model.attention = mla (MLA rotates "
                      "model.mla.qk_rope_head_dim dims)");
  if (m.attention == "mla" && m.attn_bias != "none")
    throw ConfigError("model.attn_bias = " + m.attn_bias + " must be none with model.attention = mla (MLA's "
                      "projections have no biases)");
  if (m.attention == "mla" && m.attention_sinks)
    throw ConfigError("model.attention_sinks = true must be false with model.attention = mla (sinks are GQA's)");
  if (m.attention == "mla" && m.sliding_window > 0)
    throw ConfigError(kv("model.sliding_window", m.sliding_window) + " must be 0 with model.attention = mla "
                      "(sliding windows are GQA's)");
  if (!m.layer_types.empty() && m.sliding_window == 0)
    throw ConfigError("model.layer_types [" + join(m.layer_types, ", ") + "] needs model.sliding_window > 0 "
                      "(the window of its sliding layers)");
  if (!m.layer_types.empty() && m.n_layers % int(m.layer_types.size()) != 0)
    throw ConfigError("model.layer_types has " + std::to_string(m.layer_types.size()) + " entries, which must divide " +
                      kv("model.n_layers", m.n_layers) + " (the pattern is cycled over the blocks)");
  if (m.mla.qk_rope_head_dim % 2 != 0)
    throw ConfigError(kv("model.mla.qk_rope_head_dim", m.mla.qk_rope_head_dim) +
                      " must be even (RoPE rotates pairs of dimensions)");
  if (!m.init_from.empty() && m.init_from.rfind("hf:", 0) != 0 && m.init_from.rfind("ckpt:", 0) != 0)
    throw ConfigError("model.init_from = \"" + m.init_from +
                      "\" must be \"\", hf:DIR (a Hugging Face folder) or ckpt:DIR (a moetrain run or checkpoint of this architecture)");
  if (m.dense_layers > m.n_layers)
    throw ConfigError(kv("model.dense_layers", m.dense_layers) + " must be in [0, " +
                      kv("model.n_layers", m.n_layers) + "]");
  if (m.moe.top_k > m.moe.n_experts)
    throw ConfigError(kv("model.moe.top_k", m.moe.top_k) + " must be in [1, " +
                      kv("model.moe.n_experts", m.moe.n_experts) + "]");
  const RouterConfig& r = m.moe.router;
  if (m.moe.n_experts % r.n_groups != 0)
    throw ConfigError(kv("model.moe.n_experts", m.moe.n_experts) + " must be divisible by " +
                      kv("model.moe.router.n_groups", r.n_groups));
  if (r.topk_groups > r.n_groups)
    throw ConfigError(kv("model.moe.router.topk_groups", r.topk_groups) + " must be in [1, " +
                      kv("model.moe.router.n_groups", r.n_groups) + "]");
  if (m.moe.top_k > r.topk_groups * (m.moe.n_experts / r.n_groups))
    throw ConfigError(kv("model.moe.top_k", m.moe.top_k) + " must be at most the experts eligible per token, " +
                      "model.moe.router.topk_groups * model.moe.n_experts / model.moe.router.n_groups = " +
                      std::to_string(r.topk_groups * (m.moe.n_experts / r.n_groups)));
  if (m.moe.n_experts % cfg.parallel.expert_parallel != 0)
    throw ConfigError(kv("model.moe.n_experts", m.moe.n_experts) + " must be divisible by " +
                      kv("parallel.expert_parallel", cfg.parallel.expert_parallel));
  const int ep = cfg.parallel.expert_parallel, ranks_per_node = cfg.parallel.ranks_per_node;
  if (ranks_per_node > 0 && ep % ranks_per_node != 0)
    throw ConfigError(kv("parallel.ranks_per_node", ranks_per_node) + " must divide " +
                      kv("parallel.expert_parallel", ep) + " (a node holds whole EP ranks)");
  if (r.max_groups_per_token > 0) {
    const int M = r.max_groups_per_token, groups = expert_groups(cfg);
    const std::string groups_text = r.expert_groups > 0 ? "the router's expert_groups = " + std::to_string(groups)
                                    : ranks_per_node > 0 ? "the nodes, parallel.expert_parallel / parallel.ranks_per_node = " +
                                                               std::to_string(ep) + " / " + std::to_string(ranks_per_node) +
                                                               " = " + std::to_string(groups)
                                                         : "the expert groups, parallel.expert_parallel = " + std::to_string(ep);
    if (r.n_groups > 1)
      throw ConfigError(kv("model.moe.router.max_groups_per_token", M) + " and " + kv("model.moe.router.n_groups", r.n_groups) +
                        " cannot both limit the routing: set max_groups_per_token = 0 or n_groups = 1");
    if (m.moe.n_experts % groups != 0)
      throw ConfigError(kv("model.moe.n_experts", m.moe.n_experts) + " must be divisible by " + groups_text +
                        " (model.moe.router.max_groups_per_token groups experts by rank)");
    if (M > groups)
      throw ConfigError(kv("model.moe.router.max_groups_per_token", M) + " must be at most " + groups_text);
    if (m.moe.top_k > M * (m.moe.n_experts / groups))
      throw ConfigError(kv("model.moe.top_k", m.moe.top_k) + " must be at most the experts eligible per token, "
                        "model.moe.router.max_groups_per_token * model.moe.n_experts / groups = " + std::to_string(M) +
                        " * " + std::to_string(m.moe.n_experts) + " / " + std::to_string(groups) + " = " +
                        std::to_string(M * (m.moe.n_experts / groups)));
  }
  if (cfg.data.seq_len > m.max_seq_len)
    throw ConfigError(kv("data.seq_len", cfg.data.seq_len) + " must be in [1, " +
                      kv("model.max_seq_len", m.max_seq_len) + "]");
  if (m.mtp_depth >= cfg.data.seq_len)
    throw ConfigError(kv("model.mtp_depth", m.mtp_depth) + " must be less than " + kv("data.seq_len", cfg.data.seq_len) +
                      " (MTP depth k predicts token i+k+1 inside the sequence)");
  for (size_t i = 0; i < cfg.data.sources.size(); ++i) {
    const DataSource& source = cfg.data.sources[i];
    const std::string entry = "data.sources[" + std::to_string(i) + "]";
    if (source.dir.empty()) throw ConfigError(entry + ".dir = \"\" must name a folder");
    if (!std::isfinite(source.weight) || source.weight <= 0)
      throw ConfigError(entry + ".weight = " + format_number(source.weight) + " must be > 0 (source " +
                        in_quotes(source.name.empty() ? source.dir : source.name) + ")");
  }
  if (!cfg.data.sources.empty()) {  // shares are weight / sum: the sum must be a finite number too
    double sum = 0;
    for (const auto& source : cfg.data.sources) sum += source.weight;
    if (!std::isfinite(sum))
      throw ConfigError("data.sources: the weights sum to " + format_number(sum) +
                        ", beyond the range of a double; give relative weights (e.g. 0.7 and 0.3)");
  }
  if (cfg.optim.min_lr > cfg.optim.lr)
    throw ConfigError("optim.min_lr = " + format_number(cfg.optim.min_lr) + " must be <= optim.lr = " +
                      format_number(cfg.optim.lr));
  {
    // The optimizer computes in fp32: past float's range a value would stop the first step with LibTorch's
    // "cannot be converted to type float without overflow".
    const OptimConfig& o = cfg.optim;
    const double float_max = std::numeric_limits<float>::max();
    const std::pair<const char*, double> float_keys[] = {
        {"optim.lr", o.lr},       {"optim.min_lr", o.min_lr}, {"optim.weight_decay", o.weight_decay},
        {"optim.beta1", o.beta1}, {"optim.beta2", o.beta2},   {"optim.eps", o.eps},
        {"optim.grad_clip", o.grad_clip}, {"optim.qk_clip_tau", o.qk_clip_tau}};
    for (const auto& [key, v] : float_keys) {
      if (std::abs(v) > float_max)
        throw ConfigError(std::string(key) + " = " + format_number(v) +
                          " is beyond float32's range (at most 3.4e+38): the optimizer computes in fp32");
    }
    // So are the factors a step applies: the decay 1 - lr * weight_decay, and lr / (1 - beta1^t), the
    // step size, largest at the first step.
    if (o.lr * o.weight_decay > float_max)
      throw ConfigError("optim.lr * optim.weight_decay = " + format_number(o.lr * o.weight_decay) +
                        " is beyond float32's range: the weight decay is applied in fp32");
    if (o.lr / (1 - o.beta1) > float_max)
      throw ConfigError("optim.lr / (1 - optim.beta1) = " + format_number(o.lr / (1 - o.beta1)) +
                        " (AdamW's first step size) is beyond float32's range");
  }
  if (cfg.train.grad_accum == 0 && cfg.train.global_batch_size == 0)
    throw ConfigError("train.grad_accum = 0 (derived) needs train.global_batch_size > 0 to derive it from");
  const int pp = cfg.parallel.pipeline_parallel;
  if (pp > m.n_layers)
    throw ConfigError(kv("parallel.pipeline_parallel", pp) + " must be at most " + kv("model.n_layers", m.n_layers) +
                      " (each stage holds at least one block)");
  if (pp > 1 && cfg.train.grad_accum > 0 && cfg.train.grad_accum < pp)
    throw ConfigError(kv("train.grad_accum", cfg.train.grad_accum) + " must be at least " +
                      kv("parallel.pipeline_parallel", pp) +
                      " (the 1F1B schedule fills the pipeline with the step's micro-batches)");
  explicit_pp_layers(cfg);  // throws on a malformed list
  if (const double tau = cfg.optim.qk_clip_tau; tau > 0) {
    const std::string clip = "optim.qk_clip_tau = " + format_number(tau);
    if (cfg.train.lora.rank > 0)
      throw ConfigError(clip + " cannot run with " + kv("train.lora.rank", cfg.train.lora.rank) +
                        " (the clip would rescale the frozen base); set optim.qk_clip_tau 0");
    if (m.attention == "gqa" && m.qk_norm != "none")
      throw ConfigError(clip + " cannot run with model.qk_norm = " + m.qk_norm +
                        " (the norm undoes a rescaled projection, and bounds the logits already); set one of them off");
    if (cfg.parallel.zero == 1 && cfg.run.dtype == "bf16")
      throw ConfigError(clip + " cannot run with parallel.zero = 1 under run.dtype = bf16 (the sharded fp32 masters "
                        "are not rescaled); use parallel.zero 0 or run.dtype fp32");
  }
  const LoraConfig& lora = cfg.train.lora;
  if (lora.rank > 0) {
    if (lora.targets.empty())
      throw ConfigError(kv("train.lora.rank", lora.rank) + " needs train.lora.targets: at least one of q, k, v, kv, o, "
                        "experts, shared_experts, dense_mlp");
    for (const auto& t : lora.targets)
      if (m.attention == "mla" && (t == "k" || t == "v"))
        throw ConfigError("train.lora.targets holds \"" + t + "\": with model.attention = mla keys and values come from "
                          "one latent; use kv (wkv_a and wkv_b), q and o");
    if (lora.dropout > 0 && cfg.train.activation_checkpointing == "full")
      throw ConfigError("train.lora.dropout = " + format_number(lora.dropout) +
                        " needs train.activation_checkpointing none or selective (a recomputed block would draw "
                        "other dropout masks than its forward)");
  }
  const RLConfig& rl = cfg.rl;
  if (rl.reward == "command" && rl.reward_command.empty())
    throw ConfigError("rl.reward = command needs rl.reward_command: the program that scores the completions");
  if (rl.reward != "command" && !rl.reward_command.empty())
    throw ConfigError("rl.reward_command is set but rl.reward = " + rl.reward + " does not use it (set rl.reward: command)");
  if (rl.clip_eps_high > 0 && rl.clip_eps_high < rl.clip_eps)
    throw ConfigError("rl.clip_eps_high (" + format_number(rl.clip_eps_high) + ") must be at least rl.clip_eps (" +
                      format_number(rl.clip_eps) + ") or 0 (= rl.clip_eps)");
}

std::vector<int> explicit_pp_layers(const Config& cfg) {
  const std::string& text = cfg.parallel.pp_layers;
  if (text.empty()) return {};
  const std::string key = "parallel.pp_layers = \"" + text + "\"";
  std::vector<int> counts;
  int64_t sum = 0;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    item.erase(0, item.find_first_not_of(" "));
    item.erase(item.find_last_not_of(" ") + 1);
    int v = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || end != item.data() + item.size() || v < 1)
      throw ConfigError(key + ": \"" + item + "\" is not a positive number of blocks");
    counts.push_back(v);
    sum += v;
  }
  if (int(counts.size()) != cfg.parallel.pipeline_parallel)
    throw ConfigError(key + " lists " + std::to_string(counts.size()) + " stages but parallel.pipeline_parallel = " +
                      std::to_string(cfg.parallel.pipeline_parallel));
  if (sum != cfg.model.n_layers)
    throw ConfigError(key + " sums to " + std::to_string(sum) + " blocks but model.n_layers = " +
                      std::to_string(cfg.model.n_layers));
  return counts;
}

int expert_groups(const Config& cfg) {
  if (cfg.model.moe.router.expert_groups > 0) return cfg.model.moe.router.expert_groups;
  const int ep = std::max(cfg.parallel.expert_parallel, 1), ranks_per_node = cfg.parallel.ranks_per_node;
  return ranks_per_node > 0 && ep % ranks_per_node == 0 ? ep / ranks_per_node : ep;
}

Config for_world_size(Config cfg, int world_size) {
  cfg.model.moe.router.expert_groups = expert_groups(cfg);  // a config built in code, not loaded
  TrainConfig& t = cfg.train;
  if (world_size < 1) throw ConfigError("world size " + std::to_string(world_size) + " must be at least 1");
  if (t.global_batch_size == 0) return cfg;
  // (world_size here is the ranks that read data: the world divided by the pipeline stages.)
  const std::string global = "train.global_batch_size = " + std::to_string(t.global_batch_size);
  const std::string world = "world size " + std::to_string(world_size);
  if (t.grad_accum == 0) {  // the micro-batch is given (it is what fits in memory); accumulation fills the rest
    const int64_t per_accum = int64_t(world_size) * t.micro_batch_size;
    if (t.global_batch_size % per_accum != 0)
      throw ConfigError(global + " is not divisible by " + world + " x train.micro_batch_size " +
                        std::to_string(t.micro_batch_size) + " (train.grad_accum = 0 derives the accumulation)");
    t.grad_accum = int(t.global_batch_size / per_accum);
    return cfg;
  }
  if (t.global_batch_size % (int64_t(world_size) * t.grad_accum) != 0)
    throw ConfigError(global + " is not divisible by " + world + " x train.grad_accum " + std::to_string(t.grad_accum) +
                      " (or set train.grad_accum = 0 to derive it from train.micro_batch_size)");
  const int derived = int(t.global_batch_size / (int64_t(world_size) * t.grad_accum));
  if (t.micro_batch_size != TrainConfig{}.micro_batch_size && t.micro_batch_size != derived)
    throw ConfigError("train.micro_batch_size = " + std::to_string(t.micro_batch_size) + " conflicts with " + global +
                      " at " + world + " (which gives " + std::to_string(derived) +
                      "); set one of them (train.global_batch_size=0 keeps micro_batch_size), or set "
                      "train.grad_accum = 0 to keep the micro-batch and derive the accumulation");
  t.micro_batch_size = derived;
  return cfg;
}

std::string to_yaml(const Config& cfg) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  std::vector<std::string> open;  // sections currently open, outermost first
  for (const auto& k : keys()) {
    auto parts = split_path(k.path);
    std::vector<std::string> section(parts.begin(), parts.end() - 1);
    size_t common = 0;
    while (common < open.size() && common < section.size() && open[common] == section[common]) ++common;
    while (open.size() > common) {
      out << YAML::EndMap;
      open.pop_back();
    }
    while (open.size() < section.size()) {
      out << YAML::Key << section[open.size()] << YAML::Value << YAML::BeginMap;
      open.push_back(section[open.size()]);
    }
    out << YAML::Key << parts.back() << YAML::Value;
    if (k.field.index() == kSources) {
      out << YAML::BeginSeq;
      for (const auto& source : std::get<kSources>(k.field)(const_cast<Config&>(cfg)))
        out << YAML::BeginMap << YAML::Key << "dir" << YAML::Value << YAML::DoubleQuoted << source.dir
            << YAML::Key << "weight" << YAML::Value << format_number(source.weight) << YAML::Key << "name"
            << YAML::Value << YAML::DoubleQuoted << source.name << YAML::EndMap;
      out << YAML::EndSeq;
    } else if (k.field.index() == kStrings) {
      out << YAML::Flow << YAML::BeginSeq;
      for (const auto& item : std::get<kStrings>(k.field)(const_cast<Config&>(cfg))) out << item;
      out << YAML::EndSeq;
    } else if (k.field.index() == kString)
      out << YAML::DoubleQuoted << value_text(k, cfg);  // quoted so "123", "~" or "true" stay strings
    else if (k.field.index() == kOptDouble && !std::get<kOptDouble>(k.field)(const_cast<Config&>(cfg)))
      out << YAML::Null;
    else
      out << value_text(k, cfg);
  }
  while (!open.empty()) {
    out << YAML::EndMap;
    open.pop_back();
  }
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

std::vector<std::pair<std::string, std::string>> flatten(const Config& cfg) {
  std::vector<std::pair<std::string, std::string>> rows;
  for (const auto& k : keys()) rows.emplace_back(k.path, value_text(k, cfg));
  return rows;
}

std::vector<KeyDoc> reference() {
  const Config defaults;
  std::vector<KeyDoc> docs;
  for (const auto& k : keys()) docs.push_back({k.path, value_text(k, defaults), type_text(k), k.meaning});
  return docs;
}

std::string reference_markdown() {
  std::string md =
      "| key | type | default | meaning |\n"
      "|---|---|---|---|\n";
  for (const auto& d : reference()) {
    std::string def = d.default_value.empty() ? "\"\"" : d.default_value;
    md += "| `" + d.key + "` | " + escape_markdown_cell(d.type) + " | `" + escape_markdown_cell(def) + "` | " +
          escape_markdown_cell(d.meaning) + " |\n";
  }
  return md;
}

}  // namespace moetrain::config
