// Token shards: a 32-byte header then the tokens, read with pread (see Shard for why not mmap).
// Our format ("moetrain"):
//   bytes 0..7   magic "MOETOKS\0"
//   bytes 8..11  format version (uint32, little-endian), currently 1
//   bytes 12..15 token dtype code (uint32): 1 = uint8, 2 = uint16, 4 = uint32 (bytes per token)
//   bytes 16..23 token count (uint64)
//   bytes 24..31 vocabulary size (uint64); every token is < this
// Version 2 adds document boundaries after the tokens (data.packing: documents packs whole documents):
//   8 bytes "MOEDOCS\0", a document count D (uint64), then D uint64 token offsets where each document
//   starts: the first 0, strictly increasing, each below the token count (document i is [start_i,
//   start_{i+1}), start_D = the token count). The file is 32 + count * bytes + 16 + 8 * D bytes.
//   A shard without boundaries is written as version 1, byte for byte what it always was.
// A header that does not match the file (bad magic, unknown version or dtype, a size that does not
// equal 32 + count * bytes) throws DataError naming the file and the field; so does a token at or past
// the header's vocabulary (found by one scan at open, naming its position).
//
// Two formats users already hold are read in place, with the same class (their tokens are also fixed-
// width little-endian integers after a header, so only the header differs):
//   llm.c token shards (karpathy/llm.c, dev/data/data_common.py, write_datafile): a header of 256
//     int32 (1024 bytes): [0] magic 20240520 (GPT-2, version [1] = 1, uint16 tokens) or 20240801
//     (Llama 3, version 7, uint32 tokens), [2] token count; then the tokens.
//   Megatron-LM indexed datasets (NVIDIA/Megatron-LM, megatron/core/datasets/indexed_dataset.py,
//     _IndexWriter / _IndexReader): X.bin holds the tokens alone, X.idx beside it: 9 bytes
//     "MMIDIDX\x00\x00", version (uint64) 1, dtype code (uint8: 1 uint8, 4 int32, 8 uint16 are the token
//     widths read here), sequence count S (uint64), document-index count D (uint64), then S sizes
//     (int32, tokens per sequence), S pointers (int64, byte offset of each sequence in X.bin), D document
//     indices (int64, the sequence index each document starts at, ending with S; D - 1 documents), and
//     for multimodal sets S modes (int8). The sequences must lie back to back from byte 0 (as the writer
//     lays them), so X.bin is one token stream. Its documents are the index's: document j starts at the
//     first token of sequence document_indices[j].
// Neither foreign header states a vocabulary: a full scan at open gives the bound (largest token + 1),
// and every read checks tokens against ShardOptions::vocab_bound (the model's vocabulary).
//
// Loss masks (fine-tuning on prompt/response pairs): an optional sibling file <name>.mask.bin beside
// <name>.bin (train.mask.bin for train.bin), one byte per token: 1 = the token is learned (predicting
// it counts in the loss), 0 = it is not (a prompt token). No mask file: every token is learned. A
// 64-byte header, then the bytes:
//   bytes 0..7   magic "MOEMASK\0"
//   bytes 8..11  mask format version (uint32, little-endian), currently 1
//   bytes 12..15 reserved, 0
//   bytes 16..23 token count (uint64): must equal the shard's
//   bytes 24..63 file name of the shard it belongs to ("train.bin"), NUL-padded, at most 39 bytes
// A mask whose count or shard name does not match its shard, or whose size is not 64 + count, throws
// DataError naming both files; an entry other than 0 or 1 throws naming the mask and the position.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace moetrain::data {

constexpr uint32_t kShardVersion = 1;           // tokens only
constexpr uint32_t kShardVersionDocuments = 2;  // tokens and document boundaries
constexpr uint32_t kMaskVersion = 1;

// Version 1 without document_starts, else version 2 with them (each checked: 0 first, increasing,
// below the token count).
void write_shard(const std::string& path, const std::vector<int64_t>& tokens, uint64_t vocab_size,
                 const std::vector<uint64_t>& document_starts = {});

// "dir/train.bin" -> "dir/train.mask.bin" (any other name gets ".mask.bin" appended).
std::string mask_path_for(const std::string& shard_path);
// Writes the loss mask of the shard at shard_path (mask_path_for(shard_path)); one entry (0 or 1) per
// token of that shard.
void write_mask(const std::string& shard_path, const std::vector<uint8_t>& learned);

// An open token shard. Reads go through pread on a descriptor held open, not through a mapping: a
// mapped file that is truncated while the run reads it kills the process with SIGBUS, while pread
// returns a short count that read() turns into a DataError naming the file. (A SIGBUS handler would
// be process-wide state around LibTorch's own threads and handlers, for no gain: a window is a few KB,
// one syscall next to a forward pass.) A file renamed over the shard is not seen: the descriptor
// keeps reading the file that was opened.
enum class ShardFormat { moetrain, llmc, megatron };
const char* format_name(ShardFormat format);  // "moetrain", "llm.c", "megatron"

struct ShardOptions {
  // Read every token (and mask entry) once at open. Off for the shards of a many-shard split, which
  // are opened on demand (their windows are still checked token by token as they are read).
  bool scan = true;
  // Formats without a vocabulary in their header: tokens must be below this; 0 = the dtype's range.
  uint64_t vocab_bound = 0;
};

class Shard {
 public:
  // Opens the file, checks the header and, with options.scan, reads every token (and mask entry) once.
  explicit Shard(const std::string& path, ShardOptions options = {});
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  const std::string& path() const { return path_; }
  uint64_t size() const { return count_; }          // number of tokens
  // Every token is below this: the header's vocabulary (moetrain), else the scan's largest token + 1,
  // else ShardOptions::vocab_bound or the dtype's range.
  uint64_t vocab_size() const { return vocab_; }
  bool vocab_in_header() const { return format_ == ShardFormat::moetrain; }
  bool scanned() const { return scanned_; }
  int bytes_per_token() const { return bytes_; }
  ShardFormat format() const { return format_; }
  // Documents the file marks: a version-2 shard's table, or a Megatron .idx's document index; 0 for
  // the formats that keep none (version 1, llm.c).
  uint64_t documents() const { return documents_; }
  bool has_documents() const { return documents_ > 0; }
  // Where each document starts (token offsets, the first 0, increasing), read from the file now and
  // checked; throws DataError naming the file (and the index) when it has none or they are damaged.
  std::vector<uint64_t> document_starts() const;
  const std::string& index_path() const { return index_path_; }
  int64_t at(uint64_t i) const;                      // one token, as read()
  // Copies tokens [begin, begin + n) into out (int64); throws DataError if out of range, or if the
  // file no longer holds them (truncated while the run reads it).
  void read(uint64_t begin, uint64_t n, int64_t* out) const;
  // The loss mask, when <name>.mask.bin exists beside the shard.
  bool has_mask() const { return mask_fd_ >= 0; }
  const std::string& mask_path() const { return mask_path_; }
  // Entries the mask marks learned (every token without a mask file; the count only after a scan).
  uint64_t learned_tokens() const { return learned_; }
  // Copies mask entries [begin, begin + n) into out (1 = learned); all 1 without a mask file.
  void read_mask(uint64_t begin, uint64_t n, uint8_t* out) const;

 private:
  void open_moetrain(uint64_t file_size);
  void open_llmc(uint64_t file_size);
  void open_megatron(uint64_t file_size);
  void load_mask();
  std::vector<uint64_t> megatron_document_starts() const;
  uint64_t scan_tokens() const;  // the largest token
  std::string vocabulary_text() const;  // "the header's vocabulary [0, V)" or what bounds the tokens instead
  void close_files();

  std::string path_, mask_path_, index_path_;
  int fd_ = -1;
  int mask_fd_ = -1;  // the mask file, or -1 without one
  ShardFormat format_ = ShardFormat::moetrain;
  ShardOptions options_;
  bool scanned_ = false;
  uint64_t data_offset_ = 0;  // byte where the tokens start
  uint64_t documents_at_ = 0; // version 2: byte where the document offsets start
  uint64_t count_ = 0, vocab_ = 0, learned_ = 0, documents_ = 0;
  int bytes_ = 0;
};

// The checks a run makes of each shard at open, before training starts (each throws DataError naming
// the file): its header vocabulary (or, for a scanned foreign shard, its largest token) fits the model's
// (model.vocab_size), and it holds one window of seq_len + 1 tokens (data.seq_len).
void require_vocabulary(const Shard& shard, int64_t model_vocab_size);
void require_window(const Shard& shard, int seq_len);

struct PrepareStats {
  uint64_t train_tokens = 0, val_tokens = 0;
  uint64_t train_documents = 0, val_documents = 0;
};
// Tokenizes text files with the byte tokenizer and writes <out_dir>/train.bin and <out_dir>/val.bin;
// the last val_fraction of the text (split at a line boundary) is the validation set. A folder that
// already holds shards or masks is refused (a run may be training on them) unless overwrite is set.
// The shards mark documents (version 2): each file is one, and with a document_separator, a line that
// is exactly it ends one (fortune files: "%"); the validation split's first document is the rest of
// the one the split cut.
PrepareStats prepare_text(const std::vector<std::string>& text_files, const std::string& out_dir,
                          double val_fraction = 0.05, bool overwrite = false, const std::string& document_separator = "");

}  // namespace moetrain::data
