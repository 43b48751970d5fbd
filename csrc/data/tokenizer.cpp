// The byte tokenizer (every byte is its own token, so any file round-trips exactly) and the token
// table that decodes a Hugging Face tokenizer's ids.
#include "data/tokenizer.h"

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "common/files.h"

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

// ---- the token table ------------------------------------------------------------------------------

TokenTable TokenTable::bytes() {
  TokenTable t;
  for (int b = 0; b < ByteTokenizer::vocab_size; ++b) {
    t.bytes_.push_back(static_cast<char>(b));
    t.offsets_.push_back(t.bytes_.size());
  }
  return t;
}

TokenTable TokenTable::read(const std::string& path) {
  using json = nlohmann::json;
  if (!files::exists(path)) throw DataError("token table " + path + " does not exist");
  const auto doc = json::parse(files::read_file(path), nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& what) { return DataError("token table " + path + ": " + what); };
  if (!doc.is_object() || doc.value("format", "") != "moetrain-token-table")
    throw bad("expected a JSON object with \"format\": \"moetrain-token-table\" (scripts/prepare_data.py --rl writes it)");
  if (doc.value("version", 0) != 1) throw bad("version " + doc.value("version", json()).dump() + " is not one this build reads (1)");
  if (!doc.contains("pieces") || !doc["pieces"].is_array()) throw bad("\"pieces\" is not a list");
  const auto& pieces = doc["pieces"];
  if (!doc.contains("size") || !doc["size"].is_number_unsigned() || doc["size"].get<uint64_t>() != pieces.size())
    throw bad("\"size\" " + doc.value("size", json()).dump() + " is not the " + std::to_string(pieces.size()) + " pieces it holds");
  TokenTable t;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < pieces.size(); ++i) {
    const auto& p = pieces[i];
    if (!p.is_string() || p.get_ref<const std::string&>().size() % 2 != 0)
      throw bad("piece " + std::to_string(i) + " is not a string of lowercase hex byte pairs");
    const auto& hex = p.get_ref<const std::string&>();
    for (size_t k = 0; k < hex.size(); k += 2) {
      const int hi = nibble(hex[k]), lo = nibble(hex[k + 1]);
      if (hi < 0 || lo < 0) throw bad("piece " + std::to_string(i) + " is not a string of lowercase hex byte pairs");
      t.bytes_.push_back(static_cast<char>(hi * 16 + lo));
    }
    t.offsets_.push_back(t.bytes_.size());
  }
  if (doc.contains("strip") && !doc["strip"].is_null()) {
    const auto& s = doc["strip"];
    if (!s.is_object() || !s.contains("char") || !s["char"].is_string() || !s.contains("count") ||
        !s["count"].is_number_unsigned())
      throw bad("\"strip\" must be null or {\"char\": a character, \"count\": n >= 0}");
    t.strip_ = s["char"].get<std::string>();
    t.strip_count_ = s["count"].get<int>();
  }
  return t;
}

std::string TokenTable::decode(const std::vector<int64_t>& ids) const {
  std::string out;
  for (int64_t id : ids)
    if (id >= 0 && id < size()) out.append(bytes_, offsets_[size_t(id)], offsets_[size_t(id) + 1] - offsets_[size_t(id)]);
  return out;
}

std::string TokenTable::decode_text(const std::vector<int64_t>& ids) const {
  std::string out = decode(ids);
  size_t cut = 0;
  for (int n = 0; n < strip_count_ && !strip_.empty() && out.compare(cut, strip_.size(), strip_) == 0; ++n) cut += strip_.size();
  return out.substr(cut);
}

}  // namespace moetrain::data
