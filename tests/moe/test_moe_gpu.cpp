// CUDA checks, tagged [gpu]: they pass with a warning where no GPU is present (this CPU machine),
// and run for real on the GPU machine through scripts/gpu_check.sh.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "model/transformer.h"
#include "moe/moe.h"

using namespace moetrain;

namespace {
bool have_gpu() {
  if (torch::cuda::is_available()) return true;
  CATCH_WARN("no CUDA device: GPU test not run");
  return false;
}
double rel_error(const torch::Tensor& got, const torch::Tensor& want) {
  auto g = got.to(torch::kCPU).to(torch::kDouble), w = want.to(torch::kCPU).to(torch::kDouble);
  return ((g - w).norm() / w.norm()).item<double>();
}
}  // namespace

CATCH_TEST_CASE("CUDA bf16 grouped-GEMM experts match the sliced path and an fp64 reference", "[gpu][moe]") {
  if (!have_gpu()) return;
  moe::Experts experts(8, 64, 96);
  {
    torch::NoGradGuard g;
    for (auto& p : experts->parameters()) p.normal_(0, 0.1);
  }
  // Uneven counts with empty experts (2 and 5), as routing produces.
  auto counts_E = torch::tensor({7, 1, 0, 33, 4, 0, 12, 9}, torch::kLong);
  const int64_t R = counts_E.sum().item<int64_t>();
  auto rows = torch::randn({R, 64});
  auto want = experts->forward_sliced(rows.to(torch::kDouble), counts_E, torch::kDouble);
  experts->to(torch::kCUDA);
  auto rows_cuda = rows.to(torch::kCUDA);
  auto counts_cuda = counts_E.to(torch::kCUDA);
  auto grouped = experts->forward_grouped(rows_cuda, counts_cuda, torch::kBFloat16);
  auto sliced = experts->forward_sliced(rows_cuda, counts_cuda, torch::kBFloat16);
  CATCH_CHECK(grouped.scalar_type() == torch::kBFloat16);
  // bf16 operands: relative error between 1e-3 and 1e-2 against fp64.
  CATCH_CHECK(rel_error(grouped, want) < 2e-2);
  CATCH_CHECK(rel_error(sliced, want) < 2e-2);
  // Gradients flow through the grouped path to every expert that received rows.
  grouped.to(torch::kFloat).pow(2).sum().backward();
  auto grad_norm_E = experts->w1.grad().to(torch::kCPU).flatten(1).norm(2, 1);
  CATCH_CHECK(grad_norm_E[2].item<double>() == 0.0);
  CATCH_CHECK(grad_norm_E[3].item<double>() > 0.0);
}

CATCH_TEST_CASE("The transformer on CUDA fp32 matches the CPU", "[gpu][model]") {
  if (!have_gpu()) return;
  auto cfg = testing::tiny_model_config();
  model::Transformer cpu(cfg), gpu(cfg);
  cpu->init_weights(9);
  gpu->init_weights(9);
  gpu->place(torch::Device(torch::kCUDA, 0), std::nullopt);
  auto tokens = torch::randint(0, cfg.vocab_size, {2, 16}, torch::kLong);
  auto a = cpu->forward(tokens), b = gpu->forward(tokens.to(torch::kCUDA));
  // Same fp32 math in other kernels (cuBLAS, no TF32 by default): 1e-4 relative.
  CATCH_CHECK(rel_error(b.logits_BSV, a.logits_BSV) < 1e-4);
  CATCH_CHECK(torch::equal(a.moe_stats[0].tokens_per_expert_E, b.moe_stats[0].tokens_per_expert_E.to(torch::kCPU)));
}
