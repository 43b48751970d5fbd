// The collectives' watchdog (csrc/dist/watchdog.h) driven by fake operations and communicators: what a
// GPU run relies on when a peer dies with a collective in flight, checked on the CPU.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "../test_util.h"
#include "dist/watchdog.h"

using namespace moetrain;
using Catch::Matchers::Contains;
using namespace std::chrono_literals;

namespace {

// The hooks of a test: the line reported, the exits taken, and a wait for the first exit.
struct Recorder {
  std::mutex mutex;
  std::condition_variable exited;
  std::vector<std::string> lines;
  int exits = 0;
  std::chrono::steady_clock::time_point exited_at;

  dist::Watchdog::Hooks hooks(std::chrono::milliseconds poll = 20ms) {
    dist::Watchdog::Hooks h;
    h.report = [this](const std::string& line) {
      const std::lock_guard<std::mutex> lock(mutex);
      lines.push_back(line);
    };
    h.exit = [this] {
      const std::lock_guard<std::mutex> lock(mutex);
      ++exits;
      exited_at = std::chrono::steady_clock::now();
      exited.notify_all();
    };
    h.poll = poll;
    return h;
  }
  // Waits for an exit, at most `bound` (a bound far beyond what the case asserts: no hang if it never comes).
  bool wait_exit(std::chrono::seconds bound) {
    std::unique_lock<std::mutex> lock(mutex);
    return exited.wait_for(lock, bound, [this] { return exits > 0; });
  }
};

dist::CollectiveName group(const std::string& name, std::vector<int> ranks, int me) {
  dist::CollectiveName g;
  g.group = name;
  g.world_ranks = std::move(ranks);
  g.world_rank = me;
  return g;
}

dist::CollectiveName op(const std::string& what, int64_t round, const dist::CollectiveName& g) {
  auto o = g;
  o.op = what;
  o.round = round;
  return o;
}

dist::Probe running() { return {}; }
dist::Probe done() { return {dist::Probe::kDone, ""}; }

}  // namespace

CATCH_TEST_CASE("Watchdog: a collective that never finishes aborts every communicator once, names it in one line, exits",
                "[dist][watchdog]") {
  Recorder recorder;
  dist::Watchdog watchdog(recorder.hooks());
  std::atomic<int> aborted_world{0}, aborted_ep{0}, aborted_edp{0};
  const auto world = group("world", {0, 1, 2, 3}, 1), ep = group("ep[0,1]", {0, 1}, 1), edp = group("edp[1,3]", {1, 3}, 1);
  const auto id_world = watchdog.add_communicator(world, [&] { ++aborted_world; }, [] { return std::string(); });
  const auto id_ep = watchdog.add_communicator(ep, [&] { ++aborted_ep; }, nullptr);
  watchdog.add_communicator(edp, [&] { ++aborted_edp; }, [] { return std::string(); });
  watchdog.watch(id_world, op("all_reduce", 3, world), 1000ms, done);  // finished: dropped
  const auto timeout = std::chrono::milliseconds(int64_t(1000 * testing::scaled_seconds(1)));
  const auto start = std::chrono::steady_clock::now();
  watchdog.watch(id_ep, op("all_to_all", 7, ep), timeout, running);
  watchdog.start();
  CATCH_REQUIRE(recorder.wait_exit(std::chrono::seconds(int64_t(testing::scaled_seconds(60)))));
  const double took = std::chrono::duration<double>(recorder.exited_at - start).count();
  CATCH_INFO("exited " << took << " s after the operation was enqueued");
  // Not before the deadline, and well within the 5 s of slack the issue allows.
  CATCH_CHECK(took >= std::chrono::duration<double>(timeout).count());
  CATCH_CHECK(took <= std::chrono::duration<double>(timeout).count() + testing::scaled_seconds(5));
  std::this_thread::sleep_for(100ms);  // the thread has stopped: nothing fires twice
  CATCH_CHECK(recorder.exits == 1);
  CATCH_CHECK((aborted_world == 1 && aborted_ep == 1 && aborted_edp == 1));
  CATCH_REQUIRE(recorder.lines.size() == 1);
  const auto& line = recorder.lines[0];
  CATCH_CHECK(line.find('\n') == std::string::npos);
  CATCH_CHECK_THAT(line, Contains("[dist] all_to_all #7 on ep[0,1]") && Contains("world ranks 0,1") &&
                             Contains("this is rank 1") && Contains("parallel.timeout_s"));
  CATCH_CHECK(watchdog.fired());
}

CATCH_TEST_CASE("Watchdog: operations that complete are dropped and never fire", "[dist][watchdog]") {
  Recorder recorder;
  int aborts = 0;
  const auto g = group("world", {0, 1}, 0);
  int probes = 0;  // the broadcast finishes on its third probe
  dist::Watchdog patient(recorder.hooks());
  const auto pid = patient.add_communicator(g, [&] { ++aborts; }, nullptr);
  patient.watch(pid, op("broadcast", 0, g), 3600s, [&] { return ++probes >= 3 ? done() : running(); });
  patient.watch(pid, op("all_gather", 1, g), 3600s, running);
  patient.watch(pid, op("all_reduce", 2, g), 3600s, done);
  CATCH_CHECK(!patient.check());  // all_reduce done: dropped
  CATCH_CHECK(patient.pending() == 2);
  CATCH_CHECK(!patient.check());
  CATCH_CHECK(patient.pending() == 2);
  CATCH_CHECK(!patient.check());  // broadcast's third probe: done
  CATCH_CHECK(patient.pending() == 1);
  CATCH_CHECK(probes == 3);
  for (int i = 0; i < 5; ++i) CATCH_CHECK(!patient.check());
  CATCH_CHECK(probes == 3);  // a dropped operation is never probed again
  CATCH_CHECK(recorder.exits == 0);
  CATCH_CHECK(aborts == 0);
  // A removed communicator takes its pending operations with it.
  patient.remove_communicator(pid);
  CATCH_CHECK(patient.pending() == 0);
}

CATCH_TEST_CASE("Watchdog: a deadline passed fires on the next check, a finished operation with a passed deadline does not",
                "[dist][watchdog]") {
  Recorder recorder;
  dist::Watchdog watchdog(recorder.hooks());
  int aborts = 0;
  const auto g = group("pp[0,2]", {0, 2}, 2);
  const auto id = watchdog.add_communicator(g, [&] { ++aborts; }, nullptr);
  watchdog.watch(id, op("send/recv", 4, g), 0ms, done);
  std::this_thread::sleep_for(5ms);
  CATCH_CHECK(!watchdog.check());
  watchdog.watch(id, op("send/recv", 5, g), 0ms, running);
  std::this_thread::sleep_for(5ms);
  CATCH_CHECK(watchdog.check());
  CATCH_CHECK(watchdog.check());  // still fired, hooks not run again
  CATCH_CHECK(recorder.exits == 1);
  CATCH_CHECK(aborts == 1);
  CATCH_REQUIRE(recorder.lines.size() == 1);
  CATCH_CHECK_THAT(recorder.lines[0], Contains("send/recv #5 on pp[0,2] (world ranks 0,2; this is rank 2)"));
}

CATCH_TEST_CASE("Watchdog: an asynchronous error or a failed operation fires at once, long before the deadline",
                "[dist][watchdog]") {
  {  // the communicator's asynchronous error (ncclCommGetAsyncError), named after its oldest pending op
    Recorder recorder;
    dist::Watchdog watchdog(recorder.hooks());
    std::atomic<bool> broken{false};
    int aborts_a = 0, aborts_b = 0;
    const auto a = group("world", {0, 1}, 0), b = group("ep[0,1]", {0, 1}, 0);
    const auto ida = watchdog.add_communicator(a, [&] { ++aborts_a; }, [] { return std::string(); });
    const auto idb = watchdog.add_communicator(b, [&] { ++aborts_b; }, [&] {
      return broken ? std::string("NCCL error: remote process exited or there was a network error") : std::string();
    });
    watchdog.watch(ida, op("all_reduce", 10, a), 3600s, running);
    watchdog.watch(idb, op("all_to_all", 21, b), 3600s, running);
    watchdog.watch(idb, op("all_to_all", 22, b), 3600s, running);
    CATCH_CHECK(!watchdog.check());
    broken = true;
    CATCH_CHECK(watchdog.check());
    CATCH_CHECK((aborts_a == 1 && aborts_b == 1 && recorder.exits == 1));
    CATCH_REQUIRE(recorder.lines.size() == 1);
    CATCH_CHECK_THAT(recorder.lines[0], Contains("all_to_all #21 on ep[0,1]") && Contains("remote process exited"));
  }
  {  // an error with nothing pending names the communicator alone
    Recorder recorder;
    dist::Watchdog watchdog(recorder.hooks());
    watchdog.add_communicator(group("edp[0]", {0}, 0), [] {}, [] { return std::string("NCCL error: internal error"); });
    CATCH_CHECK(watchdog.check());
    CATCH_REQUIRE(recorder.lines.size() == 1);
    CATCH_CHECK_THAT(recorder.lines[0], Contains("no collective pending on edp[0]") && Contains("internal error"));
  }
  {  // an operation whose probe fails (a CUDA error on its event), through the thread
    Recorder recorder;
    dist::Watchdog watchdog(recorder.hooks());
    int aborts = 0;
    const auto g = group("world", {0, 1}, 1);
    const auto id = watchdog.add_communicator(g, [&] { ++aborts; }, nullptr);
    const auto start = std::chrono::steady_clock::now();
    watchdog.watch(id, op("reduce_scatter", 2, g), 3600s, [] {
      return dist::Probe{dist::Probe::kFailed, "CUDA error: an illegal memory access was encountered"};
    });
    watchdog.start();
    CATCH_REQUIRE(recorder.wait_exit(std::chrono::seconds(int64_t(testing::scaled_seconds(60)))));
    CATCH_CHECK(std::chrono::duration<double>(recorder.exited_at - start).count() < testing::scaled_seconds(5));
    CATCH_CHECK(aborts == 1);
    CATCH_REQUIRE(recorder.lines.size() == 1);
    CATCH_CHECK_THAT(recorder.lines[0], Contains("reduce_scatter #2 on world") && Contains("illegal memory access"));
  }
}
