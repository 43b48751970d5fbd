// The byte-level tokenizer (token id = byte value, vocabulary 256), and the token table: the decoding
// half of a tokenizer moetrain does not run itself (a Hugging Face one), as scripts/prepare_data.py --rl
// writes it beside an RL prompt set so that completions can be decoded for the rewards.
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

// Token id -> its bytes. Decoding concatenates them, as the tokenizer's own decode(ids,
// skip_special_tokens=False) does for the decoders the table can describe (byte-level BPE, SentencePiece's
// replacement character and byte fallback); a whole text then loses up to `strip_count` leading copies of
// `strip`, SentencePiece's prefix space. Ids the table does not hold decode to nothing, as decode skips them.
class TokenTable {
 public:
  // The byte tokenizer's table: id b is the byte b.
  static TokenTable bytes();
  // A prompts.tokens.json file ({"format": "moetrain-token-table", "version": 1, "size": V, "strip":
  // {"char", "count"} or null, "pieces": [hex of each id's bytes]}); a damaged file is a DataError naming it.
  static TokenTable read(const std::string& path);

  int64_t size() const { return int64_t(offsets_.size()) - 1; }
  // The ids' bytes run together: a completion that continues a text.
  std::string decode(const std::vector<int64_t>& ids) const;
  // A whole text (a prompt): decode() less the decoder's leading strip.
  std::string decode_text(const std::vector<int64_t>& ids) const;

 private:
  std::string bytes_;
  std::vector<uint64_t> offsets_{0};  // id i is bytes_[offsets_[i], offsets_[i + 1])
  std::string strip_;
  int strip_count_ = 0;
};

}  // namespace moetrain::data
