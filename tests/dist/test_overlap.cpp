// Gradient reduction overlapped with backward (parallel.overlap_grad_reduce): the reducer's fixed
// bucket order and its hooks in one process, then training runs whose gradients are reduced during
// backward against the same runs reducing after it, bit for bit, at data-parallel, expert-parallel,
// ZeRO-1 and pipeline layouts in real processes.
#include <catch2/catch.hpp>

#include <cmath>
#include <cctype>
#include <string>
#include <vector>

#include "common/errors.h"
#include "dist/data_parallel.h"
#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;
using Catch::Matchers::Contains;

namespace {

// Five leaves a..e whose gradients are 1, 2, 3, 4, 5 everywhere when `reach` says the loss uses them,
// and a reducer over them whose launches and completions land in `log`:
//   bucket 0 {a, b}, bucket 1 {c}, bucket 2 {d}, bucket 3 {e} (after backward).
struct Bench {
  std::vector<torch::Tensor> params;
  std::vector<std::string> log;
  std::unique_ptr<dist::GradientReducer> reducer;

  explicit Bench(bool overlap) {
    for (int i = 0; i < 5; ++i) params.push_back(torch::zeros({3}, torch::kDouble).requires_grad_(true));
    const std::vector<std::vector<size_t>> members = {{0, 1}, {2}, {3}, {4}};
    std::vector<dist::GradientReducer::Bucket> buckets;
    for (size_t b = 0; b < members.size(); ++b) {
      dist::GradientReducer::Bucket bucket;
      bucket.members = members[b];
      bucket.after_backward = b == 3;
      bucket.launch = [this, b] {
        log.push_back("launch " + std::to_string(b));
        return std::unique_ptr<dist::Pending>();
      };
      bucket.complete = [this, b] { log.push_back("complete " + std::to_string(b)); };
      buckets.push_back(std::move(bucket));
    }
    reducer = std::make_unique<dist::GradientReducer>(params, std::vector<std::string>{"a", "b", "c", "d", "e"},
                                                      std::move(buckets), overlap);
  }

  void backward(const std::vector<bool>& reach) {
    auto loss = torch::zeros({}, torch::kDouble);
    for (size_t i = 0; i < params.size(); ++i)
      if (reach[i]) loss = loss + (params[i] * double(i + 1)).sum();
    loss.backward();
  }

  double finish() {  // the reducer's device scalar, read here
    return reducer->finish([this] { log.push_back("tie"); }).item<double>();
  }
};

const std::vector<bool> kAll = {true, true, true, true, true};

}  // namespace

CATCH_TEST_CASE("Gradient buckets: launched in one fixed order as backward completes them, the rest after it",
                "[dist][overlap]") {
  using Log = std::vector<std::string>;
  const Log after_backward = {"launch 2", "launch 1", "launch 0", "tie", "launch 3",
                              "complete 2", "complete 1", "complete 0", "complete 3"};
  CATCH_SECTION("armed: the buckets backward completes leave during it, last parameters first") {
    Bench bench(/*overlap=*/true);
    bench.reducer->arm();
    bench.backward(kAll);
    CATCH_CHECK(bench.log == Log{"launch 2", "launch 1", "launch 0"});  // before finish(): during backward
    CATCH_CHECK(bench.finish() == 5.0);  // the largest |gradient| before reduction, e's included
    CATCH_CHECK(bench.log == after_backward);
    CATCH_CHECK(bench.reducer->launched_during_backward() == 3);
    CATCH_CHECK(bench.reducer->bucket_count() == 4);
  }
  CATCH_SECTION("not armed (an earlier micro-batch), or without overlap: everything waits for finish()") {
    for (bool overlap : {true, false}) {
      Bench bench(overlap);
      bench.backward(kAll);  // micro-batch 0: its gradients only accumulate
      CATCH_CHECK(bench.log.empty());
      bench.reducer->arm();
      bench.backward(kAll);  // the last micro-batch
      CATCH_CHECK(bench.log.size() == (overlap ? 3u : 0u));
      CATCH_CHECK(bench.finish() == 10.0);  // two micro-batches of e's 5
      CATCH_CHECK(bench.log == after_backward);
      CATCH_CHECK(bench.params[0].grad().equal(torch::full({3}, 2.0, torch::kDouble)));
    }
  }
  CATCH_SECTION("a parameter backward did not reach holds back its bucket and every later one, then is zero") {
    Bench bench(/*overlap=*/true);
    bench.reducer->arm();
    bench.backward({true, true, true, false, true});  // d (bucket 2, first in the order) unreached
    CATCH_CHECK(bench.log.empty());
    bench.finish();
    CATCH_CHECK(bench.log == after_backward);
    CATCH_CHECK(bench.params[3].grad().equal(torch::zeros({3}, torch::kDouble)));
    CATCH_CHECK(bench.reducer->launched_during_backward() == 0);
  }
  CATCH_SECTION("the next step starts afresh") {
    Bench bench(/*overlap=*/true);
    for (int step = 0; step < 3; ++step) {
      bench.log.clear();
      for (auto& p : bench.params) p.mutable_grad() = torch::Tensor();
      bench.reducer->arm();
      bench.backward(kAll);
      CATCH_CHECK(bench.log.size() == 3);
      bench.finish();
      CATCH_CHECK(bench.log == after_backward);
    }
  }
  CATCH_SECTION("a NaN gradient is reported before any reduction") {
    Bench bench(/*overlap=*/true);
    bench.params[1].register_hook([](const torch::Tensor& g) {
      auto bad = g.clone();
      bad[1] = std::nan("");
      return bad;
    });
    bench.reducer->arm();
    bench.backward(kAll);
    CATCH_CHECK(std::isnan(bench.finish()));
  }
  CATCH_SECTION("a gradient accumulated again after its bucket left is an error naming the parameter") {
    Bench bench(/*overlap=*/true);
    bench.reducer->arm();
    bench.backward(kAll);
    // The first of them autograd reaches again is named (d, c, b or a: e's bucket waits for finish()).
    CATCH_CHECK_THROWS_WITH(bench.backward(kAll), Contains("was accumulated again after its bucket was reduced") &&
                                                      Contains("overlap_grad_reduce: false"));
  }
}

namespace {

// K of the run's first-step log line "... gradient reduction: N buckets per step (...), K launched
// during backward".
int overlapped_buckets(const std::string& output) {
  const auto at = output.find(" launched during backward");
  CATCH_REQUIRE(at != std::string::npos);
  CATCH_REQUIRE(output.rfind("gradient reduction: ", at) != std::string::npos);
  auto begin = at;
  while (begin > 0 && std::isdigit(static_cast<unsigned char>(output[begin - 1]))) --begin;
  CATCH_REQUIRE(begin < at);
  return std::stoi(output.substr(begin, at - begin));
}

}  // namespace

CATCH_TEST_CASE("Gradient reduction during backward trains bit for bit as reduction after it: (2,1), (4,2) ZeRO-1, "
                "(pp 2, dp 2, ep 2) tied",
                "[dist][overlap][train]") {
  testing::TempDir dir("overlap");
  const auto data_dir = testing::make_corpus(dir);
  struct Case {
    int world, ep, zero, pp;
  };
  for (const auto& c : std::vector<Case>{{2, 1, 0, 1}, {4, 2, 1, 1}, {4, 2, 0, 2}}) {
    const std::string name = "w" + std::to_string(c.world) + "ep" + std::to_string(c.ep) + "zero" +
                             std::to_string(c.zero) + "pp" + std::to_string(c.pp);
    CATCH_INFO(name);
    std::vector<Run> runs;
    for (bool overlap : {false, true}) {
      auto cfg = equivalence_config(data_dir, dir.str(name + (overlap ? "-overlap" : "-after")));
      cfg.train.steps = 8;
      cfg.optim.decay_steps = 8;
      cfg.model.n_layers = 2 * c.pp;
      cfg.model.tie_embeddings = c.pp > 1;
      cfg.parallel.zero = c.zero;
      cfg.parallel.pipeline_parallel = c.pp;
      cfg.parallel.overlap_grad_reduce = overlap;
      cfg.parallel.grad_bucket_mb = 0.004;  // 4 KiB: a bucket or two per weight matrix, many per step
      runs.push_back(train_at(cfg, c.world, c.ep));
      const auto& run = runs.back();
      CATCH_INFO(run.output.substr(run.output.size() > 3000 ? run.output.size() - 3000 : 0));
      CATCH_REQUIRE(run.exit_code == 0);
      CATCH_REQUIRE(run.losses.size() == 8);
      const int during = overlapped_buckets(run.output);
      if (overlap) {
        CATCH_CHECK(during > 0);
      } else {
        CATCH_CHECK(during == 0);
      }
    }
    for (size_t i = 0; i < runs[0].losses.size(); ++i) {
      CATCH_INFO("step " << i + 1);
      CATCH_CHECK(runs[1].losses[i] == runs[0].losses[i]);
    }
    CATCH_CHECK(max_relative_difference(runs[1], runs[0], "model", "step_00000008") == 0.0);
    CATCH_CHECK(max_relative_difference(runs[1], runs[0], "optim", "step_00000008") == 0.0);
  }
}
