// The memory plan of one rank (see plan.h).
#include "cost/plan.h"

#include <algorithm>

#include "common/errors.h"
#include "cost/flops.h"
#include "cost/hardware.h"
#include "cost/memory.h"

namespace moetrain::cost {

namespace {

constexpr double kBucketBytes = 32.0 * 1024 * 1024;  // dist::DataParallel's and ZeRO-1's gradient buckets

// Bytes autograd keeps per token for one block, and for the final norm. `cb` is the compute dtype's
// size (4 fp32, 2 bf16). Matmuls keep their input; RMSNorm keeps its fp32 input and normalized output
// (and in bf16 the cast the next matmul keeps); RoPE keeps only its cos/sin tables; SDPA keeps q, k
// and v (k and v repeated to every query head) and its output, and the output projection its
// reshaped copy; SwiGLU keeps both projections, the SiLU and their product; a routed row keeps its
// input and output rows (the combine's weighting); the router keeps a few vectors of E.
// With selective checkpointing a norm keeps only its input and SwiGLU only gate, up and the product
// the down projection keeps (the SiLU is recomputed).
struct Activations {
  const config::ModelConfig& m;
  double cb;
  bool selective;

  double norm(double width) const { return (selective ? 4 : 8) * width + (cb < 4 ? cb * width : 0); }
  double swiglu(double hidden) const { return (selective ? 3 : 4) * hidden * cb; }
  double attention() const {
    const double D = m.d_model;
    if (m.attention == "mla") {
      const auto& a = m.mla;
      const double H = m.n_heads, qk = a.qk_nope_head_dim + a.qk_rope_head_dim, v = a.v_head_dim;
      double bytes = norm(D);
      if (a.q_lora_rank > 0) bytes += norm(a.q_lora_rank);            // the query latent, normed
      bytes += norm(a.kv_lora_rank) + cb * a.qk_rope_head_dim;        // the kv latent, normed; the rope key
      bytes += cb * (H * (a.qk_nope_head_dim + v));                   // the up-projected keys and values
      bytes += cb * (H * qk * 2 + H * v * 2 + H * v);                 // SDPA q, k, v, output; its copy
      return bytes;
    }
    const double H = m.n_heads, G = m.n_kv_heads, hd = config::head_dim(m);
    double bytes = norm(D) + cb * 5 * H * hd;  // q, k and v as SDPA sees them, its output, the copy
    if (m.qk_norm != "none") bytes += norm(H * hd) + norm(G * hd);
    return bytes;
  }
  double ffn(bool moe) const {
    const double D = m.d_model;
    double bytes = norm(D);
    if (!moe) return bytes + swiglu(m.dense_hidden);
    const auto& e = m.moe;
    const double shared = e.shared_hidden > 0 ? e.shared_hidden : e.expert_hidden;
    bytes += e.top_k * (2 * D * cb + swiglu(e.expert_hidden));  // routed rows in and out, their SwiGLU
    bytes += e.n_shared_experts * swiglu(shared);
    bytes += 4 * 4.0 * e.n_experts;                               // router scores and statistics, fp32
    return bytes;
  }
  double block(int layer) const { return attention() + ffn(layer >= m.dense_layers); }
};

// The largest single parameter this rank holds, in fp32 bytes: AdamW's temporaries are its size.
double largest_param_bytes(const config::ModelConfig& m, int ep) {
  const double D = m.d_model;
  double n = double(m.vocab_size) * D;
  n = std::max(n, double(m.moe.n_experts / std::max(1, ep)) * D * m.moe.expert_hidden);
  n = std::max(n, D * m.dense_hidden);
  return 4 * n;
}

}  // namespace

MemoryPlan plan_memory(const config::Config& given, int world_size) {
  const config::Config cfg = config::for_world_size(given, world_size);
  const auto& m = cfg.model;
  const int ep = cfg.parallel.expert_parallel;
  MemoryPlan p;
  p.world_size = world_size;
  p.expert_parallel = ep;
  p.zero = cfg.parallel.zero;
  p.micro_batch_size = cfg.train.micro_batch_size;
  p.grad_accum = cfg.train.grad_accum;
  const double T = double(cfg.train.micro_batch_size) * cfg.data.seq_len;
  p.tokens_per_micro_batch = int64_t(T);

  const MemoryEstimate state = estimate_memory(m, ep, world_size, p.zero);
  p.params_per_rank = state.params_per_rank;
  p.weights = state.weight_bytes;
  p.gradients = state.gradient_bytes;
  p.optimizer = state.optimizer_bytes;
  const bool bf16 = cfg.run.dtype == "bf16";
  const double cb = bf16 ? 2 : 4;
  const bool checkpointing = cfg.train.activation_checkpointing == "full";
  // bf16 casts of the weights live from a micro-batch's forward to its backward (with checkpointing,
  // only the recomputed block's, beside the embedding and head).
  const double block_params = std::max(1.0, (state.params_per_rank - double(m.vocab_size) * m.d_model * (m.tie_embeddings ? 1 : 2)) / m.n_layers);
  const double outer_params = state.params_per_rank - block_params * m.n_layers;
  if (bf16) p.compute_copy = 2 * (checkpointing ? outer_params + block_params : state.params_per_rank);

  const Activations act{m, cb, cfg.train.activation_checkpointing == "selective"};
  double per_token = act.norm(m.d_model), largest_block = 0;  // the final norm
  for (int l = 0; l < m.n_layers; ++l) {
    largest_block = std::max(largest_block, act.block(l));
    if (!checkpointing) per_token += act.block(l);
  }
  if (checkpointing) per_token += 4.0 * m.d_model * m.n_layers;  // each block's fp32 input
  p.activations = T * per_token;

  // Log-probabilities, their gradient and the logits' gradient, all fp32. Chunked, one chunk's worth,
  // and the head's gradient accumulates over the chunks beside each chunk's own (2 x vocab x d_model).
  if (cfg.train.loss_chunk_tokens > 0)
    p.loss = 3 * 4 * std::min(T, double(cfg.train.loss_chunk_tokens)) * m.vocab_size +
             2 * 4 * double(m.vocab_size) * m.d_model;
  else
    p.loss = 3 * 4 * T * m.vocab_size;

  const bool reduces = world_size > 1;
  const double replicas_min = double(world_size) / ep;  // experts have the fewest replicas
  if (p.zero == 1 && reduces)
    p.communication = p.optimizer / 2 + std::min(kBucketBytes, p.gradients) * (1 + 1 / replicas_min);
  else
    p.communication = reduces ? std::min(kBucketBytes, p.gradients) : 0;

  const double resident = p.weights + p.optimizer;
  const double earlier_grads = p.grad_accum > 1 ? p.gradients : 0;
  const double backward = resident + p.compute_copy + earlier_grads + p.activations + p.loss;
  const double recompute = checkpointing ? resident + p.compute_copy + p.gradients + p.activations + T * largest_block : 0;
  const double optimizer_step = resident + p.gradients + p.communication + 2 * largest_param_bytes(m, ep);
  p.peak = backward, p.peak_moment = "backward";
  if (recompute > p.peak) p.peak = recompute, p.peak_moment = "recompute";
  if (optimizer_step > p.peak) p.peak = optimizer_step, p.peak_moment = "optimizer";
  return p;
}

double device_memory_bytes(const std::string& gpu) {
  constexpr double MiB = 1024.0 * 1024.0;
  // Total memory as nvidia-smi reports it per GPU (HBM capacity less what the board reserves).
  if (gpu == "h100" || gpu == "h800") return 81559 * MiB;  // 80 GB HBM3 (H800: the same board)
  if (gpu == "h200") return 143771 * MiB;                  // 141 GB HBM3e
  if (gpu == "a100") return 81920 * MiB;                   // A100-SXM4-80GB
  if (gpu == "b200") return 183359 * MiB;                  // 180 GB per GPU of HGX B200
  if (gpu == "cpu") return machine_memory_bytes("cpu");
  std::string known;
  for (const auto& n : hardware_names()) known += (known.empty() ? "" : ", ") + n;
  throw UsageError("unknown GPU '" + gpu + "': known are " + known);
}

FitAdvice advise_fit(const config::Config& cfg, int world_size, double capacity_bytes) {
  FitAdvice advice;
  auto fits = [&](config::Config c) {
    c.train.global_batch_size = 0;  // the micro-batch is what is varied
    c.train.grad_accum = std::max(1, cfg.train.grad_accum);
    return plan_memory(c, world_size).peak <= capacity_bytes;
  };
  config::Config c = config::for_world_size(cfg, world_size);
  for (int b = 1; b <= 4096; b *= 2) {
    c.train.micro_batch_size = b;
    if (!fits(c)) break;
    advice.largest_micro_batch = b;
  }
  if (advice.largest_micro_batch > 0) {  // refine between the last power of two and the next
    for (int b = advice.largest_micro_batch + 1; b < 2 * advice.largest_micro_batch; ++b) {
      c.train.micro_batch_size = b;
      if (!fits(c)) break;
      advice.largest_micro_batch = b;
    }
  }
  c.train.micro_batch_size = 1;
  for (int ep = 1; ep <= world_size; ++ep) {
    if (world_size % ep != 0 || cfg.model.moe.n_experts % ep != 0) continue;
    c.parallel.expert_parallel = ep;
    if (fits(c)) {
      advice.smallest_expert_parallel = ep;
      break;
    }
  }
  c.parallel.expert_parallel = cfg.parallel.expert_parallel;
  for (int zero = 0; zero <= 1; ++zero) {
    c.parallel.zero = zero;
    if (fits(c)) {
      advice.zero_needed = zero;
      break;
    }
  }
  return advice;
}

}  // namespace moetrain::cost
