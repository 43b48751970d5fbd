// The communicator interface every multi-rank operation goes through. This build has the `single`
// backend (one process); Gloo and NCCL backends implement the same interface (roadmap item 3).
#pragma once
#include <torch/torch.h>

#include <memory>

#include "config/config.h"

namespace moetrain::dist {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  virtual std::string backend() const = 0;
  virtual void all_reduce_sum(torch::Tensor& t) = 0;  // in place
  virtual void broadcast(torch::Tensor& t, int root) = 0;
  virtual void barrier() = 0;
};

// Picks the backend from parallel.backend and the launcher's environment (RANK/WORLD_SIZE...).
// A multi-rank environment without a multi-rank backend is a DistError, never a silent single run.
std::unique_ptr<Communicator> make_communicator(const config::ParallelConfig& cfg);

}  // namespace moetrain::dist
