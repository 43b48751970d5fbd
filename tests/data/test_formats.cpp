// Formats users already hold, read in place: a Megatron-LM indexed dataset (.bin + .idx) and an llm.c
// token shard, written by tests/data/foreign_shards.py (an independent Python writer following the
// published layouts), read as the same tokens as our own format; damaged headers name file and field;
// `moetrain inspect-data` reports and verifies a folder.
#include <catch2/catch.hpp>

#include <cstdint>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "common/errors.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "../test_util.h"
#include "shard_contents.h"

using Catch::Matchers::Contains;
using namespace moetrain;
using moetrain::testing::mask_of;
using moetrain::testing::tokens_of;
using moetrain::testing::TempDir;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kPython = kSource + "/third_party/venv/bin/python ";
const std::string kBinary = MOETRAIN_BINARY;

void write_ints(const std::string& path, const std::vector<int64_t>& values) {
  std::ofstream out(path);
  for (int64_t v : values) out << v << "\n";
}

void writer(const std::string& args) {
  const auto r = testing::run_command(kPython + kSource + "/tests/data/foreign_shards.py " + args);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

// GPT-2-sized token ids in documents of uneven lengths.
struct Corpus {
  std::vector<int64_t> tokens, doc_lengths;
};
Corpus make_corpus(int n_docs, uint32_t seed) {
  Corpus c;
  std::mt19937 rng(seed);
  for (int d = 0; d < n_docs; ++d) {
    const int64_t n = 20 + int64_t(rng() % 200);
    c.doc_lengths.push_back(n);
    for (int64_t i = 0; i < n; ++i) c.tokens.push_back(int64_t(rng() % 50000));
  }
  c.tokens.back() = 50256;  // the largest id of GPT-2's vocabulary
  return c;
}

// Folders holding the same corpus as train.bin in each format (and as val.bin, the same file again).
struct Folders {
  std::string ours, megatron16, megatron32, llmc;
};
Folders write_all_formats(const TempDir& dir, const Corpus& corpus) {
  Folders f{dir.str("ours"), dir.str("megatron16"), dir.str("megatron32"), dir.str("llmc")};
  for (const auto& folder : {f.ours, f.megatron16, f.megatron32, f.llmc}) files::make_directories(folder);
  write_ints(dir.str("tokens.txt"), corpus.tokens);
  write_ints(dir.str("docs.txt"), corpus.doc_lengths);
  for (const char* split : {"train", "val"}) {
    const std::string s = split;
    data::write_shard(files::join(f.ours, s + ".bin"), corpus.tokens, 50257);
    writer("megatron " + files::join(f.megatron16, s) + " " + dir.str("tokens.txt") + " " + dir.str("docs.txt") +
           " uint16");
    writer("megatron " + files::join(f.megatron32, s) + " " + dir.str("tokens.txt") + " " + dir.str("docs.txt") +
           " int32");
    writer("llmc " + files::join(f.llmc, s + ".bin") + " " + dir.str("tokens.txt"));
  }
  return f;
}

}  // namespace

CATCH_TEST_CASE("Megatron .bin/.idx and llm.c shards read the same tokens as our format", "[data][python]") {
  TempDir dir("formats");
  const Corpus corpus = make_corpus(40, 3);
  const Folders f = write_all_formats(dir, corpus);

  const data::Shard ours(files::join(f.ours, "train.bin"));
  const data::Shard m16(files::join(f.megatron16, "train.bin")), m32(files::join(f.megatron32, "train.bin"));
  const data::Shard llmc(files::join(f.llmc, "train.bin"));
  CATCH_CHECK(ours.format() == data::ShardFormat::moetrain);
  CATCH_CHECK(m16.format() == data::ShardFormat::megatron);
  CATCH_CHECK(m32.format() == data::ShardFormat::megatron);
  CATCH_CHECK(llmc.format() == data::ShardFormat::llmc);
  CATCH_CHECK(m16.bytes_per_token() == 2);
  CATCH_CHECK(m32.bytes_per_token() == 4);
  CATCH_CHECK(llmc.bytes_per_token() == 2);
  CATCH_CHECK(m16.documents() == 40);
  std::vector<uint64_t> starts{0};  // the .idx's documents as token offsets (data.packing: documents)
  for (size_t d = 0; d + 1 < corpus.doc_lengths.size(); ++d) starts.push_back(starts.back() + uint64_t(corpus.doc_lengths[d]));
  CATCH_CHECK(m16.document_starts() == starts);
  CATCH_CHECK(m32.document_starts() == starts);
  CATCH_CHECK_THROWS_WITH(llmc.document_starts(), Catch::Matchers::Contains("an llm.c shard keeps none"));
  CATCH_CHECK(m16.index_path() == files::join(f.megatron16, "train.idx"));
  CATCH_CHECK(tokens_of(ours) == corpus.tokens);
  for (const data::Shard* shard : {&m16, &m32, &llmc}) {
    CATCH_INFO(shard->path());
    CATCH_CHECK(shard->size() == corpus.tokens.size());
    CATCH_CHECK(tokens_of(*shard) == corpus.tokens);
    CATCH_CHECK(shard->vocab_size() == 50257);  // the scan's bound: largest token + 1
    CATCH_CHECK(!shard->vocab_in_header());
  }
  // Training batches are the same whatever the format: the sampler sees the same token stream.
  data::SamplerOptions opt;
  opt.seed = 5;
  opt.seq_len = 64;
  opt.micro_batch_size = 4;
  const data::Sampler reference(ours, opt);
  for (const auto& folder : {f.megatron16, f.megatron32, f.llmc}) {
    const data::Dataset split = data::Dataset::open(folder, "train", {64, 50257});
    const data::Sampler sampler(data::Blend({data::BlendSource{"x", 1.0, split, std::nullopt}}), opt);
    for (int step = 0; step < 10; ++step)
      CATCH_CHECK(torch::equal(sampler.batch(step, 0).inputs, reference.batch(step, 0).inputs));
  }
  // A token past the model's vocabulary is found by the scan at open, naming the file and position.
  CATCH_CHECK_THROWS_WITH(data::Dataset::open(f.llmc, "train", {64, 50000}),
                          Contains(files::join(f.llmc, "train.bin")) && Contains("(model.vocab_size)"));
  CATCH_CHECK_THROWS_WITH(data::require_vocabulary(m16, 50000), Contains("holds token 50256") &&
                                                                    Contains("model.vocab_size = 50000"));
}

CATCH_TEST_CASE("Damaged Megatron and llm.c headers are one line naming the file and field", "[data][python]") {
  TempDir dir("formats-damaged");
  const Corpus corpus = make_corpus(10, 4);
  const Folders f = write_all_formats(dir, corpus);
  const std::string idx = files::join(f.megatron16, "train.idx"), bin = files::join(f.megatron16, "train.bin");
  const std::string llmc = files::join(f.llmc, "train.bin");
  const std::string idx_bytes = files::read_file(idx), bin_bytes = files::read_file(bin);
  const std::string llmc_bytes = files::read_file(llmc);
  auto restore = [&] {
    testing::write_bytes(idx, idx_bytes);
    testing::write_bytes(bin, bin_bytes);
    testing::write_bytes(llmc, llmc_bytes);
  };
  auto error_of = [](const std::string& path) {
    try {
      data::Shard shard(path);
    } catch (const DataError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const uint64_t seq = 10;
  {
    testing::patch(idx, 0, "MMIDIDY", 7);
    CATCH_CHECK_THAT(error_of(bin), Contains(idx) && Contains("bad magic"));
    restore();
    const uint64_t version = 2;
    testing::patch(idx, 9, &version, 8);
    CATCH_CHECK_THAT(error_of(bin), Contains(idx) && Contains("'version' is 2"));
    restore();
    const uint8_t int64_code = 5;
    testing::patch(idx, 17, &int64_code, 1);
    CATCH_CHECK_THAT(error_of(bin), Contains(idx) && Contains("'dtype' is 5"));
    restore();
    const uint64_t more = seq + 1;
    testing::patch(idx, 18, &more, 8);
    CATCH_CHECK_THAT(error_of(bin), Contains(idx) && Contains("'sequence count' (11)"));
    restore();
    const int64_t wrong_pointer = 6;  // sequence 3 no longer follows sequence 2
    testing::patch(idx, 34 + 4 * seq + 8 * 3, &wrong_pointer, 8);
    CATCH_CHECK_THAT(error_of(bin), Contains(idx) && Contains("sequence 3 points at byte 6"));
    restore();
    const int64_t last_doc = 9;
    testing::patch(idx, 34 + 12 * seq + 8 * seq, &last_doc, 8);
    CATCH_CHECK_THAT(error_of(bin), Contains(idx) && Contains("document indices run from 0 to 9"));
    restore();
    testing::write_bytes(bin, bin_bytes + std::string(2, '\0'));  // one token more than the index holds
    CATCH_CHECK_THAT(error_of(bin), Contains(bin) && Contains("end at byte " + std::to_string(bin_bytes.size())));
    restore();
  }
  {
    const int32_t version = 2;
    testing::patch(llmc, 4, &version, 4);
    CATCH_CHECK_THAT(error_of(llmc), Contains(llmc) && Contains("'version' (int32 1) is 2"));
    restore();
    const int32_t count = int32_t(corpus.tokens.size()) + 1;
    testing::patch(llmc, 8, &count, 4);
    CATCH_CHECK_THAT(error_of(llmc), Contains(llmc) && Contains("'token count'"));
    restore();
    testing::write_bytes(llmc, llmc_bytes.substr(0, 1000));
    CATCH_CHECK_THAT(error_of(llmc), Contains(llmc) && Contains("1024-byte llm.c header"));
    restore();
  }
  CATCH_CHECK(error_of(bin) == "no error");
  CATCH_CHECK(error_of(llmc) == "no error");
}

CATCH_TEST_CASE("moetrain inspect-data: format, shards, tokens, documents, vocabulary, damage exits 1 naming it",
                "[data][python][cli]") {
  TempDir dir("inspect-data");
  const Corpus corpus = make_corpus(25, 5);
  const Folders f = write_all_formats(dir, corpus);
  auto r = testing::run_command(kBinary + " inspect-data " + f.megatron16 + " --json");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  auto j = nlohmann::json::parse(r.output);
  CATCH_CHECK(j["train"]["format"] == "megatron");
  CATCH_CHECK(j["train"]["shards"] == 1);
  CATCH_CHECK(j["train"]["tokens"] == corpus.tokens.size());
  CATCH_CHECK(j["train"]["documents"] == 25);
  CATCH_CHECK(j["train"]["vocab_bound"] == 50257);
  r = testing::run_command(kBinary + " inspect-data " + f.llmc);
  CATCH_CHECK(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("llm.c") && Contains(std::to_string(corpus.tokens.size())) &&
                                 Contains("50257 (largest token + 1)"));
  r = testing::run_command(kBinary + " inspect-data " + f.ours + " --json");
  CATCH_REQUIRE(r.exit_code == 0);
  j = nlohmann::json::parse(r.output);
  CATCH_CHECK(j["val"]["vocab_bound_from"] == "header");
  CATCH_CHECK(j["val"]["documents"].is_null());

  const int32_t version = 3;
  testing::patch(files::join(f.llmc, "val.bin"), 4, &version, 4);
  r = testing::run_command("{ " + kBinary + " inspect-data " + f.llmc + " 2>&1 >/dev/null; }");
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  CATCH_CHECK_THAT(r.output, Contains(files::join(f.llmc, "val.bin")) && Contains("'version'"));
  r = testing::run_command(kBinary + " inspect-data " + dir.str("absent"));
  CATCH_CHECK(r.exit_code == 1);
}
