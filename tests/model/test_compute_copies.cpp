// The compute-dtype copies of the parameters (common/tensor.h): one copy per parameter and version,
// with a plain cast's values and gradients, renewed when the parameter changes; and bf16 training
// with them against training that casts at every use, bit for bit.
#include <catch2/catch.hpp>

#include "common/tensor.h"
#include "train/trainer.h"
#include "../train/train_fixture.h"

using namespace moetrain;

namespace {

// Restores the default when a test ends, whatever it asserted.
struct CachedCasts {
  explicit CachedCasts(bool on) { set_cached_casts(on); }
  ~CachedCasts() { set_cached_casts(true); }
};

}  // namespace

CATCH_TEST_CASE("A parameter's bf16 copy is made once per version, with a plain cast's values and gradients",
                "[model][dtype]") {
  torch::manual_seed(5);
  auto p = torch::randn({4, 6}).requires_grad_();
  const auto x = torch::randn({3, 4}).to(torch::kBFloat16);
  auto gradient = [&](bool kept) {
    CachedCasts mode(kept);
    p.mutable_grad() = torch::Tensor();
    for (int use = 0; use < 2; ++use) x.mm(cast(p, torch::kBFloat16)).to(torch::kFloat).pow(2).sum().backward();
    return p.grad().clone();
  };
  CATCH_CHECK(torch::equal(gradient(true), gradient(false)));  // two uses, accumulated, bit for bit

  const auto first = cast(p, torch::kBFloat16), again = cast(p, torch::kBFloat16);
  CATCH_CHECK(first.data_ptr() == again.data_ptr());  // no second copy
  CATCH_CHECK(torch::equal(first, p.detach().to(torch::kBFloat16)));
  CATCH_CHECK(first.requires_grad());
  {
    torch::NoGradGuard no_grad;  // evaluation: the copy itself
    const auto eval = cast(p, torch::kBFloat16);
    CATCH_CHECK(eval.data_ptr() == first.data_ptr());
    CATCH_CHECK(!eval.requires_grad());
    p.add_(0.5);  // an optimizer step: a new version
  }
  const auto after = cast(p, torch::kBFloat16);
  CATCH_CHECK(after.data_ptr() != first.data_ptr());
  CATCH_CHECK(torch::equal(after, p.detach().to(torch::kBFloat16)));
  CATCH_CHECK(cast(p, std::nullopt).is_same(p));  // fp32 compute: the parameter itself

  // Activations (not leaves) are cast at every call; so is a tensor that does not require grad.
  const auto y = p * 2;
  CATCH_CHECK(cast(y, torch::kBFloat16).data_ptr() != cast(y, torch::kBFloat16).data_ptr());
  // A parameter freed and another made (perhaps at the same address): never the old copy.
  for (int i = 0; i < 20; ++i) {
    auto q = torch::full({4, 6}, double(i)).requires_grad_();
    CATCH_CHECK(torch::equal(cast(q, torch::kBFloat16), torch::full({4, 6}, double(i), torch::kBFloat16)));
  }
}

CATCH_TEST_CASE("bf16 training with kept compute copies equals casting at every use, bit for bit", "[train][dtype]") {
  testing::TempDir dir("compute-copies");
  const auto data_dir = testing::make_corpus(dir);
  std::vector<double> losses[2];
  for (const bool kept : {false, true}) {
    auto cfg = testing::tiny_train_config(data_dir, dir.str(kept ? "kept" : "per-use"));
    cfg.run.keep_compute_copies = kept;  // the trainer applies it (set_cached_casts)
    cfg.run.dtype = "bf16";
    cfg.train.steps = 4;
    cfg.train.grad_accum = 2;
    cfg.train.activation_checkpointing = "full";  // the recomputed blocks cast again in backward
    losses[kept] = train::train(cfg, {}).losses;
    CATCH_CHECK(cached_casts() == kept);
  }
  set_cached_casts(true);
  CATCH_REQUIRE(losses[0].size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CATCH_INFO("step " << i + 1);
    CATCH_CHECK(losses[1][i] == losses[0][i]);
  }
}
