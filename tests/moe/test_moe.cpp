// The MoE layer against an independent naive reference: a loop over tokens and their top-k experts.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "moe/moe.h"

using namespace moetrain;

namespace {

// clamped: gpt-oss's experts (its torch/model.py swiglu): a clamped to <= 7, b to [-7, 7], then
// a * sigmoid(1.702 a) * (b + 1).
torch::Tensor swiglu_ref(const torch::Tensor& x_D, const torch::Tensor& w1, const torch::Tensor& w3,
                         const torch::Tensor& w2, bool clamped = false) {
  auto a = torch::matmul(x_D, w1), b = torch::matmul(x_D, w3);
  if (!clamped) return torch::matmul(a * torch::sigmoid(a) * b, w2);
  a = torch::minimum(a, torch::full_like(a, 7.0));
  b = torch::maximum(torch::minimum(b, torch::full_like(b, 7.0)), torch::full_like(b, -7.0));
  return torch::matmul(a * torch::sigmoid(1.702 * a) * (b + 1), w2);
}

// Token by token: softmax over experts, the k largest, renormalized, weighted sum of expert outputs.
torch::Tensor naive_moe(const moe::MoEImpl& layer, const config::MoEConfig& cfg, const torch::Tensor& x_TD) {
  auto out = torch::zeros_like(x_TD);
  for (int64_t t = 0; t < x_TD.size(0); ++t) {
    auto x = x_TD[t];
    auto probs = torch::softmax(torch::matmul(layer.router->weight, x), 0);
    std::vector<std::pair<double, int64_t>> ranked;
    for (int64_t e = 0; e < cfg.n_experts; ++e) ranked.push_back({probs[e].item<double>(), e});
    std::sort(ranked.begin(), ranked.end(), [](auto a, auto b) { return a.first > b.first; });
    double norm = 0;
    for (int k = 0; k < cfg.top_k; ++k) norm += ranked[k].first;
    for (int k = 0; k < cfg.top_k; ++k) {
      const int64_t e = ranked[k].second;
      const double w = cfg.router.normalize_topk ? ranked[k].first / norm : ranked[k].first;
      out[t] += w * swiglu_ref(x, layer.experts->w1[e], layer.experts->w3[e], layer.experts->w2[e],
                               cfg.activation == "swiglu_clamped");
    }
    if (layer.shared) out[t] += swiglu_ref(x, layer.shared->w1, layer.shared->w3, layer.shared->w2);
  }
  return out;
}

moe::MoE make_layer(const config::MoEConfig& cfg, int d_model, uint64_t seed) {
  torch::manual_seed(seed);
  moe::MoE layer(cfg, d_model);
  torch::NoGradGuard g;
  for (auto& p : layer->parameters()) p.normal_(0, 0.3);
  return layer;
}

}  // namespace

CATCH_TEST_CASE("MoE layer equals a naive per-token reference", "[moe]") {
  for (int normalize = 0; normalize < 2; ++normalize) {
    for (int shared = 0; shared < 2; ++shared) {
      config::MoEConfig cfg;
      cfg.n_experts = 6;
      cfg.top_k = 2;
      cfg.expert_hidden = 12;
      cfg.n_shared_experts = shared;
      cfg.shared_hidden = 10;
      cfg.router.normalize_topk = normalize;
      auto layer = make_layer(cfg, 16, 7 + normalize * 2 + shared);
      auto x = torch::randn({37, 16});
      auto got = layer->forward(x, x.size(0), std::nullopt);
      auto want = naive_moe(*layer, cfg, x);
      // fp32 sums in a different order: agreement to 1e-5 absolute at outputs of order 1.
      CATCH_CHECK(torch::allclose(got.out_TD, want, 1e-5, 1e-5));
      CATCH_CHECK(got.stats.tokens_per_expert_E.sum().item<int64_t>() == 37 * 2);
    }
  }
}

CATCH_TEST_CASE("model.moe.activation swiglu_clamped is gpt-oss's clamped form in both expert paths and under recompute",
                "[moe]") {
  config::MoEConfig cfg;
  cfg.n_experts = 6;
  cfg.top_k = 2;
  cfg.expert_hidden = 12;
  cfg.n_shared_experts = 1;  // the shared expert stays plain SwiGLU
  cfg.shared_hidden = 8;
  cfg.activation = "swiglu_clamped";
  for (const std::string impl : {"sliced", "grouped_mm"}) {
    CATCH_INFO(impl);
    cfg.experts_impl = impl;
    auto layer = make_layer(cfg, 16, 5);
    CATCH_CHECK(layer->experts->clamped_activation);
    auto x = 5 * torch::randn({29, 16});  // large enough that both clamps bite
    CATCH_REQUIRE(torch::matmul(x, layer->experts->w1).max().item<double>() > 7);
    CATCH_REQUIRE(torch::matmul(x, layer->experts->w3).min().item<double>() < -7);
    auto got = layer->forward(x, x.size(0), std::nullopt);
    const auto want = naive_moe(*layer, cfg, x);
    CATCH_CHECK(torch::allclose(got.out_TD, want, 1e-4, 1e-4));
    auto plain = cfg;
    plain.activation = "swiglu";
    CATCH_CHECK(!torch::allclose(got.out_TD, naive_moe(*layer, plain, x), 1e-2, 1e-2));
  }
  // Selective recompute gives the same values and gradients, bit for bit.
  torch::manual_seed(2);
  const auto gate0 = 6 * torch::randn({9, 12}), up0 = 6 * torch::randn({9, 12}), grad = torch::randn({9, 12});
  std::vector<torch::Tensor> results;
  for (bool recompute : {false, true}) {
    auto gate = gate0.clone().requires_grad_(true), up = up0.clone().requires_grad_(true);
    auto out = moe::gated_product(gate, up, recompute, /*clamped=*/true);
    out.backward(grad);
    results.insert(results.end(), {out.detach(), gate.grad(), up.grad()});
  }
  for (int i = 0; i < 3; ++i) CATCH_CHECK(torch::equal(results[size_t(i)], results[size_t(i + 3)]));
  CATCH_CHECK((results[2] == 0).any().item<bool>());  // the clamp passes no gradient beyond 7
}

CATCH_TEST_CASE("MoE layer handles experts that receive no tokens, and zero tokens", "[moe]") {
  config::MoEConfig cfg;
  cfg.n_experts = 8;
  cfg.top_k = 1;
  cfg.expert_hidden = 8;
  auto layer = make_layer(cfg, 8, 3);
  auto x = torch::randn({3, 8});  // 3 tokens, 8 experts: at least 5 experts are empty
  auto got = layer->forward(x, x.size(0), std::nullopt);
  CATCH_CHECK(torch::allclose(got.out_TD, naive_moe(*layer, cfg, x), 1e-5, 1e-5));
  CATCH_CHECK((got.stats.tokens_per_expert_E == 0).sum().item<int64_t>() >= 5);

  auto empty = layer->forward(torch::zeros({0, 8}), 1, std::nullopt);
  CATCH_CHECK(empty.out_TD.sizes() == torch::IntArrayRef({0, 8}));
  CATCH_CHECK(empty.stats.aux_loss.item<double>() == 0.0);
}

CATCH_TEST_CASE("Dispatch then combine with unit weights and identity experts restores each token K times", "[moe]") {
  auto x = torch::randn({10, 4});
  moe::RoutingPlan plan;
  plan.topk_ids_TK = torch::randint(0, 5, {10, 3}, torch::kLong);
  plan.topk_weights_TK = torch::ones({10, 3});
  plan.stats.tokens_per_expert_E = torch::bincount(plan.topk_ids_TK.reshape(-1), {}, 5);
  auto d = moe::dispatch(x, plan);
  // Rows are grouped by expert in ascending order.
  auto sorted_ids = plan.topk_ids_TK.reshape(-1).index_select(0, d.handle.order_R);
  CATCH_CHECK(torch::equal(sorted_ids, std::get<0>(torch::sort(sorted_ids))));
  CATCH_CHECK(torch::allclose(moe::combine(d.rows_RD, d.handle, plan), 3 * x));
}

CATCH_TEST_CASE("Switch aux loss is 1 under perfectly uniform routing and larger when skewed", "[moe]") {
  config::MoEConfig cfg;
  cfg.n_experts = 4;
  cfg.top_k = 1;
  moe::Router router(cfg, 4);
  {
    torch::NoGradGuard g;
    router->weight.copy_(torch::eye(4) * 10);
  }
  auto uniform = router->route(torch::eye(4), 4);  // each token to a different expert
  // f_e = 1/4 and P_e equal across experts => E * sum f_e P_e = sum_e P_e = 1.
  CATCH_CHECK(uniform.stats.aux_loss.item<double>() == Approx(1.0).epsilon(1e-6));
  auto skewed = router->route(torch::eye(4).index_select(0, torch::tensor({0, 0, 0, 1})), 4);
  CATCH_CHECK(skewed.stats.aux_loss.item<double>() > 1.5);
}

// run.deterministic replaces dispatch's index_select backward and combine's index_add (atomic adds on
// CUDA) with per-copy slots summed in k order. On the CPU both are deterministic, so here the two are
// held to the same values: the new path must be the same function, to fp32 rounding (only the order
// of a token's K additions differs). Its bit-for-bit repeatability on CUDA is a [.gpu] test.
CATCH_TEST_CASE("Deterministic dispatch and combine give the default path's outputs and gradients", "[moe]") {
  for (const std::optional<double> capacity_factor : {std::optional<double>{}, std::optional<double>{0.75}}) {
    CATCH_INFO("capacity factor " << (capacity_factor ? std::to_string(*capacity_factor) : "none"));
    config::MoEConfig cfg;
    cfg.n_experts = 6;
    cfg.top_k = 3;
    cfg.expert_hidden = 12;
    cfg.n_shared_experts = 1;
    cfg.shared_hidden = 10;
    cfg.capacity_factor = capacity_factor;
    torch::manual_seed(11);
    const auto x = torch::randn({41, 16});
    const auto upstream = torch::randn({41, 16});
    auto run = [&](bool deterministic) {
      const testing::DeterministicMode mode(deterministic);
      auto layer = make_layer(cfg, 16, 5);
      auto input = x.clone().requires_grad_(true);
      auto out = layer->forward(input, input.size(0), std::nullopt);
      (out.out_TD * upstream).sum().backward();
      std::vector<torch::Tensor> got{out.out_TD.detach(), input.grad()};
      for (const auto& p : layer->parameters()) got.push_back(p.grad());
      return std::make_pair(got, out.stats.dropped.item<int64_t>());
    };
    const auto [want, want_dropped] = run(false);
    const auto [got, got_dropped] = run(true);
    CATCH_CHECK(got_dropped == want_dropped);
    if (capacity_factor) CATCH_CHECK(got_dropped > 0);  // the capacity path is exercised
    CATCH_REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      CATCH_INFO("tensor " << i << " (0 = output, 1 = input gradient, then parameter gradients)");
      CATCH_CHECK(torch::allclose(got[i], want[i], 1e-5, 1e-6));
    }
  }
}

// A layer built for a shard of the experts is single-device math with a seam: it cannot run until a
// parallel layout installs its dispatcher, and says so rather than computing with missing experts.
CATCH_TEST_CASE("A sharded MoE layer without a dispatcher is a clear error", "[moe]") {
  config::MoEConfig cfg;
  cfg.n_experts = 4;
  cfg.top_k = 2;
  cfg.expert_hidden = 8;
  moe::MoE half(cfg, 8, moe::ExpertShard{2, 1});
  CATCH_CHECK(half->experts->w1.size(0) == 2);
  CATCH_CHECK(half->expert_offset() == 2);
  CATCH_CHECK_THROWS_WITH(half->forward(torch::randn({4, 8}), 4, std::nullopt),
                          Catch::Matchers::Contains("shard 1 of 2") && Catch::Matchers::Contains("dist::parallelize"));
  CATCH_CHECK_THROWS(moe::MoE(cfg, 8, moe::ExpertShard{3, 0}));  // 4 experts do not split 3 ways
}
