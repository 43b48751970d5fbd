// Datasheet peaks (dense, i.e. half the "with sparsity" figures NVIDIA prints) and the CPU probe.
#include "cost/hardware.h"

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <limits>

#include "common/errors.h"

namespace moetrain::cost {

namespace {

const std::vector<Hardware>& gpu_table() {
  static const std::vector<Hardware> table = {
      // NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (https://www.nvidia.com/en-us/data-center/h100/):
      // BF16 1,979 and FP8 3,958 TFLOPS "with sparsity"; dense is half.
      {"h100", 989.4, 1978.9, "NVIDIA H100 datasheet (SXM), dense = half the sparsity figure"},
      // NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (https://www.nvidia.com/en-us/data-center/h200/):
      // same GH100 compute as H100 SXM (BF16 1,979 / FP8 3,958 with sparsity).
      {"h200", 989.4, 1978.9, "NVIDIA H200 datasheet (SXM), dense = half the sparsity figure"},
      // NVIDIA H800 SXM5, the export variant of H100 SXM: its NVLink was cut, not its tensor cores. No
      // public H800 datasheet was found to cite; the H100 SXM figure is assumed, and DeepSeek's own
      // numbers imply it (250 GFLOPs/token * 1,542 tokens/s / 38.94% MFU = 990 TFLOP/s).
      {"h800", 989.4, 1978.9, "assumed equal to H100 SXM (no public H800 datasheet), dense"},
      // NVIDIA A100 Tensor Core GPU datasheet (https://www.nvidia.com/en-us/data-center/a100/): BF16 312
      // TFLOPS dense (624 with sparsity); no fp8 tensor cores.
      {"a100", 312.0, std::nullopt, "NVIDIA A100 datasheet (SXM), dense; no fp8"},
      // NVIDIA HGX B200 specifications (https://www.nvidia.com/en-us/data-center/hgx/), per GPU at 1,000 W:
      // FP16/BF16 4.5 PFLOPS and FP8 9 PFLOPS with sparsity; dense is half.
      {"b200", 2250.0, 4500.0, "NVIDIA HGX B200 specifications, per GPU, dense = half the sparsity figure"},
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

double measure_cpu_tflops(int n, int reps) {
  torch::NoGradGuard no_grad;
  auto a = torch::randn({n, n}, torch::kFloat), b = torch::randn({n, n}, torch::kFloat);
  (void)torch::mm(a, b);  // warm-up: thread pool and allocator
  double best_s = std::numeric_limits<double>::infinity();
  for (int i = 0; i < reps; ++i) {
    auto start = std::chrono::steady_clock::now();
    auto c = torch::mm(a, b);
    (void)c.data_ptr<float>();
    best_s = std::min(best_s, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return 2.0 * double(n) * n * n / best_s / 1e12;
}

Hardware lookup_hardware(const std::string& name) {
  for (const auto& h : gpu_table())
    if (h.name == name) return h;
  if (name == "cpu") return {"cpu", measure_cpu_tflops(), std::nullopt, "measured: best of 3 fp32 1024^3 matmuls"};
  std::string known;
  for (const auto& n : hardware_names()) known += (known.empty() ? "" : ", ") + n;
  throw UsageError("unknown GPU '" + name + "': known are " + known);
}

}  // namespace moetrain::cost
