// The training loop: data -> forward -> loss (+ aux) -> backward -> clip -> AdamW, then bookkeeping
// (metrics.jsonl, progress line, validation, checkpoints) clearly after the step.
#pragma once
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/blend.h"
#include "data/shard.h"
#include "dist/communicator.h"
#include "model/transformer.h"

namespace moetrain::train {

struct TrainOptions {
  std::string resume;      // "" = fresh run, "auto" = newest checkpoint of run.out_dir if any, else a path
  bool overwrite = false;  // a fresh run into a run.out_dir that holds a run moves that run aside first
};

struct TrainResult {
  int64_t first_step = 0;            // step the run started from (0, or the resumed checkpoint's)
  int64_t last_step = 0;             // steps completed at the end
  std::vector<double> losses;        // training loss of each step this process ran
  double final_val_loss = 0;
  double tokens_per_s = 0;           // mean over the steps this process ran
  bool interrupted = false;          // stopped early by SIGTERM/SIGINT after saving
  int64_t skipped_steps = 0;         // steps whose update was skipped for a non-finite loss or gradient
  std::string last_checkpoint;
  // The cost meter, for the whole run so far (a resumed run includes the time before it).
  int64_t tokens = 0;
  double elapsed_s = 0;
  double gpu_hours = 0;              // elapsed_s * world size / 3600
  double cost_usd = 0;               // gpu_hours * cost.price_per_gpu_hour
  double mean_mfu = 0;               // over the steps this process ran: causal FLOPs / (peak * world)
};

TrainResult train(const config::Config& cfg, const TrainOptions& options);

// bench-step: real training steps (the trainer's own step function) on synthetic tokens, so any
// config can be measured without data. Warm-up steps are not timed.
struct BenchResult {
  std::string device;            // "cpu" or "cuda"
  std::string dtype;             // compute dtype: "fp32" or "bf16"
  std::string gpu;               // hardware whose peak the MFU is against (cost.gpu)
  double peak_tflops = 0;        // its dense bf16 peak per device
  std::string peak_source;       // where that peak comes from (a datasheet, or this machine's probe)
  int world_size = 1;
  int warmup_steps = 0;
  int steps = 0;                 // timed steps
  int64_t tokens_per_step = 0;   // over all ranks
  double step_s_mean = 0, step_s_min = 0, step_s_median = 0;
  double tokens_per_s = 0;       // whole job
  double tokens_per_s_per_gpu = 0;
  double flops_per_token_causal = 0;
  double mfu = 0;
  int64_t params_total = 0, params_active = 0;
  double first_loss = 0, last_loss = 0;  // sanity: the steps really trained
  int expert_parallel = 1;
  int micro_batch_size = 0;  // per rank, as resolved for this world size
  int moe_layers = 0;
  double all_to_all_bytes_per_step = 0;  // sent by this rank to other ranks, mean over timed steps
  int pipeline_parallel = 1;             // pipeline stages
  std::vector<int> pp_layers;            // blocks per stage
  double p2p_bytes_per_step = 0;         // sent by this rank to its pipeline neighbours, mean over timed steps
  int zero = 0;                          // parallel.zero
  bool overlap_grad_reduce = false;      // parallel.overlap_grad_reduce
  int grad_buckets = 0;                  // gradient reduction buckets, and how many the last step launched
  int grad_buckets_overlapped = 0;       // during backward
  double optimizer_state_bytes = 0;      // AdamW state this rank holds
  double peak_rss_bytes = 0;             // this process's peak resident memory so far (getrusage)
  double peak_allocated_bytes = 0;       // peak bytes LibTorch's allocator held from the model's build on
                                         // (cost::PeakMemoryMeter): what `moetrain plan` predicts
  // Where this rank's host waited for the device or a collective (common/host_sync.h), per timed step:
  // the code path a GPU run takes, counted on any device.
  double host_syncs_per_step = 0;
  std::map<std::string, double> host_syncs_by_reason;
  double ops_per_step = 0;  // ATen operator calls per timed step on this rank (the CPU's proxy for kernel launches)
};
// Logs one line per step unless quiet (the --json output keeps stdout to the one object).
BenchResult bench_steps(const config::Config& cfg, int warmup_steps, int steps, bool quiet = false);

// Mean next-token cross-entropy (nats per token) over the fixed validation batches: the sum over every
// learned target divided by their number, the reduction `moetrain eval` uses (with a loss mask, a mean
// of batch means would weigh a batch of few learned tokens like a full one). With a world of W ranks,
// batch i holds batch_size * W sequences, each rank evaluates its share and every rank returns the
// mean over all of them (the same figure at any layout; W is the data-parallel ranks, and with a
// pipeline each batch flows through the stages, the last computing the loss). No learned target at
// all is a DataError.
double evaluate(const model::TransformerImpl& model, const data::Shard& shard, int n_batches, int batch_size,
                int seq_len, torch::Device device, const dist::Layout* layout = nullptr);
// The same, asking `stop` before each batch (collective where it is: every rank asks at the same
// batches and gets the same answer); nullopt when it said stop, so a preemption during a long
// evaluation waits for one batch, not all of them.
std::optional<double> evaluate(const model::TransformerImpl& model, const data::Shard& shard, int n_batches,
                               int batch_size, int seq_len, torch::Device device, const dist::Layout* layout,
                               const std::function<bool()>& stop);

// Validation over a blend: each source's val split on its own (n_batches batches of batch_size * W
// sequences each, as above) and overall the sum over every learned target of every source divided by
// their number (per token, not a mean of the sources). Sources without a val split are left out.
struct Validation {
  double loss = 0;                                        // overall, nats per learned token
  bool measured = true;  // false when the masks learn no target of any batch: there is no loss to report
  std::vector<std::pair<std::string, double>> by_source;  // (source name, its loss) with a learned target
};
std::optional<Validation> evaluate(const model::TransformerImpl& model, const data::Blend& blend, int n_batches,
                                   int batch_size, int seq_len, torch::Device device, const dist::Layout* layout,
                                   const std::function<bool()>& stop);

// Device from run.device and the launch environment (dist::claim_device: cuda:<local rank>, made
// current); a missing GPU, or more local ranks than GPUs, is a clear error.
torch::Device resolve_device(const config::RunConfig& run);
// Compute dtype from run.dtype: nullopt for fp32, bf16 otherwise.
model::ComputeDtype resolve_compute_dtype(const config::RunConfig& run);
// Sets CPU threads from run.threads: threads_for() of this process's environment.
void configure_threads(const config::RunConfig& run);
// The CPU threads a process takes: run.threads when set (> 0); else an OMP_NUM_THREADS a launcher set
// (a positive integer); else the cores shared out among the ranks on this node (local_ranks, 0 when
// the launcher does not say: taken as one), at least one. Eight ranks each taking every core would
// oversubscribe the node eightfold.
int threads_for(int run_threads, const char* omp_num_threads, unsigned cores, int local_ranks);
// run.deterministic: LibTorch's deterministic mode (an op with no deterministic kernel throws),
// deterministic cuDNN, cuBLAS's fixed workspace (CUBLAS_WORKSPACE_CONFIG, unless already set) and
// only SDPA's math backend; the MoE layer and the loss follow the same mode. Off restores the
// defaults. Call before the first CUDA allocation (cuBLAS reads its workspace setting once).
void configure_determinism(const config::RunConfig& run);

}  // namespace moetrain::train
