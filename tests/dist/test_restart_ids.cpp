// The NCCL unique id across restarts (csrc/dist/unique_id.h): attempts of a group against one store,
// threads as ranks, ids made up by a fake in place of ncclGetUniqueId. Each attempt's ranks must agree,
// and a later attempt must never read an earlier attempt's id, even when its non-zero ranks ask first.
#include <catch2/catch.hpp>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <atomic>
#include <chrono>
#include <map>
#include <thread>

#include "dist/unique_id.h"

using namespace moetrain;
using namespace std::chrono_literals;

namespace {

c10d::TCPStoreOptions options(uint16_t port, bool server) {
  c10d::TCPStoreOptions o;
  o.port = port;
  o.isServer = server;
  o.waitWorkers = false;
  o.timeout = std::chrono::milliseconds(120000);  // a get that never comes fails the case, not hangs it
  return o;
}

const char* no_env(const char*) { return nullptr; }

// One attempt of a group of `world` ranks: each rank a thread with its own client of the store. The
// non-zero ranks start first; rank 0 only once each of them has counted its attempt, so they are all
// waiting for an id nobody has posted yet. Returns each rank's id.
std::vector<std::vector<uint8_t>> attempt(uint16_t port, c10d::Store& server, int world, int64_t k, const std::string& made) {
  std::vector<std::vector<uint8_t>> ids(static_cast<size_t>(world));
  std::vector<std::thread> ranks;
  for (int r = world - 1; r >= 0; --r) {
    if (r == 0) {
      for (int other = 1; other < world; ++other)
        while (server.add("nccl/attempt/" + std::to_string(other), 0) < k) std::this_thread::sleep_for(1ms);
      std::this_thread::sleep_for(50ms);  // they are in their get() now
    }
    ranks.emplace_back([&, r] {
      c10d::TCPStore client("127.0.0.1", options(port, false));
      ids[size_t(r)] = dist::share_unique_id(client, r, [&] { return std::vector<uint8_t>(made.begin(), made.end()); },
                                             no_env);
    });
  }
  for (auto& t : ranks) t.join();
  return ids;
}

}  // namespace

CATCH_TEST_CASE("NCCL unique id: every rank of an attempt agrees, a second attempt never reads the first's id",
                "[dist][restart]") {
  for (const int world : {2, 3}) {
    CATCH_INFO("world " << world);
    c10d::TCPStore server("127.0.0.1", options(0, true));
    const uint16_t port = uint16_t(server.getPort());
    const auto first = attempt(port, server, world, 1, "id of attempt 1");
    const auto second = attempt(port, server, world, 2, "id of attempt 2");
    for (int r = 0; r < world; ++r) {
      CATCH_INFO("rank " << r);
      CATCH_CHECK(std::string(first[size_t(r)].begin(), first[size_t(r)].end()) == "id of attempt 1");
      CATCH_CHECK(std::string(second[size_t(r)].begin(), second[size_t(r)].end()) == "id of attempt 2");
    }
  }
}

CATCH_TEST_CASE("NCCL unique id keys carry torchrun's run id and restart count", "[dist][restart]") {
  std::map<std::string, std::string> env = {{"TORCHELASTIC_RUN_ID", "job7"}, {"TORCHELASTIC_RESTART_COUNT", "2"}};
  auto get = [&](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  };
  CATCH_CHECK(dist::unique_id_key(3, get) == "nccl/unique_id/job7/2/3");
  env["TORCHELASTIC_RESTART_COUNT"] = "3";
  CATCH_CHECK(dist::unique_id_key(3, get) == "nccl/unique_id/job7/3/3");
  CATCH_CHECK(dist::unique_id_key(1, no_env) == "nccl/unique_id/-/-/1");
}
