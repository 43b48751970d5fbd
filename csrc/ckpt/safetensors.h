// safetensors files (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length,
// a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then raw bytes.
// We read and write them bit-exactly; checkpoints and Hugging Face weights both use this format.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

namespace moetrain::ckpt {

using TensorMap = std::vector<std::pair<std::string, torch::Tensor>>;  // ordered, names unique

// Writes tensors (any device, contiguous or not; copied to CPU) with optional string metadata.
// Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL. Names must be unique.
// The file is written and fsynced at `path`; callers handle temporary names and renames.
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});

struct TensorInfo {
  std::string name;
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

// Reads a safetensors file. Validates the header (length within the file, JSON well formed, known
// dtypes, offsets in bounds and consistent with shape*itemsize, no overlaps); a bad file throws
// CheckpointError naming the file and what is wrong. Tensor data is read on demand.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return infos_; }  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  const TensorInfo& info(const std::string& name) const;  // throws CheckpointError if absent
  torch::Tensor load(const std::string& name) const;       // a new CPU tensor, exact bytes

 private:
  std::string path_;
  uint64_t data_start_ = 0;
  uint64_t file_size_ = 0;
  std::vector<TensorInfo> infos_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace moetrain::ckpt
