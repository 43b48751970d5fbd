// The NCCL unique id's trip through the store, safe across restarts. A fixed key would hand a
// restarted attempt (torchrun --max-restarts, or a second process group in one process) the id of an
// attempt before it, and its ranks would join a communicator that no longer exists and hang. The key
// carries the launcher's run id and restart count where set, and in any case this rank's count of
// rendezvous so far, kept in the store: attempt k of every rank pairs with attempt k of rank 0.
#pragma once
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moetrain::dist {

// The bytes of this attempt's id: rank 0 makes them with `make_id` and posts them; every other rank
// waits for them (within the store's timeout). `getenv` is injectable for tests (null: the process's).
std::vector<uint8_t> share_unique_id(c10d::Store& store, int rank, const std::function<std::vector<uint8_t>()>& make_id,
                                     const std::function<const char*(const char*)>& getenv = nullptr);

// The store key of attempt `attempt` (1-based) under the launcher's variables: "nccl/unique_id/<run id>/<restart>/<k>".
std::string unique_id_key(int64_t attempt, const std::function<const char*(const char*)>& getenv = nullptr);

}  // namespace moetrain::dist
