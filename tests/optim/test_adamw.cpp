// AdamW against its textbook update written out per element; the schedule; gradient clipping.
#include <catch2/catch.hpp>

#include "optim/adamw.h"

using namespace moetrain;

CATCH_TEST_CASE("AdamW matches the decoupled-weight-decay update element by element", "[optim]") {
  config::OptimConfig cfg;
  cfg.beta1 = 0.8;
  cfg.beta2 = 0.9;
  cfg.eps = 1e-6;
  cfg.weight_decay = 0.1;
  auto w = torch::randn({5}, torch::kDouble).to(torch::kFloat).requires_grad_();
  auto b = torch::randn({3}).requires_grad_();
  optim::AdamW opt({{"w", w}, {"b_bias", b}}, cfg, [](const std::string& n) { return n == "b_bias"; });
  std::vector<double> wr(5), m(5, 0), v(5, 0);
  for (int i = 0; i < 5; ++i) wr[i] = w[i].item<double>();
  const double lr = 0.01;
  for (int step = 1; step <= 3; ++step) {
    auto g = torch::randn({5});
    w.mutable_grad() = g.clone();
    b.mutable_grad() = torch::randn({3});
    opt.step(lr);
    for (int i = 0; i < 5; ++i) {
      const double gi = g[i].item<double>();
      m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * gi;
      v[i] = cfg.beta2 * v[i] + (1 - cfg.beta2) * gi * gi;
      const double mhat = m[i] / (1 - std::pow(cfg.beta1, step)), vhat = v[i] / (1 - std::pow(cfg.beta2, step));
      wr[i] = wr[i] * (1 - lr * cfg.weight_decay) - lr * mhat / (std::sqrt(vhat) + cfg.eps);
    }
  }
  // fp32 parameters against an fp64 reference over three steps: 1e-6 relative.
  for (int i = 0; i < 5; ++i) CATCH_CHECK(w[i].item<double>() == Approx(wr[i]).epsilon(1e-6).margin(1e-7));
  CATCH_CHECK(opt.step_count() == 3);
  CATCH_CHECK_FALSE(opt.states()[1].decay);
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
