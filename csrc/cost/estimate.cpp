// Converting between MFU, per-GPU throughput and GPU-hours for a token budget.
#include "cost/estimate.h"

#include <cmath>
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
