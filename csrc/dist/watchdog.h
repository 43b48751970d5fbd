// The process's watchdog over collectives in flight. Collectives return once enqueued, so nothing on
// the host notices a peer that died or a collective that never finishes: one thread per process
// checks every pending operation (its completion probe) and every live communicator (its asynchronous
// error) against parallel.timeout_s. On a timeout or an error it aborts every communicator of the
// process, prints one line naming the operation, its round, the communicator and its ranks, and exits
// non-zero. The logic takes its probes and hooks as functions, so the CPU tests drive it with fakes.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace moetrain::dist {

// Which collective, for messages: "all_reduce", round 12 of "ep[0,1]" (world ranks 0 and 1), on world rank 1.
struct CollectiveName {
  std::string op;
  int64_t round = 0;
  std::string group;
  std::vector<int> world_ranks;
  int world_rank = 0;
};

// The one line both backends report a failed collective with (without the "[dist] " prefix):
// "all_reduce #12 on ep[0,1] (world ranks 0,1; this is rank 1): <cause>".
std::string describe_collective_failure(const CollectiveName& what, const std::string& cause);

// What a pending operation's probe says.
struct Probe {
  enum State { kRunning, kDone, kFailed } state = kRunning;
  std::string error;  // kFailed: the cause, e.g. "CUDA error: an illegal memory access..."
};

class Watchdog {
 public:
  struct Hooks {
    std::function<void(const std::string& line)> report;  // the process's: one line on stderr, flushed
    std::function<void()> exit;                           // the process's: std::_Exit(1), never returns
    std::chrono::milliseconds poll{100};                  // between two checks of the thread
  };
  explicit Watchdog(Hooks hooks);
  ~Watchdog();  // stops the thread (the process's watchdog is never destroyed)
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // A live communicator (`group`: its name and ranks; op and round unused): `abort` ends it without
  // waiting for its work (ncclCommAbort); `async_error` is its asynchronous error, empty while there is
  // none (may be null). Returns its id in the registry.
  int64_t add_communicator(CollectiveName group, std::function<void()> abort,
                           std::function<std::string()> async_error);
  // A communicator about to be destroyed: forgets it and its pending operations.
  void remove_communicator(int64_t id);
  // An operation just enqueued on communicator `id`: watched until `probe` says done or failed, or
  // `timeout` has passed since now.
  void watch(int64_t id, CollectiveName what, std::chrono::milliseconds timeout, std::function<Probe()> probe);

  // One check of everything watched; true when it fired (the hooks have then run). Tests call it.
  bool check();
  // Checks every Hooks::poll on a thread of its own, from now on (idempotent).
  void start();
  size_t pending() const;
  bool fired() const;

 private:
  struct Entry {
    int64_t communicator;
    CollectiveName what;
    std::chrono::steady_clock::time_point deadline;
    std::chrono::milliseconds timeout;
    std::function<Probe()> probe;
  };
  struct Registered {
    CollectiveName group;
    std::function<void()> abort;
    std::function<std::string()> async_error;
  };
  void fire(const CollectiveName& what, const std::string& cause, std::unique_lock<std::mutex>& lock);

  Hooks hooks_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::map<int64_t, Registered> communicators_;
  std::vector<Entry> entries_;
  int64_t next_id_ = 0;
  bool fired_ = false, stopping_ = false;
  std::thread thread_;
};

// The process's watchdog: reports on stderr and exits with std::_Exit(1). Its thread starts with the
// first call.
Watchdog& process_watchdog();

}  // namespace moetrain::dist
