// data.packing: documents. Version-2 shards and their document tables (written, read, damaged),
// first-fit packing against a hand-worked plan, truncation and documents without a learned target,
// the rows a packed batch holds, one pass per epoch, and validation batches of a short split.
#include <catch2/catch.hpp>

#include <map>
#include <numeric>
#include <set>

#include "../test_util.h"
#include "common/errors.h"
#include "data/blend.h"
#include "data/sampler.h"
#include "data/shard.h"

using namespace moetrain;
using Catch::Matchers::Contains;
using moetrain::testing::TempDir;

namespace {

// Documents of the given lengths, token t of document d = 1 + (7 * d + t) % 250 (never 0, the padding).
struct Docs {
  std::vector<int64_t> tokens;
  std::vector<uint64_t> starts;
};
Docs make_docs(const std::vector<int>& lengths) {
  Docs d;
  for (size_t i = 0; i < lengths.size(); ++i) {
    d.starts.push_back(d.tokens.size());
    for (int t = 0; t < lengths[i]; ++t) d.tokens.push_back(1 + (7 * int64_t(i) + t) % 250);
  }
  return d;
}

std::string write_docs(const TempDir& dir, const std::string& name, const std::vector<int>& lengths) {
  const Docs d = make_docs(lengths);
  const std::string path = dir.str(name);
  data::write_shard(path, d.tokens, 256, d.starts);
  return path;
}

// The lengths of each packed sequence's documents, in order.
std::vector<std::vector<int>> plan_of(const data::Packing& p) {
  std::vector<std::vector<int>> out;
  for (uint64_t i = 0; i < p.size(); ++i) {
    out.emplace_back();
    for (const auto& doc : p.sequence(i)) out.back().push_back(int(doc.length));
  }
  return out;
}

}  // namespace

CATCH_TEST_CASE("A version-2 shard keeps its document starts, and a version-1 shard is unchanged", "[data][packing]") {
  TempDir dir("packing");
  const std::string path = write_docs(dir, "train.bin", {4, 1, 6});
  const data::Shard shard(path);
  CATCH_CHECK(shard.size() == 11);
  CATCH_CHECK(shard.documents() == 3);
  CATCH_CHECK(shard.document_starts() == std::vector<uint64_t>{0, 4, 5});
  CATCH_CHECK(files::file_size(path) == 32 + 11 + 16 + 3 * 8);
  std::vector<int64_t> tokens(11);
  shard.read(0, 11, tokens.data());
  CATCH_CHECK(tokens == make_docs({4, 1, 6}).tokens);

  data::write_shard(dir.str("plain.bin"), tokens, 256);
  const data::Shard plain(dir.str("plain.bin"));
  CATCH_CHECK(files::file_size(dir.str("plain.bin")) == 32 + 11);
  CATCH_CHECK_FALSE(plain.has_documents());
  CATCH_CHECK_THROWS_WITH(plain.document_starts(), Contains("plain.bin marks no document boundaries") &&
                                                       Contains("a version-1 shard"));
  // Starts that are not 0, increasing and inside the tokens are refused before anything is written.
  for (const auto& bad : std::vector<std::vector<uint64_t>>{{1, 4}, {0, 4, 4}, {0, 11}}) {
    CATCH_CHECK_THROWS_WITH(data::write_shard(dir.str("bad.bin"), tokens, 256, bad),
                            Contains("bad.bin: document") && Contains("must start at 0"));
    CATCH_CHECK_FALSE(files::exists(dir.str("bad.bin")));
  }
}

CATCH_TEST_CASE("A damaged document table is one error naming the shard", "[data][packing]") {
  TempDir dir("packing");
  const std::string path = write_docs(dir, "train.bin", {4, 1, 6});
  const std::string good = files::read_file(path);
  const size_t table = 32 + 11;
  auto damaged = [&](size_t offset, const std::string& bytes) {
    std::string b = good;
    b.replace(offset, bytes.size(), bytes);
    testing::write_bytes(path, b);
  };
  damaged(table, "MOEDOCX");
  CATCH_CHECK_THROWS_WITH(data::Shard(path), Contains("train.bin: bad document-table magic"));
  const uint64_t four = 4;
  damaged(table + 8, std::string(reinterpret_cast<const char*>(&four), 8));
  CATCH_CHECK_THROWS_WITH(data::Shard(path), Contains("train.bin: the document table says 4 documents"));
  testing::write_bytes(path, good.substr(0, good.size() - 8));  // cut short
  CATCH_CHECK_THROWS_WITH(data::Shard(path), Contains("train.bin: the document table says 3 documents"));
  const uint64_t backwards = 3;  // document 2 would start before document 1
  damaged(table + 16 + 16, std::string(reinterpret_cast<const char*>(&backwards), 8));
  const data::Shard shard(path);  // the offsets are read when packing asks for them
  CATCH_CHECK_THROWS_WITH(shard.document_starts(), Contains("train.bin: document 2 starts at token 3") &&
                                                       Contains("damaged"));
}

CATCH_TEST_CASE("Documents are packed first-fit, each whole and once", "[data][packing]") {
  TempDir dir("packing");
  write_docs(dir, "train.bin", {10, 7, 3, 6, 2, 12});
  const auto split = data::Dataset::open(dir.path, "train");
  // seq_len 12, worked by hand: 10 opens a sequence (2 left), 7 a second (5 left), 3 joins it (2 left),
  // 6 a third, 2 fills the first, 12 a fourth.
  const data::Packing& p = split.packing(12, /*truncate=*/true);
  CATCH_CHECK(plan_of(p) == std::vector<std::vector<int>>{{10, 2}, {7, 3}, {6}, {12}});
  CATCH_CHECK(p.stats().documents == 6);
  CATCH_CHECK(p.stats().tokens == 40);
  CATCH_CHECK(p.stats().sequences == 4);
  CATCH_CHECK(p.describe() == "packed 6 documents into 4 sequences of 12 tokens (16.7% padding)");
  // Each document's start is its own.
  const auto starts = make_docs({10, 7, 3, 6, 2, 12}).starts;
  std::set<uint64_t> seen;
  for (uint64_t i = 0; i < p.size(); ++i)
    for (const auto& doc : p.sequence(i)) seen.insert(doc.start);
  CATCH_CHECK(seen == std::set<uint64_t>(starts.begin(), starts.end()));
  CATCH_CHECK(&split.packing(12, true) == &p);  // made once per split
}

CATCH_TEST_CASE("A long document is cut to seq_len and counted, or refused, by data.truncate", "[data][packing]") {
  TempDir dir("packing");
  write_docs(dir, "train.bin", {5, 30, 4});
  const auto split = data::Dataset::open(dir.path, "train");
  const data::Packing& cut = split.packing(8, true);
  CATCH_CHECK(plan_of(cut) == std::vector<std::vector<int>>{{5}, {8}, {4}});
  CATCH_CHECK(cut.stats().truncated == 1);
  CATCH_CHECK(cut.stats().truncated_tokens == 22);
  CATCH_CHECK_THAT(cut.describe(), Contains("1 longer than data.seq_len cut to it (22 tokens left out)"));
  CATCH_CHECK_THROWS_WITH(split.packing(8, false), Contains("train.bin: document 1 (tokens 5..35) holds 30 tokens") &&
                                                       Contains("data.seq_len = 8") && Contains("data.truncate"));
}

CATCH_TEST_CASE("Documents without a learned target are left out, and a split of only those is an error",
                "[data][packing]") {
  TempDir dir("packing");
  const std::string path = write_docs(dir, "train.bin", {1, 4, 3, 5});
  // Document 2 (tokens 5..7) learns nothing; document 1 learns only its last token.
  std::vector<uint8_t> mask(13, 1);
  mask[1] = mask[2] = mask[3] = 0;
  mask[5] = mask[6] = mask[7] = 0;
  data::write_mask(path, mask);
  const auto split = data::Dataset::open(dir.path, "train");
  const data::Packing& p = split.packing(16, true);
  CATCH_CHECK(plan_of(p) == std::vector<std::vector<int>>{{4, 5}});
  CATCH_CHECK(p.stats().dropped == 2);  // the single token and the unlearned one

  data::write_mask(path, std::vector<uint8_t>(13, 0));
  const auto none = data::Dataset::open(dir.path, "train");
  CATCH_CHECK_THROWS_WITH(none.packing(16, true), Contains("none of its 4 documents has a learned target"));
}

CATCH_TEST_CASE("A packed batch: tokens in place, positions from 0, targets within each document", "[data][packing]") {
  TempDir dir("packing");
  const std::string path = write_docs(dir, "train.bin", {5, 3, 6});
  std::vector<uint8_t> mask(14, 1);
  mask[6] = 0;  // document 1's second token is not learned
  data::write_mask(path, mask);
  write_docs(dir, "val.bin", {2, 2});
  const auto train = data::Dataset::open(dir.path, "train");
  const data::Blend blend({data::BlendSource{"data", 1.0, train, std::nullopt}}, data::PackingOptions{true, true});
  data::SamplerOptions opt;
  opt.seq_len = 9;
  opt.micro_batch_size = 2;
  const data::Sampler sampler(blend, opt);
  // Plan at seq_len 9: {5, 3} and {6}; one epoch of two ids reads both, in some order.
  const auto batch = sampler.batch(0, 0);
  CATCH_REQUIRE(batch.positions.defined());
  const auto docs = make_docs({5, 3, 6});
  auto row_of = [&](int64_t b) { return batch.inputs[b][0].item<int64_t>() == docs.tokens[0] ? b : 1 - b; };
  const int64_t a = row_of(0), c = 1 - a;
  auto ints = [](const torch::Tensor& t) {
    std::vector<int64_t> v(size_t(t.numel()));
    std::copy_n(t.contiguous().data_ptr<int64_t>(), t.numel(), v.begin());
    return v;
  };
  const int64_t I = data::kIgnoreTarget;
  const auto& tk = docs.tokens;
  CATCH_CHECK(ints(batch.inputs[a]) == std::vector<int64_t>{tk[0], tk[1], tk[2], tk[3], tk[4], tk[5], tk[6], tk[7], 0});
  CATCH_CHECK(ints(batch.positions[a]) == std::vector<int64_t>{0, 1, 2, 3, 4, 0, 1, 2, 0});
  CATCH_CHECK(ints(batch.targets[a]) == std::vector<int64_t>{tk[1], tk[2], tk[3], tk[4], I, I, tk[7], I, I});
  CATCH_CHECK(ints(batch.inputs[c]) == std::vector<int64_t>{tk[8], tk[9], tk[10], tk[11], tk[12], tk[13], 0, 0, 0});
  CATCH_CHECK(ints(batch.positions[c]) == std::vector<int64_t>{0, 1, 2, 3, 4, 5, 0, 0, 0});
  CATCH_CHECK(ints(batch.targets[c]) == std::vector<int64_t>{tk[9], tk[10], tk[11], tk[12], tk[13], I, I, I, I});
}

CATCH_TEST_CASE("Packed sequences: every epoch reads each once, in a seeded order, the same on resume",
                "[data][packing]") {
  TempDir dir("packing");
  std::vector<int> lengths;
  for (int d = 0; d < 37; ++d) lengths.push_back(9 + d % 4);  // one sequence each at seq_len 12
  write_docs(dir, "train.bin", lengths);
  const auto train = data::Dataset::open(dir.path, "train");
  const data::Blend blend({data::BlendSource{"data", 1.0, train, std::nullopt}}, data::PackingOptions{true, true});
  data::SamplerOptions opt;
  opt.seq_len = 12;
  const uint64_t n = train.packing(12, true).size();
  CATCH_REQUIRE(n == 37);
  std::map<uint64_t, std::vector<uint64_t>> orders;
  for (uint64_t seed : {1, 2}) {
    opt.seed = seed;
    const data::Sampler sampler(blend, opt);
    for (uint64_t epoch = 0; epoch < 3; ++epoch) {
      std::vector<uint64_t> order;
      for (uint64_t i = 0; i < n; ++i) order.push_back(sampler.packed_sequence(epoch * n + i));
      std::vector<uint64_t> sorted = order;
      std::sort(sorted.begin(), sorted.end());
      std::vector<uint64_t> all(n);
      std::iota(all.begin(), all.end(), 0);
      CATCH_CHECK(sorted == all);  // a permutation
      orders[seed * 10 + epoch] = order;
    }
    const data::Sampler again(blend, opt);  // a resumed run: the same ids read the same sequences
    for (uint64_t id : {0, 5, 40, 100}) CATCH_CHECK(again.packed_sequence(id) == sampler.packed_sequence(id));
  }
  CATCH_CHECK(orders[10] != orders[11]);  // epochs differ
  CATCH_CHECK(orders[10] != orders[20]);  // seeds differ
}

CATCH_TEST_CASE("Packed validation batches need no window of seq_len + 1 tokens and always hold a target",
                "[data][packing]") {
  TempDir dir("packing");
  write_docs(dir, "val.bin", {3, 2, 4});  // 9 tokens, shorter than one window of seq_len 16
  const auto val = data::Dataset::open(dir.path, "val");
  for (int i = 0; i < 4; ++i) {
    const auto batch = data::eval_batch(val, i, 4, 2, 16, data::PackingOptions{true, true});
    CATCH_CHECK(batch.inputs.sizes() == torch::IntArrayRef({2, 16}));
    CATCH_CHECK(batch.targets.ne(data::kIgnoreTarget).sum(1).gt(0).all().item<bool>());
  }
  CATCH_CHECK_THROWS_WITH(data::eval_batch(val, 0, 1, 1, 16), Contains("needs at least 17"));  // stream: too short
}

CATCH_TEST_CASE("moetrain prepare-data marks each file, and each separator line, as a document end", "[data][packing]") {
  TempDir dir("packing");
  std::string a, b;
  for (int i = 0; i < 30; ++i) a += "fortune " + std::to_string(i) + "\n%\n";
  for (int i = 0; i < 10; ++i) b += "line " + std::to_string(i) + "\n";
  testing::write_bytes(dir.str("a.txt"), a);
  testing::write_bytes(dir.str("b.txt"), b);
  const auto stats = data::prepare_text({dir.str("a.txt"), dir.str("b.txt")}, dir.str("out"), 0.1, false, "%");
  const data::Shard train(dir.str("out/train.bin")), val(dir.str("out/val.bin"));
  // Train: 30 fortunes (each ending with its "%" line) then b.txt, whose start is the 31st; validation
  // is the end of b.txt, one document.
  const std::string joined = a + "\n" + b;
  std::vector<uint64_t> expected{0};
  for (int i = 1; i < 30; ++i) expected.push_back(expected.back() + ("fortune " + std::to_string(i - 1) + "\n%\n").size());
  expected.push_back(a.size() + 1);  // b.txt
  CATCH_CHECK(train.document_starts() == expected);
  CATCH_CHECK(val.document_starts() == std::vector<uint64_t>{0});
  CATCH_CHECK(stats.train_documents == 31);
  CATCH_CHECK(stats.val_documents == 1);
  CATCH_CHECK(stats.train_tokens + stats.val_tokens == joined.size());
}
