// Cost estimates: FLOPs and parameters against counts written out by hand, against the built model's own
// parameter count, against DeepSeek-V3's published figures, and the `moetrain cost` command line.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "common/files.h"
#include "config/config.h"
#include "cost/estimate.h"
#include "cost/flops.h"
#include "cost/hardware.h"
#include "model/transformer.h"
#include "../test_util.h"

using namespace moetrain;
using testing::one_line;
using Catch::Matchers::Contains;

namespace {
const std::string kDeepSeekV3 = std::string(MOETRAIN_SOURCE_DIR) + "/configs/deepseek-v3-671b.yaml";

testing::CommandResult moetrain_cost(const std::string& args) {
  return testing::run_command(std::string(MOETRAIN_BINARY) + " cost " + args);
}

}  // namespace

CATCH_TEST_CASE("tiny config: FLOPs and parameters equal the hand count, part by part", "[cost]") {
  // V 32, D 16, 2 layers (1 dense F 24, 1 MoE: 4 experts top-2 F 8, 1 shared F 8), H 4, G 2, hd 4, tied.
  const auto m = testing::tiny_model_config();
  const int S = 8;
  // Forward per token per layer: attention weights 16*16 + 2*16*8 + 16*16 = 768 -> 1536 FLOPs.
  CATCH_CHECK(cost::attention_projection_forward(m) == 1536);
  CATCH_CHECK(cost::attention_scores_forward(m, S, false) == 2 * 8 * 4 * 4 + 2 * 8 * 4 * 4);  // 512
  CATCH_CHECK(cost::attention_scores_forward(m, S, true) == 256);
  CATCH_CHECK(cost::dense_mlp_forward(m) == 6 * 16 * 24);
  CATCH_CHECK(cost::routed_experts_forward(m) == 2 * 6 * 16 * 8);
  CATCH_CHECK(cost::shared_experts_forward(m) == 6 * 16 * 8);
  CATCH_CHECK(cost::router_forward(m) == 2 * 16 * 4);
  CATCH_CHECK(cost::lm_head_forward(m) == 2 * 16 * 32);

  const auto f = cost::training_flops_per_token(m, S);
  CATCH_CHECK(f.attention_projections == 3 * 2 * 1536);
  CATCH_CHECK(f.attention_scores == 3 * 2 * 512);
  CATCH_CHECK(f.attention_scores_causal == 3 * 2 * 256);
  CATCH_CHECK(f.dense_mlp == 3 * 2304);
  CATCH_CHECK(f.routed_experts == 3 * 1536);
  CATCH_CHECK(f.shared_experts == 3 * 768);
  CATCH_CHECK(f.router == 3 * 128);
  CATCH_CHECK(f.lm_head == 3 * 1024);
  CATCH_CHECK(f.mtp == 0);
  CATCH_CHECK(f.total == 3 * (3072 + 1024 + 2304 + 1536 + 768 + 128 + 1024));  // 29568
  CATCH_CHECK(f.total_causal == 3 * (3072 + 512 + 2304 + 1536 + 768 + 128 + 1024));

  const auto p = cost::param_counts(m);
  CATCH_CHECK(p.embedding == 512);
  CATCH_CHECK(p.lm_head == 0);
  CATCH_CHECK(p.attention == 1536);
  CATCH_CHECK(p.norms == 2 * 32 + 16);
  CATCH_CHECK(p.dense_mlp == 1152);
  CATCH_CHECK(p.routed_experts == 1536);
  CATCH_CHECK(p.routed_experts_active == 768);
  CATCH_CHECK(p.shared_experts == 384);
  CATCH_CHECK(p.router == 64);
  CATCH_CHECK(p.total == 5264);
  CATCH_CHECK(p.active == 4496);

  // The same counts as the model the trainer builds (GQA, no MTP).
  for (bool tied : {true, false}) {
    auto mm = m;
    mm.tie_embeddings = tied;
    model::Transformer built(mm);
    CATCH_CHECK(cost::param_counts(mm).total == built->param_counts().total);
    CATCH_CHECK(cost::param_counts(mm).active == built->param_counts().active);
  }
}

CATCH_TEST_CASE("tiny MLA and MTP: FLOPs equal the hand count", "[cost]") {
  auto m = testing::tiny_model_config();
  m.attention = "mla";
  m.mla = {8, 6, 4, 2, 4};  // q_lora, kv_lora, nope, rope, v
  // wq_a 16*8 + wq_b 8*4*6 + wkv_a 16*(6+2) + wkv_b 6*4*(4+4) + wo 4*4*16 = 896 weights.
  CATCH_CHECK(cost::attention_projection_forward(m) == 2 * 896);
  CATCH_CHECK(cost::attention_scores_forward(m, 8, false) == 2 * 8 * 4 * 6 + 2 * 8 * 4 * 4);
  m.mla.q_lora_rank = 0;  // wq 16*4*6 instead of the low-rank pair
  CATCH_CHECK(cost::attention_projection_forward(m) == 2 * (896 - 128 - 192 + 384));
  CATCH_CHECK(cost::param_counts(m).norms == 2 * (32 + 6) + 16);  // kv latent norm, no q norm

  auto t = testing::tiny_model_config();
  t.mtp_depth = 2;
  // Per depth: projection 2*32*16 + MoE block (1536 + 512 + 1536 + 768 + 128) + head 1024, full attention.
  CATCH_CHECK(cost::mtp_module_forward(t, 8, false) == 1024 + 4480 + 1024);
  const auto f = cost::training_flops_per_token(t, 8);
  CATCH_CHECK(f.mtp == 3 * 2 * 6528);
  CATCH_CHECK(f.mtp_causal == 3 * 2 * (6528 - 256));
  CATCH_CHECK(f.total == 29568);  // MTP apart, like its parameters
  // MTP parameters: block (768 + 32 + 4*384 + 384 + 64) + projection 2*16*16 + 3 norms of 16.
  CATCH_CHECK(cost::param_counts(t).mtp == 2 * (768 + 32 + 1536 + 384 + 64 + 512 + 48));
  CATCH_CHECK(cost::param_counts(t).total == 5264);  // MTP apart
}

// GLM-4.5's attention: q/k/v biases (and o's, model.attn_bias all, here with gpt-oss's sinks), per-head
// q/k norms, RoPE on part of each head. The biases, sinks and norms are parameters but no matmul FLOPs;
// cost counts what the model builds.
CATCH_TEST_CASE("GQA biases, sinks, q/k norms and partial RoPE: counted as the built model has them", "[cost]") {
  auto m = testing::tiny_model_config();
  const double projections = cost::attention_projection_forward(m);
  const auto plain = cost::param_counts(m);
  m.rotary_dim = 2;
  m.moe.router.score_func = "sigmoid";
  m.moe.router.selection_bias = true;
  for (const std::string bias : {"none", "qkv", "all"})
    for (const std::string qk_norm : {"none", "head", "full"}) {
      CATCH_INFO(bias << " " << qk_norm);
      m.attn_bias = bias;
      m.qk_norm = qk_norm;
      m.attention_sinks = bias == "all";  // gpt-oss's: one logit per query head, 4 a layer
      m.mtp_depth = 0;
      model::Transformer built(m);
      CATCH_CHECK(cost::param_counts(m).total == built->param_counts().total);
      CATCH_CHECK(cost::param_counts(m).active == built->param_counts().active);
      CATCH_CHECK(cost::attention_projection_forward(m) == projections);
      // Per layer: q 16 + k 8 + v 8 (+ o 16); q/k norms 4 + 4 per head, or 16 + 8 over the projection.
      const int64_t biases = bias == "none" ? 0 : bias == "qkv" ? 32 : 48 + 4;
      const int64_t norms = qk_norm == "none" ? 0 : qk_norm == "head" ? 8 : 24;
      CATCH_CHECK(cost::param_counts(m).attention == plain.attention + 2 * biases);
      CATCH_CHECK(cost::param_counts(m).norms == plain.norms + 2 * norms);
      // An MTP module's own parameters, biases and norms included.
      m.mtp_depth = 1;
      model::Transformer with_mtp(m);
      int64_t mtp = 0;
      for (const auto& p : with_mtp->named_parameters())
        if (p.key().rfind("mtp.", 0) == 0) mtp += p.value().numel();
      CATCH_CHECK(cost::param_counts(m).mtp == mtp);
    }
}

CATCH_TEST_CASE("dense config: training FLOPs are 6N plus attention scores", "[cost]") {
  config::ModelConfig m;
  m.vocab_size = 32000;
  m.d_model = 2048;
  m.n_layers = 16;
  m.n_heads = 16;
  m.n_kv_heads = 4;
  m.dense_layers = 16;  // no MoE layer
  m.dense_hidden = 5632;
  m.tie_embeddings = false;
  const int S = 2048;
  const auto f = cost::training_flops_per_token(m, S);
  CATCH_CHECK(f.routed_experts == 0);
  CATCH_CHECK(f.router == 0);
  const double attention = 3.0 * 16 * 2 * S * 16 * 128 * 2 / 2;  // causal: 3 * L * (2*S*H*hd*2) / 2
  CATCH_CHECK(f.attention_scores_causal == attention);
  // 6N counts the norms too (under 1e-4 here); the rest is exact.
  CATCH_CHECK(f.total_causal == Approx(cost::six_n_flops_per_token(m) + attention).epsilon(1e-4));
  CATCH_CHECK(f.total_causal - attention < cost::six_n_flops_per_token(m));
}

CATCH_TEST_CASE("DeepSeek-V3: 671B total, 37B active, about 250 GFLOPs per token", "[cost]") {
  const auto cfg = config::load_config(kDeepSeekV3);
  const auto p = cost::param_counts(cfg.model);
  CATCH_CHECK(p.total == 671026404352);  // by hand: layers + embedding + head + final norm
  CATCH_CHECK(p.total == Approx(671e9).epsilon(0.01));
  // 37.55B with the embedding (this project's convention), 36.63B without; DeepSeek rounds to 37B.
  CATCH_CHECK(p.active == 37552282624);
  CATCH_CHECK(p.active == Approx(37e9).epsilon(0.016));
  CATCH_CHECK(p.active_non_embedding == Approx(37e9).epsilon(0.011));
  // The MTP module's own weights; DeepSeek's 14B also holds copies of the shared embedding and head.
  CATCH_CHECK(p.mtp == 11610067968);
  CATCH_CHECK(p.mtp + p.embedding + p.lm_head == Approx(14e9).epsilon(0.04));

  const auto f = cost::training_flops_per_token(cfg.model, 4096);
  // DeepSeek's 250 GFLOPs per token is the main model (with it, MFU comes out at their 38.94%).
  CATCH_CHECK(f.total_causal == Approx(250e9).epsilon(0.01));
  CATCH_CHECK(f.mtp_causal == Approx(10.2e9).epsilon(0.02));
  CATCH_CHECK(f.total > f.total_causal);

  // MLA builds (a tiny one: this config would allocate 671B weights) with the parameters cost counts.
  auto tiny_mla = testing::tiny_model_config();
  tiny_mla.attention = "mla";
  tiny_mla.mla = {8, 6, 4, 2, 4};
  for (int q_lora : {8, 0}) {
    tiny_mla.mla.q_lora_rank = q_lora;
    model::Transformer built(tiny_mla);
    CATCH_CHECK(built->param_counts().total == cost::param_counts(tiny_mla).total);
    CATCH_CHECK(built->param_counts().active == cost::param_counts(tiny_mla).active);
  }
  // The trained MTP modules hold exactly the weights cost counts for them.
  auto with_mtp = testing::tiny_model_config();
  with_mtp.mtp_depth = 2;
  model::Transformer built_mtp(with_mtp);
  CATCH_CHECK(built_mtp->param_counts().total == cost::param_counts(with_mtp).total + cost::param_counts(with_mtp).mtp);
}

CATCH_TEST_CASE("MFU, throughput and GPU-hours round-trip", "[cost]") {
  const auto m = testing::tiny_model_config();
  const double tokens = 1e9, peak = 989.4;
  const auto a = cost::estimate_run(m, 16, tokens, peak, 8, 2.0, cost::Given::mfu, 0.4);
  const auto b = cost::estimate_run(m, 16, tokens, peak, 8, 2.0, cost::Given::tokens_per_s_per_gpu,
                                    a.tokens_per_s_per_gpu);
  const auto c = cost::estimate_run(m, 16, tokens, peak, 8, 2.0, cost::Given::gpu_hours, a.gpu_hours);
  for (const auto& r : {b, c}) {
    CATCH_CHECK(r.mfu == Approx(0.4).epsilon(1e-12));
    CATCH_CHECK(r.tokens_per_s_per_gpu == Approx(a.tokens_per_s_per_gpu).epsilon(1e-12));
    CATCH_CHECK(r.gpu_hours == Approx(a.gpu_hours).epsilon(1e-12));
  }
  CATCH_CHECK(a.tokens_per_s_per_gpu == Approx(0.4 * peak * 1e12 / a.flops_per_token_causal));
  CATCH_CHECK(a.days == Approx(a.gpu_hours / 8 / 24));
  CATCH_CHECK(a.cost_usd == Approx(a.gpu_hours * 2.0));
  CATCH_CHECK(a.total_flops == Approx(tokens * a.flops_per_token_causal));

  CATCH_CHECK(cost::parse_count("14.8e12", "--tokens") == 14.8e12);
  CATCH_CHECK(cost::parse_count("14.8T", "--tokens") == Approx(14.8e12));
  CATCH_CHECK(cost::parse_count("671B", "--tokens") == Approx(671e9));
  CATCH_CHECK(cost::parse_count("2.5M", "--tokens") == Approx(2.5e6));
  CATCH_CHECK_THROWS_AS(cost::parse_count("14.8X", "--tokens"), UsageError);
  CATCH_CHECK_THROWS_AS(cost::parse_count("-1", "--tokens"), UsageError);
  CATCH_CHECK_THROWS_AS(cost::parse_count("T", "--tokens"), UsageError);

  CATCH_CHECK(cost::lookup_hardware("h100").bf16_tflops == Approx(989.4));
  CATCH_CHECK(!cost::lookup_hardware("a100").fp8_tflops);
  const auto cpu = cost::lookup_hardware("cpu");
  CATCH_CHECK(cpu.bf16_tflops > 0);
  // Probed once per process and thread count: every MFU of a run is against the same figure.
  CATCH_CHECK(cost::lookup_hardware("cpu").bf16_tflops == cpu.bf16_tflops);
  CATCH_CHECK_THAT(cpu.source, Contains("threads"));
  // An MFU above 100% never goes out without a warning naming the peak it was measured against.
  CATCH_CHECK(cost::mfu_warning(0.999, cost::lookup_hardware("h100")).empty());
  const auto warning = cost::mfu_warning(1.16, cost::lookup_hardware("h100"));
  CATCH_CHECK_THAT(warning, Contains("warning: MFU 116% is above 100%") && Contains("cost.gpu = h100") &&
                                Contains("989.4 TFLOP/s"));
  CATCH_CHECK_THAT(cost::mfu_warning(1.1, cpu), Contains("cost.gpu = cpu") && Contains("probe"));
  CATCH_CHECK_THROWS_WITH(cost::lookup_hardware("h900"), Contains("h100") && Contains("cpu"));
}

CATCH_TEST_CASE("moetrain cost: DeepSeek-V3 on 2048 H800s for 2.664M GPU-hours", "[cost][cli]") {
  auto r = moetrain_cost("--config " + kDeepSeekV3 + " --tokens 14.8e12 --gpu h800 --gpus 2048 --gpu-hours 2.664e6 --json");
  CATCH_REQUIRE(r.exit_code == 0);
  const auto j = nlohmann::json::parse(r.output);
  CATCH_CHECK(j["tokens_per_s_per_gpu"].get<double>() == Approx(1543).epsilon(0.02));
  CATCH_CHECK(j["mfu"].get<double>() >= 0.36);
  CATCH_CHECK(j["mfu"].get<double>() <= 0.42);
  CATCH_CHECK(j["flops_per_token_causal"].get<double>() == Approx(250e9).epsilon(0.04));
  CATCH_CHECK(j["params_total"].get<int64_t>() == 671026404352);
  CATCH_CHECK(j["days"].get<double>() == Approx(2.664e6 / 2048 / 24));
  CATCH_CHECK(j["cost_usd"].get<double>() == Approx(2.664e6 * 2.0));
  for (const char* key : {"flops_per_token", "flops_per_token_causal", "total_flops", "params_active", "gpu_hours"})
    CATCH_CHECK(j.contains(key));

  auto text = moetrain_cost("--config " + kDeepSeekV3 + " --tokens 14.8T --gpu h800 --mfu 0.4");
  CATCH_CHECK(text.exit_code == 0);
  CATCH_CHECK_THAT(text.output, Contains("GPU-hours") && Contains("tokens/s per GPU") && Contains("[given]"));
}

CATCH_TEST_CASE("moetrain cost: bad input is one line and exit 2", "[cost][cli]") {
  const std::string cfg = "--config " + kDeepSeekV3 + " ";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {cfg + "--gpu h800 --mfu 0.4", "needs --tokens"},
      {cfg + "--tokens 1T --gpu h800", "exactly one of"},
      {cfg + "--tokens 1T --gpu h800 --mfu 0.4 --gpu-hours 5", "exactly one of"},
      {cfg + "--tokens 14.8X --gpu h800 --mfu 0.4", "--tokens expects"},
      {cfg + "--tokens 1T --gpu h900 --mfu 0.4", "unknown GPU 'h900'"},
      {cfg + "--tokens 1T --gpu h800 --mfu 1.5", "--mfu must be in (0, 1]"},
      {cfg + "--tokens 1T --gpu h800 --mfu 0.4 --gpus 0", "--gpus must be >= 1"},
      {cfg + "--tokens 1T --gpu h800 --gpu-hours abc", "--gpu-hours expects"},
      {"--tokens 1T --mfu 0.4", "needs --config"},
  };
  for (const auto& [args, message] : cases) {
    CATCH_INFO(args);
    auto r = moetrain_cost(args);
    CATCH_CHECK(r.exit_code == 2);
    CATCH_CHECK(one_line(r.output));
    CATCH_CHECK_THAT(r.output, Contains(message));
  }
}

CATCH_TEST_CASE("moetrain bench-step: real steps give tokens/s and MFU that `cost --bench` extrapolates", "[cost][cli]") {
  testing::TempDir dir("bench-step");
  // A two-layer MoE small enough for a CI core; synthetic tokens, so no data folder is needed.
  const std::string sets = " --set model.n_layers=2 --set model.d_model=64 --set model.n_heads=4 --set model.n_kv_heads=2"
                           " --set model.vocab_size=512 --set model.moe.expert_hidden=64 --set model.moe.shared_hidden=64 --set data.seq_len=32"
                           " --set train.global_batch_size=4 --set run.threads=1";
  const std::string config = std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml";
  auto r = testing::run_command(std::string(MOETRAIN_BINARY) + " bench-step --config " + config + sets +
                                " --warmup 1 --steps 3 --json > " + dir.str("bench.json"));
  CATCH_REQUIRE(r.exit_code == 0);
  const auto j = nlohmann::json::parse(files::read_file(dir.str("bench.json")));
  CATCH_CHECK(j["steps"].get<int>() == 3);
  CATCH_CHECK(j["tokens_per_step"].get<int64_t>() == 4 * 32);
  CATCH_CHECK(j["gpu"].get<std::string>() == "cpu");
  CATCH_CHECK(j["tokens_per_s"].get<double>() > 0);
  CATCH_CHECK(j["step_s_min"].get<double>() <= j["step_s_median"].get<double>());
  CATCH_CHECK(j["tokens_per_s"].get<double>() == Approx(4 * 32 / j["step_s_mean"].get<double>()));
  const double mfu = j["mfu"].get<double>();
  CATCH_CHECK(mfu == Approx(j["tokens_per_s_per_gpu"].get<double>() * j["flops_per_token_causal"].get<double>() /
                            (j["peak_tflops"].get<double>() * 1e12)));
  CATCH_CHECK(mfu > 0);
  // Uniform synthetic tokens cannot be learned: the loss of a real forward stays near ln(vocab).
  CATCH_CHECK(std::abs(j["first_loss"].get<double>() - std::log(512.0)) < 0.5);
  CATCH_CHECK(std::abs(j["last_loss"].get<double>() - std::log(512.0)) < 0.5);

  // The same config costed from the bench: the measured MFU and peak carry over, so the derived
  // throughput is the bench's own.
  auto c = moetrain_cost("--config " + config + sets + " --tokens 1e9 --bench " + dir.str("bench.json") + " --json");
  CATCH_REQUIRE(c.exit_code == 0);
  const auto k = nlohmann::json::parse(c.output);
  CATCH_CHECK(k["mfu"].get<double>() == Approx(mfu).epsilon(1e-12));
  CATCH_CHECK(k["tokens_per_s_per_gpu"].get<double>() == Approx(j["tokens_per_s_per_gpu"].get<double>()).epsilon(1e-9));
  CATCH_CHECK(k["gpu_hours"].get<double>() == Approx(1e9 / j["tokens_per_s_per_gpu"].get<double>() / 3600).epsilon(1e-9));

  testing::write_bytes(dir.str("bad.json"), "{\"steps\": 3}");
  auto bad = moetrain_cost("--config " + config + " --tokens 1e9 --bench " + dir.str("bad.json"));
  CATCH_CHECK(bad.exit_code == 2);
  CATCH_CHECK_THAT(bad.output, Contains("bad.json") && Contains("missing key 'mfu'"));
}
