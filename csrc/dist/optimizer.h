// The optimizer step across the job's ranks, one object the step calls in order:
//   zero_grad, (forward and backward, before_last_backward before the last micro-batch's),
//   reduce_gradients, norm_part (with the step's health), scale_gradients (clipping), step.
// Both stages reduce the gradients in buckets through a GradientReducer (dist/data_parallel.h): with
// parallel.overlap_grad_reduce, during the last backward as each bucket completes.
// parallel.zero chooses how the work and the state are split over a parameter's replicas (the world
// for replicated weights, the expert-data-parallel group for routed experts at ep > 1):
//   0  every replica averages the full gradient (all-reduce) and updates the whole parameter with its
//      own copy of AdamW's moments (dist::DataParallel and optim::AdamW);
//   1  ZeRO stage 1 (Rajbhandari et al. 2020; Megatron-Core's distributed optimizer): the replicas
//      split each gradient bucket (reduce-scatter), each updates its share with the moments of that
//      share only, and the updated weights are all-gathered. A parameter with R replicas keeps 1/R of
//      its moments on each. Under run.dtype bf16 the fp32 master weights are sharded too: from the
//      first step, each weight every use casts to bf16 (model::RoledParam::compute_dtype_only) is
//      held in bf16 with an fp32 gradient (Tensor::set_grad_dtype), its master is 1/R on each
//      replica, and the all-gather carries bf16. In fp32 the parameters are the masters.
// optim.name muon (optim/muon.h) at zero 0: every replica orthogonalises the averaged gradient of each
// hidden matrix it holds (an expert-parallel rank its own experts, a pipeline stage its own weights),
// with no communication beyond the gradients'. At zero 1 (Moonlight's distributed Muon) each hidden
// matrix lies whole in one replica's share, the owners balanced by size: it orthogonalises the fully
// reduced gradient with the momentum it alone keeps, and the all-gather brings the result to the rest.
// Checkpoints stay layout-free at either stage: checkpoint_state() gives every parameter's whole
// moments, so a zero 1 checkpoint resumes at zero 0 and at any world size, and the other way round.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "config/config.h"
#include "dist/data_parallel.h"
#include "model/transformer.h"
#include "optim/adamw.h"

namespace moetrain::dist {

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual void zero_grad() = 0;
  // Before the backward of the step's last micro-batch: from then on, with overlap, each bucket of
  // gradients is reduced as soon as backward has completed it.
  virtual void before_last_backward() = 0;
  // After backward, collective: each gradient summed over the ranks that computed it and divided by
  // the data-parallel size, in the form this rank's update needs (zero 0: whole; zero 1: its shares).
  // Returns the largest |gradient| this rank held before the reduction (NaN if any was NaN), as a ()
  // fp64 tensor on the device: nothing is read on the host.
  virtual torch::Tensor reduce_gradients() = 0;
  // The last step's gradient buckets: how many were launched during backward, and how many there are.
  virtual std::pair<int, int> overlapped_buckets() const = 0;
  // This rank's part of the squared L2 norm of the job's whole averaged gradient, a () fp64 tensor on
  // the device: the parts of every rank of the world sum to the whole (each element of the gradient is
  // counted by exactly one rank), so the step can gather them with its health in one collective.
  virtual torch::Tensor norm_part() = 0;
  // Multiplies every gradient this rank updates from by `factor` (clipping).
  virtual void scale_gradients(double factor) = 0;
  virtual void step(double lr) = 0;  // collective at zero 1 (the all-gather of the weights)
  virtual int64_t step_count() const = 0;
  // What a checkpoint writes, layout-free. Collective at zero 1: the moments (and sharded masters) are gathered to the CPU
  // of the ranks that write them (world rank 0 for replicated weights, the first replica of each
  // expert shard), one bucket at a time; elsewhere they are left undefined.
  virtual optim::OptimizerState checkpoint_state() = 0;
  // Takes a checkpoint's state: `read` fills whole moments shaped like this rank's parameters (on the
  // CPU at zero 1, which then keeps its shares) and the step count.
  virtual void load_state(const std::function<void(optim::OptimizerState&)>& read) = 0;
  // Every tensor of optimizer state this rank holds (finiteness checks, memory accounting).
  virtual std::vector<torch::Tensor> state_tensors() const = 0;
  // One line on what the state shards beyond the moments (ZeRO-1's fp32 masters), once the first step
  // has set it up; empty when nothing is.
  virtual std::string sharding_summary() const { return {}; }
};

// The optimizer for parallel.zero (0 or 1) over `parallel`'s parameters, reducing gradients as
// parallel.overlap_grad_reduce and grad_bucket_mb say; at one data-parallel rank both are the plain
// AdamW.
std::unique_ptr<Optimizer> make_optimizer(DataParallel& parallel, const std::vector<model::RoledParam>& params,
                                          const config::OptimConfig& cfg, const config::ParallelConfig& layout,
                                          std::optional<torch::ScalarType> compute_dtype = std::nullopt);

}  // namespace moetrain::dist
