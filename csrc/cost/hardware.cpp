// Datasheet peaks (dense, i.e. half the "with sparsity" figures NVIDIA prints) and the CPU probe.
#include "cost/hardware.h"

#include <ATen/CPUGeneratorImpl.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <map>
#include <mutex>

#include "common/errors.h"

namespace moetrain::cost {

namespace {

const std::vector<Hardware>& gpu_table() {
  static const std::vector<Hardware> table = {
      // NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (https://www.nvidia.com/en-us/data-center/h100/):
      // BF16 1,979 and FP8 3,958 TFLOPS "with sparsity"; dense is half.
      // GPU memory bandwidth, H100 SXM: 3.35 TB/s (HBM3, 80 GB).
      {"h100", 989.4, 1978.9, "NVIDIA H100 datasheet (SXM), dense = half the sparsity figure", 3.35,
       "NVIDIA H100 datasheet (SXM): 3.35 TB/s"},
      // NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (https://www.nvidia.com/en-us/data-center/h200/):
      // same GH100 compute as H100 SXM (BF16 1,979 / FP8 3,958 with sparsity).
      // GPU memory bandwidth, H200 SXM: 4.8 TB/s (HBM3e, 141 GB).
      {"h200", 989.4, 1978.9, "NVIDIA H200 datasheet (SXM), dense = half the sparsity figure", 4.8,
       "NVIDIA H200 datasheet (SXM): 4.8 TB/s"},
      // NVIDIA H800 SXM5, the export variant of H100 SXM: its NVLink was cut, not its tensor cores. No
      // public H800 datasheet was found to cite; the H100 SXM figure is assumed, and DeepSeek's own
      // numbers imply it (250 GFLOPs/token * 1,542 tokens/s / 38.94% MFU = 990 TFLOP/s).
      // Its memory is the H100 SXM's 80 GB of HBM3; the same bandwidth is assumed.
      {"h800", 989.4, 1978.9, "assumed equal to H100 SXM (no public H800 datasheet), dense", 3.35,
       "assumed equal to H100 SXM: 3.35 TB/s"},
      // NVIDIA A100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/a100/): BF16 312
      // TFLOPS dense (624 with sparsity); no fp8 tensor cores.
      // GPU memory bandwidth, A100 80GB SXM: 2,039 GB/s (HBM2e).
      {"a100", 312.0, std::nullopt, "NVIDIA A100 datasheet (SXM), dense; no fp8", 2.039,
       "NVIDIA A100 datasheet (80GB SXM): 2,039 GB/s"},
      // NVIDIA HGX B200 specifications (https://www.nvidia.com/en-us/data-center/hgx/), per GPU at 1,000 W:
      // FP16/BF16 4.5 PFLOPS and FP8 9 PFLOPS with sparsity; dense is half.
      // Memory bandwidth: 64 TB/s for the 8 GPUs of an HGX B200, 8 TB/s each (HBM3e).
      {"b200", 2250.0, 4500.0, "NVIDIA HGX B200 specifications, per GPU, dense = half the sparsity figure", 8.0,
       "NVIDIA HGX B200 specifications: 64 TB/s over 8 GPUs"},
  };
  return table;
}

}  // namespace

std::vector<std::string> hardware_names() {
  std::vector<std::string> names;
  for (const auto& h : gpu_table()) names.push_back(h.name);
  names.push_back("cpu");
  return names;
}

namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// The best rate of `run`, which does `work` units a call: warmed up for 0.03 s (threads, caches,
// clock), then repeated for 0.12 s and at least 3 times; single timings on a shared machine swing by 30%.
double best_rate(const std::function<void()>& run, double work) {
  for (auto start = Clock::now(); seconds_since(start) < 0.03;) run();
  double best = 0;
  const auto start = Clock::now();
  for (int reps = 0; reps < 3 || seconds_since(start) < 0.12; ++reps) {
    const auto t = Clock::now();
    run();
    best = std::max(best, work / seconds_since(t));
  }
  return best;
}

// `probe()` once per thread count and process, remembered in `measured` (guarded by `mutex`).
double once_per_thread_count(std::mutex& mutex, std::map<int, double>& measured, const std::function<double()>& probe) {
  const std::lock_guard<std::mutex> lock(mutex);
  const int threads = at::get_num_threads();
  if (auto it = measured.find(threads); it != measured.end()) return it->second;
  torch::NoGradGuard no_grad;
  return measured[threads] = probe();
}

}  // namespace

double measure_cpu_tflops() {
  // The peak a CPU run is measured against is the best fp32 matmul rate this process reaches with the
  // threads it trains with. One size is not that: on a small shared machine a 1024^3 product runs at
  // half the rate of a 512^3 one that fits in cache (which is what a small model's matmuls do). So:
  // several sizes, the best rate of all.
  static std::mutex mutex;
  static std::map<int, double> measured;
  return once_per_thread_count(mutex, measured, [] {
    // Its operands come from a generator of its own: the global one (LoRA's dropout masks) must not move
    // with whether this process has probed yet.
    auto generator = at::make_generator<at::CPUGeneratorImpl>(0x5eed);
    double best_flops_per_s = 0;
    for (int64_t n : {256, 512, 1024}) {
      const auto a = torch::randn({n, n}, generator, torch::kFloat), b = torch::randn({n, n}, generator, torch::kFloat);
      auto c = torch::empty({n, n}, torch::kFloat);
      best_flops_per_s = std::max(best_flops_per_s, best_rate([&] { torch::mm_out(c, a, b); }, 2.0 * double(n) * n * n));
    }
    return best_flops_per_s / 1e12;
  });
}

double measure_cpu_bandwidth() {
  static std::mutex mutex;
  static std::map<int, double> measured;
  return once_per_thread_count(mutex, measured, [] {
    const int64_t n = int64_t(16) << 20;  // 64 MiB of fp32: far past the caches
    const auto src = torch::ones({n}, torch::kFloat);
    auto dst = torch::empty({n}, torch::kFloat);
    return best_rate([&] { dst.copy_(src); }, 2.0 * 4.0 * double(n)) / 1e12;  // bytes read + bytes written
  });
}

std::string mfu_warning(double mfu, const Hardware& hardware) {
  if (!(mfu > 1.0)) return "";
  char figures[96];
  std::snprintf(figures, sizeof figures, "MFU %.0f%% is above 100%%: the peak of cost.gpu = %s (%.4g TFLOP/s, ",
                100 * mfu, hardware.name.c_str(), hardware.bf16_tflops);
  return "warning: " + std::string(figures) + hardware.source + ") is below what this run reaches" +
         (hardware.name == "cpu" ? std::string(" (the CPU probe was disturbed, e.g. by other processes)")
                                 : std::string("; does cost.gpu name the hardware the run is on?"));
}

Hardware lookup_hardware(const std::string& name) {
  for (const auto& h : gpu_table())
    if (h.name == name) return h;
  if (name == "cpu")
    return {"cpu", measure_cpu_tflops(), std::nullopt,
            "measured: best fp32 matmul rate over 256^3 to 1024^3 at " + std::to_string(at::get_num_threads()) +
                " threads"};
  std::string known;
  for (const auto& n : hardware_names()) known += (known.empty() ? "" : ", ") + n;
  throw UsageError("unknown GPU '" + name + "': known are " + known);
}

}  // namespace moetrain::cost
