// TensorBoard event files (see tensorboard.h).
#include "train/tensorboard.h"

#include <unistd.h>

#include <array>
#include <chrono>

#include "common/errors.h"
#include "common/files.h"
#ifdef MOETRAIN_HAVE_PROTOBUF
#include "train/tb_event_codec.h"
#endif

namespace moetrain::train {

namespace {

// The reflected CRC-32C table (polynomial 0x82F63B78), one byte at a time.
const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

double seconds_since_epoch() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

std::string little_endian(uint64_t v, int bytes) {
  std::string s(size_t(bytes), '\0');
  for (int i = 0; i < bytes; ++i) s[size_t(i)] = char((v >> (8 * i)) & 0xff);
  return s;
}

}  // namespace

uint32_t crc32c(const void* data, size_t size) {
  const auto& table = crc_table();
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t size) {
  const uint32_t c = crc32c(data, size);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

bool TensorBoardWriter::available() {
#ifdef MOETRAIN_HAVE_PROTOBUF
  return true;
#else
  return false;
#endif
}

TensorBoardWriter::TensorBoardWriter(const std::string& dir) {
  if (!available())
    throw ConfigError("logging.tensorboard = true, but this moetrain was built without protobuf (install "
                      "libprotobuf-dev and protobuf-compiler, as scripts/setup.sh does, and rebuild)");
  files::make_directories(dir);
  char host[256] = "host";
  ::gethostname(host, sizeof host - 1);
  path_ = files::join(dir, "events.out.tfevents." + std::to_string(int64_t(seconds_since_epoch())) + "." + host + "." +
                               std::to_string(::getpid()));
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) throw Error("cannot create the TensorBoard event file '" + path_ + "'");
#ifdef MOETRAIN_HAVE_PROTOBUF
  record(tb_codec::version_event(seconds_since_epoch()));
#endif
}

TensorBoardWriter::~TensorBoardWriter() {
  if (out_.is_open()) out_.flush();
}

void TensorBoardWriter::scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values) {
#ifdef MOETRAIN_HAVE_PROTOBUF
  record(tb_codec::scalars_event(seconds_since_epoch(), step, values));
#else
  (void)step, (void)values;
#endif
}

// A TFRecord: uint64 length, masked CRC-32C of those 8 bytes, the data, masked CRC-32C of the data.
void TensorBoardWriter::record(const std::string& bytes) {
  const std::string length = little_endian(bytes.size(), 8);
  out_ << length << little_endian(masked_crc32c(length.data(), length.size()), 4) << bytes
       << little_endian(masked_crc32c(bytes.data(), bytes.size()), 4);
  out_.flush();
  if (!out_) throw Error("writing the TensorBoard event file '" + path_ + "' failed (disk full?)");
}

std::vector<std::pair<std::string, double>> tensorboard_scalars(const nlohmann::json& record) {
  std::vector<std::pair<std::string, double>> out;
  for (const auto& [key, value] : record.items())
    if (value.is_number() && key != "step") out.emplace_back(key, value.get<double>());
  if (record.contains("moe") && record["moe"].is_array())
    for (const auto& layer : record["moe"]) {
      const std::string prefix = "moe/layer" + std::to_string(layer.value("layer", -1)) + "/";
      for (const char* name : {"max_over_mean", "drop_fraction", "aux_loss"})
        if (layer.contains(name) && layer[name].is_number()) out.emplace_back(prefix + name, layer[name].get<double>());
    }
  return out;
}

}  // namespace moetrain::train
