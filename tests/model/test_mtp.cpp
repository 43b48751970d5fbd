// Multi-token prediction (model.mtp_depth): each depth's loss against a direct reference written here
// (shifted tokens and targets, the shared head), gradients by finite differences, activation
// checkpointing, and checkpoints with MTP modules on one side only.
#include <catch2/catch.hpp>

#include <fstream>
#include <nlohmann/json.hpp>

#include "../test_util.h"
#include "../train/train_fixture.h"
#include "common/files.h"
#include "data/shard.h"
#include "model/transformer.h"
#include "train/generate.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

config::ModelConfig mtp_config(int depth, bool moe = true) {
  auto m = testing::tiny_model_config();
  m.n_layers = 2;
  m.dense_layers = moe ? 1 : 2;  // the MTP block is MoE exactly when the model has MoE layers
  m.tie_embeddings = false;
  m.mtp_depth = depth;
  m.mtp_loss_weight = 0.3;
  m.moe.aux_loss_coef = 0.01;
  return m;
}

// RMSNorm written out: x / sqrt(mean(x^2) + eps) * w.
torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps) * w;
}

struct Batch {
  torch::Tensor tokens, targets;
};
Batch batch_of(const config::ModelConfig& m, int64_t B, int64_t S, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto stream = torch::randint(m.vocab_size, {B, S + 1}, gen, torch::kLong);
  Batch b{stream.narrow(1, 0, S).contiguous(), stream.narrow(1, 1, S).clone()};
  b.targets[0][2] = -100;  // a loss mask: position 2 of row 0 is not learned at any depth that reaches it
  b.targets[1][S - 1] = -100;
  return b;
}

// Each depth's mean cross-entropy, computed directly from the model's tensors: depth k embeds token i+k,
// joins it with the previous depth's hidden state at i, and predicts targets[i + k] (token i+k+1).
std::vector<double> reference_mtp_losses(const model::TransformerImpl& model, const Batch& b) {
  torch::NoGradGuard no_grad;
  const auto& m = model.config();
  const auto rope = model::Rope::make(m.max_seq_len, config::head_dim(m), m.rope_theta, torch::kCPU, m.yarn);
  auto x = model.embed.index_select(0, b.tokens.reshape(-1)).view({b.tokens.size(0), b.tokens.size(1), m.d_model});
  for (const auto& block : model.blocks) x = block->forward(x, rope, std::nullopt).x_BSD;
  const auto& head = model.lm_head.defined() ? model.lm_head : model.embed;
  const int64_t B = b.tokens.size(0), S = b.tokens.size(1);
  std::vector<double> losses;
  torch::Tensor h = x;  // before the final norm
  for (int k = 1; k <= m.mtp_depth; ++k) {
    const auto& mod = *model.mtp_modules[size_t(k - 1)];
    const int64_t n = S - k;
    auto emb = model.embed.index_select(0, b.tokens.narrow(1, k, n).reshape(-1)).view({B, n, m.d_model});
    auto joined = torch::cat({rms(emb, mod.enorm->weight, m.norm_eps), rms(h.narrow(1, 0, n), mod.hnorm->weight, m.norm_eps)}, -1);
    h = mod.block->forward(torch::matmul(joined, mod.eh_proj), rope, std::nullopt).x_BSD;
    auto logits = torch::matmul(rms(h, mod.norm->weight, m.norm_eps), head.t());
    losses.push_back(torch::cross_entropy_loss(logits.reshape({-1, m.vocab_size}), b.targets.narrow(1, k, n).reshape(-1),
                                               {}, at::Reduction::Mean, -100)
                         .item<double>());
  }
  return losses;
}

}  // namespace

CATCH_TEST_CASE("mtp: each depth's loss equals a direct reference, the main loss is unchanged", "[model][mtp]") {
  for (int depth : {1, 2}) {
    for (int64_t chunk : {0, 7}) {
      CATCH_INFO("depth " << depth << ", loss chunk " << chunk);
      const auto cfg = mtp_config(depth);
      model::Transformer with(cfg), without(mtp_config(0));
      with->init_weights(3);
      without->init_weights(3);
      with->set_loss_chunk(chunk);
      without->set_loss_chunk(chunk);
      const auto b = batch_of(cfg, 2, 10, 5);
      auto out = with->forward_loss(b.tokens, b.targets, -100);
      auto plain = without->forward_loss(b.tokens, b.targets, -100);
      // The main model's weights are seeded by name: the same with and without MTP, and so is its loss.
      CATCH_CHECK(out.loss.item<double>() == plain.loss.item<double>());
      CATCH_CHECK(!plain.mtp_loss.defined());
      CATCH_REQUIRE(out.mtp_losses.size() == size_t(depth));
      const auto want = reference_mtp_losses(*with, b);
      double mean = 0;
      for (int k = 0; k < depth; ++k) {
        CATCH_INFO("depth " << k + 1 << ": " << out.mtp_losses[size_t(k)].item<double>() << " vs " << want[size_t(k)]);
        CATCH_CHECK(std::abs(out.mtp_losses[size_t(k)].item<double>() - want[size_t(k)]) <= 1e-5 * want[size_t(k)]);
        mean += want[size_t(k)] / depth;
      }
      CATCH_CHECK(std::abs(out.mtp_loss.item<double>() - 0.3 * mean) <= 1e-5 * mean);
      // The MTP block is an MoE layer numbered after the main blocks (as HF numbers it).
      CATCH_CHECK(out.moe_layers.back() == cfg.n_layers + depth - 1);
      CATCH_CHECK(out.balance_loss.item<double>() > plain.balance_loss.item<double>());
      // Evaluation and generation leave the modules out.
      CATCH_CHECK(!with->forward_loss(b.tokens, b.targets, -100, false, /*with_mtp=*/false).mtp_loss.defined());
    }
  }
}

CATCH_TEST_CASE("mtp: parameter names, roles and counts", "[model][mtp]") {
  model::Transformer m(mtp_config(2));
  std::set<std::string> experts;
  for (const auto& r : m->roled_parameters())
    if (r.role == model::ParamRole::expert) experts.insert(r.name);
  CATCH_CHECK(experts.count("mtp.1.block.moe.experts.w1"));
  CATCH_CHECK(experts.count("layers.1.moe.experts.w2"));
  auto params = m->named_parameters();
  for (const char* name : {"mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.0.eh_proj", "mtp.0.norm.weight",
                           "mtp.1.block.attn.wq", "mtp.1.block.moe.router.weight"})
    CATCH_CHECK(params.contains(name));
  CATCH_CHECK(model::mtp_module_of("mtp.1.block.attn.wq") == 1);
  CATCH_CHECK(model::mtp_module_of("layers.1.attn.wq") == -1);
  CATCH_CHECK(model::mtp_module_of("mtp.x") == -1);
  CATCH_CHECK(model::is_no_decay("mtp.0.enorm.weight"));
  // A dense model's MTP block is dense.
  model::Transformer dense(mtp_config(1, /*moe=*/false));
  CATCH_CHECK(dense->named_parameters().contains("mtp.0.block.mlp.w1"));
  CATCH_CHECK(!dense->named_parameters().contains("mtp.0.block.moe.router.weight"));
}

// fp64 central differences (the model's math follows its weights' dtype; rms_norm promotes to fp64):
// step 1e-5 leaves an error near 1e-9, far below the 1e-5 relative (+1e-8 absolute) asked. A dense
// model, so that no perturbation flips a top-k choice.
CATCH_TEST_CASE("mtp: gradients of the MTP loss by finite differences", "[model][mtp]") {
  auto cfg = mtp_config(2, /*moe=*/false);
  cfg.mtp_loss_weight = 1.0;
  model::Transformer m(cfg);
  m->init_weights(9);
  m->to(torch::kDouble);
  {  // larger weights than the init, so that every path carries a sizeable gradient
    torch::NoGradGuard no_grad;
    for (auto& p : m->parameters()) p.mul_(3.0);
  }
  const auto b = batch_of(cfg, 2, 8, 13);
  auto objective = [&] { return m->forward_loss(b.tokens, b.targets, -100).mtp_loss; };
  for (auto& p : m->parameters()) p.mutable_grad() = torch::Tensor();
  objective().backward();
  auto params = m->named_parameters();
  int checked = 0;
  for (const char* name : {"mtp.0.eh_proj", "mtp.0.enorm.weight", "mtp.0.hnorm.weight", "mtp.1.eh_proj",
                           "mtp.1.block.attn.wq", "mtp.1.block.mlp.w2", "mtp.1.norm.weight", "mtp.0.norm.weight",
                           "embed", "lm_head", "layers.1.mlp.w1", "layers.0.attn.wo"}) {
    auto p = params[name];
    const auto grad = p.grad().clone();
    auto flat = p.view(-1);
    const auto g = grad.view(-1);
    for (int64_t i : {int64_t(0), flat.numel() / 3, flat.numel() - 1}) {
      torch::NoGradGuard no_grad;
      const double old = flat[i].item<double>();
      const double eps = 1e-5;
      flat[i] = old + eps;
      const double up = objective().item<double>();
      flat[i] = old - eps;
      const double down = objective().item<double>();
      flat[i] = old;
      const double numeric = (up - down) / (2 * eps), analytic = g[i].item<double>();
      CATCH_INFO(name << "[" << i << "]: analytic " << analytic << ", numeric " << numeric);
      CATCH_CHECK(std::abs(analytic - numeric) <= 1e-5 * std::abs(numeric) + 1e-8);
      ++checked;
    }
  }
  CATCH_CHECK(checked == 36);
}

CATCH_TEST_CASE("mtp: activation checkpointing (full, selective) gives the same losses and gradients", "[model][mtp]") {
  const auto cfg = mtp_config(2);
  const auto b = batch_of(cfg, 2, 10, 21);
  std::map<std::string, torch::Tensor> want;
  double want_loss = 0;
  for (const char* mode : {"none", "full", "selective"}) {
    CATCH_INFO(mode);
    model::Transformer m(cfg);
    m->init_weights(4);
    m->set_activation_checkpointing(mode);
    auto out = m->forward_loss(b.tokens, b.targets, -100);
    (out.loss + out.balance_loss + out.mtp_loss).backward();
    const double loss = (out.loss + out.mtp_loss).item<double>();
    if (std::string(mode) == "none") {
      want_loss = loss;
      for (const auto& p : m->named_parameters()) want[p.key()] = p.value().grad().clone();
      continue;
    }
    CATCH_CHECK(std::abs(loss - want_loss) <= 1e-6 * want_loss);
    for (const auto& p : m->named_parameters()) {
      CATCH_INFO(p.key());
      CATCH_REQUIRE(p.value().grad().defined());
      const double d = (p.value().grad() - want[p.key()]).norm().item<double>() /
                       std::max(1e-12, want[p.key()].norm().item<double>());
      CATCH_CHECK(d <= 1e-5);
    }
  }
}

CATCH_TEST_CASE("mtp: training logs each depth's loss, checkpoints load with MTP on or off", "[train][mtp][ckpt]") {
  testing::TempDir dir("mtp-train");
  const auto data_dir = testing::make_corpus(dir);
  auto train = [&](config::Config cfg, const std::string& name, const std::string& extra) {
    cfg.run.out_dir = dir.str(name);
    const auto yaml = testing::write_config(cfg, dir.str(name + ".yaml"));
    auto r = testing::run_command("OMP_NUM_THREADS=1 " + std::string(MOETRAIN_BINARY) + " train --config " + yaml + extra);
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
    return r.output;
  };
  auto cfg = testing::tiny_train_config(data_dir, "");
  cfg.train.steps = 4;
  train(cfg, "off", "");

  // Resumed with MTP modules the checkpoint lacks: they start from their seeded init and train.
  auto on = cfg;
  on.model.mtp_depth = 2;
  on.train.steps = 6;
  CATCH_CHECK_THAT(train(on, "on", " --resume " + dir.str("off")), Contains("has no MTP module mtp.1: it keeps its seeded init"));
  std::ifstream metrics(files::join(dir.str("on"), "metrics.jsonl"));
  std::string line;
  int records = 0;
  while (std::getline(metrics, line)) {
    const auto rec = nlohmann::json::parse(line);
    CATCH_REQUIRE(rec.contains("mtp_loss"));
    CATCH_CHECK(rec["mtp_loss"].size() == 2);
    for (const auto& l : rec["mtp_loss"]) CATCH_CHECK((l.get<double>() > 0 && std::isfinite(l.get<double>())));
    ++records;
  }
  CATCH_CHECK(records == 2);

  // And back: a checkpoint with MTP modules into a model without them leaves them out, saying so.
  auto back = cfg;
  back.train.steps = 8;
  CATCH_CHECK_THAT(train(back, "back", " --resume " + dir.str("on")), Contains("MTP module mtp.0 is not in this model"));
}

CATCH_TEST_CASE("mtp: config keys are validated with their key paths", "[config][mtp]") {
  config::Config cfg;
  cfg.model.mtp_depth = cfg.data.seq_len;
  CATCH_CHECK_THROWS_WITH(config::validate(cfg), Contains("model.mtp_depth = 256 must be less than data.seq_len = 256"));
  cfg.model.mtp_depth = 1;
  cfg.model.mtp_loss_weight = -0.5;
  CATCH_CHECK_THROWS_WITH(config::validate(cfg), Contains("model.mtp_loss_weight"));
  cfg.model.mtp_loss_weight = 0.1;
  CATCH_CHECK_NOTHROW(config::validate(cfg));
}

// `moetrain eval --mtp`: each depth's loss per token over the eval windows (--seq-len L, the last one
// shorter) equals the direct reference above on the same windows. fp32, the same sums in another
// grouping of windows: 1e-5 relative. The token counts are exact: L - k predictions per full window.
CATCH_TEST_CASE("mtp: eval --mtp reports each depth's loss as a direct computation does", "[train][mtp][cli]") {
  testing::TempDir dir("mtp-eval");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  cfg.model = mtp_config(2);
  cfg.model.vocab_size = 256;
  cfg.train.steps = 3;
  cfg.train.eval_every = 0;
  auto run = testing::run_command("OMP_NUM_THREADS=1 " + std::string(MOETRAIN_BINARY) + " train --config " +
                                  testing::write_config(cfg, dir.str("run.yaml")));
  CATCH_INFO(run.output);
  CATCH_REQUIRE(run.exit_code == 0);
  const int L = 12;
  const std::string eval = std::string(MOETRAIN_BINARY) + " eval --checkpoint " + dir.str("run") + " --data " + data_dir +
                           " --seq-len " + std::to_string(L) + " --json";
  auto with = testing::run_command(eval + " --mtp 2>&1"), without = testing::run_command(eval + " 2>&1");
  CATCH_INFO(with.output << without.output);
  CATCH_REQUIRE(with.exit_code == 0);
  CATCH_REQUIRE(without.exit_code == 0);
  const auto got = nlohmann::json::parse(with.output.substr(with.output.find("{\"data\"")));
  const auto plain = nlohmann::json::parse(without.output.substr(without.output.find("{\"data\"")));
  CATCH_CHECK(got["loss"].get<double>() == plain["loss"].get<double>());  // the main loss is the same
  CATCH_CHECK(!plain.contains("mtp_loss"));
  CATCH_REQUIRE(got["mtp_loss"].size() == 2);

  // Direct: every full window in one batch, the short last one alone (when longer than the depth).
  auto loaded = train::load_for_inference(dir.str("run"));
  data::Shard val(files::join(data_dir, "val.bin"));
  std::vector<int64_t> tokens(val.size());
  val.read(0, val.size(), tokens.data());
  const int64_t predictions = int64_t(tokens.size()) - 1, full = predictions / L, last = predictions - full * L;
  auto stream = torch::tensor(tokens);
  std::vector<double> sums(2, 0.0), counts(2, 0.0);
  auto add = [&](int64_t begin, int64_t rows, int64_t len) {
    Batch b;
    b.tokens = torch::empty({rows, len}, torch::kLong);
    b.targets = torch::empty({rows, len}, torch::kLong);
    for (int64_t r = 0; r < rows; ++r) {
      b.tokens[r] = stream.narrow(0, begin + r * L, len);
      b.targets[r] = stream.narrow(0, begin + r * L + 1, len);
    }
    const auto means = reference_mtp_losses(*loaded.model, b);
    for (int k = 1; k <= 2; ++k) {
      sums[size_t(k - 1)] += means[size_t(k - 1)] * double(rows * (len - k));
      counts[size_t(k - 1)] += double(rows * (len - k));
    }
  };
  add(0, full, L);
  if (last > 2) add(full * L, 1, last);
  for (int k = 1; k <= 2; ++k) {
    const double want = sums[size_t(k - 1)] / counts[size_t(k - 1)];
    CATCH_INFO("depth " << k << ": " << got["mtp_loss"][k - 1].get<double>() << " vs " << want);
    CATCH_CHECK(got["mtp_tokens"][k - 1].get<double>() == counts[size_t(k - 1)]);
    CATCH_CHECK(std::abs(got["mtp_loss"][k - 1].get<double>() - want) <= 1e-5 * want);
  }
  // The line form names each depth.
  auto line = testing::run_command(std::string(MOETRAIN_BINARY) + " eval --checkpoint " + dir.str("run") + " --data " +
                                   data_dir + " --mtp 2>&1");
  CATCH_CHECK_THAT(line.output, Contains("| mtp 1 loss ") && Contains("| mtp 2 loss "));

  // A model without MTP modules: one clear line, exit non-zero.
  auto off = cfg;
  off.model.mtp_depth = 0;
  off.run.out_dir = dir.str("off");
  CATCH_REQUIRE(testing::run_command("OMP_NUM_THREADS=1 " + std::string(MOETRAIN_BINARY) + " train --config " +
                                     testing::write_config(off, dir.str("off.yaml")))
                    .exit_code == 0);
  auto refused = testing::run_command(std::string(MOETRAIN_BINARY) + " eval --checkpoint " + dir.str("off") + " --data " +
                                      data_dir + " --mtp 2>&1");
  CATCH_CHECK(refused.exit_code != 0);
  CATCH_CHECK_THAT(refused.output, Contains("--mtp") && Contains("model.mtp_depth = 0"));
}
