// The host-sync counter and the operator counter (see host_sync.h).
#include "common/host_sync.h"

#include <ATen/record_function.h>
#include <c10/cuda/CUDAStream.h>

#include <atomic>
#include <mutex>

namespace moetrain {

namespace {

std::mutex& counts_mutex() {
  static std::mutex m;
  return m;
}
HostSyncCounts& counts() {
  static HostSyncCounts c;
  return c;
}

std::atomic<int64_t> op_calls{0};

}  // namespace

void count_host_sync(const std::string& reason) {
  std::lock_guard<std::mutex> lock(counts_mutex());
  auto& c = counts();
  ++c.total;
  ++c.by_reason[reason];
}

HostSyncCounts host_sync_counts() {
  std::lock_guard<std::mutex> lock(counts_mutex());
  return counts();
}

void reset_host_sync_counts() {
  std::lock_guard<std::mutex> lock(counts_mutex());
  counts() = HostSyncCounts{};
}

torch::Tensor host_read(const torch::Tensor& t, const char* reason) {
  count_host_sync(reason);
  if (!t.is_cuda()) return t;
  auto host = torch::empty(t.sizes(), t.options().device(torch::kCPU).pinned_memory(true));
  host.copy_(t, /*non_blocking=*/true);
  c10::cuda::getCurrentCUDAStream(t.device().index()).synchronize();
  return host;
}

double host_double(const torch::Tensor& t, const char* reason) {
  return host_read(t, reason).to(torch::kDouble).item<double>();
}

int64_t host_int(const torch::Tensor& t, const char* reason) { return host_read(t, reason).item<int64_t>(); }

OpCounter::OpCounter() {
  op_calls = 0;
  handle_ = at::addGlobalCallback(at::RecordFunctionCallback(
                                      [](const at::RecordFunction&) -> std::unique_ptr<at::ObserverContext> {
                                        op_calls.fetch_add(1, std::memory_order_relaxed);
                                        return nullptr;
                                      })
                                      .scopes({at::RecordScope::FUNCTION})
                                      .needsInputs(false)
                                      .needsOutputs(false)
                                      .needsIds(false));
}

OpCounter::~OpCounter() { at::removeCallback(handle_); }

int64_t OpCounter::count() const { return op_calls.load(); }

void OpCounter::reset() { op_calls = 0; }

}  // namespace moetrain
