// GRPO (train/rl.h) against independent references: advantages, the clipped surrogate and its gradient,
// k3, answer extraction, the reward command's errors, routing replay, and short whole runs with resume.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "rl_fixture.h"
#include "common/errors.h"
#include "train/generate.h"
#include "train/rl.h"

using namespace moetrain;
using namespace moetrain::testing;
namespace rl = moetrain::train::rl;

namespace {

// Naive per-token reference of the surrogate for one row-major (B, N) batch, in double.
struct Naive {
  double loss = 0;
  std::vector<double> grad;  // d loss / d logp, row-major
};

Naive naive_loss(const std::vector<double>& logp, const std::vector<double>& old, const std::vector<double>& adv,
                 const std::vector<double>& mask, int B, int N, const config::RLConfig& c) {
  const double lo = 1 - c.clip_eps, hi = 1 + (c.clip_eps_high > 0 ? c.clip_eps_high : c.clip_eps);
  Naive out;
  out.grad.assign(size_t(B * N), 0);
  double tokens = 0;
  for (double m : mask) tokens += m;
  for (int b = 0; b < B; ++b) {
    double len = 0, sum_log_ratio = 0;
    for (int t = 0; t < N; ++t) len += mask[size_t(b * N + t)], sum_log_ratio += mask[size_t(b * N + t)] * (logp[size_t(b * N + t)] - old[size_t(b * N + t)]);
    const double A = adv[size_t(b)];
    if (c.ratio == "sequence") {
      const double s = std::exp(sum_log_ratio / len), cs = std::min(std::max(s, lo), hi);
      const double row_loss = -std::min(s * A, cs * A);
      const bool active = (A > 0 && s > hi) || (A < 0 && s < lo);
      const double weight = c.loss_aggregation == "token" ? len / tokens : 1.0 / B;
      out.loss += weight * row_loss;
      for (int t = 0; t < N; ++t)
        if (mask[size_t(b * N + t)] > 0 && !active) out.grad[size_t(b * N + t)] = weight * (-A * s / len);
      continue;
    }
    for (int t = 0; t < N; ++t) {
      const size_t i = size_t(b * N + t);
      if (mask[i] == 0) continue;
      const double r = std::exp(logp[i] - old[i]), cr = std::min(std::max(r, lo), hi);
      const double token_loss = -std::min(r * A, cr * A);
      const bool active = (A > 0 && r > hi) || (A < 0 && r < lo);
      const double weight = c.loss_aggregation == "token" ? 1.0 / tokens : 1.0 / (len * B);
      out.loss += weight * token_loss;
      if (!active) out.grad[i] = weight * (-A * r);
    }
  }
  return out;
}

void check_against_naive(const config::RLConfig& c) {
  const int B = 3, N = 4;
  // Ratios spread over both sides of the clip range; row 1 ends in padding.
  const std::vector<double> logp = {-1.0, -0.7, -2.0, -0.3, -1.5, -0.2, -0.9, -4.0, -0.6, -1.1, -0.4, -2.2};
  const std::vector<double> old = {-1.4, -0.7, -1.6, -0.6, -1.2, -0.5, -0.9, -1.0, -0.5, -1.3, -0.5, -2.0};
  const std::vector<double> mask = {1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1};
  const std::vector<double> adv = {1.0, -0.5, 0.8};
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto logp_t = torch::tensor(logp, opts).view({B, N}).requires_grad_(true);
  rl::SurrogateInputs in{logp_t, torch::tensor(old, opts).view({B, N}), torch::Tensor(), torch::tensor(adv, opts),
                         torch::tensor(mask, opts).view({B, N})};
  const auto terms = rl::grpo_loss(in, c);
  terms.loss.backward();
  const auto ref = naive_loss(logp, old, adv, mask, B, N, c);
  CATCH_CHECK(terms.loss.item<double>() == Approx(ref.loss).epsilon(1e-12).margin(1e-12));
  const auto grad = logp_t.grad().contiguous();
  for (int i = 0; i < B * N; ++i) CATCH_CHECK(grad.data_ptr<double>()[i] == Approx(ref.grad[size_t(i)]).margin(1e-12));
}

}  // namespace

CATCH_TEST_CASE("group advantages match a hand computation, a zero-std group gives zeros", "[rl]") {
  const auto rewards = torch::tensor({1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0}).view({3, 4});
  const auto adv = rl::group_advantages(rewards, "group_norm");
  // Group 0: mean 0.5, population std 0.5; group 1 equal rewards; group 2: mean 0.75, std sqrt(27/16).
  const double s2 = std::sqrt((3 * 0.75 * 0.75 + 2.25 * 2.25) / 4);
  const double expect[] = {0.5 / 0.5001, -0.5 / 0.5001, -0.5 / 0.5001, 0.5 / 0.5001, 0, 0, 0, 0,
                           -0.75 / (s2 + 1e-4), -0.75 / (s2 + 1e-4), -0.75 / (s2 + 1e-4), 2.25 / (s2 + 1e-4)};
  for (int i = 0; i < 12; ++i) CATCH_CHECK(adv.view(-1)[i].item<double>() == Approx(expect[i]).epsilon(1e-6));
  const auto mean_only = rl::group_advantages(rewards, "mean_only");
  CATCH_CHECK(mean_only[0][0].item<double>() == Approx(0.5));
  CATCH_CHECK(mean_only[1].abs().sum().item<double>() == 0);
  CATCH_CHECK(mean_only[2][3].item<double>() == Approx(2.25));
}

CATCH_TEST_CASE("the clipped surrogate and its gradient match a hand-written formula", "[rl]") {
  config::RLConfig c;
  for (const std::string agg : {"token", "sequence"})
    for (const std::string ratio : {"token", "sequence"})
      for (double high : {0.0, 0.5}) {
        CATCH_SECTION("aggregation " + agg + ", ratio " + ratio + ", clip_eps_high " + std::to_string(high)) {
          c.loss_aggregation = agg;
          c.ratio = ratio;
          c.clip_eps = 0.2;
          c.clip_eps_high = high;
          check_against_naive(c);
        }
      }
}

CATCH_TEST_CASE("clip fraction counts the tokens where the clip is active", "[rl]") {
  config::RLConfig c;
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  // ratios e^0.5 (clipped for A > 0), 1, e^-0.5 (clipped for A < 0 only)
  auto logp = torch::tensor({0.5, 0.0, -0.5}, opts).view({1, 3});
  auto old = torch::zeros({1, 3}, opts);
  auto mask = torch::ones({1, 3}, opts);
  auto terms = rl::grpo_loss({logp, old, {}, torch::tensor({1.0}, opts), mask}, c);
  CATCH_CHECK(terms.clip_fraction.item<double>() == Approx(1.0 / 3));
  terms = rl::grpo_loss({logp, old, {}, torch::tensor({-1.0}, opts), mask}, c);
  CATCH_CHECK(terms.clip_fraction.item<double>() == Approx(1.0 / 3));
}

CATCH_TEST_CASE("k3 KL matches its formula and enters the loss with rl.kl_coef", "[rl]") {
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const auto logp = torch::tensor({-1.0, -2.0, -0.5}, opts), ref = torch::tensor({-1.5, -2.0, -0.1}, opts);
  const auto kl = rl::k3_kl(logp, ref);
  for (int i = 0; i < 3; ++i) {
    const double d = ref[i].item<double>() - logp[i].item<double>();
    CATCH_CHECK(kl[i].item<double>() == Approx(std::exp(d) - d - 1).epsilon(1e-12));
  }
  CATCH_CHECK(kl[1].item<double>() == 0);
  config::RLConfig c;
  c.kl_coef = 0.1;
  const auto mask = torch::ones({1, 3}, opts);
  const auto adv = torch::tensor({0.7}, opts);
  const auto with = rl::grpo_loss({logp.view({1, 3}), logp.view({1, 3}), ref.view({1, 3}), adv, mask}, c);
  c.kl_coef = 0;
  const auto without = rl::grpo_loss({logp.view({1, 3}), logp.view({1, 3}), ref.view({1, 3}), adv, mask}, c);
  CATCH_CHECK((with.loss - without.loss).item<double>() == Approx(0.1 * kl.mean().item<double>()).epsilon(1e-12));
  CATCH_CHECK(with.kl.item<double>() == Approx(kl.mean().item<double>()));
}

CATCH_TEST_CASE("answers are extracted by tag, boxed or whole, and the R1 template is recognised", "[rl]") {
  config::RLConfig c;
  CATCH_CHECK(rl::extract_answer("<think>3+4</think><answer> 7 </answer>", c) == std::optional<std::string>("7"));
  CATCH_CHECK(rl::extract_answer("<answer>1</answer> no, <answer>2</answer>", c) == std::optional<std::string>("2"));
  CATCH_CHECK(!rl::extract_answer("<answer>7", c));
  CATCH_CHECK(!rl::extract_answer("just 7", c));
  c.answer_tag = "final";
  CATCH_CHECK(rl::extract_answer("<final>x=1</final>", c) == std::optional<std::string>("x=1"));
  c.answer_from = "boxed";
  CATCH_CHECK(rl::extract_answer("so \\boxed{3} or \\boxed{\\frac{1}{2}}.", c) == std::optional<std::string>("\\frac{1}{2}"));
  CATCH_CHECK(!rl::extract_answer("\\boxed{12", c));
  c.answer_from = "whole";
  c.stop = "\n";
  CATCH_CHECK(rl::extract_answer(" 42\n", c) == std::optional<std::string>("42"));
  CATCH_CHECK(rl::follows_r1_template("<think>a</think>\n<answer>b</answer>"));
  CATCH_CHECK(rl::follows_r1_template(" <think></think><answer>b</answer>\n", "\n"));
  CATCH_CHECK(!rl::follows_r1_template("<answer>b</answer>"));
  CATCH_CHECK(!rl::follows_r1_template("<think>a</think>x<answer>b</answer>"));
  CATCH_CHECK(!rl::follows_r1_template("<think>a</think><answer>b</answer> and more"));
  CATCH_CHECK(!rl::follows_r1_template("<answer>b</answer><think>a</think>"));
  config::RLConfig r;
  r.format_reward = 0.5;
  CATCH_CHECK(rl::builtin_reward("<think>t</think><answer>5</answer>", " 5 ", r) == 1.5);
  CATCH_CHECK(rl::builtin_reward("<think>t</think><answer>6</answer>", "5", r) == 0.5);
  CATCH_CHECK(rl::builtin_reward("<answer>5</answer>", "5", r) == 1.0);
}

CATCH_TEST_CASE("reward_command scores JSON lines, its failures are one-line errors naming it", "[rl]") {
  const std::vector<rl::Scored> items = {{"1+1=", "2", "2"}, {"2+2=", "5", "4"}};
  const auto scores =
      rl::command_rewards("python3 -c 'import sys,json\nfor l in sys.stdin: d=json.loads(l); print(float(d[\"completion\"]==d[\"answer\"]))'",
                          20, items);
  CATCH_REQUIRE(scores == std::vector<double>{1.0, 0.0});
  auto message = [&](const std::string& command, double timeout) {
    try {
      rl::command_rewards(command, timeout, items);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto slow = message("sleep 5", 0.3);
  CATCH_CHECK_THAT(slow, Catch::Contains("'sleep 5'") && Catch::Contains("timed out"));
  const auto bad = message("cat > /dev/null; echo 1; echo hello", 10);
  CATCH_CHECK_THAT(bad, Catch::Contains("echo hello") && Catch::Contains("not a finite number"));
  const auto few = message("cat > /dev/null; echo 1", 10);
  CATCH_CHECK_THAT(few, Catch::Contains("wrote 1 numbers for 2"));
  const auto failed = message("cat > /dev/null; exit 3", 10);
  CATCH_CHECK_THAT(failed, Catch::Contains("exit 3'") && Catch::Contains("exited with status 3"));
  CATCH_CHECK(failed.find('\n') == std::string::npos);
  const auto not_reading = message("exit 0", 10);  // never reads its input: no SIGPIPE for us, a count error
  CATCH_CHECK_THAT(not_reading, Catch::Contains("wrote 0 numbers"));
}

CATCH_TEST_CASE("routing replay: the update's forward uses the experts recorded in the rollout", "[rl]") {
  torch::manual_seed(0);
  auto m = tiny_model_config();
  m.vocab_size = 256;
  m.max_seq_len = 32;
  model::Transformer model(m);
  model->init_weights(7);
  rl::RoutingReplay replay(*model);
  CATCH_REQUIRE(!replay.empty());
  const std::vector<std::vector<int64_t>> prompts = {{10, 20, 30}, {40, 50}};
  train::GenerateOptions go;
  go.max_new_tokens = 6;
  go.temperature = 1.0;
  go.seed = 3;
  replay.start_recording();
  const auto seqs = train::generate_batch(*model, prompts, go);
  // Every token but the last went through the model: the update batch is those tokens, right-padded
  // with copies of a row's last token (padding that the recorded ids do not cover).
  const int64_t width = std::max(seqs[0].size(), seqs[1].size()) - 1;
  std::vector<int64_t> lengths, starts = {0, 1};
  auto tokens = torch::zeros({2, width}, torch::kLong);
  for (int b = 0; b < 2; ++b) {
    lengths.push_back(int64_t(seqs[size_t(b)].size()) - 1);
    for (int64_t j = 0; j < lengths.back(); ++j) tokens[b][j] = seqs[size_t(b)][size_t(j)];
  }
  replay.finish_recording(starts, lengths, 3);
  replay.lay_out(width);
  const auto rec = replay.recorded(0);
  CATCH_REQUIRE(rec.sizes() == torch::IntArrayRef({2, width, 2}));
  CATCH_CHECK((rec[0] >= 0).all().item<bool>() == (lengths[0] == width));
  // The same weights choose the same experts (the recomputed forward agrees with the cached decode).
  replay.begin_update(false);
  (void)model->forward(tokens);
  replay.end_update();
  double router = -1;
  CATCH_CHECK(replay.take_mismatch(&router).value() < 0.25);
  // Other router weights choose other experts; replay routes through the recorded ones all the same.
  {
    torch::NoGradGuard no_grad;
    for (auto& block : model->blocks)
      if (!block->moe.is_empty()) block->moe->router->weight.mul_(-3);
  }
  replay.begin_update(false);
  (void)model->forward(tokens);
  replay.end_update();
  CATCH_CHECK(replay.take_mismatch().value() > 0.2);
  replay.begin_update(true);
  const auto out = model->forward(tokens);
  replay.end_update();
  CATCH_CHECK(replay.take_mismatch(&router).value() == 0);
  CATCH_CHECK(router > 0.2);
  // The forward's expert load is that of the recorded ids (plus the router's own choice on uncovered padding).
  const auto covered = (rec >= 0).all(2);
  const auto load = out.moe_stats[0].tokens_per_expert_E;
  const auto recorded_load = torch::bincount(rec.index({covered}).reshape(-1), {}, 4);
  const int64_t uncovered = (covered.logical_not()).sum().item<int64_t>() * 2;
  CATCH_CHECK((load - recorded_load).min().item<int64_t>() >= 0);
  CATCH_CHECK((load - recorded_load).sum().item<int64_t>() == uncovered);
}

CATCH_TEST_CASE("moetrain rl runs a few rollout batches and logs the metrics", "[rl]") {
  TempDir dir("rl-run");
  auto cfg = tiny_rl_config(dir);
  cfg.rl.kl_coef = 0.05;
  cfg.rl.updates_per_batch = 2;
  cfg.rl.routing_replay = true;
  cfg.rl.clip_eps_high = 0.28;
  config::validate(cfg);
  const auto result = rl::run(cfg, {});
  CATCH_CHECK(result.last_step == 3);
  CATCH_CHECK(result.first_eval_accuracy.has_value());
  CATCH_CHECK(result.last_eval_accuracy.has_value());
  const auto rows = read_metrics(dir.str("run/metrics.jsonl"));
  CATCH_REQUIRE(rows.size() == 3);
  for (const auto& row : rows) {
    for (const char* key : {"reward_mean", "reward_std", "accuracy", "response_length", "kl", "clip_fraction", "entropy",
                            "zero_advantage_fraction", "rollout_s", "update_s", "routing_mismatch", "loss", "grad_norm"})
      CATCH_CHECK(row.contains(key));
    CATCH_CHECK(row["routing_mismatch"].get<double>() == 0);
    CATCH_CHECK(row["kl"].get<double>() >= 0);
    CATCH_CHECK(row["response_length"].get<double>() > 0);
    CATCH_CHECK(row["response_length"].get<double>() <= 5);
  }
  CATCH_CHECK(rows.front().contains("eval_accuracy_start"));
  CATCH_CHECK(rows.back().contains("eval_accuracy"));
  CATCH_CHECK(result.last_checkpoint.find("step_00000003") != std::string::npos);
}

CATCH_TEST_CASE("moetrain rl resumes at a rollout-batch boundary exactly", "[rl]") {
  TempDir dir("rl-resume");
  auto cfg = tiny_rl_config(dir);
  cfg.rl.eval_prompts = "";
  cfg.rl.reward = "command";
  cfg.rl.reward_command = "python3 -c 'import sys,json\nfor l in sys.stdin: d=json.loads(l); print(len(d[\"completion\"]) / 5)'";
  cfg.train.steps = 4;
  cfg.checkpoint.every = 1;
  config::validate(cfg);
  rl::run(cfg, {});
  const auto straight = read_metrics(dir.str("run/metrics.jsonl"));
  cfg.run.out_dir = dir.str("split");
  cfg.train.steps = 2;
  rl::run(cfg, {});
  cfg.train.steps = 4;
  rl::run(cfg, {"auto", false});
  const auto split = read_metrics(dir.str("split/metrics.jsonl"));
  CATCH_REQUIRE(straight.size() == 4);
  CATCH_REQUIRE(split.size() == 4);
  for (size_t i = 0; i < 4; ++i) {
    CATCH_CHECK(split[i]["reward_mean"] == straight[i]["reward_mean"]);
    CATCH_CHECK(split[i]["loss"] == straight[i]["loss"]);
    CATCH_CHECK(split[i]["grad_norm"] == straight[i]["grad_norm"]);
  }
}

CATCH_TEST_CASE("moetrain rl from a prepare-data --rl set runs as from its .jsonl on the same seed", "[rl][data]") {
  TempDir dir("rl-prepared");
  auto cfg = tiny_rl_config(dir);
  cfg.rl.reward = "command";  // sees the decoded prompt and completion: rewards that vary
  cfg.rl.reward_command = "awk '{ print length($0) % 3 }'";
  config::validate(cfg);
  rl::run(cfg, {});
  const auto from_jsonl = read_metrics(dir.str("run/metrics.jsonl"));

  data::prepare_prompt_set(dir.str("train.jsonl"), dir.str("train-set"));
  data::prepare_prompt_set(dir.str("eval.jsonl"), dir.str("eval-set"));
  cfg.run.out_dir = dir.str("prepared");
  cfg.rl.prompts = dir.str("train-set");
  cfg.rl.eval_prompts = dir.str("eval-set/prompts.bin");
  rl::run(cfg, {});
  const auto from_set = read_metrics(dir.str("prepared/metrics.jsonl"));
  CATCH_REQUIRE(from_jsonl.size() == 3);
  CATCH_REQUIRE(from_set.size() == 3);
  double spread = 0;
  for (size_t i = 0; i < 3; ++i) {
    for (const char* key : {"reward_mean", "reward_std", "accuracy", "response_length", "loss", "grad_norm"})
      CATCH_CHECK(from_set[i][key] == from_jsonl[i][key]);
    spread += from_set[i]["reward_std"].get<double>();
  }
  CATCH_CHECK(spread > 0);  // the rewards did vary, so the comparison says something
  CATCH_CHECK(from_set.back()["eval_accuracy"] == from_jsonl.back()["eval_accuracy"]);
}
