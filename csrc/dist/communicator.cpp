// Rendezvous, the single and store backends, the factory and the expert-parallel layout.
#include "dist/communicator.h"

#include "common/host_sync.h"

#include <c10/util/Logging.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "common/errors.h"
#include "dist/nccl.h"
#include "dist/watchdog.h"

namespace moetrain::dist {

namespace {

// ---- the launcher's environment ----------------------------------------------------------------------

int parse_int_var(const char* name, const char* value, int min) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(value, &end, 10);
  if (errno || end == value || *end != '\0' || v < min || v > (1 << 24))
    throw DistError(std::string(name) + "=\"" + value + "\" is not an integer >= " + std::to_string(min));
  return int(v);
}

// The first host of a Slurm node list: "gpu[003-010,012],cpu1" -> "gpu003".
std::string first_slurm_host(const std::string& list) {
  const auto comma = list.find(',');
  const auto bracket = list.find('[');
  if (bracket == std::string::npos || (comma != std::string::npos && comma < bracket)) return list.substr(0, comma);
  const auto end = list.find_first_of("-,]", bracket + 1);
  return list.substr(0, bracket) + list.substr(bracket + 1, end - bracket - 1);
}

// ---- single --------------------------------------------------------------------------------------------

class SingleCommunicator final : public Communicator {
 public:
  explicit SingleCommunicator(std::string name = "world") : name_(std::move(name)) {}
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  std::string backend() const override { return "single"; }
  std::string name() const override { return name_; }
  int world_rank_of(int) const override { return 0; }
  void all_reduce_sum(torch::Tensor&) override {}
  void broadcast(torch::Tensor&, int) override {}
  torch::Tensor reduce_scatter_sum(const torch::Tensor& in) override { return in.clone(); }
  torch::Tensor all_gather(const torch::Tensor& t) override { return t.clone(); }
  torch::Tensor all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send_rows,
                           const std::vector<int64_t>& recv_rows) override {
    TORCH_CHECK(send_rows.size() == 1 && recv_rows.size() == 1 && send_rows[0] == recv_rows[0] &&
                    send_rows[0] == in.size(0),
                "[dist] all_to_all on one rank: splits must both be {", in.size(0), "}");
    return in.clone();
  }
  void barrier() override {}
  void send_recv(const torch::Tensor&, int dst, torch::Tensor&, int src) override {
    TORCH_CHECK(dst < 0 && src < 0, "[dist] send/recv on ", name_, ": a group of one rank has no peer");
  }
  std::unique_ptr<Communicator> split(int, const std::string& label) override {
    return std::make_unique<SingleCommunicator>(label);
  }

 private:
  std::string name_;
};

// ---- store -----------------------------------------------------------------------------------------------
// Every collective is a numbered round of keys "<group>/<round>/<what>". A value is written once and
// read by a known number of ranks; the last reader deletes it, so the store holds only rounds in flight.
// Sums add the ranks' tensors in rank order, so every rank gets bitwise the same result.
// The backend also holds every rank to NCCL's contract, which NCCL itself enforces only by hanging:
// each value carries its sender's signature (operation, dtype, shape; for all_to_all the rows meant
// for the reader, posted even when zero), and a reader whose own call differs fails at once, naming
// the operation, the round, both ranks and both signatures.

std::vector<uint8_t> to_bytes(const torch::Tensor& t) {
  auto c = t.detach().to(torch::kCPU).contiguous();
  const auto* p = static_cast<const uint8_t*>(c.data_ptr());
  return std::vector<uint8_t>(p, p + c.nbytes());
}

// c10d logs each failed connection attempt and each failed read of the store (a peer died), with a
// stack trace of 20 frames, before it throws; moetrain reports the failure itself, in one line, so
// LibTorch's logging is held to FATAL while the store is made or used. Counted, so that threads in
// store calls at once (the async saver's, the trainer's) restore the level only when the last leaves.
class QuietTorchLogging {
 public:
  QuietTorchLogging() {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (depth_++ == 0) {
      saved_ = FLAGS_caffe2_log_level;
      FLAGS_caffe2_log_level = 3;
    }
  }
  ~QuietTorchLogging() {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (--depth_ == 0) FLAGS_caffe2_log_level = saved_;
  }
  QuietTorchLogging(const QuietTorchLogging&) = delete;
  QuietTorchLogging& operator=(const QuietTorchLogging&) = delete;

 private:
  static inline std::mutex mutex_;
  static inline int depth_ = 0, saved_ = 0;
};

// The store and its shutdown, shared by the world and its sub-groups. Rank 0 serves the store, so it
// must not exit while another rank still talks to it: at the end every other rank checks out and
// rank 0 waits for them (unless a collective failed, when nobody waits on a dead job).
struct SharedStore {
  c10::intrusive_ptr<c10d::Store> store;
  int rank = 0, world_size = 1;
  std::chrono::milliseconds timeout{0};
  bool broken = false;           // a peer died or a wait timed out: nobody waits on a dead job
  bool contract_broken = false;  // ranks disagreed on a collective: they are alive and report it too

  ~SharedStore() {
    if (broken) return;
    QuietTorchLogging quiet;  // rank 0 may be gone already
    try {
      if (rank != 0) {
        store->add("exit", 1);
        return;
      }
      // After a contract error the peers are alive and read what this rank posted before they fail
      // in turn: the store they read from lives until they have, for a bounded while.
      const auto wait = contract_broken ? std::min(timeout, std::chrono::milliseconds(10000)) : timeout;
      const auto deadline = std::chrono::steady_clock::now() + wait;
      while (store->add("exit", 0) < world_size - 1 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    } catch (const std::exception&) {
    }
  }
};

class StoreCommunicator final : public Communicator {
 public:
  StoreCommunicator(std::shared_ptr<SharedStore> shared, std::string prefix, std::string name, int rank,
                    std::vector<int> world_ranks)
      : shared_(std::move(shared)), store_(shared_->store), prefix_(std::move(prefix)), name_(std::move(name)),
        rank_(rank), world_ranks_(std::move(world_ranks)) {}

  int rank() const override { return rank_; }
  int world_size() const override { return int(world_ranks_.size()); }
  std::string backend() const override { return "store"; }
  std::string name() const override { return name_; }
  int world_rank_of(int r) const override { return world_ranks_.at(size_t(r)); }

  void all_reduce_sum(torch::Tensor& t) override {
    const auto round = begin("all_reduce");
    const auto sig = signature(t);
    put(round + std::to_string(rank_), sig, to_bytes(t));
    torch::Tensor sum;
    for (int r = 0; r < world_size(); ++r) {
      auto part = r == rank_ ? t.detach().to(torch::kCPU) : take(round + std::to_string(r), world_size() - 1, r, t, sig);
      sum = r == 0 ? part.clone() : sum.add_(part);
    }
    t.copy_(sum);
  }

  torch::Tensor reduce_scatter_sum(const torch::Tensor& in) override {
    const int W = world_size();
    TORCH_CHECK(in.dim() == 1 && in.numel() % W == 0, "[dist] reduce_scatter on ", name_, ": needs a 1-D tensor whose ",
                "length is a multiple of ", W, ", got ", in.sizes());
    const auto round = begin("reduce_scatter");
    const int64_t share = in.numel() / W;
    auto flat = in.detach().to(torch::kCPU).contiguous();
    const auto sig = signature(flat);  // the whole input: every rank must give the same length
    for (int r = 0; r < W; ++r)
      if (r != rank_) put(round + std::to_string(rank_) + ">" + std::to_string(r), sig, to_bytes(flat.narrow(0, r * share, share)));
    auto like = torch::empty({share}, flat.options());
    torch::Tensor sum;
    for (int r = 0; r < W; ++r) {
      auto part = r == rank_ ? flat.narrow(0, r * share, share)
                             : take(round + std::to_string(r) + ">" + std::to_string(rank_), 1, r, like, sig);
      sum = r == 0 ? part.clone() : sum.add_(part);
    }
    return sum.to(in.device());
  }

  void broadcast(torch::Tensor& t, int root) override {
    TORCH_CHECK(root >= 0 && root < world_size(), "[dist] broadcast root ", root, " outside ", name_);
    const auto round = begin("broadcast");
    const auto sig = signature(t) + " from " + std::to_string(world_rank_of(root));
    if (rank_ == root)
      put(round + "b", sig, to_bytes(t));
    else
      t.copy_(take(round + "b", world_size() - 1, root, t, sig));
  }

  torch::Tensor all_gather(const torch::Tensor& t) override {
    const auto round = begin("all_gather");
    const auto sig = signature(t);
    put(round + std::to_string(rank_), sig, to_bytes(t));
    std::vector<torch::Tensor> parts;
    for (int r = 0; r < world_size(); ++r)
      parts.push_back(r == rank_ ? t.detach().to(torch::kCPU).clone()
                                 : take(round + std::to_string(r), world_size() - 1, r, t, sig));
    return torch::cat(parts, 0).to(t.device());
  }

  torch::Tensor all_to_all(const torch::Tensor& in, const std::vector<int64_t>& send_rows,
                           const std::vector<int64_t>& recv_rows) override {
    const int W = world_size();
    TORCH_CHECK(int(send_rows.size()) == W && int(recv_rows.size()) == W, "[dist] all_to_all on ", name_,
                ": splits need ", W, " entries");
    int64_t total_send = 0, total_recv = 0;
    for (int r = 0; r < W; ++r) total_send += send_rows[r], total_recv += recv_rows[r];
    TORCH_CHECK(total_send == in.size(0), "[dist] all_to_all on ", name_, ": send splits sum to ", total_send,
                " rows, the input has ", in.size(0));
    const auto round = begin("all_to_all");
    auto rows = in.detach().to(torch::kCPU).contiguous();
    int64_t start = 0;
    for (int r = 0; r < W; ++r) {
      if (r != rank_) {  // zero rows too: the reader checks that it expected none
        auto part = rows.narrow(0, start, send_rows[r]);
        auto bytes = to_bytes(part);
        all_to_all_bytes_sent_ += int64_t(bytes.size());
        put(round + std::to_string(rank_) + ">" + std::to_string(r), signature(part), bytes);
      }
      start += send_rows[r];
    }
    auto shape = in.sizes().vec();
    std::vector<torch::Tensor> parts;
    start = 0;
    for (int r = 0; r < W; ++r) start += r < rank_ ? send_rows[r] : 0;
    for (int r = 0; r < W; ++r) {
      shape[0] = recv_rows[r];
      if (r == rank_) {
        TORCH_CHECK(recv_rows[r] == send_rows[r], "[dist] all_to_all on ", name_, ": rank ", rank_, " sends itself ",
                    send_rows[r], " rows but expects ", recv_rows[r]);
        parts.push_back(rows.narrow(0, start, send_rows[r]).clone());
      } else {
        auto like = torch::empty(shape, rows.options());
        parts.push_back(take(round + std::to_string(r) + ">" + std::to_string(rank_), 1, r, like, signature(like)));
      }
    }
    return torch::cat(parts, 0).to(in.device());
  }

  void barrier() override {
    count_host_sync("dist.barrier");  // as NCCL's barrier, which reads its result on the host
    const auto round = begin("barrier");
    put(round + std::to_string(rank_), "barrier", {});
    for (int r = 0; r < world_size(); ++r)
      if (r != rank_) take_bytes(round + std::to_string(r), world_size() - 1, r, "barrier");
  }

  // Each ordered pair of ranks has its own numbered stream of messages "p2p/<src>><dst>/<n>": a
  // message is posted at once (the store buffers it) and read by its one receiver, who checks its
  // signature against the tensor it expects.
  void send_recv(const torch::Tensor& send, int dst, torch::Tensor& recv, int src) override {
    op_ = "send/recv";
    current_round_ = p2p_rounds_++;
    auto p2p_signature = [](const torch::Tensor& t) {
      std::ostringstream s;
      s << "p2p " << c10::toString(t.scalar_type()) << " " << t.sizes();
      return s.str();
    };
    if (dst >= 0) {
      TORCH_CHECK(dst < world_size() && dst != rank_, "[dist] send on ", name_, ": no peer ", dst);
      auto bytes = to_bytes(send);
      p2p_bytes_sent_ += int64_t(bytes.size());
      const std::string key = prefix_ + "p2p/" + std::to_string(rank_) + ">" + std::to_string(dst) + "/" +
                              std::to_string(sent_[dst]++);
      put(key, p2p_signature(send), bytes);
    }
    if (src >= 0) {
      TORCH_CHECK(src < world_size() && src != rank_, "[dist] recv on ", name_, ": no peer ", src);
      const std::string key = prefix_ + "p2p/" + std::to_string(src) + ">" + std::to_string(rank_) + "/" +
                              std::to_string(received_[src]++);
      recv.copy_(take(key, 1, src, recv, p2p_signature(recv)));
    }
  }

  std::unique_ptr<Communicator> split(int color, const std::string& label) override {
    auto members = members_with_color(*this, color);
    const std::string prefix = prefix_ + "split" + std::to_string(round_) + "." + std::to_string(color) + "/";
    return std::make_unique<StoreCommunicator>(shared_, prefix, label, members.rank, members.world_ranks);
  }

 private:
  // Starts the next numbered round of this group: its key prefix.
  std::string begin(const char* op) {
    op_ = op;
    current_round_ = round_;
    return prefix_ + std::to_string(round_++) + "/";
  }

  // The store's server takes values of at most 8 MiB, so a value travels in chunks of kChunk bytes:
  // `key` holds the total size (8 bytes) and the first chunk, `key.i` the i-th.
  static constexpr size_t kChunk = size_t(4) << 20;

  // What this rank's call is, as its peers must see it: "all_reduce Float [4, 3]".
  std::string signature(const torch::Tensor& t) const {
    std::ostringstream s;
    s << op_ << " " << c10::toString(t.scalar_type()) << " " << t.sizes();
    return s.str();
  }

  // A value is [u32 signature length][signature][payload], in chunks (below).
  void put(const std::string& key, const std::string& sig, const std::vector<uint8_t>& payload) {
    std::vector<uint8_t> bytes(sizeof(uint32_t) + sig.size());
    const uint32_t n = uint32_t(sig.size());
    std::memcpy(bytes.data(), &n, sizeof n);
    std::memcpy(bytes.data() + sizeof n, sig.data(), sig.size());
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    QuietTorchLogging quiet;
    try {
      const uint64_t total = bytes.size();
      const size_t first = std::min(kChunk, bytes.size());
      std::vector<uint8_t> head(sizeof total + first);
      std::memcpy(head.data(), &total, sizeof total);
      std::memcpy(head.data() + sizeof total, bytes.data(), first);
      store_->set(key, head);
      for (size_t at = first, i = 1; at < bytes.size(); at += kChunk, ++i)
        store_->set(key + "." + std::to_string(i),
                    std::vector<uint8_t>(bytes.begin() + long(at), bytes.begin() + long(std::min(at + kChunk, bytes.size()))));
    } catch (const c10::Error& e) {
      fail("writing to the store", e);
    }
  }

  // The payload rank `from` posted under `key`, once its signature is the one this rank expects.
  std::vector<uint8_t> take_bytes(const std::string& key, int readers, int from, const std::string& expected) {
    std::vector<uint8_t> bytes;
    try {
      QuietTorchLogging quiet;
      auto get = [&](const std::string& k) {
        auto v = store_->get(k);
        if (store_->add(k + "#", 1) == readers) {  // the last reader cleans up
          store_->deleteKey(k);
          store_->deleteKey(k + "#");
        }
        return v;
      };
      auto head = get(key);
      uint64_t total = 0;
      TORCH_CHECK(head.size() >= sizeof total, "[dist] malformed store value '", key, "'");
      std::memcpy(&total, head.data(), sizeof total);
      bytes.assign(head.begin() + sizeof total, head.end());
      bytes.reserve(total);
      for (size_t i = 1; bytes.size() < total; ++i) {
        auto chunk = get(key + "." + std::to_string(i));
        bytes.insert(bytes.end(), chunk.begin(), chunk.end());
      }
    } catch (const c10::Error& e) {
      fail("waiting for rank " + std::to_string(world_rank_of(from)), e);
    }
    uint32_t n = 0;
    if (bytes.size() >= sizeof n) std::memcpy(&n, bytes.data(), sizeof n);
    if (bytes.size() < sizeof n + n) {
      shared_->broken = true;
      throw DistError(std::string(op_) + " on " + name_ + ": malformed store value '" + key + "'");
    }
    const std::string sig(bytes.begin() + sizeof n, bytes.begin() + long(sizeof n + n));
    if (sig != expected) {
      shared_->contract_broken = true;
      throw DistError(std::string(op_) + " #" + std::to_string(current_round_) + " on " + name_ + ": rank " +
                      std::to_string(world_rank_of(from)) + " called '" + sig + "' but rank " +
                      std::to_string(world_rank_of(rank_)) + " called '" + expected +
                      "' (every rank must call the same collective with the same dtype and counts; NCCL would hang)");
    }
    bytes.erase(bytes.begin(), bytes.begin() + long(sizeof n + n));
    return bytes;
  }

  // Reads the value of `key` into a tensor shaped and typed like `like`.
  torch::Tensor take(const std::string& key, int readers, int from, const torch::Tensor& like, const std::string& expected) {
    auto bytes = take_bytes(key, readers, from, expected);
    auto out = torch::empty(like.sizes(), like.options().device(torch::kCPU));
    if (bytes.size() != size_t(out.nbytes())) {
      shared_->contract_broken = true;
      throw DistError(std::string(op_) + " on " + name_ + ": rank " + std::to_string(world_rank_of(from)) + " sent " +
                      std::to_string(bytes.size()) + " bytes, rank " + std::to_string(world_rank_of(rank_)) +
                      " expected " + std::to_string(out.nbytes()) + " (mismatched shapes or splits)");
    }
    if (!bytes.empty()) std::memcpy(out.data_ptr(), bytes.data(), bytes.size());
    return out;
  }

  // The watchdog's line (dist/watchdog.h), so that both backends say the same on a timeout.
  [[noreturn]] void fail(const std::string& what, const c10::Error& e) {
    shared_->broken = true;
    std::string cause = e.what_without_backtrace();
    cause = cause.substr(0, cause.find('\n'));
    const bool timed_out = cause.find("imeout") != std::string::npos || cause.find("timed out") != std::string::npos;
    const auto timeout_s = std::chrono::duration_cast<std::chrono::seconds>(shared_->timeout).count();
    throw DistError(describe_collective_failure(
        CollectiveName{op_, current_round_, name_, world_ranks_, world_rank_of(rank_)},
        timed_out ? "not finished after parallel.timeout_s = " + std::to_string(timeout_s) + " s (a peer died or is stuck): " +
                        what
                  : what + " failed: " + cause + " (a peer died)"));
  }

  std::shared_ptr<SharedStore> shared_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::string prefix_, name_;
  int rank_;
  std::vector<int> world_ranks_;
  int64_t round_ = 0;
  int64_t current_round_ = 0, p2p_rounds_ = 0;  // the round in messages; point-to-point calls by this rank
  const char* op_ = "";
  std::map<int, int64_t> sent_, received_;  // point-to-point messages, per peer
};

}  // namespace

torch::Device select_device(const std::string& run_device, const LaunchEnv& env, int visible_devices,
                            const char* cuda_visible_devices, const std::string& backend) {
  if (run_device != "cuda") return torch::Device(torch::kCPU);
  const std::string visible = cuda_visible_devices ? cuda_visible_devices : "";
  const std::string shown = cuda_visible_devices ? "CUDA_VISIBLE_DEVICES=" + visible : "CUDA_VISIBLE_DEVICES unset";
  if (visible_devices < 1)
    throw DistError("run.device = \"cuda\" but this process sees no CUDA device (" + shown + "; use run.device=cpu)");
  const bool bound_one = cuda_visible_devices && visible_devices == 1 && visible.find(',') == std::string::npos;
  const int local_ranks = std::max(env.local_world_size, env.local_rank + 1);
  if (bound_one) return torch::Device(torch::kCUDA, 0);  // the scheduler gave this process its own GPU
  // The store backend stages through host memory: ranks may share a GPU (one GPU runs many ranks).
  if (backend == "store") return torch::Device(torch::kCUDA, c10::DeviceIndex(env.local_rank % visible_devices));
  if (local_ranks > visible_devices)
    throw DistError("this node runs " + std::string(env.local_world_size > 0 ? "" : "at least ") +
                    std::to_string(local_ranks) + " ranks (local rank " + std::to_string(env.local_rank) + ") but " +
                    std::to_string(visible_devices) + " GPU(s) are visible (" + shown +
                    "): with nccl each rank needs a GPU of its own; launch at most " + std::to_string(visible_devices) +
                    " ranks per node (parallel.backend = store lets ranks share a GPU)");
  return torch::Device(torch::kCUDA, c10::DeviceIndex(env.local_rank));
}

LaunchEnv read_launch_env(const std::function<const char*(const char*)>& getenv_fn) {
  auto get = [&](const char* name) -> const char* {
    const char* v = getenv_fn ? getenv_fn(name) : std::getenv(name);
    return v && *v ? v : nullptr;
  };
  LaunchEnv env;
  struct Scheme {
    const char* source;
    const char* rank;
    const char* size;
    const char* local;
  };
  const Scheme schemes[] = {{"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"},
                            {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"},
                            {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"}};
  for (const auto& s : schemes) {
    const char* rank = get(s.rank);
    const char* size = get(s.size);
    if (!rank && !size) continue;
    if (!rank || !size)
      throw DistError(std::string("launcher environment (") + s.source + "): " + (rank ? s.rank : s.size) +
                      " is set but " + (rank ? s.size : s.rank) + " is not");
    env.source = s.source;
    env.world_size = parse_int_var(s.size, size, 1);
    env.rank = parse_int_var(s.rank, rank, 0);
    if (env.rank >= env.world_size)
      throw DistError(std::string(s.rank) + "=" + rank + " is not below " + s.size + "=" + size);
    const char* local = get(s.local);
    env.local_rank = local ? parse_int_var(s.local, local, 0) : 0;
    const char* local_size_var = env.source == std::string("torchrun") ? "LOCAL_WORLD_SIZE"
                                 : env.source == std::string("slurm")  ? "SLURM_NTASKS_PER_NODE"
                                                                       : "OMPI_COMM_WORLD_LOCAL_SIZE";
    if (const char* local_size = get(local_size_var)) {
      env.local_world_size = parse_int_var(local_size_var, local_size, 1);
      if (env.local_rank >= env.local_world_size)
        throw DistError(std::string(s.local) + "=" + std::to_string(env.local_rank) + " is not below " + local_size_var +
                        "=" + local_size);
    }
    if (env.world_size == 1) return env;
    if (const char* addr = get("MASTER_ADDR")) {
      env.master_addr = addr;
    } else if (env.source == std::string("slurm") && get("SLURM_JOB_NODELIST")) {
      env.master_addr = first_slurm_host(get("SLURM_JOB_NODELIST"));
    } else if (env.source == std::string("torchrun")) {
      throw DistError("launcher environment (torchrun): WORLD_SIZE=" + std::string(size) + " but MASTER_ADDR is not set");
    }
    if (const char* port = get("MASTER_PORT")) {
      env.master_port = parse_int_var("MASTER_PORT", port, 1);
      if (env.master_port > 65535) throw DistError("MASTER_PORT=" + std::string(port) + " is not a TCP port");
    } else if (env.source == std::string("torchrun")) {
      throw DistError("launcher environment (torchrun): WORLD_SIZE=" + std::string(size) + " but MASTER_PORT is not set");
    }
    return env;
  }
  return env;
}

std::unique_ptr<Communicator> make_single() { return std::make_unique<SingleCommunicator>(); }

namespace {
torch::Device device_of(const Communicator& group) {
  return group.backend() == "nccl" ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
}
}  // namespace

namespace {
struct Done final : Pending {
  void wait() override {}
};
}  // namespace

std::vector<torch::Tensor> Communicator::all_to_all_group(const std::vector<AllToAllPart>& parts) {
  std::vector<torch::Tensor> out;
  for (const auto& part : parts) out.push_back(all_to_all(part.in, part.send_rows, part.recv_rows));
  return out;
}

std::unique_ptr<Pending> Communicator::all_reduce_sum_async(torch::Tensor& t) {
  all_reduce_sum(t);
  return std::make_unique<Done>();
}

std::unique_ptr<Pending> Communicator::reduce_scatter_sum_async(const torch::Tensor& in, torch::Tensor& out) {
  out.copy_(reduce_scatter_sum(in));
  return std::make_unique<Done>();
}

std::unique_ptr<Pending> Communicator::all_gather_async(const torch::Tensor& in, torch::Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.numel() == in.numel() * world_size(), "[dist] all_gather_async on ", name(),
              ": out holds ", out.numel(), " elements, expected ", world_size(), " x ", in.numel());
  auto gathered = all_gather(in.reshape(-1));
  if (gathered.data_ptr() != out.data_ptr()) out.view(-1).copy_(gathered);
  return std::make_unique<Done>();
}

double all_sum(Communicator& group, double value) {
  if (group.world_size() == 1) return value;
  auto t = torch::tensor({value}, torch::kDouble).to(device_of(group));
  group.all_reduce_sum(t);
  return host_double(t, "dist.all_sum");
}

Members members_with_color(Communicator& group, int color) {
  auto colors = host_read(group.all_gather(torch::tensor({int64_t(color)}).to(device_of(group))), "dist.split_members");
  Members members;
  for (int r = 0; r < group.world_size(); ++r) {
    if (colors[r].item<int64_t>() != color) continue;
    if (r == group.rank()) members.rank = int(members.world_ranks.size());
    members.world_ranks.push_back(group.world_rank_of(r));
  }
  return members;
}

std::vector<std::string> all_gather_strings(Communicator& group, const std::string& value) {
  if (group.world_size() == 1) return {value};
  const int W = group.world_size();
  auto lengths = host_read(group.all_gather(torch::tensor({int64_t(value.size())}).to(device_of(group))), "dist.string_lengths");
  int64_t longest = 0;
  for (int r = 0; r < W; ++r) longest = std::max(longest, lengths[r].item<int64_t>());
  auto mine = torch::zeros({1, std::max<int64_t>(longest, 1)}, torch::kUInt8);
  std::memcpy(mine.data_ptr(), value.data(), value.size());
  auto all = host_read(group.all_gather(mine.to(device_of(group))), "dist.strings").contiguous();
  std::vector<std::string> out;
  for (int r = 0; r < W; ++r)
    out.emplace_back(reinterpret_cast<const char*>(all[r].data_ptr()), size_t(lengths[r].item<int64_t>()));
  return out;
}

namespace {

// Whether something at host:port accepts a TCP connection within `wait` (the connection is closed
// again at once; the store's server takes that as a client that left).
bool accepts_connections(const std::string& host, int port, std::chrono::milliseconds wait) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0) return false;
  bool ok = false;
  for (addrinfo* a = found; a && !ok; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
      ok = true;
    } else if (errno == EINPROGRESS) {  // not on loopback: wait for the handshake, bounded
      pollfd p{fd, POLLOUT, 0};
      int err = 0;
      socklen_t len = sizeof err;
      ok = ::poll(&p, 1, int(wait.count())) == 1 && ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
    }
    ::close(fd);
  }
  ::freeaddrinfo(found);
  return ok;
}

}  // namespace

std::unique_ptr<Communicator> make_communicator(const config::ParallelConfig& parallel, const std::string& device) {
  const LaunchEnv env = read_launch_env();
  std::string backend = parallel.backend;
  if (backend == "gloo")
    throw DistError("parallel.backend = \"gloo\": the LibTorch wheel ships no gloo headers, so moetrain cannot build "
                    "c10d's Gloo backend; use \"store\" (CPU collectives over the c10d TCPStore) or \"auto\"");
  if (backend == "auto") backend = env.world_size == 1 ? "single" : device == "cuda" ? "nccl" : "store";
  if (backend == "single") {
    if (env.world_size > 1)
      throw DistError("parallel.backend = \"single\" but the " + env.source + " launcher started " +
                      std::to_string(env.world_size) + " processes (use auto, store or nccl)");
    return make_single();
  }
  if (backend == "nccl" && device != "cuda")
    throw DistError("parallel.backend = \"nccl\" needs run.device = \"cuda\" (use store for the CPU)");

  // Rendezvous: rank 0 serves the store at MASTER_ADDR:MASTER_PORT; every rank connects to it.
  c10d::TCPStoreOptions options;
  options.port = uint16_t(env.master_port);
  options.isServer = env.rank == 0;
  options.numWorkers = size_t(env.world_size);
  options.waitWorkers = true;
  options.timeout = std::chrono::milliseconds(int64_t(parallel.timeout_s) * 1000);
  const std::string master = env.master_addr + ":" + std::to_string(env.master_port);
  const std::string within = "within parallel.timeout_s = " + std::to_string(parallel.timeout_s) + " s";
  if (env.rank != 0) {
    // The store's client retries for up to twice its timeout; this wait keeps to parallel.timeout_s.
    using clock = std::chrono::steady_clock;
    const auto deadline = clock::now() + options.timeout;
    bool reached = false;
    while (!reached && clock::now() < deadline) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clock::now());
      reached = accepts_connections(env.master_addr, env.master_port, std::min(left, std::chrono::milliseconds(1000)));
      if (!reached) std::this_thread::sleep_for(std::min(left, std::chrono::milliseconds(100)));
    }
    if (!reached)
      throw DistError("no rendezvous master at " + master + " " + within + " (is rank 0 running, and is " + master +
                      " reachable from rank " + std::to_string(env.rank) + "? MASTER_ADDR and MASTER_PORT come from " +
                      "the launcher)");
  }
  c10::intrusive_ptr<c10d::Store> store;
  try {
    QuietTorchLogging quiet;
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
  } catch (const std::exception& e) {
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    std::string cause = c10_error ? c10_error->what_without_backtrace() : e.what();
    cause = cause.substr(0, cause.find('\n'));
    if (env.rank != 0)
      throw DistError("no rendezvous master at " + master + " " + within + " (is rank 0 running? " + cause + ")");
    throw DistError("rank 0 of " + std::to_string(env.world_size) + " could not serve the rendezvous at " + master +
                    " " + within + ": " + cause);
  }
  std::vector<int> ranks(static_cast<size_t>(env.world_size));
  for (int r = 0; r < env.world_size; ++r) ranks[size_t(r)] = r;
  if (backend == "nccl")
    return make_nccl(store, env.rank, env.world_size, claim_device(device, "nccl"), parallel.timeout_s);
  auto shared = std::make_shared<SharedStore>();
  shared->store = store;
  shared->rank = env.rank;
  shared->world_size = env.world_size;
  shared->timeout = options.timeout;
  return std::make_unique<StoreCommunicator>(shared, "c/", "world", env.rank, ranks);
}

Layout make_layout(std::shared_ptr<Communicator> world, int expert_parallel, int pipeline_parallel) {
  const int W = world->world_size(), pp = pipeline_parallel;
  if (pp < 1 || W % pp != 0)
    throw DistError("parallel.pipeline_parallel = " + std::to_string(pp) + " does not divide the world size " +
                    std::to_string(W));
  const int dp = W / pp;
  if (expert_parallel < 1 || dp % expert_parallel != 0)
    throw DistError("parallel.expert_parallel = " + std::to_string(expert_parallel) + " does not divide the " +
                    (pp > 1 ? "data-parallel ranks of a stage, world size " + std::to_string(W) + " / pipeline_parallel " +
                                  std::to_string(pp) + " = " + std::to_string(dp)
                            : "world size " + std::to_string(W)));
  Layout layout;
  const int r = world->rank();
  const int stage = r / dp, d = r % dp;
  const int group = d / expert_parallel, ep_rank = d % expert_parallel;
  auto list = [&](int first, int stride, int count) {
    std::string s = "[";
    for (int i = 0; i < count; ++i) {
      if (i > 0) s += ",";
      s += std::to_string(first + i * stride);
    }
    return s + "]";
  };
  const int base = stage * dp;  // world rank of this stage's dp rank 0
  if (pp == 1) {
    layout.ep = world->split(group, "ep" + list(group * expert_parallel, 1, expert_parallel));
    layout.edp = world->split(ep_rank, "edp" + list(ep_rank, expert_parallel, dp / expert_parallel));
    layout.grad_dp = world->split(0, "grad_dp" + list(0, 1, dp));
    layout.grad_edp = world->split(ep_rank, "grad_edp" + list(ep_rank, expert_parallel, dp / expert_parallel));
    layout.pp = make_single();
    layout.tie = make_single();
    layout.world = std::move(world);
    layout.dp = layout.world;
    return layout;
  }
  // Every split is collective over the world: each rank passes the color of the group it joins.
  layout.dp = world->split(stage, "dp" + list(base, 1, dp));
  layout.ep = world->split(stage * dp + group, "ep" + list(base + group * expert_parallel, 1, expert_parallel));
  layout.edp = world->split(stage * dp + ep_rank, "edp" + list(base + ep_rank, expert_parallel, dp / expert_parallel));
  layout.pp = world->split(d, "pp" + list(d, dp, pp));
  layout.grad_dp = world->split(stage, "grad_dp" + list(base, 1, dp));
  layout.grad_edp =
      world->split(stage * dp + ep_rank, "grad_edp" + list(base + ep_rank, expert_parallel, dp / expert_parallel));
  const bool end = stage == 0 || stage == pp - 1;
  auto tie = world->split(end ? d : dp + r, "tie[" + std::to_string(d) + "," + std::to_string((pp - 1) * dp + d) + "]");
  layout.tie = end ? std::move(tie) : make_single();
  layout.world = std::move(world);
  return layout;
}

}  // namespace moetrain::dist
