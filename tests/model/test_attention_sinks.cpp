// gpt-oss's attention features: sinks (a learned logit per head in each softmax's denominator) and
// sliding-window layers. TokenLayout::attend against a direct fp64 reference (materialized logits, the
// sink column appended, softmax, the column dropped), values and the gradients of q, k, v and the sinks,
// causal, packed, GQA; QK-clip's max_logits inside the window; the model under activation checkpointing
// and the chunked loss; KV-cache greedy against the recompute path; the config's checks.
// Tolerance: 1e-5 of the largest value compared. The kernels run in fp32 against an fp64 reference of
// the same inputs, so they differ by fp32 rounding (~1e-7 at these sizes); a sink or a window left out
// moves the values by the size of an attention weight, far above it.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "config/config.h"
#include "model/transformer.h"
#include "train/generate.h"
#include <ATen/CPUGeneratorImpl.h>

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

constexpr double kTolerance = 1e-5;

// |a - b| at most kTolerance of b's largest value (at least 1e-3, for gradients near zero).
void check_close(const torch::Tensor& a, const torch::Tensor& b, const std::string& what) {
  const double scale = std::max(1e-3, b.abs().max().item<double>());
  const double diff = (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
  CATCH_INFO(what << ": max difference " << diff << " of largest " << scale);
  CATCH_CHECK(diff <= kTolerance * scale);
}

// Whether query i may see key j: causal, in the same document (doc_BS), and within the window.
torch::Tensor reference_mask(const torch::Tensor& doc_BS, int64_t window) {
  const int64_t B = doc_BS.size(0), S = doc_BS.size(1);
  auto allowed = torch::zeros({B, 1, S, S}, torch::kBool);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j <= i; ++j)
        if (doc_BS[b][i].item<int64_t>() == doc_BS[b][j].item<int64_t>() && (window == 0 || j > i - window))
          allowed[b][0][i][j] = true;
  return allowed;
}

// The sinked softmax written out in fp64: each query head h reads key head h / (H / G).
torch::Tensor reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& allowed, const torch::Tensor& sinks) {
  const int64_t H = q.size(1), G = k.size(1), S = q.size(2);
  const auto keys = k.repeat_interleave(H / G, 1), values = v.repeat_interleave(H / G, 1);
  auto logits = torch::matmul(q, keys.transpose(-2, -1)) / std::sqrt(double(q.size(3)));
  logits = logits.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  if (!sinks.defined()) return torch::matmul(torch::softmax(logits, -1), values);
  auto column = sinks.view({1, H, 1, 1}).expand({q.size(0), H, S, 1});
  auto p = torch::softmax(torch::cat({logits, column}, -1), -1).narrow(-1, 0, S);
  return torch::matmul(p, values);
}

struct Case {
  std::string name;
  int64_t heads, kv_heads, window;
  bool packed, sinks;
};

// Row 0: documents of 5, 3 and 4 tokens; row 1: 7 and 5 (positions restart at each).
const std::vector<std::vector<int64_t>> kDocuments = {{5, 3, 4}, {7, 5}};

void check_against_reference(const Case& c) {
  CATCH_INFO(c.name);
  const int64_t B = 2, S = 12, D = 8;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  auto leaf = [&](at::IntArrayRef shape) { return torch::randn(shape, gen, torch::kFloat).requires_grad_(true); };
  auto q = leaf({B, c.heads, S, D}), k = leaf({B, c.kv_heads, S, D}), v = leaf({B, c.kv_heads, S, D});
  auto sinks = c.sinks ? leaf({c.heads}) : torch::Tensor();
  auto doc_BS = torch::zeros({B, S}, torch::kLong), positions_BS = torch::zeros({B, S}, torch::kLong);
  if (c.packed)
    for (int64_t b = 0; b < B; ++b) {
      int64_t at = 0, id = 0;
      for (int64_t L : kDocuments[size_t(b)]) {
        doc_BS[b].narrow(0, at, L).fill_(id++);
        positions_BS[b].narrow(0, at, L).copy_(torch::arange(L, torch::kLong));
        at += L;
      }
    }
  const auto layout = c.packed ? model::TokenLayout::packed(positions_BS) : model::TokenLayout{};
  auto y = layout.attend(q, k, v, std::nullopt, c.kv_heads != c.heads, c.window, sinks);

  auto wide = [](const torch::Tensor& t) { return t.detach().to(torch::kDouble).requires_grad_(true); };
  auto q64 = wide(q), k64 = wide(k), v64 = wide(v), sinks64 = c.sinks ? wide(sinks) : torch::Tensor();
  auto expected = reference_attention(q64, k64, v64, reference_mask(doc_BS, c.window), sinks64);
  check_close(y, expected, "values");

  const auto dy = torch::randn(y.sizes(), gen, torch::kFloat);
  std::vector<torch::Tensor> inputs = {q, k, v}, inputs64 = {q64, k64, v64};
  if (c.sinks) inputs.push_back(sinks), inputs64.push_back(sinks64);
  const auto got = torch::autograd::grad({y}, inputs, {dy});
  const auto want = torch::autograd::grad({expected}, inputs64, {dy.to(torch::kDouble)});
  const char* names[] = {"dq", "dk", "dv", "dsinks"};
  for (size_t i = 0; i < got.size(); ++i) check_close(got[i], want[i], names[i]);
  // A sink that was left out, or a window, would move the values far past the tolerance.
  if (c.sinks) {
    auto plain = reference_attention(q64, k64, v64, reference_mask(doc_BS, c.window), torch::Tensor());
    CATCH_CHECK((plain - expected).abs().max().item<double>() > 1e-2);
  }
}

config::ModelConfig gpt_oss_like() {
  auto m = testing::tiny_model_config();
  m.n_layers = 4;
  m.attention_sinks = true;
  m.sliding_window = 3;
  m.layer_types = {"sliding", "full"};
  m.moe.aux_loss_coef = 0;
  return m;
}

// A seeded model whose sinks are not all zero (as they are at init), so that every test sees them act.
model::Transformer make_model(const config::ModelConfig& cfg, uint64_t seed = 7) {
  model::Transformer m(cfg);
  m->init_weights(seed);
  torch::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& p : m->named_parameters())
    if (p.key().size() > 6 && p.key().substr(p.key().size() - 6) == ".sinks")
      p.value().copy_(torch::randn(p.value().sizes(), gen, torch::kFloat));
  return m;
}

struct Grads {
  double loss = 0;
  std::vector<torch::Tensor> grads;
};

Grads loss_and_grads(model::TransformerImpl& model, const torch::Tensor& tokens, const torch::Tensor& targets,
                     const torch::Tensor& positions) {
  model.zero_grad();
  const auto out = model.forward_loss(tokens, targets, /*ignore_index=*/-100, false, true, positions);
  auto loss = out.mtp_loss.defined() ? out.loss + out.mtp_loss : out.loss;
  loss.backward();
  Grads g{loss.item<double>(), {}};
  for (const auto& p : model.parameters()) g.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return g;
}

}  // namespace

CATCH_TEST_CASE("Attention sinks and windows: values and gradients equal the materialized softmax", "[model][sinks][window]") {
  const std::vector<Case> cases = {
      {"causal, GQA 4/2, sinks", 4, 2, 0, false, true},
      {"causal, MHA, sinks", 4, 4, 0, false, true},
      {"causal, GQA, window 3", 4, 2, 3, false, false},
      {"causal, GQA, window 3, sinks", 4, 2, 3, false, true},
      {"packed, GQA, sinks", 4, 2, 0, true, true},
      {"packed, GQA, window 2", 4, 1, 2, true, false},
      {"packed, GQA, window 4, sinks", 4, 2, 4, true, true},
  };
  for (const auto& c : cases) check_against_reference(c);
}

CATCH_TEST_CASE("Sliding window: a window as long as the sequence is full attention, bit for bit", "[model][window]") {
  torch::NoGradGuard no_grad;
  auto full = testing::tiny_model_config();
  full.attention_sinks = true;
  auto windowed = full;
  windowed.sliding_window = 12;  // the sequence below is 12 tokens
  auto narrow = full;
  narrow.sliding_window = 3;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const auto tokens = torch::randint(0, full.vocab_size, {2, 12}, gen, torch::kLong);
  const auto a = make_model(full)->forward(tokens).logits_BSV;
  CATCH_CHECK(torch::equal(a, make_model(windowed)->forward(tokens).logits_BSV));
  windowed.sliding_window = 100;
  CATCH_CHECK(torch::equal(a, make_model(windowed)->forward(tokens).logits_BSV));
  // The first 3 tokens see the same keys (to fp32 rounding: other masks, other kernel blocks); later ones do not.
  const auto b = make_model(narrow)->forward(tokens).logits_BSV;
  check_close(b.narrow(1, 0, 3), a.narrow(1, 0, 3), "first 3 tokens");
  CATCH_CHECK((a - b).abs().max().item<double>() > 1e-3);
}

CATCH_TEST_CASE("Sinks and windows: the layers' windows cycle layer_types, the sinks are named and trained",
                "[model][sinks][window]") {
  auto model = make_model(gpt_oss_like());
  std::vector<int> windows;
  for (const auto& block : model->blocks) windows.push_back(block->attn->window());
  CATCH_CHECK(windows == std::vector<int>{3, 0, 3, 0});
  const auto params = model->named_parameters();
  CATCH_REQUIRE(params.contains("layers.1.attn.sinks"));
  CATCH_CHECK(params["layers.1.attn.sinks"].dim() == 1);
  CATCH_CHECK(params["layers.1.attn.sinks"].size(0) == 4);
  CATCH_CHECK(model::is_no_decay("layers.1.attn.sinks"));
  model::Transformer fresh(gpt_oss_like());
  fresh->init_weights(7);
  CATCH_CHECK(fresh->named_parameters()["layers.0.attn.sinks"].abs().max().item<double>() == 0);
  for (const auto& p : model->roled_parameters())
    if (p.name == "layers.0.attn.sinks") CATCH_CHECK(!p.compute_dtype_only);
  // Every sink takes a gradient.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const auto tokens = torch::randint(0, 32, {2, 12}, gen, torch::kLong);
  const auto targets = torch::randint(0, 32, {2, 12}, gen, torch::kLong);
  model->forward_loss(tokens, targets, -100).loss.backward();
  for (int i = 0; i < 4; ++i) {
    const auto g = model->named_parameters()["layers." + std::to_string(i) + ".attn.sinks"].grad();
    CATCH_REQUIRE(g.defined());
    CATCH_CHECK(g.abs().max().item<double>() > 0);
  }
}

CATCH_TEST_CASE("Sinks and windows: activation checkpointing and the chunked loss give the plain loss and gradients",
                "[model][sinks][window]") {
  auto cfg = gpt_oss_like();
  cfg.mtp_depth = 1;  // MTP depth 1 is block 4: sliding, as layer_types cycles
  auto model = make_model(cfg);
  CATCH_CHECK(model->mtp_modules[0]->block->attn->window() == 3);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(13);
  const auto tokens = torch::randint(0, cfg.vocab_size, {2, 12}, gen, torch::kLong);
  const auto targets = torch::randint(0, cfg.vocab_size, {2, 12}, gen, torch::kLong);
  auto positions = torch::cat({torch::arange(5), torch::arange(7)}).to(torch::kLong).repeat({2, 1});
  for (const bool packed : {false, true}) {
    CATCH_INFO((packed ? "packed" : "one sequence per row"));
    const auto pos = packed ? positions : torch::Tensor();
    model->set_activation_checkpointing("none");
    model->set_loss_chunk(0);
    const auto plain = loss_and_grads(*model, tokens, targets, pos);
    model->set_activation_checkpointing("full");
    model->set_loss_chunk(5);
    const auto saved = loss_and_grads(*model, tokens, targets, pos);
    CATCH_CHECK(std::abs(plain.loss - saved.loss) <= kTolerance * std::abs(plain.loss));
    const auto names = model->named_parameters();
    for (size_t i = 0; i < plain.grads.size(); ++i) check_close(saved.grads[i], plain.grads[i], names[i].key());
  }
}

CATCH_TEST_CASE("Sinks and windows: QK-clip's max_logits keeps to the window", "[model][window][qk_clip]") {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(17);
  const int64_t B = 2, H = 4, G = 2, S = 10, D = 8, window = 3;
  // Key 0 is scaled up, so its logits are the causal maxima; the window hides it from queries 3 onwards.
  auto q = torch::randn({B, H, S, D}, gen, torch::kFloat), k = torch::randn({B, G, S, D}, gen, torch::kFloat);
  k.narrow(2, 0, 1).mul_(20);
  const double scale = 0.5;
  const auto got = model::max_logits(q, k, scale, {}, window);
  const auto logits = torch::matmul(q, k.repeat_interleave(H / G, 1).transpose(-2, -1)) * scale;  // (B, H, S, S)
  const auto allowed = reference_mask(torch::zeros({B, S}, torch::kLong), window);
  const auto expected = logits.masked_fill(allowed.logical_not(), -1e30).amax({0, 2, 3});
  check_close(got, expected, "max logits in the window");
  const auto causal = model::max_logits(q, k, scale);
  CATCH_CHECK((causal - got).abs().max().item<double>() > 1e-3);  // the window changes the maxima here
}

CATCH_TEST_CASE("KV cache with sinks and sliding windows: greedy equals the recompute path",
                "[model][kv_cache][sinks][window]") {
  torch::NoGradGuard no_grad;
  auto model = make_model(gpt_oss_like());
  train::GenerateOptions options;
  options.temperature = 0;
  options.max_new_tokens = 11;  // fills max_seq_len (16) from a 5-token prompt, well past the window of 3
  std::vector<torch::Tensor> cached_logits, recomputed_logits;
  auto cached = options;
  cached.on_logits = [&](int, const torch::Tensor& l) { cached_logits.push_back(l.clone()); };
  auto recompute = options;
  recompute.use_cache = false;
  recompute.on_logits = [&](int, const torch::Tensor& l) { recomputed_logits.push_back(l.clone()); };
  const std::vector<int64_t> prompt = {3, 1, 4, 1, 5};
  const auto a = train::generate(*model, prompt, cached), b = train::generate(*model, prompt, recompute);
  CATCH_CHECK(a == b);
  CATCH_REQUIRE(cached_logits.size() == recomputed_logits.size());
  for (size_t i = 0; i < cached_logits.size(); ++i) check_close(cached_logits[i], recomputed_logits[i], "step logits");
  // Ragged prompts (left padding) in one batch: each row as it runs alone.
  const std::vector<std::vector<int64_t>> prompts = {{3, 1, 4}, {1, 5, 9, 2, 6, 5, 3}, {5}};
  options.max_new_tokens = 8;
  const auto rows = train::generate_batch(*model, prompts, options);
  CATCH_REQUIRE(rows.size() == prompts.size());
  for (size_t r = 0; r < prompts.size(); ++r) {
    auto alone = options;
    alone.use_cache = false;
    CATCH_CHECK(rows[r] == train::generate(*model, prompts[r], alone));
  }
}

CATCH_TEST_CASE("Config: attention sinks, sliding_window and layer_types are checked with the key named", "[config][sinks][window]") {
  using config::parse_config;
  const auto ok = parse_config("model:\n  n_layers: 4\n  attention_sinks: true\n  sliding_window: 128\n"
                               "  layer_types: [sliding, full]\n", "x.yaml");
  CATCH_CHECK(ok.model.attention_sinks);
  CATCH_CHECK(ok.model.layer_types == std::vector<std::string>{"sliding", "full"});
  CATCH_CHECK(config::attention_window(ok.model, 0) == 128);
  CATCH_CHECK(config::attention_window(ok.model, 3) == 0);
  CATCH_CHECK(parse_config(config::to_yaml(ok), "round-trip").model.layer_types == ok.model.layer_types);
  const auto all = parse_config("model:\n  sliding_window: 8\n", "x.yaml");
  CATCH_CHECK(config::attention_window(all.model, 2) == 8);
  CATCH_CHECK(config::attention_window(config::Config{}.model, 0) == 0);
  CATCH_REQUIRE_THROWS_WITH(parse_config("model:\n  layer_types: [sliding, full]\n", "x.yaml"),
                            Contains("model.layer_types [sliding, full] needs model.sliding_window > 0"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("model:\n  sliding_window: 8\n  layer_types: [sliding, local]\n", "x.yaml"),
                            Contains("model.layer_types holds \"local\""));
  CATCH_REQUIRE_THROWS_WITH(
      parse_config("model:\n  n_layers: 4\n  sliding_window: 8\n  layer_types: [sliding, full, full]\n", "x.yaml"),
      Contains("model.layer_types has 3 entries, which must divide model.n_layers = 4"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("model:\n  attention: mla\n  attention_sinks: true\n", "x.yaml"),
                            Contains("model.attention_sinks = true must be false with model.attention = mla"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("model:\n  attention: mla\n  sliding_window: 4\n", "x.yaml"),
                            Contains("model.sliding_window = 4 must be 0 with model.attention = mla"));
  CATCH_REQUIRE_THROWS_WITH(parse_config("model:\n  sliding_window: -1\n", "x.yaml"), Contains("model.sliding_window"));
}
