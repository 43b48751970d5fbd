// Node-limited routing (model.moe.router.max_groups_per_token) against a naive reference written
// here: loops over tokens, groups and experts in double precision, no calls into the code under test.
// The groups come from the config as a loaded run derives them (parallel.expert_parallel and
// parallel.ranks_per_node), and every config check of the new keys names its key.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "common/errors.h"
#include "config/config.h"
#include "moe/router.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

std::vector<double> flat(const torch::Tensor& t) {
  auto c = t.detach().to(torch::kCPU, torch::kDouble).contiguous().reshape(-1);
  return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
}

struct Reference {
  std::vector<std::vector<int64_t>> ids;     // (T, K), best first
  std::vector<std::vector<double>> weights;  // (T, K)
  std::vector<bool> decided;                 // false where a near-tie decides the token's choice
};

bool near(double a, double b) { return std::abs(a - b) <= 1e-5 * std::max(std::abs(a), std::abs(b)) + 1e-7; }

// x (T, D), w (E, D) row-major; bias empty or (E). Groups are G contiguous blocks of E / G experts.
Reference reference(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& bias,
                    int64_t T, int64_t D, int64_t E, int64_t K, int64_t G, int64_t M, bool sigmoid, double scaling) {
  Reference ref;
  const int64_t n = E / G, best = (K + M - 1) / M;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> score(E), sel(E);
    double max_logit = -1e300, z = 0;
    std::vector<double> logit(E);
    for (int64_t e = 0; e < E; ++e) {
      logit[e] = 0;
      for (int64_t d = 0; d < D; ++d) logit[e] += x[t * D + d] * w[e * D + d];
      max_logit = std::max(max_logit, logit[e]);
    }
    for (int64_t e = 0; e < E; ++e) z += std::exp(logit[e] - max_logit);
    for (int64_t e = 0; e < E; ++e) {
      score[e] = sigmoid ? 1.0 / (1.0 + std::exp(-logit[e])) : std::exp(logit[e] - max_logit) / z;
      sel[e] = score[e] + (bias.empty() ? 0.0 : bias[e]);
    }
    bool decided = true;
    // Each group's score: the sum of its `best` highest selection scores.
    std::vector<std::pair<double, int64_t>> groups;
    for (int64_t g = 0; g < G; ++g) {
      std::vector<double> members;
      for (int64_t e = g * n; e < (g + 1) * n; ++e) members.push_back(sel[e]);
      std::sort(members.begin(), members.end(), std::greater<double>());
      double sum = 0;
      for (int64_t i = 0; i < best; ++i) sum += members[size_t(i)];
      groups.push_back({sum, g});
    }
    std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    if (M < G && near(groups[size_t(M - 1)].first, groups[size_t(M)].first)) decided = false;
    std::vector<std::pair<double, int64_t>> eligible;
    for (int64_t i = 0; i < M; ++i)
      for (int64_t e = groups[size_t(i)].second * n; e < (groups[size_t(i)].second + 1) * n; ++e)
        eligible.push_back({sel[e], e});
    std::sort(eligible.begin(), eligible.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (int64_t k = 0; k < K && k + 1 < int64_t(eligible.size()); ++k)
      if (near(eligible[size_t(k)].first, eligible[size_t(k + 1)].first)) decided = false;
    std::vector<int64_t> ids;
    std::vector<double> weights;
    double sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      ids.push_back(eligible[size_t(k)].second);
      weights.push_back(score[size_t(eligible[size_t(k)].second)]);
      sum += weights.back();
    }
    for (auto& v : weights) v = v / sum * scaling;
    ref.ids.push_back(ids);
    ref.weights.push_back(weights);
    ref.decided.push_back(decided);
  }
  return ref;
}

config::Config node_limited_config(int E, int K, int M, int ep, int ranks_per_node, const std::string& score_func,
                                   bool bias) {
  std::vector<std::string> sets = {"model.moe.n_experts=" + std::to_string(E), "model.moe.top_k=" + std::to_string(K),
                                   "model.moe.router.max_groups_per_token=" + std::to_string(M),
                                   "parallel.expert_parallel=" + std::to_string(ep),
                                   "parallel.ranks_per_node=" + std::to_string(ranks_per_node),
                                   "model.moe.router.score_func=" + score_func, "model.moe.router.routed_scaling=2.5"};
  if (bias) sets.push_back("model.moe.router.selection_bias=true");
  return config::parse_config("", "node-limited.yaml", sets);
}

std::string config_error(const std::vector<std::string>& overrides) {
  try {
    config::parse_config("", "t.yaml", overrides);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

CATCH_TEST_CASE("router: node-limited routing equals the naive reference over EP ranks and nodes", "[moe]") {
  struct Case {
    int E, K, M, ep, ranks_per_node, groups;
  };
  const int64_t T = 96, D = 16;
  uint64_t seed = 1;
  for (Case c : {Case{8, 2, 1, 2, 0, 2}, Case{8, 4, 2, 4, 0, 4}, Case{16, 4, 1, 4, 0, 4}, Case{16, 6, 3, 8, 0, 8},
                 Case{16, 8, 2, 8, 2, 4}, Case{32, 8, 4, 8, 0, 8}, Case{24, 3, 2, 6, 3, 2}, Case{8, 3, 2, 4, 0, 4}}) {
    for (std::string func : {"sigmoid", "softmax"}) {
      for (bool bias : {false, true}) {
        const auto cfg = node_limited_config(c.E, c.K, c.M, c.ep, c.ranks_per_node, func, bias);
        CATCH_INFO("E " << c.E << " K " << c.K << " M " << c.M << " ep " << c.ep << " ranks_per_node "
                        << c.ranks_per_node << " " << func << (bias ? " with a selection bias" : ""));
        CATCH_REQUIRE(cfg.model.moe.router.expert_groups == c.groups);
        torch::manual_seed(seed++);
        moe::Router router(cfg.model.moe, D);
        const auto x = torch::randn({T, D}), w = torch::randn({c.E, D});
        const auto b = torch::randn({c.E}) * 0.1;
        {
          torch::NoGradGuard no_grad;
          router->weight.copy_(w);
          if (bias) router->expert_bias.copy_(b);
        }
        const auto ref = reference(flat(x), flat(w), bias ? flat(b) : std::vector<double>{}, T, D, c.E, c.K, c.groups,
                                   c.M, func == "sigmoid", 2.5);
        const auto plan = router->route(x, T);
        const auto ids = plan.topk_ids_TK.contiguous();
        const auto weights = flat(plan.topk_weights_TK);
        int64_t checked = 0, mismatched = 0;
        const int64_t per_group = c.E / c.groups;
        for (int64_t t = 0; t < T; ++t) {
          std::set<int64_t> groups;
          for (int64_t k = 0; k < c.K; ++k) groups.insert(ids[t][k].item<int64_t>() / per_group);
          CATCH_CHECK(int(groups.size()) <= c.M);  // whatever the ties: at most M groups
          if (!ref.decided[size_t(t)]) continue;
          ++checked;
          for (int64_t k = 0; k < c.K; ++k) {
            const bool same_id = ids[t][k].item<int64_t>() == ref.ids[size_t(t)][size_t(k)];
            const bool same_weight = std::abs(weights[size_t(t * c.K + k)] - ref.weights[size_t(t)][size_t(k)]) <=
                                     1e-5 * std::abs(ref.weights[size_t(t)][size_t(k)]);
            if (!(same_id && same_weight) && mismatched++ < 3)
              CATCH_FAIL_CHECK("token " << t << " k " << k << ": expert " << ids[t][k].item<int64_t>() << " weight "
                                        << weights[size_t(t * c.K + k)] << ", want " << ref.ids[size_t(t)][size_t(k)]
                                        << " weight " << ref.weights[size_t(t)][size_t(k)]);
          }
        }
        CATCH_CHECK(mismatched == 0);
        CATCH_CHECK(checked >= T * 9 / 10);  // near-ties are rare in random scores
      }
    }
  }
}

CATCH_TEST_CASE("router: node limiting changes the choice where the best experts are spread over groups", "[moe]") {
  // 8 experts in 4 groups of 2, K = 2, M = 1: the two best experts (0 and 2) lie in different groups;
  // group 1 (experts 2, 3) has the best pair sum, so the token gets experts 2 and 3, not 0 and 2.
  auto cfg = node_limited_config(8, 2, 1, 4, 0, "sigmoid", true);
  // A router whose scores are the selection bias alone: every token sees the same eight scores.
  auto route = [](const config::MoEConfig& moe) {
    moe::Router router(moe, 1);
    torch::NoGradGuard no_grad;
    router->weight.zero_();
    router->expert_bias.copy_(torch::tensor({0.9f, 0.0f, 0.8f, 0.7f, 0.1f, 0.1f, 0.2f, 0.2f}));
    return router->route(torch::ones({1, 1}), 1).topk_ids_TK;
  };
  const auto ids = route(cfg.model.moe);
  CATCH_CHECK(ids[0][0].item<int64_t>() == 2);
  CATCH_CHECK(ids[0][1].item<int64_t>() == 3);
  cfg.model.moe.router.max_groups_per_token = 2;  // two groups: the two best experts
  const auto ids_two = route(cfg.model.moe);
  CATCH_CHECK(ids_two[0][0].item<int64_t>() == 0);
  CATCH_CHECK(ids_two[0][1].item<int64_t>() == 2);
}

CATCH_TEST_CASE("config: node-limited routing keys are validated and name the key", "[moe][config]") {
  // The groups: one per EP rank, or one per node of ranks_per_node ranks.
  CATCH_CHECK(config::parse_config("", "t.yaml", {"parallel.expert_parallel=4"}).model.moe.router.expert_groups == 4);
  CATCH_CHECK(config::parse_config("", "t.yaml", {"parallel.expert_parallel=4", "parallel.ranks_per_node=2"})
                  .model.moe.router.expert_groups == 2);
  CATCH_CHECK(config_error({"model.moe.router.max_groups_per_token=-1"}) ==
              "[config] model.moe.router.max_groups_per_token = -1 must be >= 0");
  CATCH_CHECK(config_error({"parallel.expert_parallel=4", "parallel.ranks_per_node=3"}) ==
              "[config] parallel.ranks_per_node = 3 must divide parallel.expert_parallel = 4 (a node holds whole EP ranks)");
  CATCH_CHECK(config_error({"parallel.ranks_per_node=-2"}) == "[config] parallel.ranks_per_node = -2 must be >= 0");
  CATCH_CHECK(config_error({"parallel.expert_parallel=4", "model.moe.router.max_groups_per_token=2",
                            "model.moe.router.n_groups=2"}) ==
              "[config] model.moe.router.max_groups_per_token = 2 and model.moe.router.n_groups = 2 cannot both limit "
              "the routing: set max_groups_per_token = 0 or n_groups = 1");
  CATCH_CHECK(config_error({"parallel.expert_parallel=2", "model.moe.router.max_groups_per_token=3"}) ==
              "[config] model.moe.router.max_groups_per_token = 3 must be at most the expert groups, "
              "parallel.expert_parallel = 2");
  CATCH_CHECK(config_error({"parallel.expert_parallel=8", "parallel.ranks_per_node=4",
                            "model.moe.router.max_groups_per_token=3"}) ==
              "[config] model.moe.router.max_groups_per_token = 3 must be at most the nodes, parallel.expert_parallel / "
              "parallel.ranks_per_node = 8 / 4 = 2");
  CATCH_CHECK(config_error({"parallel.expert_parallel=8", "model.moe.top_k=3", "model.moe.router.max_groups_per_token=2"}) ==
              "[config] model.moe.top_k = 3 must be at most the experts eligible per token, "
              "model.moe.router.max_groups_per_token * model.moe.n_experts / groups = 2 * 8 / 8 = 2");
  // Groups that do not divide the experts: only a config built in code can say so (parse derives the
  // groups from expert_parallel, which must divide n_experts itself).
  config::Config built;
  built.model.moe.router.max_groups_per_token = 1;
  built.model.moe.router.expert_groups = 3;
  CATCH_CHECK_THROWS_WITH(config::validate(built),
                          "[config] model.moe.n_experts = 8 must be divisible by the router's expert_groups = 3 "
                          "(model.moe.router.max_groups_per_token groups experts by rank)");
  CATCH_CHECK(config_error({"parallel.expert_parallel=8", "parallel.ranks_per_node=2", "model.moe.top_k=4",
                            "model.moe.router.max_groups_per_token=2"}) == "(no error)");
  // A config that was never derived (built in code, max_groups_per_token set) is refused by the router.
  config::MoEConfig raw;
  raw.router.max_groups_per_token = 2;
  CATCH_CHECK_THROWS_WITH(moe::Router(raw, 4), Contains("model.moe.router.max_groups_per_token = 2") &&
                                                  Contains("parallel.expert_parallel"));
}
