// Memory of a model's training state from its config (see memory.h), and the machine's memory.
#include "cost/memory.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/Allocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <unistd.h>

#include <cstdio>
#include <string>
#include <vector>

#include "common/errors.h"
#include "cost/flops.h"

namespace moetrain::cost {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kFp32Bytes = 4;

std::string gib(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, bytes < 0.1 * kGiB ? "%.3f GiB" : "%.1f GiB", bytes / kGiB);
  return buf;
}

}  // namespace

MemoryEstimate estimate_memory(const config::ModelConfig& model, int expert_parallel, int world_size, int zero) {
  const auto counts = param_counts_approx(model);
  const double ep = expert_parallel > 0 ? expert_parallel : 1;
  const double world = std::max(ep, double(world_size));
  const double replicated = counts.total - counts.routed_experts, experts = counts.routed_experts / ep;
  MemoryEstimate e;
  e.params_per_rank = replicated + experts;
  e.weight_bytes = kFp32Bytes * e.params_per_rank;
  e.gradient_bytes = e.weight_bytes;
  // AdamW's first and second moments, of a 1/replicas share of each parameter at zero 1.
  e.optimizer_bytes = 2 * kFp32Bytes * (zero >= 1 ? replicated / world + experts / (world / ep) : e.params_per_rank);
  return e;
}

double machine_memory_bytes(const std::string& device) {
  if (device == "cuda" && torch::cuda::is_available())
    return double(at::cuda::getDeviceProperties(0)->totalGlobalMem);
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page_size > 0 ? double(pages) * double(page_size) : 0;
}

void require_memory(const config::Config& cfg, int expert_parallel, bool training, double available_bytes,
                    const std::string& device, int world_size) {
  const MemoryEstimate e = estimate_memory(cfg.model, expert_parallel, world_size, cfg.parallel.zero);
  const double need = e.bytes(training);
  if (available_bytes <= 0 || need <= available_bytes) return;
  const auto& m = cfg.model;
  const std::string sizes = "model.vocab_size = " + std::to_string(m.vocab_size) + ", model.d_model = " +
                            std::to_string(m.d_model) + ", model.n_layers = " + std::to_string(m.n_layers) +
                            ", model.moe.n_experts = " + std::to_string(m.moe.n_experts) +
                            ", model.moe.expert_hidden = " + std::to_string(m.moe.expert_hidden) +
                            ", model.dense_hidden = " + std::to_string(m.dense_hidden);
  char params[64];
  std::snprintf(params, sizeof params, "%.3g", e.params_per_rank);
  const std::string what = training ? "fp32 weights, gradients and AdamW state" : "fp32 weights";
  std::vector<std::string> remedies{"make the model smaller"};
  if (training && m.moe.n_experts > 1) remedies.push_back("shard its experts over more ranks (parallel.expert_parallel)");
  if (training && cfg.parallel.zero == 0) remedies.push_back("shard AdamW's moments over the replicas (parallel.zero: 1)");
  std::string advice;
  for (size_t i = 0; i < remedies.size(); ++i)
    advice += (i == 0 ? "" : i + 1 == remedies.size() ? " or " : ", ") + remedies[i];
  throw ConfigError("the model (" + sizes + ") has " + params + " parameters per rank; its " + what + " alone need " +
                    gib(need) + ", more than the " + gib(available_bytes) + " of memory this machine's " + device +
                    " has: " + advice);
}

void require_memory(const config::Config& cfg, int expert_parallel, bool training, int world_size) {
  require_memory(cfg, expert_parallel, training, machine_memory_bytes(cfg.run.device), cfg.run.device, world_size);
}

struct PeakMemoryMeter::Cpu final : c10::MemoryReportingInfoBase {
  void reportMemoryUsage(void*, int64_t, size_t total_allocated, size_t, c10::Device device) override {
    if (device.is_cpu()) peak = std::max(peak, double(total_allocated));
  }
  bool memoryProfilingEnabled() const override { return true; }
  double peak = 0;
};

PeakMemoryMeter::PeakMemoryMeter(torch::Device device) : device_(device) {
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
  } else {
    cpu_ = std::make_shared<Cpu>();
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, cpu_);
  }
}

PeakMemoryMeter::~PeakMemoryMeter() {
  if (cpu_) c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
}

double PeakMemoryMeter::peak_bytes() const {
  if (cpu_) return cpu_->peak;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device_.index() < 0 ? 0 : device_.index());
  return double(stats.allocated_bytes[size_t(c10::CachingAllocator::StatType::AGGREGATE)].peak);
}

}  // namespace moetrain::cost
