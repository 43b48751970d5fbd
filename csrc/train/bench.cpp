// bench-step: the trainer's own step on synthetic tokens, timed after a warm-up (see trainer.h).
#include <algorithm>

#include "common/errors.h"
#include "common/host_sync.h"
#include "common/log.h"
#include "cost/flops.h"
#include "cost/hardware.h"
#include "cost/memory.h"
#include "train/step.h"

#include <c10/cuda/CUDAFunctions.h>
#include <sys/resource.h>

#include <cstdlib>

namespace moetrain::train {

BenchResult bench_steps(const config::Config& given, int warmup_steps, int steps, bool quiet) {
  if (warmup_steps < 0 || steps < 1)
    throw UsageError("bench-step needs --warmup >= 0 and --steps >= 1 (got " + std::to_string(warmup_steps) + ", " +
                     std::to_string(steps) + ")");
  const Process process(given);
  const auto& layout = process.layout;
  const auto& comm = layout->world;
  const config::Config& cfg = process.cfg;
  const torch::Device device = process.device;
  const auto compute_dtype = process.compute_dtype;
  const cost::PeakMemoryMeter meter(device);  // from the model's build on: weights, gradients, AdamW, steps
  Trainable trainable(process);
  auto& model = trainable.model;
  auto& optimizer = *trainable.optimizer;
  auto& parallel = trainable.parallel;

  // Synthetic tokens, uniform over the vocabulary and a pure function of (seed, step, micro, data rank):
  // every pipeline stage of a data-parallel rank draws the same batch.
  const int B = cfg.train.micro_batch_size, S = cfg.data.seq_len;
  auto synthetic = [&](int64_t step, int micro) {
    auto tokens = torch::empty({B, S + 1}, torch::kInt64);
    auto* t = tokens.data_ptr<int64_t>();
    const uint64_t base = data::mix64(cfg.run.seed ^ data::mix64(uint64_t(step) * 1000003u + uint64_t(micro) * 7919u +
                                                                  uint64_t(layout->dp_rank()) * 104729u));
    for (int64_t i = 0; i < tokens.numel(); ++i) t[i] = int64_t(data::mix64(base + uint64_t(i)) % uint64_t(cfg.model.vocab_size));
    // Separate buffers (with one row, contiguous() of either would be a view of `tokens`).
    data::Batch batch{tokens.narrow(1, 0, S).clone(), tokens.narrow(1, 1, S).clone(), {}};
    if (cfg.data.packing != "documents") return batch;
    // data.packing: documents: each row packed with documents of S/8 to S/2 tokens (hashed lengths),
    // positions restarting at each, so the step pays for the block-diagonal attention.
    batch.positions = torch::empty({B, S}, torch::kInt64);
    auto* p = batch.positions.data_ptr<int64_t>();
    auto* target = batch.targets.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      int64_t position = 0, length = 0, k = 0;
      for (int64_t i = 0; i < S; ++i) {
        if (position == length) {  // a new document
          position = 0;
          length = std::max(1, S / 8) + int64_t(data::mix64(base ^ uint64_t(b * S + k++)) % uint64_t(std::max(1, 3 * S / 8)));
        }
        p[b * S + i] = position++;
        if (position == length) target[b * S + i] = data::kIgnoreTarget;  // its last token predicts nothing
      }
    }
    return batch;
  };

  BenchResult r;
  r.device = device.is_cuda() ? "cuda" : "cpu";
  r.dtype = compute_dtype ? "bf16" : "fp32";
  r.world_size = comm->world_size();
  r.warmup_steps = warmup_steps;
  r.steps = steps;
  r.tokens_per_step = int64_t(B) * S * cfg.train.grad_accum * layout->dp_size();
  const auto counts = layout->pp_size() == 1 ? model->param_counts() : [&] {  // a stage holds part of the model
    const auto c = cost::param_counts(cfg.model);
    return model::ParamCounts{c.total, c.active};
  }();
  r.params_total = counts.total;
  r.params_active = counts.active;

  r.expert_parallel = layout->ep_size();
  r.micro_batch_size = cfg.train.micro_batch_size;
  r.moe_layers = cfg.model.n_layers - cfg.model.dense_layers;
  r.pipeline_parallel = layout->pp_size();
  r.pp_layers = cost::pipeline_layers(cfg);
  std::vector<double> step_s;
  int64_t a2a_bytes_at_start = 0, p2p_bytes_at_start = 0;
  std::optional<OpCounter> ops;  // over the timed steps only
  for (int i = 0; i < warmup_steps + steps; ++i) {
    if (i == warmup_steps) {
      a2a_bytes_at_start = layout->ep->all_to_all_bytes_sent();
      p2p_bytes_at_start = layout->pp->p2p_bytes_sent();
      reset_host_sync_counts();
      ops.emplace();
      // What CUDA itself sees (scripts/gpu_check.sh): a warning at every synchronising CUDA call of the
      // timed steps, to set beside host_syncs_per_step.
      if (device.is_cuda() && std::getenv("MOETRAIN_CUDA_SYNC_DEBUG"))
        c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_WARN);
    }
    const double lr = optim::learning_rate(cfg.optim, i, std::max<int64_t>(1, cfg.optim.decay_steps > 0 ? cfg.optim.decay_steps : cfg.train.steps));
    const double start = now_s();
    auto outcome = train_step(*model, optimizer, parallel, cfg, i, lr, device, [&](int micro) { return synthetic(i, micro); });
    if (device.is_cuda()) torch::cuda::synchronize();
    const double took = now_s() - start;
    if (!outcome.applied) throw Error("[bench-step] step " + std::to_string(i + 1) + ": " + outcome.nonfinite);
    if (i == 0) r.first_loss = outcome.loss;
    r.last_loss = outcome.loss;
    if (i >= warmup_steps) step_s.push_back(took);
    if (!quiet)
      log_line("bench-step " + std::to_string(i + 1) + "/" + std::to_string(warmup_steps + steps) +
             (i < warmup_steps ? " (warm-up)" : "") + " | " + format_double(took * 1e3, 4) + " ms | loss " +
             format_double(outcome.loss, 4));
  }
  if (device.is_cuda()) c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  const auto syncs = host_sync_counts();
  r.ops_per_step = double(ops->count()) / steps;
  ops.reset();
  r.host_syncs_per_step = double(syncs.total) / steps;
  for (const auto& [reason, n] : syncs.by_reason) r.host_syncs_by_reason[reason] = double(n) / steps;
  r.all_to_all_bytes_per_step = double(layout->ep->all_to_all_bytes_sent() - a2a_bytes_at_start) / steps;
  r.p2p_bytes_per_step = double(layout->pp->p2p_bytes_sent() - p2p_bytes_at_start) / steps;
  r.zero = cfg.parallel.zero;
  r.overlap_grad_reduce = cfg.parallel.overlap_grad_reduce;
  std::tie(r.grad_buckets_overlapped, r.grad_buckets) = optimizer.overlapped_buckets();
  r.peak_allocated_bytes = meter.peak_bytes();
  for (const auto& t : optimizer.state_tensors()) r.optimizer_state_bytes += double(t.nbytes());
  struct rusage usage {};
  if (::getrusage(RUSAGE_SELF, &usage) == 0) r.peak_rss_bytes = double(usage.ru_maxrss) * 1024.0;  // Linux: KiB
  double sum = 0;
  for (double s : step_s) sum += s;
  auto sorted = step_s;
  std::sort(sorted.begin(), sorted.end());
  r.step_s_mean = sum / double(step_s.size());
  r.step_s_min = sorted.front();
  r.step_s_median = sorted[sorted.size() / 2];
  r.tokens_per_s = double(r.tokens_per_step) / r.step_s_mean;
  r.tokens_per_s_per_gpu = r.tokens_per_s / r.world_size;
  r.flops_per_token_causal = cost::training_flops_per_token(cfg.model, S).total_causal;
  // On the CPU the peak is this machine's (measured); on a GPU it is the datasheet of cost.gpu.
  if (device.is_cuda() && cfg.cost.gpu == "cpu")
    throw ConfigError("bench-step on cuda needs cost.gpu to name the GPU (e.g. --set cost.gpu=h200), not \"cpu\"");
  const cost::Hardware hardware = cost::lookup_hardware(device.is_cuda() ? cfg.cost.gpu : "cpu");
  r.gpu = hardware.name;
  r.peak_tflops = hardware.bf16_tflops;
  r.peak_source = hardware.source;
  r.mfu = r.tokens_per_s_per_gpu * r.flops_per_token_causal / (hardware.bf16_tflops * 1e12);
  return r;
}

}  // namespace moetrain::train
