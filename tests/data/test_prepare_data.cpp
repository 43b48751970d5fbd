// scripts/prepare_data.py against the tokenizer's own encoding: plain text and prompt/response jsonl,
// the loss mask over exactly the response tokens, uint32 tokens for a vocabulary past 65536, and
// files byte for byte what the C++ writers write. Tokenizers come from tests/data/tokenizer_fixture.py.
#include <catch2/catch.hpp>

#include <algorithm>

#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "shard_contents.h"
#include "data/shard.h"

using Catch::Matchers::Contains;
using namespace moetrain;
using moetrain::testing::mask_of;
using moetrain::testing::tokens_of;
using moetrain::testing::TempDir;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kPython = kSource + "/third_party/venv/bin/python ";

testing::CommandResult prepare_data(const std::string& args) {
  return testing::run_command(kPython + kSource + "/scripts/prepare_data.py " + args);
}

void fixture(const std::string& args) {
  const auto r = testing::run_command(kPython + kSource + "/tests/data/tokenizer_fixture.py " + args);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

// The tokenizer's own ids for each (text, add_special_tokens).
std::vector<std::vector<int64_t>> encode(const TempDir& dir, const std::string& tokenizer_dir,
                                         const std::vector<std::pair<std::string, bool>>& items) {
  nlohmann::json in = nlohmann::json::array();
  for (const auto& [text, special] : items) in.push_back({text, special});
  testing::write_bytes(dir.str("encode_in.json"), in.dump());
  fixture("encode " + tokenizer_dir + " " + dir.str("encode_in.json") + " " + dir.str("encode_out.json"));
  return nlohmann::json::parse(files::read_file(dir.str("encode_out.json"))).get<std::vector<std::vector<int64_t>>>();
}

std::vector<int64_t> concat(std::initializer_list<std::vector<int64_t>> parts) {
  std::vector<int64_t> out;
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

}  // namespace

CATCH_TEST_CASE("prepare_data.py: .txt tokens equal the tokenizer's encode, split at a line", "[data][python]") {
  TempDir dir("prepare-txt");
  fixture("bpe " + dir.str("tok"));
  // 20 lines of equal length: --val-fraction 0.25 puts exactly the last 5 in val.bin.
  std::string train_text, val_text;
  for (int i = 10; i < 30; ++i) {
    const std::string line = "Line " + std::to_string(i) + ": the quick brown fox jumps over the lazy dog.\n";
    (i < 25 ? train_text : val_text) += line;
  }
  testing::write_bytes(dir.str("corpus.txt"), train_text + val_text);
  const auto r = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("corpus.txt") + " --out " +
                              dir.str("out") + " --val-fraction 0.25 --append-eos");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);

  const auto expected = encode(dir, dir.str("tok"), {{train_text, true}, {val_text, true}, {"<|endoftext|>", false}});
  CATCH_REQUIRE(expected[2].size() == 1);
  const int64_t eos = expected[2][0];
  const data::Shard train(dir.str("out/train.bin")), val(dir.str("out/val.bin"));
  CATCH_CHECK(tokens_of(train) == concat({expected[0], {eos}}));
  CATCH_CHECK(tokens_of(val) == concat({expected[1], {eos}}));
  CATCH_CHECK(train.bytes_per_token() == 2);  // a few hundred tokens: uint16
  CATCH_CHECK(train.vocab_size() > 256);
  CATCH_CHECK(train.vocab_size() <= 400);
  CATCH_CHECK_FALSE(train.has_mask());  // plain text is learned everywhere
  CATCH_CHECK_FALSE(files::exists(dir.str("out/val.mask.bin")));
}

CATCH_TEST_CASE("prepare_data.py: prompt/response jsonl masks exactly the response tokens", "[data][python]") {
  TempDir dir("prepare-jsonl");
  fixture("bpe " + dir.str("tok"));
  const std::vector<std::pair<std::string, std::string>> pairs = {
      {"Question: what is two plus two?", " Answer: four."},
      {"The quick brown", " fox jumps over the lazy dog."},
      {"Mixture-of-experts models route", " each token to a few experts."},
      {"Fine-tuning teaches", " a pretrained model."},
      {"Question: what routes tokens?", " Answer: the router."}};
  std::string jsonl;
  std::vector<std::pair<std::string, bool>> items;
  for (const auto& [prompt, response] : pairs) {
    jsonl += nlohmann::json{{"prompt", prompt}, {"response", response}, {"id", 1}}.dump() + "\n";
    items.push_back({prompt, true});
    items.push_back({response, false});
  }
  items.push_back({"<|endoftext|>", false});
  testing::write_bytes(dir.str("pairs.jsonl"), jsonl);
  auto r = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("pairs.jsonl") + " --out " +
                        dir.str("out") + " --val-fraction 0.2 --append-eos");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);

  // Records 0-3 in train.bin, record 4 in val.bin: prompt, response, EOS; the mask is 1 on the last two.
  const auto ids = encode(dir, dir.str("tok"), items);
  const int64_t eos = ids.back()[0];
  std::vector<int64_t> train_tokens, val_tokens;
  std::vector<uint8_t> train_mask, val_mask;
  std::vector<uint64_t> train_starts;  // each record is a document of the version-2 shard
  for (size_t k = 0; k < pairs.size(); ++k) {
    auto& tokens = k < 4 ? train_tokens : val_tokens;
    auto& mask = k < 4 ? train_mask : val_mask;
    const auto& prompt = ids[2 * k];
    const auto& response = ids[2 * k + 1];
    CATCH_REQUIRE(!response.empty());
    if (k < 4) train_starts.push_back(tokens.size());
    tokens.insert(tokens.end(), prompt.begin(), prompt.end());
    tokens.insert(tokens.end(), response.begin(), response.end());
    tokens.push_back(eos);
    mask.insert(mask.end(), prompt.size(), 0);
    mask.insert(mask.end(), response.size() + 1, 1);
  }
  const data::Shard train(dir.str("out/train.bin")), val(dir.str("out/val.bin"));
  CATCH_REQUIRE(train.has_mask());
  CATCH_REQUIRE(val.has_mask());
  CATCH_CHECK(tokens_of(train) == train_tokens);
  CATCH_CHECK(mask_of(train) == train_mask);
  CATCH_CHECK(tokens_of(val) == val_tokens);
  CATCH_CHECK(mask_of(val) == val_mask);

  // The mask file is byte for byte what the C++ writer writes for the same entries.
  files::make_directories(dir.str("cpp"));
  data::write_shard(dir.str("cpp/train.bin"), train_tokens, train.vocab_size(), train_starts);
  data::write_mask(dir.str("cpp/train.bin"), train_mask);
  CATCH_CHECK(files::read_file(dir.str("cpp/train.bin")) == files::read_file(dir.str("out/train.bin")));
  CATCH_CHECK(files::read_file(dir.str("cpp/train.mask.bin")) == files::read_file(dir.str("out/train.mask.bin")));

  // Into a folder that holds shards: refused without --overwrite, shards untouched.
  testing::write_bytes(dir.str("docs.jsonl"), "{\"text\": \"The quick brown fox.\"}\n{\"text\": \"Answer: four.\"}\n");
  const std::string before = files::read_file(dir.str("out/train.bin"));
  r = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("docs.jsonl") + " --out " + dir.str("out"));
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK_THAT(r.output, Contains("already holds") && Contains("--overwrite"));
  CATCH_CHECK(files::read_file(dir.str("out/train.bin")) == before);
  // With --overwrite, plain text replaces them and removes the stale masks.
  r = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("docs.jsonl") + " --out " + dir.str("out") +
                   " --overwrite");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK_FALSE(files::exists(dir.str("out/train.mask.bin")));
  CATCH_CHECK(tokens_of(data::Shard(dir.str("out/train.bin"))) == encode(dir, dir.str("tok"), {{"The quick brown fox.", true}})[0]);
}

// Streaming (--workers, --shard-tokens): the in-memory path's tokens and masks, in order, whatever the
// number of workers, cut into shards of at most the limit; a .txt past the 1 MiB encoding chunk
// (several chunks, CRLF lines) and prompt/response jsonl in batches of records.
CATCH_TEST_CASE("prepare_data.py: --workers and --shard-tokens stream the same tokens into bounded shards",
                "[data][python]") {
  TempDir dir("prepare-stream");
  fixture("bpe " + dir.str("tok"));
  const std::vector<std::string> words = {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
                                          "experts", "route", "each", "token", "Question:", "Answer:"};
  std::string text, jsonl;
  uint64_t x = 7;
  auto next = [&] { return x = x * 6364136223846793005ull + 1442695040888963407ull, (x >> 33); };
  for (int line = 0; line < 50000; ++line) {
    for (uint64_t w = 0, n = 3 + next() % 12; w < n; ++w) text += (w ? " " : "") + words[next() % words.size()];
    text += line % 7 ? "\n" : "\r\n";
  }
  for (int r = 0; r < 600; ++r)
    jsonl += nlohmann::json{{"prompt", words[next() % words.size()] + " " + words[next() % words.size()]},
                            {"response", " " + words[next() % words.size()]}}.dump() + (r % 50 ? "\n" : "\n\n");
  testing::write_bytes(dir.str("big.txt"), text);
  testing::write_bytes(dir.str("pairs.jsonl"), jsonl);
  CATCH_REQUIRE(text.size() > (size_t(2) << 20));

  auto shards_of = [&](const std::string& out, const std::string& split) {
    std::vector<std::string> names;
    for (const auto& name : files::list_directory(dir.str(out)))
      if (name.rfind(split + "-", 0) == 0 && name.find(".mask.") == std::string::npos) names.push_back(name);
    std::sort(names.begin(), names.end());
    return names;
  };
  for (const std::string input : {"big.txt", "pairs.jsonl"}) {
    const bool pairs = input == "pairs.jsonl";
    const std::string base = "--tokenizer " + dir.str("tok") + " --input " + dir.str(input) + " --append-eos";
    auto whole = prepare_data(base + " --out " + dir.str(input + "-whole"));
    CATCH_INFO(whole.output);
    CATCH_REQUIRE(whole.exit_code == 0);
    const int64_t limit = pairs ? 700 : 200000;
    for (const int workers : {1, 2}) {
      const std::string out = input + "-w" + std::to_string(workers);
      auto r = prepare_data(base + " --out " + dir.str(out) + " --workers " + std::to_string(workers) +
                            " --shard-tokens " + std::to_string(limit) + " --batch-records 64");
      CATCH_INFO(r.output);
      CATCH_REQUIRE(r.exit_code == 0);
      CATCH_CHECK_THAT(r.output, Contains("tokens/s"));
      for (const std::string split : {"train", "val"}) {
        const data::Shard want(dir.str(input + "-whole/" + split + ".bin"));
        std::vector<int64_t> tokens;
        std::vector<uint8_t> mask;
        const auto names = shards_of(out, split);
        CATCH_REQUIRE(!names.empty());
        for (const auto& name : names) {
          const data::Shard shard(files::join(dir.str(out), name));
          CATCH_CHECK(int64_t(shard.size()) <= limit);
          CATCH_CHECK(shard.has_mask() == pairs);
          const auto t = tokens_of(shard);
          tokens.insert(tokens.end(), t.begin(), t.end());
          if (pairs) {
            const auto m = mask_of(shard);
            mask.insert(mask.end(), m.begin(), m.end());
          }
        }
        CATCH_INFO(input << " " << split << ", " << workers << " worker(s), " << names.size() << " shards");
        CATCH_CHECK(tokens == tokens_of(want));
        if (pairs) CATCH_CHECK(mask == mask_of(want));
      }
    }
  }
  CATCH_CHECK(shards_of("big.txt-w2", "train").size() >= 3);
  // moetrain reads the folder as one split per name.
  auto inspect = testing::run_command(std::string(MOETRAIN_BINARY) + " inspect-data " + dir.str("big.txt-w2"));
  CATCH_INFO(inspect.output);
  CATCH_CHECK(inspect.exit_code == 0);
  // Re-sharding in place with --overwrite leaves no stale shard of the old cut.
  auto again = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("big.txt") + " --out " +
                            dir.str("big.txt-w2") + " --shard-tokens 500000 --overwrite");
  CATCH_REQUIRE(again.exit_code == 0);
  CATCH_CHECK(shards_of("big.txt-w2", "train").size() == 2);
  auto bad = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("big.txt") + " --out " +
                          dir.str("bad") + " --workers 0");
  CATCH_CHECK(bad.exit_code == 1);
  CATCH_CHECK_THAT(bad.output, Contains("--workers 0 must be at least 1"));
}

CATCH_TEST_CASE("prepare_data.py: a vocabulary past 65536 gives uint32 tokens, the C++ writer's bytes", "[data][python]") {
  TempDir dir("prepare-wide");
  fixture("words " + dir.str("tok") + " 70000");  // w0 .. w69999, [UNK] = 70000, <eos> = 70001
  testing::write_bytes(dir.str("docs.jsonl"), "{\"text\": \"w1 w65536 w69999 w7\"}\n{\"text\": \"w65535 w0\"}\n");
  const auto r = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("docs.jsonl") + " --out " +
                              dir.str("out") + " --append-eos");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  const data::Shard train(dir.str("out/train.bin")), val(dir.str("out/val.bin"));
  CATCH_CHECK(train.bytes_per_token() == 4);
  CATCH_CHECK(train.vocab_size() == 70002);
  const std::vector<int64_t> expected = {1, 65536, 69999, 7, 70001};
  CATCH_CHECK(tokens_of(train) == expected);
  CATCH_CHECK(tokens_of(val) == std::vector<int64_t>{65535, 0, 70001});
  files::make_directories(dir.str("cpp"));
  data::write_shard(dir.str("cpp/train.bin"), expected, 70002, {0});  // one record, one document
  CATCH_CHECK(files::read_file(dir.str("cpp/train.bin")) == files::read_file(dir.str("out/train.bin")));
}

CATCH_TEST_CASE("prepare_data.py: bad input is one line naming the file, line and field", "[data][python]") {
  TempDir dir("prepare-errors");
  fixture("words " + dir.str("tok") + " 10");
  testing::write_bytes(dir.str("pairs.jsonl"),
                       "{\"prompt\": \"w1\", \"response\": \"w2\"}\n{\"prompt\": \"w3\", \"response\": \"w4\"}\n"
                       "{\"prompt\": \"w5\"}\n");
  auto r = prepare_data("--tokenizer " + dir.str("tok") + " --input " + dir.str("pairs.jsonl") + " --out " + dir.str("out"));
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK_THAT(r.output, Contains("pairs.jsonl:3") && Contains("'response'") && Contains("missing"));
  CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  r = prepare_data("--tokenizer " + dir.str("nowhere") + " --input " + dir.str("pairs.jsonl") + " --out " + dir.str("out"));
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK_THAT(r.output, Contains("tokenizer.json") && Contains("does not exist"));
}
