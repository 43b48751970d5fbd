// RL with a Hugging Face tokenizer: scripts/prepare_data.py --rl writes the prompts as transformers
// tokenizes them (plain, chats, a prompt as a user turn) and a token table that decodes any ids as
// transformers' decode does; `moetrain rl` runs on such a set, decodes completions through the table and
// stops them at the set's stop tokens; what does not fit together is refused in one line. Tokenizers and
// the transformers reference come from tests/rl/hf_prompts_fixture.py.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "../test_util.h"
#include "common/errors.h"
#include "data/prompts.h"
#include "hf/hf.h"
#include "rl_fixture.h"
#include "train/rl.h"

using Catch::Matchers::Contains;
using namespace moetrain;
using moetrain::testing::TempDir;
using json = nlohmann::json;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kPython = kSource + "/third_party/venv/bin/python ";
const std::string kBinary = MOETRAIN_BINARY;

testing::CommandResult prepare_rl(const std::string& args) {
  return testing::run_command(kPython + kSource + "/scripts/prepare_data.py --rl " + args);
}

void fixture(const std::string& args) {
  const auto r = testing::run_command(kPython + kSource + "/tests/rl/hf_prompts_fixture.py " + args);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

json read_json(const std::string& path) { return json::parse(files::read_file(path)); }

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += n;
  }
  return true;
}

// The fixture's tokenizers, and dir/set: its chats prepared with the byte-level BPE, loaded.
data::PromptSet chat_set(const TempDir& dir) {
  fixture("setup " + dir.str("fx"));
  const auto r = prepare_rl("--tokenizer " + dir.str("fx/bpe") + " --input " + dir.str("fx/chat.jsonl") + " --out " + dir.str("set"));
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  return data::load_prompts(dir.str("set"));
}

// tiny_rl_base on a subword set: a vocabulary past the fixture tokenizers' and room for chat prompts.
config::Config subword_rl_config(const TempDir& dir, const std::string& set) {
  auto cfg = testing::tiny_rl_base(dir);
  cfg.run.threads = 1;
  cfg.model.vocab_size = 512;
  cfg.model.max_seq_len = 96;
  cfg.data.seq_len = 96;
  cfg.train.steps = 2;
  cfg.rl.max_new_tokens = 6;
  cfg.rl.prompts = set;
  return cfg;
}

// The answers of the fixture's prompts (a non-string answer is its compact JSON text).
const std::vector<std::string> kAnswers = {"42", "12", "22", "{\"value\":3}"};

}  // namespace

CATCH_TEST_CASE("prepare_data.py --rl: transformers' prompt ids, and a token table that decodes as transformers does",
                "[rl][python][data]") {
  TempDir dir("rl-hf-prompts");
  fixture("setup " + dir.str("fx"));
  struct Case {
    const char* tokenizer;
    const char* input;
    const char* mode;
    const char* flags;
  };
  for (const Case c : {Case{"bpe", "plain", "plain", ""}, Case{"spm", "plain", "plain", ""},
                       Case{"bpe", "chat", "chat", ""}, Case{"bpe", "plain", "chat-prompt", "--chat-prompt"}}) {
    const std::string tok = dir.str(std::string("fx/") + c.tokenizer), input = dir.str(std::string("fx/") + c.input + ".jsonl");
    const std::string out = dir.str(std::string("set-") + c.tokenizer + "-" + c.mode);
    CATCH_INFO(c.tokenizer << " " << c.mode);
    const auto r = prepare_rl("--tokenizer " + tok + " --input " + input + " --out " + out + " " + c.flags);
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
    fixture("reference " + tok + " " + input + " " + dir.str("ref.json") + " " + c.mode);
    const auto ref = read_json(dir.str("ref.json"));

    const auto set = data::load_prompts(out);
    CATCH_CHECK_FALSE(set.is_bytes());
    CATCH_CHECK(set.tokenizer == c.tokenizer);
    CATCH_REQUIRE(set.prompts.size() == 4);
    for (size_t i = 0; i < set.prompts.size(); ++i) {
      CATCH_INFO("prompt " << i);
      CATCH_CHECK(set.prompts[i].tokens == ref["ids"][i].get<std::vector<int64_t>>());
      CATCH_CHECK(set.prompts[i].prompt == ref["texts"][i].get<std::string>());
      CATCH_CHECK(set.prompts[i].answer == kAnswers[i]);
    }
    // The stop tokens: every EOS the folder names (the bpe folder's generation_config adds <|endoftext|>).
    const auto& named = ref["token_ids"];
    std::vector<int64_t> stops = std::string(c.tokenizer) == "bpe"
                                     ? std::vector<int64_t>{named["<|endoftext|>"], named["<|im_end|>"]}
                                     : std::vector<int64_t>{named["</s>"]};
    std::sort(stops.begin(), stops.end());
    CATCH_CHECK(set.stop_ids == stops);

    // Any ids decode as transformers decodes them: every id alone, random runs, and prompts continued by
    // random ids. Runs whose bytes are not whole UTF-8 (a byte piece, half a character) decode to U+FFFD
    // in transformers and are left out; most are whole.
    std::vector<std::vector<int64_t>> lists;
    for (int64_t id = 0; id < set.table.size(); ++id) lists.push_back({id});
    std::mt19937 rng(7);
    std::uniform_int_distribution<int64_t> any(0, set.table.size() - 1);
    for (int n = 0; n < 60; ++n) {
      std::vector<int64_t> ids(size_t(1 + n % 12));
      for (auto& id : ids) id = any(rng);
      lists.push_back(ids);
    }
    for (const auto& p : set.prompts) {
      auto ids = p.tokens;
      for (int k = 0; k < 6; ++k) ids.push_back(any(rng));
      lists.push_back(ids);
    }
    testing::write_bytes(dir.str("decode_in.json"), json(lists).dump());
    fixture("decode " + tok + " " + dir.str("decode_in.json") + " " + dir.str("decode_out.json"));
    const auto want = read_json(dir.str("decode_out.json"));
    size_t compared = 0;
    for (size_t i = 0; i < lists.size(); ++i) {
      const std::string got = set.table.decode_text(lists[i]);
      if (!valid_utf8(got)) continue;
      CATCH_INFO("ids " << json(lists[i]).dump());
      CATCH_CHECK(got == want[i].get<std::string>());
      ++compared;
    }
    CATCH_CHECK(compared > lists.size() / 2);
  }
}

CATCH_TEST_CASE("A subword completion is its tokens less the final stop token, and its answer is found through the table",
                "[rl][python]") {
  TempDir dir("rl-hf-completion");
  const auto set = chat_set(dir);
  const std::string text = "<think>7 + 5 = 12</think><answer>12</answer>";
  testing::write_bytes(dir.str("encode_in.json"), json::array({text}).dump());
  fixture("decode " + dir.str("fx/bpe") + " " + dir.str("encode_in.json") + " " + dir.str("encode_out.json"));
  auto ids = read_json(dir.str("encode_out.json"))[0].get<std::vector<int64_t>>();
  CATCH_CHECK(train::rl::completion_text(set, ids) == text);
  for (const int64_t stop : set.stop_ids) {
    auto stopped = ids;
    stopped.push_back(stop);
    CATCH_CHECK(train::rl::completion_text(set, stopped) == text);  // the stop token is not text
  }
  config::RLConfig rl;
  rl.format_reward = 0.5;
  CATCH_CHECK(train::rl::builtin_reward(train::rl::completion_text(set, ids), "12", rl) == 1.5);
  // A byte set keeps its stop character: rl.stop is text there.
  const auto bytes = data::PromptSet{};
  CATCH_CHECK(train::rl::completion_text(bytes, {'4', '\n'}) == "4\n");
}

CATCH_TEST_CASE("prepare_data.py --rl and moetrain rl refuse a subword set they cannot decode or run, in one line",
                "[rl][python]") {
  TempDir dir("rl-hf-refused");
  fixture("setup " + dir.str("fx"));
  const std::string bpe = dir.str("fx/bpe"), plain = dir.str("fx/plain.jsonl");
  auto refused = [&](const std::string& args, const std::string& says) {
    const auto r = prepare_rl(args);
    CATCH_INFO(args << "\n" << r.output);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK_THAT(r.output, Contains("[prepare_data]") && Contains(says));
    CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  };
  refused("--tokenizer " + dir.str("fx/words") + " --input " + plain + " --out " + dir.str("w"),
          dir.str("fx/words/tokenizer.json") + ": the decoder null");
  refused("--tokenizer " + bpe + " --input " + plain + " --out " + dir.str("s") + " --stop-token '<nope>'", "'<nope>'");
  testing::write_bytes(dir.str("noanswer.jsonl"), "{\"prompt\": \"1+1=\", \"answer\": \"2\"}\n{\"prompt\": \"2+2=\"}\n");
  refused("--tokenizer " + bpe + " --input " + dir.str("noanswer.jsonl") + " --out " + dir.str("n"),
          dir.str("noanswer.jsonl") + ":2: field 'answer' is missing");
  const auto ok = prepare_rl("--tokenizer " + bpe + " --input " + plain + " --out " + dir.str("set"));
  CATCH_REQUIRE(ok.exit_code == 0);
  refused("--tokenizer " + bpe + " --input " + plain + " --out " + dir.str("set"), "already holds a prompt set");

  // moetrain's reader: a table that is not the one the header names, or none; stop ids that are not ids.
  const std::string table = dir.str("set/prompts.tokens.json"), answers = dir.str("set/prompts.answers.jsonl");
  const std::string good_table = files::read_file(table), good_answers = files::read_file(answers);
  auto reader_refuses = [&](const std::string& names, const std::string& says) {
    CATCH_INFO("expected " << names << " / " << says);
    CATCH_REQUIRE_THROWS_AS(data::load_prompts(dir.str("set")), DataError);
    try {
      data::load_prompts(dir.str("set"));
    } catch (const DataError& e) {
      const std::string what = e.what();
      CATCH_CHECK(what.find('\n') == std::string::npos);
      CATCH_CHECK_THAT(what, Contains(names) && Contains(says));
    }
  };
  testing::write_bytes(table, good_table + " ");
  reader_refuses(table, "is not the token table");
  files::remove_tree(table);
  reader_refuses(table, "does not exist");
  testing::write_bytes(table, good_table);
  auto header = json::parse(good_answers.substr(0, good_answers.find('\n')));
  header["stop_ids"] = json::array();
  testing::write_bytes(answers, header.dump() + good_answers.substr(good_answers.find('\n')));
  reader_refuses(answers, "stop_ids");
  testing::write_bytes(answers, good_answers);
  CATCH_CHECK(data::load_prompts(dir.str("set")).prompts.size() == 4);

  // moetrain rl: a model vocabulary too small for the set, rl.stop (bytes) on a subword set, an evaluation
  // set of another tokenizer, and model.init_from's tokenizer not the set's.
  const auto cfg = subword_rl_config(dir, dir.str("set"));
  auto run_refuses = [&](const config::Config& c, const std::string& says) {
    CATCH_INFO("expected " << says);
    try {
      train::rl::run(c, {});
      CATCH_FAIL("the run was not refused");
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      CATCH_CHECK(what.find('\n') == std::string::npos);
      CATCH_CHECK_THAT(what, Contains(says));
    }
  };
  auto small = cfg;
  small.model.vocab_size = 300;
  run_refuses(small, "model.vocab_size = 300 is smaller than the");
  auto stop = cfg;
  stop.rl.stop = "\n";
  run_refuses(stop, "rl.stop names bytes");
  auto eval = cfg;
  testing::write_prompts(dir.str("bytes.jsonl"), 4, 0);
  eval.rl.eval_prompts = dir.str("bytes.jsonl");
  run_refuses(eval, "decode their tokens differently");
  auto init = cfg;
  files::make_directories(dir.str("other-model"));
  testing::write_bytes(dir.str("other-model/tokenizer.json"), files::read_file(dir.str("fx/spm/tokenizer.json")));
  init.model.init_from = "hf:" + dir.str("other-model");
  run_refuses(init, "another tokenizer than model.init_from's");
}

CATCH_TEST_CASE("moetrain rl runs GRPO on a chat prompt set of a subword tokenizer", "[rl][python]") {
  TempDir dir("rl-hf-run");
  const auto set = chat_set(dir);
  auto cfg = subword_rl_config(dir, dir.str("set"));
  cfg.rl.eval_prompts = dir.str("set");
  cfg.rl.prompts_per_step = 2;
  cfg.rl.group_size = 3;
  cfg.rl.reward = "command";
  // The command keeps what it was given and scores a completion by its length's parity.
  cfg.rl.reward_command = "tee -a " + dir.str("scored.jsonl") + " | " + kPython +
                          "-c \"import sys, json; [print(len(json.loads(l)['completion']) % 2) for l in sys.stdin]\"";
  const auto result = train::rl::run(cfg, {});
  CATCH_CHECK(result.first_eval_accuracy.has_value());
  const auto rows = testing::read_metrics(dir.str("run/metrics.jsonl"));
  CATCH_REQUIRE(rows.size() >= 2);
  for (const auto& row : rows)
    if (row.contains("loss")) CATCH_CHECK(std::isfinite(row["loss"].get<double>()));
  // Every scored prompt is one of the set's, as text; no completion holds a stop token's text.
  std::vector<std::string> texts;
  for (const auto& p : set.prompts) texts.push_back(p.prompt);
  std::ifstream in(dir.str("scored.jsonl"));
  int n = 0;
  for (std::string line; std::getline(in, line); ++n) {
    const auto j = json::parse(line);
    CATCH_CHECK(std::find(texts.begin(), texts.end(), j["prompt"].get<std::string>()) != texts.end());
    const auto completion = j["completion"].get<std::string>();
    CATCH_CHECK(completion.find("<|im_end|>") == std::string::npos);
    CATCH_CHECK(completion.find("<|endoftext|>") == std::string::npos);
    CATCH_CHECK(std::find(kAnswers.begin(), kAnswers.end(), j["answer"].get<std::string>()) != kAnswers.end());
  }
  CATCH_CHECK(n == 2 * 2 * 3);
  CATCH_CHECK(texts[0].rfind("<|im_start|>system\n", 0) == 0);
  CATCH_CHECK(texts[0].size() > 22);
  CATCH_CHECK(texts[0].compare(texts[0].size() - 22, 22, "<|im_start|>assistant\n") == 0);
}

CATCH_TEST_CASE("GRPO on an imported Qwen3-MoE with its own tokenizer, from configs/rl-qwen3-moe.yaml", "[rl][python][hf]") {
  TempDir dir("rl-hf-qwen3");
  fixture("setup " + dir.str("fx"));
  // A tiny Qwen3-MoE folder holding the fixture's byte-level BPE as its tokenizer, as a download does.
  auto m = testing::tiny_model_config();
  m.vocab_size = 384;
  m.max_seq_len = 128;
  m.dense_layers = 0;
  m.moe.n_shared_experts = 0;
  m.tie_embeddings = false;
  m.qk_norm = "head";
  model::Transformer model(m);
  model->init_weights(11);
  const std::string qwen = dir.str("qwen3");
  hf::export_model(*model, hf::Family::Qwen3Moe, qwen);
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
    testing::write_bytes(files::join(qwen, name), files::read_file(dir.str(std::string("fx/bpe/") + name)));
  for (const char* split : {"train", "eval"}) {
    const auto r = prepare_rl("--chat-prompt --tokenizer " + qwen + " --input " + dir.str("fx/plain.jsonl") + " --out " +
                              dir.str(std::string("data/") + split));
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
  }
  const std::string run = kBinary + " rl --config " + kSource + "/configs/rl-qwen3-moe.yaml --set model.init_from=hf:" + qwen +
                          " --set run.device=cpu --set run.dtype=fp32 --set run.threads=1 --set run.out_dir=" +
                          dir.str("run") + " --set rl.prompts=" + dir.str("data/train") + " --set rl.eval_prompts=" +
                          dir.str("data/eval") + " --set train.steps=2 --set rl.prompts_per_step=2 --set rl.group_size=2" +
                          " --set rl.max_new_tokens=4 --set rl.micro_batch_rows=3 --set train.lora.rank=4";
  const auto r = testing::run_command("OMP_NUM_THREADS=1 " + run);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  CATCH_CHECK_THAT(r.output, Contains("held-out accuracy before RL") && Contains("done: rollout batch 2/2"));
  const auto rows = testing::read_metrics(dir.str("run/metrics.jsonl"));
  CATCH_REQUIRE(rows.size() == 2);
  for (const auto& row : rows) CATCH_CHECK(std::isfinite(row["loss"].get<double>()));
  CATCH_CHECK(rows.back().contains("eval_accuracy"));

  // The same prompts prepared with another tokenizer are refused against this model, in one line.
  const auto other = prepare_rl("--tokenizer " + dir.str("fx/spm") + " --input " + dir.str("fx/plain.jsonl") + " --out " +
                                dir.str("data/spm"));
  CATCH_REQUIRE(other.exit_code == 0);
  const auto refused = testing::run_command(run + " --set rl.prompts=" + dir.str("data/spm") + " --set rl.eval_prompts=" +
                                            dir.str("data/spm") + " --set run.out_dir=" + dir.str("run-spm"));
  CATCH_CHECK(refused.exit_code != 0);
  CATCH_CHECK(testing::one_line(refused.output));
  CATCH_CHECK_THAT(refused.output, Contains("another tokenizer than model.init_from's"));
}
