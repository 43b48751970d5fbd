// Pipeline parallelism: the split of the blocks into stages, the 1F1B order, a model's stages against
// the whole model in one process, and training at pipeline layouts in real processes against one
// process (losses, weights, moments, validation), resumes across layouts and a rank killed mid-schedule.
#include <ATen/CPUGeneratorImpl.h>
#include <catch2/catch.hpp>

#include <algorithm>
#include <fstream>
#include <functional>
#include <set>

#include "common/errors.h"
#include "cost/flops.h"
#include "cost/plan.h"
#include "dist/pipeline.h"
#include "model/transformer.h"
#include "dist_fixture.h"

using namespace moetrain;
using namespace moetrain::testing;
using Catch::Matchers::Contains;

namespace {

config::Config pipeline_config(int n_layers, int pp) {
  config::Config cfg;
  cfg.model = tiny_model_config();
  cfg.model.n_layers = n_layers;
  cfg.data.seq_len = 16;
  cfg.parallel.pipeline_parallel = pp;
  cfg.train.grad_accum = std::max(pp, 1);
  return cfg;
}

// The last record's validation loss in a run's metrics.jsonl.
double final_val_loss(const std::string& run_dir) {
  std::ifstream metrics(files::join(run_dir, "metrics.jsonl"));
  std::string line, last;
  while (std::getline(metrics, line)) last = line;
  return nlohmann::json::parse(last).at("val_loss").get<double>();
}

}  // namespace

CATCH_TEST_CASE("Pipeline stages: explicit pp_layers, or the split with the smallest largest stage", "[pipeline]") {
  // Balanced: against every split of the blocks into pp consecutive non-empty runs (a naive search),
  // with the cost model's per-block forward FLOPs and the LM head on the last stage.
  for (int layers : {4, 7, 9}) {
    for (int pp : {1, 2, 3, 4}) {
      auto cfg = pipeline_config(layers, pp);
      cfg.model.dense_layers = 2;
      cfg.model.vocab_size = 4096;  // a head worth about two blocks
      const auto got = cost::pipeline_layers(cfg);
      CATCH_REQUIRE(int(got.size()) == pp);
      const auto& m = cfg.model;
      const double attention = cost::attention_projection_forward(m) +
                               cost::attention_scores_forward(m, cfg.data.seq_len, true);
      auto block = [&](int i) {
        return attention + (i < m.dense_layers ? cost::dense_mlp_forward(m)
                                               : cost::routed_experts_forward(m) + cost::shared_experts_forward(m) +
                                                     cost::router_forward(m));
      };
      auto largest = [&](const std::vector<int>& split) {
        double worst = 0;
        int first = 0;
        for (size_t s = 0; s < split.size(); ++s) {
          double c = s + 1 == split.size() ? cost::lm_head_forward(m) : 0;
          for (int i = first; i < first + split[s]; ++i) c += block(i);
          worst = std::max(worst, c);
          first += split[s];
        }
        return worst;
      };
      double best = 1e300;
      std::function<void(std::vector<int>&, int)> search = [&](std::vector<int>& split, int left) {
        if (int(split.size()) == pp - 1) {
          if (left < 1) return;
          split.push_back(left);
          best = std::min(best, largest(split));
          split.pop_back();
          return;
        }
        for (int n = 1; n < left; ++n) {
          split.push_back(n);
          search(split, left - n);
          split.pop_back();
        }
      };
      std::vector<int> split;
      search(split, layers);
      CATCH_INFO(layers << " layers, pp " << pp);
      int sum = 0;
      for (int n : got) {
        sum += n;
        CATCH_CHECK(n >= 1);
      }
      CATCH_CHECK(sum == layers);
      CATCH_CHECK(largest(got) == best);
    }
  }
  auto cfg = pipeline_config(4, 2);
  cfg.parallel.pp_layers = "3, 1";
  CATCH_CHECK(cost::pipeline_layers(cfg) == std::vector<int>{3, 1});
  CATCH_CHECK(cost::stage_bounds({3, 1}) == std::vector<int>{0, 3, 4});
  // Bad lists and layouts are errors naming the key.
  for (const auto& [text, message] : std::vector<std::pair<std::string, std::string>>{
           {"2,1", "sums to 3 blocks but model.n_layers = 4"},
           {"4", "lists 1 stages but parallel.pipeline_parallel = 2"},
           {"2,x", "\"x\" is not a positive number of blocks"},
           {"4,0", "\"0\" is not a positive number of blocks"}}) {
    cfg.parallel.pp_layers = text;
    CATCH_CHECK_THROWS_WITH(config::validate(cfg), Contains("parallel.pp_layers") && Contains(message));
  }
  auto deep = pipeline_config(2, 4);
  CATCH_CHECK_THROWS_WITH(config::validate(deep), Contains("parallel.pipeline_parallel = 4 must be at most model.n_layers = 2"));
  auto few = pipeline_config(4, 2);
  few.train.grad_accum = 1;
  CATCH_CHECK_THROWS_WITH(config::validate(few), Contains("train.grad_accum = 1 must be at least parallel.pipeline_parallel = 2"));
  CATCH_CHECK_THROWS_WITH(dist::make_layout(dist::make_single(), 1, 2),
                          Contains("parallel.pipeline_parallel = 2 does not divide the world size 1"));
}

CATCH_TEST_CASE("1F1B: every forward before its backward, both in order, at most P - s micro-batches in flight", "[pipeline]") {
  for (int P = 1; P <= 4; ++P)
    for (int n = P; n <= 7; ++n)
      for (int s = 0; s < P; ++s) {
        CATCH_INFO("stage " << s << " of " << P << ", " << n << " micro-batches");
        const auto order = dist::PipelineSchedule::order(s, P, n);
        CATCH_REQUIRE(order.size() == size_t(2 * n));
        int next_forward = 0, next_backward = 0, most = 0;
        for (int step : order) {
          if (step >= 0) {
            CATCH_CHECK(step == next_forward++);
          } else {
            CATCH_CHECK(-step - 1 == next_backward++);
            CATCH_CHECK(next_backward <= next_forward);
          }
          most = std::max(most, next_forward - next_backward);
        }
        CATCH_CHECK(most == std::min(P - s, n));
        // The last stage alternates from the start; the first fills the pipeline first.
        if (s == P - 1) CATCH_CHECK((order[0] == 0 && order[1] == -1));
      }
}

// The whole model against its stages in one process, stage by stage: the same loss (bit for bit: the
// same ops on the same values) and the same gradients, a tied embedding's being the sum of the first
// stage's (lookup) and the last's (head), within 1e-6 relative (that one sum is ordered differently).
CATCH_TEST_CASE("A model's pipeline stages give its loss and gradients, tied and untied", "[pipeline][model]") {
  for (bool tie : {true, false}) {
    for (int cut : {1, 2, 3}) {
      CATCH_INFO((tie ? "tied" : "untied") << ", stages [0, " << cut << ") and [" << cut << ", 4)");
      auto m = tiny_model_config();
      m.n_layers = 4;
      m.tie_embeddings = tie;
      m.moe.aux_loss_coef = 0.01;
      m.moe.z_loss_coef = 0.001;
      model::Transformer whole(m), first(m, moe::ExpertShard{}, model::LayerRange{0, cut}),
          last(m, moe::ExpertShard{}, model::LayerRange{cut, -1});
      for (auto* t : {&whole, &first, &last}) (*t)->init_weights(11);
      CATCH_CHECK((first->first_stage() && !first->last_stage() && last->last_stage() && !last->first_stage()));
      CATCH_CHECK(first->held_by_another_stage("final_norm.weight"));
      CATCH_CHECK(first->held_by_another_stage("layers." + std::to_string(cut) + ".attn_norm.weight"));
      CATCH_CHECK(!first->held_by_another_stage("layers." + std::to_string(cut - 1) + ".attn_norm.weight"));
      CATCH_CHECK(last->held_by_another_stage("embed") == !tie);
      CATCH_CHECK(!last->held_by_another_stage("lm_head"));

      auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
      auto tokens = torch::randint(m.vocab_size, {2, 9}, gen, torch::kLong);
      auto targets = torch::randint(m.vocab_size, {2, 9}, gen, torch::kLong);
      targets[0][3] = -100;
      auto out = whole->forward_loss(tokens, targets, -100);
      (out.loss + out.balance_loss).backward();

      auto a = first->forward_stage(tokens, targets, -100);
      auto x = a.hidden_BSD.detach().requires_grad_(true);
      auto b = last->forward_stage(x, targets, -100);
      (b.loss + b.balance_loss).backward();
      std::vector<torch::Tensor> roots{a.hidden_BSD}, grads{x.grad()};
      if (a.balance_loss.requires_grad()) roots.push_back(a.balance_loss), grads.push_back(torch::ones_like(a.balance_loss));
      torch::autograd::backward(roots, grads);

      CATCH_CHECK(b.loss.item<double>() == out.loss.item<double>());
      CATCH_CHECK(std::abs((a.balance_loss + b.balance_loss).item<double>() - out.balance_loss.item<double>()) <=
                  1e-6 * std::abs(out.balance_loss.item<double>()));
      std::vector<int> layers = a.moe_layers;
      layers.insert(layers.end(), b.moe_layers.begin(), b.moe_layers.end());
      CATCH_CHECK(layers == out.moe_layers);

      auto params_a = first->named_parameters(), params_b = last->named_parameters();
      std::set<std::string> covered;
      for (const auto& p : whole->named_parameters()) {
        const auto& name = p.key();
        torch::Tensor grad;
        if (params_a.contains(name)) grad = params_a[name].grad();
        if (params_b.contains(name)) grad = grad.defined() ? grad + params_b[name].grad() : params_b[name].grad();
        CATCH_INFO(name);
        CATCH_REQUIRE(grad.defined());
        const double d = (grad - p.value().grad()).norm().item<double>() / std::max(1e-12, p.value().grad().norm().item<double>());
        CATCH_CHECK(d <= 1e-6);
        covered.insert(name);
      }
      // Nothing beyond the whole model's parameters, and the tied copy marked as the duplicate.
      for (const auto& p : params_a) CATCH_CHECK(covered.count(p.key()));
      for (const auto& p : params_b) CATCH_CHECK(covered.count(p.key()));
      for (const auto& r : last->roled_parameters()) CATCH_CHECK(r.duplicate == (tie && r.name == "embed"));
      for (const auto& r : first->roled_parameters()) CATCH_CHECK((!r.duplicate && r.tied_across_stages == (tie && r.name == "embed")));
    }
  }
}

// Tolerances as for the (world, ep) layouts (test_dist.cpp): fp32, the same math in another order
// (the stages' gradients meet at their boundary, a tied embedding's two gradients are summed between
// the ends), so 1e-5 relative on every loss and weight tensor and 1e-4 on the moments.
CATCH_TEST_CASE("Pipeline training at (pp 2), (pp 2, ep 2), (pp 4), (pp 2, ep 2, ZeRO-1, full checkpointing) and "
                "(pp 2, dp 4, ep 2, ZeRO-1) equals one process",
                "[dist][pipeline][train]") {
  testing::TempDir dir("pipeline-equivalence");
  const auto data_dir = testing::make_corpus(dir);
  auto config_of = [&](const std::string& name, bool tie, int pp) {
    auto cfg = equivalence_config(data_dir, dir.str(name));
    cfg.model.n_layers = 4;
    cfg.model.dense_layers = 1;  // a dense block on the first stage
    cfg.model.tie_embeddings = tie;
    cfg.train.grad_accum = 4;
    cfg.train.steps = 12;
    cfg.optim.decay_steps = 12;
    cfg.parallel.pipeline_parallel = pp;
    return cfg;
  };
  const std::string step = "step_00000012";
  for (bool tie : {true, false}) {
    const auto one = train_at(config_of(tie ? "w1-tied" : "w1", tie, 1), 1, 1);
    CATCH_REQUIRE(one.exit_code == 0);
    CATCH_REQUIRE(one.losses.size() == 12);
    struct Case {
      int world, pp, ep, zero;
      std::string checkpointing = "none";  // full: the stages' blocks recompute in backward, EP collectives too
    };
    const auto cases = tie ? std::vector<Case>{{2, 2, 1, 0}, {4, 2, 2, 0}, {8, 2, 2, 1}}
                           : std::vector<Case>{{4, 4, 1, 0}, {4, 2, 2, 1, "full"}};
    for (const auto& c : cases) {
      const std::string name = std::string(tie ? "tied" : "untied") + "-w" + std::to_string(c.world) + "pp" +
                               std::to_string(c.pp) + "ep" + std::to_string(c.ep) + "zero" + std::to_string(c.zero) +
                               "ac-" + c.checkpointing;
      auto cfg = config_of(name, tie, c.pp);
      cfg.parallel.zero = c.zero;
      cfg.train.activation_checkpointing = c.checkpointing;
      const auto got = train_at(cfg, c.world, c.ep);
      CATCH_INFO(name << "\n" << got.output.substr(got.output.size() > 3000 ? got.output.size() - 3000 : 0));
      CATCH_REQUIRE(got.exit_code == 0);
      CATCH_CHECK_THAT(got.output, Contains("pipeline " + std::to_string(c.pp) + " stages"));
      CATCH_REQUIRE(got.losses.size() == one.losses.size());
      for (size_t i = 0; i < one.losses.size(); ++i) {
        CATCH_INFO("step " << i + 1 << ": " << got.losses[i] << " vs " << one.losses[i]);
        CATCH_CHECK(std::abs(got.losses[i] - one.losses[i]) <= 1e-5 * std::abs(one.losses[i]));
      }
      const double val = final_val_loss(got.run_dir), want_val = final_val_loss(one.run_dir);
      CATCH_CHECK(std::abs(val - want_val) <= 1e-5 * want_val);
      CATCH_CHECK(max_relative_difference(got, one, "model", step) <= 1e-5);
      CATCH_CHECK(max_relative_difference(got, one, "optim", step) <= 1e-4);
    }
  }
}

CATCH_TEST_CASE("Pipeline checkpoints: pp 2 resumes at pp 1 and (pp 1, ep 2), pp 1 resumes at pp 2", "[dist][pipeline][ckpt]") {
  testing::TempDir dir("pipeline-ckpt");
  const auto data_dir = testing::make_corpus(dir);
  auto config_of = [&](const std::string& name, int pp, int steps) {
    auto cfg = equivalence_config(data_dir, dir.str(name));
    cfg.model.n_layers = 4;
    cfg.train.steps = steps;
    cfg.optim.decay_steps = 12;
    cfg.parallel.pipeline_parallel = pp;
    return cfg;
  };
  const auto pp2 = train_at(config_of("pp2", 2, 6), 2, 1);
  const auto pp1 = train_at(config_of("pp1", 1, 6), 1, 1);
  CATCH_INFO(pp2.output);
  CATCH_REQUIRE(pp2.exit_code == 0);
  CATCH_REQUIRE(pp1.exit_code == 0);
  // The stages wrote one checkpoint between them: the same tensors as one process's.
  CATCH_CHECK(files::exists(dir.str("pp2/ckpt/step_00000006/model-stage-00001-of-00002.safetensors")));
  CATCH_CHECK(max_relative_difference(pp2, pp1, "model", "step_00000006") <= 1e-5);
  CATCH_CHECK(max_relative_difference(pp2, pp1, "optim", "step_00000006") <= 1e-4);

  struct Case {
    std::string from;
    int world, pp, ep;
  };
  for (const auto& c : std::vector<Case>{{"pp2", 1, 1, 1}, {"pp2", 2, 1, 2}, {"pp1", 2, 2, 1}}) {
    const std::string name = c.from + "-to-w" + std::to_string(c.world) + "pp" + std::to_string(c.pp) + "ep" + std::to_string(c.ep);
    CATCH_INFO(name);
    const auto straight = train_at(config_of(name + "-straight", c.pp, 12), c.world, c.ep);
    CATCH_REQUIRE(straight.exit_code == 0);
    resume_copy(dir.str(c.from), config_of(name, c.pp, 12), c.world, c.ep, "step_00000006");
    check_resumed_losses(dir.str(name), straight, 6);
  }
}

CATCH_TEST_CASE("A pipeline stage killed mid-schedule: every rank ends within the timeout, naming it", "[dist][pipeline]") {
  testing::TempDir dir("pipeline-kill");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = equivalence_config(data_dir, dir.str("run"));
  cfg.model.n_layers = 4;
  cfg.train.steps = 100000;
  cfg.parallel.timeout_s = 5;
  cfg.parallel.pipeline_parallel = 2;
  cfg.train.micro_batch_size = 4;
  // Rank 1 (the last stage) is killed once training has started; rank 0 waits for its gradients.
  check_killed_rank_ends_job(cfg, dir.str("input.yaml"));
}
