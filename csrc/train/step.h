// One optimizer step and what it needs set up: this process's place in the job (Process), the model,
// optimizer and data parallelism it trains (Trainable), the step itself (train_step) and its routing
// telemetry. `train` (trainer.cpp) and `bench-step` (bench.cpp) both run exactly this.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ckpt/checkpoint.h"
#include "common/errors.h"
#include "common/log.h"
#include "common/tensor.h"
#include "config/config.h"
#include "cost/memory.h"
#include "cost/plan.h"
#include "data/sampler.h"
#include "dist/communicator.h"
#include "dist/data_parallel.h"
#include "dist/expert_parallel.h"
#include "dist/optimizer.h"
#include "dist/pipeline.h"
#include "hf/hf.h"
#include "model/transformer.h"
#include "optim/adamw.h"
#include "train/trainer.h"

namespace moetrain::train {

// Seconds on a monotonic clock.
double now_s();

// Routing telemetry of one optimizer step, summed over its micro-batches (tensors until written,
// so nothing syncs with the device unless the step is logged).
struct MoETelemetry {
  std::vector<int> layers;
  std::vector<torch::Tensor> load_LE;  // tokens per expert, summed over micro-batches
  std::vector<torch::Tensor> dropped_L, aux_L, seq_aux_L, z_L, entropy_L;
  int micro_batches = 0;

  // Adds one micro-batch's routing statistics.
  void add(const model::ForwardOutput& out);
  // With a pipeline, each stage has its own layers' statistics: afterwards every rank holds those of
  // every MoE layer of the model (collective over Layout::pp; a no-op without a pipeline).
  void gather_stages(const dist::Layout& layout, const config::ModelConfig& m);
  // Adds per-layer records under "moe" and their summaries: aux_loss (mean over layers),
  // load_max_over_mean (worst layer), drop_fraction (over all layers).
  void write(nlohmann::json& rec) const;
};

struct StepOutcome {
  double loss = 0;       // mean cross-entropy over the micro-batches and ranks (the balance and MTP losses apart)
  std::vector<double> mtp_losses;  // model.mtp_depth > 0: each depth's cross-entropy, averaged the same way
  double grad_norm = 0;  // before clipping
  bool applied = true;   // false: a rank's loss or gradients were not finite, and nothing was updated
  bool stop = false;     // a rank's stop_requested said yes (the job-wide stop vote, taken with the health)
  std::string nonfinite; // what was not finite, and on which ranks ("" when applied)
  // optim.qk_clip_tau > 0: the step's largest pre-softmax logit over every head of the model and the
  // number of heads clipped, (2) fp32 on the device (read only when logged); undefined otherwise.
  torch::Tensor qk_clip;
  MoETelemetry telemetry;
};

// One optimizer step: forward and backward of every micro-batch (gradients accumulated; the loss is
// the mean over every learned target of the step, on every micro-batch and rank, and the balance and
// MTP losses are each micro-batch's scaled by 1/grad_accum), gradients averaged over the ranks, clip,
// AdamW, then the routers' bias
// update from the step's expert load. The trainer and bench-step both run exactly this. A non-finite
// loss or gradient on any rank leaves the weights, the optimizer and the routers' biases untouched on
// every rank (the decision is global), and says which rank it came from.
// With a pipeline (parallel.layout().pp_size() > 1) the micro-batches run through this rank's stage in
// the 1F1B schedule (dist::PipelineSchedule).
// The host reads the device once per step: the health, the gradient norm, the losses and the stop vote
// (each rank's `stop_requested`, asked after backward) travel as one vector in one collective. Clipping
// scales the gradients by a factor computed on the host from that read.
StepOutcome train_step(model::TransformerImpl& model, dist::Optimizer& optimizer, dist::DataParallel& parallel,
                       const config::Config& cfg, int64_t step, double lr, torch::Device device,
                       const std::function<data::Batch(int micro)>& batch_of,
                       const std::function<bool()>& stop_requested = nullptr);
// Fault injection for the divergence tests: MOETRAIN_TEST_NONFINITE=<loss|grad>@<step>[,<step>...][:<rank>]
// makes that rank's loss (or one element of its first gradient) NaN at those 1-based steps (rollout
// batches under `rl`). Never set outside tests.
bool test_fault(const char* kind, int64_t step, int rank);
// Where to go on from after a divergence: the newest checkpoint of `out_dir` that verifies (none is
// written at a skipped step or while a streak of them is open, so it predates the trouble), and what to change.
std::string last_good_checkpoint(const std::string& out_dir, const config::Config& cfg);
// A batch's tokens on `device`: to CUDA through pinned memory, without making the host wait.
torch::Tensor upload(const torch::Tensor& host, torch::Device device);

// Refuses a job whose ranks were started with different configs (another run.seed, a --set given to
// one rank only): every rank compares its config, less rank-local keys, with rank 0's, and all name the
// first key that differs. Collective over `world`.
void require_same_config(dist::Communicator& world, const config::Config& cfg);
// Refuses replicas whose weights differ (an init_from folder that differs between nodes): each rank's
// fingerprint of what it holds is compared with its replicas'. Collective over the layout's groups.
void require_equal_replicas(const dist::Layout& layout, const std::vector<model::RoledParam>& params);

// SIGTERM and SIGINT as a run handles them (trainer.cpp): while a StopSignals lives, a signal is only
// recorded (stop_signal() says which, 0 = none) and the loop saves and exits after its next vote; a
// repeat after two seconds ends the process at once.
class StopSignals {
 public:
  StopSignals();
 private:
  std::shared_ptr<void> scope_;
};
int stop_signal();
// A fresh run never writes over an earlier one in run.out_dir: it refuses, or (options.overwrite)
// moves it aside. Collective over `world` (rank 0 decides).
void claim_run_folder(const std::string& out_dir, const TrainOptions& options, dist::Communicator& world);
// options.resume: loads the checkpoint it names (auto: run.out_dir's newest, or none yet) into the model and
// the optimizer and returns its progress; a fresh run's progress is step 0.
ckpt::Progress resume_run(const TrainOptions& options, const config::Config& cfg, model::TransformerImpl& model,
                          dist::Optimizer& optimizer, int rank);
// Keeps the metrics.jsonl rows of steps <= last_step (a resumed run rewrites what came after).
void truncate_metrics(const std::string& path, int64_t last_step);

// What train and bench-step both set up first: this process's place in the job, the config resolved
// for the world size, the device and the compute dtype.
struct Process {
  explicit Process(const config::Config& given)
      : determinism((configure_determinism(given.run), given.run.deterministic)),  // before cuBLAS starts
        device(resolve_device(given.run)),  // first: every CUDA allocation (NCCL's included) lands on it
        layout(std::make_shared<const dist::Layout>(dist::make_layout(dist::make_communicator(given.parallel, given.run.device),
                                                                      given.parallel.expert_parallel,
                                                                      given.parallel.pipeline_parallel))),
        cfg(config::for_world_size(given, layout->dp_size())) {  // the ranks that read data
    set_log_rank(layout->world->rank());
    require_same_config(*layout->world, given);
    if (layout->pp_size() > 1 && cfg.train.grad_accum < layout->pp_size())
      throw ConfigError("train.grad_accum = " + std::to_string(cfg.train.grad_accum) + " (as resolved) must be at least "
                        "parallel.pipeline_parallel = " + std::to_string(layout->pp_size()) +
                        " (the 1F1B schedule fills the pipeline with the step's micro-batches)");
    configure_threads(cfg.run);
    set_cached_casts(cfg.run.keep_compute_copies);
    compute_dtype = resolve_compute_dtype(cfg.run);
    cost::require_memory(cfg, layout->ep_size(), /*training=*/true, layout->world->world_size());  // refuse an absurd size before allocating
  }
  bool determinism;
  torch::Device device{torch::kCPU};
  std::shared_ptr<const dist::Layout> layout;
  config::Config cfg;
  model::ComputeDtype compute_dtype;
};

// Then the model this rank holds (seeded by global names, placed), the bookkeeping across ranks and
// the optimizer over them (parallel.zero).
struct Trainable {
  explicit Trainable(const Process& p)
      : model(build(p)),
        parallel(p.layout, model->trainable_parameters()),
        optimizer(dist::make_optimizer(parallel, model->trainable_parameters(), p.cfg.optim, p.cfg.parallel,
                                            p.compute_dtype)) {}
  model::Transformer model;
  dist::DataParallel parallel;
  std::unique_ptr<dist::Optimizer> optimizer;

 private:
  static model::Transformer build(const Process& p) {
    // This rank's pipeline stage and its share of the experts.
    const auto bounds = cost::stage_bounds(cost::pipeline_layers(p.cfg));
    const int stage = p.layout->pp_rank();
    model::Transformer m(p.cfg.model, dist::expert_shard(*p.layout),
                         model::LayerRange{bounds[size_t(stage)], bounds[size_t(stage) + 1]});
    m->init_weights(p.cfg.run.seed);
    if (!p.cfg.model.init_from.empty()) hf::load_init_from(*m, p.cfg.model.init_from);  // fine-tuning
    m->add_lora(p.cfg.train.lora, p.cfg.run.seed);  // train.lora: adapters on the frozen base
    // The adapters' dropout draws its masks from the default generators: seeded from (run.seed, rank) so
    // that a run repeats; a resume then restores the CPU generator from its checkpoint.
    if (p.cfg.train.lora.rank > 0 && p.cfg.train.lora.dropout > 0)
      torch::manual_seed(p.cfg.run.seed ^ (0x9e3779b97f4a7c15ull * uint64_t(p.layout->world->rank() + 1)));
    require_equal_replicas(*p.layout, m->roled_parameters());
    m->place(p.device, p.compute_dtype);
    m->set_loss_chunk(p.cfg.train.loss_chunk_tokens);
    m->set_activation_checkpointing(p.cfg.train.activation_checkpointing);
    dist::parallelize(*m, p.layout);  // expert-parallel dispatch and global routing counts
    return m;
  }
};

}  // namespace moetrain::train
