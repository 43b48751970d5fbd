// safetensors reader and writer. The layout follows the reference implementation exactly (header
// padded with spaces to 8-byte alignment, tensors packed back to back with no holes) so files written
// here load in Python's `safetensors`, and the reader refuses anything that library would refuse.
#include "ckpt/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <optional>

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "common/json_brief.h"
#include "common/files.h"

namespace moetrain::ckpt {
namespace {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

using Json = nlohmann::ordered_json;  // keeps the header's key order

constexpr std::pair<const char*, torch::ScalarType> kDtypes[] = {
    {"F64", torch::kFloat64}, {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
    {"BF16", torch::kBFloat16}, {"I64", torch::kInt64},  {"I32", torch::kInt32},
    {"I16", torch::kInt16},   {"I8", torch::kInt8},     {"U8", torch::kUInt8},
    {"BOOL", torch::kBool}};
constexpr const char* kSupportedDtypes = "F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL";
constexpr const char* kMetadataKey = "__metadata__";

const char* dtype_name(torch::ScalarType t) {
  for (const auto& [name, type] : kDtypes) {
    if (type == t) return name;
  }
  return nullptr;
}

std::optional<torch::ScalarType> dtype_from_name(const std::string& s) {
  for (const auto& [name, type] : kDtypes) {
    if (s == name) return type;
  }
  return std::nullopt;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string errno_text() { return std::strerror(errno); }

std::string brief(const Json& v) { return brief_json(v); }

// Closes the descriptor on every path out of a function.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Reads exactly n bytes at offset; a short read means the file shrank or was truncated.
void pread_all(int fd, void* data, size_t n, uint64_t offset, const std::string& path, const std::string& what) {
  auto* p = static_cast<char*>(data);
  while (n > 0) {
    ssize_t got = ::pread(fd, p, n, off_t(offset));
    if (got < 0) {
      if (errno == EINTR) continue;
      throw CheckpointError("cannot read " + what + " from " + path + ": " + errno_text());
    }
    if (got == 0) throw CheckpointError(path + ": unexpected end of file while reading " + what);
    p += got;
    n -= size_t(got);
    offset += uint64_t(got);
  }
}

}  // namespace

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  // Resolve every tensor to CPU contiguous bytes first, so a bad input fails before the file exists.
  std::vector<torch::Tensor> cpu_tensors;
  cpu_tensors.reserve(tensors.size());
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header[kMetadataKey] = std::move(meta);
  }
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == kMetadataKey) throw CheckpointError(path + ": '__metadata__' is reserved and cannot name a tensor");
    if (header.contains(name)) throw CheckpointError(path + ": tensor name '" + name + "' appears twice");
    if (!tensor.defined()) throw CheckpointError(path + ": tensor '" + name + "' is undefined");
    const char* dtype = dtype_name(tensor.scalar_type());
    if (!dtype) {
      throw CheckpointError(path + ": tensor '" + name + "' has dtype " +
                            std::string(c10::toString(tensor.scalar_type())) + "; supported: " + kSupportedDtypes);
    }
    torch::Tensor cpu = tensor.detach().to(torch::kCPU).resolve_conj().resolve_neg().contiguous();
    const uint64_t n_bytes = uint64_t(cpu.numel()) * uint64_t(cpu.element_size());
    header[name] = {{"dtype", dtype}, {"shape", cpu.sizes().vec()}, {"data_offsets", {offset, offset + n_bytes}}};
    offset += n_bytes;
    cpu_tensors.push_back(std::move(cpu));
  }

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const Json::exception& e) {  // invalid UTF-8 in a name or metadata value
    throw CheckpointError(path + ": cannot encode header: " + e.what());
  }
  // Spaces pad the header so the data section starts 8-byte aligned (as the reference writer does).
  header_text.append((8 - (8 + header_text.size()) % 8) % 8, ' ');
  uint8_t length_le[8];
  const uint64_t header_len = header_text.size();
  std::memcpy(length_le, &header_len, 8);

  Fd file{::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
  if (file.fd < 0) throw CheckpointError("cannot create " + path + ": " + errno_text());
  try {
    files::write_all(file.fd, length_le, 8, path);
    files::write_all(file.fd, header_text.data(), header_text.size(), path);
    for (const auto& cpu : cpu_tensors) {
      files::write_all(file.fd, cpu.data_ptr(), size_t(cpu.numel()) * cpu.element_size(), path);
    }
    if (::fsync(file.fd) != 0) throw CheckpointError("cannot fsync " + path + ": " + errno_text());
    const int fd = file.fd;
    file.fd = -1;
    // close can report a deferred write error (NFS, quota): it counts as a failed write.
    if (::close(fd) != 0) throw CheckpointError("cannot close " + path + ": " + errno_text());
  } catch (...) {
    // A partial file must not look like a checkpoint; only regular files are removed (never /dev/...).
    struct stat st {};
    if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) ::unlink(path.c_str());
    throw;
  }
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  Fd file{files::open_regular<CheckpointError>(path)};
  struct stat st {};
  if (::fstat(file.fd, &st) != 0) throw CheckpointError("cannot stat " + path + ": " + errno_text());
  file_size_ = uint64_t(st.st_size);
  if (file_size_ < 8) {
    throw CheckpointError(path + ": truncated: " + std::to_string(file_size_) +
                          " bytes, too short for the 8-byte header length");
  }
  uint64_t header_len = 0;
  pread_all(file.fd, &header_len, 8, 0, path, "the header length");
  if (header_len > file_size_ - 8) {
    throw CheckpointError(path + ": header length " + std::to_string(header_len) + " runs past the end of the file (" +
                          std::to_string(file_size_) + " bytes)");
  }
  // Same cap as the reference reader: a corrupt length must not turn into a multi-gigabyte allocation.
  constexpr uint64_t kMaxHeaderBytes = 100'000'000;
  if (header_len > kMaxHeaderBytes) {
    throw CheckpointError(path + ": header length " + std::to_string(header_len) + " exceeds the " +
                          std::to_string(kMaxHeaderBytes) + "-byte limit");
  }
  data_start_ = 8 + header_len;
  std::string header_text(header_len, '\0');
  pread_all(file.fd, header_text.data(), header_len, 8, path, "the header");

  // Count top-level keys while parsing: the JSON library keeps only the last of duplicate keys. A
  // valid header nests 3 levels; the library copies nested values recursively while parsing with a
  // callback, so a deeper nesting is refused before it can overflow the stack (60,000 '[' did).
  constexpr int kMaxDepth = 16;
  size_t n_keys = 0;
  Json header;
  try {
    header = Json::parse(header_text, [&n_keys, &path](int depth, Json::parse_event_t event, Json&) {
      if (depth == 1 && event == Json::parse_event_t::key) ++n_keys;
      if (depth > kMaxDepth)
        throw CheckpointError(path + ": header nests deeper than " + std::to_string(kMaxDepth) + " levels");
      return true;
    });
  } catch (const Json::exception& e) {
    throw CheckpointError(path + ": header is not valid JSON: " + e.what());
  }
  if (!header.is_object()) throw CheckpointError(path + ": header is not a JSON object");
  if (n_keys != header.size()) throw CheckpointError(path + ": header has duplicate keys");

  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      if (!entry.is_object()) throw CheckpointError(path + ": __metadata__ is not an object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string()) throw CheckpointError(path + ": __metadata__ value for '" + key + "' is not a string");
        metadata_[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = path + ": tensor '" + name + "'";
    if (!entry.is_object()) throw CheckpointError(where + ": entry is not an object");
    for (const char* field : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(field)) throw CheckpointError(where + ": missing field '" + field + "'");
    }
    TensorInfo info;
    info.name = name;
    const Json& dtype = entry["dtype"];
    if (!dtype.is_string()) throw CheckpointError(where + ": dtype is not a string");
    auto type = dtype_from_name(dtype.get<std::string>());
    if (!type) {
      throw CheckpointError(where + ": unknown dtype '" + dtype.get<std::string>() + "' (supported: " +
                            kSupportedDtypes + ")");
    }
    info.dtype = *type;

    const Json& shape = entry["shape"];
    if (!shape.is_array()) throw CheckpointError(where + ": shape is not an array");
    uint64_t numel = 1;
    bool numel_overflow = false;
    // A tensor with a zero dimension holds no bytes, but its strides (the product of the other
    // dimensions) must still fit in int64 for torch to create it.
    uint64_t span = 1;
    bool span_overflow = false;
    for (const Json& dim : shape) {
      if (!dim.is_number_unsigned() || dim.get<uint64_t>() > uint64_t(INT64_MAX)) {
        throw CheckpointError(where + ": shape " + brief(shape) + " has an entry that is not a non-negative integer");
      }
      info.shape.push_back(dim.get<int64_t>());
      numel_overflow |= __builtin_mul_overflow(numel, dim.get<uint64_t>(), &numel);
      span_overflow |= __builtin_mul_overflow(span, std::max<uint64_t>(dim.get<uint64_t>(), 1), &span);
    }
    if (span_overflow || span > uint64_t(INT64_MAX)) {
      throw CheckpointError(where + ": shape " + brief(shape) + " is too large: its dimensions (zeros counted as 1) " +
                            "multiply past 2^63");
    }

    const Json& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      throw CheckpointError(where + ": data_offsets " + brief(offsets) + " is not a pair of non-negative integers");
    }
    info.begin = offsets[0].get<uint64_t>();
    info.end = offsets[1].get<uint64_t>();
    if (info.end < info.begin) throw CheckpointError(where + ": data_offsets " + brief(offsets) + " ends before it begins");
    if (info.end > file_size_ - data_start_) {
      throw CheckpointError(where + ": data_offsets " + brief(offsets) + " run past the end of the data section (" +
                            std::to_string(file_size_ - data_start_) + " bytes)");
    }
    uint64_t n_bytes = 0;
    numel_overflow |= __builtin_mul_overflow(numel, uint64_t(c10::elementSize(info.dtype)), &n_bytes);
    if (numel_overflow || n_bytes != info.end - info.begin) {
      throw CheckpointError(where + ": shape " + shape_string(info.shape) + " of " + dtype.get<std::string>() +
                            " does not match data_offsets " + brief(offsets) + " (" +
                            std::to_string(info.end - info.begin) + " bytes)");
    }
    infos_.push_back(std::move(info));
  }

  // File order is data order; tensors must tile the data section exactly (no overlap, hole or tail).
  std::stable_sort(infos_.begin(), infos_.end(),
                   [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
  uint64_t expected_begin = 0;
  for (const auto& info : infos_) {
    if (info.begin < expected_begin) {
      throw CheckpointError(path + ": tensor '" + info.name + "' at bytes [" + std::to_string(info.begin) + ", " +
                            std::to_string(info.end) + ") overlaps the tensor before it");
    }
    if (info.begin > expected_begin) {
      throw CheckpointError(path + ": gap of " + std::to_string(info.begin - expected_begin) +
                            " bytes in the data section before tensor '" + info.name + "'");
    }
    expected_begin = info.end;
  }
  if (expected_begin != file_size_ - data_start_) {
    throw CheckpointError(path + ": " + std::to_string(file_size_ - data_start_ - expected_begin) +
                          " bytes after the last tensor's data");
  }
  for (size_t i = 0; i < infos_.size(); ++i) index_[infos_[i].name] = i;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) > 0; }

const TensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw CheckpointError(path_ + ": no tensor named '" + name + "'");
  return infos_[it->second];
}

torch::Tensor SafetensorsFile::load(const std::string& name) const {
  const TensorInfo& ti = info(name);
  torch::Tensor out = torch::empty(ti.shape, torch::TensorOptions().dtype(ti.dtype).device(torch::kCPU));
  const uint64_t n_bytes = ti.end - ti.begin;
  if (n_bytes == 0) return out;
  Fd file{files::open_regular<CheckpointError>(path_)};
  pread_all(file.fd, out.data_ptr(), n_bytes, data_start_ + ti.begin, path_, "tensor '" + name + "'");
  if (ti.dtype == torch::kBool) {
    // Any byte other than 0 or 1 is not a bool; torch would misbehave on it later.
    const auto* bytes = static_cast<const uint8_t*>(out.data_ptr());
    if (std::any_of(bytes, bytes + n_bytes, [](uint8_t b) { return b > 1; })) {
      throw CheckpointError(path_ + ": tensor '" + name + "' (BOOL) holds a byte other than 0 or 1");
    }
  }
  return out;
}

}  // namespace moetrain::ckpt
