// The memory plan of one rank (see plan.h).
#include "cost/plan.h"

#include <algorithm>
#include <cstdio>
#include <limits>

#include "common/errors.h"
#include "cost/flops.h"
#include "cost/hardware.h"
#include "cost/memory.h"

namespace moetrain::cost {

namespace {


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

// The parameters of blocks [first, end) and the ends a stage holds, from the parts of the whole
// model's count: replicated ones, and the routed experts (all of them, before expert parallelism).
struct StageParams {
  double replicated = 0, experts = 0;
  double ends = 0;  // the embedding and head matrices among the replicated ones
  // Among the replicated ones, those read in fp32 (norms, routers, the embedding): under ZeRO-1's
  // sharded masters the rest are held in bf16 (model::RoledParam::compute_dtype_only).
  double read_in_fp32 = 0;
};
StageParams stage_params(const config::ModelConfig& m, int first, int end) {
  const auto c = param_counts_approx(m);
  const int L = m.n_layers, moe_layers = L - m.dense_layers;
  const double final_norm = m.d_model, matrix = double(m.vocab_size) * m.d_model;
  const double per_block = (c.attention + c.norms - final_norm) / L;  // attention and its norms
  StageParams s;
  for (int l = first; l < end; ++l) {
    s.replicated += per_block;
    s.read_in_fp32 += (c.norms - final_norm) / L;
    if (l < m.dense_layers) {
      s.replicated += c.dense_mlp / m.dense_layers;
    } else {
      s.replicated += (c.shared_experts + c.router) / moe_layers;
      s.read_in_fp32 += c.router / moe_layers;
      s.experts += c.routed_experts / moe_layers;
    }
  }
  const bool first_stage = first == 0, last_stage = end == L;
  if (first_stage) s.ends += matrix;                                            // the embedding
  if (last_stage) s.ends += m.tie_embeddings ? (first_stage ? 0 : matrix) : matrix;  // the head (a tied copy)
  s.replicated += s.ends + (last_stage ? final_norm : 0);
  if (first_stage) s.read_in_fp32 += matrix;                                    // the embedding
  if (last_stage) s.read_in_fp32 += final_norm + (m.tie_embeddings && !first_stage ? matrix : 0);
  return s;
}

// train.lora: the adapters of blocks [first, end), replicated ones and routed experts' (all of them,
// before expert parallelism); MTP blocks' are left out. An adapter of an (in, out) weight has r (in + out).
struct LoraParams {
  double replicated = 0, experts = 0;
};
LoraParams lora_params(const config::Config& cfg, int first, int end) {
  const auto& m = cfg.model;
  const auto& lora = cfg.train.lora;
  LoraParams out;
  if (lora.rank <= 0) return out;
  auto has = [&](const char* t) { return std::find(lora.targets.begin(), lora.targets.end(), t) != lora.targets.end(); };
  const double r = lora.rank, D = m.d_model, H = m.n_heads;
  auto adapter = [&](double in, double out_dim) { return r * (in + out_dim); };
  double attention = 0;
  if (m.attention == "mla") {
    const auto& a = m.mla;
    const double qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
    if (has("q"))
      attention += a.q_lora_rank > 0 ? adapter(D, a.q_lora_rank) + adapter(a.q_lora_rank, H * qk) : adapter(D, H * qk);
    if (has("kv"))
      attention += adapter(D, a.kv_lora_rank + a.qk_rope_head_dim) +
                   adapter(a.kv_lora_rank, H * (a.qk_nope_head_dim + a.v_head_dim));
    if (has("o")) attention += adapter(H * a.v_head_dim, D);
  } else {
    const double hd = config::head_dim(m), G = m.n_kv_heads;
    if (has("q")) attention += adapter(D, H * hd);
    if (has("k") || has("kv")) attention += adapter(D, G * hd);
    if (has("v") || has("kv")) attention += adapter(D, G * hd);
    if (has("o")) attention += adapter(H * hd, D);
  }
  const auto& e = m.moe;
  const double shared_hidden = e.n_shared_experts * double(e.shared_hidden > 0 ? e.shared_hidden : e.expert_hidden);
  for (int l = first; l < end; ++l) {
    out.replicated += attention;
    if (l < m.dense_layers) {
      if (has("dense_mlp")) out.replicated += 3 * adapter(D, m.dense_hidden);
      continue;
    }
    if (has("experts")) out.experts += double(e.n_experts) * 3 * adapter(D, e.expert_hidden);
    if (has("shared_experts") && e.n_shared_experts > 0) out.replicated += 3 * adapter(D, shared_hidden);
  }
  return out;
}

MemoryPlan plan_stage(const config::Config& cfg, int world_size, int stage, int first, int end) {
  const auto& m = cfg.model;
  const int ep = cfg.parallel.expert_parallel, pp = cfg.parallel.pipeline_parallel;
  const int dp = std::max(1, world_size / pp);
  const bool last_stage = end == m.n_layers;
  MemoryPlan p;
  p.world_size = world_size;
  p.expert_parallel = ep;
  p.zero = cfg.parallel.zero;
  p.pipeline_parallel = pp;
  p.stage = stage;
  p.blocks = end - first;
  p.micro_batch_size = cfg.train.micro_batch_size;
  p.grad_accum = cfg.train.grad_accum;
  p.in_flight = std::min(pp - stage, std::max(1, p.grad_accum));  // before the stage's first backward
  p.bubble = pipeline_bubble(pp, std::max(1, p.grad_accum));
  const double T = double(cfg.train.micro_batch_size) * cfg.data.seq_len;
  p.tokens_per_micro_batch = int64_t(T);

  const StageParams params = stage_params(m, first, end);
  const double experts = params.experts / ep;
  p.params_per_rank = params.replicated + experts;
  const bool bf16 = cfg.run.dtype == "bf16";
  const double cb = bf16 ? 2 : 4;
  // ZeRO-1 over several replicas: each keeps a 1/replicas share (replicated weights have the stage's dp
  // ranks as replicas, routed experts dp / ep) of AdamW's two moments and, under bf16, of the fp32
  // masters of the weights every use casts, which are held in bf16.
  const bool sharded = p.zero >= 1 && dp > 1, masters = sharded && bf16;
  auto share = [&](double replicated, double expert) { return replicated / dp + expert / (double(dp) / ep); };
  const double held_in_bf16 = masters ? p.params_per_rank - params.read_in_fp32 : 0;
  p.weights = 4 * (p.params_per_rank - held_in_bf16) + 2 * held_in_bf16;
  if (masters) p.master_weights = 4 * share(params.replicated - params.read_in_fp32, experts);
  p.gradients = 4 * p.params_per_rank;
  p.optimizer = 2 * 4 * (sharded ? share(params.replicated, experts) : p.params_per_rank);
  if (cfg.optim.name == "muon") {  // one fp32 momentum per hidden matrix element, not two moments
    const auto matrices = muon_cost(m, first, end);
    const double replicated_matrices = matrices.replicated_params, expert_matrices = matrices.expert_params / ep;
    p.optimizer -= 4 * (sharded ? share(replicated_matrices, expert_matrices) : replicated_matrices + expert_matrices);
  }
  const bool checkpointing = cfg.train.activation_checkpointing == "full";
  const bool lora = cfg.train.lora.rank > 0;
  // The bf16 copies of the weights: kept from one optimizer step to the next (common/tensor.h), or
  // (run.keep_compute_copies false) alive from a micro-batch's forward to its backward, with
  // checkpointing only the recomputed block's, beside the embedding and head.
  const double block_params = std::max(1.0, (p.params_per_rank - params.ends) / p.blocks);
  const double outer_params = p.params_per_rank - block_params * p.blocks;
  const bool kept_copies = cfg.run.keep_compute_copies;
  if (masters)  // only a tied head is cast from fp32 (norm and router weights are read in fp32)
    p.compute_copy = m.tie_embeddings && last_stage ? 2.0 * m.vocab_size * m.d_model : 0;
  else if (bf16)
    p.compute_copy = 2 * (kept_copies || !checkpointing ? p.params_per_rank : outer_params + block_params);
  if (lora) {
    // train.lora: the frozen base is held in the compute dtype (the weights read in fp32 stay fp32) with no
    // gradient, moments or compute copy; the adapters are fp32 weights (bf16 with sharded fp32 masters at
    // ZeRO-1 under bf16) with fp32 gradients and moments, and their bf16 copies under bf16.
    const auto adapters = lora_params(cfg, first, end);
    const double adapter_experts = adapters.experts / ep, adapters_here = adapters.replicated + adapter_experts;
    const double base = p.params_per_rank;
    p.params_per_rank = base + adapters_here;
    p.weights = cb * (base - params.read_in_fp32) + 4 * params.read_in_fp32 + (masters ? 2 : 4) * adapters_here;
    p.master_weights = masters ? 4 * share(adapters.replicated, adapter_experts) : 0;
    p.gradients = 4 * adapters_here;
    p.optimizer = 2 * 4 * (sharded ? share(adapters.replicated, adapter_experts) : adapters_here);
    p.compute_copy = bf16 && !masters ? 2 * adapters_here : 0;
  }

  const Activations act{m, cb, cfg.train.activation_checkpointing == "selective"};
  double per_token = last_stage ? act.norm(m.d_model) : 0, largest_block = 0;  // the final norm
  for (int l = first; l < end; ++l) {
    largest_block = std::max(largest_block, act.block(l));
    if (!checkpointing) per_token += act.block(l);
  }
  if (checkpointing) per_token += 4.0 * m.d_model * p.blocks;  // each block's fp32 input
  p.activations = T * per_token;

  // Log-probabilities, their gradient and the logits' gradient, all fp32. Chunked, one chunk's worth,
  // and with more than one chunk the head's gradient accumulates over them beside each chunk's own
  // (2 x vocab x d_model; one chunk's gradient is the head's gradient itself).
  const double chunk = cfg.train.loss_chunk_tokens > 0 ? std::min(T, double(cfg.train.loss_chunk_tokens)) : T;
  if (!last_stage)
    p.loss = 0;
  else
    p.loss = 3 * 4 * chunk * m.vocab_size + (chunk < T ? 2 * 4 * double(m.vocab_size) * m.d_model : 0);

  // Over several ranks both stages keep the gradients in their bucket buffers for the whole run and
  // reduce them there, in place; zero 1's reduce-scatter writes this rank's share into the shard
  // gradient it keeps too (fp32, the size of one moment), and its all-gather writes the weight
  // buffers in place: no bucket is copied for either collective.
  const double gradient_buffers = dp > 1 ? p.gradients : 0;
  const double resident_gradients = gradient_buffers + (sharded ? p.optimizer / 2 : 0);
  p.communication = 0;
  if (pp > 1) p.communication += 2 * 4 * T * m.d_model;  // the received activation and its gradient

  // 1F1B on this stage: before its k-th backward the forwards of in_flight(k) micro-batches are
  // kept, and from the second backward on the step's gradients exist. The first backward keeps the
  // most activations, the second the most beside the gradients (without a pipeline: one micro-batch,
  // and the gradients of the earlier ones).
  const int micro = std::max(1, p.grad_accum);
  const int warmup = std::min(pp - stage - 1, micro), steady = micro - warmup;
  auto in_flight = [&](int k) { return k < steady ? warmup + 1 : micro - k; };
  const double gradients = p.gradients - gradient_buffers;  // when they come and go
  const double kept = p.activations * in_flight(0);
  const double kept_beside_gradients = micro > 1 ? p.activations * in_flight(1) + gradients : 0;
  const double resident = p.weights + p.master_weights + (kept_copies ? p.compute_copy : 0) + p.optimizer +
                          resident_gradients;
  const double copies = kept_copies ? 0 : p.compute_copy;  // when they live in forward and backward only
  const double backward = resident + copies + std::max(kept, kept_beside_gradients) + p.loss;
  const double recompute = checkpointing ? resident + copies + gradients + kept + T * largest_block : 0;
  const double optimizer_step = resident + gradients + p.communication +
                                2 * largest_param_bytes(m, ep);
  p.peak = backward, p.peak_moment = "backward";
  if (recompute > p.peak) p.peak = recompute, p.peak_moment = "recompute";
  if (optimizer_step > p.peak) p.peak = optimizer_step, p.peak_moment = "optimizer";
  return p;
}

}  // namespace

std::vector<int> pipeline_layers(const config::Config& cfg) {
  const int P = cfg.parallel.pipeline_parallel, L = cfg.model.n_layers;
  if (auto given = config::explicit_pp_layers(cfg); !given.empty()) return given;
  if (P < 1 || P > L)
    throw ConfigError("parallel.pipeline_parallel = " + std::to_string(P) + " must be in [1, model.n_layers = " +
                      std::to_string(L) + "]");
  if (P == 1) return {L};
  // The search below takes about P x L^2 / 2 steps and (P + 1) x (L + 1) entries of two tables.
  constexpr double kMaxSearchSteps = 1e9;
  if (const double steps = double(P) * L * L / 2; steps > kMaxSearchSteps) {
    char text[32];
    std::snprintf(text, sizeof text, "%.3g", steps);
    throw ConfigError("parallel.pipeline_parallel = " + std::to_string(P) + " stages of model.n_layers = " +
                      std::to_string(L) + " blocks: balancing them by FLOPs would take " + text +
                      " steps (at most 1e9); give the blocks per stage in parallel.pp_layers");
  }
  // Forward FLOPs per token of each block (the training factor 3 is common to all and drops out).
  const auto& m = cfg.model;
  // A sliding-window block's scores count only its window (model.layer_types).
  const double dense = attention_projection_forward(m) + dense_mlp_forward(m);
  const double moe = attention_projection_forward(m) + routed_experts_forward(m) + shared_experts_forward(m) + router_forward(m);
  std::vector<double> prefix(size_t(L) + 1, 0.0);
  for (int i = 0; i < L; ++i)
    prefix[size_t(i) + 1] = prefix[size_t(i)] + (i < m.dense_layers ? dense : moe) +
                            attention_scores_forward(m, cfg.data.seq_len, /*causal=*/true, config::attention_window(m, i));
  const double head = lm_head_forward(m);
  auto stage_cost = [&](int first, int end, bool last) { return prefix[size_t(end)] - prefix[size_t(first)] + (last ? head : 0); };
  // best[p][i]: the smallest possible largest stage cost placing the first i blocks on p stages.
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(size_t(P) + 1, std::vector<double>(size_t(L) + 1, inf));
  std::vector<std::vector<int>> cut(size_t(P) + 1, std::vector<int>(size_t(L) + 1, 0));
  best[0][0] = 0;
  for (int p = 1; p <= P; ++p)
    for (int i = p; i <= L - (P - p); ++i)
      for (int j = p - 1; j < i; ++j) {  // stage p holds blocks [j, i)
        const double c = std::max(best[size_t(p) - 1][size_t(j)], stage_cost(j, i, p == P));
        if (c < best[size_t(p)][size_t(i)]) best[size_t(p)][size_t(i)] = c, cut[size_t(p)][size_t(i)] = j;
      }
  std::vector<int> layers(static_cast<size_t>(P), 0);
  for (int p = P, i = L; p >= 1; --p) {
    const int j = cut[size_t(p)][size_t(i)];
    layers[size_t(p) - 1] = i - j;
    i = j;
  }
  return layers;
}

std::vector<int> stage_bounds(const std::vector<int>& layers_per_stage) {
  std::vector<int> bounds{0};
  for (int n : layers_per_stage) bounds.push_back(bounds.back() + n);
  return bounds;
}

double pipeline_bubble(int pp, int micro_batches) { return double(pp - 1) / double(micro_batches + pp - 1); }

std::vector<MemoryPlan> plan_stages(const config::Config& given, int world_size) {
  const int pp = given.parallel.pipeline_parallel;
  if (pp < 1 || world_size % pp != 0)
    throw ConfigError("parallel.pipeline_parallel = " + std::to_string(pp) + " does not divide the world size " +
                      std::to_string(world_size));
  const config::Config cfg = config::for_world_size(given, world_size / pp);
  const auto bounds = stage_bounds(pipeline_layers(cfg));
  std::vector<MemoryPlan> stages;
  for (int s = 0; s < pp; ++s) stages.push_back(plan_stage(cfg, world_size, s, bounds[size_t(s)], bounds[size_t(s) + 1]));
  return stages;
}

MemoryPlan plan_memory(const config::Config& cfg, int world_size) {
  const auto stages = plan_stages(cfg, world_size);
  return *std::max_element(stages.begin(), stages.end(),
                           [](const MemoryPlan& a, const MemoryPlan& b) { return a.peak < b.peak; });
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
  const int dp = world_size / std::max(1, cfg.parallel.pipeline_parallel);  // expert parallel splits a stage's ranks
  config::Config c = config::for_world_size(cfg, dp);
  // The stages' blocks do not depend on what is varied below: balanced once, not at every plan.
  if (c.parallel.pipeline_parallel > 1 && c.parallel.pp_layers.empty()) {
    for (int blocks : pipeline_layers(c))
      c.parallel.pp_layers += (c.parallel.pp_layers.empty() ? "" : ",") + std::to_string(blocks);
  }
  // The micro-batch is what is varied; the micro-batches per step (a pipeline's in flight) stay.
  const int grad_accum = std::max(1, c.train.grad_accum);
  auto fits = [&](config::Config c) {
    c.train.global_batch_size = 0;
    c.train.grad_accum = grad_accum;
    return plan_memory(c, world_size).peak <= capacity_bytes;
  };
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
  for (int ep = 1; ep <= dp; ++ep) {
    if (dp % ep != 0 || cfg.model.moe.n_experts % ep != 0) continue;
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
