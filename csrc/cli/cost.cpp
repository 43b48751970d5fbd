// `moetrain cost`: training FLOPs, GPU-hours, days and price of a token budget for a config, from one
// of MFU, per-GPU throughput or GPU-hours. Needs no data and builds no model, so any size can be costed.
#include <cmath>
#include <cstdio>
#include <optional>
#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "common/errors.h"
#include "common/files.h"
#include "common/log.h"
#include "config/config.h"
#include "cost/estimate.h"
#include "cost/flops.h"
#include "cost/hardware.h"
#include "cost/plan.h"
#include "train/trainer.h"

namespace moetrain::cli {

namespace {

// `moetrain cost --rl`: the FLOPs of rollouts (prefill and decode), old-policy and reference scoring and
// the updates, and GPU-hours both compute-bound and with decoding bound by memory bandwidth.
int run_rl_cost(const Args& args, const config::Config& cfg) {
  for (const char* pretraining_only : {"tokens", "tokens-per-s-per-gpu", "bench", "seq-len"})
    if (args.has(pretraining_only))
      throw UsageError(std::string("--") + pretraining_only +
                       " does not apply with --rl (tokens follow from the prompts, group size, lengths and steps)");
  auto count = [&](const char* name) {
    const double v = cost::parse_count(args.require(name), std::string("--") + name);
    if (!(v > 0)) throw UsageError(std::string("--") + name + " must be > 0, got '" + args.get(name) + "'");
    return v;
  };
  // What `moetrain rl` would run with this config, unless given: its rollout shape and updates.
  auto count_or = [&](const char* name, double fallback) { return args.has(name) ? count(name) : fallback; };
  cost::RlSettings rl;
  rl.prompts_per_step = count_or("prompts-per-step", cfg.rl.prompts_per_step);
  rl.group_size = count_or("group-size", cfg.rl.group_size);
  rl.prompt_len = cost::parse_count(args.require("prompt-len"), "--prompt-len");
  rl.response_len = count("response-len");
  rl.steps = count_or("steps", cfg.train.steps);
  rl.updates_per_batch = count_or("updates-per-batch", cfg.rl.updates_per_batch);
  rl.epochs = count_or("epochs", rl.updates_per_batch);
  const std::string reference = args.get("reference", cfg.rl.kl_coef > 0 ? "on" : "off");
  if (reference != "on" && reference != "off")
    throw UsageError("--reference expects on or off, got '" + reference + "'");
  rl.reference = reference == "on";
  rl.decode_batch = args.has("decode-batch") ? count("decode-batch") : 0;
  rl.weight_bytes = args.has("weight-bytes") ? count("weight-bytes") : 2;
  rl.softmax_layers = args.get_int("softmax-layers", 0);

  int given_count = 0;
  cost::Given given = cost::Given::mfu;
  double given_value = 0;
  if (args.has("mfu")) {
    ++given_count, given_value = args.get_double("mfu", 0);
    if (!(given_value > 0 && given_value <= 1)) throw UsageError("--mfu must be in (0, 1], got '" + args.get("mfu") + "'");
  }
  if (args.has("gpu-hours")) {
    ++given_count, given = cost::Given::gpu_hours, given_value = count("gpu-hours");
  }
  if (given_count != 1)
    throw UsageError("moetrain cost --rl needs exactly one of --mfu, --gpu-hours (got " + std::to_string(given_count) + ")");
  const int gpus = args.get_int("gpus", 1);
  if (gpus < 1) throw UsageError("--gpus must be >= 1, got " + std::to_string(gpus));
  const double price = args.get_double("price", cfg.cost.price_per_gpu_hour);
  if (!(price >= 0)) throw UsageError("--price must be >= 0, got '" + args.get("price") + "'");
  auto hardware = cost::lookup_hardware(args.get("gpu", cfg.cost.gpu));
  if (hardware.name == "cpu")
    hardware.hbm_tb_s = cost::measure_cpu_bandwidth(), hardware.hbm_source = "measured: best 64 MiB fp32 copy";

  const auto r = cost::estimate_rl(cfg.model, rl, hardware.bf16_tflops, hardware.hbm_tb_s, gpus, price, given, given_value);
  if (args.has("json")) {
    nlohmann::json j = {{"completions", r.completions},
                        {"generated_tokens", r.generated_tokens},
                        {"trained_tokens", r.trained_tokens},
                        {"prefill_flops", r.prefill_flops},
                        {"decode_flops", r.decode_flops},
                        {"old_logprob_flops", r.old_logprob_flops},
                        {"reference_flops", r.reference_flops},
                        {"train_flops", r.train_flops},
                        {"total_flops", r.total_flops},
                        {"kv_bytes_per_token", r.kv_bytes_per_token},
                        {"decode_batch", r.decode_batch},
                        {"experts_touched", r.experts_touched},
                        {"weight_bytes_per_decode_step", r.weight_bytes_per_step},
                        {"decode_weight_bytes", r.decode_weight_bytes},
                        {"decode_kv_bytes", r.decode_kv_bytes},
                        {"peak_tflops", r.peak_tflops},
                        {"hbm_tb_s", r.hbm_tb_s},
                        {"mfu", r.mfu},
                        {"decode_compute_gpu_hours", r.decode_compute_gpu_hours},
                        {"decode_bandwidth_gpu_hours", r.decode_bandwidth_gpu_hours},
                        {"other_gpu_hours", r.other_gpu_hours},
                        {"compute_bound_gpu_hours", r.compute_bound_gpu_hours},
                        {"gpu_hours", r.gpu_hours},
                        {"days", r.days},
                        {"cost_usd", r.cost_usd}};
    if (given == cost::Given::gpu_hours)
      j["rest_mfu_at_decode_floor"] = std::isfinite(r.rest_mfu_at_floor) ? nlohmann::json(r.rest_mfu_at_floor) : nlohmann::json(nullptr);
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  const auto p = cost::param_counts(cfg.model);
  std::printf("model             %s: %.3fB params, %.3fB active\n", cfg.run.name.c_str(), p.total / 1e9, p.active / 1e9);
  std::printf("RL run            %.4g rollout batches of %.4g prompts x %.4g completions; prompt %.4g, response %.4g "
              "tokens (mean); %.4g updates and %.4g passes per batch; reference %s\n",
              rl.steps, rl.prompts_per_step, rl.group_size, rl.prompt_len, rl.response_len, rl.updates_per_batch,
              rl.epochs, rl.reference ? "on" : "off");
  std::printf("tokens            %.4g completions, %.4g generated, %.4g trained per pass\n", r.completions,
              r.generated_tokens, r.trained_tokens);
  std::printf("FLOPs (matmuls, causal attention, training = 3x forward):\n");
  auto row = [&](const char* name, double v) { std::printf("  %-26s %10.4g  (%4.1f%%)\n", name, v, 100 * v / r.total_flops); };
  row("rollout prefill", r.prefill_flops);
  row("rollout decode", r.decode_flops);
  row("old-policy log-probs", r.old_logprob_flops);
  row("reference log-probs", r.reference_flops);
  row("policy updates", r.train_flops);
  std::printf("  %-26s %10.4g\n", "total", r.total_flops);
  std::printf("decode memory     KV cache %.4g KiB per token (%d layers); a decode step of %.4g completions reads "
              "%.4g GB of weights (%.4g of %d experts per MoE layer); over the run %.4g TB of weights, %.4g TB of KV\n",
              r.kv_bytes_per_token / 1024, rl.softmax_layers > 0 ? rl.softmax_layers : cfg.model.n_layers, r.decode_batch, r.weight_bytes_per_step / 1e9, r.experts_touched,
              cfg.model.moe.n_experts, r.decode_weight_bytes / 1e12, r.decode_kv_bytes / 1e12);
  std::printf("hardware          %s: %.1f TFLOP/s dense bf16 (%s); %.4g TB/s (%s)\n", hardware.name.c_str(),
              hardware.bf16_tflops, hardware.source.c_str(), hardware.hbm_tb_s, hardware.hbm_source.c_str());
  std::printf("MFU               %.4f%s\n", r.mfu,
              given == cost::Given::mfu ? " [given]" : " (all the run's FLOPs over the given GPU-hours)");
  std::printf("GPU-hours         compute-bound %.4g (decode %.4g of it); decoding at the memory-bandwidth floor %.4g\n",
              r.compute_bound_gpu_hours, r.decode_compute_gpu_hours, r.decode_bandwidth_gpu_hours);
  if (given == cost::Given::gpu_hours) {
    std::printf("GPU-hours         %.4g [given]: decoding's bandwidth floor is %.1f%% of them; the rest then needs MFU %.4f\n",
                r.gpu_hours, 100 * r.decode_bandwidth_gpu_hours / r.gpu_hours, r.rest_mfu_at_floor);
  } else {
    std::printf("GPU-hours         %.4g (the rest at the MFU + decoding at the larger of its two)\n", r.gpu_hours);
  }
  std::printf("days              %.2f on %d GPU%s\n", r.days, r.gpus, r.gpus == 1 ? "" : "s");
  std::printf("cost              $%.4g at $%.2f per GPU-hour\n", r.cost_usd, price);
  return 0;
}

}  // namespace

int run_cost(const std::vector<std::string>& argv) {
  const Command command{
      "cost",
      "Estimate a training run: FLOPs per token (full and causal attention), total FLOPs, GPU-hours, days and "
      "price. Give exactly one of --mfu, --tokens-per-s-per-gpu, --gpu-hours; the other two are derived. MFU is "
      "causal model FLOPs over the GPU's dense bf16 peak.",
      {{"config", "FILE", "YAML config (required)"},
       {"set", "KEY=VALUE", "override one config key (repeatable)", true},
       {"tokens", "N", "training tokens, e.g. 14.8e12, 14.8T or 671B (required)"},
       {"gpu", "NAME", "h100, h200, h800, a100, b200 or cpu (measured); default cost.gpu"},
       {"gpus", "N", "GPUs the run uses, for the wall-clock days (default 1)"},
       {"price", "P", "price of one GPU-hour in USD (default cost.price_per_gpu_hour)"},
       {"seq-len", "S", "sequence length for the attention FLOPs (default data.seq_len)"},
       {"mfu", "X", "model FLOPs utilization in (0, 1]"},
       {"tokens-per-s-per-gpu", "Y", "training throughput per GPU"},
       {"gpu-hours", "H", "GPU-hours of the whole run, e.g. 2.664e6 or 2.664M"},
       {"bench", "FILE", "JSON written by `moetrain bench-step --json`: its measured MFU and hardware carry over"},
       {"json", "", "print one JSON object instead of text"},
       {"rl", "", "cost a reinforcement-learning run (GRPO) instead: rollouts, reference and updates (the options below)"},
       {"prompts-per-step", "N", "--rl: prompts per rollout batch (default rl.prompts_per_step)"},
       {"group-size", "G", "--rl: completions per prompt (default rl.group_size)"},
       {"prompt-len", "P", "--rl: mean prompt tokens (required)"},
       {"response-len", "R", "--rl: mean response tokens (required; rl.max_new_tokens is only their limit)"},
       {"steps", "N", "--rl: rollout batches (default train.steps)"},
       {"updates-per-batch", "U", "--rl: optimizer steps per rollout batch (default rl.updates_per_batch; > 1 adds the old policy's scoring)"},
       {"epochs", "E", "--rl: training passes over each completion per rollout batch (default: --updates-per-batch, as `moetrain rl` runs)"},
       {"reference", "on|off", "--rl: a frozen reference model for the KL penalty scores every completion (default: on when rl.kl_coef > 0)"},
       {"decode-batch", "B", "--rl: completions one inference replica decodes together (default: a whole rollout batch)"},
       {"weight-bytes", "N", "--rl: bytes per weight read while decoding (default 2, bf16; 1 for fp8)"},
       {"softmax-layers", "N", "--rl: hybrid models: the layers with softmax attention and a KV cache (default all)"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  args.require("config");
  const auto cfg = load_command_config(args);
  if (args.has("rl")) return run_rl_cost(args, cfg);
  for (const char* rl_only : {"prompts-per-step", "group-size", "prompt-len", "response-len", "steps",
                              "updates-per-batch", "epochs", "reference", "decode-batch", "weight-bytes",
                              "softmax-layers"})
    if (args.has(rl_only)) throw UsageError(std::string("--") + rl_only + " costs an RL run: add --rl");
  const double tokens = cost::parse_count(args.require("tokens"), "--tokens");
  if (!(tokens > 0)) throw UsageError("--tokens must be > 0, got '" + args.get("tokens") + "'");

  int given_count = 0;
  cost::Given given = cost::Given::mfu;
  double given_value = 0;
  if (args.has("mfu")) {
    ++given_count, given = cost::Given::mfu, given_value = args.get_double("mfu", 0);
    if (!(given_value > 0 && given_value <= 1)) throw UsageError("--mfu must be in (0, 1], got '" + args.get("mfu") + "'");
  }
  if (args.has("tokens-per-s-per-gpu")) {
    ++given_count, given = cost::Given::tokens_per_s_per_gpu;
    given_value = cost::parse_count(args.get("tokens-per-s-per-gpu"), "--tokens-per-s-per-gpu");
    if (!(given_value > 0)) throw UsageError("--tokens-per-s-per-gpu must be > 0");
  }
  if (args.has("gpu-hours")) {
    ++given_count, given = cost::Given::gpu_hours;
    given_value = cost::parse_count(args.get("gpu-hours"), "--gpu-hours");
    if (!(given_value > 0)) throw UsageError("--gpu-hours must be > 0");
  }
  std::optional<cost::Hardware> bench_hardware;
  if (args.has("bench")) {
    // A bench-step run is a measured proxy: what carries over to the full model is its MFU (a layer
    // stack of the same shapes runs at the same utilization), not its tokens/s.
    const std::string path = args.get("bench");
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(files::read_file(path));
    } catch (const nlohmann::json::exception& e) {
      throw UsageError("--bench " + path + ": not a bench-step JSON (" + e.what() + ")");
    }
    for (const char* key : {"mfu", "gpu", "peak_tflops"})
      if (!j.contains(key)) throw UsageError("--bench " + path + ": missing key '" + key + "' (write it with bench-step --json)");
    ++given_count, given = cost::Given::mfu, given_value = j["mfu"].get<double>();
    if (!(given_value > 0 && given_value <= 1)) throw UsageError("--bench " + path + ": mfu must be in (0, 1]");
    // The peak the bench measured its MFU against (for the CPU, the probe of that run, not a new one).
    bench_hardware = cost::Hardware{j["gpu"].get<std::string>(), j["peak_tflops"].get<double>(), std::nullopt,
                                    "as measured by bench-step in " + path};
  }
  if (given_count != 1)
    throw UsageError("moetrain cost needs exactly one of --mfu, --tokens-per-s-per-gpu, --gpu-hours, --bench (got " +
                     std::to_string(given_count) + ")");

  const int gpus = args.get_int("gpus", 1);
  if (gpus < 1) throw UsageError("--gpus must be >= 1, got " + std::to_string(gpus));
  const double price = args.get_double("price", cfg.cost.price_per_gpu_hour);
  if (!(price >= 0)) throw UsageError("--price must be >= 0, got '" + args.get("price") + "'");
  const int seq_len = args.get_int("seq-len", cfg.data.seq_len);
  if (seq_len < 1) throw UsageError("--seq-len must be >= 1, got " + std::to_string(seq_len));
  const auto hardware = args.has("gpu") || !bench_hardware ? cost::lookup_hardware(args.get("gpu", cfg.cost.gpu))
                                                           : *bench_hardware;

  const auto r = cost::estimate_run(cfg.model, seq_len, tokens, hardware.bf16_tflops, gpus, price, given, given_value);
  // With a pipeline, the 1F1B bubble is part of the time: the MFU above is over the whole step, and the
  // stages compute at MFU / (1 - bubble) while busy. The micro-batches per step are the config's
  // (resolved for the data-parallel ranks, gpus / pipeline_parallel).
  const int pp = cfg.parallel.pipeline_parallel;
  double bubble = 0;
  int micro_batches = 0;
  if (pp > 1) {
    if (gpus % pp != 0)
      throw UsageError("--gpus " + std::to_string(gpus) + " must be a multiple of parallel.pipeline_parallel = " +
                       std::to_string(pp));
    micro_batches = config::for_world_size(cfg, gpus / pp).train.grad_accum;
    bubble = cost::pipeline_bubble(pp, std::max(1, micro_batches));
  }
  if (args.has("json")) {
    nlohmann::json j = {{"flops_per_token", r.flops_per_token},
                        {"flops_per_token_causal", r.flops_per_token_causal},
                        {"mtp_flops_per_token_causal", r.mtp_flops_per_token_causal},
                        {"total_flops", r.total_flops},
                        {"params_total", r.params_total},
                        {"params_active", r.params_active},
                        {"gpu_hours", r.gpu_hours},
                        {"days", r.days},
                        {"cost_usd", r.cost_usd},
                        {"mfu", r.mfu},
                        {"tokens_per_s_per_gpu", r.tokens_per_s_per_gpu},
                        {"pipeline_parallel", pp},
                        {"pipeline_bubble", bubble},
                        {"mfu_while_busy", r.mfu / (1 - bubble)}};
    if (cfg.optim.name == "muon") {
      const auto muon = cost::muon_cost(cfg.model);
      j["muon_newton_schulz_flops_per_step"] = muon.replicated_flops + muon.expert_flops;
      j["muon_matrix_params"] = muon.replicated_params + muon.expert_params;
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  const auto f = cost::training_flops_per_token(cfg.model, seq_len);
  const auto p = cost::param_counts(cfg.model);
  std::printf("model             %s: %.3fB params, %.3fB active (MTP %.3fB apart)\n", cfg.run.name.c_str(),
              p.total / 1e9, p.active / 1e9, p.mtp / 1e9);
  std::printf("training FLOPs/token at seq %d (3x forward, matmuls only):\n", seq_len);
  auto row = [](const char* name, double v) { std::printf("  %-24s %10.3f GFLOP\n", name, v / 1e9); };
  row("attention projections", f.attention_projections);
  row("attention scores full", f.attention_scores);
  row("attention scores causal", f.attention_scores_causal);
  row("dense MLP", f.dense_mlp);
  row("routed experts", f.routed_experts);
  row("shared experts", f.shared_experts);
  row("router", f.router);
  row("LM head", f.lm_head);
  row("total full", f.total);
  row("total causal", f.total_causal);
  row("MTP apart (causal)", f.mtp_causal);
  row("6N (N active, no emb)", cost::six_n_flops_per_token(cfg.model));
  if (cfg.optim.name == "muon") {
    // Per optimizer step, not per token: every replica orthogonalises the matrices it holds (zero 0).
    const auto muon = cost::muon_cost(cfg.model);
    std::printf("Muon Newton-Schulz per optimizer step: %.4g GFLOP over the %.4gB hidden-matrix parameters "
                "(a rank holding 1/expert_parallel of the experts does %.4g GFLOP of the experts' part)\n",
                (muon.replicated_flops + muon.expert_flops) / 1e9, (muon.replicated_params + muon.expert_params) / 1e9,
                muon.expert_flops / cfg.parallel.expert_parallel / 1e9);
  }
  std::printf("tokens            %.4g\n", r.tokens);
  std::printf("total FLOPs       %.4g (causal)\n", r.total_flops);
  std::printf("hardware          %s: %.1f TFLOP/s dense bf16 (%s)\n", hardware.name.c_str(), hardware.bf16_tflops,
              hardware.source.c_str());
  std::printf("MFU               %.4f (causal FLOPs over the dense bf16 peak)%s\n", r.mfu,
              given == cost::Given::mfu ? " [given]" : "");
  if (pp > 1)
    std::printf("pipeline          %d stages, %d micro-batches per step: 1F1B bubble (pp-1)/(m+pp-1) = %.4f of each "
                "step idle; MFU while busy %.4f\n",
                pp, micro_batches, bubble, r.mfu / (1 - bubble));
  std::printf("tokens/s per GPU  %.1f%s\n", r.tokens_per_s_per_gpu,
              given == cost::Given::tokens_per_s_per_gpu ? " [given]" : "");
  std::printf("GPU-hours         %.4g%s\n", r.gpu_hours, given == cost::Given::gpu_hours ? " [given]" : "");
  std::printf("days              %.2f on %d GPU%s\n", r.days, r.gpus, r.gpus == 1 ? "" : "s");
  std::printf("cost              $%.4g at $%.2f per GPU-hour\n", r.cost_usd, price);
  return 0;
}

// `moetrain bench-step`: the measured side of the cost story. Real training steps (the trainer's
// step, on synthetic tokens) after warm-up give tokens/s and MFU on this hardware; --json output feeds
// `moetrain cost --bench` to extrapolate a full run.
int run_bench_step(const std::vector<std::string>& argv) {
  const Command command{
      "bench-step",
      "Time real training steps (forward, backward, AdamW) of a config on synthetic tokens after warm-up, and "
      "print tokens/s and MFU on this hardware.",
      {{"config", "FILE", "YAML config (required)"},
       {"set", "KEY=VALUE", "override one config key (repeatable), e.g. model.n_layers=4", true},
       {"warmup", "N", "untimed steps first (default 3)"},
       {"steps", "N", "timed steps (default 10)"},
       {"json", "", "print one JSON object (the input of `moetrain cost --bench`)"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  const std::string config_path = args.require("config");
  const auto cfg = load_command_config(args);
  const auto r = train::bench_steps(cfg, args.get_int("warmup", 3), args.get_int("steps", 10), args.has("json"));
  if (log_rank() != 0) return 0;  // one report per job, from rank 0
  nlohmann::json j = {{"config", config_path},
                      {"device", r.device},
                      {"dtype", r.dtype},
                      {"gpu", r.gpu},
                      {"peak_tflops", r.peak_tflops},
                      {"peak_source", r.peak_source},
                      {"world_size", r.world_size},
                      {"seq_len", cfg.data.seq_len},
                      {"warmup_steps", r.warmup_steps},
                      {"steps", r.steps},
                      {"tokens_per_step", r.tokens_per_step},
                      {"step_s_mean", r.step_s_mean},
                      {"step_s_median", r.step_s_median},
                      {"step_s_min", r.step_s_min},
                      {"tokens_per_s", r.tokens_per_s},
                      {"tokens_per_s_per_gpu", r.tokens_per_s_per_gpu},
                      {"flops_per_token_causal", r.flops_per_token_causal},
                      {"mfu", r.mfu},
                      {"params_total", r.params_total},
                      {"params_active", r.params_active},
                      {"expert_parallel", r.expert_parallel},
                      {"moe_layers", r.moe_layers},
                      {"micro_batch_size", r.micro_batch_size},
                      {"grad_accum", cfg.train.grad_accum},
                      {"d_model", cfg.model.d_model},
                      {"top_k", cfg.model.moe.top_k},
                      {"n_experts", cfg.model.moe.n_experts},
                      {"max_groups_per_token", cfg.model.moe.router.max_groups_per_token},
                      {"expert_groups", config::expert_groups(cfg)},
                      {"all_to_all_bytes_per_step", r.all_to_all_bytes_per_step},
                      {"pipeline_parallel", r.pipeline_parallel},
                      {"pp_layers", r.pp_layers},
                      {"p2p_bytes_per_step", r.p2p_bytes_per_step},
                      {"zero", r.zero},
                      {"overlap_grad_reduce", r.overlap_grad_reduce},
                      {"grad_buckets", r.grad_buckets},
                      {"grad_buckets_overlapped", r.grad_buckets_overlapped},
                      {"optimizer_state_bytes", r.optimizer_state_bytes},
                      {"peak_rss_bytes", r.peak_rss_bytes},
                      {"peak_allocated_bytes", r.peak_allocated_bytes},
                      {"host_syncs_per_step", r.host_syncs_per_step},
                      {"host_syncs_by_reason", r.host_syncs_by_reason},
                      {"ops_per_step", r.ops_per_step},
                      {"first_loss", r.first_loss},
                      {"last_loss", r.last_loss}};
  if (args.has("json")) {
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  std::printf("bench-step       %s on %s (%s), world %d\n", config_path.c_str(), r.device.c_str(), r.dtype.c_str(),
              r.world_size);
  std::printf("model            %.4gM params, %.4gM active per token\n", r.params_total / 1e6, r.params_active / 1e6);
  std::printf("steps            %d timed after %d warm-up, %lld tokens each\n", r.steps, r.warmup_steps,
              static_cast<long long>(r.tokens_per_step));
  std::printf("step time        mean %.2f ms, median %.2f ms, min %.2f ms\n", r.step_s_mean * 1e3,
              r.step_s_median * 1e3, r.step_s_min * 1e3);
  std::printf("tokens/s         %.1f (%.1f per device)\n", r.tokens_per_s, r.tokens_per_s_per_gpu);
  std::printf("FLOPs/token      %.4g (training, causal)\n", r.flops_per_token_causal);
  std::printf("MFU              %.4f against %s at %.4g TFLOP/s\n", r.mfu, r.gpu.c_str(), r.peak_tflops);
  if (r.mfu > 1) std::printf("%s\n", cost::mfu_warning(r.mfu, cost::Hardware{r.gpu, r.peak_tflops, std::nullopt, r.peak_source}).c_str());
  std::printf("memory           peak %.1f MiB allocated by LibTorch (%.1f MiB of it AdamW state, parallel.zero %d), "
              "peak RSS %.1f MiB\n",
              r.peak_allocated_bytes / 1048576.0, r.optimizer_state_bytes / 1048576.0, r.zero,
              r.peak_rss_bytes / 1048576.0);
  std::printf("loss             %.4f -> %.4f\n", r.first_loss, r.last_loss);
  return 0;
}

int run_plan(const std::vector<std::string>& argv) {
  const Command command{
      "plan",
      "The memory one rank needs for a config on a layout, from the config alone: weights, compute copies, "
      "gradients, AdamW state, one micro-batch's activations (by train.activation_checkpointing), the loss and "
      "communication buffers; the peak against the device's memory, and the largest micro-batch, the smallest "
      "expert_parallel and the ZeRO stage that fit.",
      {{"config", "FILE", "YAML config (required)"},
       {"set", "KEY=VALUE", "override one config key (repeatable)", true},
       {"gpus", "N", "ranks of the job (default parallel.expert_parallel x parallel.pipeline_parallel)"},
       {"gpu", "NAME", "h100, h200, h800, a100, b200 or cpu; default cost.gpu"},
       {"json", "", "print one JSON object instead of text"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  args.require("config");
  const auto cfg = load_command_config(args);
  const int ep = cfg.parallel.expert_parallel, pp = cfg.parallel.pipeline_parallel;
  const int gpus = args.has("gpus") ? args.get_int("gpus", 1) : ep * pp;
  if (gpus < 1 || gpus % (ep * pp) != 0)
    throw UsageError("--gpus " + std::to_string(gpus) + " must be a positive multiple of parallel.expert_parallel = " +
                     std::to_string(ep) + " x parallel.pipeline_parallel = " + std::to_string(pp));
  const std::string gpu = args.has("gpu") ? args.get("gpu") : cfg.cost.gpu;
  const double memory = cost::device_memory_bytes(gpu);
  const double usable = gpu == "cpu" ? memory : memory * cost::kUsableFraction;
  const auto stages = cost::plan_stages(cfg, gpus);
  const auto p = cost::plan_memory(cfg, gpus);  // the stage with the largest peak
  const auto fit = cost::advise_fit(cfg, gpus, usable);
  const bool fits = p.peak <= usable;
  if (args.has("json")) {
    nlohmann::json j = {{"world_size", p.world_size}, {"expert_parallel", p.expert_parallel}, {"zero", p.zero},
                        {"micro_batch_size", p.micro_batch_size}, {"grad_accum", p.grad_accum},
                        {"tokens_per_micro_batch", p.tokens_per_micro_batch}, {"params_per_rank", p.params_per_rank},
                        {"weights_bytes", p.weights}, {"master_weights_bytes", p.master_weights},
                        {"compute_copy_bytes", p.compute_copy},
                        {"gradient_bytes", p.gradients}, {"optimizer_bytes", p.optimizer},
                        {"activation_bytes", p.activations}, {"loss_bytes", p.loss},
                        {"communication_bytes", p.communication}, {"peak_bytes", p.peak},
                        {"peak_moment", p.peak_moment}, {"gpu", gpu}, {"device_memory_bytes", memory},
                        {"usable_bytes", usable}, {"fits", fits},
                        {"largest_micro_batch", fit.largest_micro_batch},
                        {"smallest_expert_parallel", fit.smallest_expert_parallel}, {"zero_needed", fit.zero_needed},
                        {"pipeline_parallel", p.pipeline_parallel}, {"stage", p.stage}, {"blocks", p.blocks},
                        {"in_flight", p.in_flight}, {"pipeline_bubble", p.bubble}};
    j["stage_peak_bytes"] = nlohmann::json::array();
    for (const auto& s : stages) j["stage_peak_bytes"].push_back(s.peak);
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  constexpr double GiB = 1024.0 * 1024.0 * 1024.0;
  std::printf("plan             world %d (expert_parallel %d, zero %d), %s, activation checkpointing %s\n",
              p.world_size, p.expert_parallel, p.zero, cfg.run.dtype.c_str(),
              cfg.train.activation_checkpointing.c_str());
  std::printf("micro-batch      %d sequences x %d tokens per rank, grad_accum %d; %.4g parameters per rank\n",
              p.micro_batch_size, cfg.data.seq_len, p.grad_accum, p.params_per_rank);
  if (p.pipeline_parallel > 1) {
    std::string per_stage;
    for (const auto& s : stages)
      per_stage += (per_stage.empty() ? "" : ", ") + std::to_string(s.blocks) + " (" + format_double(s.peak / GiB, 3) + ")";
    std::printf("pipeline         %d stages, blocks (peak GiB) per stage: %s; 1F1B bubble %.4f\n", p.pipeline_parallel,
                per_stage.c_str(), p.bubble);
    std::printf("largest stage    stage %d: %d blocks, activations of %d micro-batch(es) in flight\n", p.stage, p.blocks,
                p.in_flight);
  }
  std::printf("per rank (GiB)\n");
  const bool masters = p.master_weights > 0, lora = cfg.train.lora.rank > 0;
  if (lora)
    std::printf("lora             rank %d on %zu target(s): the base frozen in %s, adapters fp32 with their gradients "
                "and moments\n", cfg.train.lora.rank, cfg.train.lora.targets.size(), cfg.run.dtype.c_str());
  const std::pair<const char*, double> rows[] = {
      {lora ? "weights (frozen base, adapters)" : masters ? "weights (bf16 matmul, fp32 rest)" : "weights (fp32 master)",
       p.weights},
      {"fp32 master shares (ZeRO-1)", p.master_weights}, {"compute copies (bf16)", p.compute_copy},
      {"gradients (fp32)", p.gradients},
      {cfg.optim.name == "muon" && !lora ? "Muon momenta, AdamW moments" : "AdamW moments", p.optimizer},
      {"activations (1 micro-batch)", p.activations}, {"loss (logits' gradients)", p.loss},
      {"communication buffers", p.communication}};
  for (const auto& [name, bytes] : rows) std::printf("  %-30s %10.3f\n", name, bytes / GiB);
  std::printf("peak             %.3f GiB (at the %s) of %.3f GiB usable on %s (%.1f GiB%s): %s\n", p.peak / GiB,
              p.peak_moment.c_str(), usable / GiB, gpu.c_str(), memory / GiB,
              gpu == "cpu" ? "" : ", 92% usable", fits ? "fits" : "does NOT fit");
  std::printf("largest micro-batch that fits      %s\n",
              fit.largest_micro_batch > 0 ? std::to_string(fit.largest_micro_batch).c_str() : "none (not even 1)");
  std::printf("smallest expert_parallel (mb 1)    %s\n", fit.smallest_expert_parallel > 0
                                                            ? std::to_string(fit.smallest_expert_parallel).c_str()
                                                            : "none at this world size");
  std::printf("ZeRO stage needed (mb 1)           %s\n",
              fit.zero_needed >= 0 ? std::to_string(fit.zero_needed).c_str() : "neither 0 nor 1 fits");
  return 0;
}

}  // namespace moetrain::cli
