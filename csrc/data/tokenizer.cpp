// The byte tokenizer: every byte is its own token, so any file round-trips exactly.
#include "data/tokenizer.h"

#include "common/errors.h"

namespace moetrain::data {

std::vector<int64_t> ByteTokenizer::encode(const std::string& text) const {
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int64_t>& ids) const {
  std::string text(ids.size(), '\0');
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab_size) {
      throw DataError("token id " + std::to_string(ids[i]) + " at index " + std::to_string(i) +
                      " is outside the byte vocabulary [0, 256)");
    }
    text[i] = static_cast<char>(static_cast<unsigned char>(ids[i]));
  }
  return text;
}

}  // namespace moetrain::data
