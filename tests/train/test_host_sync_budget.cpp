// The host-sync budget: what a GPU step would make the host wait for, counted on the CPU through
// common/host_sync.h (the counter follows the code path, so a CPU run counts what a GPU run does).
// Issue 24's bar: an expert-parallel step of tiny.yaml makes at most 2 host syncs per MoE layer per
// micro-batch (forward and backward together) plus at most 4 per optimizer step; under full
// activation checkpointing at most 4 per MoE layer per micro-batch. Before the asynchronous step the
// same (world 2, ep 2, grad_accum 2) step made 122 (README, "The GPU step").
#include <catch2/catch.hpp>

#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "common/host_sync.h"
#include "train/trainer.h"
#include "train_fixture.h"

namespace {

using namespace moetrain;
using json = nlohmann::json;

// bench-step --json of configs/tiny.yaml at `world` ranks (expert parallel over all of them): rank 0's
// JSON object (the one bench-step prints).
json bench_step(int world, const std::string& extra) {
  const std::string command = "OMP_NUM_THREADS=1 " + testing::hang_guard() + std::string(MOETRAIN_SOURCE_DIR) +
                              "/scripts/launch.sh --nproc " + std::to_string(world) + " -- " + MOETRAIN_BINARY +
                              " bench-step --config " + MOETRAIN_SOURCE_DIR + "/configs/tiny.yaml --json --warmup 1" +
                              " --steps 2 --set parallel.expert_parallel=" + std::to_string(world) +
                              " --set train.grad_accum=2 --set train.global_batch_size=8 --set data.seq_len=64" +
                              " --set run.threads=1 " + extra;
  const auto r = testing::run_command(command);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
  json rank0;
  std::istringstream lines(r.output);
  const std::string prefix = "[rank 0] {";
  for (std::string line; std::getline(lines, line);)
    if (line.rfind(prefix, 0) == 0) rank0 = json::parse(line.substr(prefix.size() - 1));
  CATCH_REQUIRE(rank0.is_object());
  return rank0;
}

double reason(const json& j, const std::string& name) {
  const auto& by = j.at("host_syncs_by_reason");
  return by.contains(name) ? by.at(name).get<double>() : 0.0;
}

}  // namespace

CATCH_TEST_CASE("host-sync budget: an expert-parallel step of tiny.yaml waits at most twice per MoE layer per micro-batch",
                "[train][host_sync]") {
  for (const bool full : {false, true}) {
    CATCH_SECTION(full ? "with full activation checkpointing" : "without activation checkpointing") {
      const auto j = bench_step(2, full ? "--set train.activation_checkpointing=full" : "");
      {
        CATCH_INFO(j.dump());
        const double layers = j.at("moe_layers").get<double>(), micro = j.at("grad_accum").get<double>();
        CATCH_REQUIRE(layers == 3);
        CATCH_REQUIRE(micro == 2);
        const double per_layer = full ? 4 : 2;
        CATCH_CHECK(j.at("host_syncs_per_step").get<double>() <= per_layer * layers * micro + 4);
        // Exactly one read of the per-rank sizes per MoE layer per micro-batch (again in the
        // recomputation), nothing in backward, and one read of the step's health.
        CATCH_CHECK(reason(j, "moe.splits") == (full ? 2 : 1) * layers * micro);
        CATCH_CHECK(reason(j, "step.health") == 1);
        // No collective waits on the host, no pageable upload, no separate loss or norm read.
        for (const auto& [name, count] : j.at("host_syncs_by_reason").items()) {
          CATCH_INFO(name);
          CATCH_CHECK(name.rfind("collective.", 0) != 0);
          CATCH_CHECK(name.find("upload") == std::string::npos);
        }
        CATCH_CHECK(reason(j, "step.loss") == 0);
        CATCH_CHECK(reason(j, "step.grad_norm") == 0);
        CATCH_CHECK(j.at("ops_per_step").get<double>() > 0);
      }
    }
  }
}

CATCH_TEST_CASE("host_read counts one sync per read, by reason, and returns the values", "[host_sync]") {
  reset_host_sync_counts();
  const auto t = torch::arange(5, torch::kInt64);
  const auto host = host_read(t, "test.read");
  CATCH_CHECK(torch::equal(host, t));
  CATCH_CHECK(host_int(t.sum(), "test.read") == 10);
  CATCH_CHECK(host_double(torch::tensor(2.5), "test.other") == 2.5);
  count_host_sync("test.other");
  const auto counts = host_sync_counts();
  CATCH_CHECK(counts.total == 4);
  CATCH_CHECK(counts.by_reason.at("test.read") == 2);
  CATCH_CHECK(counts.by_reason.at("test.other") == 2);
  reset_host_sync_counts();
  CATCH_CHECK(host_sync_counts().total == 0);
}

CATCH_TEST_CASE("OpCounter counts the ATen operator calls made while it lives", "[host_sync]") {
  const auto a = torch::ones({4});
  OpCounter ops;
  const auto b = a + a;
  const auto c = b * 2;
  const int64_t seen = ops.count();
  CATCH_CHECK(seen >= 2);
  CATCH_CHECK(seen < 50);
  ops.reset();
  CATCH_CHECK(ops.count() == 0);
  CATCH_CHECK(c.sum().item<double>() == 16);
}

CATCH_TEST_CASE("CPU threads: run.threads, else a launcher's OMP_NUM_THREADS, else the cores shared among local ranks",
                "[train][threads]") {
  CATCH_CHECK(train::threads_for(3, "7", 16, 8) == 3);
  CATCH_CHECK(train::threads_for(0, "7", 16, 8) == 7);
  CATCH_CHECK(train::threads_for(0, nullptr, 16, 8) == 2);
  CATCH_CHECK(train::threads_for(0, nullptr, 16, 0) == 16);
  CATCH_CHECK(train::threads_for(0, nullptr, 4, 8) == 1);
  CATCH_CHECK(train::threads_for(0, "", 16, 4) == 4);      // empty: not set
  CATCH_CHECK(train::threads_for(0, "two", 16, 4) == 4);   // not a number: ignored
  CATCH_CHECK(train::threads_for(0, "-1", 16, 4) == 4);
  CATCH_CHECK(train::threads_for(0, nullptr, 0, 1) == 1);  // hardware_concurrency may say 0
}
