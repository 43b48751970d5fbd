// A training run's cost: from FLOPs per token, a token count and one of MFU, throughput or GPU-hours,
// the other two, the wall-clock days on a number of GPUs and the price.
#pragma once
#include <cstdint>
#include <string>

#include "config/config.h"

namespace moetrain::cost {

// What the user gave; the estimate derives the other two.
enum class Given { mfu, tokens_per_s_per_gpu, gpu_hours };

struct RunEstimate {
  double flops_per_token = 0;         // training, full attention
  double flops_per_token_causal = 0;  // training, causal attention: what MFU is computed with
  double mtp_flops_per_token_causal = 0;  // the MTP modules, apart (as DeepSeek's 250 GFLOPs leaves them)
  double tokens = 0;
  double total_flops = 0;             // tokens * flops_per_token_causal
  int64_t params_total = 0;           // main model (MTP apart)
  int64_t params_active = 0;
  double peak_tflops = 0;             // per GPU, dense bf16
  double mfu = 0;                     // achieved causal model FLOP/s over the peak
  double tokens_per_s_per_gpu = 0;
  double gpu_hours = 0;
  int gpus = 1;
  double days = 0;                    // gpu_hours / gpus / 24
  double cost_usd = 0;                // gpu_hours * price
};

// mfu = tokens_per_s_per_gpu * flops_per_token_causal / (peak_tflops * 1e12);
// gpu_hours = tokens / tokens_per_s_per_gpu / 3600.
RunEstimate estimate_run(const config::ModelConfig& model, int seq_len, double tokens, double peak_tflops, int gpus,
                         double price_per_gpu_hour, Given given, double given_value);

// A count with an optional SI suffix: "14.8e12", "14.8T", "671B", "2.5M", "4k" (k/K, M, B/G, T; x1000 each).
// Throws UsageError naming `what` for anything else, or for a negative or non-finite value.
double parse_count(const std::string& text, const std::string& what);

}  // namespace moetrain::cost
