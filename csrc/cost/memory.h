// The bytes a model's training state needs per rank, from the config alone, and the check that it
// fits this machine before anything is allocated: an absurd size (model.d_model = 1e9) is then one
// line naming the keys and the figure, not an allocator's error from deep inside LibTorch.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <string>

#include "config/config.h"

namespace moetrain::cost {

// fp32 weights, their fp32 gradients and AdamW's two fp32 moments, per rank: routed experts are
// divided over parallel.expert_parallel, everything else (MTP modules included) is replicated. At `zero` 1 (with the job's
// `world_size`) the moments are divided over each parameter's replicas: world_size for replicated
// weights, world_size / expert_parallel for experts. Activations are not counted, so this is a
// floor, not a plan. Computed in double: it never overflows.
struct MemoryEstimate {
  double params_per_rank = 0;
  double weight_bytes = 0;
  double gradient_bytes = 0;
  double optimizer_bytes = 0;
  double bytes(bool training) const { return training ? weight_bytes + gradient_bytes + optimizer_bytes : weight_bytes; }
};
// `muon`: optim.name muon, one fp32 momentum for each hidden matrix's element (cost::muon_cost).
MemoryEstimate estimate_memory(const config::ModelConfig& model, int expert_parallel, int world_size = 0, int zero = 0,
                               bool muon = false);

// What building and running the model needs beside its parameters, at least: the RoPE tables (cos
// and sin in fp32 over model.max_seq_len positions, and the fp64 angles they are computed from) and,
// when training, one micro-batch of train.micro_batch_size x data.seq_len tokens: the fp32 residual
// stream autograd keeps at each block's input (this rank's share of the blocks) and the fp32 logits
// (train.loss_chunk_tokens rows of them when set). Attention, the experts' rows and the norms are
// left out: a floor, so that a refusal never stops a run that would fit.
struct WorkingMemory {
  double rope_bytes = 0;
  double micro_batch_bytes = 0;  // 0 unless training
};
WorkingMemory estimate_working_memory(const config::Config& cfg, bool training);

// Bytes of memory `device` ("cpu" or "cuda") has: the physical memory, or less where this process's
// address-space limit (ulimit -v) or its container's cgroup memory.max is lower; or the first GPU's total.
double machine_memory_bytes(const std::string& device);

// Throws ConfigError when the estimate (weights only unless training) exceeds available_bytes,
// naming the size keys with their values, the estimate and the memory in GiB, and `device`; then
// when the estimate and the working memory together do, naming model.max_seq_len or the micro-batch
// keys with the GiB of each.
// `world_size` 0 means expert_parallel (parallel.zero then saves nothing on replicated weights).
void require_memory(const config::Config& cfg, int expert_parallel, bool training, double available_bytes,
                    const std::string& device, int world_size = 0);
// The same against this machine: require_memory(cfg, ..., machine_memory_bytes(cfg.run.device), ...).
void require_memory(const config::Config& cfg, int expert_parallel, bool training, int world_size = 0);

// The peak of the bytes LibTorch's allocator holds for `device` while the meter lives: on the CPU
// through c10's memory-reporting hook (allocations made on the creating thread and, with
// run.threads 1, all of them; only tensors allocated while it lives are counted), on CUDA the caching
// allocator's peak of allocated bytes (reset when the meter starts). What `plan` is checked against.
class PeakMemoryMeter {
 public:
  explicit PeakMemoryMeter(torch::Device device);
  ~PeakMemoryMeter();
  PeakMemoryMeter(const PeakMemoryMeter&) = delete;
  PeakMemoryMeter& operator=(const PeakMemoryMeter&) = delete;
  double peak_bytes() const;

 private:
  struct Cpu;
  torch::Device device_;
  std::shared_ptr<Cpu> cpu_;
};

}  // namespace moetrain::cost
