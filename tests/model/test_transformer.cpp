// The transformer: shapes, parameter counts, name-keyed initialization, finite-difference gradients.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "model/layers.h"
#include "model/transformer.h"

using namespace moetrain;

CATCH_TEST_CASE("Transformer output shapes and parameter counts", "[model]") {
  auto cfg = testing::tiny_model_config();
  model::Transformer m(cfg);
  m->init_weights(1);
  auto out = m->forward(torch::randint(0, cfg.vocab_size, {3, 11}, torch::kLong));
  CATCH_CHECK(out.logits_BSV.sizes() == torch::IntArrayRef({3, 11, 32}));
  CATCH_CHECK(out.logits_BSV.scalar_type() == torch::kFloat);
  CATCH_REQUIRE(out.moe_stats.size() == 1);  // one MoE layer, block 1
  CATCH_CHECK(out.moe_layers == std::vector<int>{1});
  CATCH_CHECK(out.moe_stats[0].tokens_per_expert_E.sum().item<int64_t>() == 3 * 11 * 2);
  // By hand: embed 32*16 = 512 (tied head); per layer 2 norms 32 + attention 16*16 + 2*16*8 + 16*16 = 768;
  // dense MLP 3*16*24 = 1152; MoE router 4*16 = 64, experts 3*4*16*8 = 1536, shared 3*16*8 = 384; final norm 16.
  const auto counts = m->param_counts();
  CATCH_CHECK(counts.total == 512 + 2 * (32 + 768) + 1152 + 64 + 1536 + 384 + 16);
  CATCH_CHECK(counts.active == counts.total - 1536 / 2);  // top-2 of 4 experts: half the routed weights
  cfg.tie_embeddings = false;
  CATCH_CHECK(model::Transformer(cfg)->param_counts().total == counts.total + 512);
}

CATCH_TEST_CASE("Initialization depends only on the seed and parameter names", "[model]") {
  auto cfg = testing::tiny_model_config();
  model::Transformer a(cfg), b(cfg), c(cfg);
  torch::manual_seed(123);  // the global RNG must not matter
  a->init_weights(5);
  torch::manual_seed(456);
  b->init_weights(5);
  c->init_weights(6);
  auto pa = a->named_parameters(), pb = b->named_parameters(), pc = c->named_parameters();
  for (const auto& p : pa) {
    CATCH_CHECK(torch::equal(p.value(), pb[p.key()]));
    if (p.key().find("norm") == std::string::npos) CATCH_CHECK(!torch::equal(p.value(), pc[p.key()]));
  }
  // Experts are drawn per global expert id: expert 2 of a 4-expert layer equals expert 2 of an 8-expert one.
  auto wide = cfg;
  wide.moe.n_experts = 8;
  model::Transformer w(wide);
  w->init_weights(5);
  auto name = std::string("layers.1.moe.experts.w1");
  CATCH_CHECK(torch::equal(pa[name][2], w->named_parameters()[name][2]));
}

CATCH_TEST_CASE("Gradients match central finite differences in double precision", "[model]") {
  auto cfg = testing::tiny_model_config();
  cfg.tie_embeddings = false;
  cfg.moe.seq_aux_loss_coef = 0.01;  // every differentiable balancing loss on, besides the switch loss
  cfg.moe.z_loss_coef = 0.001;
  cfg.rotary_dim = 2;     // GLM-4.5's partial RoPE and biases (o's too)
  cfg.attn_bias = "all";
  model::Transformer m(cfg);
  m->init_weights(3);
  {
    torch::NoGradGuard g;  // larger weights than the init so every path carries signal
    for (auto& p : m->parameters())
      if (p.dim() > 1) p.mul_(8);
  }
  m->to(torch::kDouble);
  auto tokens = torch::randint(0, cfg.vocab_size, {2, 9}, torch::kLong);
  auto targets = torch::randint(0, cfg.vocab_size, {2, 9}, torch::kLong);
  auto loss_fn = [&] {
    auto out = m->forward(tokens);
    return torch::cross_entropy_loss(out.logits_BSV.view({-1, cfg.vocab_size}), targets.view(-1)) +
           out.balance_loss.to(torch::kDouble);
  };
  m->zero_grad();
  loss_fn().backward();
  const double eps = 1e-6;
  std::mt19937 rng(11);
  int checked = 0;
  for (auto& p : m->named_parameters()) {
    auto w = p.value();
    auto flat = w.view(-1);
    auto grad = w.grad().view(-1);
    for (int i = 0; i < 6; ++i) {
      const int64_t j = int64_t(rng() % uint64_t(flat.numel()));
      double numeric;
      {
        torch::NoGradGuard g;
        const double orig = flat[j].item<double>();
        flat[j].fill_(orig + eps);
        const double up = loss_fn().item<double>();
        flat[j].fill_(orig - eps);
        const double down = loss_fn().item<double>();
        flat[j].fill_(orig);
        numeric = (up - down) / (2 * eps);
      }
      const double analytic = grad[j].item<double>();
      // Central differences in fp64 carry ~1e-9 truncation and rounding error at this scale.
      CATCH_INFO(p.key() << "[" << j << "]: analytic " << analytic << ", numeric " << numeric);
      CATCH_CHECK(std::abs(analytic - numeric) <= 1e-6 + 1e-5 * std::abs(numeric));
      ++checked;
    }
  }
  CATCH_CHECK(checked > 60);
}

// GLM-4.5's partial RoPE against the formula: with R = model.rotary_dim, dims i and i + R/2 (i < R/2) of
// each head turn by position * theta^(-2i/R), rotate-half style; dims R.. pass unchanged.
CATCH_TEST_CASE("Partial RoPE turns the first rotary_dim dims of each head and passes the rest", "[model]") {
  torch::manual_seed(3);
  const int R = 4, Hd = 10, S = 5, offset = 2;
  const auto rope = model::Rope::make(16, R, 10000.0, torch::kCPU);
  const auto x = torch::randn({2, 3, S, Hd}).to(torch::kDouble);  // fp32 values, exact in fp64
  auto expected = x.clone();
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < R / 2; ++i) {
      const double angle = (offset + s) * std::pow(10000.0, -2.0 * i / R);
      auto a = x.select(2, s).select(2, i), b = x.select(2, s).select(2, i + R / 2);
      expected.select(2, s).select(2, i).copy_(a * std::cos(angle) - b * std::sin(angle));
      expected.select(2, s).select(2, i + R / 2).copy_(b * std::cos(angle) + a * std::sin(angle));
    }
  const auto y = rope.apply(x.to(torch::kFloat), offset).to(torch::kDouble);
  CATCH_CHECK((y - expected).abs().max().item<double>() < 1e-6);
  CATCH_CHECK(torch::equal(y.narrow(3, R, Hd - R), x.narrow(3, R, Hd - R)));
  // The same at packed positions (a document starting at `offset`).
  const auto layout = model::TokenLayout::packed(torch::arange(offset, offset + S).repeat({2, 1}));
  CATCH_CHECK(torch::equal(rope.apply(x.to(torch::kFloat), layout), rope.apply(x.to(torch::kFloat), offset)));
}

CATCH_TEST_CASE("model.attn_bias: qkv adds q, k and v biases, all an output bias too", "[model]") {
  auto cfg = testing::tiny_model_config();
  for (const std::string bias : {"none", "qkv", "all"}) {
    CATCH_INFO(bias);
    cfg.attn_bias = bias;
    model::Attention attn(cfg);
    const auto names = attn->named_parameters();
    CATCH_CHECK(names.contains("q_bias") == (bias != "none"));
    CATCH_CHECK(names.contains("v_bias") == (bias != "none"));
    CATCH_CHECK(names.contains("o_bias") == (bias == "all"));
  }
  // The output bias is added to the output projection's result, at every position.
  torch::NoGradGuard no_grad;
  torch::manual_seed(5);
  model::Attention attn(cfg);
  for (auto& p : attn->parameters()) p.copy_(0.3 * torch::randn_like(p));
  const auto rope = model::Rope::make(cfg.max_seq_len, 4, cfg.rope_theta, torch::kCPU);
  const auto x = torch::randn({2, 6, cfg.d_model});
  const auto with = attn->forward(x, rope, std::nullopt);
  const auto o_bias = attn->o_bias.clone();
  attn->o_bias.zero_();
  CATCH_CHECK(torch::allclose(with - attn->forward(x, rope, std::nullopt), o_bias.expand({2, 6, cfg.d_model}), 1e-6, 1e-6));
}

CATCH_TEST_CASE("The weight-decay rule excludes norms, biases and embeddings", "[model]") {
  CATCH_CHECK(model::is_no_decay("embed"));
  CATCH_CHECK(model::is_no_decay("layers.0.attn_norm.weight"));
  CATCH_CHECK(model::is_no_decay("final_norm.weight"));
  CATCH_CHECK(!model::is_no_decay("layers.0.attn.wq"));
  CATCH_CHECK(!model::is_no_decay("layers.1.moe.experts.w1"));
  CATCH_CHECK(!model::is_no_decay("lm_head"));
}

// The loss every command uses: LibTorch's cross_entropy by default, and under deterministic mode a
// gather and a plain sum (NLLLoss has no deterministic CUDA kernel). Both must be the same function:
// mean and sum over the kept targets, ignored targets contributing nothing, gradients included.
CATCH_TEST_CASE("token_cross_entropy: the deterministic form equals LibTorch's cross_entropy", "[model]") {
  torch::manual_seed(2);
  const auto logits = torch::randn({50, 17}) * 3;
  auto targets = torch::randint(0, 17, {50}, torch::kLong);
  targets.index_put_({torch::arange(0, 50, 7)}, -100);  // every 7th target is ignored
  for (bool sum : {false, true}) {
    std::vector<torch::Tensor> values, grads;
    for (bool deterministic : {false, true}) {
      const testing::DeterministicMode mode(deterministic);
      auto x = logits.clone().requires_grad_(true);
      auto loss = model::token_cross_entropy(x, targets, -100, sum);
      loss.backward();
      values.push_back(loss.detach());
      grads.push_back(x.grad());
    }
    CATCH_INFO((sum ? "sum" : "mean"));
    // The same sums of the same fp32 log-probabilities in another order: 1e-6 relative.
    CATCH_CHECK(values[1].item<double>() == Approx(values[0].item<double>()).epsilon(1e-6));
    CATCH_CHECK(torch::allclose(grads[1], grads[0], 1e-5, 1e-7));
    CATCH_CHECK(grads[1].index({torch::arange(0, 50, 7)}).abs().max().item<double>() == 0.0);  // ignored rows
  }
  // The reference: -mean of log_softmax at the kept targets, computed by hand.
  const auto logp = torch::log_softmax(logits.to(torch::kDouble), -1);
  double total = 0;
  int kept = 0;
  for (int i = 0; i < 50; ++i)
    if (targets[i].item<int64_t>() != -100) total -= logp[i][targets[i].item<int64_t>()].item<double>(), ++kept;
  CATCH_CHECK(model::token_cross_entropy(logits, targets, -100).item<double>() == Approx(total / kept).epsilon(1e-6));
}

// Parallel layouts, the seeded init and the checkpoint read each parameter's role from the model's
// structure: exactly the stacked weights of every MoE layer's routed experts.
CATCH_TEST_CASE("roled_parameters marks exactly the routed experts' weights as expert", "[model]") {
  auto cfg = testing::tiny_model_config();
  cfg.n_layers = 3;
  model::Transformer m(cfg);
  const auto roled = m->roled_parameters();
  const auto named = m->named_parameters();
  CATCH_REQUIRE(roled.size() == named.size());
  int experts = 0;
  for (const auto& p : roled) {
    CATCH_INFO(p.name);
    CATCH_CHECK(p.tensor.is_same(named[p.name]));
    const bool routed = p.name.find(".moe.experts.") != std::string::npos && p.tensor.size(0) == cfg.moe.n_experts;
    CATCH_CHECK((p.role == model::ParamRole::expert) == routed);
    experts += p.role == model::ParamRole::expert;
  }
  CATCH_CHECK(experts == 3 * (cfg.n_layers - cfg.dense_layers));  // w1, w2, w3 of each MoE layer
}

// train.loss_chunk_tokens: the LM head and the loss a chunk of tokens at a time, forward and backward.
// Against the full logits: the same loss (mean and sum) and the same gradient for every parameter, to
// fp32 rounding (only the order of the loss's sum changes; 1e-5 relative of the largest value). In bf16
// compute the loss agrees to 2e-3, and the gradients to two bf16 ulps (2^-7 = 7.8e-3) of the largest:
// the head's gradient is a bf16 matmul per chunk, each rounded to bf16 before the chunks are summed,
// where the full logits round one matmul over all tokens once. Chunks that do not divide the tokens,
// ignored targets, a tied head and an untied one.
CATCH_TEST_CASE("chunked_loss equals the loss of the full logits, value and gradients", "[model]") {
  for (bool tied : {true, false}) {
    for (const model::ComputeDtype dtype : {model::ComputeDtype{}, model::ComputeDtype{torch::kBFloat16}}) {
      for (bool sum : {false, true}) {
        CATCH_INFO((tied ? "tied" : "untied") << (dtype ? " bf16" : " fp32") << (sum ? " sum" : " mean"));
        auto cfg = testing::tiny_model_config();
        cfg.tie_embeddings = tied;
        torch::manual_seed(8);
        const auto tokens = torch::randint(0, cfg.vocab_size, {3, 16}, torch::kLong);
        auto targets = torch::randint(0, cfg.vocab_size, {3, 16}, torch::kLong);
        targets.index_put_({0, torch::indexing::Slice(0, 5)}, -100);
        auto run = [&](int64_t chunk) {
          model::Transformer m(cfg);
          m->init_weights(4);
          m->set_compute_dtype(dtype);
          m->set_loss_chunk(chunk);
          auto out = m->forward_loss(tokens, targets, -100, sum);
          CATCH_CHECK(out.logits_BSV.defined() == (chunk == 0));  // chunked: the logits never exist whole
          out.loss.backward();
          std::vector<torch::Tensor> grads;
          for (const auto& p : m->parameters()) grads.push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
          return std::make_pair(out.loss.item<double>(), grads);
        };
        const auto [want, want_grads] = run(0);
        const double tol = dtype ? 2e-3 : 1e-5, grad_tol = dtype ? 7.8e-3 : 1e-5;
        for (int64_t chunk : {7, 16, 48, 1000}) {
          CATCH_INFO("chunk " << chunk);
          const auto [got, got_grads] = run(chunk);
          CATCH_CHECK(got == Approx(want).epsilon(tol));
          for (size_t i = 0; i < got_grads.size(); ++i) {
            const double scale = std::max(1e-12, want_grads[i].abs().max().item<double>());
            CATCH_CHECK((got_grads[i] - want_grads[i]).abs().max().item<double>() <= grad_tol * scale);
          }
        }
      }
    }
  }
}

// train.activation_checkpointing recomputes in backward what it did not keep: with full, each block from
// its input; with selective, every RMSNorm from its input and SwiGLU's silu(gate) * up from gate and up.
// The same ops run on the same values, so on the CPU in fp32 the loss and the router statistics are bit
// for bit those of the run that kept its activations, with a capacity that drops copies too, and so is
// every gradient with full. With selective, the gradient reaching a norm's input is summed in another
// order: autograd adds the norm's two inner paths (through the square and through the scaling) to the
// residual path one at a time, the recomputed norm hands over their sum; so gradients agree to fp32
// rounding, 1e-5 of each tensor's largest element (measured below 1e-6), not bit for bit.
CATCH_TEST_CASE("Full and selective activation checkpointing give bit-identical losses and gradients", "[model]") {
  for (const std::optional<double> capacity : {std::optional<double>{}, std::optional<double>{0.75}}) {
    for (const std::string mode : {"full", "selective"}) {
      CATCH_INFO(mode << ", capacity factor " << (capacity ? std::to_string(*capacity) : "none"));
      auto cfg = testing::tiny_model_config();
      cfg.n_layers = 3;
      cfg.moe.capacity_factor = capacity;
      cfg.moe.aux_loss_coef = 0.01;
      cfg.moe.z_loss_coef = 0.001;
      cfg.qk_norm = "head";  // more norms to recompute
      torch::manual_seed(12);
      const auto tokens = torch::randint(0, cfg.vocab_size, {4, 16}, torch::kLong);
      const auto targets = torch::randint(0, cfg.vocab_size, {4, 16}, torch::kLong);
      auto run = [&](const std::string& checkpointing) {
        model::Transformer m(cfg);
        m->init_weights(3);
        m->set_activation_checkpointing(checkpointing);
        auto out = m->forward_loss(tokens, targets, -100);
        (out.loss + out.balance_loss).backward();
        std::vector<torch::Tensor> got = {out.loss.detach(), out.balance_loss.detach()};
        for (const auto& st : out.moe_stats) got.insert(got.end(), {st.tokens_per_expert_E, st.dropped, st.aux_loss.detach()});
        for (const auto& p : m->parameters()) got.push_back(p.grad().defined() ? p.grad() : torch::zeros_like(p));
        return got;
      };
      const auto want = run("none"), got = run(mode);
      CATCH_REQUIRE(got.size() == want.size());
      if (capacity) CATCH_CHECK(want[3].item<int64_t>() > 0);  // the first MoE layer dropped copies
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        CATCH_INFO("tensor " << i);
        const bool gradient = i >= 2 + 3 * size_t(cfg.n_layers - cfg.dense_layers);
        if (mode == "full" || !gradient) {
          CATCH_CHECK(torch::equal(got[i], want[i]));
        } else {
          const double scale = std::max(want[i].abs().max().item<double>(), 1e-30);
          const double d = (got[i] - want[i]).abs().max().item<double>() / scale;
          worst = std::max(worst, d);
          CATCH_CHECK(d <= 1e-5);
        }
      }
      if (mode == "selective") std::printf("selective checkpointing: worst gradient difference %.3g of its tensor's largest\n", worst);
    }
  }
}
