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

// ---------------------------------------------------------------------------------------------
// Reinforcement learning (GRPO as DeepSeek-R1 ran it, PPO without a critic): per rollout batch,
// `prompts_per_step` prompts are each completed `group_size` times, then the policy takes
// `updates_per_batch` optimizer steps on the batch, passing over each completion `epochs` times in all.

struct RlSettings {
  double prompts_per_step = 0;  // prompts per rollout batch
  double group_size = 0;        // completions per prompt
  double prompt_len = 0;        // mean prompt tokens
  double response_len = 0;      // mean response tokens
  double updates_per_batch = 1; // optimizer steps per rollout batch; > 1 needs the old policy's log-probs
  double epochs = 1;            // forward + backward passes over each completion per rollout batch
  double steps = 0;             // rollout batches
  bool reference = false;       // a KL penalty: a frozen reference model scores every completion
  double decode_batch = 0;      // completions one inference replica decodes together; 0 = a whole rollout batch
  double weight_bytes = 2;      // bytes per weight read while decoding (bf16)
  double kv_bytes = 2;          // bytes per element of the KV cache (bf16)
  // Hybrid models (MiniMax-M1: 1 layer in 8): the layers that attend with softmax, holding a KV cache
  // and paying the attention scores; the others' linear attention (a state of constant size) is left
  // out. 0 = every layer.
  int softmax_layers = 0;
};

// Where the FLOPs and the bytes of an RL run go. Conventions: as flops.h (matmuls only, causal
// attention, training = 3x forward); the token at position t (from 0) attends t + 1 keys. A completion
// is prefilled on its own (no prefix shared by its group), then each response token passes the model
// once at its position. Decoding reads, per step of a replica, the weights its batch touches (the
// dense part whole, and per MoE layer the expected number of distinct experts E (1 - (1 - k/E)^B) of
// B tokens routed uniformly, the balance the router is trained towards) and each sequence's KV cache.
struct RlEstimate {
  double completions = 0;         // over the run
  double generated_tokens = 0;    // completions x response_len
  double trained_tokens = 0;      // completions x (prompt_len + response_len), per pass
  double prefill_flops = 0;       // forward over the prompts
  double decode_flops = 0;        // forward over the response tokens, one at a time, against the cache
  double old_logprob_flops = 0;   // a forward over each completion when updates_per_batch > 1
  double reference_flops = 0;     // the reference's forward over each completion (reference on)
  double train_flops = 0;         // epochs x 3 x forward over each completion
  double total_flops = 0;
  double kv_bytes_per_token = 0;  // one position's cache over all layers (GQA: k and v; MLA: latent + RoPE key)
  double decode_batch = 0;        // B, as used (at most a rollout batch)
  double experts_touched = 0;     // per MoE layer, by a decode step of B tokens
  double weight_bytes_per_step = 0;  // weights one decode step of a replica reads
  double decode_weight_bytes = 0;    // over the run
  double decode_kv_bytes = 0;        // over the run
  double peak_tflops = 0, hbm_tb_s = 0;
  // GPU-hours. Compute-bound: every FLOP at the MFU. Bandwidth-bound decoding: its bytes at the full
  // HBM bandwidth, a floor no engine beats. gpu_hours = the rest at the MFU + the larger of decoding's two.
  double decode_compute_gpu_hours = 0;
  double decode_bandwidth_gpu_hours = 0;
  double other_gpu_hours = 0;  // prefill, old log-probs, reference and training at the MFU
  double compute_bound_gpu_hours = 0;
  double gpu_hours = 0;
  double mfu = 0;              // given, or implied by given GPU-hours (all FLOPs over them)
  // With GPU-hours given: the MFU everything but decoding needs when decoding takes its bandwidth floor
  // (infinite when the floor alone exceeds the GPU-hours).
  double rest_mfu_at_floor = 0;
  int gpus = 1;
  double days = 0, cost_usd = 0;
};

// Expected distinct experts of n_experts that `tokens` tokens choosing top_k each (uniformly, without
// repeats) touch together: E (1 - (1 - k/E)^B).
double expected_experts_touched(int n_experts, int top_k, double tokens);
// Bytes of the KV cache per position, all layers, at `bytes_per_element`.
double kv_cache_bytes_per_token(const config::ModelConfig& m, double bytes_per_element);
// Forward FLOPs of one token attending `keys` keys in `attention_layers` layers (-1: all of them), the
// matmuls of projections, MLPs, experts, router and head in every layer.
double forward_flops_per_token(const config::ModelConfig& m, double keys, int attention_layers = -1);
// The mean forward FLOPs per token over the query positions [first, first + count) of one sequence, each
// of the first `attention_layers` layers (-1: all) attending the keys before it, a sliding layer only
// those in its window (model.sliding_window, model.layer_types).
double forward_flops_per_position(const config::ModelConfig& m, double first, double count, int attention_layers = -1);
// The attention FLOPs of one decode-step query against one cached key, all heads of one layer. GQA: as in
// a forward pass, q.k and p.v. MLA: the absorbed form moetrain's decode and DeepSeek's inference run,
// 2 H (Rkv + P) for the scores (W_UK q against the latent, q_pe against the RoPE key) and 2 H Rkv for p
// against the latent; absorbing the query and the output costs what wkv_b's matmul costs per token.
double decode_flops_per_key(const config::ModelConfig& m);
// The mean FLOPs of a decode step at positions [first, first + count): the matmuls of a token and
// decode_flops_per_key for each key before it, in windows as forward_flops_per_position.
double decode_flops_per_position(const config::ModelConfig& m, double first, double count, int attention_layers = -1);
// The mean KV-cache bytes one token at those positions reads in those layers: the positions it attends to.
double kv_bytes_read_per_position(const config::ModelConfig& m, double bytes_per_element, double first, double count,
                                  int attention_layers = -1);
// Throws UsageError naming the setting for non-positive counts. `given`: mfu or gpu_hours; hbm_tb_s > 0.
RlEstimate estimate_rl(const config::ModelConfig& model, const RlSettings& rl, double peak_tflops, double hbm_tb_s,
                       int gpus, double price_per_gpu_hour, Given given, double given_value);

// A count with an optional SI suffix: "14.8e12", "14.8T", "671B", "2.5M", "4k" (k/K, M, B/G, T; x1000 each).
// Throws UsageError naming `what` for anything else, or for a negative or non-finite value.
double parse_count(const std::string& text, const std::string& what);

}  // namespace moetrain::cost
