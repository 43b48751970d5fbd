// The communicator interface every multi-rank operation goes through, and the rendezvous that builds
// one from the launcher's environment. Nothing outside csrc/dist includes c10d or NCCL headers.
//
// Backends:
//   single  one process; every collective is the identity.
//   store   collectives move bytes through LibTorch's c10d TCPStore. It stands in for c10d's Gloo
//           backend, whose headers the torch wheel does not ship (README: "Backends"). CUDA tensors are
//           staged through host memory and their results land on their device, so several ranks may
//           share one GPU (the multi-rank CUDA tests on a one-GPU machine).
//   nccl    CUDA tensors; collectives return once enqueued, a watchdog thread bounds them (nccl.cpp);
//           the NCCL unique id travels through the store.
// Both hold the same contract: a collective that does not finish within parallel.timeout_s ends the
// process non-zero with one line naming the operation, its round, the group and its ranks.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"

namespace moetrain::dist {

// Where this process sits in the job, read from the launcher's environment.
struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  int local_world_size = 0;  // ranks on this node (LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE,
                             // OMPI_COMM_WORLD_LOCAL_SIZE); 0 = the launcher does not say
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "none";  // "torchrun", "slurm", "openmpi" or "none" (a single process)
};

// Reads torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), Slurm (SLURM_PROCID,
// SLURM_NTASKS, SLURM_LOCALID; the master from MASTER_ADDR or the first host of SLURM_JOB_NODELIST)
// and Open MPI (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK) variables, in that order of precedence. No
// variables at all is a single process; partial or inconsistent ones are a DistError naming them.
// `getenv` is injectable for tests.
LaunchEnv read_launch_env(const std::function<const char*(const char*)>& getenv = nullptr);

// The device this process computes on, a pure function of run.device, the launch environment and
// what CUDA shows it: cpu, or cuda:<local rank> among the `visible_devices` GPUs (which honour
// CUDA_VISIBLE_DEVICES, given as `cuda_visible_devices`, may be null). A scheduler that binds one GPU
// to each process (CUDA_VISIBLE_DEVICES naming a single device) gives cuda:0 to every local rank.
// No GPU at all is a DistError. More local ranks than visible GPUs is a DistError naming the counts for
// `backend` nccl (NCCL refuses two ranks on one device); the store backend shares them round robin
// (local rank r on cuda:(r mod visible)).
torch::Device select_device(const std::string& run_device, const LaunchEnv& env, int visible_devices,
                            const char* cuda_visible_devices, const std::string& backend = "nccl");
// select_device for this process (its environment, CUDA's device count), made CUDA's current device:
// called once, before any CUDA allocation; the model, the data, NCCL and every synchronisation use it.
// The trainer claims its device before the backend is known (as the store backend would: GPUs may be
// shared); make_communicator claims it again for nccl, which refuses a shared GPU.
torch::Device claim_device(const std::string& run_device, const std::string& backend = "store");

// A collective in flight, from one of Communicator's *_async calls. wait() returns once the result may
// be read by whatever the caller queues next: the store backend has run the collective at launch; NCCL
// runs it on the process's communication stream and wait() makes the caller's stream wait on its event,
// without blocking the host (parallel.timeout_s and NCCL's errors are the watchdog's).
class Pending {
 public:
  virtual ~Pending() = default;
  virtual void wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string backend() const = 0;
  // The group's name in messages: "world", "ep[0,1]", ...
  virtual std::string name() const = 0;
  // Global (world) rank of this group's rank r, for messages.
  virtual int world_rank_of(int r) const = 0;

  virtual void all_reduce_sum(torch::Tensor& t) = 0;  // in place, every rank gets the sum
  virtual void broadcast(torch::Tensor& t, int root) = 0;  // in place, from the group's rank `root`
  // This rank's share of the element-wise sum of every rank's `in` (1-D, its length a multiple of the
  // group size n): elements [rank * len / n, (rank + 1) * len / n). The store backend sums in rank
  // order, as all_reduce_sum does, so the share equals that slice of an all_reduce_sum bit for bit.
  virtual torch::Tensor reduce_scatter_sum(const torch::Tensor& in) = 0;
  // Concatenation of every rank's `t` along dim 0 (all ranks give the same shape).
  virtual torch::Tensor all_gather(const torch::Tensor& t) = 0;
  // Rows [sum(send_rows[:r]), +send_rows[r]) of `in` go to rank r; the result holds recv_rows[r] rows
  // from each rank r, in rank order. Splits are in rows of dim 0 and may be zero.
  virtual torch::Tensor all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send_rows,
                                   const std::vector<int64_t>& recv_rows) = 0;
  // Several all_to_alls as one operation (NCCL: one group of sends and receives, one completion to
  // wait for), each part with its own tensor, dtype and splits; the results in the parts' order. The
  // base class runs them one after another (the CPU backends).
  struct AllToAllPart {
    torch::Tensor in;
    std::vector<int64_t> send_rows, recv_rows;
  };
  virtual std::vector<torch::Tensor> all_to_all_group(const std::vector<AllToAllPart>& parts);
  // The same collectives launched without waiting for them (gradient reduction during backward). The
  // tensors must not be touched until wait(): `t` is reduced in place; `out` (this rank's share, sized
  // by the caller) is written. Every rank launches the same collectives in the same order, as for the
  // blocking ones. The base class runs them at once (the CPU backends).
  virtual std::unique_ptr<Pending> all_reduce_sum_async(torch::Tensor& t);
  virtual std::unique_ptr<Pending> reduce_scatter_sum_async(const torch::Tensor& in, torch::Tensor& out);
  // Every rank's `in` end to end into `out` (flat, world_size x in's elements, in rank order). `in` may
  // be the view of `out` at this rank's share (the in-place form NCCL supports: ZeRO-1's parameter
  // buffers); `out` must not be touched until wait().
  virtual std::unique_ptr<Pending> all_gather_async(const torch::Tensor& in, torch::Tensor& out);
  virtual void barrier() = 0;
  // Point to point (the pipeline's activations and their gradients): sends `send` to rank `dst` and
  // receives into `recv` (whose shape and dtype the receiver knows) from rank `src`, as one operation,
  // so that two neighbours each sending to the other cannot deadlock (NCCL: one group of ncclSend and
  // ncclRecv). dst or src -1 leaves that half out. A receiver's shape or dtype that differs from the
  // sender's is an error naming both ranks (the store backend; NCCL would read garbage or hang).
  virtual void send_recv(const torch::Tensor& send, int dst, torch::Tensor& recv, int src) = 0;
  void send(const torch::Tensor& t, int dst) {
    torch::Tensor none;
    send_recv(t, dst, none, -1);
  }
  void recv(torch::Tensor& t, int src) { send_recv(torch::Tensor(), -1, t, src); }
  // The sub-group of the ranks passing the same `color` (MPI_Comm_split): every rank of this group
  // calls it; ranks in the new group are ordered by their rank here. `label` names it in messages.
  virtual std::unique_ptr<Communicator> split(int color, const std::string& label) = 0;

  // Bytes this rank has sent to other ranks by all_to_all since the group was made (bench_ep.sh).
  int64_t all_to_all_bytes_sent() const { return all_to_all_bytes_sent_; }
  // Bytes this rank has sent point to point since the group was made (bench_pp.sh).
  int64_t p2p_bytes_sent() const { return p2p_bytes_sent_; }

 protected:
  int64_t all_to_all_bytes_sent_ = 0;
  int64_t p2p_bytes_sent_ = 0;
};

// The job's world communicator: rendezvous from the launcher's environment, then the backend that
// parallel.backend names (auto: nccl for run.device cuda, store for cpu; single when alone).
std::unique_ptr<Communicator> make_communicator(const config::ParallelConfig& parallel, const std::string& device = "cpu");

// The process layout: world = pp x dp. Rank r is pipeline stage r / dp, data-parallel rank r % dp
// within it (Megatron-Core's order, the pipeline outermost). Within a stage's dp ranks, expert
// parallelism splits dp = ep x replicas: dp rank d is EP rank d % ep of EP group d / ep; the ranks
// holding the same experts (same EP rank) form an expert-data-parallel group. Without a pipeline
// (pp 1) dp is the world itself.
struct Layout {
  std::shared_ptr<Communicator> world;
  std::shared_ptr<Communicator> dp;   // this stage's ranks: the replicas of what the stage holds
  std::shared_ptr<Communicator> ep;   // the ranks that share one copy of every expert
  std::shared_ptr<Communicator> edp;  // the replicas of this rank's experts
  std::shared_ptr<Communicator> pp;   // the same dp rank on every stage, in stage order (point to point)
  std::shared_ptr<Communicator> tie;  // first and last stage at pp > 1 (a tied embedding's two copies); else single
  // The ranks of dp and edp again, split from the world for the gradient buckets only (all-reduce,
  // reduce-scatter, ZeRO-1's all-gather): NCCL runs each communicator's work in order on its own stream,
  // so gradient traffic never queues behind, or shares a communicator with, the expert-parallel and
  // router collectives of another stream. Null in a Layout made by hand: the buckets then use dp/edp.
  std::shared_ptr<Communicator> grad_dp, grad_edp;
  int ep_size() const { return ep->world_size(); }
  int ep_rank() const { return ep->rank(); }
  int pp_size() const { return pp ? pp->world_size() : 1; }
  int pp_rank() const { return pp ? pp->rank() : 0; }
  int dp_size() const { return dp ? dp->world_size() : world->world_size(); }
  int dp_rank() const { return dp ? dp->rank() : world->rank(); }
  bool first_stage() const { return pp_rank() == 0; }
  bool last_stage() const { return pp_rank() == pp_size() - 1; }
};
Layout make_layout(std::shared_ptr<Communicator> world, int expert_parallel, int pipeline_parallel = 1);

// A rank of one: the layout of a single process (used where no job is running, e.g. tests).
std::unique_ptr<Communicator> make_single();

// Small host-side collectives for bookkeeping (any backend; nccl goes through a CUDA tensor).
double all_sum(Communicator& group, double value);
// Every rank's string, in rank order.
std::vector<std::string> all_gather_strings(Communicator& group, const std::string& value);
// For a backend's split(): the ranks of `group` that pass `color` (collective), as world ranks in
// order, and this rank's place among them (-1 if its color differs).
struct Members {
  int rank = -1;
  std::vector<int> world_ranks;
};
Members members_with_color(Communicator& group, int color);

}  // namespace moetrain::dist
