// Absurd sizes end in one line naming the key, before anything large is allocated or looped over:
// more blocks than any model, a "billion laughs" of YAML aliases, RoPE tables or a micro-batch beyond
// the memory, an HF config.json of huge dimensions. plan and cost still take real large models.
// The CLI runs under a 16 GiB address-space limit, so that a regression fails here instead of
// taking the machine's memory.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "../test_util.h"
#include "common/errors.h"
#include "config/config.h"
#include "cost/memory.h"
#include "hf/hf.h"
#include "model/transformer.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kBinary = MOETRAIN_BINARY;
const std::string kTiny = kSource + "/configs/tiny.yaml";
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// stderr only (stdout dropped), with the exit code; a generous guard against a hang.
testing::CommandResult stderr_of(const std::string& command) {
  return testing::run_command("{ ulimit -v 16777216; OMP_NUM_THREADS=1 " + testing::hang_guard() + command + " 2>&1 >/dev/null; }");
}

// One line, exit 1, no allocator text.
void check_one_line(const testing::CommandResult& r) {
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 1);
  CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
  CATCH_CHECK_FALSE(Contains("alloc").match(r.output));
}

std::string error_of(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
  try {
    config::parse_config(yaml, "configs/x.yaml", overrides);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

// `levels` lists, each of ten aliases of the one before: 10^levels scalars when expanded.
std::string billion_laughs(int levels) {
  std::ostringstream yaml;
  yaml << "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n";
  for (int i = 1; i < levels; ++i) {
    yaml << "l" << i << ": &l" << i << " [";
    for (int k = 0; k < 10; ++k) yaml << (k ? ", " : "") << "*l" << i - 1;
    yaml << "]\n";
  }
  return yaml.str();
}

}  // namespace

CATCH_TEST_CASE("plan and cost refuse model.n_layers beyond 100000 in one line, and still plan real large models",
                "[config][cost][cli]") {
  // Every size huge, and n_layers alone: the layer count is the one named.
  for (const std::string& sizes :
       {std::string("--set model.n_layers=1000000000"),
        std::string("--set model.n_layers=2000000000 --set model.d_model=2000000000 --set model.vocab_size=2000000000 "
                    "--set model.n_heads=1000000000 --set model.moe.n_experts=2000000000 "
                    "--set model.moe.expert_hidden=2000000000 --set model.dense_hidden=2000000000 "
                    "--set model.max_seq_len=2000000000 --set data.seq_len=2000000000")}) {
    CATCH_INFO(sizes);
    for (const std::string& command : {std::string(" plan"), std::string(" cost --tokens 1e12 --mfu 0.4")}) {
      const auto r = stderr_of(kBinary + command + " --config " + kTiny + " " + sizes);
      check_one_line(r);
      CATCH_CHECK_THAT(r.output, Contains("model.n_layers = ") && Contains("must be in [1, 100000]"));
    }
  }
  // At the bound, every other size huge: plan gives figures (far more than any GPU), not a crash.
  const std::string huge = " --set model.n_layers=100000 --set model.d_model=2000000000 --set model.vocab_size=2000000000 "
                           "--set model.n_heads=1000000000 --set model.moe.n_experts=2000000000 "
                           "--set model.moe.expert_hidden=2000000000 --set model.dense_hidden=2000000000 "
                           "--set model.max_seq_len=2000000000 --set data.seq_len=2000000000 --set train.global_batch_size=0 "
                           "--set train.micro_batch_size=2000000000";
  const auto plan = testing::run_command("{ ulimit -v 16777216; " + testing::hang_guard() + kBinary + " plan --gpu h100 --json --config " +
                                         kTiny + huge + "; }");
  CATCH_INFO(plan.output);
  CATCH_REQUIRE(plan.exit_code == 0);
  const auto j = nlohmann::json::parse(plan.output.substr(plan.output.rfind("\n{") + 1));
  CATCH_CHECK(j["peak_bytes"].is_number());
  CATCH_CHECK(std::isfinite(j["peak_bytes"].get<double>()));
  CATCH_CHECK(j["peak_bytes"].get<double>() > 1e30);
  CATCH_CHECK(j["fits"] == false);
  // A count of parameters past 64 bits is refused by cost, naming the keys.
  const auto cost = stderr_of(kBinary + " cost --tokens 1e12 --mfu 0.4 --config " + kTiny + huge);
  check_one_line(cost);
  CATCH_CHECK_THAT(cost.output, Contains("model.d_model = 2000000000") && Contains("64-bit"));

  // A pipeline over many blocks: balancing it by FLOPs is refused, naming the keys; given per stage, it plans.
  const std::string deep = " --set model.n_layers=100000 --set model.d_model=64 --set model.n_heads=4 "
                           "--set model.n_kv_heads=2 --set parallel.pipeline_parallel=4 --set train.grad_accum=4 "
                           "--set train.global_batch_size=0 --set train.micro_batch_size=1";
  const auto balance = stderr_of(kBinary + " plan --gpus 4 --config " + kTiny + deep);
  check_one_line(balance);
  CATCH_CHECK_THAT(balance.output, Contains("parallel.pipeline_parallel = 4") && Contains("model.n_layers = 100000") &&
                                       Contains("parallel.pp_layers"));
  const auto given = stderr_of(kBinary + " plan --gpus 4 --config " + kTiny + deep +
                               " --set 'parallel.pp_layers=\"25000,25000,25000,25000\"'");
  CATCH_INFO(given.output);
  CATCH_CHECK(given.exit_code == 0);

  // Real large models still plan and cost (they are never allocated): DeepSeek-V3 at its published layout.
  const std::string v3 = kSource + "/configs/deepseek-v3-671b.yaml";
  CATCH_CHECK(stderr_of(kBinary + " plan --gpu h800 --gpus 2048 --config " + v3 + " --set parallel.expert_parallel=64 "
                        "--set parallel.pipeline_parallel=16 --set parallel.zero=1 --set train.global_batch_size=15360 "
                        "--set train.micro_batch_size=1 --set train.grad_accum=0").exit_code == 0);
  CATCH_CHECK(stderr_of(kBinary + " cost --tokens 14.8e12 --gpu h800 --gpu-hours 2.664e6 --config " + v3).exit_code == 0);
}

CATCH_TEST_CASE("YAML aliases that expand past 100000 nodes are refused naming the file, modest aliases still work",
                "[config]") {
  // Ten levels: 10^10 nodes when walked. Through the CLI, with a generous guard against a hang.
  testing::TempDir dir("absurd-laughs");
  const std::string path = dir.str("laughs.yaml");
  testing::write_bytes(path, billion_laughs(10));
  CATCH_CHECK(files::read_file(path).size() < 1100);
  const auto r = stderr_of(kBinary + " config --config " + path);
  check_one_line(r);
  CATCH_CHECK_THAT(r.output, Contains("moetrain: [config] " + path + ":") && Contains("more than 100000 nodes") &&
                                 Contains("alias"));
  // In process (eight levels), inside a known key and in a --set value.
  std::string nested = "[&a [x, x, x, x, x, x, x, x, x, x]";
  for (char level = 'b'; level <= 'h'; ++level) {
    nested += std::string(", &") + level + " [";
    for (int k = 0; k < 10; ++k) nested += std::string(k ? ", " : "") + "*" + char(level - 1);
    nested += "]";
  }
  nested += "]";
  CATCH_CHECK_THAT(error_of("run:\n  name: " + nested + "\n"), Contains("configs/x.yaml:") && Contains("100000 nodes"));
  CATCH_CHECK_THAT(error_of("", {"run.name=" + nested}), Contains("--set run.name=") && Contains("100000 nodes"));
  // An anchor reused a few times is fine.
  const auto cfg = config::parse_config("optim:\n  lr: &lr 0.002\n  min_lr: *lr\n", "x.yaml");
  CATCH_CHECK(cfg.optim.min_lr == cfg.optim.lr);
}

CATCH_TEST_CASE("model.max_seq_len and the micro-batch count in the size pre-check: RoPE tables, logits, block inputs",
                "[config][cost]") {
  config::Config cfg;
  cfg.model = testing::tiny_model_config();  // head_dim 4
  cost::require_memory(cfg, 1, true, 64 * kGiB, "cpu");

  // 1e9 positions x 4 rotated dims: fp32 cos and sin and the fp64 angles, 16 bytes each.
  cfg.model.max_seq_len = 1000000000;
  const auto w = cost::estimate_working_memory(cfg, /*training=*/false);
  CATCH_CHECK(w.rope_bytes == 1e9 * 4 * 16);
  CATCH_CHECK(w.micro_batch_bytes == 0);
  CATCH_CHECK_THROWS_WITH(cost::require_memory(cfg, 1, /*training=*/false, 32 * kGiB, "cpu"),
                          Contains("[config] model.max_seq_len = 1000000000 (RoPE tables: 59.6 GiB)") &&
                              Contains("fp32 weights") && Contains("32.0 GiB") && Contains("cpu") &&
                              Contains("make model.max_seq_len smaller"));
  cost::require_memory(cfg, 1, false, 64 * kGiB, "cpu");
  cfg.model.max_seq_len = 16;

  // One micro-batch: fp32 logits (tokens x vocab 32) and each block's fp32 input (tokens x d_model 16 x 2 blocks).
  cfg.data.seq_len = 16;
  cfg.train.micro_batch_size = 100000000;
  const double tokens = 1.6e9;
  CATCH_CHECK(cost::estimate_working_memory(cfg, true).micro_batch_bytes == tokens * (4 * 32 + 4 * 16 * 2));
  CATCH_CHECK(cost::estimate_working_memory(cfg, false).micro_batch_bytes == 0);
  CATCH_CHECK_THROWS_WITH(cost::require_memory(cfg, 1, true, 64 * kGiB, "cuda"),
                          Contains("one micro-batch of train.micro_batch_size = 100000000 x data.seq_len = 16 tokens") &&
                              Contains("GiB") && Contains("cuda") &&
                              Contains("make train.micro_batch_size or data.seq_len smaller"));
  // Chunked logits: one chunk's rows.
  cfg.train.loss_chunk_tokens = 1024;
  CATCH_CHECK(cost::estimate_working_memory(cfg, true).micro_batch_bytes == 4.0 * 1024 * 32 + tokens * 4 * 16 * 2);
  // A pipeline: the larger of the largest stage's block inputs and the last stage's logits.
  cfg.parallel.pipeline_parallel = 2;
  CATCH_CHECK(cost::estimate_working_memory(cfg, true).micro_batch_bytes == tokens * 4 * 16 * 1);
}

CATCH_TEST_CASE("train refuses model.max_seq_len, data.seq_len or a micro-batch beyond the memory, before allocating",
                "[config][cost][cli]") {
  testing::TempDir dir("absurd-train");
  const std::string run = " --set run.out_dir=" + dir.str("run") + " --set data.dir=" + dir.str("nodata");
  struct Case {
    std::string sizes, named;
  };
  // Sizes beyond any machine's memory (terabytes), each named with its GiB.
  for (const auto& c : {Case{"--set model.max_seq_len=1000000000 --set model.head_dim=512", "model.max_seq_len = 1000000000 (RoPE tables: "},
                        Case{"--set model.max_seq_len=1000000000 --set data.seq_len=1000000000",
                             "train.micro_batch_size = 16 x data.seq_len = 1000000000 tokens"},
                        Case{"--set train.global_batch_size=0 --set train.micro_batch_size=100000000",
                             "train.micro_batch_size = 100000000 x data.seq_len = 256 tokens"}}) {
    CATCH_INFO(c.sizes);
    for (const std::string& command : {std::string(" train"), std::string(" bench-step --steps 1")}) {
      const auto r = stderr_of(kBinary + command + " --config " + kTiny + run + " " + c.sizes);
      check_one_line(r);
      CATCH_CHECK_THAT(r.output, Contains("moetrain: [config] ") && Contains(c.named) && Contains("GiB") &&
                                     Contains("more than the "));
    }
  }
}

CATCH_TEST_CASE("A micro-batch that passes the floor but not the allocator ends in one out-of-memory line",
                "[config][cost][cli]") {
  testing::TempDir dir("absurd-oom");
  std::string corpus;
  for (int i = 0; i < 20000; ++i) corpus += "the router sends token " + std::to_string(i) + " to two experts\n";
  testing::write_bytes(dir.str("corpus.txt"), corpus);
  CATCH_REQUIRE(testing::run_command(kBinary + " prepare-data --text " + dir.str("corpus.txt") + " --out " +
                                     dir.str("data")).exit_code == 0);
  // 1600 x 256 tokens: a floor of about 2 GiB, under the 8 GiB limit; the activations need far more.
  const auto r = testing::run_command("{ ulimit -v 8388608; OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " train --config " +
                                      kTiny + " --set run.out_dir=" + dir.str("run") + " --set data.dir=" + dir.str("data") +
                                      " --set train.global_batch_size=0 --set train.micro_batch_size=1600 "
                                      "--set train.steps=1 2>&1 >/dev/null; }");
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code == 1);
  // The start-up lines, then the error's one line; the allocator's own words only after "tried to allocate".
  CATCH_REQUIRE(r.output.size() > 1);
  const std::string last = r.output.substr(r.output.rfind('\n', r.output.size() - 2) + 1);
  CATCH_CHECK_THAT(last, Contains("moetrain: out of memory (tried to allocate ") && Contains("moetrain plan") &&
                             Contains("train.micro_batch_size"));
  CATCH_CHECK_FALSE(Contains("DefaultCPUAllocator").match(r.output));
  CATCH_CHECK_FALSE(Contains("bad_alloc").match(r.output));
}

CATCH_TEST_CASE("An HF config.json of huge dimensions is refused naming the file, before the model is built",
                "[hf][cli]") {
  testing::TempDir dir("absurd-hf");
  const std::string hf_dir = dir.str("hf");
  auto m = testing::tiny_model_config();
  m.dense_layers = 0;
  m.moe.n_shared_experts = 0;
  m.tie_embeddings = false;
  model::Transformer model(m);
  model->init_weights(3);
  hf::export_model(*model, hf::Family::Mixtral, hf_dir);
  const std::string config_path = files::join(hf_dir, "config.json");
  const auto original = nlohmann::json::parse(files::read_file(config_path));
  auto with = [&](const nlohmann::json& fields) {
    auto j = original;
    j.update(fields);
    testing::write_bytes(config_path, j.dump());
  };
  const std::string generate = kBinary + " generate --checkpoint hf:" + hf_dir + " --prompt-ids 1,2 --print-ids --max-new-tokens 1";

  // Terabytes of weights; of RoPE tables; more blocks than model.n_layers allows.
  with({{"hidden_size", 2000000000}, {"intermediate_size", 2000000000}});
  auto r = stderr_of(generate);
  check_one_line(r);
  CATCH_CHECK_THAT(r.output, Contains("moetrain: [hf] " + config_path + ": the model (") &&
                                 Contains("model.d_model = 2000000000") && Contains("GiB"));
  const auto convert = stderr_of(kBinary + " convert --from hf:" + hf_dir + " --to " + dir.str("run"));
  check_one_line(convert);
  CATCH_CHECK_THAT(convert.output, Contains("[hf] " + config_path) && Contains("model.d_model = 2000000000"));

  with({{"max_position_embeddings", 2000000000}, {"head_dim", 1024}});
  r = stderr_of(generate);
  check_one_line(r);
  CATCH_CHECK_THAT(r.output, Contains("[hf] " + config_path + ": model.max_seq_len = 2000000000 (RoPE tables: "));

  with({{"num_hidden_layers", 1000000000}});
  r = stderr_of(generate);
  check_one_line(r);
  CATCH_CHECK_THAT(r.output, Contains("[hf] " + config_path + ": model.n_layers = 1000000000 must be in [1, 100000]"));
  // train with model.init_from names the key too, before building.
  r = stderr_of(kBinary + " train --config " + kTiny + " --set model.init_from=hf:" + hf_dir + " --set run.out_dir=" +
                dir.str("ft"));
  check_one_line(r);
  CATCH_CHECK_THAT(r.output, Contains("model.n_layers = 1000000000 must be in [1, 100000]"));

  // The folder as written loads.
  testing::write_bytes(config_path, original.dump());
  CATCH_CHECK(hf::load(hf_dir).model->param_counts().total > 0);
}
