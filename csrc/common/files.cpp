// POSIX implementations of the file-system helpers (see files.h for why not std::filesystem).
#include "common/files.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/errors.h"

namespace moetrain::files {

namespace {
[[noreturn]] void fail(const std::string& what, const std::string& path) {
  throw Error("[io] cannot " + what + " '" + path + "': " + std::strerror(errno));
}
}  // namespace

std::string join(const std::string& a, const std::string& b) {
  if (a.empty()) return b;
  if (!b.empty() && b.front() == '/') return b;
  return a.back() == '/' ? a + b : a + "/" + b;
}

std::string parent(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const auto slash = p.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

std::optional<uint64_t> file_size(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) return std::nullopt;
  return uint64_t(st.st_size);
}

namespace {
std::string kind_of_mode(mode_t mode) {
  if (S_ISREG(mode)) return "a regular file";
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}
}  // namespace

std::string kind(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return "missing";
  return kind_of_mode(st.st_mode);
}

int try_open_regular(const std::string& path, std::string& why) {
  // O_NONBLOCK: opening a FIFO must not wait for a writer; the descriptor is checked before any read.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int saved = errno;
    struct stat st;
    if (::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode))  // a socket cannot even be opened
      why = "cannot read '" + path + "': it is " + kind_of_mode(st.st_mode) + ", not a regular file";
    else
      why = "cannot read '" + path + "': " + std::strerror(saved);
    return -1;
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    why = "cannot stat '" + path + "': " + std::strerror(errno);
    ::close(fd);
    return -1;
  }
  if (!S_ISREG(st.st_mode)) {
    why = "cannot read '" + path + "': it is " + kind_of_mode(st.st_mode) + ", not a regular file";
    ::close(fd);
    return -1;
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    why = "cannot read '" + path + "': " + std::strerror(errno);
    ::close(fd);
    return -1;
  }
  return fd;
}

void make_directories(const std::string& path) {
  if (path.empty() || is_directory(path)) return;
  const std::string up = parent(path);
  if (up != path && up != "." && up != "/") make_directories(up);
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) fail("create folder", path);
  if (!is_directory(path)) {
    errno = ENOTDIR;
    fail("create folder", path);
  }
}

void remove_tree(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return;
  if (!S_ISDIR(st.st_mode)) {
    if (::unlink(path.c_str()) != 0) fail("remove", path);
    return;
  }
  auto remove_one = [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); };
  if (::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0) fail("remove", path);
}

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) fail("rename '" + from + "' to", to);
}

std::vector<std::string> list_directory(const std::string& path) {
  DIR* dir = ::opendir(path.c_str());
  if (!dir) fail("list", path);
  std::vector<std::string> names;
  while (struct dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::string read_file(const std::string& path, uint64_t max_bytes) {
  std::string why;
  const int fd = try_open_regular(path, why);
  if (fd < 0) throw Error("[io] " + why);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    fail("read", path);
  }
  if (uint64_t(st.st_size) > max_bytes) {
    ::close(fd);
    throw Error("[io] cannot read '" + path + "': it holds " + std::to_string(st.st_size) + " bytes, more than the " +
                std::to_string(max_bytes) + " such a file may have");
  }
  std::string content;
  content.reserve(size_t(st.st_size));
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int saved = errno;
      ::close(fd);
      errno = saved;
      fail("read", path);
    }
    if (n == 0) break;
    content.append(buf, size_t(n));
    if (content.size() > max_bytes) {  // it grew while being read
      ::close(fd);
      throw Error("[io] cannot read '" + path + "': it grew past " + std::to_string(max_bytes) + " bytes while read");
    }
  }
  ::close(fd);
  return content;
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const auto* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t put = ::write(fd, p, n);
    if (put < 0 && errno == EINTR) continue;
    if (put < 0) fail("write", path);
    if (put == 0) {
      errno = ENOSPC;
      fail("write", path);
    }
    p += put;
    n -= size_t(put);
  }
}

void write_file_synced(const std::string& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("create", path);
  try {
    write_all(fd, content.data(), content.size(), path);
  } catch (...) {
    ::close(fd);
    throw;
  }
  if (::fsync(fd) != 0) {
    const int saved = errno;
    ::close(fd);
    errno = saved;
    fail("sync", path);
  }
  if (::close(fd) != 0) fail("close", path);
}

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  write_file_synced(tmp, content);
  rename_path(tmp, path);
  fsync_path(parent(path), true);
}

void fsync_path(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) fail("open", path);
  const int rc = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  errno = saved;
  if (rc != 0) fail("sync", path);
}

std::string make_temp_directory(const std::string& tag) {
  const char* base = std::getenv("TMPDIR");
  std::string pattern = join(base && *base ? base : "/tmp", "moetrain-" + tag + "-XXXXXX");
  if (!::mkdtemp(pattern.data())) fail("create a temporary folder like", pattern);
  return pattern;
}

}  // namespace moetrain::files
