// AdamW against its textbook update written out per element; the schedule; gradient clipping.
#include <catch2/catch.hpp>

#include "optim/adamw.h"

using namespace moetrain;

// Both kernels: the per-tensor ops and LibTorch's fused multi-tensor kernel (the default on CUDA; the
// CPU has one too, so the CPU test proves the call: its arguments, the step counts it reads, decay
// only where asked).
CATCH_TEST_CASE("AdamW matches the decoupled-weight-decay update element by element", "[optim]") {
  for (const bool fused : {false, true}) {
    CATCH_INFO((fused ? "fused" : "per-tensor") << " kernel");
    config::OptimConfig cfg;
    cfg.beta1 = 0.8;
    cfg.beta2 = 0.9;
    cfg.eps = 1e-6;
    cfg.weight_decay = 0.1;
    torch::manual_seed(7);
    auto w = torch::randn({5}, torch::kDouble).to(torch::kFloat).requires_grad_();
    auto b = torch::randn({3}).requires_grad_();
    optim::AdamW opt({{"w", w}, {"b_bias", b}}, cfg, [](const std::string& n) { return n == "b_bias"; }, fused);
    CATCH_CHECK(opt.fused() == fused);
    std::vector<double> wr(5), br(3), m(8, 0), v(8, 0);
    for (int i = 0; i < 5; ++i) wr[i] = w[i].item<double>();
    for (int i = 0; i < 3; ++i) br[i] = b[i].item<double>();
    const double lr = 0.01;
    for (int step = 1; step <= 3; ++step) {
      auto g = torch::randn({5}), gb = torch::randn({3});
      w.mutable_grad() = g.clone();
      b.mutable_grad() = gb.clone();
      opt.step(lr);
      for (int i = 0; i < 8; ++i) {
        const double gi = i < 5 ? g[i].item<double>() : gb[i - 5].item<double>();
        m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * gi;
        v[i] = cfg.beta2 * v[i] + (1 - cfg.beta2) * gi * gi;
        const double mhat = m[i] / (1 - std::pow(cfg.beta1, step)), vhat = v[i] / (1 - std::pow(cfg.beta2, step));
        double& x = i < 5 ? wr[i] : br[i - 5];
        x = x * (i < 5 ? 1 - lr * cfg.weight_decay : 1.0) - lr * mhat / (std::sqrt(vhat) + cfg.eps);  // b: no decay
      }
    }
    // fp32 parameters against an fp64 reference over three steps: 1e-6 relative.
    for (int i = 0; i < 5; ++i) CATCH_CHECK(w[i].item<double>() == Approx(wr[i]).epsilon(1e-6).margin(1e-7));
    for (int i = 0; i < 3; ++i) CATCH_CHECK(b[i].item<double>() == Approx(br[i]).epsilon(1e-6).margin(1e-7));
    CATCH_CHECK(opt.step_count() == 3);
    CATCH_CHECK_FALSE(opt.states()[1].decay);
  }
}

CATCH_TEST_CASE("Learning rate: linear warmup, cosine to min_lr, constant", "[optim]") {
  config::OptimConfig cfg;
  cfg.lr = 1.0;
  cfg.min_lr = 0.1;
  cfg.warmup_steps = 10;
  CATCH_CHECK(optim::learning_rate(cfg, 0, 110) == Approx(0.1));
  CATCH_CHECK(optim::learning_rate(cfg, 9, 110) == Approx(1.0));
  CATCH_CHECK(optim::learning_rate(cfg, 10, 110) == Approx(1.0));
  CATCH_CHECK(optim::learning_rate(cfg, 60, 110) == Approx(0.55));
  CATCH_CHECK(optim::learning_rate(cfg, 110, 110) == Approx(0.1));
  cfg.schedule = "constant";
  CATCH_CHECK(optim::learning_rate(cfg, 60, 110) == Approx(1.0));
}

CATCH_TEST_CASE("Gradient clipping scales the global norm down to the limit", "[optim]") {
  auto a = torch::zeros({2}).requires_grad_(), b = torch::zeros({1}).requires_grad_();
  a.mutable_grad() = torch::tensor({3.0f, 0.0f});
  b.mutable_grad() = torch::tensor({4.0f});
  CATCH_CHECK(optim::clip_grad_norm({a, b}, 10.0) == Approx(5.0));
  CATCH_CHECK(a.grad()[0].item<double>() == Approx(3.0));  // under the limit: untouched
  CATCH_CHECK(optim::clip_grad_norm({a, b}, 1.0) == Approx(5.0));
  const double after = std::sqrt(a.grad().pow(2).sum().item<double>() + b.grad().pow(2).sum().item<double>());
  CATCH_CHECK(after == Approx(1.0).epsilon(1e-5));
}

// ZeRO-1 updates a bucket's share as views of one flat tensor, each segment with its own decay, through
// adamw_step (fused on CUDA): the same as AdamW over the whole tensors, element for element.
CATCH_TEST_CASE("AdamW over slices of one flat tensor (ZeRO-1's shares) updates as over the whole tensors",
                "[optim]") {
  for (const bool fused : {false, true}) {
    CATCH_INFO((fused ? "fused" : "per-tensor") << " kernel");
    config::OptimConfig cfg;
    cfg.weight_decay = 0.1;
    torch::manual_seed(3);
    auto a = torch::randn({4, 3}), c = torch::randn({5});
    auto whole_a = a.clone().requires_grad_(), whole_c = c.clone().requires_grad_();
    optim::AdamW reference({{"a", whole_a}, {"c_bias", whole_c}}, cfg,
                           [](const std::string& n) { return n == "c_bias"; }, fused);
    auto flat = torch::cat({a.reshape(-1), c});  // the share: a then c, end to end
    auto grads = torch::zeros({17}), m = torch::zeros({17}), v = torch::zeros({17});
    auto slices = [](const torch::Tensor& t) { return std::vector<torch::Tensor>{t.narrow(0, 0, 12), t.narrow(0, 12, 5)}; };
    for (int step = 1; step <= 3; ++step) {
      auto ga = torch::randn({4, 3}), gc = torch::randn({5});
      whole_a.mutable_grad() = ga.clone();
      whole_c.mutable_grad() = gc.clone();
      reference.step(0.01);
      grads.copy_(torch::cat({ga.reshape(-1), gc}));
      optim::adamw_step(slices(flat), slices(grads), slices(m), slices(v), {true, false}, cfg, 0.01, step, fused);
    }
    CATCH_CHECK(torch::equal(flat.narrow(0, 0, 12), whole_a.detach().reshape(-1)));
    CATCH_CHECK(torch::equal(flat.narrow(0, 12, 5), whole_c.detach()));
    CATCH_CHECK(torch::equal(m.narrow(0, 0, 12), reference.states()[0].exp_avg.reshape(-1)));
    CATCH_CHECK(torch::equal(v.narrow(0, 12, 5), reference.states()[1].exp_avg_sq));
  }
}
