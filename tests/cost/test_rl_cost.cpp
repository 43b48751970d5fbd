// `moetrain cost --rl`: an RL run's FLOPs against a position-by-position count over the model's own
// tensors, decoding's bytes against the model's KV cache and a simulation of MoE routing, and the
// command's output and errors.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <numeric>
#include <random>

#include "../test_util.h"
#include "cost/estimate.h"
#include "cost/flops.h"
#include "cost/plan.h"
#include "model/transformer.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

const std::string kBinary = MOETRAIN_BINARY;

// Forward matmul FLOPs of one token, from the model's tensors: 2 per weight of every matrix a token
// multiplies by (a routed expert's share top_k / n_experts; the embedding only when it is the head).
double matmul_flops_from_model(const config::ModelConfig& m) {
  model::Transformer model(m);
  double flops = 0;
  for (const auto& p : model->roled_parameters()) {
    if (p.tensor.dim() < 2 || p.duplicate) continue;
    if (p.name == "embed" && !m.tie_embeddings) continue;  // looked up, not multiplied
    const double share = p.role == model::ParamRole::expert ? double(m.moe.top_k) / m.moe.n_experts : 1.0;
    flops += 2.0 * double(p.tensor.numel()) * share;
  }
  return flops;
}

// q.k and p.v against `keys` keys in every layer, written out.
double attention_flops(const config::ModelConfig& m, double keys) {
  const bool mla = m.attention == "mla";
  const double qk = mla ? m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim : config::head_dim(m);
  const double v = mla ? m.mla.v_head_dim : config::head_dim(m);
  return m.n_layers * m.n_heads * (2.0 * keys * qk + 2.0 * keys * v);
}

// A decode step's q against `keys` cached keys in every layer. MLA's absorbed form, written out: the
// query's no-RoPE part taken into the latent (Rkv per head) against each cached latent, its RoPE part
// against the cached RoPE key, and the probabilities against the latents.
double decode_attention_flops(const config::ModelConfig& m, double keys) {
  if (m.attention != "mla") return attention_flops(m, keys);
  return m.n_layers * m.n_heads * (2.0 * keys * m.mla.kv_lora_rank + 2.0 * keys * m.mla.qk_rope_head_dim +
                                   2.0 * keys * m.mla.kv_lora_rank);
}

nlohmann::json last_json(const std::string& output) {
  const auto start = output.rfind("\n{");
  return nlohmann::json::parse(start == std::string::npos ? output : output.substr(start + 1));
}

}  // namespace

// Every FLOP of the run summed token by token: a prompt token at position t attends t + 1 keys, a
// response token likewise past the prompt; scoring and training run over whole completions.
CATCH_TEST_CASE("RL cost: FLOPs equal a token-by-token count over the model's tensors", "[cost][rl]") {
  for (const bool mla : {false, true})
    for (const bool tied : {true, false}) {
      auto m = testing::tiny_model_config();
      if (mla) m = testing::with_mla(m, 8, 8, 4, 2, 4);
      m.tie_embeddings = tied;
      CATCH_INFO((mla ? "MLA" : "GQA") << (tied ? ", tied" : ", untied"));
      const double matmuls = matmul_flops_from_model(m);
      CATCH_CHECK(cost::forward_flops_per_token(m, 0) == Approx(matmuls).epsilon(1e-12));

      cost::RlSettings rl;
      rl.prompts_per_step = 3, rl.group_size = 4, rl.prompt_len = 7, rl.response_len = 11, rl.steps = 5;
      rl.updates_per_batch = 2, rl.epochs = 2, rl.reference = true;
      const auto r = cost::estimate_rl(m, rl, 100, 1, 1, 2.0, cost::Given::mfu, 0.5);

      double prefill = 0, decode = 0, whole = 0;
      for (int t = 0; t < 7 + 11; ++t) {
        const double f = matmuls + attention_flops(m, t + 1);
        if (t < 7) prefill += f;
        else decode += matmuls + decode_attention_flops(m, t + 1);
        whole += f;
      }
      const double completions = 3 * 4 * 5;
      CATCH_CHECK(r.completions == completions);
      CATCH_CHECK(r.generated_tokens == completions * 11);
      CATCH_CHECK(r.prefill_flops == Approx(completions * prefill).epsilon(1e-12));
      CATCH_CHECK(r.decode_flops == Approx(completions * decode).epsilon(1e-12));
      CATCH_CHECK(r.old_logprob_flops == Approx(completions * whole).epsilon(1e-12));
      CATCH_CHECK(r.reference_flops == Approx(completions * whole).epsilon(1e-12));
      CATCH_CHECK(r.train_flops == Approx(2 * 3 * completions * whole).epsilon(1e-12));
      CATCH_CHECK(r.total_flops == Approx(completions * (prefill + decode + 8 * whole)).epsilon(1e-12));

      // A hybrid model: only the softmax layers pay attention scores and hold a KV cache.
      auto hybrid = rl;
      hybrid.softmax_layers = 1;
      const auto h = cost::estimate_rl(m, hybrid, 100, 1, 1, 2.0, cost::Given::mfu, 0.5);
      double hybrid_decode = 0;
      for (int t = 7; t < 7 + 11; ++t) hybrid_decode += matmuls + decode_attention_flops(m, t + 1) / m.n_layers;
      CATCH_CHECK(h.decode_flops == Approx(completions * hybrid_decode).epsilon(1e-12));
      CATCH_CHECK(h.kv_bytes_per_token == Approx(r.kv_bytes_per_token / m.n_layers).epsilon(1e-12));

      // One update needs no old policy's forward (the ratio is 1 at the rollout's weights); no KL, no reference.
      rl.updates_per_batch = 1, rl.epochs = 1, rl.reference = false;
      const auto one = cost::estimate_rl(m, rl, 100, 1, 1, 2.0, cost::Given::mfu, 0.5);
      CATCH_CHECK(one.old_logprob_flops == 0);
      CATCH_CHECK(one.reference_flops == 0);
      CATCH_CHECK(one.total_flops == Approx(completions * (prefill + decode + 3 * whole)).epsilon(1e-12));
    }
}

// A decode step of B tokens through E experts of which each token picks k: the expected number of
// distinct experts they touch against 4000 simulated steps of uniform routing, within 2%.
CATCH_TEST_CASE("RL cost: experts touched by a decode batch match a routing simulation", "[cost][rl]") {
  CATCH_CHECK(cost::expected_experts_touched(64, 6, 1) == Approx(6).epsilon(1e-12));
  std::mt19937_64 rng(7);
  for (const auto& [E, k] : std::vector<std::pair<int, int>>{{8, 2}, {64, 6}, {256, 8}})
    for (const int B : {1, 3, 16, 100, 1000}) {
      CATCH_INFO("E " << E << ", top " << k << ", B " << B);
      double sum = 0;
      const int trials = 4000;
      std::vector<int> experts(E);
      for (int trial = 0; trial < trials; ++trial) {
        std::vector<char> touched(E, 0);
        for (int token = 0; token < B; ++token) {
          std::iota(experts.begin(), experts.end(), 0);
          for (int i = 0; i < k; ++i) {  // k distinct experts: a partial shuffle
            std::uniform_int_distribution<int> pick(i, E - 1);
            std::swap(experts[i], experts[pick(rng)]);
            touched[experts[i]] = 1;
          }
        }
        sum += std::count(touched.begin(), touched.end(), 1);
      }
      CATCH_CHECK(cost::expected_experts_touched(E, k, B) == Approx(sum / trials).epsilon(0.02));
    }
}

// The cache decoding reads per position is what the model allocates: GQA's keys and values, MLA's
// latent and shared RoPE key (fp32 here).
CATCH_TEST_CASE("RL cost: KV bytes per token equal the model's own cache", "[cost][rl]") {
  torch::NoGradGuard no_grad;
  for (const bool mla : {false, true}) {
    auto m = testing::tiny_model_config();
    if (mla) m = testing::with_mla(m, 8, 8, 4, 2, 4);
    CATCH_INFO((mla ? "MLA" : "GQA"));
    model::Transformer model(m);
    model->eval();
    const int64_t capacity = 12;
    auto cache = model->new_cache(1, capacity);
    model->decode(torch::tensor({{1, 2, 3}}, torch::kLong), cache);
    double bytes = 0;
    for (const auto& layer : cache.layers)
      for (const auto& t : {layer.k_BGCHd, layer.v_BGCHd, layer.latent_BCR, layer.k_pe_BCP})
        if (t.defined()) bytes += double(t.numel() * t.element_size());
    CATCH_CHECK(bytes / capacity == cost::kv_cache_bytes_per_token(m, 4));
  }
}

// A decode step of one completion reads the active weights a token multiplies by (2 bytes each in
// bf16); a large batch reads every expert; GPU-hours follow from the FLOPs, MFU and bandwidth.
CATCH_TEST_CASE("RL cost: decode bytes and GPU-hours", "[cost][rl]") {
  for (const bool tied : {true, false}) {
    auto m = testing::tiny_model_config();
    m.tie_embeddings = tied;
    CATCH_INFO((tied ? "tied" : "untied"));
    const auto p = cost::param_counts(m);
    cost::RlSettings rl;
    rl.prompts_per_step = 2, rl.group_size = 8, rl.prompt_len = 5, rl.response_len = 10, rl.steps = 3;
    rl.decode_batch = 1;
    auto r = cost::estimate_rl(m, rl, 2.0, 0.5, 4, 3.0, cost::Given::mfu, 0.25);
    CATCH_CHECK(r.weight_bytes_per_step == Approx(2.0 * double(p.active_non_embedding)).epsilon(1e-12));
    const double steps = 3 * 16 * 10;  // a batch of 1: each completion decoded on its own
    const double kv = 3 * 16 * 10 * (5 + 5.5) * cost::kv_cache_bytes_per_token(m, 2);
    CATCH_CHECK(r.decode_kv_bytes == Approx(kv).epsilon(1e-12));
    CATCH_CHECK(r.decode_bandwidth_gpu_hours ==
                Approx((steps * r.weight_bytes_per_step + kv) / 0.5e12 / 3600).epsilon(1e-12));
    CATCH_CHECK(r.compute_bound_gpu_hours == Approx(r.total_flops / (0.25 * 2e12) / 3600).epsilon(1e-12));
    CATCH_CHECK(r.gpu_hours == Approx(r.other_gpu_hours + std::max(r.decode_compute_gpu_hours,
                                                                   r.decode_bandwidth_gpu_hours)).epsilon(1e-12));
    CATCH_CHECK(r.cost_usd == Approx(3.0 * r.gpu_hours).epsilon(1e-12));
    CATCH_CHECK(r.days == Approx(r.gpu_hours / 4 / 24).epsilon(1e-12));

    rl.decode_batch = 0;  // the whole rollout batch of 16: nearly every expert
    r = cost::estimate_rl(m, rl, 2.0, 0.5, 4, 3.0, cost::Given::mfu, 0.25);
    CATCH_CHECK(r.decode_batch == 16);
    const double dense = double(p.total - p.routed_experts) - (tied ? 0.0 : double(p.embedding));
    CATCH_CHECK(r.weight_bytes_per_step ==
                Approx(2.0 * (dense + double(p.routed_experts) * r.experts_touched / 4)).epsilon(1e-12));

    // Given GPU-hours: the MFU they imply, and what the rest needs once decoding takes its floor.
    const auto g = cost::estimate_rl(m, rl, 2.0, 0.5, 4, 3.0, cost::Given::gpu_hours, 1e-3);
    CATCH_CHECK(g.gpu_hours == 1e-3);
    CATCH_CHECK(g.mfu == Approx(g.total_flops / (1e-3 * 3600 * 2e12)).epsilon(1e-12));
    CATCH_CHECK(g.rest_mfu_at_floor ==
                Approx((g.total_flops - g.decode_flops) / ((1e-3 - g.decode_bandwidth_gpu_hours) * 3600 * 2e12))
                    .epsilon(1e-12));
  }
}

CATCH_TEST_CASE("moetrain cost --rl: JSON, text and one-line errors", "[cost][rl][cli]") {
  const std::string config = std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny-deepseek.yaml";
  const std::string base = kBinary + " cost --config " + config + " --rl --prompts-per-step 32 --group-size 16 "
                           "--prompt-len 100 --response-len 400 --steps 10 --gpu h800 --gpus 8";
  auto r = testing::run_command(base + " --mfu 0.3 --reference on --updates-per-batch 4 --json");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  const auto j = last_json(r.output);
  CATCH_CHECK(j["completions"].get<double>() == 32 * 16 * 10);
  CATCH_CHECK(j["generated_tokens"].get<double>() == 32 * 16 * 10 * 400);
  CATCH_CHECK(j["hbm_tb_s"].get<double>() == 3.35);
  CATCH_CHECK(j["old_logprob_flops"].get<double>() > 0);
  CATCH_CHECK(j["reference_flops"].get<double>() == j["old_logprob_flops"].get<double>());
  CATCH_CHECK(j["train_flops"].get<double>() == Approx(4 * 3 * j["reference_flops"].get<double>()).epsilon(1e-12));

  // Unless given, the rollout shape is what `moetrain rl` runs with the config: rl.prompts_per_step,
  // rl.group_size, train.steps, rl.updates_per_batch, and a reference when rl.kl_coef > 0.
  auto defaults = testing::run_command(kBinary + " cost --config " + config + " --rl --prompt-len 10 --response-len 20 "
                                       "--mfu 0.3 --json --set rl.prompts_per_step=3 --set rl.group_size=5 "
                                       "--set train.steps=7 --set rl.updates_per_batch=2 --set rl.kl_coef=0.01");
  CATCH_INFO(defaults.output);
  CATCH_REQUIRE(defaults.exit_code == 0);
  const auto d = last_json(defaults.output);
  CATCH_CHECK(d["completions"].get<double>() == 3 * 5 * 7);
  CATCH_CHECK(d["reference_flops"].get<double>() > 0);
  CATCH_CHECK(d["train_flops"].get<double>() == Approx(2 * 3 * d["reference_flops"].get<double>()).epsilon(1e-12));

  auto text = testing::run_command(base + " --gpu-hours 100");
  CATCH_INFO(text.output);
  CATCH_CHECK(text.exit_code == 0);
  CATCH_CHECK_THAT(text.output, Contains("rollout decode") && Contains("memory-bandwidth floor") &&
                                    Contains("[given]") && Contains("3.35 TB/s"));

  const std::vector<std::pair<std::string, std::string>> bad = {
      {" --rl --prompts-per-step 4 --group-size 4 --prompt-len 8 --mfu 0.3", "--response-len"},
      {" --rl --prompts-per-step 4 --group-size 0 --prompt-len 8 --response-len 8 --steps 2 --mfu 0.3",
       "--group-size must be > 0"},
      {" --rl --prompts-per-step 4 --group-size 4 --prompt-len 8 --response-len 8 --steps 2", "exactly one of --mfu"},
      {" --rl --prompts-per-step 4 --group-size 4 --prompt-len 8 --response-len 8 --steps 2 --mfu 0.3 --tokens 1e9",
       "--tokens does not apply with --rl"},
      {" --rl --prompts-per-step 4 --group-size 4 --prompt-len 8 --response-len 8 --steps 2 --mfu 0.3 --reference yes",
       "--reference expects on or off"},
      {" --rl --prompts-per-step 4 --group-size 4 --prompt-len 8 --response-len 8 --steps 2 --mfu 0.3 --softmax-layers 9",
       "--softmax-layers must be in [0, model.n_layers = 4]"},
      {" --tokens 1e9 --mfu 0.3 --group-size 4", "--group-size costs an RL run: add --rl"}};
  for (const auto& [args, message] : bad) {
    auto e = testing::run_command(kBinary + " cost --config " + config + args);
    CATCH_INFO(args << "\n" << e.output);
    CATCH_CHECK(e.exit_code == 2);
    CATCH_CHECK(testing::one_line(e.output));
    CATCH_CHECK_THAT(e.output, Contains(message));
  }
}

// Sliding-window layers (gpt-oss: [sliding, full], W 128): a query reads only the last W positions, so
// its scores and its KV-cache reads in those layers stop growing at W. Counted position by position
// and layer by layer; a window past the sequence is full attention.
CATCH_TEST_CASE("RL cost: sliding-window layers count only their window's keys and cache", "[cost][rl][window]") {
  auto m = testing::tiny_model_config();
  m.n_layers = 4;
  m.sliding_window = 5;
  m.layer_types = {"sliding", "full"};
  const double matmuls = matmul_flops_from_model(m);
  const double per_layer_key = attention_flops(m, 1) / m.n_layers;  // one key's q.k and p.v in one layer
  const double kv_per_layer = cost::kv_cache_bytes_per_token(m, 2) / m.n_layers;
  cost::RlSettings rl;
  rl.prompts_per_step = 2, rl.group_size = 3, rl.prompt_len = 4, rl.response_len = 9, rl.steps = 2;
  rl.decode_batch = 1;
  const auto r = cost::estimate_rl(m, rl, 100, 1, 1, 2.0, cost::Given::mfu, 0.5);
  double prefill = 0, decode = 0, kv = 0;
  for (int t = 0; t < 4 + 9; ++t) {
    double keys = 0;
    for (int layer = 0; layer < m.n_layers; ++layer) keys += layer % 2 == 0 ? std::min(t + 1, 5) : t + 1;
    (t < 4 ? prefill : decode) += matmuls + per_layer_key * keys;
    if (t >= 4) kv += kv_per_layer * keys;
  }
  const double completions = 2 * 3 * 2;
  CATCH_CHECK(r.prefill_flops == Approx(completions * prefill).epsilon(1e-12));
  CATCH_CHECK(r.decode_flops == Approx(completions * decode).epsilon(1e-12));
  CATCH_CHECK(r.decode_kv_bytes == Approx(completions * kv).epsilon(1e-12));

  // Training's per-token scores (the continuous causal convention): W - W^2 / (2S) keys in a sliding
  // layer, S / 2 in a full one; W per query in the full convention.
  const int S = 16;
  const double key = cost::attention_scores_forward(m, 1, false);
  const auto f = cost::training_flops_per_token(m, S);
  CATCH_CHECK(f.attention_scores_causal == Approx(3 * key * (2 * (5 - 25.0 / 32) + 2 * 8.0)).epsilon(1e-12));
  CATCH_CHECK(f.attention_scores == Approx(3 * key * (2 * 5 + 2 * 16.0)).epsilon(1e-12));
  auto wide = m;
  wide.sliding_window = S;  // covers the sequence: the same as full attention
  auto full = m;
  full.sliding_window = 0;
  full.layer_types.clear();
  CATCH_CHECK(cost::training_flops_per_token(wide, S).total_causal == cost::training_flops_per_token(full, S).total_causal);
  CATCH_CHECK(cost::mean_keys_seen(0, 10, 0) == Approx(5.5).epsilon(1e-12));
  CATCH_CHECK(cost::mean_keys_seen(3, 4, 5) == Approx((4 + 5 + 5 + 5) / 4.0).epsilon(1e-12));

  // The pipeline split weighs each block by its own window: a full block first, three sliding ones
  // after it, at 512-token sequences where a full block's scores are most of its cost, split 1 + 3
  // (counting every block as full would split 2 + 2).
  config::Config cfg;
  cfg.model = m;
  cfg.model.dense_layers = 0;
  cfg.model.sliding_window = 2;
  cfg.model.layer_types = {"full", "sliding", "sliding", "sliding"};
  cfg.model.max_seq_len = cfg.data.seq_len = 512;
  cfg.parallel.pipeline_parallel = 2;
  CATCH_CHECK(cost::pipeline_layers(cfg) == std::vector<int>{1, 3});
  cfg.model.sliding_window = 0;
  cfg.model.layer_types.clear();
  CATCH_CHECK(cost::pipeline_layers(cfg) == std::vector<int>{2, 2});
}
