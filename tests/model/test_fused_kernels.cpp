// Fewer elementwise kernels in the layers (issue 24, item 8), each against the ops it replaced written
// out here: RMSNorm through at::rms_norm, RoPE's tables cached in the compute dtype with rotate-half's
// sign folded in, MLA's value padded to the query/key head dim for flash attention; and the chunked
// LM head's gradient summed in fp32 when the head is held in bf16 (ZeRO-1's sharded masters, item 7).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>

#include "../test_util.h"
#include "common/tensor.h"
#include "model/layers.h"
#include "model/transformer.h"

using namespace moetrain;

namespace {

// The RMSNorm the layers used before at::rms_norm: statistics and scaling in fp32, one rounding to x's dtype.
torch::Tensor written_out_rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  auto xf = x.to(torch::promote_types(x.scalar_type(), torch::kFloat));
  auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, true) + eps);
  return (normed * weight.to(normed.scalar_type())).to(x.scalar_type());
}

// RoPE as the layers applied it before: the fp32 tables cast per call, rotate-half by a cat.
torch::Tensor written_out_rope(const model::Rope& rope, const torch::Tensor& x, int64_t offset) {
  const int64_t S = x.size(2), half = x.size(3) / 2;
  auto cos = rope.cos_SHd.narrow(0, offset, S).to(x.scalar_type());
  auto sin = rope.sin_SHd.narrow(0, offset, S).to(x.scalar_type());
  auto rotated = torch::cat({-x.narrow(3, half, half), x.narrow(3, 0, half)}, 3);
  return x * cos + rotated * sin;
}

}  // namespace

// On the CPU at::rms_norm decomposes into the same ops in the same order, so the output and both
// gradients are bit for bit the written-out norm's in fp32, fp64 and bf16 (bf16 goes through fp32, as
// before). On CUDA the fused kernel reduces in its own order: not checked here (no GPU), expected to
// agree to fp32 rounding.
CATCH_TEST_CASE("RMSNorm through at::rms_norm equals the written-out norm bit for bit on the CPU, forward and backward",
                "[model]") {
  for (const auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
    for (const bool recompute : {false, true}) {
      CATCH_INFO(c10::toString(dtype) << (recompute ? ", recomputed" : ""));
      model::RMSNorm norm(48, 1e-5);
      norm->recompute = recompute;
      torch::manual_seed(3);
      {
        torch::NoGradGuard no_grad;
        norm->weight.copy_(1 + 0.2 * torch::randn({48}));
      }
      auto x = (3 * torch::randn({2, 5, 48})).to(dtype).requires_grad_(true);
      auto w_ref = norm->weight.detach().clone().requires_grad_(true);
      auto x_ref = x.detach().clone().requires_grad_(true);
      const auto grad_out = torch::randn({2, 5, 48}).to(dtype);
      auto got = norm->forward(x);
      auto want = written_out_rms_norm(x_ref, w_ref, 1e-5);
      CATCH_CHECK(got.scalar_type() == dtype);
      CATCH_CHECK(torch::equal(got, want));
      got.backward(grad_out);
      want.backward(grad_out);
      CATCH_CHECK(torch::equal(x.grad(), x_ref.grad()));
      CATCH_CHECK(torch::equal(norm->weight.grad(), w_ref.grad()));
    }
  }
}

// The cached tables are the per-call casts made once, and x2 * (-sin) is (-x2) * sin exactly, so
// apply() is bit for bit the cat-based rotation, in fp32 and bf16, at an offset, with YaRN, on
// contiguous and strided (transposed) inputs; another dtype than the cached one (fp64) still works.
CATCH_TEST_CASE("RoPE with cached compute-dtype tables equals the per-call cast and cat bit for bit", "[model]") {
  config::YarnConfig yarn;
  for (const double factor : {1.0, 4.0}) {
    yarn.factor = factor;
    yarn.original_max_seq_len = 8;
    const auto base = model::Rope::make(32, 16, 10000.0, torch::kCPU, yarn);
    for (const auto dtype : {torch::kFloat, torch::kBFloat16, torch::kDouble}) {
      CATCH_INFO("yarn factor " << factor << ", " << c10::toString(dtype));
      const auto rope = base.cached_in(dtype == torch::kDouble ? torch::kFloat : dtype);
      torch::manual_seed(5);
      const auto x_BSHd = torch::randn({2, 9, 3, 16}).to(dtype);
      const auto x = x_BSHd.transpose(1, 2);  // (B, H, S, Hd), strided as the attention's heads are
      for (const int64_t offset : {int64_t(0), int64_t(7)}) {
        CATCH_CHECK(torch::equal(rope.apply(x, offset), written_out_rope(base, x, offset)));
        CATCH_CHECK(torch::equal(rope.apply(x.contiguous(), offset), written_out_rope(base, x, offset)));
      }
    }
  }
}

// DeepSeek-V3's shape in small: query/key head dim 24 (16 + 8 RoPE), value head dim 12. The padded
// value adds zero columns to the attention's output, so the output equals the unpadded attention's
// up to the kernel's summation order (the CPU's attention blocks a 24-wide value otherwise than a 12-wide
// one): within 1e-6 on the CPU in fp32, absolute for outputs below 1 (these are), else relative to the
// largest (measured at weights 3x larger, outputs up to 8.3: 1.8e-6 absolute, two ulps); the same for
// the input's gradient.
CATCH_TEST_CASE("MLA with its value padded to the query/key head dim equals the unpadded attention within 1e-6",
                "[model]") {
  for (const int q_lora_rank : {0, 12}) {
    CATCH_INFO("q_lora_rank " << q_lora_rank);
    auto cfg = testing::with_mla(testing::tiny_model_config(), q_lora_rank, 16, 16, 8, 12);
    cfg.d_model = 32;
    cfg.n_heads = 4;
    model::MLAttention mla(cfg);
    torch::manual_seed(9);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : mla->parameters()) p.copy_(p.dim() > 1 ? 0.1 * torch::randn(p.sizes()) : 1 + 0.1 * torch::randn(p.sizes()));
    }
    const auto rope = model::Rope::make(cfg.max_seq_len, cfg.mla.qk_rope_head_dim, cfg.rope_theta, torch::kCPU);
    auto x = torch::randn({2, 11, cfg.d_model}).requires_grad_(true);
    auto x_ref = x.detach().clone().requires_grad_(true);
    auto got = mla->forward(x, rope, std::nullopt);

    // The unpadded attention, written out from the module's weights.
    const int64_t B = 2, S = 11, H = cfg.n_heads, N = 16, P = 8, V = 12, R = 16;
    auto q = q_lora_rank > 0 ? torch::matmul(mla->q_a_norm->forward(torch::matmul(x_ref, mla->wq_a)), mla->wq_b)
                             : torch::matmul(x_ref, mla->wq);
    q = q.view({B, S, H, N + P}).transpose(1, 2);
    auto kv_a = torch::matmul(x_ref, mla->wkv_a);
    auto k_pe = rope.apply(kv_a.narrow(2, R, P).unsqueeze(1));
    auto kv = torch::matmul(mla->kv_a_norm->forward(kv_a.narrow(2, 0, R)), mla->wkv_b).view({B, S, H, N + V}).transpose(1, 2);
    auto query = torch::cat({q.narrow(3, 0, N), rope.apply(q.narrow(3, N, P))}, 3);
    auto key = torch::cat({kv.narrow(3, 0, N), k_pe.expand({B, H, S, P})}, 3);
    auto y = at::scaled_dot_product_attention(query, key, kv.narrow(3, N, V), {}, 0.0, /*is_causal=*/true,
                                              1.0 / std::sqrt(double(N + P)));
    auto want = torch::matmul(y.transpose(1, 2).reshape({B, S, H * V}), mla->wo);

    CATCH_REQUIRE(got.sizes() == want.sizes());
    const double out_diff = (got - want).abs().max().item<double>();
    CATCH_INFO("largest output difference " << out_diff << " of values up to " << want.abs().max().item<double>());
    CATCH_CHECK(out_diff <= 1e-6 * std::max(1.0, want.abs().max().item<double>()));
    const auto grad_out = torch::randn(want.sizes());
    got.backward(grad_out);
    want.backward(grad_out);
    const double grad_scale = std::max(1.0, x_ref.grad().abs().max().item<double>());
    CATCH_CHECK((x.grad() - x_ref.grad()).abs().max().item<double>() <= 1e-6 * grad_scale);
  }
}

// ZeRO-1 under bf16 holds the untied head in bf16 (its fp32 master sharded, Tensor::set_grad_dtype
// fp32). With train.loss_chunk_tokens > 0 the head's gradient is one bf16 matmul per chunk, as at zero
// 0; zero 0's fp32 head sums the chunks in fp32, and so must the bf16-held head (it summed them in
// bf16, a rounding per chunk, 1e-3 apart). Every gradient bit for bit zero 0's.
CATCH_TEST_CASE("A bf16-held untied head under a chunked loss gets zero 0's fp32-summed gradient, bit for bit",
                "[model][zero]") {
  auto cfg = testing::tiny_model_config();
  cfg.tie_embeddings = false;
  torch::manual_seed(8);
  const auto tokens = torch::randint(0, cfg.vocab_size, {3, 16}, torch::kLong);
  const auto targets = torch::randint(0, cfg.vocab_size, {3, 16}, torch::kLong);
  for (const bool sum : {false, true}) {
    CATCH_INFO((sum ? "sum" : "mean"));
    auto run = [&](bool held_in_bf16) {
      model::Transformer m(cfg);
      m->init_weights(4);
      m->set_compute_dtype(torch::kBFloat16);
      m->set_loss_chunk(5);  // 10 chunks of 48 tokens, the last short
      if (held_in_bf16) {  // as ZeRO-1's first step does to every weight its uses cast
        torch::NoGradGuard no_grad;
        forget_cached_casts(m->lm_head);
        m->lm_head.set_data(m->lm_head.detach().to(torch::kBFloat16));
        m->lm_head.set_grad_dtype(torch::kFloat);
      }
      auto out = m->forward_loss(tokens, targets, -100, sum);
      out.loss.backward();
      std::vector<torch::Tensor> grads;
      for (const auto& p : m->named_parameters()) grads.push_back(p.value().grad());
      return grads;
    };
    const auto zero0 = run(false), held = run(true);
    const auto names = model::Transformer(cfg)->named_parameters().keys();
    for (size_t i = 0; i < zero0.size(); ++i) {
      CATCH_INFO(names[i]);
      CATCH_REQUIRE(held[i].defined());
      CATCH_CHECK(held[i].scalar_type() == torch::kFloat);
      CATCH_CHECK(torch::equal(held[i], zero0[i]));
    }
  }
}
