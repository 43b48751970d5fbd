// The NCCL backend's factory (internal to csrc/dist).
#pragma once
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <memory>

#include "dist/communicator.h"

namespace moetrain::dist {

// Joins the NCCL world of `world_size` ranks (the unique id shared through `store`, dist/unique_id.h)
// on `device` (claim_device's), within timeout_s or a DistError naming the rank and world size.
// Collectives return once enqueued; the process's watchdog bounds each by timeout_s (nccl.cpp).
std::unique_ptr<Communicator> make_nccl(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
                                        torch::Device device, int timeout_s);

}  // namespace moetrain::dist
