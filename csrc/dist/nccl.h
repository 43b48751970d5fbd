// The NCCL backend's factory (internal to csrc/dist).
#pragma once
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <memory>

#include "dist/communicator.h"

namespace moetrain::dist {

// Joins the NCCL world of `world_size` ranks (the unique id shared through `store`) on `device`
// (claim_device's). Collectives run on the current CUDA stream and are awaited with a
// deadline of timeout_s; a timeout aborts the communicator and throws DistError naming the operation.
std::unique_ptr<Communicator> make_nccl(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
                                        torch::Device device, int timeout_s);

}  // namespace moetrain::dist
