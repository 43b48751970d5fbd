// KV-cache generation against the recompute path: greedy tokens equal token for token and each step's
// logits within 1e-5 (fp32: the cache changes only the shapes the matmuls and attention run over, and
// MLA's decode steps absorb wkv_b, so the difference is summation order, ~1e-7 at these sizes), for
// every attention variant we have; ragged batches equal their rows run alone; sampling options; the
// --prompts file's errors; and each tiny Hugging Face model's cached greedy continuation equals
// transformers' greedy.
#include <catch2/catch.hpp>

#include <map>

#include "../test_util.h"
#include "ckpt/safetensors.h"
#include "hf/hf.h"
#include "model/transformer.h"
#include "train/generate.h"
#include "train/trainer.h"
#include "../train/train_fixture.h"
#include <ATen/CPUGeneratorImpl.h>
#include <nlohmann/json.hpp>

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

constexpr double kLogitTolerance = 1e-5;

struct Run {
  std::vector<int64_t> tokens;
  std::vector<torch::Tensor> logits;  // (1, V) per step
};

Run greedy(const model::TransformerImpl& model, const std::vector<int64_t>& prompt, int new_tokens, bool cache) {
  Run run;
  train::GenerateOptions options;
  options.temperature = 0;
  options.max_new_tokens = new_tokens;
  options.use_cache = cache;
  options.on_logits = [&](int, const torch::Tensor& logits_BV) { run.logits.push_back(logits_BV.clone()); };
  run.tokens = train::generate(model, prompt, options);
  return run;
}

// Cached greedy == recompute greedy, and the logits of every step agree; returns the largest difference.
double check_cache_equals_recompute(const model::TransformerImpl& model, const std::vector<int64_t>& prompt,
                                    int new_tokens) {
  const auto cached = greedy(model, prompt, new_tokens, /*cache=*/true);
  const auto recomputed = greedy(model, prompt, new_tokens, /*cache=*/false);
  CATCH_CHECK(cached.tokens == recomputed.tokens);
  CATCH_CHECK(cached.tokens.size() == prompt.size() + size_t(new_tokens));
  CATCH_REQUIRE(cached.logits.size() == recomputed.logits.size());
  double worst = 0;
  for (size_t i = 0; i < cached.logits.size(); ++i)
    worst = std::max(worst, (cached.logits[i] - recomputed.logits[i]).abs().max().item<double>());
  CATCH_CHECK(worst < kLogitTolerance);
  return worst;
}

model::Transformer make_model(const config::ModelConfig& cfg, uint64_t seed = 7) {
  model::Transformer m(cfg);
  m->init_weights(seed);
  return m;
}

config::ModelConfig mla_config(int q_lora_rank) {
  return testing::with_mla(testing::tiny_model_config(), q_lora_rank, 12, 8, 4, 6);
}

void with_yarn(config::ModelConfig& m) {
  m.yarn.factor = 4;
  m.yarn.original_max_seq_len = 8;
  m.yarn.mscale = 1;
  m.yarn.mscale_all_dim = 1;
}

const std::vector<int64_t> kPrompt = {3, 1, 4, 1, 5};

}  // namespace

CATCH_TEST_CASE("KV cache: greedy equals the recompute path with the same logits, GQA variants", "[model][kv_cache]") {
  torch::NoGradGuard no_grad;
  std::map<std::string, config::ModelConfig> configs;
  configs["gqa dense+moe"] = testing::tiny_model_config();
  auto head = testing::tiny_model_config();
  head.qk_norm = "head";
  head.attn_bias = "qkv";
  configs["gqa qk_norm head, qkv bias"] = head;
  auto full = testing::tiny_model_config();
  full.qk_norm = "full";
  full.n_kv_heads = 4;  // plain multi-head attention too
  configs["gqa qk_norm full, MHA"] = full;
  auto dense = testing::tiny_model_config();
  dense.dense_layers = dense.n_layers;
  configs["gqa all dense"] = dense;
  auto yarn = testing::tiny_model_config();
  with_yarn(yarn);
  yarn.moe.shared_gate = true;  // Qwen2-MoE's gated shared expert
  configs["gqa yarn, gated shared expert"] = yarn;
  auto partial = testing::tiny_model_config();  // GLM-4.5: RoPE on half of each head, q/k/v (and o) biases
  partial.rotary_dim = 2;
  partial.attn_bias = "all";
  partial.moe.router.score_func = "sigmoid";
  configs["gqa partial rope, all biases"] = partial;
  for (const auto& [name, cfg] : configs) {
    CATCH_INFO(name);
    auto model = make_model(cfg);
    // 11 new tokens fill max_seq_len (16) exactly; 14 go past it, where both paths slide a window.
    const double worst = check_cache_equals_recompute(*model, kPrompt, 11);
    check_cache_equals_recompute(*model, kPrompt, 14);
    std::printf("[kv] %-32s max |logit diff| %.3g\n", name.c_str(), worst);
  }
}

CATCH_TEST_CASE("KV cache: greedy equals the recompute path with the same logits, MLA variants", "[model][kv_cache]") {
  torch::NoGradGuard no_grad;
  std::map<std::string, config::ModelConfig> configs;
  configs["mla q low-rank"] = mla_config(8);
  configs["mla full-rank q"] = mla_config(0);
  auto yarn = mla_config(8);
  with_yarn(yarn);
  configs["mla q low-rank, yarn"] = yarn;
  auto dense = mla_config(0);
  dense.dense_layers = dense.n_layers;
  with_yarn(dense);
  configs["mla full-rank q, yarn, dense"] = dense;
  configs["mla q low-rank, LoRA on q, kv, o"] = mla_config(8);
  for (const auto& [name, cfg] : configs) {
    CATCH_INFO(name);
    auto model = make_model(cfg);
    if (name.find("LoRA") != std::string::npos) {
      // Adapters that change the output (B not zero): a decode step merges wkv_b's into the absorbed
      // weights, the recompute path runs them at their matmul.
      config::LoraConfig lora;
      lora.rank = 4;
      lora.alpha = 8;
      lora.targets = {"q", "kv", "o"};
      model->add_lora(lora, 3);
      for (auto& p : model->named_parameters())
        if (p.key().find("_lora_b") != std::string::npos) p.value().normal_(0, 0.2);
    }
    const double worst = check_cache_equals_recompute(*model, kPrompt, 11);
    check_cache_equals_recompute(*model, {9}, 15);  // a one-token prompt
    std::printf("[kv] %-32s max |logit diff| %.3g\n", name.c_str(), worst);
  }
}

CATCH_TEST_CASE("KV cache: MLA caches the latent and the RoPE key, GQA the keys and values", "[model][kv_cache]") {
  torch::NoGradGuard no_grad;
  auto mla = make_model(mla_config(8));
  auto cache = mla->new_cache(2, 9);
  mla->decode(torch::tensor({1, 2, 3, 4, 5, 6}, torch::kLong).view({2, 3}), cache);
  CATCH_CHECK(cache.length == 3);
  for (const auto& layer : cache.layers) {
    CATCH_CHECK(layer.latent_BCR.sizes() == torch::IntArrayRef({2, 9, 12}));
    CATCH_CHECK(layer.k_pe_BCP.sizes() == torch::IntArrayRef({2, 9, 4}));
    CATCH_CHECK(!layer.k_BGCHd.defined());
  }
  auto gqa = make_model(testing::tiny_model_config());
  auto gqa_cache = gqa->new_cache(1, 16);
  gqa->decode(torch::tensor({1, 2}, torch::kLong).view({1, 2}), gqa_cache);
  CATCH_CHECK(gqa_cache.layers[0].k_BGCHd.sizes() == torch::IntArrayRef({1, 2, 16, 4}));
  // Past its capacity, and beyond max_seq_len, the cache refuses with one clear line.
  CATCH_CHECK_THROWS_WITH(gqa->new_cache(1, 17), Contains("model.max_seq_len = 16"));
  auto small = gqa->new_cache(1, 3);
  gqa->decode(torch::tensor({1, 2}, torch::kLong).view({1, 2}), small);
  CATCH_CHECK_THROWS_WITH(gqa->decode(torch::tensor({1, 2}, torch::kLong).view({1, 2}), small),
                          Contains("holds 3 positions"));
}

CATCH_TEST_CASE("KV cache: ragged prompts in one batch give each row its unbatched greedy tokens", "[model][kv_cache]") {
  torch::NoGradGuard no_grad;
  const std::vector<std::vector<int64_t>> prompts = {{3, 1, 4}, {1, 5, 9, 2, 6, 5, 3}, {5}, {8, 9, 7, 9, 3}};
  for (const auto& cfg : {testing::tiny_model_config(), mla_config(8)}) {
    CATCH_INFO(cfg.attention);
    auto model = make_model(cfg, 11);
    train::GenerateOptions options;
    options.temperature = 0;
    options.max_new_tokens = 12;  // the longest row reaches max_seq_len and goes on past it (recomputed)
    const auto rows = train::generate_batch(*model, prompts, options);
    CATCH_REQUIRE(rows.size() == prompts.size());
    for (size_t b = 0; b < prompts.size(); ++b) {
      CATCH_INFO("row " << b);
      CATCH_CHECK(rows[b] == train::generate(*model, prompts[b], options));
      auto recompute = options;
      recompute.use_cache = false;
      CATCH_CHECK(rows[b] == train::generate(*model, prompts[b], recompute));
    }
  }
}

CATCH_TEST_CASE("Generation stops a row at a stop id and keeps it", "[model][kv_cache]") {
  torch::NoGradGuard no_grad;
  auto model = make_model(testing::tiny_model_config());
  train::GenerateOptions options;
  options.temperature = 0;
  options.max_new_tokens = 8;
  const auto full = train::generate(*model, kPrompt, options);
  const int64_t stop = full[kPrompt.size() + 2];  // the third new token
  const auto first = std::find(full.begin() + int64_t(kPrompt.size()), full.end(), stop);
  options.stop_ids = {stop};
  for (bool cache : {true, false}) {
    options.use_cache = cache;
    CATCH_CHECK(train::generate(*model, kPrompt, options) == std::vector<int64_t>(full.begin(), first + 1));
  }
  // In a batch, the other rows go on.
  const auto rows = train::generate_batch(*model, {kPrompt, {2, 7}}, options);
  options.stop_ids.clear();
  auto alone = train::generate(*model, {2, 7}, options);
  const auto second_stop = std::find(alone.begin() + 2, alone.end(), stop);
  CATCH_CHECK(rows[1] == std::vector<int64_t>(alone.begin(), second_stop == alone.end() ? alone.end() : second_stop + 1));
}

CATCH_TEST_CASE("Sampling: seeded runs repeat, top-p 1e-9 and top-k 1 are greedy", "[model][kv_cache][sampling]") {
  torch::NoGradGuard no_grad;
  auto model = make_model(testing::tiny_model_config());
  train::GenerateOptions options;
  options.max_new_tokens = 10;
  options.temperature = 1.0;
  options.seed = 5;
  const auto a = train::generate(*model, kPrompt, options);
  CATCH_CHECK(a == train::generate(*model, kPrompt, options));
  options.use_cache = false;  // the same draws from the same logits
  CATCH_CHECK(a == train::generate(*model, kPrompt, options));
  options.use_cache = true;
  bool differs = false;  // another seed draws another continuation (of 20 seeds, surely one differs)
  for (uint64_t seed = 6; seed < 26 && !differs; ++seed) {
    options.seed = seed;
    differs = train::generate(*model, kPrompt, options) != a;
  }
  CATCH_CHECK(differs);

  auto greedy_options = options;
  greedy_options.temperature = 0;
  const auto argmax = train::generate(*model, kPrompt, greedy_options);
  auto nucleus = options;
  nucleus.top_p = 1e-9;
  auto top1 = options;
  top1.top_k = 1;
  for (uint64_t seed = 0; seed < 5; ++seed) {
    nucleus.seed = top1.seed = seed;
    CATCH_CHECK(train::generate(*model, kPrompt, nucleus) == argmax);
    CATCH_CHECK(train::generate(*model, kPrompt, top1) == argmax);
  }
}

CATCH_TEST_CASE("Sampling draws from the temperature, top-k and top-p distribution", "[model][sampling]") {
  // probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1. 20000 draws: a frequency's standard deviation
  // is at most 0.0036, so 0.02 is over 5 sigma.
  const auto logits = torch::log(torch::tensor({0.5, 0.3, 0.15, 0.05}, torch::kDouble));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  auto frequencies = [&](const train::GenerateOptions& options) {
    std::vector<double> f(4, 0.0);
    const int n = 20000;
    for (int i = 0; i < n; ++i) f[train::sample_token(logits, options, gen)] += 1.0 / n;
    return f;
  };
  auto expect = [](const std::vector<double>& got, const std::vector<double>& want) {
    for (size_t i = 0; i < want.size(); ++i) CATCH_CHECK(std::abs(got[i] - want[i]) < 0.02);
  };
  train::GenerateOptions options;
  options.temperature = 1;
  expect(frequencies(options), {0.5, 0.3, 0.15, 0.05});
  options.top_k = 2;
  expect(frequencies(options), {0.625, 0.375, 0, 0});
  options.top_k = 1;
  expect(frequencies(options), {1, 0, 0, 0});
  options.top_k = 0;
  options.top_p = 0.75;  // 0.5 < 0.75 keeps the second token, 0.8 >= 0.75 drops the third
  expect(frequencies(options), {0.625, 0.375, 0, 0});
  options.top_p = 0.9;
  expect(frequencies(options), {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0});
  options.top_p = 1;
  options.temperature = 2;  // p^(1/2), normalized
  const double z = std::sqrt(0.5) + std::sqrt(0.3) + std::sqrt(0.15) + std::sqrt(0.05);
  expect(frequencies(options), {std::sqrt(0.5) / z, std::sqrt(0.3) / z, std::sqrt(0.15) / z, std::sqrt(0.05) / z});
}

CATCH_TEST_CASE("generate --prompts: a bad line is one line naming the file, the line and the field", "[cli][kv_cache]") {
  testing::TempDir dir("kv-prompts");
  const std::string bin = MOETRAIN_BINARY;
  auto refuses = [&](const std::string& lines, const std::string& line_no, const std::string& field) {
    const std::string file = dir.str("prompts.jsonl");
    testing::write_bytes(file, lines);
    const auto r = testing::run_command(bin + " generate --checkpoint " + dir.str("none") + " --prompts " + file);
    CATCH_INFO(r.output);
    CATCH_CHECK(r.exit_code != 0);
    CATCH_CHECK(testing::one_line(r.output));
    CATCH_CHECK_THAT(r.output, Contains(file + " line " + line_no) && Contains(field));
  };
  refuses("{\"prompt_ids\": [1, 2]}\n\n{\"prompt_ids\": [1, -2]}\n", "3", "prompt_ids");
  refuses("{\"prompt_ids\": [1, 2]}\n{\"prompt\": 5}\n", "2", "prompt");
  refuses("{\"prompt_ids\": []}\n", "1", "prompt_ids");
  refuses("{\"prompt_ids\": [1], \"prompt\": \"x\"}\n", "1", "exactly one of the fields");
  refuses("{\"prompt_ids\": [1]}\n{not json\n", "2", "not a JSON object");
  refuses("{\"text\": \"hi\"}\n", "1", "'prompt_ids' and 'prompt'");
}

CATCH_TEST_CASE("generate --prompts runs a batch and prints one JSON line per prompt, equal to each run alone",
                "[cli][kv_cache][slow]") {
  testing::TempDir dir("kv-cli");
  const std::string bin = MOETRAIN_BINARY;
  // A tiny byte-vocabulary model, trained for a step.
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  cfg.train.steps = 1;
  train::train(cfg, {});
  testing::write_bytes(dir.str("p.jsonl"), "{\"prompt\": \"the cat\"}\n{\"prompt_ids\": [104, 105]}\n");
  const std::string common = " --temperature 0 --max-new-tokens 6";
  const auto batch = testing::run_command(bin + " generate --checkpoint " + dir.str("run") + " --prompts " +
                                          dir.str("p.jsonl") + common + " 2>/dev/null");
  CATCH_INFO(batch.output);
  CATCH_REQUIRE(batch.exit_code == 0);
  CATCH_CHECK(testing::count_of(batch.output, "\n") == 2);
  const auto first = nlohmann::json::parse(batch.output.substr(0, batch.output.find('\n')));
  CATCH_CHECK(first["index"] == 0);
  CATCH_CHECK(first["completion_ids"].size() == 6);
  for (const char* flags : {"", " --no-cache"}) {
    const auto alone = testing::run_command(bin + " generate --checkpoint " + dir.str("run") +
                                            " --prompt-ids 104,105 --print-ids" + common + flags + " 2>/dev/null");
    const auto second = nlohmann::json::parse(batch.output.substr(batch.output.find('\n') + 1));
    std::string ids = "104,105";
    for (const auto& id : second["completion_ids"]) ids += "," + std::to_string(id.get<int64_t>());
    CATCH_CHECK(alone.output == ids + "\n");
  }
}

CATCH_TEST_CASE("KV cache: each family's tiny Hugging Face model, cached greedy equals transformers' greedy",
                "[hf][kv_cache][slow]") {
  const std::string source = MOETRAIN_SOURCE_DIR;
  for (const std::string family : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2_lite"}) {
    CATCH_INFO(family);
    testing::TempDir dir("kv-hf-" + family);
    const auto r = testing::run_command("OMP_NUM_THREADS=1 " + source + "/third_party/venv/bin/python " + source +
                                        "/scripts/hf_reference.py make " + family + " " + dir.str("hf"));
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
    const auto ref = ckpt::SafetensorsFile(dir.str("hf/reference.safetensors")).load("greedy").to(torch::kLong).contiguous();
    const std::vector<int64_t> want(ref.data_ptr<int64_t>(), ref.data_ptr<int64_t>() + ref.numel());
    auto loaded = hf::load(dir.str("hf"));
    const std::vector<int64_t> prompt(want.begin(), want.begin() + 5);  // as tests/hf/test_hf.cpp makes it
    torch::NoGradGuard no_grad;
    const auto cached = greedy(*loaded.model, prompt, int(want.size()) - 5, /*cache=*/true);
    CATCH_CHECK(cached.tokens == want);
    const auto recomputed = greedy(*loaded.model, prompt, int(want.size()) - 5, /*cache=*/false);
    double worst = 0;
    for (size_t i = 0; i < cached.logits.size(); ++i)
      worst = std::max(worst, (cached.logits[i] - recomputed.logits[i]).abs().max().item<double>());
    std::printf("[kv] %-16s cached vs recompute max |logit diff| %.3g\n", family.c_str(), worst);
    CATCH_CHECK(worst < kLogitTolerance);
  }
}
