// The NCCL backend: direct NCCL calls, the unique id shared through the c10d store. Every collective
// returns once it is enqueued; the host never waits on one. Where it runs:
//   - the collectives whose inputs and outputs the caller's next kernels use (all_reduce_sum, broadcast,
//     reduce_scatter_sum, all_gather, all_to_all, send_recv) run on the caller's current stream, which
//     orders them after the work that made their inputs and before the work that reads their outputs,
//     with no event and no recordStream (the allocator sees one stream);
//   - the *_async ones (gradient buckets during backward, ZeRO's all-gathers) run on one high-priority
//     communication stream per process, after an event of the caller's stream, with recordStream for
//     the allocator; Pending::wait() makes the caller's stream wait on their completion event.
// Each collective's completion event goes to the process's watchdog (dist/watchdog.h), which enforces
// parallel.timeout_s and NCCL's asynchronous errors: it aborts every communicator of the process and
// exits with one line. Communicators are non-blocking (config.blocking = 0), so that initialisation and
// split have a deadline too; a call that answers ncclInProgress is polled until enqueued. After any
// error the destructors abort (ncclCommDestroy would wait for work that never finishes).
#include "dist/nccl.h"

#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "common/errors.h"
#include "common/host_sync.h"
#include "dist/unique_id.h"
#include "dist/watchdog.h"

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

// Set once anything failed in this process: destructors then abort instead of waiting.
std::atomic<bool> nccl_failed{false};

std::string nccl_error(ncclComm_t comm) {
  ncclResult_t async = ncclSuccess;
  if (ncclCommGetAsyncError(comm, &async) != ncclSuccess) return "NCCL error: ncclCommGetAsyncError failed";
  if (async == ncclSuccess || async == ncclInProgress) return "";
  return std::string("NCCL error: ") + ncclGetErrorString(async) + " (a peer may have died)";
}

// Polls a non-blocking communicator until its last call is done (enqueued, or initialised), an error,
// or the deadline: "" when done, else the cause.
std::string settle(ncclComm_t comm, int timeout_s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (true) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return std::string("NCCL error: ") + ncclGetErrorString(r);
    if (state == ncclSuccess) return "";
    if (state != ncclInProgress) return std::string("NCCL error: ") + ncclGetErrorString(state) + " (a peer may have died)";
    if (std::chrono::steady_clock::now() > deadline)
      return "not done after parallel.timeout_s = " + std::to_string(timeout_s) + " s (a peer died or is stuck)";
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

ncclConfig_t nonblocking_config() {
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  return config;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, std::string name, int rank, std::vector<int> world_ranks, int timeout_s)
      : comm_(comm), name_(std::move(name)), rank_(rank), world_ranks_(std::move(world_ranks)), timeout_s_(timeout_s),
        device_(c10::cuda::current_device()) {
    CollectiveName group{"", 0, name_, world_ranks_, world_rank_of(rank_)};
    watchdog_id_ = process_watchdog().add_communicator(
        std::move(group),
        [comm] {
          nccl_failed = true;
          ncclCommAbort(comm);
        },
        [comm] { return nccl_error(comm); });
  }
  ~NcclCommunicator() override {
    process_watchdog().remove_communicator(watchdog_id_);
    if (!comm_) return;
    if (!nccl_failed) {  // finalize (flushes this communicator's work, bounded), then destroy
      const ncclResult_t r = ncclCommFinalize(comm_);
      if ((r == ncclSuccess || r == ncclInProgress) && settle(comm_, timeout_s_).empty()) {
        ncclCommDestroy(comm_);
        return;
      }
    }
    ncclCommAbort(comm_);
  }

  int rank() const override { return rank_; }
  int world_size() const override { return int(world_ranks_.size()); }
  std::string backend() const override { return "nccl"; }
  std::string name() const override { return name_; }
  int world_rank_of(int r) const override { return world_ranks_.at(size_t(r)); }

  void all_reduce_sum(torch::Tensor& t) override {
    check_tensor("all_reduce", t);
    call("all_reduce", ncclAllReduce(t.data_ptr(), t.data_ptr(), size_t(t.numel()), nccl_type(t), ncclSum, comm_, stream()));
    enqueued("all_reduce", c10::cuda::getCurrentCUDAStream());
  }

  void broadcast(torch::Tensor& t, int root) override {
    check_tensor("broadcast", t);
    call("broadcast", ncclBroadcast(t.data_ptr(), t.data_ptr(), size_t(t.numel()), nccl_type(t), root, comm_, stream()));
    enqueued("broadcast", c10::cuda::getCurrentCUDAStream());
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
    enqueued("reduce_scatter", c10::cuda::getCurrentCUDAStream());
    return out;
  }

  torch::Tensor all_gather(const torch::Tensor& t) override {
    auto in = t.contiguous();
    check_tensor("all_gather", in);
    auto shape = in.sizes().vec();
    shape[0] *= world_size();
    auto out = torch::empty(shape, in.options());
    call("all_gather", ncclAllGather(in.data_ptr(), out.data_ptr(), size_t(in.numel()), nccl_type(in), comm_, stream()));
    enqueued("all_gather", c10::cuda::getCurrentCUDAStream());
    return out;
  }

  torch::Tensor all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send_rows,
                           const std::vector<int64_t>& recv_rows) override {
    return all_to_all_group({{in, send_rows, recv_rows}}).front();
  }

  // Every part's sends and receives in one NCCL group: one operation, one completion event.
  std::vector<torch::Tensor> all_to_all_group(const std::vector<AllToAllPart>& parts) override {
    std::vector<torch::Tensor> ins, outs;
    for (const auto& part : parts) {
      ins.push_back(checked_all_to_all_input(part));
      auto shape = ins.back().sizes().vec();
      shape[0] = 0;
      for (auto n : part.recv_rows) shape[0] += n;
      outs.push_back(torch::empty(shape, ins.back().options()));
    }
    call("all_to_all", ncclGroupStart());
    for (size_t i = 0; i < parts.size(); ++i) post_all_to_all(ins[i], parts[i].send_rows, parts[i].recv_rows, outs[i]);
    call("all_to_all", ncclGroupEnd());
    enqueued("all_to_all", c10::cuda::getCurrentCUDAStream());
    return outs;
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
    enqueued("send/recv", c10::cuda::getCurrentCUDAStream());
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

  // `in` may be this rank's share of `out` itself (NCCL's in-place all-gather: its address is
  // out + rank * in's elements).
  std::unique_ptr<Pending> all_gather_async(const torch::Tensor& in, torch::Tensor& out) override {
    check_tensor("all_gather", in);
    check_tensor("all_gather", out);
    if (out.numel() != in.numel() * world_size() || out.scalar_type() != in.scalar_type())
      throw DistError("all_gather on " + name_ + ": the output needs " + std::to_string(world_size()) +
                      " x the input's elements and its dtype, got " + std::to_string(in.numel()) + " and " +
                      std::to_string(out.numel()));
    auto side = begin_async({in, out});
    call("all_gather", ncclAllGather(in.data_ptr(), out.data_ptr(), size_t(in.numel()), nccl_type(in), comm_,
                                     side.stream()));
    return end_async("all_gather", side);
  }

  // The one collective whose point is the host's wait: every rank has reached it.
  void barrier() override {
    auto t = torch::ones({1}, torch::TensorOptions().device(torch::kCUDA, c10::cuda::current_device()));
    all_reduce_sum(t);
    host_read(t, "dist.barrier");
  }

  std::unique_ptr<Communicator> split(int color, const std::string& label) override {
    auto members = members_with_color(*this, color);
    ncclComm_t sub = nullptr;
    auto config = nonblocking_config();
    call("split", ncclCommSplit(comm_, color, rank_, &sub, &config));
    if (sub) {
      const std::string cause = settle(sub, timeout_s_);
      if (!cause.empty()) {
        nccl_failed = true;
        ncclCommAbort(sub);
        throw DistError(describe_collective_failure(name_of("split"), cause));
      }
    }
    return std::make_unique<NcclCommunicator>(sub, label, members.rank, members.world_ranks, timeout_s_);
  }

 private:
  // An all_to_all part's input, contiguous, after the checks NCCL itself does not make: it trusts the
  // counts, and a wrong sum would read past the input or leave peers waiting forever.
  torch::Tensor checked_all_to_all_input(const AllToAllPart& part) const {
    auto in = part.in.contiguous();
    check_tensor("all_to_all", in);
    const int W = world_size();
    if (int(part.send_rows.size()) != W || int(part.recv_rows.size()) != W)
      throw DistError("all_to_all on " + name_ + ": splits need " + std::to_string(W) + " entries, got " +
                      std::to_string(part.send_rows.size()) + " and " + std::to_string(part.recv_rows.size()));
    int64_t total_send = 0;
    for (int r = 0; r < W; ++r) {
      if (part.send_rows[r] < 0 || part.recv_rows[r] < 0)
        throw DistError("all_to_all on " + name_ + ": negative split for rank " + std::to_string(r));
      total_send += part.send_rows[r];
    }
    if (in.dim() < 1 || total_send != in.size(0))
      throw DistError("all_to_all on " + name_ + ": send splits sum to " + std::to_string(total_send) +
                      " rows, the input has " + (in.dim() < 1 ? std::string("no rows (a scalar)") : std::to_string(in.size(0))));
    return in;
  }

  // The sends and receives of one all_to_all, inside the caller's NCCL group.
  void post_all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send_rows,
                       const std::vector<int64_t>& recv_rows, torch::Tensor& out) {
    int64_t per_row = 1;  // elements per row of dim 0
    for (int64_t d = 1; d < in.dim(); ++d) per_row *= in.size(d);
    const auto type = nccl_type(in);
    const size_t item = in.element_size();
    auto* src = static_cast<char*>(in.data_ptr());
    auto* dst = static_cast<char*>(out.data_ptr());
    int64_t send_off = 0, recv_off = 0;
    for (int r = 0; r < world_size(); ++r) {
      if (send_rows[r] > 0 && r != rank_) all_to_all_bytes_sent_ += send_rows[r] * per_row * int64_t(item);
      if (send_rows[r] > 0)
        call("all_to_all", ncclSend(src + send_off * per_row * item, size_t(send_rows[r] * per_row), type, r, comm_, stream()));
      if (recv_rows[r] > 0)
        call("all_to_all", ncclRecv(dst + recv_off * per_row * item, size_t(recv_rows[r] * per_row), type, r, comm_, stream()));
      send_off += send_rows[r];
      recv_off += recv_rows[r];
    }
  }

  static cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

  CollectiveName name_of(const char* op) const { return CollectiveName{op, round_, name_, world_ranks_, world_rank_of(rank_)}; }

  void check_tensor(const char* op, const torch::Tensor& t) const {
    if (!t.is_cuda() || !t.is_contiguous())
      throw DistError(std::string(op) + " on " + name_ + ": nccl needs a contiguous CUDA tensor, got " +
                      (t.is_cuda() ? "a strided" : "a CPU") + " one");
    if (t.device().index() != c10::cuda::current_device())
      throw DistError(std::string(op) + " on " + name_ + ": the tensor is on " + t.device().str() +
                      " but this rank's communicator runs on cuda:" + std::to_string(c10::cuda::current_device()));
  }

  // A NCCL call's result; ncclInProgress (a non-blocking communicator still enqueueing) is polled
  // until the call is done, so that the next call may follow. That is a wait for the enqueue only.
  void call(const char* op, ncclResult_t result) {
    std::string cause;
    if (result == ncclInProgress)
      cause = settle(comm_, timeout_s_);
    else if (result != ncclSuccess)
      cause = std::string("NCCL error: ") + ncclGetErrorString(result);
    if (cause.empty()) return;
    nccl_failed = true;
    throw DistError(describe_collective_failure(name_of(op), cause));
  }

  // A collective enqueued on `on`: its completion event goes to the watchdog, and the round advances.
  std::shared_ptr<at::cuda::CUDAEvent> enqueued(const char* op, const c10::cuda::CUDAStream& on) {
    auto done = std::make_shared<at::cuda::CUDAEvent>();
    done->record(on);
    const int device = device_;
    process_watchdog().watch(watchdog_id_, name_of(op), std::chrono::seconds(timeout_s_), [done, device] {
      cudaSetDevice(device);  // the watchdog's thread: never touch (and create a context on) device 0
      const cudaError_t state = cudaEventQuery(done->event());
      if (state == cudaSuccess) return Probe{Probe::kDone, ""};
      if (state == cudaErrorNotReady) return Probe{};
      return Probe{Probe::kFailed, std::string("CUDA error: ") + cudaGetErrorString(state)};
    });
    ++round_;
    return done;
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

  // wait() orders the caller's stream after the collective; the host goes on at once.
  class NcclPending final : public Pending {
   public:
    explicit NcclPending(std::shared_ptr<at::cuda::CUDAEvent> done) : done_(std::move(done)) {}
    void wait() override { done_->block(c10::cuda::getCurrentCUDAStream()); }

   private:
    std::shared_ptr<at::cuda::CUDAEvent> done_;
  };

  std::unique_ptr<Pending> end_async(const char* op, c10::cuda::CUDAStream side) {
    return std::make_unique<NcclPending>(enqueued(op, side));
  }

  ncclComm_t comm_;
  std::string name_;
  int rank_;
  std::vector<int> world_ranks_;
  int timeout_s_;
  int device_;
  int64_t round_ = 0;  // collectives enqueued on this communicator, for messages
  int64_t watchdog_id_ = -1;
};

}  // namespace

torch::Device claim_device(const std::string& run_device, const std::string& backend) {
  const int visible = run_device == "cuda" && torch::cuda::is_available() ? int(c10::cuda::device_count()) : 0;
  const torch::Device device =
      select_device(run_device, read_launch_env(), visible, std::getenv("CUDA_VISIBLE_DEVICES"), backend);
  if (device.is_cuda()) c10::cuda::set_device(device.index());
  return device;
}

std::unique_ptr<Communicator> make_nccl(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
                                        torch::Device device, int timeout_s) {
  if (!device.is_cuda()) throw DistError("parallel.backend = nccl but this process's device is " + device.str());
  c10::cuda::set_device(device.index());
  ncclUniqueId id;
  try {
    auto bytes = share_unique_id(*store, rank, [] {
      ncclUniqueId made;
      if (ncclGetUniqueId(&made) != ncclSuccess) throw DistError("nccl: ncclGetUniqueId failed");
      return std::vector<uint8_t>(reinterpret_cast<uint8_t*>(&made), reinterpret_cast<uint8_t*>(&made) + sizeof made);
    });
    if (bytes.size() != sizeof id) throw DistError("nccl: the store's unique id has the wrong size");
    std::memcpy(&id, bytes.data(), sizeof id);
  } catch (const c10::Error& e) {
    std::string cause = e.what_without_backtrace();
    throw DistError("nccl: sharing the unique id failed at rank " + std::to_string(rank) + ": " +
                    cause.substr(0, cause.find('\n')));
  }
  // Non-blocking, so that a peer that never joins costs parallel.timeout_s, not forever.
  ncclComm_t comm = nullptr;
  auto config = nonblocking_config();
  const ncclResult_t r = ncclCommInitRankConfig(&comm, world_size, id, rank, &config);
  std::string cause = r == ncclSuccess || r == ncclInProgress ? std::string() : ncclGetErrorString(r);
  if (cause.empty() && comm) cause = settle(comm, timeout_s);
  if (!cause.empty()) {
    if (comm) ncclCommAbort(comm);
    throw DistError("nccl: ncclCommInitRank of rank " + std::to_string(rank) + " of world size " +
                    std::to_string(world_size) + " failed: " + cause);
  }
  std::vector<int> ranks(static_cast<size_t>(world_size));
  for (int i = 0; i < world_size; ++i) ranks[size_t(i)] = i;
  return std::make_unique<NcclCommunicator>(comm, "world", rank, ranks, timeout_s);
}

}  // namespace moetrain::dist
