// A plain fuzz driver for machines without libFuzzer (the gcc build and CI): replays the seed corpus,
// then feeds LLVMFuzzerTestOneInput deterministic mutations of the seeds (bit flips, interesting
// bytes and integers, truncations, insertions, splices, dictionary tokens) until a count or a time
// limit. No coverage feedback: it is a bounded smoke test; scripts/fuzz.sh runs the real libFuzzer.
// A crash, abort or hang (--timeout seconds for one input) writes the input to crash-<target>-<n>.
//
//   fuzz_<target> [--runs N] [--seconds S] [--seed X] [--timeout S] [--dict FILE] [--max-len N]
//                 [SEED_FILE_OR_DIR ...]
// --runs 0 replays the seeds only (a saved crash input); --seconds 0 sets no time limit.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

using Bytes = std::vector<uint8_t>;

// The input being run, for the signal handler to save.
const Bytes* g_current = nullptr;
uint64_t g_current_index = 0;
char g_target[256] = "fuzz";

void write_str(const char* s) { (void)!::write(2, s, std::strlen(s)); }

// Async-signal-safe: saves the current input as crash-<target>-<index> and dies with the signal.
void on_fatal_signal(int sig) {
  char name[512];
  std::snprintf(name, sizeof name, "crash-%s-%llu", g_target, (unsigned long long)g_current_index);
  write_str(sig == SIGALRM ? "\n[fuzz] FINDING: input timed out (hang)\n" : "\n[fuzz] FINDING: fatal signal\n");
  if (g_current) {
    int fd = ::open(name, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      if (!g_current->empty()) (void)!::write(fd, g_current->data(), g_current->size());
      ::close(fd);
      write_str("[fuzz] the input is saved in ");
      write_str(name);
      write_str(" (replay: this binary with --runs 0 and that file)\n");
    }
  }
  ::signal(sig == SIGALRM ? SIGABRT : sig, SIG_DFL);
  ::raise(sig == SIGALRM ? SIGABRT : sig);
}

bool read_file(const std::string& path, Bytes& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::ostringstream s;
  s << in.rdbuf();
  const std::string text = s.str();
  out.assign(text.begin(), text.end());
  return true;
}

// Seeds from files and folders (one level; sorted, so runs are reproducible).
void add_seeds(const std::string& path, std::vector<Bytes>& seeds) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    std::fprintf(stderr, "[fuzz] no such seed file or folder: %s\n", path.c_str());
    std::exit(2);
  }
  if (!S_ISDIR(st.st_mode)) {
    Bytes b;
    if (!read_file(path, b)) {
      std::fprintf(stderr, "[fuzz] cannot read %s\n", path.c_str());
      std::exit(2);
    }
    seeds.push_back(std::move(b));
    return;
  }
  std::vector<std::string> names;
  if (DIR* d = ::opendir(path.c_str())) {
    while (dirent* e = ::readdir(d))
      if (e->d_name[0] != '.') names.push_back(e->d_name);
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  for (const auto& n : names) add_seeds(path + "/" + n, seeds);
}

// libFuzzer's dictionary format: one "token" per line (optionally name="token"), with \\, \" and \xNN.
std::vector<Bytes> read_dict(const std::string& path) {
  std::ifstream in(path);
  if (!in) {
    std::fprintf(stderr, "[fuzz] cannot read dictionary %s\n", path.c_str());
    std::exit(2);
  }
  std::vector<Bytes> tokens;
  std::string line;
  while (std::getline(in, line)) {
    const size_t open = line.find('"'), close = line.rfind('"');
    if (line.empty() || line[0] == '#' || open == std::string::npos || close <= open) continue;
    Bytes token;
    for (size_t i = open + 1; i < close; ++i) {
      if (line[i] == '\\' && i + 1 < close) {
        if (line[i + 1] == 'x' && i + 3 < close) {
          token.push_back(uint8_t(std::stoi(line.substr(i + 2, 2), nullptr, 16)));
          i += 3;
        } else {
          token.push_back(uint8_t(line[++i]));
        }
      } else {
        token.push_back(uint8_t(line[i]));
      }
    }
    if (!token.empty()) tokens.push_back(std::move(token));
  }
  return tokens;
}

class Mutator {
 public:
  Mutator(uint64_t seed, const std::vector<Bytes>& seeds, const std::vector<Bytes>& dict, size_t max_len)
      : rng_(seed), seeds_(seeds), dict_(dict), max_len_(max_len) {}

  Bytes next() {
    Bytes b = seeds_.empty() ? Bytes{} : seeds_[below(seeds_.size())];
    const int n_mutations = 1 + int(below(4));
    for (int i = 0; i < n_mutations; ++i) mutate(b);
    if (b.size() > max_len_) b.resize(max_len_);
    return b;
  }

 private:
  uint64_t below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  void mutate(Bytes& b) {
    static constexpr uint8_t kBytes[] = {0, 1, 0x7f, 0x80, 0xff, '0', '9', '-', ' ', '"', '{', '[', ':', '\n'};
    static constexpr uint64_t kIntegers[] = {0,           1,           2,          0x7f,       0x80,
                                             0xff,        0x100,       0x7fff,     0x8000,     0xffff,
                                             0x10000,     0x7fffffff,  0x80000000, 0xffffffff, 0x100000000ull,
                                             INT64_MAX,   uint64_t(INT64_MIN),     UINT64_MAX, UINT64_MAX - 7};
    switch (below(b.empty() ? 3 : 13)) {
      case 0:  // insert random bytes
      case 1: {
        const size_t at = below(b.size() + 1), n = 1 + below(8);
        Bytes ins(n);
        for (auto& x : ins) x = uint8_t(rng_());
        b.insert(b.begin() + at, ins.begin(), ins.end());
        break;
      }
      case 2:  // insert a dictionary token (or an interesting byte)
        if (!dict_.empty()) {
          const Bytes& t = dict_[below(dict_.size())];
          b.insert(b.begin() + below(b.size() + 1), t.begin(), t.end());
        } else {
          b.insert(b.begin() + below(b.size() + 1), kBytes[below(std::size(kBytes))]);
        }
        break;
      case 3: b[below(b.size())] ^= uint8_t(1u << below(8)); break;  // flip a bit
      case 4: b[below(b.size())] = kBytes[below(std::size(kBytes))]; break;
      case 5: b[below(b.size())] += uint8_t(int(below(33)) - 16); break;
      case 6: {  // an interesting little-endian integer of 1, 2, 4 or 8 bytes
        const size_t width = size_t(1) << below(4);
        if (b.size() < width) break;
        uint64_t v = kIntegers[below(std::size(kIntegers))];
        if (below(4) == 0) v = uint64_t(0) - v;
        std::memcpy(b.data() + below(b.size() - width + 1), &v, width);
        break;
      }
      case 7: b.resize(below(b.size())); break;  // truncate
      case 8: {  // erase a range
        const size_t at = below(b.size()), n = 1 + below(std::min<size_t>(b.size() - at, 16));
        b.erase(b.begin() + at, b.begin() + at + n);
        break;
      }
      case 9: {  // copy a range elsewhere (repeats structure: nested brackets, keys)
        const size_t from = below(b.size()), n = 1 + below(std::min<size_t>(b.size() - from, 32));
        const Bytes chunk(b.begin() + from, b.begin() + from + n);
        b.insert(b.begin() + below(b.size() + 1), chunk.begin(), chunk.end());
        break;
      }
      case 11:
      case 12: {  // replace a word or number (a JSON or YAML value, a key) by a dictionary token
        if (dict_.empty()) break;
        auto word = [](uint8_t c) { return std::isalnum(c) || c == '_' || c == '.' || c == '-' || c == '+'; };
        size_t lo = below(b.size()), hi = lo;
        while (lo > 0 && word(b[lo - 1])) --lo;
        while (hi < b.size() && word(b[hi])) ++hi;
        if (lo > 0 && hi < b.size() && b[lo - 1] == '"' && b[hi] == '"' && below(2)) --lo, ++hi;  // the quotes too
        const Bytes& t = dict_[below(dict_.size())];
        b.erase(b.begin() + lo, b.begin() + hi);
        b.insert(b.begin() + lo, t.begin(), t.end());
        break;
      }
      default: {  // splice: this input's head, another seed's tail
        if (seeds_.empty()) break;
        const Bytes& other = seeds_[below(seeds_.size())];
        const size_t head = below(b.size() + 1), tail_from = below(other.size() + 1);
        b.resize(head);
        b.insert(b.end(), other.begin() + tail_from, other.end());
        break;
      }
    }
  }

  std::mt19937_64 rng_;
  const std::vector<Bytes>& seeds_;
  const std::vector<Bytes>& dict_;
  size_t max_len_;
};

[[noreturn]] void usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s [--runs N] [--seconds S] [--seed X] [--timeout S] [--dict FILE] [--max-len N] "
               "[SEED_FILE_OR_DIR ...]\n  runs the seeds, then N mutations (default 20000) or S seconds "
               "(default 5), whichever ends first; --runs 0 replays the seeds only, --seconds 0 sets no time limit\n",
               argv0);
  std::exit(2);
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t runs = 20000, seed = 1;
  double seconds = 5;
  unsigned timeout_s = 10;
  size_t max_len = 1 << 16;
  std::vector<Bytes> seeds, dict;
  const char* base = std::strrchr(argv[0], '/');
  std::snprintf(g_target, sizeof g_target, "%s", base ? base + 1 : argv[0]);
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(argv[0]);
      return argv[++i];
    };
    try {
      if (arg == "--runs") runs = std::stoull(value());
      else if (arg == "--seconds") seconds = std::stod(value());
      else if (arg == "--seed") seed = std::stoull(value());
      else if (arg == "--timeout") timeout_s = unsigned(std::stoul(value()));
      else if (arg == "--max-len") max_len = std::stoull(value());
      else if (arg == "--dict") dict = read_dict(value());
      else if (arg.rfind("--", 0) == 0) usage(argv[0]);
      else add_seeds(arg, seeds);
    } catch (const std::logic_error&) {
      usage(argv[0]);
    }
  }
  for (int sig : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGALRM}) ::signal(sig, on_fatal_signal);

  auto run_one = [&](const Bytes& input) {
    g_current = &input;
    ::alarm(timeout_s);
    LLVMFuzzerTestOneInput(input.data(), input.size());
    ::alarm(0);
    g_current = nullptr;
    ++g_current_index;
  };

  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  for (const auto& s : seeds) run_one(s);
  Mutator mutator(seed, seeds, dict, max_len);
  uint64_t mutations = 0;
  while (mutations < runs && (seconds <= 0 || elapsed() < seconds)) {
    run_one(mutator.next());
    ++mutations;
    if (mutations % 1000000 == 0)
      std::fprintf(stderr, "[fuzz] %s: %llu executions, %.0f s\n", g_target, (unsigned long long)g_current_index,
                   elapsed());
  }
  std::printf("[fuzz] %s: %llu executions (%zu seeds + %llu mutations, seed %llu) in %.1f s, 0 findings\n", g_target,
              (unsigned long long)g_current_index, seeds.size(), (unsigned long long)mutations,
              (unsigned long long)seed, elapsed());
  return 0;
}
