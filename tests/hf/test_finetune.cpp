// Fine-tuning an imported model on prompt/response data: the example configs load against a tiny model
// of their family, and 10 steps on a masked shard written by scripts/prepare_data.py lower the response
// loss that `moetrain eval` reports (which honours the mask).
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>
#include <random>

#include "../test_util.h"
#include "cost/flops.h"
#include "data/shard.h"
#include "hf/hf.h"
#include "train/trainer.h"

using Catch::Matchers::Contains;
using namespace moetrain;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kBinary = MOETRAIN_BINARY;
const std::string kPython = kSource + "/third_party/venv/bin/python ";

// A tiny model with the features of `family`, exported as a Hugging Face folder (no Python needed).
void write_tiny_family(hf::Family family, const std::string& dir, int vocab_size = 32, int max_seq_len = 16) {
  auto m = testing::tiny_model_config();
  m.vocab_size = vocab_size;
  m.max_seq_len = max_seq_len;
  m.dense_layers = 0;
  m.moe.n_shared_experts = 0;
  m.tie_embeddings = false;
  switch (family) {
    case hf::Family::Mixtral:
      break;
    case hf::Family::Olmoe:
      m.qk_norm = "full";
      break;
    case hf::Family::Qwen3Moe:
      m.qk_norm = "head";
      break;
    case hf::Family::Qwen2Moe:
      m.attn_bias = "qkv";
      m.moe.n_shared_experts = 1;
      m.moe.shared_gate = true;
      break;
    case hf::Family::DeepseekV2:  // softmax, greedy: V2-Lite's routing
      m.attention = "mla";
      m.mla.q_lora_rank = 0;
      m.mla.kv_lora_rank = 8;
      m.mla.qk_nope_head_dim = 4;
      m.mla.qk_rope_head_dim = 4;
      m.mla.v_head_dim = 4;
      m.moe.router.normalize_topk = false;
      break;
    case hf::Family::Glm4Moe:  // partial RoPE, q/k/v biases, sigmoid routing with its bias, a shared expert
      m.rotary_dim = 2;
      m.attn_bias = "qkv";
      m.moe.router.score_func = "sigmoid";
      m.moe.router.selection_bias = true;
      m.moe.n_shared_experts = 1;
      m.dense_layers = 1;
      break;
    case hf::Family::GptOss:  // sinks, alternating windows, every bias, the clamped SwiGLU
      m.attn_bias = "all";
      m.attention_sinks = true;
      m.sliding_window = 4;
      m.layer_types = {"sliding", "full"};
      m.moe.activation = "swiglu_clamped";
      m.moe.expert_bias = true;
      m.moe.router.logit_bias = true;
      break;
    case hf::Family::DeepseekV3:
      m.attention = "mla";
      m.mla.q_lora_rank = 0;
      m.mla.kv_lora_rank = 8;
      m.mla.qk_nope_head_dim = 4;
      m.mla.qk_rope_head_dim = 4;
      m.mla.v_head_dim = 4;
      m.moe.router.score_func = "sigmoid";
      break;
  }
  model::Transformer model(m);
  model->init_weights(5);
  hf::export_model(*model, family, dir);
}

testing::CommandResult run(const std::string& args) { return testing::run_command(kBinary + " " + args); }

}  // namespace

CATCH_TEST_CASE("finetune configs: each example loads, and resolves against a tiny model of its family", "[hf]") {
  testing::TempDir dir("finetune-configs");
  const std::vector<std::pair<std::string, hf::Family>> examples = {
      {"olmoe", hf::Family::Olmoe},         {"mixtral", hf::Family::Mixtral},
      {"qwen2-moe", hf::Family::Qwen2Moe},  {"qwen3-moe", hf::Family::Qwen3Moe},
      {"deepseek-v3", hf::Family::DeepseekV3}, {"deepseek-v2-lite", hf::Family::DeepseekV2},
      {"glm-4.5-air", hf::Family::Glm4Moe}, {"gpt-oss-20b", hf::Family::GptOss},
      {"gpt-oss-120b", hf::Family::GptOss}};
  for (const auto& [name, family] : examples) {
    CATCH_INFO(name);
    const std::string file = kSource + "/configs/finetune-" + name + ".yaml";
    // The config command needs no model folder: init_from is a placeholder until train reads it.
    const auto r = run("config --config " + file);
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
    CATCH_CHECK_THAT(r.output, Contains("init_from: \"hf:models/"));

    const std::string hf_dir = dir.str(name);
    write_tiny_family(family, hf_dir);
    auto cfg = config::load_config(file, {"model.init_from=hf:" + hf_dir});
    CATCH_CHECK(cfg.optim.lr <= 1e-4);
    CATCH_CHECK(cfg.train.steps <= 1000);
    cfg = hf::resolve_init_from(cfg);
    CATCH_CHECK(hf::read_config(hf_dir).family == family);
    CATCH_CHECK(cfg.model.d_model == 16);
    CATCH_CHECK(cfg.data.seq_len == 16);  // clamped to the tiny model's context
    CATCH_CHECK(cfg.model.init_from == "hf:" + hf_dir);

    // The templates speak of several GPUs: each resolves to the same 32 sequences per step at 1, 2, 4
    // and 8 ranks (the micro-batch stays 1, the accumulation is derived), and says so through the CLI.
    for (int world : {1, 2, 4, 8}) {
      CATCH_INFO("world " << world);
      const auto at_world = config::for_world_size(cfg, world);
      CATCH_CHECK(at_world.train.micro_batch_size == 1);
      CATCH_CHECK(int64_t(at_world.train.micro_batch_size) * at_world.train.grad_accum * world == 32);
      const auto printed = run("config --config " + file + " --world-size " + std::to_string(world));
      CATCH_CHECK(printed.exit_code == 0);
      CATCH_CHECK_THAT(printed.output, Contains("grad_accum: " + std::to_string(32 / world)));
    }
  }
}

CATCH_TEST_CASE("finetune: every command builds the checkpoint's architecture from model.init_from", "[hf]") {
  testing::TempDir dir("finetune-init-from");
  const std::string hf_dir = dir.str("qwen3");
  write_tiny_family(hf::Family::Qwen3Moe, hf_dir);
  const std::string config = kSource + "/configs/finetune-qwen3-moe.yaml --set model.init_from=hf:" + hf_dir +
                             " --set run.device=cpu --set run.dtype=fp32 --set run.threads=1";
  const int64_t params = hf::load(hf_dir).model->param_counts().total;

  // bench-step on a fine-tune config times the imported model (it used to build the template's
  // placeholder architecture and fail: "tensor ... maps to no parameter").
  const auto bench = run("bench-step --config " + config + " --set train.global_batch_size=2 --warmup 1 --steps 1 --json");
  CATCH_INFO(bench.output);
  CATCH_REQUIRE(bench.exit_code == 0);
  // The JSON object is the output's last line (it nests objects: host_syncs_by_reason).
  const auto j = nlohmann::json::parse(bench.output.substr(bench.output.rfind("\n{\"") + 1));
  CATCH_CHECK(j["params_total"].get<int64_t>() == params);

  // cost counts the same model.
  const auto cost = run("cost --config " + config + " --mfu 0.4 --tokens 1e9 --gpu h100 --json");
  CATCH_INFO(cost.output);
  CATCH_REQUIRE(cost.exit_code == 0);
  const auto c = nlohmann::json::parse(cost.output.substr(cost.output.rfind("{\"")));
  CATCH_CHECK(c["params_total"].get<double>() == double(cost::param_counts(hf::read_config(hf_dir).model).total));

  // config prints the resolved architecture when the folder is there, the template's without it.
  const auto printed = run("config --config " + config);
  CATCH_CHECK(printed.exit_code == 0);
  CATCH_CHECK_THAT(printed.output, Contains("d_model: 16"));
  const auto absent = run("config --config " + kSource + "/configs/finetune-qwen3-moe.yaml");
  CATCH_CHECK(absent.exit_code == 0);
  CATCH_CHECK_THAT(absent.output, Contains("note: model.init_from") && !Contains("d_model: 16"));
}

CATCH_TEST_CASE("finetune: 10 steps on a prompt/response shard lower the response loss moetrain eval reports",
                "[hf][python]") {
  testing::TempDir dir("finetune-pairs");
  const std::string hf_dir = dir.str("hf");
  write_tiny_family(hf::Family::Mixtral, hf_dir, /*vocab_size=*/64, /*max_seq_len=*/32);
  // Its tokenizer: words w0 .. w59, [UNK] = 60, <eos> = 61.
  auto r = testing::run_command(kPython + kSource + "/tests/data/tokenizer_fixture.py words " + hf_dir + " 60");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);

  // Responses follow from their prompts: w(40 + a % 10) w(50 + b % 10) after "w(a) w(b) w(c)".
  std::mt19937 rng(11);
  std::string jsonl;
  for (int i = 0; i < 300; ++i) {
    const int a = int(rng() % 40), b = int(rng() % 40), c = int(rng() % 40);
    const std::string prompt = "w" + std::to_string(a) + " w" + std::to_string(b) + " w" + std::to_string(c);
    const std::string response = "w" + std::to_string(40 + a % 10) + " w" + std::to_string(50 + b % 10);
    jsonl += nlohmann::json{{"prompt", prompt}, {"response", response}}.dump() + "\n";
  }
  testing::write_bytes(dir.str("pairs.jsonl"), jsonl);
  r = testing::run_command(kPython + kSource + "/scripts/prepare_data.py --tokenizer " + hf_dir + " --input " +
                           dir.str("pairs.jsonl") + " --out " + dir.str("data") + " --val-fraction 0.1 --append-eos");
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);

  auto eval = [&](const std::string& checkpoint, const std::string& data) {
    const auto e = run("eval --checkpoint " + checkpoint + " --data " + data + " --seq-len 30 --json");
    CATCH_INFO(e.output);
    CATCH_REQUIRE(e.exit_code == 0);
    return nlohmann::json::parse(e.output);
  };
  const auto before = eval("hf:" + hf_dir, dir.str("data"));
  // 30 records in val.bin: 3 response tokens each (two words and the EOS) are learned.
  CATCH_CHECK(before["tokens"] == 90);
  CATCH_CHECK(before["mask"].get<std::string>() == dir.str("data/val.mask.bin"));

  config::Config cfg;
  cfg.model.init_from = "hf:" + hf_dir;
  cfg.data.dir = dir.str("data");
  cfg.data.seq_len = 30;
  cfg.run.out_dir = dir.str("run");
  cfg.run.threads = 1;
  cfg.train.steps = 10;
  cfg.train.micro_batch_size = 8;
  cfg.train.log_every = 5;
  cfg.train.eval_every = 0;
  cfg.train.eval_batches = 1;
  cfg.optim.warmup_steps = 2;
  cfg.optim.lr = 1e-2;
  cfg = hf::resolve_init_from(cfg);
  const auto result = train::train(cfg, {});
  CATCH_REQUIRE(result.losses.size() == 10);

  const auto after = eval(dir.str("run"), dir.str("data"));
  std::printf("[finetune] response loss before %.4f, after 10 steps %.4f\n", before["loss"].get<double>(),
              after["loss"].get<double>());
  CATCH_CHECK(after["loss"].get<double>() < before["loss"].get<double>() - 0.3);

  // Without its mask the same shard counts every prediction: a different figure over more tokens.
  files::make_directories(dir.str("unmasked"));
  testing::write_bytes(dir.str("unmasked/val.bin"), files::read_file(dir.str("data/val.bin")));
  const auto unmasked = eval(dir.str("run"), dir.str("unmasked"));
  CATCH_CHECK(unmasked["tokens"].get<int>() > 90);
  CATCH_CHECK(unmasked["mask"].is_null());
  CATCH_CHECK(std::abs(unmasked["loss"].get<double>() - after["loss"].get<double>()) > 1e-3);
}
