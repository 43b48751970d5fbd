// TensorBoard event files (logging.tensorboard): scalars per step in <out_dir>/tb/, written by rank 0.
// Each file is a sequence of TFRecords (length, masked CRC-32C of the length, the serialized Event,
// masked CRC-32C of it) as TensorBoard reads them; the Event and Summary messages come from
// tb_event.proto through the protobuf library (Debian's libprotobuf). Built without protobuf,
// opening a writer is a clear error.
#pragma once
#include <cstdint>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

namespace moetrain::train {

// CRC-32C (Castagnoli), and TFRecord's masking of it.
uint32_t crc32c(const void* data, size_t size);
uint32_t masked_crc32c(const void* data, size_t size);

class TensorBoardWriter {
 public:
  // Creates <dir>/events.out.tfevents.<seconds>.<host>.<pid> and writes its version record.
  explicit TensorBoardWriter(const std::string& dir);
  ~TensorBoardWriter();
  // One Event with these scalars at `step`, flushed to the file.
  void scalars(int64_t step, const std::vector<std::pair<std::string, double>>& values);
  const std::string& path() const { return path_; }
  static bool available();  // built with protobuf

 private:
  void record(const std::string& bytes);
  std::string path_;
  std::ofstream out_;
};

// The scalars of one metrics.jsonl record: every number at the top level under its key ("loss",
// "lr", "val_loss/<source>", ...), and each MoE layer's "max_over_mean", "drop_fraction" and
// "aux_loss" as "moe/layer<L>/<name>". Non-numbers (the step, lists) are left out.
std::vector<std::pair<std::string, double>> tensorboard_scalars(const nlohmann::json& record);

}  // namespace moetrain::train
