// gpt-oss's MoE biases: model.moe.expert_bias (gate, up and down biases on every routed expert) and
// model.moe.router.logit_bias (a learned bias on the router logits), against a naive per-token loop
// written the way gpt-oss computes its layer (top-k of the biased logits, softmax over the k), values
// and gradients, in both expert paths, under recompute, in bf16, with LoRA, and in the parameter counts.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "cost/flops.h"
#include "model/transformer.h"
#include "moe/moe.h"

using namespace moetrain;

namespace {

config::MoEConfig biased_config(const std::string& impl, const std::string& activation) {
  config::MoEConfig cfg;
  cfg.n_experts = 6;
  cfg.top_k = 3;
  cfg.expert_hidden = 8;  // 8 * 4 bytes: _grouped_mm's 16-byte strides hold in fp32 and bf16
  cfg.n_shared_experts = 0;
  cfg.activation = activation;
  cfg.experts_impl = impl;
  cfg.expert_bias = true;
  cfg.router.logit_bias = true;
  return cfg;
}

moe::MoE make_layer(const config::MoEConfig& cfg, int d_model, uint64_t seed) {
  torch::manual_seed(seed);
  moe::MoE layer(cfg, d_model);
  torch::NoGradGuard g;
  for (auto& p : layer->parameters()) p.normal_(0, 0.4);
  return layer;
}

// The layer's parameters as fresh fp64 leaves, so the reference's gradients are its own.
struct RefParams {
  torch::Tensor router_w, router_b, w1, w3, w2, b1, b3, b2;
};
RefParams ref_params(const moe::MoEImpl& layer) {
  auto leaf = [](const torch::Tensor& t) { return t.detach().to(torch::kDouble).clone().requires_grad_(true); };
  const auto& ex = *layer.experts;
  return {leaf(layer.router->weight), leaf(layer.router->bias), leaf(ex.w1), leaf(ex.w3), leaf(ex.w2),
          leaf(ex.b1),               leaf(ex.b3),               leaf(ex.b2)};
}

// gpt-oss, token by token: logits = W x + b; the k largest; softmax over those k; each chosen expert's
// (clamped) SwiGLU with its gate/up biases and its down bias, times the weight.
torch::Tensor naive_gpt_oss(const RefParams& p, const torch::Tensor& x_TD, int top_k, bool clamped) {
  std::vector<torch::Tensor> rows;
  for (int64_t t = 0; t < x_TD.size(0); ++t) {
    auto x = x_TD[t];
    auto logits = torch::mv(p.router_w, x) + p.router_b;
    auto [top, ids] = logits.topk(top_k);
    auto weights = torch::softmax(top, 0);
    auto out = torch::zeros({x_TD.size(1)}, x.options());
    for (int k = 0; k < top_k; ++k) {
      const int64_t e = ids[k].item<int64_t>();
      auto gate = torch::mv(p.w1[e].t(), x) + p.b1[e], up = torch::mv(p.w3[e].t(), x) + p.b3[e];
      torch::Tensor h;
      if (clamped) {
        gate = gate.clamp_max(7.0);
        h = gate * torch::sigmoid(1.702 * gate) * (up.clamp(-7.0, 7.0) + 1);
      } else {
        h = gate * torch::sigmoid(gate) * up;
      }
      out = out + weights[k] * (torch::mv(p.w2[e].t(), h) + p.b2[e]);
    }
    rows.push_back(out);
  }
  return torch::stack(rows);
}

double rel_diff(const torch::Tensor& got, const torch::Tensor& want) {
  return (got.to(torch::kDouble) - want).abs().max().item<double>() / std::max(1.0, want.abs().max().item<double>());
}

}  // namespace

CATCH_TEST_CASE("expert and router-logit biases equal gpt-oss's per-token loop, values and gradients, both expert paths",
                "[moe][expert_bias]") {
  for (const std::string activation : {"swiglu", "swiglu_clamped"})
    for (const std::string impl : {"sliced", "grouped_mm"})
      for (bool recompute : {false, true}) {
        CATCH_INFO(activation << " " << impl << (recompute ? " recompute" : ""));
        const auto cfg = biased_config(impl, activation);
        auto layer = make_layer(cfg, 16, 11);
        layer->experts->recompute_elementwise = recompute;
        CATCH_REQUIRE(layer->experts->b1.sizes() == torch::IntArrayRef({6, 8}));
        CATCH_REQUIRE(layer->experts->b2.sizes() == torch::IntArrayRef({6, 16}));
        CATCH_REQUIRE(layer->router->bias.sizes() == torch::IntArrayRef({6}));
        torch::manual_seed(3);
        const auto x0 = 2 * torch::randn({21, 16});
        auto x = x0.clone().requires_grad_(true);
        auto out = layer->forward(x, x.size(0), std::nullopt).out_TD;
        const auto grad_out = torch::randn_like(out);
        (out * grad_out).sum().backward();

        const auto ref = ref_params(*layer);
        auto xr = x0.to(torch::kDouble).requires_grad_(true);
        auto want = naive_gpt_oss(ref, xr, cfg.top_k, activation == "swiglu_clamped");
        (want * grad_out.to(torch::kDouble)).sum().backward();
        // fp32 against fp64: 1e-5 of the largest value.
        CATCH_CHECK(rel_diff(out, want) <= 1e-5);
        CATCH_CHECK(rel_diff(x.grad(), xr.grad()) <= 1e-5);
        const auto& ex = *layer->experts;
        CATCH_CHECK(rel_diff(layer->router->weight.grad(), ref.router_w.grad()) <= 1e-5);
        CATCH_CHECK(rel_diff(layer->router->bias.grad(), ref.router_b.grad()) <= 1e-5);
        CATCH_CHECK(rel_diff(ex.w1.grad(), ref.w1.grad()) <= 1e-5);
        CATCH_CHECK(rel_diff(ex.w3.grad(), ref.w3.grad()) <= 1e-5);
        CATCH_CHECK(rel_diff(ex.w2.grad(), ref.w2.grad()) <= 1e-5);
        CATCH_CHECK(rel_diff(ex.b1.grad(), ref.b1.grad()) <= 1e-5);
        CATCH_CHECK(rel_diff(ex.b3.grad(), ref.b3.grad()) <= 1e-5);
        CATCH_CHECK(rel_diff(ex.b2.grad(), ref.b2.grad()) <= 1e-5);
        // The biases matter: the down bias alone moves the output by its weighted sum.
        CATCH_CHECK(ex.b2.grad().abs().max().item<double>() > 0);
      }
}

CATCH_TEST_CASE("router logit bias: top-k of the biased logits then a softmax over k is the renormalized softmax",
                "[moe][expert_bias]") {
  auto cfg = biased_config("sliced", "swiglu");
  cfg.router.normalize_topk = true;
  auto layer = make_layer(cfg, 16, 4);
  torch::manual_seed(9);
  const auto x = torch::randn({40, 16});
  const auto plan = layer->router->route(x, x.size(0));
  auto logits = torch::mm(x, layer->router->weight.t()) + layer->router->bias;
  auto [top, ids] = logits.detach().topk(cfg.top_k, 1);
  CATCH_CHECK(torch::equal(plan.topk_ids_TK, ids));
  CATCH_CHECK(torch::allclose(plan.topk_weights_TK.detach(), torch::softmax(top, 1), 1e-6, 1e-7));
  // A large bias on one expert puts it in every token's top-k: the bias selects, unlike a weight scale.
  {
    torch::NoGradGuard g;
    layer->router->bias[4] = 100.0;
  }
  const auto biased = layer->router->route(x, x.size(0));
  CATCH_CHECK((biased.topk_ids_TK.select(1, 0) == 4).all().item<bool>());
  // It trains: a loss on the weights reaches the bias.
  biased.topk_weights_TK.select(1, 1).sum().backward();
  CATCH_CHECK(layer->router->bias.grad().abs().sum().item<double>() > 0);
}

CATCH_TEST_CASE("expert biases: grouped_mm in bf16 matches the fp32 sliced path, and empty experts get zero gradient",
                "[moe][expert_bias]") {
  const int64_t E = 4, D = 16, F = 8;
  const std::vector<int64_t> counts{3, 0, 5, 2};
  torch::manual_seed(21);
  moe::Experts sliced(E, D, F, "sliced", "swiglu_clamped", /*bias=*/true);
  moe::Experts grouped(E, D, F, "grouped_mm", "swiglu_clamped", /*bias=*/true);
  {
    torch::NoGradGuard g;
    for (auto& p : sliced->named_parameters()) {
      p.value().normal_(0, 0.4);
      grouped->named_parameters()[p.key()].copy_(p.value());
    }
  }
  const auto rows = torch::randn({10, D});
  const auto counts_E = torch::tensor(counts, torch::kLong);
  auto want = sliced->forward(rows, counts_E, std::nullopt);
  want.sum().backward();
  auto got = grouped->forward(rows, counts_E, torch::kBFloat16);
  CATCH_CHECK(got.scalar_type() == torch::kBFloat16);
  got.to(torch::kFloat).sum().backward();
  // bf16 rounds the inputs, weights and products to 8 bits of mantissa: 3e-2 of the largest.
  CATCH_CHECK(rel_diff(got, want.to(torch::kDouble)) <= 3e-2);
  CATCH_CHECK(rel_diff(grouped->b2.grad(), sliced->b2.grad().to(torch::kDouble)) <= 3e-2);
  CATCH_CHECK(rel_diff(grouped->b1.grad(), sliced->b1.grad().to(torch::kDouble)) <= 3e-2);
  for (const auto* ex : {&sliced, &grouped}) {
    CATCH_CHECK((*ex)->b1.grad()[1].abs().max().item<double>() == 0.0);
    CATCH_CHECK((*ex)->b2.grad()[1].abs().max().item<double>() == 0.0);
    // The down bias's gradient is each expert's row count (the upstream gradient is all ones).
    CATCH_CHECK(std::abs((*ex)->b2.grad()[2][0].item<double>() - 5.0) < 1e-6);
  }
  // Zero rows in total: a (0, D) output, and the biases still reached by backward (with zeros).
  moe::Experts empty(E, D, F, "sliced", "swiglu", true);
  auto none = empty->forward(torch::zeros({0, D}), torch::zeros({E}, torch::kLong), std::nullopt);
  CATCH_CHECK(none.sizes() == torch::IntArrayRef({0, D}));
  none.sum().backward();
  CATCH_CHECK(empty->b2.grad().defined());
}

CATCH_TEST_CASE("expert and logit biases in a model: zero at init, no weight decay, frozen under LoRA, counted by cost",
                "[moe][expert_bias][lora]") {
  auto m = testing::tiny_model_config();
  m.moe.expert_bias = true;
  m.moe.router.logit_bias = true;
  model::Transformer built(m);
  built->init_weights(5);
  int found = 0;
  for (const auto& p : built->named_parameters()) {
    const auto& name = p.key();
    const bool bias = name.ends_with("experts.b1") || name.ends_with("experts.b3") || name.ends_with("experts.b2") ||
                      name.ends_with("router.bias");
    if (!bias) continue;
    ++found;
    CATCH_INFO(name);
    CATCH_CHECK(p.value().abs().max().item<double>() == 0.0);
    CATCH_CHECK(model::is_no_decay(name));
  }
  CATCH_CHECK(found == 4);  // one MoE layer: b1, b3, b2 and the router's bias
  // Parameter counts from the config equal the built model's, biases included.
  CATCH_CHECK(cost::param_counts(m).total == built->param_counts().total);
  CATCH_CHECK(cost::param_counts(m).active == built->param_counts().active);
  const auto plain = cost::param_counts(testing::tiny_model_config());
  // 4 experts of (8 + 8 + 16) biases, 2 of them active; 4 router biases.
  CATCH_CHECK(cost::param_counts(m).routed_experts == plain.routed_experts + 4 * 32);
  CATCH_CHECK(cost::param_counts(m).routed_experts_active == plain.routed_experts_active + 2 * 32);
  CATCH_CHECK(cost::param_counts(m).router == plain.router + 4);
  {  // gpt-oss's attention sinks: one logit per query head and layer
    auto sinks = m;
    sinks.attention_sinks = true;
    model::Transformer with_sinks(sinks);
    CATCH_CHECK(cost::param_counts(sinks).total == with_sinks->param_counts().total);
    CATCH_CHECK(cost::param_counts(sinks).attention == cost::param_counts(m).attention + 2 * 4);
  }
  m.mtp_depth = 1;
  model::Transformer with_mtp(m);
  int64_t mtp = 0;
  for (const auto& p : with_mtp->named_parameters())
    if (p.key().rfind("mtp.", 0) == 0) mtp += p.value().numel();
  CATCH_CHECK(cost::param_counts(m).mtp == mtp);

  // LoRA: the biases are base weights, frozen like w1/w2/w3; the adapters train.
  config::LoraConfig lora;
  lora.rank = 2;
  built->add_lora(lora, 5);
  for (const auto& p : built->named_parameters()) {
    if (!(p.key().ends_with("experts.b1") || p.key().ends_with("experts.b2") || p.key().ends_with("router.bias")))
      continue;
    CATCH_INFO(p.key());
    CATCH_CHECK(!p.value().requires_grad());
  }
  CATCH_CHECK(built->named_parameters()["layers.1.moe.experts.w1_lora_a"].requires_grad());
}
