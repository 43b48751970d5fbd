// Converting between MFU, per-GPU throughput and GPU-hours for a token budget.
#include "cost/estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "common/errors.h"
#include "cost/flops.h"

namespace moetrain::cost {

RunEstimate estimate_run(const config::ModelConfig& model, int seq_len, double tokens, double peak_tflops, int gpus,
                         double price_per_gpu_hour, Given given, double given_value) {
  RunEstimate r;
  const auto flops = training_flops_per_token(model, seq_len);
  const auto params = param_counts(model);
  r.flops_per_token = flops.total;
  r.flops_per_token_causal = flops.total_causal;
  r.mtp_flops_per_token_causal = flops.mtp_causal;
  r.tokens = tokens;
  r.total_flops = tokens * flops.total_causal;
  r.params_total = params.total;
  r.params_active = params.active;
  r.peak_tflops = peak_tflops;
  r.gpus = gpus;
  const double peak_flops = peak_tflops * 1e12;
  switch (given) {
    case Given::mfu:
      r.mfu = given_value;
      r.tokens_per_s_per_gpu = r.mfu * peak_flops / r.flops_per_token_causal;
      r.gpu_hours = tokens / r.tokens_per_s_per_gpu / 3600.0;
      break;
    case Given::tokens_per_s_per_gpu:
      r.tokens_per_s_per_gpu = given_value;
      r.mfu = r.tokens_per_s_per_gpu * r.flops_per_token_causal / peak_flops;
      r.gpu_hours = tokens / r.tokens_per_s_per_gpu / 3600.0;
      break;
    case Given::gpu_hours:
      r.gpu_hours = given_value;
      r.tokens_per_s_per_gpu = tokens / (r.gpu_hours * 3600.0);
      r.mfu = r.tokens_per_s_per_gpu * r.flops_per_token_causal / peak_flops;
      break;
  }
  r.days = r.gpu_hours / gpus / 24.0;
  r.cost_usd = r.gpu_hours * price_per_gpu_hour;
  return r;
}

double expected_experts_touched(int n_experts, int top_k, double tokens) {
  const double E = n_experts, k = std::min(top_k, n_experts);
  return E * (1.0 - std::pow(1.0 - k / E, tokens));
}

double kv_cache_bytes_per_token(const config::ModelConfig& m, double bytes_per_element) {
  const double per_layer = m.attention == "mla" ? double(m.mla.kv_lora_rank) + m.mla.qk_rope_head_dim
                                                : 2.0 * m.n_kv_heads * config::head_dim(m);
  return m.n_layers * per_layer * bytes_per_element;
}

double forward_flops_per_token(const config::ModelConfig& m, double keys, int attention_layers) {
  const double matmuls = training_flops_per_token(m, 0).total_causal / 3.0;  // no attention scores at 0 keys
  const double layers = attention_layers < 0 ? m.n_layers : attention_layers;
  return matmuls + layers * attention_scores_forward(m, 1, /*causal=*/false) * keys;
}

namespace {
// The mean keys a query at positions [first, first + count) sees, summed over the first `attention_layers`
// layers (-1: all), each at most its own window.
double keys_over_layers(const config::ModelConfig& m, double first, double count, int attention_layers) {
  const int layers = attention_layers < 0 ? m.n_layers : attention_layers;
  double keys = 0;
  for (int layer = 0; layer < layers; ++layer) keys += mean_keys_seen(first, count, config::attention_window(m, layer));
  return keys;
}
}  // namespace

double forward_flops_per_position(const config::ModelConfig& m, double first, double count, int attention_layers) {
  return forward_flops_per_token(m, 0) +
         attention_scores_forward(m, 1, /*causal=*/false) * keys_over_layers(m, first, count, attention_layers);
}

double decode_flops_per_key(const config::ModelConfig& m) {
  if (m.attention != "mla") return attention_scores_forward(m, 1, /*causal=*/false);
  const double H = m.n_heads, latent = m.mla.kv_lora_rank, rope = m.mla.qk_rope_head_dim;
  return 2.0 * H * (latent + rope) + 2.0 * H * latent;
}

double decode_flops_per_position(const config::ModelConfig& m, double first, double count, int attention_layers) {
  return forward_flops_per_token(m, 0) + decode_flops_per_key(m) * keys_over_layers(m, first, count, attention_layers);
}

double kv_bytes_read_per_position(const config::ModelConfig& m, double bytes_per_element, double first, double count,
                                  int attention_layers) {
  return keys_over_layers(m, first, count, attention_layers) * kv_cache_bytes_per_token(m, bytes_per_element) /
         m.n_layers;
}

RlEstimate estimate_rl(const config::ModelConfig& model, const RlSettings& rl, double peak_tflops, double hbm_tb_s,
                       int gpus, double price_per_gpu_hour, Given given, double given_value) {
  auto positive = [](double v, const char* what) {
    if (!(v > 0 && std::isfinite(v))) throw UsageError(std::string(what) + " must be a positive number");
  };
  positive(rl.prompts_per_step, "--prompts-per-step");
  positive(rl.group_size, "--group-size");
  positive(rl.response_len, "--response-len");
  positive(rl.updates_per_batch, "--updates-per-batch");
  positive(rl.epochs, "--epochs");
  positive(rl.steps, "--steps");
  positive(hbm_tb_s, "the GPU's memory bandwidth");
  if (!(rl.prompt_len >= 0 && std::isfinite(rl.prompt_len))) throw UsageError("--prompt-len must be >= 0");
  if (!(rl.decode_batch >= 0 && std::isfinite(rl.decode_batch))) throw UsageError("--decode-batch must be >= 0");
  if (rl.softmax_layers < 0 || rl.softmax_layers > model.n_layers)
    throw UsageError("--softmax-layers must be in [0, model.n_layers = " + std::to_string(model.n_layers) + "], got " +
                     std::to_string(rl.softmax_layers));
  const int attention_layers = rl.softmax_layers > 0 ? rl.softmax_layers : model.n_layers;

  RlEstimate r;
  const double P = rl.prompt_len, R = rl.response_len, L = P + R;
  const double per_batch = rl.prompts_per_step * rl.group_size;
  r.completions = per_batch * rl.steps;
  r.generated_tokens = r.completions * R;
  r.trained_tokens = r.completions * L;
  // Mean keys: prompt positions 0..P-1 attend (P + 1) / 2 on average, response positions P..L-1
  // attend P + (R + 1) / 2, a whole completion (L + 1) / 2; a sliding layer at most its window.
  // Forward FLOPs are linear in the keys, so the mean gives the exact sum.
  const double forward_prompt = forward_flops_per_position(model, 0, P, attention_layers);
  const double decode_response = decode_flops_per_position(model, P, R, attention_layers);
  const double forward_whole = forward_flops_per_position(model, 0, L, attention_layers);
  r.prefill_flops = r.completions * P * forward_prompt;
  r.decode_flops = r.generated_tokens * decode_response;
  const double scoring = r.trained_tokens * forward_whole;
  r.old_logprob_flops = rl.updates_per_batch > 1 ? scoring : 0;
  r.reference_flops = rl.reference ? scoring : 0;
  r.train_flops = rl.epochs * 3.0 * scoring;
  r.total_flops = r.prefill_flops + r.decode_flops + r.old_logprob_flops + r.reference_flops + r.train_flops;

  // Decoding's bytes: a replica decodes its B completions R steps together, per_batch / B times a batch.
  const auto params = param_counts_approx(model);
  const double B = rl.decode_batch > 0 ? std::min(rl.decode_batch, per_batch) : per_batch;
  r.decode_batch = B;
  const bool moe = model.dense_layers < model.n_layers;
  r.experts_touched = moe ? expected_experts_touched(model.moe.n_experts, model.moe.top_k, B) : 0;
  // An untied embedding is looked up, not read whole; a tied one is the LM head, which is.
  const double dense_weights = params.total - params.routed_experts - (model.tie_embeddings ? 0 : params.embedding);
  const double expert_weights = moe ? params.routed_experts * r.experts_touched / model.moe.n_experts : 0;
  r.weight_bytes_per_step = (dense_weights + expert_weights) * rl.weight_bytes;
  r.kv_bytes_per_token = kv_cache_bytes_per_token(model, rl.kv_bytes) * attention_layers / model.n_layers;
  const double decode_steps = rl.steps * (per_batch / B) * R;
  r.decode_weight_bytes = decode_steps * r.weight_bytes_per_step;
  // Each response token reads the cache of the positions it attends to: a sliding layer only its window's
  // (what a windowed cache reads; ours keeps every position and masks, model/layers.h).
  r.decode_kv_bytes = r.generated_tokens * kv_bytes_read_per_position(model, rl.kv_bytes, P, R, attention_layers);

  r.peak_tflops = peak_tflops;
  r.hbm_tb_s = hbm_tb_s;
  r.gpus = gpus;
  const double peak = peak_tflops * 1e12, seconds_per_hour = 3600.0;
  r.decode_bandwidth_gpu_hours = (r.decode_weight_bytes + r.decode_kv_bytes) / (hbm_tb_s * 1e12) / seconds_per_hour;
  if (given == Given::mfu) {
    r.mfu = given_value;
  } else if (given == Given::gpu_hours) {
    r.mfu = r.total_flops / (given_value * seconds_per_hour * peak);
    const double rest_hours = given_value - r.decode_bandwidth_gpu_hours;
    r.rest_mfu_at_floor = rest_hours > 0 ? (r.total_flops - r.decode_flops) / (rest_hours * seconds_per_hour * peak)
                                         : std::numeric_limits<double>::infinity();
  } else {
    throw UsageError("an RL estimate takes --mfu or --gpu-hours, not a token throughput");
  }
  const double at_mfu = r.mfu * peak * seconds_per_hour;
  r.decode_compute_gpu_hours = r.decode_flops / at_mfu;
  r.other_gpu_hours = (r.total_flops - r.decode_flops) / at_mfu;
  r.compute_bound_gpu_hours = r.total_flops / at_mfu;
  r.gpu_hours = given == Given::gpu_hours
                    ? given_value
                    : r.other_gpu_hours + std::max(r.decode_compute_gpu_hours, r.decode_bandwidth_gpu_hours);
  r.days = r.gpu_hours / gpus / 24.0;
  r.cost_usd = r.gpu_hours * price_per_gpu_hour;
  return r;
}

double parse_count(const std::string& text, const std::string& what) {
  auto bad = [&]() -> double {
    throw UsageError(what + " expects a non-negative number such as 14.8e12, 14.8T or 671B, got '" + text + "'");
  };
  if (text.empty()) return bad();
  double scale = 1;
  std::string number = text;
  switch (text.back()) {
    case 'k': case 'K': scale = 1e3; break;
    case 'M': scale = 1e6; break;
    case 'B': case 'G': scale = 1e9; break;
    case 'T': scale = 1e12; break;
    default: break;
  }
  if (scale != 1) number.pop_back();
  double value = 0;
  try {
    size_t used = 0;
    value = std::stod(number, &used);
    if (used != number.size() || number.empty()) return bad();
  } catch (const std::exception&) {
    return bad();
  }
  value *= scale;
  if (!std::isfinite(value) || value < 0) return bad();
  return value;
}

}  // namespace moetrain::cost
