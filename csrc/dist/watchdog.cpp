// The watchdog's checks and its thread (see watchdog.h). Probes run under the registry's lock: they are
// cheap (cudaEventQuery, ncclCommGetAsyncError) and a communicator must not be destroyed mid-probe.
#include "dist/watchdog.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace moetrain::dist {

std::string describe_collective_failure(const CollectiveName& what, const std::string& cause) {
  std::ostringstream s;
  if (what.op.empty())
    s << "no collective pending";
  else
    s << what.op << " #" << what.round;
  s << " on " << what.group << " (world ranks ";
  for (size_t i = 0; i < what.world_ranks.size(); ++i) s << (i ? "," : "") << what.world_ranks[i];
  s << "; this is rank " << what.world_rank << "): " << cause;
  return s.str();
}

namespace {

std::string seconds(std::chrono::milliseconds t) {
  std::ostringstream s;
  if (t.count() % 1000 == 0)
    s << t.count() / 1000;
  else
    s << double(t.count()) / 1000.0;
  return s.str();
}

}  // namespace

Watchdog::Watchdog(Hooks hooks) : hooks_(std::move(hooks)) {}

Watchdog::~Watchdog() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

int64_t Watchdog::add_communicator(CollectiveName group, std::function<void()> abort,
                                   std::function<std::string()> async_error) {
  const std::lock_guard<std::mutex> lock(mutex_);
  const int64_t id = next_id_++;
  communicators_[id] = Registered{std::move(group), std::move(abort), std::move(async_error)};
  return id;
}

void Watchdog::remove_communicator(int64_t id) {
  const std::lock_guard<std::mutex> lock(mutex_);
  communicators_.erase(id);
  std::erase_if(entries_, [id](const Entry& e) { return e.communicator == id; });
}

void Watchdog::watch(int64_t id, CollectiveName what, std::chrono::milliseconds timeout, std::function<Probe()> probe) {
  const std::lock_guard<std::mutex> lock(mutex_);
  if (fired_) return;
  entries_.push_back(Entry{id, std::move(what), std::chrono::steady_clock::now() + timeout, timeout, std::move(probe)});
}

size_t Watchdog::pending() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return entries_.size();
}

bool Watchdog::fired() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return fired_;
}

bool Watchdog::check() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (fired_) return true;
  // A communicator's asynchronous error ends the job at once, named after its oldest pending operation.
  for (const auto& [id, registered] : communicators_) {
    const std::string error = registered.async_error ? registered.async_error() : std::string();
    if (error.empty()) continue;
    CollectiveName what = registered.group;
    for (const auto& e : entries_)
      if (e.communicator == id) {
        what = e.what;
        break;
      }
    fire(what, error, lock);
    return true;
  }
  const auto now = std::chrono::steady_clock::now();
  for (auto it = entries_.begin(); it != entries_.end();) {
    const Probe probe = it->probe();
    if (probe.state == Probe::kDone) {
      it = entries_.erase(it);
      continue;
    }
    if (probe.state == Probe::kFailed) {
      fire(it->what, probe.error, lock);
      return true;
    }
    if (now > it->deadline) {
      fire(it->what, "not finished after parallel.timeout_s = " + seconds(it->timeout) + " s (a peer died or is stuck)",
           lock);
      return true;
    }
    ++it;
  }
  return false;
}

// Aborts every communicator (each once), reports, exits. Runs the hooks without the lock, so that a
// hook may call back into the registry.
void Watchdog::fire(const CollectiveName& what, const std::string& cause, std::unique_lock<std::mutex>& lock) {
  fired_ = true;
  const std::string line = "moetrain: [dist] " + describe_collective_failure(what, cause);  // before `what` goes
  std::vector<std::function<void()>> aborts;
  for (auto& [id, registered] : communicators_)
    if (registered.abort) aborts.push_back(std::move(registered.abort));
  communicators_.clear();
  entries_.clear();
  lock.unlock();
  for (auto& abort : aborts) {
    try {
      abort();
    } catch (...) {  // the job ends anyway: the other communicators must still be aborted
    }
  }
  if (hooks_.report) hooks_.report(line);
  if (hooks_.exit) hooks_.exit();
  lock.lock();
}

void Watchdog::start() {
  const std::lock_guard<std::mutex> lock(mutex_);
  if (thread_.joinable()) return;
  thread_ = std::thread([this] {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stopping_ && !fired_) {
      wake_.wait_for(lock, hooks_.poll);
      if (stopping_) break;
      lock.unlock();
      check();
      lock.lock();
    }
  });
}

Watchdog& process_watchdog() {
  // Never destroyed: the thread may still be checking while static destructors run at exit.
  static Watchdog* const watchdog = [] {
    Watchdog::Hooks hooks;
    hooks.report = [](const std::string& line) {
      std::fputs((line + "\n").c_str(), stderr);
      std::fflush(stderr);
      std::fflush(stdout);
    };
    hooks.exit = [] { std::_Exit(1); };
    auto* w = new Watchdog(std::move(hooks));
    w->start();
    return w;
  }();
  return *watchdog;
}

}  // namespace moetrain::dist
