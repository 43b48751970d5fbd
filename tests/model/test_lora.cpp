// LoRA adapters (train.lora): a zero B leaves the model its base bit for bit; attention (GQA, MLA) and
// the stacked experts (both paths) against independent fp64 references of y = x (W + s A B), values and
// the gradients of A and B; merged weights give the adapted model's logits.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "model/transformer.h"
#include "moe/lora.h"
#include "moe/moe.h"

using namespace moetrain;

namespace {

config::LoraConfig lora_config(int rank, double alpha) {
  config::LoraConfig c;
  c.rank = rank;
  c.alpha = alpha;
  return c;  // the default targets: q, kv, o, experts, shared_experts, dense_mlp
}

config::ModelConfig mla_config(int q_lora_rank) {
  auto m = testing::with_mla(testing::tiny_model_config(), q_lora_rank, 16, 16, 8, 12);
  m.d_model = 32;
  return m;
}

// ||a - b|| / ||b|| (Frobenius), in fp64.
double relative(const torch::Tensor& a, const torch::Tensor& b) {
  auto x = a.to(torch::kDouble), y = b.to(torch::kDouble);
  return (x - y).norm().item<double>() / std::max(y.norm().item<double>(), 1e-30);
}

void randomize(torch::nn::Module& m, double std = 0.1) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.named_parameters()) {
    const bool norm = p.key().find("norm") != std::string::npos;
    p.value().copy_(norm ? 1 + std * torch::randn(p.value().sizes()) : std * torch::randn(p.value().sizes()));
  }
}

// The adapted weights' names in `m` (those with a `<name>_lora_a`).
std::vector<std::string> adapted_weights(torch::nn::Module& m) {
  std::vector<std::string> out;
  for (const auto& p : m.named_parameters()) {
    const std::string& n = p.key();
    if (n.size() > 7 && n.compare(n.size() - 7, 7, "_lora_a") == 0) out.push_back(n.substr(0, n.size() - 7));
  }
  return out;
}

// The reference for a module with dense adapters: the same module type in fp64 with each adapted weight
// replaced by W + s A B, run by autograd; the gradients of A and B follow from that of the merged weight
// W' by the chain rule: dA = s dW' B^T, dB = s A^T dW'.
template <class Module>
void check_dense_against_merged(Module& adapted, Module& reference, const torch::Tensor& x, const model::Rope& rope,
                                double scale) {
  auto y = adapted->forward(x, rope, std::nullopt);
  const auto g = torch::randn(y.sizes());
  (y * g).sum().backward();

  auto params = adapted->named_parameters();
  {
    torch::NoGradGuard no_grad;
    for (auto& p : reference->named_parameters()) {
      auto value = params[p.key()].detach().to(torch::kDouble);
      if (params.contains(p.key() + "_lora_a"))
        value = value + scale * torch::matmul(params[p.key() + "_lora_a"].to(torch::kDouble),
                                              params[p.key() + "_lora_b"].to(torch::kDouble));
      p.value().copy_(value);
    }
  }
  auto y_ref = reference->forward(x.to(torch::kDouble), rope, std::nullopt);
  (y_ref * g.to(torch::kDouble)).sum().backward();
  CATCH_CHECK(relative(y, y_ref) < 1e-5);
  auto ref_params = reference->named_parameters();
  const auto names = adapted_weights(*adapted);
  CATCH_REQUIRE(!names.empty());
  for (const auto& name : names) {
    CATCH_INFO(name);
    const auto a = params[name + "_lora_a"].detach().to(torch::kDouble), b = params[name + "_lora_b"].detach().to(torch::kDouble);
    const auto grad_merged = ref_params[name].grad();
    CATCH_CHECK(relative(params[name + "_lora_a"].grad(), scale * torch::matmul(grad_merged, b.t())) < 1e-5);
    CATCH_CHECK(relative(params[name + "_lora_b"].grad(), scale * torch::matmul(a.t(), grad_merged)) < 1e-5);
    CATCH_CHECK(!params[name].grad().defined());  // the base is frozen
  }
}

// Adapters with random (nonzero) A and B; the module's other weights frozen, as add_lora leaves them.
void random_adapters(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.named_parameters()) {
    if (moe::is_lora_name(p.key()))
      p.value().copy_(0.2 * torch::randn(p.value().sizes()));
    else
      p.value().requires_grad_(false);
  }
}

}  // namespace

CATCH_TEST_CASE("LoRA with B = 0 gives the base model's logits bit for bit (GQA and MLA)", "[model][lora]") {
  for (const bool mla : {false, true}) {
    CATCH_INFO("mla " << mla);
    const auto m = mla ? mla_config(12) : testing::tiny_model_config();
    model::Transformer base(m), adapted(m);
    base->init_weights(11);
    adapted->init_weights(11);
    adapted->add_lora(lora_config(4, 8), 11);
    const auto tokens = torch::randint(0, m.vocab_size, {2, 9}, torch::kLong);
    CATCH_CHECK(torch::equal(base->forward(tokens).logits_BSV, adapted->forward(tokens).logits_BSV));
    // Every matmul weight of the targets has an adapter: A seeded and nonzero, B zero; all else frozen.
    int64_t adapters = 0;
    for (const auto& p : adapted->named_parameters()) {
      const bool lora = moe::is_lora_name(p.key());
      CATCH_CHECK(p.value().requires_grad() == lora);
      if (!lora) continue;
      ++adapters;
      const bool is_b = p.key().back() == 'b';
      CATCH_CHECK((is_b ? p.value().abs().max().item<double>() == 0 : p.value().abs().min().item<double>() > 0));
    }
    // GQA: wq, wk, wv, wo in 2 blocks, dense w1/w3/w2, experts w1/w3/w2, shared w1/w3/w2, each with A and B.
    // MLA (q latent): wq_a, wq_b, wkv_a, wkv_b, wo per block, and the same MLPs.
    CATCH_CHECK(adapters == 2 * ((mla ? 5 : 4) * 2 + 3 * 3));
  }
}

CATCH_TEST_CASE("LoRA adapters are seeded by name and global expert id: an expert shard starts as the whole model's",
                "[model][lora]") {
  const auto m = testing::tiny_model_config();
  model::Transformer whole(m), shard(m, moe::ExpertShard{2, 1});
  whole->init_weights(5);
  shard->init_weights(5);
  whole->add_lora(lora_config(3, 6), 5);
  shard->add_lora(lora_config(3, 6), 5);
  auto all = whole->named_parameters();
  int64_t experts = 0;
  for (const auto& p : shard->roled_parameters()) {
    if (!moe::is_lora_name(p.name)) continue;
    CATCH_INFO(p.name);
    if (p.role == model::ParamRole::expert) {
      ++experts;
      CATCH_CHECK(torch::equal(p.tensor, all[p.name].narrow(0, 2, 2)));
    } else {
      CATCH_CHECK(torch::equal(p.tensor, all[p.name]));
    }
  }
  CATCH_CHECK(experts == 6);  // w1, w3, w2, each A and B, all ParamRole::expert
}

CATCH_TEST_CASE("LoRA on GQA attention equals x (W + s A B) in fp64, values and the gradients of A and B",
                "[model][lora]") {
  torch::manual_seed(3);
  auto cfg = testing::tiny_model_config();
  cfg.attn_bias = "qkv";
  config::LoraConfig lora = lora_config(3, 6);  // scale 2
  lora.targets = {"q", "k", "v", "o"};
  model::Attention adapted(cfg), reference(cfg);
  randomize(*adapted);
  adapted->add_lora(lora);
  random_adapters(*adapted);
  reference->to(torch::kDouble);
  const auto rope = model::Rope::make(cfg.max_seq_len, config::head_dim(cfg), cfg.rope_theta, torch::kCPU);
  const auto x = torch::randn({2, 7, cfg.d_model});
  // Tolerance 1e-5 relative (Frobenius): fp32 against fp64, a few hundred products per value.
  check_dense_against_merged(adapted, reference, x, rope, 2.0);
}

CATCH_TEST_CASE("LoRA on MLA's projections equals x (W + s A B) in fp64, values and the gradients of A and B",
                "[model][lora]") {
  for (const int q_lora_rank : {0, 12}) {
    CATCH_INFO("q_lora_rank " << q_lora_rank);
    torch::manual_seed(4);
    const auto cfg = mla_config(q_lora_rank);
    model::MLAttention adapted(cfg), reference(cfg);
    randomize(*adapted);
    adapted->add_lora(lora_config(5, 5));  // scale 1; q, kv, o
    random_adapters(*adapted);
    CATCH_CHECK(adapted_weights(*adapted).size() == (q_lora_rank > 0 ? 5u : 4u));
    reference->to(torch::kDouble);
    const auto rope = model::Rope::make(cfg.max_seq_len, cfg.mla.qk_rope_head_dim, cfg.rope_theta, torch::kCPU);
    check_dense_against_merged(adapted, reference, torch::randn({2, 7, cfg.d_model}), rope, 1.0);
  }
}

CATCH_TEST_CASE("Stacked expert adapters equal a per-row loop of x (W_e + s A_e B_e) in fp64 on both expert paths",
                "[model][lora]") {
  // D and F give _grouped_mm's 16-byte strides in fp32; rank 3 is padded to 4 inside the grouped path.
  const int E = 4, D = 8, F = 12;
  const std::vector<int64_t> counts = {3, 0, 5, 2};
  for (const std::string impl : {"sliced", "grouped_mm"}) {
    CATCH_INFO(impl);
    torch::manual_seed(6);
    moe::Experts experts(E, D, F, impl);
    randomize(*experts, 0.3);
    experts->add_lora(lora_config(3, 4.5));  // scale 1.5
    random_adapters(*experts);
    const int64_t R = 10;
    const auto x = torch::randn({R, D});
    auto y = experts->forward(x, torch::tensor(counts), std::nullopt);
    const auto g = torch::randn(y.sizes());
    (y * g).sum().backward();

    // The reference: every row on its own, through its expert's merged weights, in fp64.
    auto leaf = [](const torch::Tensor& t) { return t.detach().to(torch::kDouble).requires_grad_(true); };
    auto a1 = leaf(experts->w1_lora.a), b1 = leaf(experts->w1_lora.b), a3 = leaf(experts->w3_lora.a),
         b3 = leaf(experts->w3_lora.b), a2 = leaf(experts->w2_lora.a), b2 = leaf(experts->w2_lora.b);
    const auto w1 = experts->w1.to(torch::kDouble), w3 = experts->w3.to(torch::kDouble), w2 = experts->w2.to(torch::kDouble);
    const double s = 1.5;
    std::vector<torch::Tensor> rows;
    int64_t e = 0, left = counts[0];
    for (int64_t r = 0; r < R; ++r) {
      while (left == 0) left = counts[size_t(++e)];
      --left;
      const auto xr = x[r].to(torch::kDouble).unsqueeze(0);
      const auto gate = xr.matmul(w1[e] + s * a1[e].matmul(b1[e]));
      const auto up = xr.matmul(w3[e] + s * a3[e].matmul(b3[e]));
      rows.push_back((torch::silu(gate) * up).matmul(w2[e] + s * a2[e].matmul(b2[e])));
    }
    const auto y_ref = torch::cat(rows, 0);
    (y_ref * g.to(torch::kDouble)).sum().backward();
    CATCH_CHECK(relative(y, y_ref) < 1e-5);
    const std::vector<std::pair<torch::Tensor, torch::Tensor>> grads = {
        {experts->w1_lora.a.grad(), a1.grad()}, {experts->w1_lora.b.grad(), b1.grad()},
        {experts->w3_lora.a.grad(), a3.grad()}, {experts->w3_lora.b.grad(), b3.grad()},
        {experts->w2_lora.a.grad(), a2.grad()}, {experts->w2_lora.b.grad(), b2.grad()}};
    for (size_t i = 0; i < grads.size(); ++i) {
      CATCH_INFO("gradient " << i);
      CATCH_REQUIRE(grads[i].first.defined());
      CATCH_CHECK(relative(grads[i].first, grads[i].second) < 1e-5);
    }
    // Expert 1 saw no rows: its adapters' gradients are zero.
    CATCH_CHECK(experts->w1_lora.a.grad()[1].abs().max().item<double>() == 0);
    CATCH_CHECK(!experts->w1.grad().defined());
  }
}

CATCH_TEST_CASE("LoRA dropout applies while gradients are recorded and never in evaluation", "[model][lora]") {
  torch::manual_seed(8);
  moe::SwiGLU mlp(8, 12);
  randomize(*mlp);
  auto cfg = lora_config(2, 2);
  cfg.dropout = 0.5;
  mlp->add_lora(cfg);
  random_adapters(*mlp);
  const auto x = torch::randn({6, 8});
  torch::Tensor plain;
  {
    torch::NoGradGuard no_grad;
    plain = mlp->forward(x, std::nullopt);
    CATCH_CHECK(torch::equal(plain, mlp->forward(x, std::nullopt)));
  }
  CATCH_CHECK(!torch::equal(plain, mlp->forward(x, std::nullopt).detach()));
}

CATCH_TEST_CASE("LoRA adapts the MTP modules' blocks too: B = 0 keeps their losses, and their adapters learn",
                "[model][lora]") {
  auto m = testing::tiny_model_config();
  m.mtp_depth = 1;
  model::Transformer base(m), adapted(m);
  base->init_weights(13);
  adapted->init_weights(13);
  adapted->add_lora(lora_config(2, 4), 13);
  const auto tokens = torch::randint(0, m.vocab_size, {2, 10}, torch::kLong);
  const auto targets = torch::randint(0, m.vocab_size, {2, 10}, torch::kLong);
  const auto want = base->forward_loss(tokens, targets, -100), got = adapted->forward_loss(tokens, targets, -100);
  CATCH_CHECK(torch::equal(want.loss, got.loss));
  CATCH_CHECK(torch::equal(want.mtp_loss, got.mtp_loss));
  (got.loss + got.mtp_loss).backward();
  auto params = adapted->named_parameters();
  CATCH_REQUIRE(params.contains("mtp.0.block.attn.wq_lora_b"));
  CATCH_REQUIRE(params.contains("mtp.0.block.moe.experts.w1_lora_b"));
  CATCH_CHECK(params["mtp.0.block.attn.wq_lora_b"].grad().abs().max().item<double>() > 0);
  CATCH_CHECK(!params["mtp.0.eh_proj"].requires_grad());
  CATCH_CHECK(!params["mtp.0.eh_proj"].grad().defined());
}
