// File-system helpers on POSIX calls. The torch wheel's libtorch exports its own build of
// std::filesystem, which takes precedence over libstdc++'s at run time and crashes in some calls
// (remove_all seen), so moetrain code never calls std::filesystem and uses these instead.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace moetrain::files {

std::string join(const std::string& a, const std::string& b);  // "a/b"
std::string parent(const std::string& path);                   // "a/b/c" -> "a/b"; "c" -> "."
bool exists(const std::string& path);
bool is_directory(const std::string& path);
std::optional<uint64_t> file_size(const std::string& path);    // nullopt if absent or not a file
// What a path is, in words for an error: "a regular file", "a directory", "a FIFO", "a socket",
// "a character device" ("/dev/zero"), "a block device", or "missing" (links are followed).
std::string kind(const std::string& path);
// Opens a regular file read-only without ever blocking: the open does not wait for a FIFO's writer,
// and a FIFO, socket, device or folder is refused before a byte is read. Returns the descriptor
// (O_CLOEXEC, blocking reads), or -1 with `why` set to one line naming the path and what it is
// ("cannot read 'p': it is a FIFO, not a regular file").
int try_open_regular(const std::string& path, std::string& why);
// The same, throwing E(why) (E names the component: DataError, CheckpointError, ...).
template <class E>
int open_regular(const std::string& path) {
  std::string why;
  const int fd = try_open_regular(path, why);
  if (fd < 0) throw E(why);
  return fd;
}

// Each throws moetrain::Error ("[io] ...") naming the path and the system's reason.
void make_directories(const std::string& path);
void remove_tree(const std::string& path);  // no error if absent
void rename_path(const std::string& from, const std::string& to);
std::vector<std::string> list_directory(const std::string& path);  // entry names, sorted
// Reads a whole regular file of at most max_bytes: a directory, device, pipe or larger file (a config
// pointed at /dev/zero, a `latest` linked to /dev/urandom) is an error naming it, never a huge allocation.
constexpr uint64_t kMaxReadBytes = uint64_t(64) << 20;
std::string read_file(const std::string& path, uint64_t max_bytes = kMaxReadBytes);
// Writes all n bytes to an open descriptor, retrying short writes and EINTR; `path` names it in errors.
void write_all(int fd, const void* data, size_t n, const std::string& path);
// Writes `content` to `path` (truncating) and fsyncs it.
void write_file_synced(const std::string& path, const std::string& content);
// Writes `content` next to `path` under a temporary name, fsyncs, renames over `path`, fsyncs the folder.
void write_file_atomic(const std::string& path, const std::string& content);
void fsync_path(const std::string& path, bool directory);
std::string make_temp_directory(const std::string& tag);  // a new folder under $TMPDIR or /tmp

}  // namespace moetrain::files
