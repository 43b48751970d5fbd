// Peak dense matmul throughput of the accelerators the cost report knows, from vendor datasheets, and
// a measured figure for `cpu`. MFU is achieved model FLOP/s over these peaks.
#pragma once
#include <optional>
#include <string>
#include <vector>

namespace moetrain::cost {

struct Hardware {
  std::string name;
  double bf16_tflops = 0;             // dense (no 2:4 sparsity), per GPU
  std::optional<double> fp8_tflops;   // dense; empty where the chip has no fp8 tensor cores
  std::string source;                 // where the figure comes from
  // Memory bandwidth in TB/s (1e12 bytes/s), what bounds decoding at small batch; 0 = unknown (for
  // `cpu`, measure_cpu_bandwidth measures it on demand).
  double hbm_tb_s = 0;
  std::string hbm_source;
};

// The names `lookup` accepts, in a fixed order.
std::vector<std::string> hardware_names();
// The figures for `name` (h100, h200, h800, a100, b200, cpu). `cpu` runs a short fp32 matmul probe and
// reports its best rate as both figures' stand-in (bf16_tflops; fp8 empty). Throws UsageError naming
// the known names for anything else.
Hardware lookup_hardware(const std::string& name);
// The best fp32 matmul rate of this machine's CPU in TFLOP/s at the current thread count: 256^3,
// 512^3 and 1024^3 products, each repeated for 0.12 s after a warm-up. Measured once per thread count
// and process (about 0.5 s), then cached.
double measure_cpu_tflops();
// The best rate at which this machine's CPU streams memory, in TB/s: a 64 MiB fp32 copy (read + write
// counted) repeated for 0.12 s after a warm-up, at the current thread count; measured once, then cached.
double measure_cpu_bandwidth();
// "" for an MFU in [0, 1]; above 1, a one-line warning naming cost.gpu and its peak (an MFU above 100%
// means the peak is wrong, never that the run beat the hardware).
std::string mfu_warning(double mfu, const Hardware& hardware);

}  // namespace moetrain::cost
