// The memory a model's training state needs, from the config: the count by hand for the tiny model,
// no overflow at absurd sizes, and the refusal before allocating in train, generate and eval.
#include <catch2/catch.hpp>

#include <algorithm>

#include "../test_util.h"
#include "common/errors.h"
#include "cost/flops.h"
#include "cost/memory.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {
const std::string kBinary = MOETRAIN_BINARY;
const std::string kTiny = std::string(MOETRAIN_SOURCE_DIR) + "/configs/tiny.yaml";

// stderr only (stdout dropped), with the exit code.
testing::CommandResult stderr_of(const std::string& command) {
  return testing::run_command("{ OMP_NUM_THREADS=1 " + testing::hang_guard() + command + " 2>&1 >/dev/null; }");
}
}  // namespace

CATCH_TEST_CASE("Memory estimate: fp32 weights, gradients and AdamW moments, experts split over ep", "[cost]") {
  const config::ModelConfig m = testing::tiny_model_config();
  const auto p = cost::param_counts(m);
  const auto one = cost::estimate_memory(m, 1);
  CATCH_CHECK(one.params_per_rank == double(p.total));
  CATCH_CHECK(one.weight_bytes == 4.0 * double(p.total));
  CATCH_CHECK(one.gradient_bytes == one.weight_bytes);
  CATCH_CHECK(one.optimizer_bytes == 2 * one.weight_bytes);
  CATCH_CHECK(one.bytes(/*training=*/true) == 16.0 * double(p.total));
  CATCH_CHECK(one.bytes(/*training=*/false) == 4.0 * double(p.total));
  const auto four = cost::estimate_memory(m, 4);  // 4 experts over 4 ranks: one each
  CATCH_CHECK(four.params_per_rank == double(p.total - p.routed_experts + p.routed_experts / 4));
  // ZeRO-1 at world 8, ep 2: replicated moments over 8 replicas, each expert's over its 4 replicas.
  const auto zero = cost::estimate_memory(m, 2, 8, 1);
  const double replicated = double(p.total - p.routed_experts), experts = double(p.routed_experts) / 2;
  CATCH_CHECK(zero.weight_bytes == 4.0 * (replicated + experts));
  CATCH_CHECK(std::abs(zero.optimizer_bytes - 8.0 * (replicated / 8 + experts / 4)) <= 1e-9 * zero.optimizer_bytes);
  CATCH_CHECK(cost::estimate_memory(m, 2, 8, 0).optimizer_bytes == 2 * zero.weight_bytes);
}

CATCH_TEST_CASE("Parameter counts never overflow: an absurd size is a figure, or a ConfigError naming the keys", "[cost]") {
  config::ModelConfig m = testing::tiny_model_config();
  m.d_model = 1000000000;
  m.n_layers = 1000000;
  m.n_heads = 4;
  const auto approx = cost::param_counts_approx(m);
  CATCH_CHECK(approx.total > 1e23);  // 1e6 layers x 1e18 attention weights each, at least
  CATCH_CHECK(std::isfinite(approx.total));
  CATCH_CHECK_THROWS_WITH(cost::param_counts(m), Contains("[config]") && Contains("model.d_model = 1000000000") &&
                                                     Contains("model.n_layers = 1000000") && Contains("64-bit"));
  CATCH_CHECK(cost::estimate_memory(m, 1).bytes(true) > 1e24);
  // A normal model's counts are unchanged by the double path.
  const config::ModelConfig tiny = testing::tiny_model_config();
  CATCH_CHECK(cost::param_counts_approx(tiny).total == double(cost::param_counts(tiny).total));
  CATCH_CHECK(cost::param_counts_approx(tiny).active == double(cost::param_counts(tiny).active));
}

CATCH_TEST_CASE("require_memory refuses a model larger than the memory, naming the keys and the GiB", "[cost]") {
  config::Config cfg;
  cfg.model = testing::tiny_model_config();
  const double need = cost::estimate_memory(cfg.model, 1).bytes(true);
  const double rope = cost::estimate_working_memory(cfg, false).rope_bytes;
  const double batch = cost::estimate_working_memory(cfg, true).micro_batch_bytes;
  cost::require_memory(cfg, 1, true, need + rope + batch, "cpu");  // exactly fits, with the RoPE tables and a micro-batch
  cost::require_memory(cfg, 1, false, need / 4 + rope, "cpu");  // weights only
  CATCH_CHECK_THROWS_WITH(cost::require_memory(cfg, 1, true, need - 1, "cpu"),
                          Contains("[config]") && Contains("model.d_model = 16") && Contains("model.n_layers = 2") &&
                              Contains("GiB") && Contains("weights, gradients and AdamW state") && Contains("cpu") &&
                              Contains("parallel.zero: 1"));
  CATCH_CHECK_THROWS_WITH(cost::require_memory(cfg, 1, false, need / 4 - 1, "cuda"),
                          Contains("fp32 weights alone") && Contains("cuda"));
  CATCH_CHECK(cost::machine_memory_bytes("cpu") > 1e8);
}

CATCH_TEST_CASE("train, bench-step, generate and eval refuse an absurd size in one line before allocating", "[cost][cli]") {
  testing::TempDir dir("memory-cli");
  const std::string run = " --set run.out_dir=" + dir.str("run") + " --set data.dir=" + dir.str("nodata");
  for (const std::string& sizes : {std::string("--set model.d_model=1000000000"),
                                   std::string("--set model.n_layers=100000 --set model.d_model=1024")}) {
    CATCH_INFO(sizes);
    auto r = stderr_of(kBinary + " train --config " + kTiny + run + " " + sizes);
    CATCH_INFO(r.output);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
    CATCH_CHECK_THAT(r.output, Contains("moetrain: [config]") && Contains("model.d_model = ") &&
                                   Contains("model.n_layers = ") && Contains("GiB"));
    CATCH_CHECK_FALSE(Contains("alloc").match(r.output));
    auto bench = stderr_of(kBinary + " bench-step --config " + kTiny + run + " " + sizes + " --steps 1");
    CATCH_INFO(bench.output);
    CATCH_CHECK(bench.exit_code == 1);
    CATCH_CHECK_THAT(bench.output, Contains("GiB") && Contains("model.d_model = "));
  }
}

CATCH_TEST_CASE("generate and eval refuse a checkpoint whose config is too large, before building it", "[cost][cli]") {
  testing::TempDir dir("memory-checkpoint");
  // A real checkpoint of the tiny model, whose manifest's config then claims d_model = 1e9.
  std::string corpus;
  for (int i = 0; i < 400; ++i) corpus += "the router sends token " + std::to_string(i) + " to two experts\n";
  testing::write_bytes(dir.str("corpus.txt"), corpus);
  config::Config cfg;
  cfg.model = testing::tiny_model_config();
  cfg.model.vocab_size = 256;
  cfg.data.dir = dir.str("data");
  cfg.data.seq_len = 16;
  cfg.run.out_dir = dir.str("run");
  cfg.train.steps = 1;
  cfg.train.micro_batch_size = 2;
  testing::write_config(cfg, dir.str("run.yaml"));
  CATCH_REQUIRE(testing::run_command(kBinary + " prepare-data --text " + dir.str("corpus.txt") + " --out " +
                                     dir.str("data")).exit_code == 0);
  CATCH_REQUIRE(testing::run_command("OMP_NUM_THREADS=1 " + testing::hang_guard() + kBinary + " train --config " +
                                     dir.str("run.yaml")).exit_code == 0);
  const std::string manifest_path = dir.str("run/ckpt/step_00000001/manifest.json");
  std::string manifest = files::read_file(manifest_path);
  const std::string from = "d_model: 16\\n", to = "d_model: 1000000000\\n";  // inside a JSON string
  const size_t at = manifest.find(from);
  CATCH_REQUIRE(at != std::string::npos);
  manifest.replace(at, from.size(), to);
  testing::write_bytes(manifest_path, manifest);

  for (const std::string& command : {kBinary + " generate --checkpoint " + dir.str("run") + " --prompt hi",
                                     kBinary + " eval --checkpoint " + dir.str("run") + " --data " + dir.str("data")}) {
    CATCH_INFO(command);
    auto r = stderr_of(command);
    CATCH_INFO(r.output);
    CATCH_CHECK(r.exit_code == 1);
    CATCH_CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
    CATCH_CHECK_THAT(r.output, Contains("moetrain: [config]") && Contains("model.d_model = 1000000000") &&
                                   Contains("fp32 weights alone") && Contains("GiB"));
  }
}
