// Token shards and their loss masks: writing (smallest token width that holds the vocabulary, temp
// name + rename so a reader never sees half a file), reading with pread (checked once at open), and
// prepare_text for plain-text corpora.
#include "data/shard.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <tuple>
#include <sstream>

#include "common/errors.h"
#include "common/files.h"
#include "data/tokenizer.h"

namespace moetrain::data {
namespace {

static_assert(std::endian::native == std::endian::little, "shard I/O assumes a little-endian host");

constexpr char kMagic[8] = {'M', 'O', 'E', 'T', 'O', 'K', 'S', '\0'};
constexpr size_t kHeaderBytes = 32;
constexpr int32_t kLlmcGpt2Magic = 20240520, kLlmcLlama3Magic = 20240801;
constexpr uint64_t kLlmcHeaderBytes = 256 * 4;
constexpr char kMegatronMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kMegatronHeaderBytes = 9 + 8 + 1 + 8 + 8;
constexpr char kDocsMagic[8] = {'M', 'O', 'E', 'D', 'O', 'C', 'S', '\0'};
constexpr uint64_t kDocsHeaderBytes = 16;  // the magic and the document count
constexpr char kMaskMagic[8] = {'M', 'O', 'E', 'M', 'A', 'S', 'K', '\0'};
constexpr size_t kMaskHeaderBytes = 64;
constexpr size_t kMaskNameOffset = 24, kMaskNameBytes = kMaskHeaderBytes - kMaskNameOffset;

std::string errno_text() { return std::strerror(errno); }

std::string base_name(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// Writes header + body to path through a temporary name, fsynced, then renamed into place.
void write_atomically(const std::string& path, const uint8_t* header, size_t header_bytes,
                      const std::function<void(int fd, const std::string& tmp_path)>& write_body) {
  const std::string tmp_path = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw DataError("cannot create " + tmp_path + ": " + errno_text());
  try {
    files::write_all(fd, header, header_bytes, tmp_path);
    write_body(fd, tmp_path);
    if (::fsync(fd) != 0) throw DataError("cannot fsync " + tmp_path + ": " + errno_text());
    const int to_close = fd;
    fd = -1;
    if (::close(to_close) != 0) throw DataError("cannot close " + tmp_path + ": " + errno_text());
    if (::rename(tmp_path.c_str(), path.c_str()) != 0) {
      throw DataError("cannot rename " + tmp_path + " to " + path + ": " + errno_text());
    }
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp_path.c_str());
    throw;
  }
}

// Opens a regular file read-only and returns (descriptor, size); `what` names it in errors ("shard",
// "mask"). A folder, a FIFO or a device is refused here, before any byte is read.
std::pair<int, uint64_t> open_file(const std::string& path, const std::string& what, uint64_t min_bytes) {
  std::string why;
  const int fd = files::try_open_regular(path, why);
  if (fd < 0)
    throw DataError(why + " (expected a " + what + " file" +
                    (what == "shard" ? ": a token shard is a .bin file written by moetrain prepare-data)" : ")"));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const std::string err = errno_text();
    ::close(fd);
    throw DataError("cannot stat " + what + " " + path + ": " + err);
  }
  const uint64_t file_size = uint64_t(st.st_size);
  if (file_size < min_bytes) {
    ::close(fd);
    throw DataError(path + ": " + std::to_string(file_size) + " bytes, shorter than the " + std::to_string(min_bytes) +
                    "-byte " + what + " header");
  }
  return {fd, file_size};
}

// Reads exactly n bytes at offset; returns how many it got (fewer only at the end of the file).
uint64_t pread_full(int fd, void* out, uint64_t n, uint64_t offset, const std::string& path) {
  uint64_t done = 0;
  while (done < n) {
    const ssize_t got = ::pread(fd, static_cast<uint8_t*>(out) + done, n - done, off_t(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) throw DataError("cannot read " + path + ": " + errno_text());
    if (got == 0) break;
    done += uint64_t(got);
  }
  return done;
}

// The file no longer holds what its header promised: it changed under the run.
[[noreturn]] void throw_shrunk(const std::string& path, uint64_t offset, uint64_t wanted, uint64_t got,
                               uint64_t expected_size) {
  throw DataError(path + ": the file ends at byte " + std::to_string(offset + got) + " but its header promised " +
                  std::to_string(expected_size) + " bytes (read of " + std::to_string(wanted) + " bytes at " +
                  std::to_string(offset) + "): it was truncated or rewritten while this run read it; restore it and "
                  "resume from the last checkpoint");
}

// A Megatron .idx, open, with its fixed header read (kMegatronHeaderBytes); closed with the object.
struct IndexFile {
  int fd = -1;
  uint64_t size = 0;
  uint8_t header[kMegatronHeaderBytes] = {};
  explicit IndexFile(const std::string& idx) {
    std::tie(fd, size) = open_file(idx, "Megatron index", kMegatronHeaderBytes);
    if (pread_full(fd, header, kMegatronHeaderBytes, 0, idx) != kMegatronHeaderBytes) {
      ::close(fd);
      throw_shrunk(idx, 0, kMegatronHeaderBytes, 0, size);
    }
  }
  ~IndexFile() { ::close(fd); }
  IndexFile(const IndexFile&) = delete;
  IndexFile& operator=(const IndexFile&) = delete;
};

// Chunks of the once-at-open scans: big enough to stream, small enough to stay in cache.
constexpr uint64_t kScanChunkBytes = uint64_t(1) << 20;

// The largest of n little-endian tokens of width T in `bytes`: a loop the compiler vectorises.
template <typename T>
uint32_t max_token(const uint8_t* bytes, uint64_t n) {
  T best = 0;
  for (uint64_t i = 0; i < n; ++i) {
    T v;
    std::memcpy(&v, bytes + i * sizeof(T), sizeof(T));
    best = v > best ? v : best;
  }
  return best;
}

uint32_t token_at(const uint8_t* bytes, uint64_t i, int width) {
  uint32_t v = 0;
  std::memcpy(&v, bytes + i * uint64_t(width), size_t(width));  // little-endian: low bytes first
  return v;
}

int bytes_for_vocab(uint64_t vocab_size) {
  if (vocab_size <= (uint64_t(1) << 8)) return 1;
  if (vocab_size <= (uint64_t(1) << 16)) return 2;
  return 4;
}

// The largest text file prepare-data reads whole (it holds one in memory, as bytes and as tokens).
constexpr uint64_t kMaxTextBytes = uint64_t(64) << 30;

}  // namespace

void write_shard(const std::string& path, const std::vector<int64_t>& tokens, uint64_t vocab_size,
                 const std::vector<uint64_t>& document_starts) {
  for (size_t i = 0; i < document_starts.size(); ++i) {
    const uint64_t at = document_starts[i];
    if ((i == 0 && at != 0) || (i > 0 && at <= document_starts[i - 1]) || at >= tokens.size())
      throw DataError(path + ": document " + std::to_string(i) + " starts at token " + std::to_string(at) +
                      "; documents must start at 0, then at increasing offsets below the token count " +
                      std::to_string(tokens.size()));
  }
  if (vocab_size == 0 || vocab_size > (uint64_t(1) << 32)) {
    throw DataError(path + ": vocab_size " + std::to_string(vocab_size) + " must be in [1, 2^32]");
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || uint64_t(tokens[i]) >= vocab_size) {
      throw DataError(path + ": token " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                      " is outside the vocabulary [0, " + std::to_string(vocab_size) + ")");
    }
  }
  const int bytes = bytes_for_vocab(vocab_size);
  uint8_t header[kHeaderBytes] = {};
  const uint32_t version = document_starts.empty() ? kShardVersion : kShardVersionDocuments,
                 dtype_code = uint32_t(bytes);
  const uint64_t count = tokens.size();
  std::memcpy(header, kMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &dtype_code, 4);
  std::memcpy(header + 16, &count, 8);
  std::memcpy(header + 24, &vocab_size, 8);

  // Narrow the tokens a chunk at a time: a big corpus should not need a second full copy.
  write_atomically(path, header, kHeaderBytes, [&](int fd, const std::string& tmp_path) {
    std::vector<uint8_t> chunk;
    constexpr size_t kChunkTokens = size_t(1) << 18;
    for (size_t start = 0; start < tokens.size(); start += kChunkTokens) {
      const size_t n = std::min(kChunkTokens, tokens.size() - start);
      chunk.resize(n * bytes);
      for (size_t i = 0; i < n; ++i) {
        const uint32_t token = uint32_t(tokens[start + i]);
        std::memcpy(chunk.data() + i * bytes, &token, bytes);  // little-endian: low bytes first
      }
      files::write_all(fd, chunk.data(), chunk.size(), tmp_path);
    }
    if (document_starts.empty()) return;
    uint8_t table[kDocsHeaderBytes];
    const uint64_t n_documents = document_starts.size();
    std::memcpy(table, kDocsMagic, 8);
    std::memcpy(table + 8, &n_documents, 8);
    files::write_all(fd, table, kDocsHeaderBytes, tmp_path);
    files::write_all(fd, document_starts.data(), 8 * document_starts.size(), tmp_path);
  });
}

std::string mask_path_for(const std::string& shard_path) {
  const std::string ext = ".bin";
  if (shard_path.size() > ext.size() && shard_path.compare(shard_path.size() - ext.size(), ext.size(), ext) == 0)
    return shard_path.substr(0, shard_path.size() - ext.size()) + ".mask.bin";
  return shard_path + ".mask.bin";
}

void write_mask(const std::string& shard_path, const std::vector<uint8_t>& learned) {
  const std::string path = mask_path_for(shard_path), name = base_name(shard_path);
  if (name.empty() || name.size() >= kMaskNameBytes) {
    throw DataError(path + ": shard file name '" + name + "' must be 1 to " + std::to_string(kMaskNameBytes - 1) +
                    " bytes long to fit the mask header");
  }
  for (size_t i = 0; i < learned.size(); ++i) {
    if (learned[i] > 1) {
      throw DataError(path + ": mask entry " + std::to_string(int(learned[i])) + " at index " + std::to_string(i) +
                      " must be 0 or 1");
    }
  }
  uint8_t header[kMaskHeaderBytes] = {};
  const uint32_t version = kMaskVersion;
  const uint64_t count = learned.size();
  std::memcpy(header, kMaskMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 16, &count, 8);
  std::memcpy(header + kMaskNameOffset, name.data(), name.size());
  write_atomically(path, header, kMaskHeaderBytes, [&](int fd, const std::string& tmp_path) {
    files::write_all(fd, learned.data(), learned.size(), tmp_path);
  });
}

const char* format_name(ShardFormat format) {
  switch (format) {
    case ShardFormat::llmc: return "llm.c";
    case ShardFormat::megatron: return "megatron";
    default: return "moetrain";
  }
}

Shard::Shard(const std::string& path, ShardOptions options)
    : path_(path), mask_path_(mask_path_for(path)), options_(options) {
  // A Megatron .bin has no header of its own: its .idx beside it says what it is.
  const std::string ext = ".bin";
  if (path.size() > ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0 &&
      files::exists(path.substr(0, path.size() - ext.size()) + ".idx")) {
    format_ = ShardFormat::megatron;
    index_path_ = path.substr(0, path.size() - ext.size()) + ".idx";
  }
  uint64_t file_size = 0;
  std::tie(fd_, file_size) = open_file(path, "shard", format_ == ShardFormat::megatron ? 0 : kHeaderBytes);
  try {
    if (format_ == ShardFormat::megatron) {
      open_megatron(file_size);
    } else {
      uint8_t magic[8];
      if (pread_full(fd_, magic, 8, 0, path) != 8) throw_shrunk(path, 0, 8, 0, file_size);
      int32_t llmc_magic = 0;
      std::memcpy(&llmc_magic, magic, 4);
      if (llmc_magic == kLlmcGpt2Magic || llmc_magic == kLlmcLlama3Magic) {
        format_ = ShardFormat::llmc;
        open_llmc(file_size);
      } else {
        open_moetrain(file_size);
      }
    }
    if (!vocab_in_header()) {  // the dtype's range, narrowed to the model's vocabulary when given
      const uint64_t dtype_bound = bytes_ == 4 ? (uint64_t(1) << 31) : (uint64_t(1) << (8 * bytes_));
      vocab_ = options_.vocab_bound > 0 ? std::min(dtype_bound, options_.vocab_bound) : dtype_bound;
    }
    if (options_.scan) {
      const uint64_t largest = scan_tokens();
      if (!vocab_in_header()) vocab_ = count_ > 0 ? largest + 1 : 0;  // the bound the data shows
      scanned_ = true;
    }
    learned_ = count_;
    if (files::exists(mask_path_)) load_mask();
  } catch (...) {
    close_files();
    throw;
  }
}

void Shard::open_moetrain(uint64_t file_size) {
  const std::string& path = path_;
  uint8_t header[kHeaderBytes];
  if (pread_full(fd_, header, kHeaderBytes, 0, path) != kHeaderBytes) throw_shrunk(path, 0, kHeaderBytes, 0, file_size);
  if (std::memcmp(header, kMagic, 8) != 0) {
    throw DataError(path + ": bad magic (bytes 0..7): not a MOETOKS token shard, nor an llm.c shard (int32 magic "
                    "20240520 or 20240801), nor a Megatron .bin (no .idx beside it)");
  }
  uint32_t version = 0, dtype_code = 0;
  std::memcpy(&version, header + 8, 4);
  std::memcpy(&dtype_code, header + 12, 4);
  std::memcpy(&count_, header + 16, 8);
  std::memcpy(&vocab_, header + 24, 8);
  if (version != kShardVersion && version != kShardVersionDocuments) {
    throw DataError(path + ": header field 'version' is " + std::to_string(version) + ", expected " +
                    std::to_string(kShardVersion) + " (tokens) or " + std::to_string(kShardVersionDocuments) +
                    " (tokens and document boundaries)");
  }
  if (dtype_code != 1 && dtype_code != 2 && dtype_code != 4) {
    throw DataError(path + ": header field 'dtype' is " + std::to_string(dtype_code) +
                    ", expected 1 (uint8), 2 (uint16) or 4 (uint32)");
  }
  bytes_ = int(dtype_code);
  data_offset_ = kHeaderBytes;
  uint64_t data_bytes = 0;
  const bool with_documents = version == kShardVersionDocuments;
  const uint64_t after_header = file_size - kHeaderBytes;
  if (__builtin_mul_overflow(count_, uint64_t(bytes_), &data_bytes) ||
      (with_documents ? data_bytes > after_header : data_bytes != after_header)) {
    throw DataError(path + ": header field 'count' says " + std::to_string(count_) + " tokens of " +
                    std::to_string(bytes_) + " bytes but the file holds " + std::to_string(after_header) +
                    " bytes after the header");
  }
  if (vocab_ == 0) throw DataError(path + ": header field 'vocab_size' is 0");
  if (!with_documents) return;
  // The document table after the tokens: its magic and count now, the offsets when asked for.
  const uint64_t table_at = kHeaderBytes + data_bytes;
  uint8_t table[kDocsHeaderBytes];
  if (file_size - table_at < kDocsHeaderBytes || pread_full(fd_, table, kDocsHeaderBytes, table_at, path) != kDocsHeaderBytes)
    throw DataError(path + ": version 2 promises a document table after its " + std::to_string(count_) +
                    " tokens (at byte " + std::to_string(table_at) + "), but the file ends at byte " +
                    std::to_string(file_size));
  if (std::memcmp(table, kDocsMagic, 8) != 0)
    throw DataError(path + ": bad document-table magic at byte " + std::to_string(table_at) +
                    ": expected \"MOEDOCS\" after the tokens of a version-2 shard");
  std::memcpy(&documents_, table + 8, 8);
  documents_at_ = table_at + kDocsHeaderBytes;
  const uint64_t left = file_size - documents_at_;
  if (documents_ == 0 || documents_ > count_ || left != 8 * documents_)
    throw DataError(path + ": the document table says " + std::to_string(documents_) + " documents, but " +
                    std::to_string(left) + " bytes follow it (8 per document) for " + std::to_string(count_) +
                    " tokens (expected 1 to that many documents)");
}

std::vector<uint64_t> Shard::document_starts() const {
  if (format_ == ShardFormat::megatron) return megatron_document_starts();
  if (documents_ == 0)
    throw DataError(path_ + " marks no document boundaries (" +
                    (format_ == ShardFormat::llmc ? std::string("an llm.c shard keeps none")
                                                  : std::string("a version-1 shard")) +
                    "): data.packing: documents needs them; write the data again with scripts/prepare_data.py from "
                    "a .jsonl, or with moetrain prepare-data");
  std::vector<uint64_t> starts(documents_);
  const uint64_t want = 8 * documents_;
  const uint64_t got = pread_full(fd_, starts.data(), want, documents_at_, path_);
  if (got != want) throw_shrunk(path_, documents_at_, want, got, documents_at_ + want);
  for (uint64_t i = 0; i < starts.size(); ++i)
    if ((i == 0 && starts[i] != 0) || (i > 0 && starts[i] <= starts[i - 1]) || starts[i] >= count_)
      throw DataError(path_ + ": document " + std::to_string(i) + " starts at token " + std::to_string(starts[i]) +
                      " (the table must start at 0 and increase below the token count " + std::to_string(count_) +
                      "): the document table is damaged");
  return starts;
}

// Every sequence's size and each document's first sequence: token offsets of the documents. Empty
// documents (a document index repeated, or sequences of no tokens) are left out.
std::vector<uint64_t> Shard::megatron_document_starts() const {
  const std::string& idx = index_path_;
  const IndexFile index(idx);
  const int idx_fd = index.fd;
  const uint64_t idx_size = index.size;
  const uint8_t* header = index.header;
  uint64_t n_sequences = 0, n_doc_indices = 0;
  std::memcpy(&n_sequences, header + 18, 8);
  std::memcpy(&n_doc_indices, header + 26, 8);
  if (n_doc_indices != documents_ + 1)
    throw DataError(idx + ": now holds " + std::to_string(n_doc_indices) + " document indices, " +
                    std::to_string(documents_ + 1) + " when it was opened: it was rewritten while this run read it");
  std::vector<int32_t> sizes(n_sequences);
  std::vector<int64_t> docs(n_doc_indices);
  const uint64_t sizes_at = kMegatronHeaderBytes, docs_at = sizes_at + 12 * n_sequences;
  if (pread_full(idx_fd, sizes.data(), 4 * n_sequences, sizes_at, idx) != 4 * n_sequences ||
      pread_full(idx_fd, docs.data(), 8 * n_doc_indices, docs_at, idx) != 8 * n_doc_indices)
    throw_shrunk(idx, sizes_at, docs_at + 8 * n_doc_indices - sizes_at, 0, idx_size);
  std::vector<uint64_t> sequence_start(n_sequences + 1, 0);
  for (uint64_t i = 0; i < n_sequences; ++i) {
    if (sizes[i] < 0) throw DataError(idx + ": sequence " + std::to_string(i) + " has a negative size");
    sequence_start[i + 1] = sequence_start[i] + uint64_t(sizes[i]);
  }
  if (sequence_start.back() != count_)
    throw DataError(idx + ": its sequences hold " + std::to_string(sequence_start.back()) + " tokens, " + path_ +
                    " holds " + std::to_string(count_));
  std::vector<uint64_t> starts;
  for (uint64_t j = 0; j + 1 < n_doc_indices; ++j) {
    if (docs[j] < 0 || docs[j + 1] < docs[j] || uint64_t(docs[j + 1]) > n_sequences)
      throw DataError(idx + ": document index " + std::to_string(j) + " is " + std::to_string(docs[j]) +
                      ", not a sequence index at or below the next one and the sequence count");
    const uint64_t begin = sequence_start[uint64_t(docs[j])], end = sequence_start[uint64_t(docs[j + 1])];
    if (end > begin) starts.push_back(begin);
  }
  return starts;
}

void Shard::open_llmc(uint64_t file_size) {
  const std::string& path = path_;
  if (file_size < kLlmcHeaderBytes)
    throw DataError(path + ": " + std::to_string(file_size) + " bytes, shorter than the " +
                    std::to_string(kLlmcHeaderBytes) + "-byte llm.c header (256 int32)");
  int32_t header[3];
  if (pread_full(fd_, header, sizeof header, 0, path) != sizeof header) throw_shrunk(path, 0, sizeof header, 0, file_size);
  const bool gpt2 = header[0] == kLlmcGpt2Magic;
  const int32_t want_version = gpt2 ? 1 : 7;
  if (header[1] != want_version)
    throw DataError(path + ": llm.c header field 'version' (int32 1) is " + std::to_string(header[1]) + ", expected " +
                    std::to_string(want_version) + " for magic " + std::to_string(header[0]));
  if (header[2] < 0)
    throw DataError(path + ": llm.c header field 'token count' (int32 2) is " + std::to_string(header[2]) +
                    ", expected >= 0");
  bytes_ = gpt2 ? 2 : 4;
  data_offset_ = kLlmcHeaderBytes;
  count_ = uint64_t(header[2]);
  if (count_ * uint64_t(bytes_) != file_size - kLlmcHeaderBytes)
    throw DataError(path + ": llm.c header field 'token count' says " + std::to_string(count_) + " tokens of " +
                    std::to_string(bytes_) + " bytes but the file holds " +
                    std::to_string(file_size - kLlmcHeaderBytes) + " bytes after the header");
}

// The .idx is checked whole in size and at its ends (first and last pointer, first and last document
// index); with a scan, every pointer and document index too.
void Shard::open_megatron(uint64_t file_size) {
  const std::string& idx = index_path_;
  // Plain variables, not a structured binding: the lambda below captures them, which clang before 16
  // (the fuzz build's) refuses for bindings.
  const IndexFile index(idx);
  const int idx_fd = index.fd;
  const uint64_t idx_size = index.size;
  const uint8_t* header = index.header;
  if (std::memcmp(header, kMegatronMagic, 9) != 0)
    throw DataError(idx + ": bad magic (bytes 0..8): not a Megatron index (\"MMIDIDX\\x00\\x00\"), beside " + path_);
  uint64_t version = 0, n_sequences = 0, n_doc_indices = 0;
  std::memcpy(&version, header + 9, 8);
  const uint8_t dtype_code = header[17];
  std::memcpy(&n_sequences, header + 18, 8);
  std::memcpy(&n_doc_indices, header + 26, 8);
  if (version != 1)
    throw DataError(idx + ": header field 'version' is " + std::to_string(version) + ", expected 1");
  if (dtype_code == 1) bytes_ = 1;
  else if (dtype_code == 8) bytes_ = 2;
  else if (dtype_code == 4) bytes_ = 4;
  else
    throw DataError(idx + ": header field 'dtype' is " + std::to_string(int(dtype_code)) +
                    ", expected 1 (uint8), 8 (uint16) or 4 (int32) for token ids");
  // Sizes (int32) and pointers (int64) per sequence, document indices (int64), optional modes (int8).
  const uint64_t limit = idx_size;  // no count can need more entries than the file has bytes
  if (n_sequences > limit || n_doc_indices > limit)
    throw DataError(idx + ": header counts (" + std::to_string(n_sequences) + " sequences, " +
                    std::to_string(n_doc_indices) + " document indices) exceed the file's " + std::to_string(idx_size) +
                    " bytes");
  const uint64_t sizes_at = kMegatronHeaderBytes, pointers_at = sizes_at + 4 * n_sequences,
                 docs_at = pointers_at + 8 * n_sequences, end = docs_at + 8 * n_doc_indices;
  if (idx_size != end && idx_size != end + n_sequences)
    throw DataError(idx + ": header field 'sequence count' (" + std::to_string(n_sequences) +
                    ") and 'document count' (" + std::to_string(n_doc_indices) + ") need " + std::to_string(end) +
                    " bytes (or " + std::to_string(end + n_sequences) + " with modes) but the file holds " +
                    std::to_string(idx_size));
  if (n_doc_indices < 1)
    throw DataError(idx + ": header field 'document count' is 0, expected at least 1 (the leading 0)");
  if (file_size % uint64_t(bytes_) != 0)
    throw DataError(path_ + ": " + std::to_string(file_size) + " bytes is not a whole number of " +
                    std::to_string(bytes_) + "-byte tokens (dtype of " + idx + ")");
  auto read_at = [&](uint64_t offset, void* out, uint64_t n) {
    if (pread_full(idx_fd, out, n, offset, idx) != n) throw_shrunk(idx, offset, n, 0, idx_size);
  };
  int64_t first_doc = 0, last_doc = 0;
  read_at(docs_at, &first_doc, 8);
  read_at(docs_at + 8 * (n_doc_indices - 1), &last_doc, 8);
  if (first_doc != 0 || uint64_t(last_doc) != n_sequences)
    throw DataError(idx + ": document indices run from " + std::to_string(first_doc) + " to " +
                    std::to_string(last_doc) + ", expected 0 to the sequence count " + std::to_string(n_sequences));
  // The sequences lie back to back from byte 0: pointer[i] = sum of the sizes before i (times the width).
  std::vector<int32_t> sizes;
  std::vector<int64_t> pointers;
  const uint64_t chunk = options_.scan ? (uint64_t(1) << 16) : 1;
  uint64_t expected_pointer = 0;
  for (uint64_t first = 0; first < n_sequences;) {
    // Without a scan only the first and the last sequence are read.
    if (!options_.scan && first > 0 && first < n_sequences - 1) first = n_sequences - 1;
    const uint64_t n = std::min(chunk, n_sequences - first);
    sizes.resize(n);
    pointers.resize(n);
    read_at(sizes_at + 4 * first, sizes.data(), 4 * n);
    read_at(pointers_at + 8 * first, pointers.data(), 8 * n);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t s = first + i;
      if (sizes[i] < 0)
        throw DataError(idx + ": sequence " + std::to_string(s) + " has size " + std::to_string(sizes[i]) +
                        ", expected >= 0");
      if (!options_.scan && s == n_sequences - 1 && s > 0) expected_pointer = uint64_t(pointers[i]);
      if (pointers[i] < 0 || uint64_t(pointers[i]) != expected_pointer)
        throw DataError(idx + ": sequence " + std::to_string(s) + " points at byte " + std::to_string(pointers[i]) +
                        " of " + path_ + ", expected " + std::to_string(expected_pointer) +
                        " (the sequences must lie back to back, as Megatron's writer lays them)");
      expected_pointer += uint64_t(sizes[i]) * uint64_t(bytes_);
    }
    first += n;
  }
  if (expected_pointer != file_size)
    throw DataError(path_ + ": " + std::to_string(file_size) + " bytes, but the sequences of " + idx + " end at byte " +
                    std::to_string(expected_pointer));
  if (options_.scan) {
    std::vector<int64_t> docs;
    int64_t previous = 0;
    for (uint64_t first = 0; first < n_doc_indices; first += chunk) {
      const uint64_t n = std::min(chunk, n_doc_indices - first);
      docs.resize(n);
      read_at(docs_at + 8 * first, docs.data(), 8 * n);
      for (uint64_t i = 0; i < n; ++i) {
        if (docs[i] < previous)
          throw DataError(idx + ": document index " + std::to_string(first + i) + " is " + std::to_string(docs[i]) +
                          ", below the one before it (" + std::to_string(previous) + ")");
        previous = docs[i];
      }
    }
  }
  data_offset_ = 0;
  count_ = file_size / uint64_t(bytes_);
  documents_ = n_doc_indices - 1;
}

// One pass over the tokens at open, so that a token the embedding cannot hold is an error naming its
// position now, not "index out of range" from inside a forward pass hours later. Returns the largest.
uint64_t Shard::scan_tokens() const {
  std::vector<uint8_t> chunk;
  uint64_t overall = 0;
  const uint64_t tokens_per_chunk = kScanChunkBytes / uint64_t(bytes_);
  for (uint64_t first = 0; first < count_; first += tokens_per_chunk) {
    const uint64_t n = std::min(tokens_per_chunk, count_ - first);
    const uint64_t offset = data_offset_ + first * uint64_t(bytes_), want = n * uint64_t(bytes_);
    chunk.resize(want);
    const uint64_t got = pread_full(fd_, chunk.data(), want, offset, path_);
    if (got != want) throw_shrunk(path_, offset, want, got, data_offset_ + count_ * uint64_t(bytes_));
    const uint32_t largest = bytes_ == 1   ? max_token<uint8_t>(chunk.data(), n)
                             : bytes_ == 2 ? max_token<uint16_t>(chunk.data(), n)
                                           : max_token<uint32_t>(chunk.data(), n);
    overall = std::max<uint64_t>(overall, largest);
    if (uint64_t(largest) < vocab_) continue;
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t token = token_at(chunk.data(), i, bytes_);
      if (uint64_t(token) >= vocab_)
        throw DataError(path_ + ": token " + std::to_string(token) + " at position " + std::to_string(first + i) +
                        " is outside " + vocabulary_text() +
                        " (the file is damaged, or was written with a different tokenizer)");
    }
  }
  return overall;
}

void Shard::load_mask() {
  const std::string& m = mask_path_;
  uint64_t mask_size = 0;
  std::tie(mask_fd_, mask_size) = open_file(m, "mask", kMaskHeaderBytes);
  uint8_t header[kMaskHeaderBytes];
  if (pread_full(mask_fd_, header, kMaskHeaderBytes, 0, m) != kMaskHeaderBytes)
    throw_shrunk(m, 0, kMaskHeaderBytes, 0, mask_size);
  if (std::memcmp(header, kMaskMagic, 8) != 0) {
    throw DataError(m + ": bad magic (bytes 0..7): not a MOEMASK loss mask (the mask of shard " + path_ + ")");
  }
  uint32_t version = 0;
  uint64_t count = 0;
  std::memcpy(&version, header + 8, 4);
  std::memcpy(&count, header + 16, 8);
  if (version != kMaskVersion) {
    throw DataError(m + ": header field 'version' is " + std::to_string(version) + ", expected " +
                    std::to_string(kMaskVersion));
  }
  const char* name_field = reinterpret_cast<const char*>(header + kMaskNameOffset);
  const std::string name(name_field, strnlen(name_field, kMaskNameBytes));
  if (name != base_name(path_)) {
    throw DataError(m + ": header field 'shard' names '" + name + "', but the mask sits beside shard " + path_);
  }
  if (count != count_) {
    throw DataError(m + ": the mask covers " + std::to_string(count) + " tokens but shard " + path_ + " holds " +
                    std::to_string(count_));
  }
  if (mask_size - kMaskHeaderBytes != count) {
    throw DataError(m + ": header field 'count' says " + std::to_string(count) + " entries but the file holds " +
                    std::to_string(mask_size - kMaskHeaderBytes) + " bytes after the header (mask of shard " + path_ +
                    ")");
  }
  // One pass: every entry is 0 or 1 (a 2 is not "learned twice", it is damage), and the learned count.
  // Unscanned, read_mask checks the entries it reads instead.
  if (!options_.scan) return;
  std::vector<uint8_t> chunk;
  learned_ = 0;
  for (uint64_t first = 0; first < count; first += kScanChunkBytes) {
    const uint64_t n = std::min(kScanChunkBytes, count - first);
    chunk.resize(n);
    const uint64_t got = pread_full(mask_fd_, chunk.data(), n, kMaskHeaderBytes + first, m);
    if (got != n) throw_shrunk(m, kMaskHeaderBytes + first, n, got, mask_size);
    uint8_t largest = 0;
    uint64_t ones = 0;
    for (uint64_t i = 0; i < n; ++i) {
      largest = chunk[i] > largest ? chunk[i] : largest;
      ones += chunk[i];
    }
    if (largest > 1) {
      const uint64_t i = uint64_t(std::find_if(chunk.begin(), chunk.end(), [](uint8_t b) { return b > 1; }) - chunk.begin());
      throw DataError(m + ": entry " + std::to_string(int(chunk[i])) + " at position " + std::to_string(first + i) +
                      " must be 0 (not learned) or 1 (learned); the mask of shard " + path_ + " is damaged");
    }
    learned_ += ones;
  }
}

void Shard::close_files() {
  if (fd_ >= 0) ::close(fd_);
  if (mask_fd_ >= 0) ::close(mask_fd_);
  fd_ = mask_fd_ = -1;
}

Shard::~Shard() { close_files(); }

int64_t Shard::at(uint64_t i) const {
  int64_t token = 0;
  read(i, 1, &token);
  return token;
}

void Shard::read(uint64_t begin, uint64_t n, int64_t* out) const {
  if (begin > count_ || n > count_ - begin) {
    throw DataError(path_ + ": read of " + std::to_string(n) + " tokens at " + std::to_string(begin) +
                    " is past the end of the shard (" + std::to_string(count_) + " tokens)");
  }
  // The narrow tokens land at the front of `out` (n * bytes_ <= n * 8 bytes) and are widened in place
  // from the last one back: token i's bytes lie below out[i]'s and no earlier token's are overwritten.
  uint8_t* raw = reinterpret_cast<uint8_t*>(out);
  const uint64_t offset = data_offset_ + begin * uint64_t(bytes_), want = n * uint64_t(bytes_);
  const uint64_t got = pread_full(fd_, raw, want, offset, path_);
  if (got != want) throw_shrunk(path_, offset, want, got, data_offset_ + count_ * uint64_t(bytes_));
  for (uint64_t i = n; i-- > 0;) out[i] = int64_t(token_at(raw, i, bytes_));
  // Checked at open (when scanned), so a token out of range now means the file was rewritten in place
  // since; unscanned, this is where damage or a foreign tokenizer shows.
  for (uint64_t i = 0; i < n; ++i)
    if (uint64_t(out[i]) >= vocab_)
      throw DataError(path_ + ": token " + std::to_string(out[i]) + " at position " + std::to_string(begin + i) +
                      " is outside " + vocabulary_text() +
                      (scanned_ ? ": the file was rewritten while this run read it; restore it and resume from the "
                                  "last checkpoint"
                                : " (the file is damaged, or was written with a different tokenizer)"));
}

std::string Shard::vocabulary_text() const {
  const std::string range = "[0, " + std::to_string(vocab_) + ")";
  if (vocab_in_header()) return "the header's vocabulary " + range;
  if (scanned_) return "the vocabulary its scan found " + range;
  if (options_.vocab_bound > 0 && vocab_ == options_.vocab_bound) return "the vocabulary " + range + " (model.vocab_size)";
  return "the token dtype's range " + range;
}

void Shard::read_mask(uint64_t begin, uint64_t n, uint8_t* out) const {
  if (begin > count_ || n > count_ - begin) {
    throw DataError(mask_path_ + ": read of " + std::to_string(n) + " mask entries at " + std::to_string(begin) +
                    " is past the end of the shard (" + std::to_string(count_) + " tokens)");
  }
  if (mask_fd_ < 0) {
    std::fill_n(out, n, uint8_t(1));  // not memset: out may be null when n is 0
    return;
  }
  const uint64_t got = pread_full(mask_fd_, out, n, kMaskHeaderBytes + begin, mask_path_);
  if (got != n) throw_shrunk(mask_path_, kMaskHeaderBytes + begin, n, got, kMaskHeaderBytes + count_);
  if (scanned_) return;  // every entry was checked at open
  for (uint64_t i = 0; i < n; ++i)
    if (out[i] > 1)
      throw DataError(mask_path_ + ": entry " + std::to_string(int(out[i])) + " at position " +
                      std::to_string(begin + i) + " must be 0 (not learned) or 1 (learned); the mask of shard " +
                      path_ + " is damaged");
}

void require_vocabulary(const Shard& shard, int64_t model_vocab_size) {
  if (!shard.vocab_in_header()) {  // a foreign format: the scan's bound, or each read checks instead
    if (shard.scanned() && shard.vocab_size() > uint64_t(model_vocab_size))
      throw DataError(shard.path() + " (" + format_name(shard.format()) + ") holds token " +
                      std::to_string(shard.vocab_size() - 1) + ", but model.vocab_size = " +
                      std::to_string(model_vocab_size) + ": the data was tokenized for another model");
    return;
  }
  if (shard.vocab_size() > uint64_t(model_vocab_size))
    throw DataError(shard.path() + " holds tokens of a " + std::to_string(shard.vocab_size()) +
                    "-token vocabulary (its header), but model.vocab_size = " + std::to_string(model_vocab_size) +
                    ": the data was tokenized for another model");
}

void require_window(const Shard& shard, int seq_len) {
  const uint64_t window = uint64_t(seq_len) + 1;
  if (shard.size() < window)
    throw DataError(shard.path() + " has " + std::to_string(shard.size()) + " tokens; data.seq_len = " +
                    std::to_string(seq_len) + " needs at least " + std::to_string(window) + " (one window)");
}

PrepareStats prepare_text(const std::vector<std::string>& text_files, const std::string& out_dir,
                          double val_fraction, bool overwrite, const std::string& document_separator) {
  if (text_files.empty()) throw DataError("prepare_text: no text files given");
  if (!overwrite) {  // before any work: another corpus's shards are someone's data
    std::string present;
    for (const char* name : {"train.bin", "val.bin", "train.mask.bin", "val.mask.bin"})
      if (files::exists(files::join(out_dir, name))) present += (present.empty() ? "" : ", ") + std::string(name);
    if (!present.empty())
      throw DataError(out_dir + " already holds token shards (" + present +
                      "); pass --overwrite to replace them, or choose another --out folder");
  }
  if (!(val_fraction > 0.0 && val_fraction < 1.0)) {
    throw DataError("prepare_text: val_fraction " + std::to_string(val_fraction) + " must be in (0, 1)");
  }
  std::string text;
  std::vector<uint64_t> starts;  // of the documents, in bytes (= tokens) of the joined text
  for (size_t i = 0; i < text_files.size(); ++i) {
    const std::string& file = text_files[i];
    if (!files::file_size(file))
      throw DataError("text file '" + file + "' is " + files::kind(file) + ", not a regular file");
    std::string contents;
    try {
      contents = files::read_file(file, kMaxTextBytes);
    } catch (const Error& e) {
      throw DataError(std::string("text file: ") + e.what());
    }
    if (i > 0) text += '\n';
    starts.push_back(text.size());
    text += contents;
  }
  // A line that is exactly the separator ends its document (and stays in it: the token stream is the
  // same with or without separators; only the boundaries differ).
  if (!document_separator.empty()) {
    const std::string line = document_separator + "\n";
    const std::vector<uint64_t> file_starts = starts;
    for (size_t at = 0; (at = text.find(line, at)) != std::string::npos; at += line.size()) {
      const uint64_t next = at + line.size();  // a file's last line: the next file starts after the join
      const bool ends_file = std::binary_search(file_starts.begin(), file_starts.end(), next + 1);
      if ((at == 0 || text[at - 1] == '\n') && !ends_file) starts.push_back(next);
    }
    std::sort(starts.begin(), starts.end());
  }

  // Split right after the last newline at or before the target point (else the first one after it).
  const size_t target = size_t(double(text.size()) * (1.0 - val_fraction));
  size_t split = std::string::npos;
  if (target > 0) {
    const size_t nl = text.rfind('\n', target - 1);
    if (nl != std::string::npos) split = nl + 1;
  }
  if (split == std::string::npos) {
    const size_t nl = text.find('\n', target);
    if (nl != std::string::npos) split = nl + 1;
  }
  if (split == std::string::npos || split == 0 || split >= text.size()) {
    std::string names;
    for (const auto& f : text_files) names += (names.empty() ? "" : ", ") + f;
    throw DataError("text in " + names + " (" + std::to_string(text.size()) +
                    " bytes) is too small to split into non-empty train and validation parts at a line boundary "
                    "(val_fraction " + std::to_string(val_fraction) + ")");
  }

  try {
    files::make_directories(out_dir);
  } catch (const DataError&) {
    throw;
  } catch (const Error& e) {  // "[io] cannot create folder '<dir>': <reason>" -> a DataError
    std::string message = e.what();
    if (message.rfind("[io] ", 0) == 0) message.erase(0, 5);
    throw DataError(message);
  }
  const ByteTokenizer tokenizer;
  const std::vector<int64_t> train = tokenizer.encode(text.substr(0, split));
  const std::vector<int64_t> val = tokenizer.encode(text.substr(split));
  for (const char* name : {"train.bin", "val.bin"}) {
    const std::string mask = mask_path_for(files::join(out_dir, name));
    if (files::exists(mask) && ::unlink(mask.c_str()) != 0)  // a stale mask would mask this text
      throw DataError("cannot remove the old loss mask " + mask + ": " + errno_text());
  }
  // Each split's documents: the boundaries inside it, and its own start (the split cuts one in two).
  std::vector<uint64_t> train_starts{0}, val_starts{0};
  for (uint64_t at : starts) {
    if (at > 0 && at < split && at > train_starts.back()) train_starts.push_back(at);
    if (at > split && at < text.size() && at - split > val_starts.back()) val_starts.push_back(at - split);
  }
  write_shard(files::join(out_dir, "train.bin"), train, ByteTokenizer::vocab_size, train_starts);
  write_shard(files::join(out_dir, "val.bin"), val, ByteTokenizer::vocab_size, val_starts);
  return PrepareStats{train.size(), val.size(), train_starts.size(), val_starts.size()};
}

}  // namespace moetrain::data
