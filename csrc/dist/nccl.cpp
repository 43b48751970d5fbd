// The NCCL backend: direct NCCL calls on the current CUDA stream, the unique id shared through the
// c10d store. Each collective is awaited with a deadline (parallel.timeout_s) by polling the stream and
// NCCL's asynchronous error; a timeout or a NCCL error aborts the communicator and throws, so a dead
// peer ends every rank instead of hanging it. The asynchronous collectives (gradient buckets reduced
// during backward) run on one communication stream per process, so that they keep the order in which
// they were launched whatever group they belong to, and overlap the compute stream's work.
#include "dist/nccl.h"

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "common/errors.h"
#include "common/host_sync.h"

namespace moetrain::dist {

namespace {

ncclDataType_t nccl_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return ncclFloat32;
    case torch::kBFloat16: return ncclBfloat16;
    case torch::kHalf: return ncclFloat16;
    case torch::kDouble: return ncclFloat64;
    case torch::kLong: return ncclInt64;
    case torch::kInt: return ncclInt32;
    case torch::kByte:
    case torch::kBool: return ncclUint8;
    default: throw DistError(std::string("nccl: unsupported dtype ") + c10::toString(t.scalar_type()));
  }
}

// The stream this process's asynchronous collectives run on (high priority, so that a bucket's
// reduction is not starved by the backward kernels queued after it).
c10::cuda::CUDAStream communication_stream() {
  static const c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(/*isHighPriority=*/true);
  return stream;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, std::string name, int rank, std::vector<int> world_ranks, int timeout_s)
      : comm_(comm), name_(std::move(name)), rank_(rank), world_ranks_(std::move(world_ranks)), timeout_s_(timeout_s) {}
  ~NcclCommunicator() override {
    if (comm_) ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return int(world_ranks_.size()); }
  std::string backend() const override { return "nccl"; }
  std::string name() const override { return name_; }
  int world_rank_of(int r) const override { return world_ranks_.at(size_t(r)); }

  void all_reduce_sum(torch::Tensor& t) override {
    check_tensor("all_reduce", t);
    call("all_reduce", ncclAllReduce(t.data_ptr(), t.data_ptr(), size_t(t.numel()), nccl_type(t), ncclSum, comm_, stream()));
    wait("all_reduce");
  }

  void broadcast(torch::Tensor& t, int root) override {
    check_tensor("broadcast", t);
    call("broadcast", ncclBroadcast(t.data_ptr(), t.data_ptr(), size_t(t.numel()), nccl_type(t), root, comm_, stream()));
    wait("broadcast");
  }

  torch::Tensor reduce_scatter_sum(const torch::Tensor& in_) override {
    auto in = in_.contiguous();
    check_tensor("reduce_scatter", in);
    if (in.dim() != 1 || in.numel() % world_size() != 0)
      throw DistError("reduce_scatter on " + name_ + ": needs a 1-D tensor whose length is a multiple of " +
                      std::to_string(world_size()) + ", got " + std::to_string(in.numel()) + " elements");
    auto out = torch::empty({in.numel() / world_size()}, in.options());
    call("reduce_scatter", ncclReduceScatter(in.data_ptr(), out.data_ptr(), size_t(out.numel()), nccl_type(in), ncclSum,
                                             comm_, stream()));
    wait("reduce_scatter");
    return out;
  }

  torch::Tensor all_gather(const torch::Tensor& t) override {
    auto in = t.contiguous();
    check_tensor("all_gather", in);
    auto shape = in.sizes().vec();
    shape[0] *= world_size();
    auto out = torch::empty(shape, in.options());
    call("all_gather", ncclAllGather(in.data_ptr(), out.data_ptr(), size_t(in.numel()), nccl_type(in), comm_, stream()));
    wait("all_gather");
    return out;
  }

  torch::Tensor all_to_all(const torch::Tensor& in_, const std::vector<int64_t>& send_rows,
                           const std::vector<int64_t>& recv_rows) override {
    auto in = in_.contiguous();
    check_tensor("all_to_all", in);
    const int W = world_size();
    if (int(send_rows.size()) != W || int(recv_rows.size()) != W)
      throw DistError("all_to_all on " + name_ + ": splits need " + std::to_string(W) + " entries, got " +
                      std::to_string(send_rows.size()) + " and " + std::to_string(recv_rows.size()));
    int64_t total_send = 0;
    for (int r = 0; r < W; ++r) {
      if (send_rows[r] < 0 || recv_rows[r] < 0)
        throw DistError("all_to_all on " + name_ + ": negative split for rank " + std::to_string(r));
      total_send += send_rows[r];
    }
    // NCCL trusts the counts: a wrong sum would read past the input or leave peers waiting forever.
    if (in.dim() < 1 || total_send != in.size(0))
      throw DistError("all_to_all on " + name_ + ": send splits sum to " + std::to_string(total_send) +
                      " rows, the input has " + (in.dim() < 1 ? std::string("no rows (a scalar)") : std::to_string(in.size(0))));
    int64_t per_row = 1;  // elements per row of dim 0
    for (int64_t d = 1; d < in.dim(); ++d) per_row *= in.size(d);
    int64_t total_recv = 0;
    for (auto n : recv_rows) total_recv += n;
    auto shape = in.sizes().vec();
    shape[0] = total_recv;
    auto out = torch::empty(shape, in.options());
    const auto type = nccl_type(in);
    const size_t item = in.element_size();
    auto* src = static_cast<char*>(in.data_ptr());
    auto* dst = static_cast<char*>(out.data_ptr());
    call("all_to_all", ncclGroupStart());
    int64_t send_off = 0, recv_off = 0;
    for (int r = 0; r < W; ++r) {
      if (send_rows[r] > 0 && r != rank_) all_to_all_bytes_sent_ += send_rows[r] * per_row * int64_t(item);
      if (send_rows[r] > 0)
        call("all_to_all", ncclSend(src + send_off * per_row * item, size_t(send_rows[r] * per_row), type, r, comm_, stream()));
      if (recv_rows[r] > 0)
        call("all_to_all", ncclRecv(dst + recv_off * per_row * item, size_t(recv_rows[r] * per_row), type, r, comm_, stream()));
      send_off += send_rows[r];
      recv_off += recv_rows[r];
    }
    call("all_to_all", ncclGroupEnd());
    wait("all_to_all");
    return out;
  }

  void send_recv(const torch::Tensor& send_, int dst, torch::Tensor& recv, int src) override {
    torch::Tensor send;
    if (dst >= 0) {
      send = send_.contiguous();
      check_tensor("send", send);
      if (dst >= world_size() || dst == rank_) throw DistError("send on " + name_ + ": no peer " + std::to_string(dst));
    }
    if (src >= 0) {
      check_tensor("recv", recv);
      if (src >= world_size() || src == rank_) throw DistError("recv on " + name_ + ": no peer " + std::to_string(src));
    }
    call("send/recv", ncclGroupStart());
    if (dst >= 0) {
      call("send", ncclSend(send.data_ptr(), size_t(send.numel()), nccl_type(send), dst, comm_, stream()));
      p2p_bytes_sent_ += int64_t(send.nbytes());
    }
    if (src >= 0) call("recv", ncclRecv(recv.data_ptr(), size_t(recv.numel()), nccl_type(recv), src, comm_, stream()));
    call("send/recv", ncclGroupEnd());
    wait("send/recv");
  }

  std::unique_ptr<Pending> all_reduce_sum_async(torch::Tensor& t) override {
    check_tensor("all_reduce", t);
    auto side = begin_async({t});
    call("all_reduce", ncclAllReduce(t.data_ptr(), t.data_ptr(), size_t(t.numel()), nccl_type(t), ncclSum, comm_,
                                     side.stream()));
    return end_async("all_reduce", side);
  }

  std::unique_ptr<Pending> reduce_scatter_sum_async(const torch::Tensor& in_, torch::Tensor& out) override {
    auto in = in_.contiguous();
    check_tensor("reduce_scatter", in);
    check_tensor("reduce_scatter", out);
    if (in.dim() != 1 || out.numel() * world_size() != in.numel() || out.scalar_type() != in.scalar_type())
      throw DistError("reduce_scatter on " + name_ + ": needs a 1-D input of " + std::to_string(world_size()) +
                      " x the output's elements and the same dtype, got " + std::to_string(in.numel()) + " and " +
                      std::to_string(out.numel()));
    auto side = begin_async({in, out});
    call("reduce_scatter", ncclReduceScatter(in.data_ptr(), out.data_ptr(), size_t(out.numel()), nccl_type(in), ncclSum,
                                             comm_, side.stream()));
    return end_async("reduce_scatter", side);
  }

  void barrier() override {
    auto t = torch::ones({1}, torch::TensorOptions().device(torch::kCUDA, c10::cuda::current_device()));
    all_reduce_sum(t);
  }

  std::unique_ptr<Communicator> split(int color, const std::string& label) override {
    auto members = members_with_color(*this, color);
    ncclComm_t sub = nullptr;
    call("split", ncclCommSplit(comm_, color, rank_, &sub, nullptr));
    return std::make_unique<NcclCommunicator>(sub, label, members.rank, members.world_ranks, timeout_s_);
  }

 private:
  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

  void check_tensor(const char* op, const torch::Tensor& t) const {
    if (!t.is_cuda() || !t.is_contiguous())
      throw DistError(std::string(op) + " on " + name_ + ": nccl needs a contiguous CUDA tensor, got " +
                      (t.is_cuda() ? "a strided" : "a CPU") + " one");
    if (t.device().index() != c10::cuda::current_device())
      throw DistError(std::string(op) + " on " + name_ + ": the tensor is on " + t.device().str() +
                      " but this rank's communicator runs on cuda:" + std::to_string(c10::cuda::current_device()));
  }

  void call(const char* op, ncclResult_t result) {
    if (result != ncclSuccess && result != ncclInProgress)
      throw DistError(std::string(op) + " on " + name_ + " (rank " + std::to_string(world_rank_of(rank_)) +
                      "): " + ncclGetErrorString(result));
  }

  // An asynchronous collective: the communication stream first waits for what the caller's stream has
  // queued (the tensors' contents), and the allocator learns that the stream uses the tensors, so that
  // their memory is not handed out again before the collective is done with it.
  c10::cuda::CUDAStream begin_async(const std::vector<torch::Tensor>& tensors) {
    auto side = communication_stream();
    at::cuda::CUDAEvent ready;
    ready.record(c10::cuda::getCurrentCUDAStream());
    ready.block(side);
    for (const auto& t : tensors) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), side);
    return side;
  }

  class NcclPending final : public Pending {
   public:
    NcclPending(NcclCommunicator* owner, const char* op, std::shared_ptr<at::cuda::CUDAEvent> done)
        : owner_(owner), op_(op), done_(std::move(done)) {}
    // The host waits (with the deadline and NCCL's error checks) and the caller's stream orders after it.
    void wait() override {
      owner_->await(op_, [this] { return cudaEventQuery(done_->event()); });
      done_->block(c10::cuda::getCurrentCUDAStream());
    }

   private:
    NcclCommunicator* owner_;
    const char* op_;
    std::shared_ptr<at::cuda::CUDAEvent> done_;
  };

  std::unique_ptr<Pending> end_async(const char* op, c10::cuda::CUDAStream side) {
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(side);
    return std::make_unique<NcclPending>(this, op, std::move(done));
  }

  // Polls until the current stream's work is done, NCCL reports an error, or the deadline passes.
  void wait(const char* op) {
    auto s = stream();
    await(op, [s] { return cudaStreamQuery(s); });
  }

  void await(const char* op, const std::function<cudaError_t()>& query) {
    count_host_sync(std::string("collective.") + op);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s_);
    while (true) {
      const cudaError_t done = query();
      if (done == cudaSuccess) return;
      if (done != cudaErrorNotReady)
        throw DistError(std::string(op) + " on " + name_ + ": CUDA error " + cudaGetErrorString(done));
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        throw DistError(std::string(op) + " on " + name_ + " (rank " + std::to_string(world_rank_of(rank_)) +
                        "): NCCL error " + ncclGetErrorString(async) + " (a peer may have died)");
      }
      if (std::chrono::steady_clock::now() > deadline) {
        ncclCommAbort(comm_);
        comm_ = nullptr;
        throw DistError(std::string(op) + " on " + name_ + " (rank " + std::to_string(world_rank_of(rank_)) +
                        "): not finished after parallel.timeout_s = " + std::to_string(timeout_s_) +
                        " s (a peer died or is stuck)");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  ncclComm_t comm_;
  std::string name_;
  int rank_;
  std::vector<int> world_ranks_;
  int timeout_s_;
};

}  // namespace

torch::Device claim_device(const std::string& run_device) {
  const int visible = run_device == "cuda" && torch::cuda::is_available() ? int(c10::cuda::device_count()) : 0;
  const torch::Device device = select_device(run_device, read_launch_env(), visible, std::getenv("CUDA_VISIBLE_DEVICES"));
  if (device.is_cuda()) c10::cuda::set_device(device.index());
  return device;
}

std::unique_ptr<Communicator> make_nccl(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
                                        torch::Device device, int timeout_s) {
  if (!device.is_cuda()) throw DistError("parallel.backend = nccl but this process's device is " + device.str());
  c10::cuda::set_device(device.index());
  ncclUniqueId id;
  const std::string key = "nccl/unique_id";
  try {
    if (rank == 0) {
      if (ncclGetUniqueId(&id) != ncclSuccess) throw DistError("nccl: ncclGetUniqueId failed");
      store->set(key, std::vector<uint8_t>(reinterpret_cast<uint8_t*>(&id), reinterpret_cast<uint8_t*>(&id) + sizeof id));
    } else {
      auto bytes = store->get(key);
      if (bytes.size() != sizeof id) throw DistError("nccl: the store's unique id has the wrong size");
      std::memcpy(&id, bytes.data(), sizeof id);
    }
  } catch (const c10::Error& e) {
    std::string cause = e.what_without_backtrace();
    throw DistError("nccl: sharing the unique id failed at rank " + std::to_string(rank) + ": " +
                    cause.substr(0, cause.find('\n')));
  }
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, world_size, id, rank);
  if (r != ncclSuccess)
    throw DistError("nccl: ncclCommInitRank of rank " + std::to_string(rank) + "/" + std::to_string(world_size) +
                    " failed: " + ncclGetErrorString(r));
  std::vector<int> ranks(static_cast<size_t>(world_size));
  for (int i = 0; i < world_size; ++i) ranks[size_t(i)] = i;
  return std::make_unique<NcclCommunicator>(comm, "world", rank, ranks, timeout_s);
}

}  // namespace moetrain::dist
