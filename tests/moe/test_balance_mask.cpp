// RouterImpl::set_balance_mask (rl's right-padded update batches): the balancing losses of a masked call
// equal those of the counted tokens routed alone, in value and in gradient; padding gets no gradient from
// them; an all-true mask is the unmasked call.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "config/config.h"
#include "moe/router.h"

using namespace moetrain;

namespace {

moe::Router make_router(const std::string& score_func, int64_t E, int64_t K, int64_t D) {
  config::MoEConfig cfg;
  cfg.n_experts = int(E);
  cfg.top_k = int(K);
  cfg.router.score_func = score_func;
  moe::Router router(cfg, int(D));
  torch::NoGradGuard no_grad;
  router->weight.normal_(0, 1);
  return router;
}

}  // namespace

CATCH_TEST_CASE("router: a balance mask leaves out padding, as routing the counted tokens alone", "[moe]") {
  const int64_t S = 8, E = 6, K = 2, D = 8;
  const std::vector<int64_t> counted = {5, 8};  // the first sequence ends in 3 padding tokens
  for (const std::string func : {"softmax", "sigmoid"}) {
    CATCH_INFO(func);
    torch::manual_seed(7);
    auto router = make_router(func, E, K, D);
    const auto x = torch::randn({2 * S, D}, torch::kDouble).to(torch::kFloat);
    auto mask = torch::zeros({2 * S}, torch::kBool);
    mask.narrow(0, 0, counted[0]).fill_(true);
    mask.narrow(0, S, counted[1]).fill_(true);
    const auto alone_x = torch::cat({x.narrow(0, 0, counted[0]), x.narrow(0, S, counted[1])});

    // Values: aux, z-loss and entropy over the counted tokens; the sequence-wise loss per counted sequence.
    const auto alone = router->route(alone_x, alone_x.size(0)).stats;
    const auto first = router->route(x.narrow(0, 0, counted[0]), counted[0]).stats;
    const auto second = router->route(x.narrow(0, S, counted[1]), counted[1]).stats;
    router->set_balance_mask(mask);
    const auto x_grad = x.clone().requires_grad_(true);
    const auto masked = router->route(x_grad, S).stats;
    CATCH_CHECK(masked.aux_loss.item<double>() == Approx(alone.aux_loss.item<double>()).epsilon(1e-5));
    CATCH_CHECK(masked.seq_aux_loss.item<double>() ==
                Approx((first.seq_aux_loss.item<double>() + second.seq_aux_loss.item<double>()) / 2).epsilon(1e-5));
    CATCH_CHECK(masked.z_loss.item<double>() == Approx(alone.z_loss.item<double>()).epsilon(1e-5));
    CATCH_CHECK(masked.entropy.item<double>() == Approx(alone.entropy.item<double>()).epsilon(1e-5));
    // The unmasked call differs (else the mask would be ignored unnoticed).
    router->set_balance_mask({});
    const auto padded = router->route(x, S).stats;
    CATCH_CHECK(std::abs(padded.aux_loss.item<double>() - alone.aux_loss.item<double>()) > 1e-4);

    // Gradients: the router weight's as the counted tokens' alone; none reaches the padding.
    router->set_balance_mask(mask);
    router->zero_grad();
    (masked.aux_loss + masked.seq_aux_loss + masked.z_loss).backward();
    const auto got_grad = router->weight.grad().clone();
    CATCH_CHECK(x_grad.grad().narrow(0, counted[0], S - counted[0]).abs().max().item<double>() == 0);
    CATCH_CHECK(x_grad.grad().narrow(0, 0, counted[0]).abs().max().item<double>() > 0);
    router->set_balance_mask({});
    router->zero_grad();
    const auto a = router->route(alone_x, alone_x.size(0)).stats;
    const auto s1 = router->route(x.narrow(0, 0, counted[0]), counted[0]).stats;
    const auto s2 = router->route(x.narrow(0, S, counted[1]), counted[1]).stats;
    (a.aux_loss + (s1.seq_aux_loss + s2.seq_aux_loss) / 2 + a.z_loss).backward();
    CATCH_CHECK(torch::allclose(got_grad, router->weight.grad(), 1e-4, 1e-6));

    // An all-true mask is the unmasked call; a mask of the wrong size is refused.
    router->set_balance_mask(torch::ones({2 * S}, torch::kBool));
    const auto all = router->route(x, S).stats;
    const std::vector<std::pair<torch::Tensor, torch::Tensor>> pairs = {
        {all.aux_loss, padded.aux_loss}, {all.seq_aux_loss, padded.seq_aux_loss}, {all.z_loss, padded.z_loss},
        {all.entropy, padded.entropy}};
    for (const auto& [got, want] : pairs) CATCH_CHECK(got.item<double>() == Approx(want.item<double>()).epsilon(1e-6));
    CATCH_CHECK(torch::equal(all.tokens_per_expert_E, padded.tokens_per_expert_E));  // dispatch sees every token
    router->set_balance_mask(torch::ones({S}, torch::kBool));
    CATCH_CHECK_THROWS_WITH(router->route(x, S), Catch::Matchers::Contains("balance mask"));
  }
}
