// The NCCL unique id's store key and exchange (see unique_id.h).
#include "dist/unique_id.h"

#include <cstdlib>

namespace moetrain::dist {

std::string unique_id_key(int64_t attempt, const std::function<const char*(const char*)>& getenv_fn) {
  auto get = [&](const char* name) -> std::string {
    const char* v = getenv_fn ? getenv_fn(name) : std::getenv(name);
    return v && *v ? v : "-";
  };
  return "nccl/unique_id/" + get("TORCHELASTIC_RUN_ID") + "/" + get("TORCHELASTIC_RESTART_COUNT") + "/" +
         std::to_string(attempt);
}

std::vector<uint8_t> share_unique_id(c10d::Store& store, int rank, const std::function<std::vector<uint8_t>()>& make_id,
                                     const std::function<const char*(const char*)>& getenv_fn) {
  // Each rank counts its own rendezvous: the k-th of every rank is the same attempt, whichever rank
  // reaches the store first.
  const int64_t attempt = store.add("nccl/attempt/" + std::to_string(rank), 1);
  const std::string key = unique_id_key(attempt, getenv_fn);
  if (rank == 0) {
    auto id = make_id();
    store.set(key, id);
    return id;
  }
  return store.get(key);
}

}  // namespace moetrain::dist
