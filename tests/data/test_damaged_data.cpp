// Damaged data is a DataError naming the file, found as early as possible: a shard truncated while it
// is read, a token outside the header's vocabulary, a mask entry other than 0/1, a shard that is a
// folder; and prepare-data does not overwrite shards unless asked.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "../test_util.h"
#include "common/errors.h"
#include "data/sampler.h"
#include "data/shard.h"

using Catch::Matchers::Contains;
using namespace moetrain::data;
using moetrain::testing::TempDir;
using moetrain::testing::write_bytes;
using moetrain::testing::patch;
namespace files = moetrain::files;

namespace {

std::vector<int64_t> cycle(int64_t n, int64_t vocab) {
  std::vector<int64_t> tokens(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) tokens[size_t(i)] = i % vocab;
  return tokens;
}

const std::string kBinary = MOETRAIN_BINARY;

}  // namespace

CATCH_TEST_CASE("A shard truncated after it was opened: a read is a DataError naming the file, not SIGBUS", "[data]") {
  TempDir dir("truncated");
  const std::string path = dir.str("train.bin");
  write_shard(path, cycle(100000, 256), 256);
  write_mask(path, std::vector<uint8_t>(100000, 1));
  Shard shard(path);
  std::vector<int64_t> window(17);
  shard.read(90000, 17, window.data());
  CATCH_REQUIRE(window[0] == 90000 % 256);

  // Truncated in place (what `cp other train.bin` or a filling disk does while a run reads it).
  CATCH_REQUIRE(::truncate(path.c_str(), 4096) == 0);
  CATCH_REQUIRE_THROWS_WITH(shard.read(90000, 17, window.data()),
                            Contains("[data]") && Contains(path) && Contains("truncated"));
  shard.read(10, 17, window.data());  // what is still there reads as before
  CATCH_REQUIRE(window[0] == 10);

  std::vector<uint8_t> learned(17);
  CATCH_REQUIRE(::truncate(mask_path_for(path).c_str(), 1000) == 0);
  CATCH_REQUIRE_THROWS_WITH(shard.read_mask(90000, 17, learned.data()),
                            Contains(mask_path_for(path)) && Contains("truncated"));
}

CATCH_TEST_CASE("A token at or past the header's vocabulary is refused at open, naming the file and position", "[data]") {
  TempDir dir("vocab");
  struct Case {
    uint64_t vocab;
    int bytes;
    uint32_t bad_token;
  };
  for (Case c : {Case{200, 1, 200}, Case{200, 1, 255}, Case{1000, 2, 40000}, Case{70000, 4, 70000}}) {
    CATCH_INFO("vocab " << c.vocab << ", token " << c.bad_token);
    const std::string path = dir.str("v" + std::to_string(c.vocab) + ".bin");
    // Spans several scan chunks, with the bad token late in a later one.
    const int64_t n = (int64_t(3) << 20) / c.bytes;
    write_shard(path, cycle(n, int64_t(c.vocab)), c.vocab);
    const uint64_t position = uint64_t(n) - 5;
    patch(path, 32 + position * uint64_t(c.bytes), &c.bad_token, size_t(c.bytes));
    CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains("[data]") && Contains(path) &&
                                               Contains("token " + std::to_string(c.bad_token)) &&
                                               Contains("position " + std::to_string(position)) &&
                                               Contains("[0, " + std::to_string(c.vocab) + ")"));
  }
  // The header's vocabulary against the model's.
  const std::string path = dir.str("ok.bin");
  write_shard(path, cycle(100, 256), 300);
  Shard shard(path);
  require_vocabulary(shard, 300);
  CATCH_REQUIRE_THROWS_WITH(require_vocabulary(shard, 256),
                            Contains(path) && Contains("300") && Contains("model.vocab_size = 256"));
  require_window(shard, 99);
  CATCH_REQUIRE_THROWS_WITH(require_window(shard, 100),
                            Contains(path) && Contains("100 tokens") && Contains("needs at least 101"));
}

CATCH_TEST_CASE("A shard or mask that is not a regular file says what it is", "[data]") {
  TempDir dir("not-a-file");
  files::make_directories(dir.str("train.bin"));
  CATCH_REQUIRE_THROWS_WITH(Shard(dir.str("train.bin")),
                            Contains("[data]") && Contains(dir.str("train.bin")) && Contains("is a directory"));
  CATCH_REQUIRE_THROWS_WITH(Shard("/dev/zero"), Contains("/dev/zero") && Contains("not a regular file"));
  write_shard(dir.str("val.bin"), cycle(50, 256), 256);
  files::make_directories(dir.str("val.mask.bin"));
  CATCH_REQUIRE_THROWS_WITH(Shard(dir.str("val.bin")), Contains(dir.str("val.mask.bin")) && Contains("is a directory"));
}

CATCH_TEST_CASE("A loss mask holding a byte other than 0 or 1 is refused, naming the mask and position", "[data]") {
  TempDir dir("mask-bytes");
  const std::string path = dir.str("train.bin");
  write_shard(path, cycle(5000, 256), 256);
  std::vector<uint8_t> learned(5000, 0);
  for (size_t i = 0; i < learned.size(); i += 3) learned[i] = 1;
  write_mask(path, learned);
  CATCH_REQUIRE(Shard(path).learned_tokens() == 1667);
  const uint8_t two = 2;
  patch(mask_path_for(path), 64 + 4321, &two, 1);
  CATCH_REQUIRE_THROWS_WITH(Shard(path), Contains("[data]") && Contains(mask_path_for(path)) &&
                                             Contains("entry 2 at position 4321") && Contains("0 (not learned) or 1"));
}

CATCH_TEST_CASE("A training mask that learns nothing is refused before the first batch", "[data]") {
  TempDir dir("mask-none");
  const std::string path = dir.str("train.bin");
  write_shard(path, cycle(500, 256), 256);
  write_mask(path, std::vector<uint8_t>(500, 0));
  Shard shard(path);
  CATCH_REQUIRE(shard.learned_tokens() == 0);
  SamplerOptions opt;
  opt.seq_len = 8;
  CATCH_REQUIRE_THROWS_WITH(Sampler(shard, opt), Contains(mask_path_for(path)) && Contains("no token"));
}

CATCH_TEST_CASE("prepare-data refuses a folder that already holds shards unless --overwrite", "[data][cli]") {
  TempDir dir("prepare-overwrite");
  std::string text;
  for (int i = 0; i < 200; ++i) text += "line " + std::to_string(i) + " of the corpus\n";
  write_bytes(dir.str("a.txt"), text);
  write_bytes(dir.str("b.txt"), "another corpus entirely\nwith two lines and a bit more text\n" + text.substr(0, 500));
  const std::string out = dir.str("shards");

  // The library: a second prepare into the folder throws and leaves the first shards as they were.
  prepare_text({dir.str("a.txt")}, out, 0.1);
  const std::string train_before = files::read_file(files::join(out, "train.bin"));
  CATCH_REQUIRE_THROWS_WITH(prepare_text({dir.str("b.txt")}, out, 0.1),
                            Contains(out) && Contains("train.bin") && Contains("--overwrite"));
  CATCH_REQUIRE(files::read_file(files::join(out, "train.bin")) == train_before);

  // The CLI: one line on stderr, exit 1, then --overwrite replaces them.
  const std::string prepare = kBinary + " prepare-data --text " + dir.str("b.txt") + " --out " + out;
  auto refused = moetrain::testing::run_command("{ " + prepare + " 2>&1 >/dev/null; }");
  CATCH_CHECK(refused.exit_code == 1);
  CATCH_CHECK(std::count(refused.output.begin(), refused.output.end(), '\n') == 1);
  CATCH_CHECK_THAT(refused.output, Contains(out) && Contains("already holds") && Contains("--overwrite"));
  CATCH_REQUIRE(files::read_file(files::join(out, "train.bin")) == train_before);
  auto replaced = moetrain::testing::run_command(prepare + " --overwrite");
  CATCH_CHECK(replaced.exit_code == 0);
  CATCH_CHECK(files::read_file(files::join(out, "train.bin")) != train_before);
}
