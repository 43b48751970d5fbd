// Muon against a naive implementation written out with loops in double; batched Newton-Schulz over
// stacked experts against a loop over them; MLA's split projections; which weights Muon takes.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <map>
#include <vector>

#include "../test_util.h"
#include "model/transformer.h"
#include "optim/muon.h"

using namespace moetrain;

namespace {

// A row-major (rows x cols) matrix in double, and the few operations the reference needs.
struct Mat {
  int64_t rows = 0, cols = 0;
  std::vector<double> v;
  double& at(int64_t i, int64_t j) { return v[i * cols + j]; }
  double at(int64_t i, int64_t j) const { return v[i * cols + j]; }
};

Mat zeros(int64_t rows, int64_t cols) { return {rows, cols, std::vector<double>(rows * cols, 0.0)}; }

Mat from_tensor(const torch::Tensor& t) {
  auto c = t.to(torch::kDouble).contiguous();
  Mat m = zeros(c.size(0), c.size(1));
  for (int64_t i = 0; i < m.rows; ++i)
    for (int64_t j = 0; j < m.cols; ++j) m.at(i, j) = c[i][j].item<double>();
  return m;
}

Mat transpose(const Mat& a) {
  Mat t = zeros(a.cols, a.rows);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < a.cols; ++j) t.at(j, i) = a.at(i, j);
  return t;
}

Mat matmul(const Mat& a, const Mat& b) {
  Mat c = zeros(a.rows, b.cols);
  for (int64_t i = 0; i < a.rows; ++i)
    for (int64_t j = 0; j < b.cols; ++j) {
      double sum = 0;
      for (int64_t k = 0; k < a.cols; ++k) sum += a.at(i, k) * b.at(k, j);
      c.at(i, j) = sum;
    }
  return c;
}

// Keller Jordan's quintic iteration, as the papers write it.
Mat reference_newton_schulz(Mat x) {
  const bool transposed = x.rows > x.cols;
  if (transposed) x = transpose(x);
  double norm = 0;
  for (double e : x.v) norm += e * e;
  norm = std::sqrt(norm);
  for (double& e : x.v) e /= norm + 1e-7;
  for (int step = 0; step < 5; ++step) {
    const Mat a = matmul(x, transpose(x));
    const Mat aa = matmul(a, a);
    Mat b = zeros(a.rows, a.cols);
    for (size_t i = 0; i < b.v.size(); ++i) b.v[i] = -4.7750 * a.v[i] + 2.0315 * aa.v[i];
    const Mat bx = matmul(b, x);
    for (size_t i = 0; i < x.v.size(); ++i) x.v[i] = 3.4445 * x.v[i] + bx.v[i];
  }
  return transposed ? transpose(x) : x;
}

double relative_difference(const torch::Tensor& got, const Mat& want) {
  const Mat g = from_tensor(got);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.v.size(); ++i) {
    diff += (g.v[i] - want.v[i]) * (g.v[i] - want.v[i]);
    norm += want.v[i] * want.v[i];
  }
  return std::sqrt(diff / norm);
}

double relative_difference(const torch::Tensor& got, const torch::Tensor& want) {
  return (got.to(torch::kDouble) - want.to(torch::kDouble)).norm().item<double>() / want.to(torch::kDouble).norm().item<double>();
}

}  // namespace

// Tolerances: the momentum is one multiply-add per element, 1e-6 relative (Frobenius). Newton-Schulz
// in fp32 against the same iteration in double from the same fp32 input: 5e-6. The quintic multiplies
// what rounding adds in the directions of small singular values by up to 3.4 per iteration (they are
// being raised towards 1), so fp32 differs from exact by up to 2.8e-6 on random matrices (measured
// worst over 200 seeds of these shapes with LibTorch's Python ops; 1.05e-6 for this seed's 5 x 8);
// a wrong coefficient, a missing transpose or a norm over the wrong dims differs by order 1e-1.
CATCH_TEST_CASE("Muon: Newton-Schulz and three updates equal a naive implementation in double", "[optim]") {
  torch::manual_seed(3);
  for (auto [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{5, 8}, {9, 4}, {6, 6}}) {
    CATCH_INFO(rows << " x " << cols);
    const auto g = torch::randn({rows, cols});
    const double ns_difference = relative_difference(optim::newton_schulz(g), reference_newton_schulz(from_tensor(g)));
    std::printf("Newton-Schulz %lld x %lld: fp32 against double %.3g (relative norm)\n", (long long)rows,
                (long long)cols, ns_difference);
    CATCH_CHECK(ns_difference <= 5e-6);

    config::OptimConfig cfg;
    cfg.momentum = 0.9;
    cfg.weight_decay = 0.1;
    const double lr = 0.02;
    auto w = torch::randn({rows, cols});
    const auto w0 = w.clone();
    auto momentum = torch::zeros({rows, cols});
    Mat w_ref = from_tensor(w), m_ref = zeros(rows, cols);
    for (int step = 0; step < 3; ++step) {
      const auto grad = torch::randn({rows, cols});
      optim::muon_update(w, grad, momentum, cfg, lr, /*decay=*/true);
      const Mat gr = from_tensor(grad);
      Mat nesterov = zeros(rows, cols);
      for (size_t i = 0; i < gr.v.size(); ++i) {
        m_ref.v[i] = cfg.momentum * m_ref.v[i] + gr.v[i];
        nesterov.v[i] = gr.v[i] + cfg.momentum * m_ref.v[i];
      }
      const Mat o = reference_newton_schulz(nesterov);
      const double scale = 0.2 * std::sqrt(double(std::max(rows, cols)));
      for (size_t i = 0; i < w_ref.v.size(); ++i) w_ref.v[i] = w_ref.v[i] * (1 - lr * cfg.weight_decay) - lr * scale * o.v[i];
    }
    CATCH_CHECK(relative_difference(momentum, m_ref) <= 1e-6);
    CATCH_CHECK(relative_difference(w, w_ref) <= 1e-6);
    CATCH_CHECK(relative_difference(w, from_tensor(w0)) > 1e-3);  // it moved
    // The direction itself, scaled to AdamW's RMS by 0.2 sqrt(max(rows, cols)).
    Mat scaled = reference_newton_schulz(from_tensor(g));
    for (double& e : scaled.v) e *= 0.2 * std::sqrt(double(std::max(rows, cols)));
    CATCH_CHECK(relative_difference(optim::muon_direction(g), scaled) <= 5e-6);
  }
}

CATCH_TEST_CASE("Muon: one batched Newton-Schulz over stacked experts (E, F, D) equals a loop over the experts", "[optim]") {
  torch::manual_seed(5);
  for (auto shape : std::vector<std::vector<int64_t>>{{4, 8, 16}, {3, 12, 5}}) {
    const auto g = torch::randn(shape) * torch::arange(1, shape[0] + 1).view({-1, 1, 1});  // norms differ per expert
    const auto batched = optim::newton_schulz(g);
    CATCH_REQUIRE(batched.sizes() == g.sizes());
    for (int64_t e = 0; e < shape[0]; ++e) {
      CATCH_INFO("expert " << e);
      CATCH_CHECK(relative_difference(batched[e], optim::newton_schulz(g[e])) <= 1e-6);
    }
    // The update's scale is each expert's own (rows, cols), not the stack's.
    const double scale = 0.2 * std::sqrt(double(std::max(shape[1], shape[2])));
    CATCH_CHECK(relative_difference(optim::muon_direction(g), batched * scale) <= 1e-6);
  }
}

CATCH_TEST_CASE("Muon: a weight of several logical matrices is orthogonalised per matrix", "[optim]") {
  // MLA's wkv_b: (kv_rank, H * (nope + v)), per head the key's nope columns then the value's.
  torch::manual_seed(9);
  const int64_t R = 6, H = 3, N = 4, V = 2;
  const auto g = torch::randn({R, H * (N + V)});
  const auto got = optim::muon_direction(g, H, {N, V});
  std::vector<int64_t> key_cols, value_cols;
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t j = 0; j < N; ++j) key_cols.push_back(h * (N + V) + j);
    for (int64_t j = 0; j < V; ++j) value_cols.push_back(h * (N + V) + N + j);
  }
  for (const auto& [cols, width] : {std::make_pair(key_cols, N), std::make_pair(value_cols, V)}) {
    const auto index = torch::tensor(cols);
    const auto part = g.index_select(1, index);
    const double scale = 0.2 * std::sqrt(double(std::max(R, H * width)));
    Mat want = reference_newton_schulz(from_tensor(part));
    for (double& e : want.v) e *= scale;
    CATCH_CHECK(relative_difference(got.index_select(1, index), want) <= 1e-6);
  }
  // Not the same as treating the weight as one matrix.
  CATCH_CHECK(relative_difference(got, optim::muon_direction(g)) > 1e-2);
}

CATCH_TEST_CASE("Muon takes the hidden matrices, AdamW the embedding, head, norms, biases, routers and adapters",
                "[optim][model]") {
  auto m = testing::tiny_model_config();
  m.attention = "mla";
  m.mla.q_lora_rank = 8;
  m.mla.kv_lora_rank = 8;
  m.mla.qk_nope_head_dim = 4;
  m.mla.qk_rope_head_dim = 2;
  m.mla.v_head_dim = 4;
  m.tie_embeddings = false;
  model::Transformer model(m);
  std::map<std::string, model::RoledParam> by_name;
  for (auto& p : model->roled_parameters()) by_name[p.name] = p;
  for (const char* name : {"layers.0.attn.wq_a", "layers.0.attn.wq_b", "layers.0.attn.wkv_a", "layers.0.attn.wkv_b",
                           "layers.0.attn.wo", "layers.0.mlp.w1", "layers.0.mlp.w2", "layers.0.mlp.w3",
                           "layers.1.moe.experts.w1", "layers.1.moe.experts.w2", "layers.1.moe.shared.w3"}) {
    CATCH_INFO(name);
    CATCH_REQUIRE(by_name.count(name));
    CATCH_CHECK(by_name[name].hidden_matrix);
  }
  for (const char* name : {"embed", "lm_head", "final_norm.weight", "layers.0.attn_norm.weight",
                           "layers.0.attn.kv_a_norm.weight", "layers.1.moe.router.weight"}) {
    CATCH_INFO(name);
    CATCH_REQUIRE(by_name.count(name));
    CATCH_CHECK(!by_name[name].hidden_matrix);
  }
  CATCH_CHECK(by_name["layers.0.attn.wkv_a"].column_heads == 1);
  CATCH_CHECK(by_name["layers.0.attn.wkv_a"].column_widths == std::vector<int64_t>{8, 2});
  CATCH_CHECK(by_name["layers.0.attn.wkv_b"].column_heads == 4);
  CATCH_CHECK(by_name["layers.0.attn.wkv_b"].column_widths == std::vector<int64_t>{4, 4});
  CATCH_CHECK(by_name["layers.0.attn.wq_b"].column_widths.empty());

  // The optimizer: a momentum for each hidden matrix, AdamW's moments for the rest, which update
  // exactly as AdamW updates them.
  config::OptimConfig cfg;
  cfg.name = "muon";
  const auto params = model->roled_parameters();
  optim::Muon muon(params, cfg, model::is_no_decay, /*fused=*/false);
  CATCH_CHECK(muon.state().optimizer == "muon");
  for (const auto& s : muon.states()) {
    CATCH_INFO(s.name);
    CATCH_CHECK(s.muon == by_name[s.name].hidden_matrix);
    CATCH_CHECK(s.momentum.defined() == s.muon);
    CATCH_CHECK(s.exp_avg.defined() == !s.muon);
  }
  auto norm = by_name["final_norm.weight"].tensor;
  const auto before = norm.detach().clone();
  torch::manual_seed(1);
  for (const auto& p : params) p.tensor.mutable_grad() = torch::randn(p.tensor.sizes());
  auto norm_copy = before.clone().requires_grad_();
  norm_copy.mutable_grad() = norm.grad().clone();
  optim::AdamW adamw({{"final_norm.weight", norm_copy}}, cfg, model::is_no_decay, /*fused=*/false);
  muon.step(1e-2);
  adamw.step(1e-2);
  CATCH_CHECK(torch::equal(norm.detach(), norm_copy.detach()));
  CATCH_CHECK(!torch::equal(norm.detach(), before));
}
