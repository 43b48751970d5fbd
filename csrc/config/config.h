// The run configuration: plain structs with defaults, one per section of the YAML file.
// Loading, validation (with key paths), --set overrides and dumping live in config.cpp; components
// take the struct they need and never see YAML.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace moetrain::config {

struct RunConfig {
  std::string name = "tiny";
  std::string out_dir = "runs/tiny";
  uint64_t seed = 1337;
  std::string device = "cpu";   // cpu | cuda
  std::string dtype = "fp32";   // fp32 | bf16 (parameters and activations; router math is fp32)
  int threads = 0;              // CPU intra-op threads; 0 = OMP_NUM_THREADS if set, else cores / local ranks
  bool deterministic = false;   // deterministic kernels everywhere (bit-exact reruns on a GPU too)
  bool keep_compute_copies = true;  // bf16: one kept copy of each weight per update, not a cast per use
};

// Routing: how scores are computed and which experts each token is sent to.
struct RouterConfig {
  std::string score_func = "softmax";  // softmax | sigmoid
  bool normalize_topk = true;           // renormalize the k chosen weights to sum to 1
  double routed_scaling = 1.0;          // multiplies the routed output (DeepSeek-V3: 2.5)
  int n_groups = 1;                     // group-limited routing: experts split into n_groups groups
  int topk_groups = 1;                  // ... of which the best topk_groups are eligible per token
  std::string group_score = "top2_sum"; // a group's score: top2_sum (DeepSeek-V3) | max (DeepSeek-V2)
  double bias_update_rate = 0.0;        // aux-loss-free balancing bias step; 0 = off
  bool selection_bias = false;          // keep the selection bias even when it is not updated (imports)
  // A learned per-expert bias added to the logits before top-k and the weights' softmax (gpt-oss's
  // router.bias): it trains, unlike the selection bias above, which only picks experts.
  bool logit_bias = false;
  int max_groups_per_token = 0;         // node-limited routing: a token's top-k on at most this many expert
                                        // groups (EP ranks, or nodes of parallel.ranks_per_node); 0 = off
  // Not a key: how many expert groups max_groups_per_token counts, derived from parallel.* when the
  // config is loaded (expert_groups()), so the router needs no ranks. 0 = not derived yet.
  int expert_groups = 0;
};

struct MoEConfig {
  int n_experts = 8;            // routed experts per MoE layer
  int top_k = 2;                // experts chosen per token
  int expert_hidden = 512;      // SwiGLU hidden size of each routed expert
  // The routed experts' gated product: swiglu silu(gate) * up; swiglu_clamped (gpt-oss) clamps gate to
  // <= 7 and up to [-7, 7], then gate * sigmoid(1.702 gate) * (up + 1).
  std::string activation = "swiglu";
  int n_shared_experts = 1;     // always-on experts, summed with the routed output
  int shared_hidden = 0;        // hidden size of each shared expert; 0 = expert_hidden
  bool shared_gate = false;     // scale the shared experts' output by sigmoid(x . w_gate) (Qwen2-MoE)
  std::optional<double> capacity_factor;  // null = dropless; else capacity ceil(cf * T * K / E)
  double aux_loss_coef = 0.01;      // switch/GShard load-balancing loss over the batch
  double seq_aux_loss_coef = 0.0;   // DeepSeek-V3 sequence-wise balance loss
  double z_loss_coef = 0.0;         // router z-loss (ST-MoE)
  std::string experts_impl = "auto";  // auto | grouped_mm | sliced
  // Biases on each routed expert's gate, up and down projections (gpt-oss); the down bias is part of the
  // expert's output, so the routing weight scales it too.
  bool expert_bias = false;
  RouterConfig router;
};

// Multi-head latent attention (DeepSeek-V2/V3): keys and values pass through a low-rank latent.
struct MLAConfig {
  int q_lora_rank = 0;          // rank of the query down-projection; 0 = a full-rank wq
  int kv_lora_rank = 512;       // rank of the joint key/value latent
  int qk_nope_head_dim = 128;   // per-head query/key dims without RoPE
  int qk_rope_head_dim = 64;    // per-head query/key dims with RoPE (the key part is shared by all heads)
  int v_head_dim = 128;         // per-head value dims
};

// YaRN RoPE extension (DeepSeek-V3): frequencies interpolated between beta_fast and beta_slow rotations
// over the original context, cos/sin and (MLA) the softmax scaled. factor 1 = plain RoPE.
struct YarnConfig {
  double factor = 1.0;
  int original_max_seq_len = 0;  // the context of pretraining; 0 = model.max_seq_len
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  // Floor/ceil the interpolation ramp's ends to whole dimensions (DeepSeek-V3); gpt-oss keeps them
  // fractional (its rope_scaling "truncate": false).
  bool truncate = true;
};

struct ModelConfig {
  int vocab_size = 256;
  int d_model = 256;
  int n_layers = 4;
  int n_heads = 8;
  int n_kv_heads = 4;           // grouped-query attention; must divide n_heads
  int head_dim = 0;             // 0 = d_model / n_heads
  std::string attention = "gqa"; // gqa | mla (model.mla.*)
  std::string attn_bias = "none"; // none | qkv (q, k, v biases: Qwen2-MoE, GLM-4.5) | all (also o)
  std::string qk_norm = "none"; // none | head (RMSNorm per head, Qwen3-MoE) | full (whole projection, OLMoE)
  int rotary_dim = 0;           // GQA: RoPE on the first rotary_dim dims of each q/k head (GLM-4.5: half); 0 = all
  bool attention_sinks = false; // GQA: a learned logit per query head in each softmax's denominator (gpt-oss)
  int sliding_window = 0;       // GQA: sliding layers attend to the last sliding_window tokens (itself included); 0 = none
  std::vector<std::string> layer_types;  // sliding | full per block, cycled; empty = all sliding when sliding_window > 0
  int max_seq_len = 256;        // RoPE table length; longest context
  int dense_layers = 1;         // the first dense_layers blocks use a dense SwiGLU MLP, the rest MoE
  int dense_hidden = 1024;      // hidden size of the dense MLP
  double rope_theta = 10000.0;
  double norm_eps = 1e-5;
  bool tie_embeddings = true;   // LM head shares the token embedding matrix
  double init_std = 0.02;
  int mtp_depth = 0;            // multi-token prediction modules (DeepSeek-V3 section 2.2); 0 = off
  double mtp_loss_weight = 0.3; // lambda: the MTP term is lambda * mean over depths of their losses
  std::string init_from;        // "" = seeded init; hf:DIR = weights (and architecture) of a Hugging Face folder
  MLAConfig mla;
  YarnConfig yarn;
  MoEConfig moe;
};

// One entry of data.sources: a folder of shards and its share of the training sequences.
struct DataSource {
  std::string dir;
  double weight = 1;  // > 0; the blend normalises the weights
  std::string name;   // "" = the folder's last component
};

struct DataConfig {
  std::string dir = "data/fortunes";  // holds train.bin and val.bin (moetrain prepare-data)
  int seq_len = 256;                  // tokens per training sequence; <= model.max_seq_len
  std::vector<DataSource> sources;    // a blend; when non-empty it replaces data.dir
  std::string packing = "stream";     // stream (windows of the token stream) | documents (whole, packed)
  bool truncate = true;               // documents: a document longer than seq_len is cut (or an error)
};

struct OptimConfig {
  std::string name = "adamw";   // adamw | muon (optim/muon.h: hidden matrices on Muon, the rest on AdamW)
  double lr = 1e-3;             // peak learning rate
  double min_lr = 1e-4;         // floor of the cosine decay
  int warmup_steps = 50;
  std::string schedule = "cosine";  // cosine | constant (both after linear warmup)
  int decay_steps = 0;          // cosine horizon in steps; 0 = train.steps (set it to keep the
                                // schedule fixed when train.steps is overridden)
  double weight_decay = 0.1;    // not applied to norms, biases or embeddings
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double grad_clip = 1.0;       // max global grad norm; 0 = off
  double momentum = 0.95;       // Muon's Nesterov momentum
  double qk_clip_tau = 0;       // MuonClip's QK-clip: the largest pre-softmax logit a head keeps; 0 = off (optim/qk_clip.h)
};

// train.lora: low-rank adapters (Hu et al. 2021) on a frozen base, y = x W + dropout(x) A B * alpha / rank.
// Targets: q, k, v, o (GQA's wq, wk, wv, wo; "kv" is k and v together); with MLA, q (wq, or wq_a and
// wq_b), kv (wkv_a and wkv_b) and o (wo); experts (each routed expert's w1, w3, w2), shared_experts
// (the shared experts' w1, w3, w2), dense_mlp (the dense blocks' w1, w3, w2).
struct LoraConfig {
  int rank = 0;                 // 0 = off: every weight trains
  double alpha = 16;            // the adapters' scale is alpha / rank
  double dropout = 0;           // on the adapters' input, while training
  std::vector<std::string> targets = {"q", "kv", "o", "experts", "shared_experts", "dense_mlp"};
};

struct TrainConfig {
  int steps = 1000;
  int micro_batch_size = 16;    // sequences per micro-batch per rank
  int global_batch_size = 0;    // sequences per optimizer step over all ranks; 0 = micro_batch_size * grad_accum * world
  int grad_accum = 1;           // micro-batches per optimizer step; 0 = derived (see for_world_size)
  int loss_chunk_tokens = 0;    // LM head + loss over this many tokens at a time; 0 = all at once
  std::string activation_checkpointing = "none";  // none | full (each block recomputed in backward)
  int log_every = 10;
  int eval_every = 100;         // 0 = only at the end
  int eval_batches = 8;         // validation micro-batches per evaluation
  std::string nonfinite = "skip";  // a step with a non-finite loss or gradient: skip its update | stop the run
  int max_skipped_steps = 3;    // with skip: consecutive skipped steps tolerated before the run stops
  LoraConfig lora;
};

struct LoggingConfig {
  bool tensorboard = false;     // also write TensorBoard event files under <out_dir>/tb/ (rank 0)
};

struct ParallelConfig {
  std::string backend = "auto"; // auto | nccl | store | single
  int expert_parallel = 1;
  int zero = 0;                 // ZeRO stage: 0 = every replica holds all optimizer state; 1 = sharded over the replicas
  int pipeline_parallel = 1;    // pipeline stages (pp): world = pp x data-parallel ranks
  int ranks_per_node = 0;       // EP ranks per node: node-limited routing groups nodes, not ranks; 0 = unset
  std::string pp_layers;        // blocks per stage, "6,5,5"; "" = balanced by per-layer FLOPs (cost::pipeline_layers)
  bool overlap_grad_reduce = true;  // reduce gradient buckets during backward, as each completes
  double grad_bucket_mb = 32;   // gradient bytes per reduction bucket (MiB); also ZeRO-1's shard buckets
  int timeout_s = 600;
};

struct CheckpointConfig {
  int every = 0;                // steps between checkpoints; 0 = only at the end
  int keep_last = 0;            // 0 = keep all
  int keep_every = 0;           // also keep milestones: steps that are multiples of it; 0 = none
  std::string verify = "full";  // full (sizes and sha256) | size
  bool async = false;           // write checkpoints on a background thread while training goes on
};

struct CostConfig {
  std::string gpu = "cpu";      // hardware name for MFU
  double price_per_gpu_hour = 2.0;
};

// rl: GRPO (`moetrain rl`, DeepSeekMath / DeepSeek-R1). For each prompt, group_size completions are
// sampled and rewarded; advantages are normalised within the group; the policy takes a clipped surrogate
// step. train.steps counts rollout batches; each runs updates_per_batch optimizer steps.
struct RLConfig {
  std::string prompts;               // .jsonl of {"prompt": text, "answer": text}, or a prepare-data --rl folder (or its .bin)
  std::string eval_prompts;          // held-out prompts, either form: greedy exact-match accuracy at start, eval_every, end; "" = none
  int eval_limit = 0;                // evaluate at most this many held-out prompts; 0 = all
  int prompts_per_step = 8;          // prompts per rollout batch over all data-parallel ranks
  int group_size = 8;                // G: completions sampled per prompt
  int max_new_tokens = 32;           // completion length limit
  double temperature = 1.0;          // rollout sampling temperature (> 0)
  std::string stop;                  // byte sets: characters (bytes) that end a completion, kept in it; "" = none
  std::string advantage = "group_norm";       // group_norm: (r - mean) / (std + eps) | mean_only: r - mean (Dr. GRPO)
  double clip_eps = 0.2;             // ratio clipped to [1 - clip_eps, 1 + clip_eps_high]
  double clip_eps_high = 0.0;        // the upper clip (DAPO); 0 = clip_eps
  std::string loss_aggregation = "token";     // token: mean over all response tokens | sequence: mean of per-sequence means
  std::string ratio = "token";       // token | sequence (GSPO: geometric mean of the token ratios, clipped per sequence)
  double kl_coef = 0.0;              // k3 KL penalty to the frozen initial model; 0 = no reference is loaded
  int updates_per_batch = 1;         // optimizer steps per rollout batch (old log-probs from the rollout)
  int micro_batch_rows = 0;          // completions per forward/backward pass of the updates on each rank; 0 = all at once
  std::string reward = "exact_answer";        // exact_answer | command (reward_command)
  std::string answer_from = "tag";   // where exact_answer finds the answer: tag (<answer_tag>...</answer_tag>) | boxed (\boxed{...}) | whole (the completion less the stop)
  std::string answer_tag = "answer";
  double format_reward = 0.0;        // added for the R1 template <think>...</think><answer>...</answer>; 0 = off
  std::string reward_command;        // a program: JSON lines {prompt, completion, answer} in, one number per line out
  double reward_timeout_s = 60;      // the reward command's time limit per rollout batch
  bool routing_replay = false;       // the update's forward uses the experts each token was routed to in the rollout
};

struct Config {
  RunConfig run;
  ModelConfig model;
  DataConfig data;
  OptimConfig optim;
  TrainConfig train;
  LoggingConfig logging;
  ParallelConfig parallel;
  CheckpointConfig checkpoint;
  CostConfig cost;
  RLConfig rl;
};

// Reads a YAML file, applies `key.path=value` overrides, validates. Throws ConfigError naming the
// file (with line:col for syntax errors) or the key path, the value and what is allowed.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from YAML text; `source` names it in messages.
Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides = {});
// Checks every value and the relations between them; throws ConfigError on the first problem.
void validate(const Config& cfg);
// The config as one rank of a job of `world_size` ranks runs it: with train.global_batch_size set,
// train.micro_batch_size (or, at train.grad_accum = 0, grad_accum) is derived so that every world size
// takes the same sequences per step. Throws ConfigError naming the keys when the sizes do not divide.
Config for_world_size(Config cfg, int world_size);
// parallel.pp_layers as numbers: one count of blocks per stage; empty when the key is "" (balanced).
// A list that is not parallel.pipeline_parallel positive integers summing to model.n_layers is a
// ConfigError naming the key.
std::vector<int> explicit_pp_layers(const Config& cfg);
// The resolved config as YAML that parse_config reads back to an equal config.
std::string to_yaml(const Config& cfg);
// (key path, value text) for every key, in declaration order: the start-up table.
std::vector<std::pair<std::string, std::string>> flatten(const Config& cfg);
// (key path, default, meaning) for every key: the README reference and `moetrain config --reference`.
struct KeyDoc {
  std::string key, default_value, type, meaning;
};
std::vector<KeyDoc> reference();
// reference() as the markdown table in docs/config-reference.md (a test keeps the file in sync).
std::string reference_markdown();

// The expert groups of node-limited routing (model.moe.router.max_groups_per_token): one per node of
// parallel.ranks_per_node EP ranks when that is set, else one per EP rank; each holds a contiguous
// n_experts / groups experts, as the expert shards do. The router's own expert_groups when set.
int expert_groups(const Config& cfg);

// Derived values used throughout.
inline int head_dim(const ModelConfig& m) { return m.head_dim > 0 ? m.head_dim : m.d_model / m.n_heads; }
// The attention window of block `layer` (model.layer_types cycled; MTP depth k is block n_layers + k - 1):
// model.sliding_window for a sliding layer, 0 (full causal attention) otherwise.
inline int attention_window(const ModelConfig& m, int layer) {
  if (m.sliding_window <= 0) return 0;
  if (m.layer_types.empty()) return m.sliding_window;
  return m.layer_types[size_t(layer) % m.layer_types.size()] == "sliding" ? m.sliding_window : 0;
}
// The dims of each q/k head RoPE rotates: MLA's qk_rope_head_dim, else model.rotary_dim or the whole head.
inline int rotary_dim(const ModelConfig& m) {
  return m.attention == "mla" ? m.mla.qk_rope_head_dim : m.rotary_dim > 0 ? m.rotary_dim : head_dim(m);
}
inline int shared_hidden(const MoEConfig& m) { return m.shared_hidden > 0 ? m.shared_hidden : m.expert_hidden; }

}  // namespace moetrain::config
