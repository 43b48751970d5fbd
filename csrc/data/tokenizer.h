// The byte-level tokenizer: token id = byte value, vocabulary 256. Lossless for any input.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moetrain::data {

struct ByteTokenizer {
  static constexpr int vocab_size = 256;
  std::vector<int64_t> encode(const std::string& text) const;
  // Bytes of the ids; ids outside [0, 256) throw DataError.
  std::string decode(const std::vector<int64_t>& ids) const;
};

}  // namespace moetrain::data
