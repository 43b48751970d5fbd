// The places where the host waits for the device, counted. A GPU is fast only while the host stays
// ahead of it, so every point where the host blocks on device work or on a collective goes through
// host_read() or count_host_sync(), which count it by reason. The count follows the code path, not the
// hardware: a CPU run counts the same points a GPU run would block at, so `bench-step --json` and the
// host-sync budget test measure on the CPU what a GPU step does. Also here: a count of ATen operator
// calls (the CPU's stand-in for kernel launches).
#pragma once
#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>

namespace moetrain {

// Counts one host wait under `reason` (a string literal: "moe.splits", "step.health", ...).
void count_host_sync(const std::string& reason);

// The host's copy of `t`, counted as one host sync under `reason`. From a CUDA tensor: one
// non-blocking copy into pinned memory, then one wait for the copying stream. A CPU tensor is
// returned as it is (the count is still taken: a GPU run would wait here).
torch::Tensor host_read(const torch::Tensor& t, const char* reason);
// host_read of a one-element tensor, as a double or an int64.
double host_double(const torch::Tensor& t, const char* reason);
int64_t host_int(const torch::Tensor& t, const char* reason);

// What has been counted since the last reset, over every thread of the process.
struct HostSyncCounts {
  int64_t total = 0;
  std::map<std::string, int64_t> by_reason;
};
HostSyncCounts host_sync_counts();
void reset_host_sync_counts();

// Counts the ATen operator calls made while it lives, on every thread (a RecordFunction callback).
class OpCounter {
 public:
  OpCounter();
  ~OpCounter();
  OpCounter(const OpCounter&) = delete;
  OpCounter& operator=(const OpCounter&) = delete;
  int64_t count() const;
  void reset();

 private:
  uint64_t handle_ = 0;
};

}  // namespace moetrain
