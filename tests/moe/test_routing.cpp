// Routing, balancing losses, capacity and the two expert implementations against independent naive
// references written here: loops over tokens in double precision with std::vector and std::sort, no
// calls into the code under test.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/errors.h"
#include "config/config.h"
#include "moe/moe.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

using Mat = std::vector<std::vector<double>>;

std::vector<double> to_vec(const torch::Tensor& t) {
  auto c = t.detach().to(torch::kCPU, torch::kDouble).contiguous().reshape(-1);
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

std::vector<int64_t> to_ivec(const torch::Tensor& t) {
  auto c = t.detach().to(torch::kCPU, torch::kLong).contiguous().reshape(-1);
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

Mat to_mat(const torch::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  auto flat = to_vec(t);
  Mat m(rows, std::vector<double>(cols));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) m[i][j] = flat[i * cols + j];
  return m;
}

double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// ---------------------------------------------------------------------------------------------------
// Reference router.

struct RefRouting {
  Mat logits, scores;                       // (T, E)
  std::vector<std::vector<int64_t>> ids;    // (T, K), best first
  std::vector<std::vector<double>> weights; // (T, K)
  bool ambiguous = false;                   // some selection decided by a near-tie (fp32 may differ)
};

// Whether two values that decide a selection are too close for fp32 arithmetic to order reliably.
bool near_tie(double a, double b) { return std::abs(a - b) <= 1e-4 * std::max(std::abs(a), std::abs(b)) + 1e-7; }

RefRouting ref_route(const Mat& x, const Mat& w, const std::vector<double>& bias, const config::MoEConfig& cfg) {
  const int64_t T = x.size(), E = w.size(), D = w[0].size(), K = cfg.top_k;
  const auto& rc = cfg.router;
  RefRouting r;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> logit(E), score(E), sel(E);
    for (int64_t e = 0; e < E; ++e) {
      double acc = 0;
      for (int64_t d = 0; d < D; ++d) acc += x[t][d] * w[e][d];
      logit[e] = acc;
    }
    if (rc.score_func == "softmax") {
      const double m = *std::max_element(logit.begin(), logit.end());
      double z = 0;
      for (int64_t e = 0; e < E; ++e) z += std::exp(logit[e] - m);
      for (int64_t e = 0; e < E; ++e) score[e] = std::exp(logit[e] - m) / z;
    } else {
      for (int64_t e = 0; e < E; ++e) score[e] = sigmoid(logit[e]);
    }
    for (int64_t e = 0; e < E; ++e) sel[e] = score[e] + (bias.empty() ? 0.0 : bias[e]);

    // Eligible experts: all, or those of the best topk_groups groups by the sum of their top-2.
    std::vector<int64_t> eligible;
    if (rc.n_groups > 1) {
      const int64_t G = rc.n_groups, n = E / G;
      std::vector<std::pair<double, int64_t>> groups;
      for (int64_t g = 0; g < G; ++g) {
        std::vector<double> v(sel.begin() + g * n, sel.begin() + (g + 1) * n);
        std::sort(v.begin(), v.end(), std::greater<double>());
        groups.push_back({n > 1 ? v[0] + v[1] : v[0], g});
      }
      std::stable_sort(groups.begin(), groups.end(), [](auto a, auto b) { return a.first > b.first; });
      if (rc.topk_groups < G && near_tie(groups[rc.topk_groups - 1].first, groups[rc.topk_groups].first))
        r.ambiguous = true;
      for (int64_t i = 0; i < rc.topk_groups; ++i)
        for (int64_t e = groups[i].second * n; e < (groups[i].second + 1) * n; ++e) eligible.push_back(e);
    } else {
      for (int64_t e = 0; e < E; ++e) eligible.push_back(e);
    }
    std::vector<std::pair<double, int64_t>> ranked;
    for (int64_t e : eligible) ranked.push_back({sel[e], e});
    std::stable_sort(ranked.begin(), ranked.end(), [](auto a, auto b) { return a.first > b.first; });
    for (int64_t i = 0; i < K && i + 1 < int64_t(ranked.size()); ++i)
      if (near_tie(ranked[i].first, ranked[i + 1].first)) r.ambiguous = true;

    std::vector<int64_t> ids;
    std::vector<double> wts;
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      ids.push_back(ranked[k].second);
      wts.push_back(score[ranked[k].second]);  // the unbiased score
      sum += score[ranked[k].second];
    }
    for (auto& v : wts) v = (rc.normalize_topk ? v / sum : v) * rc.routed_scaling;
    r.logits.push_back(logit);
    r.scores.push_back(score);
    r.ids.push_back(ids);
    r.weights.push_back(wts);
  }
  return r;
}

struct RefStats {
  double aux = 0, seq_aux = 0, z = 0, entropy = 0;
  std::vector<int64_t> counts;
};

// aux over tokens [begin, end): E * sum_e (count_e / (n*K)) * mean_t p_{t,e}.
double ref_aux(const RefRouting& r, int64_t begin, int64_t end, int64_t E, int64_t K) {
  std::vector<double> count(E, 0), mean_p(E, 0);
  const double n = double(end - begin);
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t id : r.ids[t]) count[id] += 1;
    const double s = std::accumulate(r.scores[t].begin(), r.scores[t].end(), 0.0);
    for (int64_t e = 0; e < E; ++e) mean_p[e] += r.scores[t][e] / s / n;
  }
  double acc = 0;
  for (int64_t e = 0; e < E; ++e) acc += count[e] / (n * K) * mean_p[e];
  return double(E) * acc;
}

RefStats ref_stats(const RefRouting& r, int64_t seq_len, int64_t E, int64_t K) {
  RefStats s;
  const int64_t T = r.ids.size(), B = T / seq_len;
  s.counts.assign(E, 0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t id : r.ids[t]) s.counts[id] += 1;
    const double m = *std::max_element(r.logits[t].begin(), r.logits[t].end());
    double z = 0;
    for (double l : r.logits[t]) z += std::exp(l - m);
    const double lse = m + std::log(z);
    s.z += lse * lse / double(T);
    const double sum = std::accumulate(r.scores[t].begin(), r.scores[t].end(), 0.0);
    double h = 0;
    for (double v : r.scores[t])
      if (v > 0) h -= v / sum * std::log(v / sum);
    s.entropy += h / double(T);
  }
  s.aux = ref_aux(r, 0, T, E, K);
  for (int64_t b = 0; b < B; ++b) s.seq_aux += ref_aux(r, b * seq_len, (b + 1) * seq_len, E, K) / double(B);
  return s;
}

// Random router inputs whose every selection is decided by a clear margin, so that ids can be compared
// exactly with the fp32 implementation: x ~ randn (T, D), W ~ randn (E, D), bias ~ bias_scale * randn.
struct RouterCase {
  torch::Tensor x, w, bias;  // bias undefined when bias_scale == 0
  RefRouting ref;
};

RouterCase draw_router_case(const config::MoEConfig& cfg, int64_t T, int64_t D, double bias_scale, uint64_t seed) {
  for (int attempt = 0; attempt < 50; ++attempt) {
    torch::manual_seed(seed * 1000 + attempt);
    RouterCase c;
    c.x = torch::randn({T, D});
    c.w = torch::randn({cfg.n_experts, D});
    if (bias_scale > 0) c.bias = torch::randn({cfg.n_experts}) * bias_scale;
    c.ref = ref_route(to_mat(c.x), to_mat(c.w), c.bias.defined() ? to_vec(c.bias) : std::vector<double>{}, cfg);
    if (!c.ref.ambiguous) return c;
  }
  CATCH_FAIL("could not draw well-separated router inputs; change the seed");
  return {};
}

void load_router(moe::RouterImpl& router, const RouterCase& c) {
  torch::NoGradGuard g;
  router.weight.copy_(c.w);
  if (c.bias.defined()) {
    CATCH_REQUIRE(router.expert_bias.defined());
    router.expert_bias.copy_(c.bias);
  }
}

// Compares a plan with the reference: ids exactly, weights to 1e-6.
void check_plan(const moe::RoutingPlan& plan, const RefRouting& ref) {
  const int64_t T = ref.ids.size(), K = ref.ids.empty() ? 0 : ref.ids[0].size();
  CATCH_REQUIRE(plan.topk_ids_TK.sizes() == torch::IntArrayRef({T, K}));
  CATCH_REQUIRE(plan.topk_weights_TK.sizes() == torch::IntArrayRef({T, K}));
  CATCH_CHECK(plan.topk_ids_TK.scalar_type() == torch::kLong);
  CATCH_CHECK(plan.topk_weights_TK.scalar_type() == torch::kFloat);
  auto ids = to_ivec(plan.topk_ids_TK);
  auto w = to_vec(plan.topk_weights_TK);
  int64_t id_mismatches = 0, weight_mismatches = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K; ++k) {
      if (ids[t * K + k] != ref.ids[t][k]) {
        if (id_mismatches++ < 3)
          CATCH_FAIL_CHECK("token " << t << " k " << k << ": id " << ids[t * K + k] << ", want " << ref.ids[t][k]);
      } else if (std::abs(w[t * K + k] - ref.weights[t][k]) > 1e-6 * std::max(1.0, std::abs(ref.weights[t][k]))) {
        if (weight_mismatches++ < 3)
          CATCH_FAIL_CHECK("token " << t << " k " << k << ": weight " << w[t * K + k] << ", want "
                                    << ref.weights[t][k]);
      }
    }
  }
  CATCH_CHECK(id_mismatches == 0);
  CATCH_CHECK(weight_mismatches == 0);
}

// ---------------------------------------------------------------------------------------------------
// Reference experts and capacity.

// A stacked weight (E, A, B) or a matrix (A, B) as a flat double array with its shape.
struct Dense {
  std::vector<double> v;
  int64_t a = 0, b = 0;
  explicit Dense(const torch::Tensor& t) : v(to_vec(t)), a(t.size(-2)), b(t.size(-1)) {}
  double at(int64_t e, int64_t i, int64_t j) const { return v[(e * a + i) * b + j]; }
};

// SwiGLU of one row: w2( silu(x w1) * (x w3) ), with expert e of stacked weights.
std::vector<double> ref_swiglu(const std::vector<double>& x, const Dense& w1, const Dense& w3, const Dense& w2,
                               int64_t e) {
  const int64_t D = w1.a, F = w1.b;
  std::vector<double> h(F), y(D, 0);
  for (int64_t f = 0; f < F; ++f) {
    double a = 0, b = 0;
    for (int64_t d = 0; d < D; ++d) {
      a += x[d] * w1.at(e, d, f);
      b += x[d] * w3.at(e, d, f);
    }
    h[f] = a * sigmoid(a) * b;
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t f = 0; f < F; ++f) y[d] += h[f] * w2.at(e, f, d);
  return y;
}

// Which (t, k) copies survive a capacity: per expert the `capacity` copies of highest weight, ties to
// the earlier token. Returns the dropped copies.
std::set<std::pair<int64_t, int64_t>> ref_dropped(const std::vector<std::vector<int64_t>>& ids,
                                                  const std::vector<std::vector<double>>& weights, int64_t E,
                                                  int64_t capacity, bool* boundary_tie = nullptr) {
  std::set<std::pair<int64_t, int64_t>> dropped;
  for (int64_t e = 0; e < E; ++e) {
    std::vector<std::pair<double, std::pair<int64_t, int64_t>>> copies;  // (weight, (t, k))
    for (int64_t t = 0; t < int64_t(ids.size()); ++t)
      for (int64_t k = 0; k < int64_t(ids[t].size()); ++k)
        if (ids[t][k] == e) copies.push_back({weights[t][k], {t, k}});
    std::stable_sort(copies.begin(), copies.end(), [](auto a, auto b) { return a.first > b.first; });
    if (boundary_tie && capacity > 0 && int64_t(copies.size()) > capacity &&
        near_tie(copies[capacity - 1].first, copies[capacity].first))
      *boundary_tie = true;
    for (int64_t i = capacity; i < int64_t(copies.size()); ++i) dropped.insert(copies[i].second);
  }
  return dropped;
}

int64_t ref_capacity(double cf, int64_t T, int64_t K, int64_t E) {
  return int64_t(std::ceil(cf * double(T) * double(K) / double(E)));
}

// The MoE layer token by token: sum over kept copies of w * expert(x), plus the shared experts.
Mat ref_moe(const moe::MoEImpl& layer, const Mat& x, const RefRouting& r,
            const std::set<std::pair<int64_t, int64_t>>& dropped) {
  Dense w1(layer.experts->w1), w3(layer.experts->w3), w2(layer.experts->w2);
  std::optional<Dense> s1, s3, s2;
  if (layer.shared) s1.emplace(layer.shared->w1), s3.emplace(layer.shared->w3), s2.emplace(layer.shared->w2);
  Mat out;
  for (int64_t t = 0; t < int64_t(x.size()); ++t) {
    std::vector<double> o(x[t].size(), 0);
    for (int64_t k = 0; k < int64_t(r.ids[t].size()); ++k) {
      if (dropped.count({t, k})) continue;
      auto y = ref_swiglu(x[t], w1, w3, w2, r.ids[t][k]);
      for (size_t d = 0; d < o.size(); ++d) o[d] += r.weights[t][k] * y[d];
    }
    if (s1) {
      auto y = ref_swiglu(x[t], *s1, *s3, *s2, 0);
      for (size_t d = 0; d < o.size(); ++d) o[d] += y[d];
    }
    out.push_back(o);
  }
  return out;
}

double max_abs_diff(const Mat& a, const torch::Tensor& b) {
  auto m = to_mat(b);
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a[i].size(); ++j) worst = std::max(worst, std::abs(a[i][j] - m[i][j]));
  return worst;
}

config::MoEConfig router_cfg(int E, int K, const std::string& score_func, bool normalize, double scaling) {
  config::MoEConfig cfg;
  cfg.n_experts = E;
  cfg.top_k = K;
  cfg.router.score_func = score_func;
  cfg.router.normalize_topk = normalize;
  cfg.router.routed_scaling = scaling;
  return cfg;
}

std::string describe(const config::MoEConfig& cfg) {
  const auto& r = cfg.router;
  return r.score_func + " normalize=" + std::to_string(r.normalize_topk) + " scaling=" +
         std::to_string(r.routed_scaling) + " E=" + std::to_string(cfg.n_experts) + " K=" +
         std::to_string(cfg.top_k) + " groups=" + std::to_string(r.n_groups) + "/" + std::to_string(r.topk_groups) +
         " bias_rate=" + std::to_string(r.bias_update_rate);
}

}  // namespace

// ===================================================================================================
// 1. Router selection and weights.

CATCH_TEST_CASE("router: softmax/sigmoid x normalize x routed_scaling equal the naive reference", "[moe]") {
  uint64_t seed = 1;
  for (std::string func : {"softmax", "sigmoid"}) {
    for (bool normalize : {true, false}) {
      for (double scaling : {1.0, 2.5}) {
        for (int K : {1, 2, 3}) {
          auto cfg = router_cfg(8, K, func, normalize, scaling);
          CATCH_INFO(describe(cfg));
          auto c = draw_router_case(cfg, 64, 8, 0.0, seed++);
          moe::Router router(cfg, 8);
          load_router(*router, c);
          auto plan = router->route(c.x, 16);
          check_plan(plan, c.ref);
          if (normalize) {  // weights of a token sum to routed_scaling
            auto sums = plan.topk_weights_TK.sum(1);
            CATCH_CHECK(torch::allclose(sums, torch::full_like(sums, scaling), 1e-5, 1e-6));
          }
        }
      }
    }
  }
}

CATCH_TEST_CASE("router: group-limited routing equals the naive reference", "[moe]") {
  uint64_t seed = 100;
  struct G {
    int E, K, n_groups, topk_groups;
  };
  for (G g : {G{8, 3, 4, 2}, G{8, 2, 4, 1}, G{12, 4, 3, 2}, G{8, 3, 8, 4}, G{6, 2, 3, 2}}) {
    for (std::string func : {"sigmoid", "softmax"}) {
      for (double bias_scale : {0.0, 0.1}) {
        auto cfg = router_cfg(g.E, g.K, func, true, 2.5);
        cfg.router.n_groups = g.n_groups;
        cfg.router.topk_groups = g.topk_groups;
        if (bias_scale > 0) cfg.router.bias_update_rate = 0.01;
        CATCH_INFO(describe(cfg));
        auto c = draw_router_case(cfg, 64, 8, bias_scale, seed++);
        moe::Router router(cfg, 8);
        load_router(*router, c);
        check_plan(router->route(c.x, 64), c.ref);
        // Every chosen expert lies in one of at most topk_groups groups.
        auto ids = to_ivec(router->route(c.x, 64).topk_ids_TK);
        const int n = g.E / g.n_groups;
        for (int64_t t = 0; t < 64; ++t) {
          std::set<int64_t> groups;
          for (int k = 0; k < g.K; ++k) groups.insert(ids[t * g.K + k] / n);
          CATCH_CHECK(int(groups.size()) <= g.topk_groups);
        }
      }
    }
  }
}

CATCH_TEST_CASE("router: the best single expert in a losing group is not chosen", "[moe]") {
  // E=8 in 4 groups of 2 ({0,1} {2,3} {4,5} {6,7}), 2 eligible groups, K=3. W = I, so logits = x.
  // Expert 0 has the best score of all, but its partner is poor, so group 0 (score = top-2 sum) loses
  // to groups 1 and 2, whose experts are each worse than expert 0.
  struct Case {
    std::string func;
    std::vector<float> logits;
  };
  for (const Case& c : {Case{"sigmoid", {5, -5, 2.2f, 1.8f, 1.6f, 1.4f, -1, -1}},
                        Case{"softmax", {3, -5, 2.6f, 2.4f, 2.5f, 2.2f, 0, 0}}}) {
    CATCH_INFO(c.func);
    auto cfg = router_cfg(8, 3, c.func, true, 1.0);
    cfg.router.n_groups = 4;
    cfg.router.topk_groups = 2;
    moe::Router router(cfg, 8);
    {
      torch::NoGradGuard g;
      router->weight.copy_(torch::eye(8));
    }
    auto x = torch::tensor(c.logits).reshape({1, 8});
    auto plan = router->route(x, 1);
    auto ids = to_ivec(plan.topk_ids_TK);
    // sigmoid: groups 1.758, 1.634 beat group 0's 1.000; softmax (unnormalized exp): 24.5, 21.2 beat 20.1.
    const std::vector<int64_t> want = c.func == "sigmoid" ? std::vector<int64_t>{2, 3, 4} : std::vector<int64_t>{2, 4, 3};
    CATCH_CHECK(ids == want);
    CATCH_CHECK(std::find(ids.begin(), ids.end(), 0) == ids.end());
    // Weights: the chosen scores renormalized.
    std::vector<double> l(c.logits.begin(), c.logits.end()), s(8);
    double z = 0;
    for (double v : l) z += std::exp(v);
    for (int e = 0; e < 8; ++e) s[e] = c.func == "sigmoid" ? sigmoid(l[e]) : std::exp(l[e]) / z;
    const double sum = s[want[0]] + s[want[1]] + s[want[2]];
    auto w = to_vec(plan.topk_weights_TK);
    for (int k = 0; k < 3; ++k) CATCH_CHECK(w[k] == Approx(s[want[k]] / sum).margin(1e-6));
    // Without groups the same token does take expert 0 first.
    cfg.router.n_groups = 1;
    cfg.router.topk_groups = 1;
    moe::Router flat(cfg, 8);
    {
      torch::NoGradGuard g;
      flat->weight.copy_(torch::eye(8));
    }
    CATCH_CHECK(to_ivec(flat->route(x, 1).topk_ids_TK)[0] == 0);
  }
}

CATCH_TEST_CASE("router: the selection bias changes which experts are chosen, not their weights", "[moe]") {
  for (std::string func : {"sigmoid", "softmax"}) {
    CATCH_INFO(func);
    auto cfg = router_cfg(4, 2, func, true, 1.0);
    cfg.router.bias_update_rate = 0.01;
    moe::Router router(cfg, 4);
    CATCH_REQUIRE(router->expert_bias.defined());
    CATCH_CHECK(router->expert_bias.sizes() == torch::IntArrayRef({4}));
    CATCH_CHECK(router->expert_bias.scalar_type() == torch::kFloat);
    auto x = torch::tensor({2.0f, 1.0f, 0.0f, -3.0f}).reshape({1, 4});
    std::vector<double> s(4);
    double z = 0;
    for (double v : {2.0, 1.0, 0.0, -3.0}) z += std::exp(v);
    for (int e = 0; e < 4; ++e) {
      const double l = 2.0 - e - (e == 3 ? 2.0 : 0.0);
      s[e] = func == "sigmoid" ? sigmoid(l) : std::exp(l) / z;
    }
    {
      torch::NoGradGuard g;
      router->weight.copy_(torch::eye(4));
      router->expert_bias.zero_();
    }
    CATCH_CHECK(to_ivec(router->route(x, 1).topk_ids_TK) == std::vector<int64_t>{0, 1});
    {
      torch::NoGradGuard g;
      router->expert_bias.copy_(torch::tensor({0.0f, 0.0f, 0.0f, 1.0f}));  // lifts the worst expert to first
    }
    auto plan = router->route(x, 1);
    CATCH_CHECK(to_ivec(plan.topk_ids_TK) == std::vector<int64_t>{3, 0});
    auto w = to_vec(plan.topk_weights_TK);
    // The weight of expert 3 is its own (small) score, normalized: not score + bias.
    CATCH_CHECK(w[0] == Approx(s[3] / (s[3] + s[0])).margin(1e-6));
    CATCH_CHECK(w[1] == Approx(s[0] / (s[3] + s[0])).margin(1e-6));
    CATCH_CHECK(w[0] < 0.1);
  }
}

// ===================================================================================================
// 2. Balancing losses and statistics.

CATCH_TEST_CASE("router: aux, seq_aux, z-loss, entropy and tokens_per_expert equal the reference", "[moe]") {
  const int64_t B = 3, S = 16, T = B * S, D = 8;
  uint64_t seed = 200;
  struct V {
    std::string func;
    int n_groups, topk_groups;
    double bias_scale;
  };
  for (V v : {V{"softmax", 1, 1, 0.0}, V{"sigmoid", 1, 1, 0.0}, V{"sigmoid", 4, 2, 0.1}, V{"softmax", 4, 2, 0.0},
              V{"softmax", 1, 1, 0.05}}) {
    auto cfg = router_cfg(8, 2, v.func, false, 2.5);
    cfg.router.n_groups = v.n_groups;
    cfg.router.topk_groups = v.topk_groups;
    if (v.bias_scale > 0) cfg.router.bias_update_rate = 0.01;
    CATCH_INFO(describe(cfg));
    auto c = draw_router_case(cfg, T, D, v.bias_scale, seed++);
    moe::Router router(cfg, D);
    load_router(*router, c);
    auto plan = router->route(c.x, S);
    check_plan(plan, c.ref);
    auto want = ref_stats(c.ref, S, 8, 2);
    const auto& st = plan.stats;
    CATCH_CHECK(to_ivec(st.tokens_per_expert_E) == want.counts);
    CATCH_CHECK(st.tokens_per_expert_E.scalar_type() == torch::kLong);
    CATCH_CHECK(st.aux_loss.dim() == 0);
    CATCH_CHECK(st.aux_loss.item<double>() == Approx(want.aux).epsilon(1e-5));
    CATCH_CHECK(st.seq_aux_loss.item<double>() == Approx(want.seq_aux).epsilon(1e-5));
    CATCH_CHECK(st.z_loss.item<double>() == Approx(want.z).epsilon(1e-5));
    CATCH_CHECK(st.entropy.item<double>() == Approx(want.entropy).epsilon(1e-5));
    // Per-sequence and batch losses genuinely differ here (else seq_len would be ignored unnoticed).
    CATCH_CHECK(std::abs(want.seq_aux - want.aux) > 1e-3);
    // A different seq_len changes only the sequence-wise loss.
    auto whole = router->route(c.x, T).stats;
    CATCH_CHECK(whole.seq_aux_loss.item<double>() == Approx(want.aux).epsilon(1e-5));
    CATCH_CHECK(whole.aux_loss.item<double>() == Approx(want.aux).epsilon(1e-5));
  }
}

CATCH_TEST_CASE("router: the balancing losses train the router weight with the right gradient", "[moe]") {
  // Reference: the same losses in fp64 autograd, written from the definitions (f_e is a count, no gradient).
  const int64_t B = 2, S = 12, T = B * S, D = 8, E = 6, K = 2;
  for (std::string func : {"softmax", "sigmoid"}) {
    CATCH_INFO(func);
    auto cfg = router_cfg(E, K, func, true, 1.0);
    auto c = draw_router_case(cfg, T, D, 0.0, 300 + (func == "sigmoid"));
    moe::Router router(cfg, D);
    load_router(*router, c);
    auto w = c.w.to(torch::kDouble).requires_grad_(true);
    auto logits = torch::mm(c.x.to(torch::kDouble), w.t());
    auto scores = func == "softmax" ? torch::softmax(logits, 1) : torch::sigmoid(logits);
    auto p = scores / scores.sum(1, true);
    auto aux_of = [&](int64_t begin, int64_t end) {
      std::vector<double> f(E, 0);
      for (int64_t t = begin; t < end; ++t)
        for (int64_t id : c.ref.ids[t]) f[id] += 1.0 / double((end - begin) * K);
      auto f_E = torch::tensor(f, torch::kDouble);
      return double(E) * (f_E * p.slice(0, begin, end).mean(0)).sum();
    };
    auto want_aux = aux_of(0, T);
    auto want_seq = (aux_of(0, S) + aux_of(S, T)) / 2.0;
    auto want_z = torch::logsumexp(logits, 1).pow(2).mean();
    std::vector<std::pair<std::string, torch::Tensor>> wants = {{"aux", want_aux}, {"seq", want_seq}, {"z", want_z}};
    for (auto& [name, want] : wants) {
      CATCH_INFO(name);
      router->zero_grad();
      auto st = router->route(c.x, S).stats;
      auto got = name == "aux" ? st.aux_loss : name == "seq" ? st.seq_aux_loss : st.z_loss;
      CATCH_REQUIRE(got.requires_grad());
      got.backward();
      auto want_grad = torch::autograd::grad({want}, {w}, {}, true)[0];
      CATCH_REQUIRE(router->weight.grad().defined());
      CATCH_CHECK(want_grad.abs().max().item<double>() > 1e-4);  // the check has something to compare
      CATCH_CHECK(torch::allclose(router->weight.grad().to(torch::kDouble), want_grad, 1e-4, 1e-6));
    }
  }
}

// ===================================================================================================
// 3. Capacity.

CATCH_TEST_CASE("expert_capacity is ceil(cf * T * K / E)", "[moe]") {
  CATCH_CHECK(moe::expert_capacity(1.0, 6, 1, 2) == 3);
  CATCH_CHECK(moe::expert_capacity(1.0, 8, 2, 4) == 4);  // exact: not rounded up further
  CATCH_CHECK(moe::expert_capacity(1.25, 10, 2, 4) == 7);
  CATCH_CHECK(moe::expert_capacity(0.5, 6, 1, 2) == 2);
  CATCH_CHECK(moe::expert_capacity(2.0, 7, 2, 8) == 4);
  CATCH_CHECK(moe::expert_capacity(0.75, 4, 2, 3) == 2);
}

namespace {
moe::RoutingPlan hand_plan(const std::vector<std::vector<int64_t>>& ids, const std::vector<std::vector<float>>& w,
                           int64_t E) {
  const int64_t T = ids.size(), K = ids[0].size();
  std::vector<int64_t> flat_ids;
  std::vector<float> flat_w;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k) flat_ids.push_back(ids[t][k]), flat_w.push_back(w[t][k]);
  moe::RoutingPlan plan;
  plan.topk_ids_TK = torch::tensor(flat_ids, torch::kLong).reshape({T, K});
  plan.topk_weights_TK = torch::tensor(flat_w).reshape({T, K});
  plan.stats.tokens_per_expert_E = torch::bincount(plan.topk_ids_TK.reshape(-1), {}, E);
  plan.stats.aux_loss = plan.stats.seq_aux_loss = plan.stats.z_loss = plan.stats.entropy = torch::zeros({});
  plan.stats.dropped = torch::zeros({}, torch::kLong);
  return plan;
}

// The kept (t, k) copies a dispatch reports, after checking its rows are grouped by expert and are
// copies of the right tokens.
std::set<std::pair<int64_t, int64_t>> kept_copies(const moe::Dispatched& d, const torch::Tensor& x,
                                                  const moe::RoutingPlan& plan, int64_t E) {
  const int64_t K = plan.topk_ids_TK.size(1);
  auto order = to_ivec(d.handle.order_R);
  auto tokens = to_ivec(d.handle.token_ids_R);
  auto ids = to_ivec(plan.topk_ids_TK);
  auto counts = to_ivec(d.handle.counts_E);
  CATCH_REQUIRE(int64_t(counts.size()) == E);
  CATCH_REQUIRE(d.rows_RD.size(0) == int64_t(order.size()));
  CATCH_REQUIRE(std::accumulate(counts.begin(), counts.end(), int64_t(0)) == int64_t(order.size()));
  std::set<std::pair<int64_t, int64_t>> kept;
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < counts[e]; ++i, ++row) {
      CATCH_CHECK(ids[order[row]] == e);  // rows grouped by expert, ascending
      CATCH_CHECK(tokens[row] == order[row] / K);
      CATCH_CHECK(torch::equal(d.rows_RD[row], x[order[row] / K]));
      kept.insert({order[row] / K, order[row] % K});
    }
  }
  CATCH_CHECK(kept.size() == order.size());  // no copy twice
  return kept;
}
}  // namespace

CATCH_TEST_CASE("dispatch with a capacity drops exactly the lowest-weight copies, ties to later tokens", "[moe]") {
  CATCH_SECTION("6 tokens, E=2, K=1, capacity 3; a tie at the boundary") {
    // Expert 0 gets tokens 0 (.5), 1 (.9), 2 (.5), 4 (.7): keeps 1, 4 and 0 (earlier of the .5 tie).
    auto plan = hand_plan({{0}, {0}, {0}, {1}, {0}, {1}}, {{.5f}, {.9f}, {.5f}, {.3f}, {.7f}, {.2f}}, 2);
    auto x = torch::randn({6, 4});
    const int64_t cap = moe::expert_capacity(1.0, 6, 1, 2);
    CATCH_REQUIRE(cap == 3);
    auto d = moe::dispatch(x, plan, cap);
    auto kept = kept_copies(d, x, plan, 2);
    CATCH_CHECK(kept == std::set<std::pair<int64_t, int64_t>>{{0, 0}, {1, 0}, {3, 0}, {4, 0}, {5, 0}});
    CATCH_CHECK(to_ivec(d.handle.counts_E) == std::vector<int64_t>{3, 2});
    CATCH_CHECK(d.dropped.item<int64_t>() == 1);
    // combine: dropped token 2 gets nothing; the others their weight times their (identity-expert) row.
    auto out = moe::combine(d.rows_RD, d.handle, plan);
    auto w = torch::tensor({.5f, .9f, 0.f, .3f, .7f, .2f}).unsqueeze(1);
    CATCH_CHECK(torch::allclose(out, w * x, 1e-6, 1e-7));
  }
  CATCH_SECTION("4 tokens, E=3, K=2, capacity 2; a tie between (t=1,k=1) and (t=2,k=0)") {
    // Expert 0: (0,0) .6, (1,1) .5, (2,0) .5, (3,0) .2 -> keeps (0,0), (1,1); drops (2,0), (3,0).
    // Expert 1: (0,1) .4, (1,0) .5, (3,1) .8 -> keeps (3,1), (1,0); drops (0,1). Expert 2: (2,1) kept.
    auto plan = hand_plan({{0, 1}, {1, 0}, {0, 2}, {0, 1}}, {{.6f, .4f}, {.5f, .5f}, {.5f, .5f}, {.2f, .8f}}, 3);
    auto x = torch::randn({4, 4});
    const int64_t cap = moe::expert_capacity(0.75, 4, 2, 3);
    CATCH_REQUIRE(cap == 2);
    auto d = moe::dispatch(x, plan, cap);
    auto kept = kept_copies(d, x, plan, 3);
    CATCH_CHECK(kept == std::set<std::pair<int64_t, int64_t>>{{0, 0}, {1, 1}, {3, 1}, {1, 0}, {2, 1}});
    CATCH_CHECK(to_ivec(d.handle.counts_E) == std::vector<int64_t>{2, 2, 1});
    CATCH_CHECK(d.dropped.item<int64_t>() == 3);
    auto out = moe::combine(d.rows_RD, d.handle, plan);
    auto w = torch::tensor({.6f, 1.0f, .5f, .8f}).unsqueeze(1);  // kept weights summed per token
    CATCH_CHECK(torch::allclose(out, w * x, 1e-6, 1e-7));
  }
  CATCH_SECTION("a capacity no expert reaches drops nothing; dropless keeps token order within an expert") {
    auto plan = hand_plan({{1}, {0}, {1}, {1}}, {{.1f}, {.2f}, {.9f}, {.5f}}, 2);
    auto x = torch::randn({4, 4});
    auto d = moe::dispatch(x, plan, 3);
    CATCH_CHECK(d.dropped.item<int64_t>() == 0);
    CATCH_CHECK(kept_copies(d, x, plan, 2).size() == 4);  // (order within an expert is free here)
    auto dropless = moe::dispatch(x, plan);
    CATCH_CHECK(dropless.dropped.item<int64_t>() == 0);
    CATCH_CHECK(to_ivec(dropless.handle.order_R) == std::vector<int64_t>{1, 0, 2, 3});
  }
}

CATCH_TEST_CASE("MoE forward with a capacity equals the reference that skips dropped copies", "[moe]") {
  const int64_t B = 2, S = 12, T = B * S, D = 8;
  uint64_t seed = 400;
  struct V {
    std::optional<double> cf;
    std::string func;
    int n_groups, topk_groups;
    double bias_scale;
    int shared;
  };
  for (V v : {V{0.75, "softmax", 1, 1, 0.0, 1}, V{1.0, "sigmoid", 2, 1, 0.1, 0}, V{1.25, "sigmoid", 1, 1, 0.0, 1},
              V{std::nullopt, "sigmoid", 2, 1, 0.1, 1}, V{0.5, "softmax", 1, 1, 0.05, 0}}) {
    auto cfg = router_cfg(4, 2, v.func, v.func == "sigmoid", v.func == "sigmoid" ? 2.5 : 1.0);
    cfg.router.n_groups = v.n_groups;
    cfg.router.topk_groups = v.topk_groups;
    if (v.bias_scale > 0) cfg.router.bias_update_rate = 0.01;
    cfg.capacity_factor = v.cf;
    cfg.expert_hidden = 12;
    cfg.n_shared_experts = v.shared;
    cfg.shared_hidden = 8;
    cfg.aux_loss_coef = 0.01;
    cfg.seq_aux_loss_coef = 0.1;
    cfg.z_loss_coef = 0.001;
    CATCH_INFO(describe(cfg) << " cf=" << (v.cf ? std::to_string(*v.cf) : "null"));
    // Inputs where neither the selection nor the capacity cut is a near-tie.
    RouterCase c;
    std::set<std::pair<int64_t, int64_t>> dropped;
    const int64_t cap = v.cf ? ref_capacity(*v.cf, T, 2, 4) : T * 2;
    for (int attempt = 0;; ++attempt) {
      CATCH_REQUIRE(attempt < 50);
      c = draw_router_case(cfg, T, D, v.bias_scale, seed * 100 + attempt);
      bool tie = false;
      dropped = ref_dropped(c.ref.ids, c.ref.weights, 4, cap, &tie);
      if (!tie) break;
    }
    ++seed;
    if (v.cf) CATCH_CHECK(moe::expert_capacity(*v.cf, T, 2, 4) == cap);
    if (v.cf && *v.cf < 1.0) CATCH_REQUIRE(!dropped.empty());  // the case really drops something

    torch::manual_seed(seed);
    moe::MoE layer(cfg, D);
    {
      torch::NoGradGuard g;
      for (auto& p : layer->parameters()) p.normal_(0, 0.3);
    }
    load_router(*layer->router, c);
    auto got = layer->forward(c.x, S, std::nullopt);
    auto want = ref_moe(*layer, to_mat(c.x), c.ref, dropped);
    CATCH_CHECK(got.out_TD.sizes() == torch::IntArrayRef({T, D}));
    CATCH_CHECK(max_abs_diff(want, got.out_TD) <= 1e-5);
    CATCH_CHECK(got.stats.dropped.item<int64_t>() == int64_t(dropped.size()));
    auto st = ref_stats(c.ref, S, 4, 2);
    CATCH_CHECK(to_ivec(got.stats.tokens_per_expert_E) == st.counts);  // before capacity
    const double balance = 0.01 * st.aux + 0.1 * st.seq_aux + 0.001 * st.z;
    CATCH_CHECK(got.balance_loss.item<double>() == Approx(balance).epsilon(1e-5));
    CATCH_CHECK(got.balance_loss.scalar_type() == torch::kFloat);
  }
}

// ===================================================================================================
// 4. Expert implementations.

namespace {
struct ExpertGrads {
  Mat out;  // (R, D)
  std::vector<double> dw1, dw3, dw2, dx;  // flat, shapes of w1, w3, w2 and rows
};

// Forward and backward of loss = sum(out * G) by hand, row by row.
ExpertGrads ref_experts(const Mat& rows, const std::vector<int64_t>& counts, const Dense& w1, const Dense& w3,
                        const Dense& w2, const Mat& G) {
  const int64_t E = counts.size(), D = w1.a, F = w1.b;
  ExpertGrads r;
  r.dw1.assign(E * D * F, 0);
  r.dw3.assign(E * D * F, 0);
  r.dw2.assign(E * F * D, 0);
  r.dx.assign(rows.size() * D, 0);
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < counts[e]; ++i, ++row) {
      const auto& x = rows[row];
      std::vector<double> a(F, 0), b(F, 0), h(F), y(D, 0), dh(F, 0);
      for (int64_t f = 0; f < F; ++f)
        for (int64_t d = 0; d < D; ++d) a[f] += x[d] * w1.at(e, d, f), b[f] += x[d] * w3.at(e, d, f);
      for (int64_t f = 0; f < F; ++f) h[f] = a[f] * sigmoid(a[f]) * b[f];
      for (int64_t d = 0; d < D; ++d)
        for (int64_t f = 0; f < F; ++f) y[d] += h[f] * w2.at(e, f, d);
      r.out.push_back(y);
      for (int64_t f = 0; f < F; ++f)
        for (int64_t d = 0; d < D; ++d) {
          dh[f] += G[row][d] * w2.at(e, f, d);
          r.dw2[(e * F + f) * D + d] += h[f] * G[row][d];
        }
      for (int64_t f = 0; f < F; ++f) {
        const double s = sigmoid(a[f]);
        const double da = dh[f] * b[f] * s * (1 + a[f] * (1 - s));
        const double db = dh[f] * a[f] * s;
        for (int64_t d = 0; d < D; ++d) {
          r.dw1[(e * D + d) * F + f] += x[d] * da;
          r.dw3[(e * D + d) * F + f] += x[d] * db;
          r.dx[row * D + d] += da * w1.at(e, d, f) + db * w3.at(e, d, f);
        }
      }
    }
  }
  return r;
}

double max_diff(const std::vector<double>& a, const torch::Tensor& b) {
  auto v = to_vec(b);
  if (v.size() != a.size()) return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - v[i]) / std::max(1.0, std::abs(a[i])));
  return worst;
}
}  // namespace

CATCH_TEST_CASE("experts: grouped_mm, sliced and a naive loop agree forward and backward", "[moe]") {
  const int64_t E = 6, D = 8, F = 12;
  for (std::vector<int64_t> counts : {std::vector<int64_t>{0, 3, 0, 5, 2, 0}, std::vector<int64_t>{1, 1, 1, 1, 1, 1},
                                      std::vector<int64_t>{0, 0, 0, 0, 7, 0}}) {
    const int64_t R = std::accumulate(counts.begin(), counts.end(), int64_t(0));
    torch::manual_seed(500 + R);
    auto w1 = torch::randn({E, D, F}) * 0.3, w3 = torch::randn({E, D, F}) * 0.3, w2 = torch::randn({E, F, D}) * 0.3;
    auto rows = torch::randn({R, D});
    auto G = torch::randn({R, D});
    auto want = ref_experts(to_mat(rows), counts, Dense(w1), Dense(w3), Dense(w2), to_mat(G));
    auto counts_E = torch::tensor(counts, torch::kLong);
    for (std::string impl : {"grouped_mm", "sliced", "auto"}) {
      for (int direct = 0; direct < 2; ++direct) {
        if (direct && impl == "auto") continue;
        CATCH_INFO(impl << (direct ? " (forward_" + impl + " called directly)" : " (forward)") << " R=" << R);
        moe::Experts experts(E, D, F, impl);
        {
          torch::NoGradGuard g;
          experts->w1.copy_(w1), experts->w3.copy_(w3), experts->w2.copy_(w2);
        }
        auto x = rows.clone().requires_grad_(true);
        auto out = !direct ? experts->forward(x, counts_E, std::nullopt)
                   : impl == "sliced" ? experts->forward_sliced(x, counts_E, std::nullopt)
                                      : experts->forward_grouped(x, counts_E, std::nullopt);
        CATCH_REQUIRE(out.sizes() == torch::IntArrayRef({R, D}));
        CATCH_CHECK(max_abs_diff(want.out, out) <= 1e-5);
        (out * G).sum().backward();
        CATCH_CHECK(max_diff(want.dw1, experts->w1.grad()) <= 1e-5);
        CATCH_CHECK(max_diff(want.dw3, experts->w3.grad()) <= 1e-5);
        CATCH_CHECK(max_diff(want.dw2, experts->w2.grad()) <= 1e-5);
        CATCH_CHECK(max_diff(want.dx, x.grad()) <= 1e-5);
        for (int64_t e = 0; e < E; ++e) {
          if (counts[e] != 0) continue;
          CATCH_INFO("empty expert " << e);
          CATCH_CHECK(experts->w1.grad()[e].abs().max().item<double>() == 0.0);
          CATCH_CHECK(experts->w3.grad()[e].abs().max().item<double>() == 0.0);
          CATCH_CHECK(experts->w2.grad()[e].abs().max().item<double>() == 0.0);
        }
      }
    }
  }
}

CATCH_TEST_CASE("experts: zero rows in total give a (0, D) output and no gradient", "[moe]") {
  const int64_t E = 4, D = 8, F = 12;
  for (std::string impl : {"grouped_mm", "sliced", "auto"}) {
    CATCH_INFO(impl);
    moe::Experts experts(E, D, F, impl);
    {
      torch::NoGradGuard g;
      for (auto& p : experts->parameters()) p.normal_(0, 0.3);
    }
    auto x = torch::zeros({0, D}).requires_grad_(true);
    auto counts = torch::zeros({E}, torch::kLong);
    // forward() and forward_sliced(); forward_grouped() is not called directly with zero rows: the
    // backward of at::_grouped_mm rejects empty inputs, and forward() does not send them there.
    for (int which = 0; which < 2; ++which) {
      CATCH_INFO(which);
      experts->zero_grad();
      auto out = which == 0 ? experts->forward(x, counts, std::nullopt) : experts->forward_sliced(x, counts, std::nullopt);
      CATCH_CHECK(out.sizes() == torch::IntArrayRef({0, D}));
      CATCH_CHECK(out.scalar_type() == torch::kFloat);
      // Backward through an empty call must not throw; any gradient it leaves is zero.
      auto loss = out.sum() + x.sum() * 0;
      CATCH_CHECK_NOTHROW(loss.backward());
      for (auto& p : experts->parameters())
        if (p.grad().defined()) CATCH_CHECK(p.grad().abs().max().item<double>() == 0.0);
    }
  }
  // The whole layer on zero tokens.
  config::MoEConfig cfg;
  cfg.n_experts = 4;
  cfg.top_k = 2;
  cfg.expert_hidden = 12;
  cfg.seq_aux_loss_coef = 0.1;
  cfg.z_loss_coef = 0.01;
  for (std::optional<double> cf : {std::optional<double>{}, std::optional<double>{1.0}}) {
    cfg.capacity_factor = cf;
    moe::MoE layer(cfg, D);
    {
      torch::NoGradGuard g;
      for (auto& p : layer->parameters()) p.normal_(0, 0.3);
    }
    auto out = layer->forward(torch::zeros({0, D}), 4, std::nullopt);
    CATCH_CHECK(out.out_TD.sizes() == torch::IntArrayRef({0, D}));
    CATCH_CHECK(std::isfinite(out.balance_loss.item<double>()));
    CATCH_CHECK(out.stats.tokens_per_expert_E.sum().item<int64_t>() == 0);
  }
}

// ===================================================================================================
// 5. Aux-loss-free balancing.

CATCH_TEST_CASE("router: update_bias steps by rate * sign(mean load - load)", "[moe]") {
  auto cfg = router_cfg(4, 2, "sigmoid", true, 1.0);
  cfg.router.bias_update_rate = 0.25;
  moe::Router router(cfg, 4);
  {
    torch::NoGradGuard g;
    router->expert_bias.copy_(torch::tensor({0.5f, 0.0f, -0.5f, 1.0f}));
  }
  router->update_bias(torch::tensor({5, 1, 3, 3}, torch::kLong));  // mean 3
  CATCH_CHECK(to_vec(router->expert_bias) == std::vector<double>{0.25, 0.25, -0.5, 1.0});
  router->update_bias(torch::tensor({2.0f, 2.0f, 2.0f, 6.0f}));  // mean 3
  CATCH_CHECK(to_vec(router->expert_bias) == std::vector<double>{0.5, 0.5, -0.25, 0.75});
  CATCH_CHECK_FALSE(router->expert_bias.requires_grad());

  // Rate 0: no bias, and update_bias is a no-op that does not throw.
  moe::Router off(router_cfg(4, 2, "sigmoid", true, 1.0), 4);
  CATCH_CHECK_FALSE(off->expert_bias.defined());
  CATCH_CHECK_NOTHROW(off->update_bias(torch::tensor({5, 1, 3, 3}, torch::kLong)));
}

CATCH_TEST_CASE("router: aux-loss-free bias updates move a skewed routing toward balance", "[moe]") {
  const int64_t T = 256, D = 16, E = 8, K = 2;
  auto cfg = router_cfg(E, K, "sigmoid", true, 1.0);
  cfg.router.bias_update_rate = 0.01;
  moe::Router router(cfg, D);
  torch::manual_seed(600);
  auto x = torch::randn({T, D});
  {
    torch::NoGradGuard g;
    x.select(1, 0).add_(3.0);  // every token shares a feature that experts 0 and 1 favour
    router->weight.copy_(torch::randn({E, D}) * 0.3);
    // Not so strong that experts 0 and 1 saturate: a saturated sigmoid gives every token the same
    // score, so whole blocks of tokens flip together and the sign update ends in a wide limit cycle.
    router->weight[0][0] = 1.0;
    router->weight[1][0] = 1.0;
    router->expert_bias.zero_();
  }
  auto imbalance = [&](const torch::Tensor& load) {
    auto l = to_vec(load);
    return *std::max_element(l.begin(), l.end()) / (double(T * K) / double(E));
  };
  auto plan = router->route(x, T);
  const double initial = imbalance(plan.stats.tokens_per_expert_E);
  CATCH_REQUIRE(initial > 2.5);  // experts 0 and 1 take most copies
  auto weight_before = router->weight.clone();
  double final_imbalance = initial;
  for (int step = 0; step < 200; ++step) {
    router->update_bias(plan.stats.tokens_per_expert_E);
    plan = router->route(x, T);
    final_imbalance = imbalance(plan.stats.tokens_per_expert_E);
  }
  CATCH_INFO("max/mean load: initial " << initial << ", final " << final_imbalance);
  CATCH_CHECK(final_imbalance < 0.6 * initial);
  CATCH_CHECK(final_imbalance < 1.5);
  CATCH_CHECK(torch::equal(router->weight, weight_before));  // the bias, not the weight, moved
  // The bias went down for the favoured experts and the weights still come from the unbiased scores.
  auto bias = to_vec(router->expert_bias);
  CATCH_CHECK(bias[0] < 0);
  CATCH_CHECK(bias[1] < 0);
}

// ===================================================================================================
// 6. Config validation.

namespace {
std::string config_error(const std::vector<std::string>& overrides, const std::string& yaml = "") {
  try {
    config::parse_config(yaml, "t.yaml", overrides);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}
}  // namespace

CATCH_TEST_CASE("config: MoE routing keys are validated and name the key", "[moe]") {
  CATCH_CHECK_THAT(config_error({"model.moe.n_experts=4", "model.moe.top_k=5"}),
                   Contains("model.moe.top_k") && Contains("model.moe.n_experts"));
  CATCH_CHECK_THAT(config_error({"model.moe.n_experts=6", "model.moe.router.n_groups=4"}),
                   Contains("model.moe.router.n_groups") && Contains("model.moe.n_experts"));
  CATCH_CHECK_THAT(config_error({"model.moe.router.n_groups=2", "model.moe.router.topk_groups=3"}),
                   Contains("model.moe.router.topk_groups"));
  // top_k larger than the experts that group limiting leaves eligible.
  CATCH_CHECK_THAT(config_error({"model.moe.n_experts=8", "model.moe.top_k=3", "model.moe.router.n_groups=4",
                                 "model.moe.router.topk_groups=1"}),
                   Contains("model.moe.top_k"));
  CATCH_CHECK_THAT(config_error({"model.moe.capacity_factor=0"}), Contains("model.moe.capacity_factor"));
  CATCH_CHECK_THAT(config_error({"model.moe.capacity_factor=-1.5"}), Contains("model.moe.capacity_factor"));
  CATCH_CHECK_THAT(config_error({"model.moe.router.score_func=relu"}), Contains("model.moe.router.score_func"));
  CATCH_CHECK_THAT(config_error({"model.moe.experts_impl=fast"}), Contains("model.moe.experts_impl"));
  // Valid combinations pass.
  CATCH_CHECK(config_error({"model.moe.n_experts=8", "model.moe.top_k=3", "model.moe.router.n_groups=4",
                            "model.moe.router.topk_groups=2", "model.moe.router.score_func=sigmoid",
                            "model.moe.router.bias_update_rate=0.001"}) == "(no error)");
}

CATCH_TEST_CASE("config: capacity_factor null means dropless and round-trips through to_yaml", "[moe]") {
  auto dflt = config::parse_config("", "t.yaml");
  CATCH_CHECK_FALSE(dflt.model.moe.capacity_factor.has_value());
  auto null_yaml = config::parse_config("model:\n  moe:\n    capacity_factor: null\n", "t.yaml");
  CATCH_CHECK_FALSE(null_yaml.model.moe.capacity_factor.has_value());
  auto set = config::parse_config("model:\n  moe:\n    capacity_factor: 1.25\n", "t.yaml");
  CATCH_REQUIRE(set.model.moe.capacity_factor.has_value());
  CATCH_CHECK(*set.model.moe.capacity_factor == 1.25);
  // An override can set it back to null.
  auto back_to_null = config::parse_config("model:\n  moe:\n    capacity_factor: 1.25\n", "t.yaml",
                                           {"model.moe.capacity_factor=null"});
  CATCH_CHECK_FALSE(back_to_null.model.moe.capacity_factor.has_value());

  auto rt_null = config::parse_config(config::to_yaml(null_yaml), "round-trip");
  CATCH_CHECK_FALSE(rt_null.model.moe.capacity_factor.has_value());
  auto rt_set = config::parse_config(config::to_yaml(set), "round-trip");
  CATCH_REQUIRE(rt_set.model.moe.capacity_factor.has_value());
  CATCH_CHECK(*rt_set.model.moe.capacity_factor == 1.25);
  CATCH_CHECK(config::flatten(rt_set) == config::flatten(set));
  // The router section round-trips too.
  auto routed = config::parse_config("", "t.yaml",
                                     {"model.moe.router.score_func=sigmoid", "model.moe.router.routed_scaling=2.5",
                                      "model.moe.router.n_groups=4", "model.moe.router.topk_groups=2",
                                      "model.moe.router.normalize_topk=false", "model.moe.router.bias_update_rate=0.001"});
  auto rt_routed = config::parse_config(config::to_yaml(routed), "round-trip");
  CATCH_CHECK(rt_routed.model.moe.router.score_func == "sigmoid");
  CATCH_CHECK(rt_routed.model.moe.router.routed_scaling == 2.5);
  CATCH_CHECK(rt_routed.model.moe.router.n_groups == 4);
  CATCH_CHECK(rt_routed.model.moe.router.topk_groups == 2);
  CATCH_CHECK_FALSE(rt_routed.model.moe.router.normalize_topk);
  CATCH_CHECK(rt_routed.model.moe.router.bias_update_rate == 0.001);
}

