// MuonClip's QK-clip (optim.qk_clip_tau, optim/qk_clip.h): the tracked per-head maximum logit against
// an explicit q k^T reference (GQA, MHA, MLA; causal and packed), the rescaling (clipped heads at tau,
// the others and MLA's shared rope key untouched bit for bit), training runs (clipping logged, tau 0 and
// a tau never reached the same bits, resume exact), the config checks, and 2 ranks against 1 process.
#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "../dist/dist_fixture.h"
#include "../train/train_fixture.h"
#include "common/errors.h"
#include "model/layers.h"
#include "optim/qk_clip.h"

using namespace moetrain;

namespace {

constexpr int64_t kB = 2, kS = 12;

config::ModelConfig gqa_config(int n_kv_heads) {
  auto cfg = testing::tiny_model_config();  // d_model 16, 4 heads of 4 dims
  cfg.n_kv_heads = n_kv_heads;
  return cfg;
}

config::ModelConfig mla_config(int q_lora_rank) {
  auto cfg = testing::tiny_model_config();
  cfg.attention = "mla";
  cfg.d_model = 32;
  cfg.mla.q_lora_rank = q_lora_rank;
  cfg.mla.kv_lora_rank = 12;
  cfg.mla.qk_nope_head_dim = 8;
  cfg.mla.qk_rope_head_dim = 4;
  cfg.mla.v_head_dim = 6;
  return cfg;
}

// Weights large enough that the logits spread over several units.
void randomize(torch::nn::Module& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (auto& p : m.parameters()) p.copy_(p.dim() > 1 ? 0.6 * torch::randn(p.sizes()) : 1 + 0.1 * torch::randn(p.sizes()));
}

// Two packed rows: documents of 5 and 7 tokens, then 3, 4 and 5.
model::TokenLayout packed_layout() {
  auto positions = torch::cat({torch::arange(5), torch::arange(7), torch::arange(3), torch::arange(4), torch::arange(5)})
                       .view({kB, kS});
  return model::TokenLayout::packed(positions);
}

// The reference: every logit q k^T * scale written out, the heads' key repeated, the mask applied.
torch::Tensor reference_max(const torch::Tensor& q, const torch::Tensor& k, double scale, const model::TokenLayout& layout) {
  const auto keys = k.repeat_interleave(q.size(1) / k.size(1), 1);
  auto logits = torch::matmul(q, keys.transpose(-2, -1)) * scale;  // (B, H, S, S)
  const auto mask = layout.is_packed() ? layout.mask() : torch::ones({kS, kS}, torch::kBool).tril();
  logits = logits.masked_fill(mask.logical_not(), -std::numeric_limits<float>::infinity());
  return logits.amax({0, 2, 3});
}

// GQA's q and k as forward() computes them (no bias, no norm), after RoPE.
std::pair<torch::Tensor, torch::Tensor> gqa_qk(model::AttentionImpl& a, const torch::Tensor& x, const model::Rope& rope,
                                               const model::TokenLayout& layout) {
  const int64_t H = a.n_heads(), G = a.n_kv_heads(), Hd = a.head_dim();
  auto q = torch::matmul(x, a.wq).view({kB, kS, H, Hd}).transpose(1, 2);
  auto k = torch::matmul(x, a.wk).view({kB, kS, G, Hd}).transpose(1, 2);
  return {rope.apply(q, layout), rope.apply(k, layout)};
}

// MLA's whole query and key (nope and rope parts) as forward() computes them.
std::pair<torch::Tensor, torch::Tensor> mla_qk(model::MLAttentionImpl& a, const torch::Tensor& x, const model::Rope& rope,
                                               const model::TokenLayout& layout, int64_t R) {
  const int64_t H = a.n_heads(), N = a.nope_dim(), P = a.rope_dim(), V = a.v_dim();
  auto q = a.wq.defined() ? torch::matmul(x, a.wq) : torch::matmul(a.q_a_norm->forward(torch::matmul(x, a.wq_a)), a.wq_b);
  q = q.view({kB, kS, H, N + P}).transpose(1, 2);
  auto kv_a = torch::matmul(x, a.wkv_a);
  auto k_pe = rope.apply(kv_a.narrow(2, R, P).unsqueeze(1), layout);
  auto kv = torch::matmul(a.kv_a_norm->forward(kv_a.narrow(2, 0, R)), a.wkv_b).view({kB, kS, H, N + V}).transpose(1, 2);
  auto query = torch::cat({q.narrow(3, 0, N), rope.apply(q.narrow(3, N, P), layout)}, 3);
  auto key = torch::cat({kv.narrow(3, 0, N), k_pe.expand({kB, H, kS, P})}, 3);
  return {query, key};
}

void check_close(const torch::Tensor& got, const torch::Tensor& want, double rel) {
  CATCH_REQUIRE(got.sizes() == want.sizes());
  for (int64_t h = 0; h < want.numel(); ++h) {
    const double g = got[h].item<double>(), w = want[h].item<double>();
    CATCH_INFO("head " << h << ": " << g << " vs " << w);
    CATCH_CHECK(std::abs(g - w) <= rel * std::max(1.0, std::abs(w)));
  }
}

// A tracked forward (grad mode on, as in training) of x; returns the layer's maxima, taken.
template <typename Layer>
torch::Tensor tracked(Layer& a, const torch::Tensor& x, const model::Rope& rope, const model::TokenLayout& layout) {
  a.max_logit_H = torch::Tensor();
  a.track_max_logits = true;
  a.forward(x, rope, std::nullopt, layout);
  auto m = a.max_logit_H;
  a.max_logit_H = torch::Tensor();
  return m;
}

}  // namespace

CATCH_TEST_CASE("The tracked max logit equals the explicit q k^T reference for GQA, MHA and MLA", "[qk_clip]") {
  for (const bool packed : {false, true}) {
    const auto layout = packed ? packed_layout() : model::TokenLayout{};
    for (const int kv_heads : {2, 4}) {
      CATCH_INFO("GQA, kv heads " << kv_heads << (packed ? ", packed" : ", causal"));
      const auto cfg = gqa_config(kv_heads);
      model::Attention a(cfg);
      randomize(*a, 3);
      const auto rope = model::Rope::make(cfg.max_seq_len, a->head_dim(), cfg.rope_theta, torch::kCPU);
      const auto x = torch::randn({kB, kS, cfg.d_model});
      const auto got = tracked(*a, x, rope, layout);
      torch::NoGradGuard no_grad;
      const auto [q, k] = gqa_qk(*a, x, rope, layout);
      const auto want = reference_max(q, k, 1.0 / std::sqrt(double(a->head_dim())), layout);
      CATCH_CHECK(want.max().item<double>() > 2);  // the logits are not all small
      check_close(got, want, 1e-5);
    }
    for (const int q_lora_rank : {0, 8}) {
      CATCH_INFO("MLA, q_lora_rank " << q_lora_rank << (packed ? ", packed" : ", causal"));
      const auto cfg = mla_config(q_lora_rank);
      model::MLAttention a(cfg);
      randomize(*a, 4);
      const auto rope = model::Rope::make(cfg.max_seq_len, cfg.mla.qk_rope_head_dim, cfg.rope_theta, torch::kCPU);
      const auto x = torch::randn({kB, kS, cfg.d_model});
      const auto got = tracked(*a, x, rope, layout);
      torch::NoGradGuard no_grad;
      const auto [q, k] = mla_qk(*a, x, rope, layout, cfg.mla.kv_lora_rank);
      check_close(got, reference_max(q, k, a->softmax_scale(), layout), 1e-5);
    }
  }
  // Evaluation (grad mode off) and an untracked layer record nothing.
  const auto cfg = gqa_config(2);
  model::Attention a(cfg);
  randomize(*a, 5);
  const auto rope = model::Rope::make(cfg.max_seq_len, a->head_dim(), cfg.rope_theta, torch::kCPU);
  const auto x = torch::randn({kB, kS, cfg.d_model});
  a->forward(x, rope, std::nullopt);
  CATCH_CHECK(!a->max_logit_H.defined());
  a->track_max_logits = true;
  {
    torch::NoGradGuard no_grad;
    a->forward(x, rope, std::nullopt);
  }
  CATCH_CHECK(!a->max_logit_H.defined());
  // Chunks of query rows: a long sequence over several chunks gives the reference's maxima too.
  const auto q = torch::randn({1, 4, 300, 8}), k = torch::randn({1, 2, 300, 8});
  const auto long_ref = [&] {
    auto logits = torch::matmul(q, k.repeat_interleave(2, 1).transpose(-2, -1)) * 0.3;
    return logits.masked_fill(torch::ones({300, 300}, torch::kBool).tril().logical_not(),
                              -std::numeric_limits<float>::infinity())
        .amax({0, 2, 3});
  }();
  check_close(model::max_logits(q, k, 0.3), long_ref, 1e-5);
}

namespace {

// The columns [h * width + offset, + n) of w (a head's block), for bitwise comparisons.
torch::Tensor block(const torch::Tensor& w, int64_t h, int64_t width, int64_t offset, int64_t n) {
  return w.narrow(-1, h * width + offset, n);
}

// A threshold between the heads' maxima: the two largest heads are clipped, the others are not.
double tau_between(const torch::Tensor& maxima) {
  const auto sorted = std::get<0>(maxima.sort(/*dim=*/0, /*descending=*/true));
  return 0.5 * (sorted[1].item<double>() + sorted[2].item<double>());
}

}  // namespace

CATCH_TEST_CASE("After the clip a clipped head's max logit is tau and the others keep their weights bit for bit",
                "[qk_clip]") {
  for (const int kv_heads : {2, 4}) {
    CATCH_INFO("GQA, kv heads " << kv_heads);
    auto cfg = gqa_config(kv_heads);
    cfg.attn_bias = "qkv";
    model::Attention a(cfg);
    randomize(*a, 6);
    const auto rope = model::Rope::make(cfg.max_seq_len, a->head_dim(), cfg.rope_theta, torch::kCPU);
    const auto x = torch::randn({kB, kS, cfg.d_model});
    const auto before = tracked(*a, x, rope, {});
    const double tau = tau_between(before);
    const auto wq = a->wq.detach().clone(), wk = a->wk.detach().clone(), qb = a->q_bias.detach().clone(),
               kb = a->k_bias.detach().clone(), wv = a->wv.detach().clone();
    optim::qk_clip(*a, before, tau);
    const auto after = tracked(*a, x, rope, {});
    const int64_t Hd = a->head_dim(), H = a->n_heads();
    for (int64_t h = 0; h < H; ++h) {
      CATCH_INFO("head " << h << ": " << before[h].item<double>() << " -> " << after[h].item<double>() << ", tau " << tau);
      if (before[h].item<double>() > tau) {
        CATCH_CHECK(after[h].item<double>() == Approx(tau).epsilon(1e-4));
      } else {
        CATCH_CHECK(torch::equal(block(a->wq, h, Hd, 0, Hd), block(wq, h, Hd, 0, Hd)));
        CATCH_CHECK(torch::equal(block(a->q_bias, h, Hd, 0, Hd), block(qb, h, Hd, 0, Hd)));
        CATCH_CHECK(after[h].item<double>() == Approx(before[h].item<double>()).epsilon(1e-6));
      }
    }
    CATCH_CHECK(torch::equal(a->wv, wv));
    if (kv_heads < H) {  // GQA: the shared key heads are untouched, the query head took the whole factor
      CATCH_CHECK(torch::equal(a->wk, wk));
      CATCH_CHECK(torch::equal(a->k_bias, kb));
    } else {  // MHA: an unclipped head's key columns untouched
      for (int64_t h = 0; h < H; ++h)
        if (before[h].item<double>() <= tau) CATCH_CHECK(torch::equal(block(a->wk, h, Hd, 0, Hd), block(wk, h, Hd, 0, Hd)));
    }
  }
  for (const int q_lora_rank : {0, 8}) {
    CATCH_INFO("MLA, q_lora_rank " << q_lora_rank);
    const auto cfg = mla_config(q_lora_rank);
    model::MLAttention a(cfg);
    randomize(*a, 7);
    const auto rope = model::Rope::make(cfg.max_seq_len, cfg.mla.qk_rope_head_dim, cfg.rope_theta, torch::kCPU);
    const auto x = torch::randn({kB, kS, cfg.d_model});
    const auto layout = packed_layout();
    const auto before = tracked(*a, x, rope, layout);
    const double tau = tau_between(before);
    auto& wq = a->wq.defined() ? a->wq : a->wq_b;
    const auto wq0 = wq.detach().clone(), wkv_a0 = a->wkv_a.detach().clone(), wkv_b0 = a->wkv_b.detach().clone();
    const auto wq_a0 = a->wq_a.defined() ? a->wq_a.detach().clone() : torch::Tensor();
    optim::qk_clip(*a, before, tau);
    const auto after = tracked(*a, x, rope, layout);
    const int64_t N = cfg.mla.qk_nope_head_dim, P = cfg.mla.qk_rope_head_dim, V = cfg.mla.v_head_dim;
    CATCH_CHECK(torch::equal(a->wkv_a, wkv_a0));  // the latent and the shared rotary key k_R
    if (wq_a0.defined()) CATCH_CHECK(torch::equal(a->wq_a, wq_a0));
    for (int64_t h = 0; h < cfg.n_heads; ++h) {
      CATCH_INFO("head " << h << ": " << before[h].item<double>() << " -> " << after[h].item<double>() << ", tau " << tau);
      CATCH_CHECK(torch::equal(block(a->wkv_b, h, N + V, N, V), block(wkv_b0, h, N + V, N, V)));  // values
      if (before[h].item<double>() > tau) {
        CATCH_CHECK(after[h].item<double>() == Approx(tau).epsilon(1e-4));
        const double gamma = tau / before[h].item<double>();
        // q_C and k_C by sqrt(gamma), q_R by gamma.
        CATCH_CHECK(torch::allclose(block(wq, h, N + P, 0, N), block(wq0, h, N + P, 0, N) * std::sqrt(gamma), 1e-6, 0));
        CATCH_CHECK(torch::allclose(block(wq, h, N + P, N, P), block(wq0, h, N + P, N, P) * gamma, 1e-6, 0));
        CATCH_CHECK(torch::allclose(block(a->wkv_b, h, N + V, 0, N), block(wkv_b0, h, N + V, 0, N) * std::sqrt(gamma), 1e-6, 0));
      } else {
        CATCH_CHECK(torch::equal(block(wq, h, N + P, 0, N + P), block(wq0, h, N + P, 0, N + P)));
        CATCH_CHECK(torch::equal(block(a->wkv_b, h, N + V, 0, N), block(wkv_b0, h, N + V, 0, N)));
      }
    }
  }
}

namespace {

std::vector<nlohmann::json> read_metrics(const std::string& run_dir) {
  std::vector<nlohmann::json> rows;
  std::ifstream in(files::join(run_dir, "metrics.jsonl"));
  for (std::string line; std::getline(in, line);) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

}  // namespace

CATCH_TEST_CASE("Training with a small tau clips and logs, tau 0 and an unreached tau train the same bits, resume is "
                "exact",
                "[qk_clip][train]") {
  testing::TempDir dir("qk-clip-train");
  const auto data_dir = testing::make_corpus(dir);
  for (const std::string optimizer : {"muon", "adamw"}) {
    CATCH_INFO("optim.name " << optimizer);
    auto off = testing::tiny_train_config(data_dir, dir.str(optimizer + "-off"));
    off.optim.name = optimizer;
    const auto plain = train::train(off, {});
    for (const auto& row : read_metrics(off.run.out_dir)) CATCH_CHECK(!row.contains("qk_max_logit"));

    auto unreached = off;  // tracked, never clipped: the same run bit for bit
    unreached.run.out_dir = dir.str(optimizer + "-unreached");
    unreached.optim.qk_clip_tau = 1e30;
    CATCH_CHECK(train::train(unreached, {}).losses == plain.losses);
    for (const auto& row : read_metrics(unreached.run.out_dir)) CATCH_CHECK(row["qk_clipped_heads"].get<int64_t>() == 0);

    auto clipped = off;
    clipped.run.out_dir = dir.str(optimizer + "-clipped");
    clipped.optim.qk_clip_tau = 1e-3;
    const auto full = train::train(clipped, {});
    CATCH_REQUIRE(full.losses.size() == plain.losses.size());
    CATCH_CHECK(full.losses != plain.losses);
    const auto rows = read_metrics(clipped.run.out_dir);
    CATCH_REQUIRE(rows.size() == 6);
    for (const auto& row : rows) {
      CATCH_INFO(row.dump());
      CATCH_CHECK(row["qk_max_logit"].get<double>() > 1e-3);
      // 2 layers of 4 heads each; the first step's maxima come from the initial weights
      CATCH_CHECK(row["qk_clipped_heads"].get<int64_t>() > 0);
      CATCH_CHECK(row["qk_clipped_heads"].get<int64_t>() <= 8);
    }
    testing::check_resume_joins(clipped, full, dir.str(optimizer + "-resumed"));
  }
  // MLA through the trainer.
  auto mla = testing::tiny_train_config(data_dir, dir.str("mla"));
  mla.model = mla_config(8);
  mla.model.vocab_size = 256;
  mla.optim.name = "muon";
  mla.optim.qk_clip_tau = 1e-3;
  mla.train.steps = 3;
  const auto run = train::train(mla, {});
  CATCH_CHECK(run.losses.size() == 3);
  for (const auto& row : read_metrics(mla.run.out_dir)) CATCH_CHECK(row["qk_clipped_heads"].get<int64_t>() > 0);
}

CATCH_TEST_CASE("optim.qk_clip_tau: a negative or infinite value and the combinations it refuses are one-line errors",
                "[qk_clip][config]") {
  auto expect_error = [](const config::Config& cfg, const std::string& part) {
    try {
      config::validate(cfg);
      CATCH_FAIL("accepted: expected an error naming " << part);
    } catch (const ConfigError& e) {
      const std::string what = e.what();
      CATCH_INFO(what);
      CATCH_CHECK(testing::one_line(what));
      CATCH_CHECK_THAT(what, Catch::Matchers::Contains("optim.qk_clip_tau") && Catch::Matchers::Contains(part));
    }
  };
  config::Config cfg;
  cfg.optim.qk_clip_tau = 100;
  config::validate(cfg);
  cfg.optim.name = "muon";
  config::validate(cfg);
  auto bad = cfg;
  bad.optim.qk_clip_tau = -1;
  expect_error(bad, "-1");
  bad.optim.qk_clip_tau = std::numeric_limits<double>::infinity();
  expect_error(bad, "finite");
  bad = cfg;
  bad.train.lora.rank = 8;
  bad.train.lora.targets = {"q"};
  expect_error(bad, "train.lora.rank");
  bad = cfg;
  bad.model.qk_norm = "head";
  expect_error(bad, "model.qk_norm");
  bad = cfg;
  bad.parallel.zero = 1;
  bad.run.dtype = "bf16";
  expect_error(bad, "parallel.zero");
  bad.run.dtype = "fp32";
  config::validate(bad);
}

CATCH_TEST_CASE("QK-clip on 2 ranks (store backend, zero 0 and 1) equals one process", "[qk_clip][dist][multiproc]") {
  testing::TempDir dir("qk-clip-dist");
  const auto data_dir = testing::make_corpus(dir);
  auto clip = [&](const std::string& name) {
    auto cfg = testing::equivalence_config(data_dir, dir.str(name));
    cfg.optim.name = "muon";
    cfg.optim.lr = 1e-2;
    cfg.optim.qk_clip_tau = 1e-3;
    cfg.train.steps = 8;
    cfg.optim.decay_steps = 8;
    return cfg;
  };
  const auto one = testing::train_at(clip("w1"), 1, 1);
  CATCH_INFO(one.output.substr(one.output.size() > 2000 ? one.output.size() - 2000 : 0));
  CATCH_REQUIRE(one.exit_code == 0);
  CATCH_REQUIRE(one.losses.size() == 8);
  const auto rows = read_metrics(one.run_dir);
  CATCH_CHECK(rows.back()["qk_clipped_heads"].get<int64_t>() > 0);
  for (const int zero : {0, 1}) {
    auto cfg = clip("w2zero" + std::to_string(zero));
    cfg.parallel.zero = zero;
    const auto two = testing::train_at(cfg, 2, 1);
    testing::check_same_run(two, one, "world 2, zero " + std::to_string(zero), "step_00000008");
    const auto two_rows = read_metrics(two.run_dir);
    CATCH_REQUIRE(two_rows.size() == rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      CATCH_CHECK(two_rows[i]["qk_clipped_heads"] == rows[i]["qk_clipped_heads"]);
      CATCH_CHECK(two_rows[i]["qk_max_logit"].get<double>() ==
                  Approx(rows[i]["qk_max_logit"].get<double>()).epsilon(1e-5));
    }
  }
}
