// RL prompt sets (data/prompts.h): `moetrain prepare-data --rl` writes a shard of prompt documents and
// their answers, which read back token for token as the .jsonl path reads them; a damaged or mismatched
// set is one DataError naming the file.
#include <catch2/catch.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "common/errors.h"
#include "data/prompts.h"
#include "data/shard.h"

using Catch::Matchers::Contains;
using namespace moetrain;
using namespace moetrain::data;
using moetrain::testing::TempDir;
using moetrain::testing::write_bytes;

namespace {

// Prompts with what a byte tokenizer must keep exactly: UTF-8, a tab, quotes, and a numeric answer.
std::string prompts_jsonl(int n, int salt = 0) {
  std::string out;
  for (int i = 0; i < n; ++i) {
    nlohmann::json j{{"prompt", std::to_string(i + salt) + "+" + std::to_string(i % 3) + "= \"é\"\t"}};
    if (i % 4 == 3)
      j["answer"] = i + salt + i % 3;  // a number: kept as its JSON text
    else
      j["answer"] = std::to_string(i + salt + i % 3);
    out += j.dump() + "\n";
    if (i == 1) out += "\n";  // blank lines are skipped
  }
  return out;
}

void require_same(const std::vector<RLPrompt>& got, const std::vector<RLPrompt>& want) {
  CATCH_REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    CATCH_INFO("prompt " << i);
    CATCH_CHECK(got[i].tokens == want[i].tokens);
    CATCH_CHECK(got[i].prompt == want[i].prompt);
    CATCH_CHECK(got[i].answer == want[i].answer);
  }
}

void require_same(const PromptSet& got, const std::vector<RLPrompt>& want) {
  CATCH_CHECK(got.is_bytes());
  CATCH_CHECK(got.stop_ids.empty());
  require_same(got.prompts, want);
}

std::string read_text(const std::string& path) { return files::read_file(path); }

}  // namespace

CATCH_TEST_CASE("prepare-data --rl reads back as the .jsonl does, token for token, from the folder or its .bin",
                "[data][rl]") {
  TempDir dir("rl-prompts");
  write_bytes(dir.str("p.jsonl"), prompts_jsonl(9));
  const auto want = read_prompt_jsonl(dir.str("p.jsonl"));
  CATCH_REQUIRE(want.size() == 9);
  CATCH_CHECK(want[3].answer == "3");
  const auto stats = prepare_prompt_set(dir.str("p.jsonl"), dir.str("set"));
  CATCH_CHECK(stats.prompts == 9);
  CATCH_CHECK(stats.shard == dir.str("set/prompts.bin"));
  CATCH_CHECK(stats.answers == dir.str("set/prompts.answers.jsonl"));
  // Our shard format, version 2: one document per prompt.
  const Shard shard(stats.shard);
  CATCH_CHECK(shard.documents() == 9);
  CATCH_CHECK(shard.vocab_size() == 256);
  require_same(read_prompt_set(stats.shard), want);
  require_same(load_prompts(dir.str("set")), want);
  require_same(load_prompts(stats.shard), want);
  require_same(load_prompts(dir.str("p.jsonl")), want);

  // The CLI writes the same bytes, and refuses to replace a set unless --overwrite.
  const std::string cli = std::string(MOETRAIN_BINARY) + " prepare-data --rl " + dir.str("p.jsonl") + " --out " + dir.str("cli");
  const auto r = testing::run_command(cli);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("9 prompts"));
  CATCH_CHECK(read_text(dir.str("cli/prompts.bin")) == read_text(stats.shard));
  CATCH_CHECK(read_text(dir.str("cli/prompts.answers.jsonl")) == read_text(stats.answers));
  write_bytes(dir.str("q.jsonl"), prompts_jsonl(4, 100));
  const std::string again = std::string(MOETRAIN_BINARY) + " prepare-data --rl " + dir.str("q.jsonl") + " --out " + dir.str("cli");
  const auto refused = testing::run_command("{ " + again + " 2>&1 >/dev/null; }");
  CATCH_CHECK(refused.exit_code == 1);
  CATCH_CHECK(testing::one_line(refused.output));
  CATCH_CHECK_THAT(refused.output, Contains(dir.str("cli")) && Contains("already holds a prompt set") && Contains("--overwrite"));
  CATCH_CHECK(read_text(dir.str("cli/prompts.bin")) == read_text(stats.shard));
  CATCH_REQUIRE(testing::run_command(again + " --overwrite").exit_code == 0);
  require_same(load_prompts(dir.str("cli")), read_prompt_jsonl(dir.str("q.jsonl")));
  const auto both = testing::run_command("{ " + again + " --text " + dir.str("q.jsonl") + " 2>&1 >/dev/null; }");
  CATCH_CHECK(both.exit_code == 2);
  CATCH_CHECK_THAT(both.output, Contains("--text or --rl"));
}

CATCH_TEST_CASE("A damaged or mismatched prompt set is one DataError naming the file", "[data][rl]") {
  TempDir dir("rl-prompts-damaged");
  write_bytes(dir.str("a.jsonl"), prompts_jsonl(6));
  write_bytes(dir.str("b.jsonl"), prompts_jsonl(6, 1));  // the same sizes, other prompts
  const auto a = prepare_prompt_set(dir.str("a.jsonl"), dir.str("a")).shard;
  const auto b = prepare_prompt_set(dir.str("b.jsonl"), dir.str("b")).shard;
  CATCH_REQUIRE(files::file_size(a) == files::file_size(b));
  const std::string answers = answers_path_for(a);
  const std::string good = read_text(answers);
  auto refused = [&](const std::string& path, const std::string& names, const std::string& says) {
    CATCH_INFO(path << ": expected an error naming " << names << " and saying " << says);
    CATCH_REQUIRE_THROWS_AS(read_prompt_set(path), DataError);
    try {
      read_prompt_set(path);
    } catch (const DataError& e) {
      const std::string what = e.what();
      CATCH_CHECK(what.find('\n') == std::string::npos);
      CATCH_CHECK_THAT(what, Contains("[data]") && Contains(names) && Contains(says));
    }
  };

  refused(dir.str("none/prompts.bin"), dir.str("none/prompts.bin"), "prepare-data --rl");
  for (const char* sub : {"swap", "lone", "v1"}) files::make_directories(dir.str(sub));
  // Another set's shard beside these answers: the checksum tells them apart.
  write_bytes(dir.str("swap/prompts.bin"), read_text(b));
  write_bytes(dir.str("swap/prompts.answers.jsonl"), good);
  refused(dir.str("swap/prompts.bin"), dir.str("swap/prompts.answers.jsonl"), "checksum");
  // No answers beside the shard.
  write_bytes(dir.str("lone/prompts.bin"), read_text(a));
  refused(dir.str("lone/prompts.bin"), dir.str("lone/prompts.answers.jsonl"), "does not exist");
  // An answer missing, one too many, one that is not a string.
  write_bytes(answers, good.substr(0, good.rfind('\n', good.size() - 2) + 1));
  refused(a, answers, "5 answers for the 6 prompts");
  write_bytes(answers, good + "{\"answer\": \"7\"}\n");
  refused(a, answers + ":8", "more answers");
  write_bytes(answers, good.substr(0, good.find('\n') + 1) + "{\"answer\": 3}\n");
  refused(a, answers + ":2", "string \"answer\"");
  // A header that is not one, another version, another tokenizer.
  write_bytes(answers, "{\"answer\": \"1\"}\n");
  refused(a, answers + ":1", "header");
  auto header = nlohmann::json::parse(good.substr(0, good.find('\n')));
  const std::string rest = good.substr(good.find('\n'));
  auto with = [&](const char* key, const nlohmann::json& value) {
    auto h = header;
    h[key] = value;
    write_bytes(answers, h.dump() + rest);
  };
  with("version", 2);
  refused(a, answers, "version 2");
  with("tokenizer", "hf:Qwen3");
  refused(a, answers, "no token table");
  with("prompts", 5);
  refused(a, answers, "another shard");
  write_bytes(answers, good);
  CATCH_CHECK(read_prompt_set(a).prompts.size() == 6);
  // A shard of no documents (version 1), and one cut short.
  write_shard(dir.str("v1/prompts.bin"), {1, 2, 3}, 256);
  write_bytes(dir.str("v1/prompts.answers.jsonl"), good);
  refused(dir.str("v1/prompts.bin"), dir.str("v1/prompts.bin"), "no documents");
  const std::string whole = read_text(a);
  write_bytes(a, whole.substr(0, 40));
  refused(a, a, "");
  // The .jsonl reader's errors name the line.
  write_bytes(dir.str("bad.jsonl"), "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": 5}\n");
  CATCH_CHECK_THROWS_WITH(load_prompts(dir.str("bad.jsonl")), Contains(dir.str("bad.jsonl") + ":2"));
}
