// Data pipeline: byte tokenizer, token shards (format and header checks), prepare_text, and the
// stateless sampler (determinism per (seed, step, micro, rank), disjoint ranks, fixed eval windows).
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <set>

#include "common/errors.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "../test_util.h"

using Catch::Matchers::Contains;
using namespace moetrain::data;
using moetrain::testing::TempDir;
using moetrain::testing::write_bytes;
using moetrain::testing::patch;
namespace files = moetrain::files;

namespace {

// Tokens equal to their position, so a window's content reveals where it was read from.
std::vector<int64_t> positions(int64_t n) {
  std::vector<int64_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tokens[size_t(i)] = i;
  return tokens;
}

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  torch::Tensor c = t.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

}  // namespace

CATCH_TEST_CASE("byte tokenizer round-trips arbitrary bytes", "[data]") {
  ByteTokenizer tokenizer;
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes += char(b);
  all_bytes += std::string("\0\xff\0", 3);
  const std::vector<int64_t> ids = tokenizer.encode(all_bytes);
  CATCH_REQUIRE(ids.size() == all_bytes.size());
  CATCH_REQUIRE(ids[0] == 0);
  CATCH_REQUIRE(ids[255] == 255);
  CATCH_REQUIRE(ids[257] == 255);
  CATCH_REQUIRE(tokenizer.decode(ids) == all_bytes);
  CATCH_REQUIRE_THROWS_WITH(tokenizer.decode({65, 256}), Contains("[data]") && Contains("index 1"));
  CATCH_REQUIRE_THROWS_WITH(tokenizer.decode({-1}), Contains("-1"));
}

CATCH_TEST_CASE("shards round-trip in the smallest token width", "[data]") {
  TempDir dir("data");
  struct Case {
    uint64_t vocab;
    int bytes;
  };
  for (Case c : {Case{2, 1}, Case{256, 1}, Case{257, 2}, Case{65536, 2}, Case{65537, 4}, Case{uint64_t(1) << 32, 4}}) {
    CATCH_INFO("vocab " << c.vocab);
    const std::string path = dir.str("v" + std::to_string(c.vocab) + ".bin");
    std::vector<int64_t> tokens;
    for (int i = 0; i < 1000; ++i) tokens.push_back(int64_t((uint64_t(i) * 2654435761u) % c.vocab));
    tokens.push_back(int64_t(c.vocab - 1));
    tokens.push_back(0);
    write_shard(path, tokens, c.vocab);
    CATCH_REQUIRE(files::file_size(path) == 32 + tokens.size() * size_t(c.bytes));
    CATCH_REQUIRE_FALSE(files::exists(path + ".tmp." + std::to_string(::getpid())));

    Shard shard(path);
    CATCH_REQUIRE(shard.path() == path);
    CATCH_REQUIRE(shard.size() == tokens.size());
    CATCH_REQUIRE(shard.vocab_size() == c.vocab);
    CATCH_REQUIRE(shard.bytes_per_token() == c.bytes);
    std::vector<int64_t> back(tokens.size());
    shard.read(0, tokens.size(), back.data());
    CATCH_REQUIRE(back == tokens);
    CATCH_REQUIRE(shard.at(1000) == int64_t(c.vocab - 1));
    std::vector<int64_t> middle(3);
    shard.read(5, 3, middle.data());
    CATCH_REQUIRE(middle == std::vector<int64_t>(tokens.begin() + 5, tokens.begin() + 8));
    CATCH_REQUIRE_THROWS_WITH(shard.read(tokens.size() - 2, 3, middle.data()), Contains(path));
    CATCH_REQUIRE_THROWS_WITH(shard.read(UINT64_MAX, 2, middle.data()), Contains(path));
  }
  // An empty shard is valid.
  write_shard(dir.str("empty.bin"), {}, 256);
  CATCH_REQUIRE(Shard(dir.str("empty.bin")).size() == 0);
}

CATCH_TEST_CASE("write_shard rejects tokens outside the vocabulary", "[data]") {
  TempDir dir("data");
  const std::string path = dir.str("bad.bin");
  CATCH_REQUIRE_THROWS_WITH(write_shard(path, {1, 2, 3, 300}, 256), Contains(path) && Contains("index 3"));
  CATCH_REQUIRE_THROWS_WITH(write_shard(path, {1, -1}, 256), Contains(path) && Contains("index 1"));
  CATCH_REQUIRE_THROWS_WITH(write_shard(path, {0}, 0), Contains(path) && Contains("vocab_size"));
  CATCH_REQUIRE_FALSE(files::exists(path));
}

CATCH_TEST_CASE("Shard refuses a header that does not match the file", "[data]") {
  TempDir dir("data");
  const std::string path = dir.str("shard.bin");
  write_shard(path, positions(100), 256);

  CATCH_SECTION("missing file") {
    CATCH_REQUIRE_THROWS_WITH(Shard(dir.str("absent.bin")), Contains("absent.bin"));
  }
  CATCH_SECTION("shorter than the header") {
    CATCH_REQUIRE(::truncate(path.c_str(), 20) == 0);
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains(path) && Contains("header"));
  }
  CATCH_SECTION("bad magic") {
    patch(path, 0, "NOTTOKS", 7);
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains(path) && Contains("magic"));
  }
  CATCH_SECTION("unknown version") {
    const uint32_t version = 7;
    patch(path, 8, &version, 4);
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains(path) && Contains("'version' is 7"));
  }
  CATCH_SECTION("unknown dtype") {
    const uint32_t dtype = 3;
    patch(path, 12, &dtype, 4);
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains(path) && Contains("'dtype' is 3"));
  }
  CATCH_SECTION("count larger than the file") {
    const uint64_t count = 101;
    patch(path, 16, &count, 8);
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains(path) && Contains("'count'"));
  }
  CATCH_SECTION("trailing bytes") {
    std::ofstream(path, std::ios::binary | std::ios::app) << 'x';
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains(path) && Contains("'count'"));
  }
  CATCH_SECTION("count that overflows") {
    const uint64_t count = UINT64_MAX / 2 + 2;
    const uint32_t dtype = 2;
    patch(path, 12, &dtype, 4);
    patch(path, 16, &count, 8);
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains(path) && Contains("'count'"));
  }
}

CATCH_TEST_CASE("prepare_text splits at a line boundary", "[data]") {
  TempDir dir("data");
  std::string first, second;
  for (int i = 0; i < 60; ++i) first += "line " + std::to_string(i) + " of the first file\n";
  for (int i = 0; i < 40; ++i) second += "second file, line " + std::to_string(i) + "\n";
  second += std::string("bytes \0\xff end", 12);  // no trailing newline
  write_bytes(dir.str("a.txt"), first);
  write_bytes(dir.str("b.txt"), second);
  const std::string joined = first + "\n" + second;

  const std::string out = dir.str("out/nested");
  const PrepareStats stats = prepare_text({dir.str("a.txt"), dir.str("b.txt")}, out, 0.1);
  CATCH_REQUIRE(stats.train_tokens + stats.val_tokens == joined.size());
  CATCH_REQUIRE(joined[stats.train_tokens - 1] == '\n');  // train ends with a complete line
  // The split is the last line boundary at or before 90%.
  const size_t target = size_t(double(joined.size()) * 0.9);
  CATCH_REQUIRE(stats.train_tokens <= target);
  CATCH_REQUIRE(joined.find('\n', stats.train_tokens) >= target);

  Shard train(out + "/train.bin"), val(out + "/val.bin");
  CATCH_REQUIRE(train.size() == stats.train_tokens);
  CATCH_REQUIRE(val.size() == stats.val_tokens);
  CATCH_REQUIRE(train.vocab_size() == 256);
  CATCH_REQUIRE(train.bytes_per_token() == 1);
  std::vector<int64_t> train_ids(train.size()), val_ids(val.size());
  train.read(0, train.size(), train_ids.data());
  val.read(0, val.size(), val_ids.data());
  ByteTokenizer tokenizer;
  CATCH_REQUIRE(tokenizer.decode(train_ids) == joined.substr(0, stats.train_tokens));
  CATCH_REQUIRE(tokenizer.decode(val_ids) == joined.substr(stats.train_tokens));
  for (const std::string& name : files::list_directory(out)) {  // no temporary files left behind
    CATCH_REQUIRE((name == "train.bin" || name == "val.bin"));
  }
}

CATCH_TEST_CASE("prepare_text refuses missing files and text too small to split", "[data]") {
  TempDir dir("data");
  write_bytes(dir.str("one_line.txt"), "just one line without a break");
  write_bytes(dir.str("ok.txt"), "first\nsecond\n");
  CATCH_REQUIRE_THROWS_WITH(prepare_text({dir.str("ok.txt"), dir.str("absent.txt")}, dir.str("out")),
                            Contains("[data]") && Contains("absent.txt"));
  CATCH_REQUIRE_THROWS_WITH(prepare_text({dir.str("one_line.txt")}, dir.str("out")),
                            Contains("one_line.txt") && Contains("too small"));
  write_bytes(dir.str("empty.txt"), "");
  CATCH_REQUIRE_THROWS_WITH(prepare_text({dir.str("empty.txt")}, dir.str("out")), Contains("too small"));
  CATCH_REQUIRE_FALSE(files::exists(dir.str("out/train.bin")));
  // Two files always have the separator to split at.
  const PrepareStats stats = prepare_text({dir.str("one_line.txt"), dir.str("one_line.txt")}, dir.str("out"), 0.5);
  CATCH_REQUIRE(stats.train_tokens == 30);
  CATCH_REQUIRE(stats.val_tokens == 29);
}

CATCH_TEST_CASE("mix64 is the splitmix64 finalizer", "[data]") {
  // splitmix64 seeded with 0 yields mix64(0x9e3779b97f4a7c15) first; the published first output.
  CATCH_REQUIRE(mix64(0x9e3779b97f4a7c15ULL) == 0xe220a8397b1dcdafULL);
  CATCH_REQUIRE(mix64(0) == 0);
}

CATCH_TEST_CASE("sampler batches are a pure function of (seed, step, micro, rank)", "[data]") {
  TempDir dir("data");
  const std::string path = dir.str("train.bin");
  const int64_t n_tokens = 100000;
  write_shard(path, positions(n_tokens), uint64_t(n_tokens));
  Shard shard(path);

  SamplerOptions opt;
  opt.seed = 7;
  opt.seq_len = 32;
  opt.micro_batch_size = 4;
  opt.grad_accum = 2;
  opt.world_size = 2;
  opt.rank = 1;
  Sampler a(shard, opt), b(shard, opt);
  const Batch first = a.batch(5, 1);
  CATCH_REQUIRE(first.inputs.scalar_type() == torch::kInt64);
  CATCH_REQUIRE(first.inputs.sizes() == torch::IntArrayRef({4, 32}));
  CATCH_REQUIRE(first.targets.sizes() == torch::IntArrayRef({4, 32}));
  CATCH_REQUIRE(first.inputs.device().is_cpu());
  // A second sampler, and a later call in any order, give identical batches.
  b.batch(0, 0);
  CATCH_REQUIRE(torch::equal(first.inputs, b.batch(5, 1).inputs));
  CATCH_REQUIRE(torch::equal(first.targets, b.batch(5, 1).targets));

  // Targets are the inputs shifted by one; each row is the window at offset(global sequence id).
  CATCH_REQUIRE(torch::equal(first.inputs.slice(1, 1), first.targets.slice(1, 0, 31)));
  for (int i = 0; i < 4; ++i) {
    const uint64_t start = a.offset(a.global_sequence(5, 1, i));
    CATCH_REQUIRE(start + 33 <= shard.size());
    CATCH_REQUIRE(first.inputs[i][0].item<int64_t>() == int64_t(start));
    CATCH_REQUIRE(first.targets[i][31].item<int64_t>() == int64_t(start + 32));
  }

  // Different rank, micro-batch, step or seed: different windows.
  SamplerOptions other_rank = opt;
  other_rank.rank = 0;
  SamplerOptions other_seed = opt;
  other_seed.seed = 8;
  CATCH_REQUIRE_FALSE(torch::equal(first.inputs, Sampler(shard, other_rank).batch(5, 1).inputs));
  CATCH_REQUIRE_FALSE(torch::equal(first.inputs, Sampler(shard, other_seed).batch(5, 1).inputs));
  CATCH_REQUIRE_FALSE(torch::equal(first.inputs, a.batch(5, 0).inputs));
  CATCH_REQUIRE_FALSE(torch::equal(first.inputs, a.batch(6, 1).inputs));
  CATCH_REQUIRE_THROWS_WITH(a.batch(0, 2), Contains(path) && Contains("micro 2"));
}

CATCH_TEST_CASE("sampler global sequence ids are disjoint across ranks", "[data]") {
  TempDir dir("data");
  write_shard(dir.str("train.bin"), positions(1000), 1000);
  Shard shard(dir.str("train.bin"));
  for (int world_size : {1, 3, 8}) {
    std::set<uint64_t> seen;
    const int micro_batch_size = 5, grad_accum = 3, n_steps = 4;
    for (int rank = 0; rank < world_size; ++rank) {
      SamplerOptions opt;
      opt.seq_len = 16;
      opt.micro_batch_size = micro_batch_size;
      opt.grad_accum = grad_accum;
      opt.world_size = world_size;
      opt.rank = rank;
      Sampler sampler(shard, opt);
      for (int step = 0; step < n_steps; ++step)
        for (int micro = 0; micro < grad_accum; ++micro)
          for (int i = 0; i < micro_batch_size; ++i) {
            CATCH_REQUIRE(seen.insert(sampler.global_sequence(step, micro, i)).second);
          }
    }
    // The ids tile [0, total) with no gaps: the run consumes a dense prefix of the id space.
    const size_t total = size_t(world_size) * micro_batch_size * grad_accum * n_steps;
    CATCH_REQUIRE(seen.size() == total);
    CATCH_REQUIRE(*seen.rbegin() == total - 1);
  }
}

CATCH_TEST_CASE("sampler refuses a shard shorter than one window", "[data]") {
  TempDir dir("data");
  const std::string path = dir.str("tiny.bin");
  write_shard(path, positions(8), 256);
  Shard shard(path);
  SamplerOptions opt;
  opt.seq_len = 8;
  CATCH_REQUIRE_THROWS_WITH(Sampler(shard, opt), Contains("[data]") && Contains(path) && Contains("needs at least 9"));
  opt.seq_len = 7;  // exactly one window: the only offset is 0
  Sampler sampler(shard, opt);
  CATCH_REQUIRE(to_vector(sampler.batch(3, 0).inputs[0]) == std::vector<int64_t>({0, 1, 2, 3, 4, 5, 6}));
  opt.rank = 1;
  CATCH_REQUIRE_THROWS_WITH(Sampler(shard, opt), Contains("rank 1 of world_size 1"));
}

CATCH_TEST_CASE("eval batches are fixed, evenly spaced windows", "[data]") {
  TempDir dir("data");
  const std::string path = dir.str("val.bin");
  write_shard(path, positions(1000), 1000);
  Shard shard(path);

  // Big enough for disjoint windows: 3 batches x 2 windows, stride 1000 / 6 = 166.
  std::vector<int64_t> starts;
  for (int index = 0; index < 3; ++index) {
    const Batch batch = eval_batch(shard, index, 3, 2, 64);
    CATCH_REQUIRE(batch.inputs.sizes() == torch::IntArrayRef({2, 64}));
    CATCH_REQUIRE(torch::equal(batch.inputs, eval_batch(shard, index, 3, 2, 64).inputs));
    CATCH_REQUIRE(torch::equal(batch.inputs.slice(1, 1), batch.targets.slice(1, 0, 63)));
    for (int b = 0; b < 2; ++b) starts.push_back(batch.inputs[b][0].item<int64_t>());
  }
  CATCH_REQUIRE(starts == std::vector<int64_t>({0, 166, 332, 498, 664, 830}));

  // Too short for disjoint windows: starts spread over all valid starts [0, 1000 - 301].
  starts.clear();
  for (int index = 0; index < 4; ++index) {
    const Batch batch = eval_batch(shard, index, 4, 1, 300);
    starts.push_back(batch.inputs[0][0].item<int64_t>());
    CATCH_REQUIRE(batch.targets[0][299].item<int64_t>() < 1000);
  }
  CATCH_REQUIRE(starts == std::vector<int64_t>({0, 175, 350, 525}));
  CATCH_REQUIRE_THROWS_WITH(eval_batch(shard, 0, 1, 1, 1000), Contains(path) && Contains("needs at least 1001"));
  CATCH_REQUIRE_THROWS_WITH(eval_batch(shard, 3, 3, 1, 10), Contains(path));
}
