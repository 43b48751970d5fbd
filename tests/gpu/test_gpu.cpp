// The CUDA tests. Tagged [.gpu]: hidden from the CPU run (ctest does not list them, so they are never
// counted as passes where no GPU exists), run explicitly by scripts/gpu_check.sh on the GPU machine,
// which fails if any of them does not run. Each one REQUIREs a CUDA device instead of returning early.
// What each decision of these paths does on the CPU is tested elsewhere (the store backend holds every
// collective to NCCL's contract; the deterministic MoE and loss run under the same mode on the CPU).
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "ckpt/checkpoint.h"
#include "common/errors.h"
#include "config/config.h"
#include "dist/communicator.h"
#include "model/transformer.h"
#include "moe/moe.h"
#include "optim/adamw.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

void require_gpu() { CATCH_REQUIRE(torch::cuda::is_available()); }

double rel_error(const torch::Tensor& got, const torch::Tensor& want) {
  auto g = got.to(torch::kCPU).to(torch::kDouble), w = want.to(torch::kCPU).to(torch::kDouble);
  return ((g - w).norm() / w.norm()).item<double>();
}

// Experts with weights ~ N(0, 0.1^2), 8 experts of D 64, F 96, on `device`.
moe::Experts make_experts(torch::Device device) {
  moe::Experts experts(8, 64, 96);
  torch::NoGradGuard g;
  torch::manual_seed(3);
  for (auto& p : experts->parameters()) p.normal_(0, 0.1);
  experts->to(device);
  return experts;
}

}  // namespace

CATCH_TEST_CASE("CUDA bf16 grouped-GEMM experts: forward and every gradient match the fp32 sliced path",
                "[.gpu]") {
  require_gpu();
  const torch::Device cuda(torch::kCUDA, 0);
  // Uneven counts with empty experts (2 and 5), as routing produces.
  auto counts_E = torch::tensor({7, 1, 0, 33, 4, 0, 12, 9}, torch::kLong).to(cuda);
  const int64_t R = counts_E.sum().item<int64_t>();
  torch::manual_seed(4);
  const auto rows = torch::randn({R, 64}).to(cuda);
  const auto upstream = torch::randn({R, 64}).to(cuda);

  auto run = [&](bool grouped, std::optional<torch::ScalarType> dtype) {
    auto experts = make_experts(cuda);
    auto x = rows.clone().requires_grad_(true);
    auto y = grouped ? experts->forward_grouped(x, counts_E, dtype) : experts->forward_sliced(x, counts_E, dtype);
    CATCH_CHECK(y.scalar_type() == dtype.value_or(torch::kFloat));  // rows leave in the compute dtype
    (y.to(torch::kFloat) * upstream).sum().backward();
    return std::vector<torch::Tensor>{y.detach().to(torch::kFloat), x.grad(), experts->w1.grad(), experts->w2.grad(),
                                      experts->w3.grad()};
  };
  const auto want = run(/*grouped=*/false, std::nullopt);  // fp32 on CUDA, one matmul per expert
  const auto got = run(/*grouped=*/true, torch::kBFloat16);
  // bf16 rounds every operand to 8 significant bits (relative 2^-9 = 0.2%); three chained matmuls and
  // the SiLU gate, accumulated in fp32, give a relative error of the whole tensor near 0.5%. 2% is the
  // bound, for forward and for each gradient; a wrong expert offset or a missing gradient is O(1).
  const char* names[] = {"y", "dx", "dw1", "dw2", "dw3"};
  for (size_t i = 0; i < want.size(); ++i) {
    CATCH_INFO(names[i]);
    CATCH_CHECK(rel_error(got[i], want[i]) < 2e-2);
  }
  // Experts 2 and 5 received no rows: exactly zero gradient, on both paths.
  for (int e : {2, 5}) CATCH_CHECK(got[2][e].abs().max().item<double>() == 0.0);
}

CATCH_TEST_CASE("The transformer on CUDA fp32 matches the CPU", "[.gpu]") {
  require_gpu();
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

CATCH_TEST_CASE("NCCL at world size 1: every collective, fp32 and bf16, strided inputs, empty splits", "[.gpu]") {
  require_gpu();
  config::ParallelConfig p;
  p.backend = "nccl";
  p.timeout_s = 60;
  std::shared_ptr<dist::Communicator> world = dist::make_communicator(p, "cuda");
  CATCH_REQUIRE(world->backend() == "nccl");
  CATCH_REQUIRE(world->world_size() == 1);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CATCH_INFO(c10::toString(dtype));
    const auto opts = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
    auto x = torch::arange(12, opts).view({4, 3});
    auto y = x.clone();
    world->all_reduce_sum(y);
    CATCH_CHECK(torch::equal(y, x));
    world->broadcast(y, 0);
    CATCH_CHECK(torch::equal(y, x));
    CATCH_CHECK(torch::equal(world->reduce_scatter_sum(x.reshape(-1)), x.reshape(-1)));  // ZeRO-1's collective
    // Strided views (a transpose) are gathered and exchanged as their values, not their storage.
    const auto strided = torch::arange(12, opts).view({3, 4}).t();
    CATCH_REQUIRE(!strided.is_contiguous());
    CATCH_CHECK(torch::equal(world->all_gather(strided), strided));
    CATCH_CHECK(torch::equal(world->all_to_all(strided, {4}, {4}), strided));
    // In-place collectives on a strided tensor would write the wrong elements: a clear error instead.
    auto in_place = torch::empty({3, 4}, opts).t();
    CATCH_CHECK_THROWS_WITH(world->all_reduce_sum(in_place), Contains("contiguous"));
    // A rank that sends and receives no rows still posts the exchange (zero elements, same dtype).
    const auto none = torch::empty({0, 3}, opts);
    const auto got = world->all_to_all(none, {0}, {0});
    CATCH_CHECK(got.size(0) == 0);
    CATCH_CHECK(got.scalar_type() == dtype);
    // Splits that do not add up are refused before NCCL sees them.
    CATCH_CHECK_THROWS_WITH(world->all_to_all(x, {3}, {3}), Contains("send splits sum to 3"));
  }
  world->barrier();
  auto layout = dist::make_layout(world, 1);
  CATCH_CHECK(layout.ep->world_size() == 1);
  CATCH_CHECK(dist::all_sum(*world, 2.5) == 2.5);
  CATCH_CHECK(dist::all_gather_strings(*world, "abc") == std::vector<std::string>{"abc"});
}

CATCH_TEST_CASE("NCCL asynchronous collectives run after the caller's queued work and before what it queues next",
                "[.gpu]") {
  require_gpu();
  config::ParallelConfig p;
  p.backend = "nccl";
  p.timeout_s = 60;
  std::shared_ptr<dist::Communicator> world = dist::make_communicator(p, "cuda");
  const auto opts = torch::TensorOptions().dtype(torch::kFloat).device(torch::kCUDA);
  auto big = torch::randn({4096, 4096}, opts);
  for (int round = 0; round < 3; ++round) {
    // The input is written by a long matmul queued on the compute stream: a collective on the
    // communication stream that did not wait for it would read stale memory.
    auto in = torch::zeros({4096 * 4096}, opts);
    in.copy_(big.matmul(big).view(-1).mul(double(round + 1)));
    auto out = torch::empty_like(in);  // world 1: the share is the whole
    auto pending = world->reduce_scatter_sum_async(in, out);
    pending->wait();
    CATCH_CHECK(torch::equal(out, in));
    auto summed = in.clone();
    world->all_reduce_sum_async(summed)->wait();
    CATCH_CHECK(torch::equal(summed, in));
  }
}

CATCH_TEST_CASE("A checkpoint saved from CUDA loads on the CPU and back on CUDA bit for bit", "[.gpu]") {
  require_gpu();
  testing::TempDir dir("gpu-ckpt");
  config::Config cfg;
  cfg.model = testing::tiny_model_config();
  model::Transformer gpu(cfg.model);
  gpu->init_weights(21);
  gpu->place(torch::Device(torch::kCUDA, 0), torch::kBFloat16);  // weights stay fp32 under bf16 compute
  const auto step_dir = ckpt::save_weights_checkpoint(dir.str("run"), *gpu, config::to_yaml(cfg), ckpt::Progress{});

  model::Transformer cpu(cfg.model);
  cpu->init_weights(22);  // other values, so that loading must overwrite every one
  ckpt::load_model(step_dir, *cpu);
  model::Transformer again(cfg.model);
  again->place(torch::Device(torch::kCUDA, 0), std::nullopt);
  ckpt::load_model(step_dir, *again);
  const auto want = gpu->named_parameters(), from_cpu = cpu->named_parameters(), from_gpu = again->named_parameters();
  for (const auto& item : want) {
    CATCH_INFO(item.key());
    CATCH_CHECK(from_gpu[item.key()].is_cuda());
    CATCH_CHECK(torch::equal(from_cpu[item.key()], item.value().to(torch::kCPU)));
    CATCH_CHECK(torch::equal(from_gpu[item.key()], item.value()));
  }
}

CATCH_TEST_CASE("Deterministic mode on CUDA: the MoE layer and the loss repeat bit for bit", "[.gpu]") {
  require_gpu();
  const testing::DeterministicMode deterministic(true);
  auto cfg = testing::tiny_model_config();
  cfg.vocab_size = 512;
  cfg.d_model = 64;
  cfg.moe.n_experts = 8;
  cfg.moe.expert_hidden = 32;
  cfg.max_seq_len = 64;
  const torch::Device cuda(torch::kCUDA, 0);
  torch::manual_seed(5);
  const auto tokens = torch::randint(0, cfg.vocab_size, {8, 64}, torch::kLong).to(cuda);
  const auto targets = torch::randint(0, cfg.vocab_size, {8 * 64}, torch::kLong).to(cuda);
  auto run = [&] {
    model::Transformer m(cfg);
    m->init_weights(7);
    m->place(cuda, torch::kBFloat16);
    auto out = m->forward(tokens);
    auto loss = model::token_cross_entropy(out.logits_BSV.view({-1, cfg.vocab_size}), targets, -100);
    loss.backward();
    std::vector<torch::Tensor> grads;
    for (const auto& p : m->parameters())
      if (p.grad().defined()) grads.push_back(p.grad().clone());
    return std::make_pair(loss.detach(), grads);
  };
  const auto a = run(), b = run();
  CATCH_CHECK(torch::equal(a.first, b.first));
  CATCH_REQUIRE(a.second.size() == b.second.size());
  bool all_equal = true;
  for (size_t i = 0; i < a.second.size(); ++i) all_equal = all_equal && torch::equal(a.second[i], b.second[i]);
  CATCH_CHECK(all_equal);
}

// AdamW on CUDA takes LibTorch's fused kernel by default; it follows the CPU's per-tensor update to fp32
// rounding (1e-6 relative over five steps; the kernel forms the bias corrections in another order).
CATCH_TEST_CASE("AdamW on CUDA is fused and follows the CPU's per-tensor update", "[.gpu]") {
  require_gpu();
  config::OptimConfig cfg;
  cfg.weight_decay = 0.1;
  torch::manual_seed(3);
  auto cpu_w = torch::randn({64, 32}).requires_grad_(), cpu_b = torch::randn({32}).requires_grad_();
  auto gpu_w = cpu_w.detach().to(torch::kCUDA).requires_grad_(), gpu_b = cpu_b.detach().to(torch::kCUDA).requires_grad_();
  auto no_decay = [](const std::string& n) { return n == "b"; };
  optim::AdamW cpu({{"w", cpu_w}, {"b", cpu_b}}, cfg, no_decay);
  optim::AdamW gpu({{"w", gpu_w}, {"b", gpu_b}}, cfg, no_decay);
  CATCH_CHECK_FALSE(cpu.fused());
  CATCH_REQUIRE(gpu.fused());
  for (int step = 0; step < 5; ++step) {
    auto gw = torch::randn({64, 32}), gb = torch::randn({32});
    cpu_w.mutable_grad() = gw.clone();
    cpu_b.mutable_grad() = gb.clone();
    gpu_w.mutable_grad() = gw.to(torch::kCUDA);
    gpu_b.mutable_grad() = gb.to(torch::kCUDA);
    cpu.step(1e-2);
    gpu.step(1e-2);
  }
  CATCH_CHECK(torch::allclose(gpu_w.detach().cpu(), cpu_w.detach(), 1e-6, 1e-7));
  CATCH_CHECK(torch::allclose(gpu_b.detach().cpu(), cpu_b.detach(), 1e-6, 1e-7));
}

CATCH_TEST_CASE("Packed documents on CUDA bf16: the variable-length flash path equals the mask path and one-by-one runs",
                "[.gpu]") {
  require_gpu();
  const torch::Device cuda(torch::kCUDA, 0);
  auto cfg = testing::tiny_model_config();
  cfg.d_model = 64;  // head dim 16: flash takes it
  cfg.max_seq_len = 32;
  model::Transformer m(cfg);
  m->init_weights(5);
  m->place(cuda, torch::kBFloat16);
  // Two rows of 32: documents of 9, 14, 5 (+4 padding) and 20, 12.
  const std::vector<std::vector<int64_t>> rows = {{9, 14, 5}, {20, 12}};
  auto tokens = torch::randint(1, cfg.vocab_size, {2, 32}, torch::kLong);
  auto positions = torch::zeros({2, 32}, torch::kLong), targets = torch::full({2, 32}, int64_t(-100), torch::kLong);
  for (int64_t b = 0; b < 2; ++b) {
    int64_t at = 0;
    for (int64_t L : rows[size_t(b)]) {
      positions[b].narrow(0, at, L).copy_(torch::arange(L));
      targets[b].narrow(0, at, L - 1).copy_(tokens[b].narrow(0, at + 1, L - 1));
      at += L;
    }
  }
  const auto probe = torch::zeros({1, 4, 8, 16}, torch::TensorOptions().dtype(torch::kBFloat16).device(cuda));
  CATCH_REQUIRE(model::varlen_flash_applies(probe, probe.narrow(1, 0, 2), probe.narrow(1, 0, 2)));
  auto run = [&](const torch::Tensor& given_positions) {  // host positions: varlen; device ones: the mask
    m->zero_grad();
    auto out = m->forward_loss(tokens.to(cuda), targets.to(cuda), -100, /*sum=*/true, /*with_mtp=*/false, given_positions);
    out.loss.backward();
    std::vector<torch::Tensor> got{out.loss.detach().to(torch::kFloat)};
    for (const auto& p : m->parameters()) got.push_back(p.grad().defined() ? p.grad().to(torch::kFloat) : torch::zeros_like(p));
    return got;
  };
  const auto varlen = run(positions);
  const auto masked = run(positions.to(cuda));
  // Both are bf16 attention with fp32 accumulation in other kernels: within 2% of each tensor's norm
  // (a document that saw another, or positions that did not restart, differ by far more).
  for (size_t i = 0; i < varlen.size(); ++i) {
    CATCH_INFO("tensor " << i);
    CATCH_CHECK(rel_error(varlen[i], masked[i]) < 2e-2);
  }
  m->zero_grad();
  torch::Tensor alone = torch::zeros({}, torch::TensorOptions().device(cuda));
  for (int64_t b = 0; b < 2; ++b) {
    int64_t at = 0;
    for (int64_t L : rows[size_t(b)]) {
      alone = alone + m->forward_loss(tokens[b].narrow(0, at, L).unsqueeze(0).to(cuda),
                                      targets[b].narrow(0, at, L).unsqueeze(0).to(cuda), -100, true, false).loss;
      at += L;
    }
  }
  CATCH_CHECK(rel_error(varlen[0], alone.detach().to(torch::kFloat)) < 2e-2);
}
