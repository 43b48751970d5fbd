// Memory of a model's training state from its config (see memory.h), and the machine's memory.
#include "cost/memory.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/core/Allocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <utility>
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

MemoryEstimate estimate_memory(const config::ModelConfig& model, int expert_parallel, int world_size, int zero,
                               bool muon) {
  const auto counts = param_counts_approx(model);
  const double ep = expert_parallel > 0 ? expert_parallel : 1;
  const double world = std::max(ep, double(world_size));
  const double replicated = counts.total + counts.mtp - counts.routed_experts, experts = counts.routed_experts / ep;
  MemoryEstimate e;
  e.params_per_rank = replicated + experts;
  e.weight_bytes = kFp32Bytes * e.params_per_rank;
  e.gradient_bytes = e.weight_bytes;
  // AdamW's first and second moments, of a 1/replicas share of each parameter at zero 1.
  e.optimizer_bytes = 2 * kFp32Bytes * (zero >= 1 ? replicated / world + experts / (world / ep) : e.params_per_rank);
  if (muon) {  // one momentum per hidden matrix element instead of two moments, held by its owner at zero 1
    const auto matrices = muon_cost(model);
    const double replicated_matrices = matrices.replicated_params, expert_matrices = matrices.expert_params / ep;
    e.optimizer_bytes -= kFp32Bytes * (zero >= 1 ? replicated_matrices / world + expert_matrices / (world / ep)
                                                 : replicated_matrices + expert_matrices);
  }
  return e;
}

WorkingMemory estimate_working_memory(const config::Config& cfg, bool training) {
  const auto& m = cfg.model;
  WorkingMemory w;
  const double rotated = config::rotary_dim(m);  // the RoPE tables' width
  const double angle_bytes = cfg.run.device == "cpu" ? 8 : 0;  // on the CPU only: the tables are moved to a GPU
  w.rope_bytes = double(m.max_seq_len) * rotated * (2 * kFp32Bytes + angle_bytes);
  if (!training) return w;
  const double tokens = double(cfg.train.micro_batch_size) * cfg.data.seq_len;
  const double logit_rows =
      cfg.train.loss_chunk_tokens > 0 ? std::min(tokens, double(cfg.train.loss_chunk_tokens)) : tokens;
  const double logits = kFp32Bytes * logit_rows * m.vocab_size;
  // With a pipeline the largest stage holds ceil(n_layers / pp) blocks and the last one the logits:
  // each is a floor for some rank.
  const int pp = std::max(1, cfg.parallel.pipeline_parallel);
  const double blocks = kFp32Bytes * tokens * m.d_model * std::ceil(double(m.n_layers) / pp);
  w.micro_batch_bytes = pp == 1 ? blocks + logits : std::max(blocks, logits);
  return w;
}

double machine_memory_bytes(const std::string& device) {
  if (device == "cuda" && torch::cuda::is_available())
    return double(at::cuda::getDeviceProperties(0)->totalGlobalMem);
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGE_SIZE);
  double bytes = pages > 0 && page_size > 0 ? double(pages) * double(page_size) : 0;
  // A process may get less than the machine has: its address-space limit (ulimit -v), its container's
  // memory limit (cgroup v2).
  auto lower = [&](double limit) {
    if (limit > 0 && (bytes <= 0 || limit < bytes)) bytes = limit;
  };
  if (rlimit limit{}; ::getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) lower(double(limit.rlim_cur));
  if (std::ifstream cgroup("/sys/fs/cgroup/memory.max"); cgroup) {
    double limit = 0;
    if (cgroup >> limit) lower(limit);  // "max" (no limit) reads as no number
  }
  return bytes;
}

namespace {

// The second half of require_memory: the parameters' state fits, but not with the RoPE tables and
// (training) the micro-batch beside it. Each that is a tenth of the need or more is named, the larger
// first, with the keys that make it smaller.
void require_working_memory(const config::Config& cfg, bool training, double state_bytes, double available_bytes,
                            const std::string& device) {
  const WorkingMemory w = estimate_working_memory(cfg, training);
  const double need = state_bytes + w.rope_bytes + w.micro_batch_bytes;
  if (need <= available_bytes) return;
  struct Term {
    double bytes;
    std::string what;
    std::vector<std::string> keys;
  };
  std::vector<Term> terms{
      {w.rope_bytes, "model.max_seq_len = " + std::to_string(cfg.model.max_seq_len) + " (RoPE tables: " +
                         gib(w.rope_bytes) + ")", {"model.max_seq_len"}},
      {w.micro_batch_bytes, "one micro-batch of train.micro_batch_size = " + std::to_string(cfg.train.micro_batch_size) +
                                " x data.seq_len = " + std::to_string(cfg.data.seq_len) +
                                " tokens (its logits and block inputs: " + gib(w.micro_batch_bytes) + ")",
       {"train.micro_batch_size", "data.seq_len"}}};
  std::sort(terms.begin(), terms.end(), [](const Term& a, const Term& b) { return a.bytes > b.bytes; });
  std::string named;
  std::vector<std::string> keys;
  size_t n_named = 0;
  for (const auto& t : terms) {
    if (n_named > 0 && t.bytes < need / 10) break;
    named += (n_named++ == 0 ? "" : " and ") + t.what;
    keys.insert(keys.end(), t.keys.begin(), t.keys.end());
  }
  std::string advice;
  for (size_t i = 0; i < keys.size(); ++i) advice += (i == 0 ? "" : i + 1 == keys.size() ? " or " : ", ") + keys[i];
  const std::string state = training ? "fp32 weights, gradients and AdamW state" : "fp32 weights";
  throw ConfigError(named + ", with the model's " + gib(state_bytes) + " of " + state + ", " +
                    (n_named == 1 ? "needs" : "need") + " at least " + gib(need) + ", more than the " +
                    gib(available_bytes) + " of memory this machine's " + device + " has: make " + advice + " smaller");
}

}  // namespace

void require_memory(const config::Config& cfg, int expert_parallel, bool training, double available_bytes,
                    const std::string& device, int world_size) {
  const MemoryEstimate e = estimate_memory(cfg.model, expert_parallel, world_size, cfg.parallel.zero, cfg.optim.name == "muon");
  const double need = e.bytes(training);
  if (available_bytes <= 0) return;  // unknown
  if (need <= available_bytes) return require_working_memory(cfg, training, need, available_bytes, device);
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
