// Multi-process training runs for the distributed tests: a small MoE run at one layout through the
// CLI and scripts/launch.sh, its checkpoints read back by name, and the comparisons every layout
// test makes against one process.
#pragma once
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ckpt/safetensors.h"
#include "common/files.h"
#include "dist/communicator.h"
#include "moe/moe.h"
#include "../train/train_fixture.h"

namespace moetrain::testing {

// A dist worker's world: the launcher's ranks over the store backend, each collective bounded by 60 s
// (scaled by MOETRAIN_TEST_TIME_SCALE, as the tests' bounds on the launch are).
inline std::shared_ptr<dist::Communicator> store_world() {
  config::ParallelConfig p;
  p.backend = "store";
  p.timeout_s = int(scaled_seconds(60));
  return dist::make_communicator(p);
}

// `command` in nproc processes through scripts/launch.sh, guarded against hangs only.
inline std::string launch(int nproc, const std::string& command) {
  return hang_guard() + std::string(MOETRAIN_SOURCE_DIR) + "/scripts/launch.sh --nproc " + std::to_string(nproc) +
         " -- " + command;
}

// A small MoE training run at one (world, ep) layout through the CLI and the launcher; the global
// batch is 8 sequences in 2 micro-batches whatever the world size.
struct Run {
  std::vector<double> losses;
  std::string run_dir;
  std::string output;
  int exit_code = -1;
};

inline config::Config equivalence_config(const std::string& data_dir, const std::string& out_dir) {
  auto cfg = tiny_train_config(data_dir, out_dir);
  cfg.model.dense_layers = 0;
  cfg.model.moe.n_experts = 8;
  cfg.model.moe.aux_loss_coef = 0.01;
  cfg.model.moe.z_loss_coef = 0.001;
  cfg.model.moe.seq_aux_loss_coef = 0.001;
  cfg.train.steps = 20;
  cfg.train.grad_accum = 2;
  cfg.train.eval_every = 0;
  cfg.optim.warmup_steps = 2;
  return cfg;
}

// A global micro-batch of 4 sequences split over the data-parallel ranks (the world divided by
// cfg.parallel.pipeline_parallel).
inline Run train_at(config::Config cfg, int world, int ep, const std::string& extra = "") {
  cfg.train.micro_batch_size = 4 * cfg.parallel.pipeline_parallel / world;
  cfg.parallel.expert_parallel = ep;
  cfg.parallel.timeout_s = 60;
  const std::string yaml = write_config(cfg, files::join(cfg.run.out_dir, "input.yaml"));
  const std::string train = std::string(MOETRAIN_BINARY) + " train --config " + yaml + extra;
  Run run;
  auto r = run_command("OMP_NUM_THREADS=1 " + (world == 1 ? hang_guard() + train : launch(world, train)));
  run.exit_code = r.exit_code;
  run.output = r.output;
  run.run_dir = cfg.run.out_dir;
  std::ifstream metrics(files::join(cfg.run.out_dir, "metrics.jsonl"));
  std::string line;
  while (std::getline(metrics, line)) run.losses.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return run;
}

// Copies the run folder `from` to cfg.run.out_dir and resumes it there with --resume auto at (world,
// ep): the run must start from the checkpoint `step_dir` (step_XXXXXXXX) and finish.
inline Run resume_copy(const std::string& from, const config::Config& cfg, int world, int ep,
                       const std::string& step_dir) {
  run_command("cp -r " + from + " " + cfg.run.out_dir);
  auto resumed = train_at(cfg, world, ep, " --resume auto");
  CATCH_INFO(resumed.output.substr(resumed.output.size() > 2000 ? resumed.output.size() - 2000 : 0));
  CATCH_REQUIRE(resumed.exit_code == 0);
  CATCH_CHECK_THAT(resumed.output, Catch::Matchers::Contains("resumed from") && Catch::Matchers::Contains(step_dir));
  return resumed;
}

// Every tensor of a checkpoint by name, across its files (the expert files differ by layout): the
// weights ("model") or the AdamW moments ("optim").
inline std::map<std::string, torch::Tensor> checkpoint_tensors(const Run& run, const std::string& kind,
                                                       const std::string& step = "step_00000020") {
  const auto step_dir = files::join(run.run_dir, "ckpt/" + step);
  std::map<std::string, torch::Tensor> out;
  for (const auto& name : files::list_directory(step_dir)) {
    const bool is_optim = name.rfind("optim", 0) == 0;
    const bool is_model = name.rfind("model", 0) == 0 || name.rfind("experts-", 0) == 0;
    if ((kind == "optim" && !is_optim) || (kind == "model" && !is_model)) continue;
    ckpt::SafetensorsFile f(files::join(step_dir, name));
    for (const auto& info : f.tensors()) out[info.name] = f.load(info.name).to(torch::kDouble);
  }
  return out;
}

// Largest relative difference ||a - b|| / ||a|| (Frobenius) over the tensors of two checkpoints.
inline double max_relative_difference(const Run& a, const Run& b, const std::string& kind,
                               const std::string& step = "step_00000020") {
  const auto ta = checkpoint_tensors(a, kind, step), tb = checkpoint_tensors(b, kind, step);
  CATCH_REQUIRE(ta.size() == tb.size());
  CATCH_REQUIRE(!ta.empty());
  double worst = 0;
  for (const auto& [name, x] : ta) {
    CATCH_REQUIRE(tb.count(name));
    const auto& y = tb.at(name);
    CATCH_REQUIRE(x.sizes() == y.sizes());
    const double d = (x - y).norm().item<double>() / std::max(x.norm().item<double>(), 1e-12);
    if (d > 1e-6) std::printf("%s: %s differs by %.3g (relative norm)\n", kind.c_str(), name.c_str(), d);
    worst = std::max(worst, d);
  }
  return worst;
}

inline void check_same_run(const Run& got, const Run& want, const std::string& what,
                           const std::string& step = "step_00000020") {
  CATCH_INFO(what << "\n" << got.output.substr(got.output.size() > 3000 ? got.output.size() - 3000 : 0));
  CATCH_REQUIRE(got.exit_code == 0);
  CATCH_REQUIRE(got.losses.size() == want.losses.size());
  for (size_t i = 0; i < want.losses.size(); ++i) {
    CATCH_INFO("step " << i + 1 << ": " << got.losses[i] << " vs " << want.losses[i]);
    CATCH_CHECK(std::abs(got.losses[i] - want.losses[i]) <= 1e-5 * std::abs(want.losses[i]));
  }
  CATCH_CHECK(max_relative_difference(got, want, "model", step) <= 1e-5);
  CATCH_CHECK(max_relative_difference(got, want, "optim", step) <= 1e-4);
}


// A whole MoE layer and this rank's expert shard of it with the same weights: the whole layer's drawn
// from N(0, 0.3) by the global generator (seed it alike on every rank first), the shard given its own
// experts' slices and every other tensor whole.
inline void same_weights(moe::MoEImpl& whole, moe::MoEImpl& part) {
  torch::NoGradGuard no_grad;
  for (auto& q : whole.parameters()) q.normal_(0, 0.3);
  auto full_params = whole.named_parameters();
  for (auto& q : part.named_parameters()) {
    const auto& full = full_params[q.key()];
    q.value().copy_(q.key().rfind("experts.", 0) == 0 ? full.narrow(0, part.expert_offset(), q.value().size(0)) : full);
  }
}

inline std::vector<double> metrics_losses(const std::string& run_dir) {
  std::vector<double> losses;
  std::ifstream metrics(files::join(run_dir, "metrics.jsonl"));
  std::string line;
  while (std::getline(metrics, line)) losses.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return losses;
}

// A resumed run's metrics against the straight run's: every step after `from` within 1e-5 relative
// (the layout tests' bound), and as many steps.
inline void check_resumed_losses(const std::string& run_dir, const Run& straight, size_t from) {
  const auto losses = metrics_losses(run_dir);
  CATCH_REQUIRE(losses.size() == straight.losses.size());
  for (size_t i = from; i < losses.size(); ++i) {
    CATCH_INFO("step " << i + 1 << ": " << losses[i] << " vs " << straight.losses[i]);
    CATCH_CHECK(std::abs(losses[i] - straight.losses[i]) <= 1e-5 * std::abs(straight.losses[i]));
  }
}

// A run stopped by a signal and resumed to step `until` at world 2 (its metrics in `run_dir`) against a
// straight run of `cfg` to that step in `straight_dir`: the same processes and ops, so bit for bit.
inline void check_equals_straight_run(const config::Config& cfg, const std::string& run_dir,
                                      const std::string& straight_dir, int64_t until) {
  auto straight_cfg = cfg;
  straight_cfg.run.out_dir = straight_dir;
  straight_cfg.train.steps = int(until);
  const std::string yaml = write_config(straight_cfg, files::join(straight_dir, "input.yaml"));
  auto straight = run_command("OMP_NUM_THREADS=1 " + launch(2, std::string(MOETRAIN_BINARY) + " train --config " + yaml));
  CATCH_REQUIRE(straight.exit_code == 0);
  const auto a = metrics_losses(run_dir), b = metrics_losses(straight_dir);
  CATCH_REQUIRE(a.size() == size_t(until));
  CATCH_REQUIRE(b.size() == size_t(until));
  for (size_t i = 0; i < a.size(); ++i) {
    CATCH_INFO("step " << i + 1);
    CATCH_CHECK(a[i] == b[i]);
  }
}

// Trains `cfg` (written to `yaml`) in two processes and kills rank 1 with SIGKILL once training has
// started (the first metrics line; on a loaded machine set-up alone can take seconds, and a SIGTERM
// then ends rank 0 before it can say anything). A long --grace leaves rank 0 to notice by itself.
// Checks that the job ends non-zero within 45 s of the kill (scaled by MOETRAIN_TEST_TIME_SCALE),
// naming rank 1 from rank 0 (within parallel.timeout_s).
inline void check_killed_rank_ends_job(const config::Config& cfg, const std::string& yaml) {
  write_config(cfg, yaml);
  const std::string metrics = files::join(cfg.run.out_dir, "metrics.jsonl");
  const std::string killed_at = files::join(cfg.run.out_dir, "killed_at");
  const std::string command = "bash -c 'if [ $RANK = 1 ]; then (while [ ! -s " + metrics + " ]; do sleep 0.1; done; date +%s.%N > " +
                              killed_at + "; kill -9 $$) & fi; exec " + std::string(MOETRAIN_BINARY) + " train --config " +
                              yaml + "'";
  const double bound_s = scaled_seconds(45);
  auto r = run_command("{ OMP_NUM_THREADS=1 " + hang_guard() + std::string(MOETRAIN_SOURCE_DIR) + "/scripts/launch.sh --grace " +
                       std::to_string(int(bound_s) + 15) + " --nproc 2 -- " + command +
                       "; rc=$?; echo ended_at=$(date +%s.%N); exit $rc; }");
  CATCH_INFO(r.output);
  CATCH_CHECK(r.exit_code != 0);
  CATCH_REQUIRE(r.output.find("ended_at=") != std::string::npos);
  CATCH_CHECK_THAT(r.output, Catch::Matchers::Contains("launch.sh: rank 1") &&
                                 Catch::Matchers::Contains("killed by signal 9"));
  // Rank 0 ends on its own with an error naming the operation and the peer.
  CATCH_CHECK_THAT(r.output, Catch::Matchers::Contains("[rank 0] moetrain: [dist]") && Catch::Matchers::Contains("rank 1"));
  CATCH_REQUIRE(files::exists(killed_at));
  const double took = std::stod(r.output.substr(r.output.rfind("ended_at=") + 9)) - std::stod(files::read_file(killed_at));
  CATCH_INFO("ended " << took << " s after the kill");
  CATCH_CHECK(took < bound_s);
}

}  // namespace moetrain::testing
