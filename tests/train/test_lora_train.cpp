// Training with LoRA (train.lora): only the adapters move and hold optimizer state, the base stays as it
// was (held in the compute dtype under bf16); checkpoints hold the adapters and resume bit for bit, and
// refuse another base; expert parallelism gives the one-process run; merged weights give its logits.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "data/blend.h"
#include "hf/hf.h"
#include "moe/lora.h"
#include "train/generate.h"
#include "train/step.h"
#include "train/trainer.h"
#include "../dist/dist_fixture.h"

using namespace moetrain;

namespace {

void with_lora(config::Config& cfg, int rank = 4) {
  cfg.train.lora.rank = rank;
  cfg.train.lora.alpha = 8;
  cfg.optim.lr = 1e-2;
}

// The tiny model as Mixtral's family can hold it (every block MoE, no shared expert): Hugging Face
// folders in and out.
void exportable(config::ModelConfig& m) {
  m.dense_layers = 0;
  m.moe.n_shared_experts = 0;
}

// A Hugging Face folder holding the tiny model's weights as init_weights(seed) draws them: a LoRA base.
std::string make_base(const config::ModelConfig& m, uint64_t seed, const std::string& dir) {
  model::Transformer base(m);
  base->init_weights(seed);
  hf::export_model(*base, hf::infer_family(m), dir);
  return "hf:" + dir;
}

}  // namespace

CATCH_TEST_CASE("LoRA training moves only the adapters: the base gets no gradient, no state and stays bit for bit",
                "[train][lora]") {
  testing::TempDir dir("lora-frozen");
  const auto data_dir = testing::make_corpus(dir);
  for (const std::string dtype : {"fp32", "bf16"}) {
    CATCH_INFO("run.dtype " << dtype);
    auto cfg = testing::tiny_train_config(data_dir, dir.str("run-" + dtype));
    with_lora(cfg);
    cfg.run.dtype = dtype;
    const train::Process process(cfg);
    train::Trainable trainable(process);
    auto& model = *trainable.model;
    std::map<std::string, torch::Tensor> before;
    for (const auto& p : model.named_parameters()) before[p.key()] = p.value().detach().clone();
    data::Blend blend = data::open_blend(process.cfg.data, process.cfg.model.vocab_size);
    data::Sampler sampler(blend, {cfg.run.seed, cfg.data.seq_len, cfg.train.micro_batch_size, process.cfg.train.grad_accum,
                                  0, 1});
    for (int64_t step = 0; step < 3; ++step) {
      const auto outcome = train::train_step(model, *trainable.optimizer, trainable.parallel, process.cfg, step, 1e-2,
                                             process.device, [&](int micro) { return sampler.batch(step, micro); });
      CATCH_REQUIRE(outcome.applied);
    }
    int64_t adapters = 0;
    for (const auto& p : model.named_parameters()) {
      CATCH_INFO(p.key());
      if (moe::is_lora_name(p.key())) {
        ++adapters;
        CATCH_CHECK(p.value().scalar_type() == torch::kFloat);  // adapters train in fp32
        CATCH_CHECK(!torch::equal(p.value(), before[p.key()]));
        continue;
      }
      CATCH_CHECK(!p.value().requires_grad());
      CATCH_CHECK(!p.value().grad().defined());
      CATCH_CHECK(torch::equal(p.value().to(before[p.key()].scalar_type()), before[p.key()]));
      // Under bf16 the frozen matmul weights are held in bf16 (no fp32 copy); norms, routers, the embedding stay fp32.
      const bool fp32_use = p.key().find("norm") != std::string::npos || p.key().find("router") != std::string::npos ||
                            p.key() == "embed";
      CATCH_CHECK(p.value().scalar_type() == (dtype == "bf16" && !fp32_use ? torch::kBFloat16 : torch::kFloat));
    }
    CATCH_CHECK(adapters > 0);
    CATCH_CHECK(int64_t(trainable.parallel.params().size()) == adapters);
    const auto state = trainable.optimizer->checkpoint_state();
    CATCH_CHECK(int64_t(state.states.size()) == adapters);
    for (const auto& s : state.states) CATCH_CHECK(moe::is_lora_name(s.name));
    CATCH_CHECK(int64_t(trainable.optimizer->state_tensors().size()) == 2 * adapters);
  }
}

CATCH_TEST_CASE("LoRA with full activation checkpointing trains as without it, bit for bit", "[train][lora]") {
  testing::TempDir dir("lora-recompute");
  const auto data_dir = testing::make_corpus(dir);
  auto plain = testing::tiny_train_config(data_dir, dir.str("plain"));
  with_lora(plain);
  plain.train.steps = 3;
  auto recomputed = plain;
  recomputed.run.out_dir = dir.str("recomputed");
  recomputed.train.activation_checkpointing = "full";
  const auto a = train::train(plain, {}), b = train::train(recomputed, {});
  CATCH_REQUIRE(a.losses.size() == 3);
  CATCH_CHECK(a.losses == b.losses);
}

CATCH_TEST_CASE("A LoRA checkpoint holds the adapters and a reference to the base, resumes bit for bit, and refuses "
                "another base", "[train][lora]") {
  testing::TempDir dir("lora-resume");
  const auto data_dir = testing::make_corpus(dir);
  auto straight = testing::tiny_train_config(data_dir, dir.str("straight"));
  with_lora(straight);
  exportable(straight.model);
  straight.train.lora.dropout = 0.1;  // the dropout masks come from the generator the checkpoint keeps
  straight.model.init_from = make_base(straight.model, 77, dir.str("base"));
  straight.train.steps = 6;
  const auto full = train::train(straight, {});
  CATCH_REQUIRE(full.losses.size() == 6);

  const auto resumed = testing::check_resume_joins(straight, full, dir.str("resumed"), 3, [&] {
    // The checkpoint: adapters (and buffers) only, their moments only, and the base named with its fingerprint.
    const std::string step_dir = dir.str("resumed/ckpt/step_00000003");
    const auto manifest = ckpt::read_manifest(step_dir);
    CATCH_REQUIRE(manifest.lora_base);
    CATCH_CHECK(manifest.lora_base->init_from == straight.model.init_from);
    CATCH_CHECK(manifest.lora_base->fingerprint.rfind("sha256:", 0) == 0);
    for (const auto& f : manifest.files) {
      if (f.name.rfind("rng-", 0) == 0) continue;
      ckpt::SafetensorsFile file(files::join(step_dir, f.name));
      for (const auto& info : file.tensors()) {
        CATCH_INFO(f.name << ": " << info.name);
        CATCH_CHECK((info.name.find("_lora_") != std::string::npos || info.name.find("bias") != std::string::npos));
      }
    }
  });

  // The same run folder resumed on another base (another seed's weights, the same architecture): refused.
  auto other = resumed.second_cfg;
  other.train.steps = 8;
  other.model.init_from = make_base(straight.model, 78, dir.str("other-base"));
  try {
    train::train(other, {"auto"});
    CATCH_FAIL("resumed on another base");
  } catch (const Error& e) {
    const std::string what = e.what();
    CATCH_CHECK(testing::one_line(what));
    CATCH_CHECK_THAT(what, Catch::Matchers::Contains(straight.model.init_from) &&
                               Catch::Matchers::Contains(other.model.init_from));
  }
}

CATCH_TEST_CASE("LoRA training under expert parallelism (world 2, ep 2), ZeRO-1 and a 2-stage pipeline equals one process",
                "[train][lora][multiproc]") {
  testing::TempDir dir("lora-ep");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::equivalence_config(data_dir, dir.str("single"));
  with_lora(cfg);
  const auto single = testing::train_at(cfg, 1, 1);
  CATCH_INFO(single.output.substr(single.output.size() > 2000 ? single.output.size() - 2000 : 0));
  CATCH_REQUIRE(single.exit_code == 0);
  auto ep = cfg;
  ep.run.out_dir = dir.str("ep2");
  // Losses within 1e-5 relative, the adapters within 1e-5 and their moments within 1e-4 (check_same_run):
  // the ranks sum the same values in another order.
  testing::check_same_run(testing::train_at(ep, 2, 2), single, "world 2, ep 2");
  auto zero = cfg;
  zero.run.out_dir = dir.str("zero1");
  zero.parallel.zero = 1;
  testing::check_same_run(testing::train_at(zero, 2, 1), single, "world 2, zero 1");
  auto pipeline = cfg;
  pipeline.run.out_dir = dir.str("pp2");
  pipeline.parallel.pipeline_parallel = 2;
  testing::check_same_run(testing::train_at(pipeline, 2, 1), single, "world 2, pipeline 2");
}

CATCH_TEST_CASE("convert --merge-lora writes weights that give the LoRA model's logits", "[train][lora]") {
  testing::TempDir dir("lora-merge");
  const auto data_dir = testing::make_corpus(dir);
  auto cfg = testing::tiny_train_config(data_dir, dir.str("run"));
  with_lora(cfg);
  exportable(cfg.model);
  cfg.train.steps = 3;
  train::train(cfg, {});
  const auto adapted = train::load_for_inference(dir.str("run"));
  CATCH_REQUIRE(adapted.model->lora_enabled());

  const std::string binary = MOETRAIN_BINARY;
  const auto refused = testing::run_command(binary + " convert --from " + dir.str("run") + " --to " + dir.str("plain"));
  CATCH_CHECK(refused.exit_code != 0);
  CATCH_CHECK_THAT(refused.output, Catch::Matchers::Contains("--merge-lora"));
  for (const std::string to : {dir.str("merged"), "hf:" + dir.str("merged-hf")}) {
    CATCH_INFO(to);
    const auto r = testing::run_command(binary + " convert --merge-lora --from " + dir.str("run") + " --to " + to);
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
    const auto merged = train::load_for_inference(to);
    CATCH_CHECK(!merged.model->lora_enabled());
    const auto tokens = torch::randint(0, cfg.model.vocab_size, {2, 12}, torch::kLong);
    torch::NoGradGuard no_grad;
    const auto want = adapted.model->forward(tokens).logits_BSV, got = merged.model->forward(tokens).logits_BSV;
    // fp32: x (W + s A B) against x W + (x A) s B, a few ulps of logits of size ~1.
    CATCH_CHECK((got - want).abs().max().item<double>() < 1e-4);
  }
}
