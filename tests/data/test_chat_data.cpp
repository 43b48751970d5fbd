// scripts/prepare_data.py on chat records against transformers' apply_chat_template: the same token ids
// for a ChatML-like, a Llama 3-like and a tool-calling template (single- and multi-turn chats), a loss
// mask over exactly the assistant turns (content and end-of-turn markup), and the version-2 document
// table (one document per record) of every shard written from .jsonl, read from the file's bytes by
// tests/data/chat_fixture.py and through data::Shard. The fixture builds the tokenizer and the chats.
#include <catch2/catch.hpp>

#include <algorithm>
#include <set>

#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "shard_contents.h"
#include "data/shard.h"

using Catch::Matchers::Contains;
using namespace moetrain;
using moetrain::testing::mask_of;
using moetrain::testing::tokens_of;
using moetrain::testing::TempDir;
using nlohmann::json;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kPython = kSource + "/third_party/venv/bin/python ";

testing::CommandResult prepare_data(const std::string& args) {
  return testing::run_command(kPython + kSource + "/scripts/prepare_data.py " + args);
}

void fixture(const std::string& script, const std::string& args) {
  const auto r = testing::run_command(kPython + kSource + "/tests/data/" + script + " " + args);
  CATCH_INFO(script << " " << args << "\n" << r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

// Builds DIR/tok, tok-jinja, tok-bare, templates/ and the chats DIR/chat.jsonl (7 records) and
// DIR/tools.jsonl (5 records); see chat_fixture.py.
void setup(const TempDir& dir) { fixture("chat_fixture.py", "setup " + dir.path); }

// transformers' ids and assistant mask for `input` (its last record in val), and what each run of
// learned tokens must decode to: {"train": {tokens, mask, doc_starts, learned_texts}, "val": {...}}.
json reference(const TempDir& dir, const std::string& input, const std::string& learn,
               const std::string& options = "") {
  const std::string out = dir.str("reference.json");
  fixture("chat_fixture.py",
          "reference " + dir.str("tok") + " " + dir.str(input) + " 1 " + learn + " " + out + " " + options);
  return json::parse(files::read_file(out));
}

// The shard's bytes as the format spec reads them: {version, tokens, doc_starts, mask, learned_texts}
// (learned runs decoded with the tokenizer in DIR/tokenizer).
json read_shard(const TempDir& dir, const std::string& shard, const std::string& tokenizer = "tok") {
  const std::string out = dir.str("shard.json");
  fixture("chat_fixture.py", "read-shard " + dir.str(tokenizer) + " " + shard + " " + out);
  return json::parse(files::read_file(out));
}

// OUT/train.bin and OUT/val.bin hold what the reference says, read both ways, documents included.
void check_splits(const TempDir& dir, const std::string& out, const json& expected, bool masked) {
  for (const std::string split : {"train", "val"}) {
    CATCH_INFO(out << "/" << split << ".bin");
    const std::string path = dir.str(out + "/" + split + ".bin");
    const json& want = expected[split];
    const json got = read_shard(dir, path);
    CATCH_CHECK(got["version"] == 2);
    CATCH_CHECK(got["tokens"] == want["tokens"]);
    CATCH_CHECK(got["doc_starts"] == want["doc_starts"]);
    const data::Shard shard(path);
    CATCH_CHECK(tokens_of(shard) == want["tokens"].get<std::vector<int64_t>>());
    CATCH_CHECK(shard.document_starts() == want["doc_starts"].get<std::vector<uint64_t>>());
    CATCH_CHECK(shard.has_mask() == masked);
    CATCH_CHECK(mask_of(shard) == want["mask"].get<std::vector<uint8_t>>());  // all 1 without a mask file
    if (masked && !want["learned_texts"].is_null()) CATCH_CHECK(got["learned_texts"] == want["learned_texts"]);
  }
}

std::string run_ok(const std::string& args) {
  const auto r = prepare_data(args);
  CATCH_INFO(args << "\n" << r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  return r.output;
}

}  // namespace

CATCH_TEST_CASE("prepare_data.py: chats are tokenized as apply_chat_template does, assistant turns learned",
                "[data][python]") {
  TempDir dir("chat-templates");
  setup(dir);
  const std::string base = "--tokenizer " + dir.str("tok") + " --val-fraction 0.2 --input ";

  // ChatML-like: tokenizer_config.json's template "default".
  run_ok(base + dir.str("chat.jsonl") + " --out " + dir.str("chatml"));
  const json chatml = reference(dir, "chat.jsonl", "assistant");
  check_splits(dir, "chatml", chatml, true);
  // A single-turn chat learns its one reply, a multi-turn chat every reply, each with its end of turn.
  const auto texts = chatml["train"]["learned_texts"].get<std::vector<std::string>>();
  CATCH_REQUIRE(texts.size() >= 3);
  CATCH_CHECK(texts[0] == "Four.<|im_end|>\n");
  CATCH_CHECK(texts[1] == "An apple.<|im_end|>\n");
  CATCH_CHECK(texts[2] == " Green, like the apple. <|im_end|>\n");

  // Llama 3-like, picked by name: the BOS and header tokens from the config, replies end in <|eot_id|>.
  run_ok(base + dir.str("chat.jsonl") + " --out " + dir.str("llama3") + " --chat-template-name llama3");
  const json llama3 = reference(dir, "chat.jsonl", "assistant", "--template llama3");
  check_splits(dir, "llama3", llama3, true);
  CATCH_CHECK(llama3["train"]["learned_texts"][2] == "Green, like the apple.<|eot_id|>");  // the template trims

  // Records with tools get the "tool_use" template (as in transformers): a system prompt listing the
  // tools, assistant turns with tool calls (content null or not), and tool turns, which are not learned.
  run_ok(base + dir.str("tools.jsonl") + " --out " + dir.str("tools"));
  const json tools = reference(dir, "tools.jsonl", "assistant");
  check_splits(dir, "tools", tools, true);
  const auto tool_texts = tools["train"]["learned_texts"].get<std::vector<std::string>>();
  CATCH_CHECK(std::find(tool_texts.begin(), tool_texts.end(),
                        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"
                        "<|im_end|>\n") != tool_texts.end());
  CATCH_CHECK(std::find(tool_texts.begin(), tool_texts.end(), "It is 18 degrees in Paris.<|im_end|>\n") !=
              tool_texts.end());
}

CATCH_TEST_CASE("prepare_data.py: --learn last-assistant learns the final reply, --learn all every token",
                "[data][python]") {
  TempDir dir("chat-learn");
  setup(dir);
  const std::string base = "--tokenizer " + dir.str("tok") + " --val-fraction 0.2 --input ";
  run_ok(base + dir.str("chat.jsonl") + " --out " + dir.str("last") + " --learn last-assistant");
  const json last = reference(dir, "chat.jsonl", "last-assistant");
  check_splits(dir, "last", last, true);
  // Record 3 (three replies) learns only its last; the validation record (two replies) too.
  CATCH_CHECK(last["train"]["learned_texts"][2] == "You are welcome: café 🙂<|im_end|>\n");
  CATCH_CHECK(last["val"]["learned_texts"] == json::array({"Sure.<|im_end|>\n"}));

  run_ok(base + dir.str("tools.jsonl") + " --out " + dir.str("all") + " --learn all");
  check_splits(dir, "all", reference(dir, "tools.jsonl", "all"), false);
  CATCH_CHECK_FALSE(files::exists(dir.str("all/train.mask.bin")));

  // --append-eos: each record ends with the EOS, which belongs to (and is learned with) the record.
  run_ok(base + dir.str("tools.jsonl") + " --out " + dir.str("eos") + " --append-eos");
  check_splits(dir, "eos", reference(dir, "tools.jsonl", "assistant", "--append-eos"), true);
}

CATCH_TEST_CASE("prepare_data.py: the chat template comes from chat_template.jinja or --chat-template",
                "[data][python]") {
  TempDir dir("chat-template-files");
  setup(dir);
  auto same_shards = [&](const std::string& a, const std::string& b) {
    for (const std::string name : {"train.bin", "train.mask.bin", "val.bin", "val.mask.bin"})
      CATCH_CHECK(files::read_file(dir.str(a + "/" + name)) == files::read_file(dir.str(b + "/" + name)));
  };
  const std::string input = " --val-fraction 0.2 --input " + dir.str("chat.jsonl") + " --out ";
  run_ok("--tokenizer " + dir.str("tok") + input + dir.str("llama3") + " --chat-template-name llama3");
  run_ok("--tokenizer " + dir.str("tok-jinja") + input + dir.str("jinja"));  // only chat_template.jinja
  same_shards("llama3", "jinja");
  run_ok("--tokenizer " + dir.str("tok") + input + dir.str("chatml"));
  run_ok("--tokenizer " + dir.str("tok-bare") + input + dir.str("file") + " --chat-template " +
         dir.str("templates/chatml.jinja"));
  same_shards("chatml", "file");
}

// Streaming: the in-memory shards' tokens and masks, in order, cut into shards of at most the limit;
// each shard's document table holds the records that start in it, and a record cut across shards is
// a document in each (it starts the next shard).
CATCH_TEST_CASE("prepare_data.py: chats stream with --workers and --shard-tokens, documents cut at shards",
                "[data][python]") {
  TempDir dir("chat-stream");
  setup(dir);
  for (const std::string input : {"chat.jsonl", "tools.jsonl"}) {
    const std::string base =
        "--tokenizer " + dir.str("tok") + " --val-fraction 0.2 --append-eos --input " + dir.str(input);
    run_ok(base + " --out " + dir.str(input + "-whole"));
    const int64_t limit = 40;
    const std::string out = input + "-stream";
    run_ok(base + " --out " + dir.str(out) + " --workers 2 --shard-tokens " + std::to_string(limit) +
           " --batch-records 2");
    bool cut_a_record = false;
    for (const std::string split : {"train", "val"}) {
      CATCH_INFO(input << " " << split);
      const json whole = read_shard(dir, dir.str(input + "-whole/" + split + ".bin"));
      std::vector<std::string> names;
      for (const auto& name : files::list_directory(dir.str(out)))
        if (name.rfind(split + "-", 0) == 0 && name.find(".mask.") == std::string::npos) names.push_back(name);
      std::sort(names.begin(), names.end());
      CATCH_REQUIRE(names.size() >= 2);
      std::vector<int64_t> tokens;
      std::vector<uint8_t> mask;
      std::set<uint64_t> starts, shard_starts;
      for (const auto& name : names) {
        const std::string path = files::join(dir.str(out), name);
        const json got = read_shard(dir, path);
        CATCH_CHECK(got["version"] == 2);
        CATCH_CHECK(int64_t(got["tokens"].size()) <= limit);
        shard_starts.insert(tokens.size());
        for (const uint64_t s : got["doc_starts"].get<std::vector<uint64_t>>()) starts.insert(tokens.size() + s);
        const data::Shard shard(path);
        CATCH_CHECK(shard.document_starts() == got["doc_starts"].get<std::vector<uint64_t>>());
        const auto t = tokens_of(shard);
        const auto m = mask_of(shard);
        tokens.insert(tokens.end(), t.begin(), t.end());
        mask.insert(mask.end(), m.begin(), m.end());
      }
      CATCH_CHECK(tokens == whole["tokens"].get<std::vector<int64_t>>());
      CATCH_CHECK(mask == whole["mask"].get<std::vector<uint8_t>>());
      const auto whole_starts = whole["doc_starts"].get<std::vector<uint64_t>>();
      std::set<uint64_t> want(whole_starts.begin(), whole_starts.end());
      for (const uint64_t s : shard_starts) cut_a_record |= !want.count(s);
      want.insert(shard_starts.begin(), shard_starts.end());
      CATCH_CHECK(starts == want);
    }
    CATCH_CHECK(cut_a_record);  // records longer than a shard: the test sees a cut document
  }
}

CATCH_TEST_CASE("prepare_data.py: .jsonl shards mark one document per record, .txt shards stay version 1",
                "[data][python]") {
  TempDir dir("chat-documents");
  fixture("tokenizer_fixture.py", "words " + dir.str("words") + " 10");  // w0 .. w9, [UNK] = 10, <eos> = 11
  auto read = [&](const std::string& shard) { return read_shard(dir, dir.str(shard), "words"); };
  const std::string base = "--tokenizer " + dir.str("words") + " --val-fraction 0.25 --input ";
  testing::write_bytes(dir.str("docs.jsonl"), "{\"text\": \"w1 w2 w3\"}\n{\"text\": \"w4\"}\n\n{\"text\": \"w5 w6\"}\n"
                                              "{\"text\": \"w7 w8\"}\n");
  run_ok(base + dir.str("docs.jsonl") + " --out " + dir.str("eos") + " --append-eos");
  json train = read("eos/train.bin");
  CATCH_CHECK(train["version"] == 2);
  CATCH_CHECK(train["tokens"] == json::array({1, 2, 3, 11, 4, 11, 5, 6, 11}));
  CATCH_CHECK(train["doc_starts"] == json::array({0, 4, 6}));
  CATCH_CHECK(read("eos/val.bin")["doc_starts"] == json::array({0}));

  // A record of no tokens is no document.
  testing::write_bytes(dir.str("empty.jsonl"),
                       "{\"text\": \"w1 w2\"}\n{\"text\": \"\"}\n{\"text\": \"w3\"}\n{\"text\": \"w4\"}\n");
  run_ok(base + dir.str("empty.jsonl") + " --out " + dir.str("empty"));
  train = read("empty/train.bin");
  CATCH_CHECK(train["tokens"] == json::array({1, 2, 3}));
  CATCH_CHECK(train["doc_starts"] == json::array({0, 2}));

  // Prompt/response records: the prompt and the response are one document.
  testing::write_bytes(dir.str("pairs.jsonl"), "{\"prompt\": \"w1 w2\", \"response\": \"w3\"}\n"
                                               "{\"prompt\": \"w4\", \"response\": \"w5 w6\"}\n"
                                               "{\"prompt\": \"w7\", \"response\": \"w8\"}\n"
                                               "{\"prompt\": \"w9\", \"response\": \"w0\"}\n");
  run_ok(base + dir.str("pairs.jsonl") + " --out " + dir.str("pairs"));
  train = read("pairs/train.bin");
  CATCH_CHECK(train["doc_starts"] == json::array({0, 3, 6}));
  CATCH_CHECK(train["mask"] == json::array({0, 0, 1, 0, 1, 1, 0, 1}));

  testing::write_bytes(dir.str("corpus.txt"), "w1 w2\nw3 w4\nw5 w6\nw7 w8\n");
  run_ok(base + dir.str("corpus.txt") + " --out " + dir.str("txt"));
  train = read("txt/train.bin");
  CATCH_CHECK(train["version"] == 1);
  CATCH_CHECK(train["doc_starts"].is_null());
  CATCH_CHECK(train["tokens"] == json::array({1, 2, 3, 4, 5, 6}));
}

CATCH_TEST_CASE("prepare_data.py: a bad chat record is one line naming the file, line and field", "[data][python]") {
  TempDir dir("chat-errors");
  setup(dir);
  const std::string good =
      R"({"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]})";
  const std::string user_only = R"({"messages": [{"role": "user", "content": "Hi."}]})";
  auto args = [&](const std::string& input, const std::string& tokenizer = "tok") {
    return "--tokenizer " + dir.str(tokenizer) + " --input " + dir.str(input) + " --out " + dir.str("out");
  };
  auto fails = [&](const std::string& command, const std::vector<std::string>& says) {
    const auto r = prepare_data(command);
    CATCH_INFO(command << "\n" << r.output);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK(testing::one_line(r.output));
    for (const auto& s : says) CATCH_CHECK_THAT(r.output, Contains(s));
    CATCH_CHECK_FALSE(files::exists(dir.str("out/train.bin")));
  };

  // Each: the second record, extra flags, and what the one line must say besides "bad.jsonl:2: ".
  struct Case {
    std::string record, flags;
    std::vector<std::string> says;
  };
  const std::vector<Case> cases = {
      {R"({"text": "Hi."})", "", {"'messages' is missing"}},
      {R"({"messages": "Hi."})", "", {"'messages' is not a list"}},
      {R"({"messages": [{"content": "Hi."}]})", "", {"messages[0]", "'role' is missing"}},
      {R"({"messages": [{"role": "user"}]})", "", {"messages[0]", "'content' is missing"}},
      {R"({"messages": [{"role": "user", "content": ["Hi."]}]})", "", {"messages[0]", "'content' is not a string"}},
      {R"({"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": null}]})", "",
       {"messages[1]", "'content' is null", "tool_calls"}},
      {user_only, "", {"'messages' has no assistant message", "--learn assistant"}},
      {user_only, "--learn last-assistant", {"no assistant message"}},
      {R"({"messages": [{"role": "robot", "content": "Hi."}], "tools": []})", "",
       {"chat template", "tool_use", "raised TemplateError: unknown role robot"}},
      {R"({"messages": [{"role": "user", "content": "Hi."}], "tools": {}})", "", {"'tools' is not a list"}},
  };
  for (const auto& c : cases) {
    testing::write_bytes(dir.str("bad.jsonl"), good + "\n" + c.record + "\n");
    auto says = c.says;
    says.push_back("bad.jsonl:2: ");
    fails(args("bad.jsonl") + " " + c.flags, says);
  }
  // --learn all needs no assistant turn.
  testing::write_bytes(dir.str("user.jsonl"), good + "\n" + user_only + "\n");
  run_ok(args("user.jsonl") + " --learn all");
  files::remove_tree(dir.str("out"));

  testing::write_bytes(dir.str("good.jsonl"), good + "\n" + good + "\n");
  fails(args("good.jsonl", "tok-bare"), {"has no chat template", "--chat-template"});
  fails(args("good.jsonl") + " --chat-template-name chatml",
        {"--chat-template-name chatml", "default, llama3, tool_use"});
  testing::write_bytes(dir.str("broken.jinja"), "{% for m in messages %}{{ m.content }");
  fails(args("good.jsonl") + " --chat-template " + dir.str("broken.jinja"), {"broken.jinja", "line 1"});
  // No generation prompt: a reply's header could not be told from the reply.
  testing::write_bytes(dir.str("no_prompt.jinja"),
                       "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}");
  fails(args("good.jsonl") + " --chat-template " + dir.str("no_prompt.jinja"), {"good.jsonl:1", "generation prompt"});
  // Not prefix-stable: the last assistant turn renders differently from an earlier one.
  testing::write_bytes(dir.str("unstable.jinja"),
                       "{% for m in messages %}{{ m.content }}{% if loop.last and m.role == 'assistant' %}!{% endif %}"
                       "{% endfor %}{% if add_generation_prompt %}>{% endif %}");
  testing::write_bytes(dir.str("two.jsonl"),
                       R"({"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, )"
                       R"({"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]})"
                       "\n" + good + "\n");
  fails(args("two.jsonl") + " --chat-template " + dir.str("unstable.jinja"),
        {"two.jsonl:1", "messages[1]", "not prefix-stable"});
  // Chat flags on other records are refused rather than ignored.
  testing::write_bytes(dir.str("text.jsonl"), "{\"text\": \"Hi.\"}\n{\"text\": \"Hello.\"}\n");
  fails(args("text.jsonl") + " --learn all", {"--learn", "only for chat records"});
  // Streaming reports a worker's error the same way (record 2 is in the train split).
  testing::write_bytes(dir.str("bad.jsonl"),
                       good + "\n" + R"({"messages": [{"role": "user", "content": 7}]})" + "\n" + good + "\n");
  fails(args("bad.jsonl") + " --workers 2 --shard-tokens 50 --val-fraction 0.3",
        {"bad.jsonl:2: messages[0]: 'content' is not a string"});
}
