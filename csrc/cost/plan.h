// `moetrain plan`: the memory one rank needs for a config and a layout, from the config alone (like
// `cost`, so it works for 671B), term by term, against the device's memory.
//
// The terms follow what this implementation holds, not a generic formula:
//   weights        fp32 master weights (routed experts divided over expert_parallel)
//   compute copy   in bf16, the bf16 copy of every weight, kept from one update to the next; with
//                  run.keep_compute_copies false the casts autograd keeps for backward (with full
//                  checkpointing one block's, beside the embedding and head)
//   gradients      fp32, the size of the weights; over several ranks held for the whole run in the
//                  gradient buckets' buffers (zero 1 keeps its reduced share beside them, the size of
//                  one moment, in the peak), else from the first backward to the update
//   optimizer      AdamW's two fp32 moments, divided over each parameter's replicas at parallel.zero 1
//   activations    what autograd saves for one micro-batch: per token and layer, the tensors each op
//                  keeps (norms, projections, RoPE, attention inputs and output, the routed rows and
//                  each expert's SwiGLU), or with full checkpointing each block's input plus one
//                  block recomputed in backward (selective: norms keep their input only, SwiGLU
//                  drops its SiLU)
//   loss           the log-probabilities, their gradient and the logits' gradient at the start of
//                  backward (3 x tokens x vocab fp32), or the same over loss_chunk_tokens rows and
//                  the head's gradient accumulated over the chunks
//   communication  with a pipeline, the received activation and gradient of one micro-batch (the
//                  gradient collectives read and write the buckets' buffers in place)
// With a pipeline (parallel.pipeline_parallel) each stage is planned apart: its blocks' weights and
// their state (the embedding on the first stage, the final norm and head on the last, a tied
// embedding on both), the activations of the micro-batches 1F1B keeps in flight on it, and the loss
// on the last stage only.
// The peak is not their sum: it is the largest of three moments of a step (the start of the last
// micro-batch's backward, a block's recomputation late in backward, the optimizer step), each the sum
// of what is alive then. Checked against the peak measured by bench-step (cost::PeakMemoryMeter) on
// CPU configurations in fp32 (tests/cost/test_plan.cpp); the bf16 terms are unmeasured here.
#pragma once
#include <string>
#include <vector>

#include "config/config.h"

namespace moetrain::cost {

struct MemoryPlan {
  int world_size = 1, expert_parallel = 1, zero = 0;
  // Pipeline: this plan is for stage `stage` of pipeline_parallel, holding `blocks` blocks and the
  // activations of `in_flight` micro-batches at once (1F1B: min(pp - stage, grad_accum)); the
  // schedule's bubble (pp - 1) / (grad_accum + pp - 1) is idle time, not memory.
  int pipeline_parallel = 1, stage = 0, blocks = 0, in_flight = 1;
  double bubble = 0;
  int micro_batch_size = 1;   // per rank
  int grad_accum = 1;
  int64_t tokens_per_micro_batch = 0;  // per rank
  double params_per_rank = 0;
  // Bytes per rank.
  double weights = 0, compute_copy = 0, gradients = 0, optimizer = 0;
  // ZeRO-1 under bf16: `weights` holds the matmul weights in bf16 and this is 1/replicas of their fp32 masters.
  double master_weights = 0;
  double activations = 0;     // one micro-batch, by train.activation_checkpointing
  double loss = 0;
  double communication = 0;
  double peak = 0;            // the largest moment of a step (see above)
  std::string peak_moment;    // "backward", "recompute" or "optimizer"
};

// The plan for `cfg` (its batch keys resolved for the data-parallel ranks, world_size /
// parallel.pipeline_parallel, as training resolves them): with a pipeline, the stage with the largest
// peak; plan_stages gives every stage's.
MemoryPlan plan_memory(const config::Config& cfg, int world_size);
std::vector<MemoryPlan> plan_stages(const config::Config& cfg, int world_size);

// Pipeline stages: the blocks each holds, parallel.pp_layers when given, else the split of
// model.n_layers into parallel.pipeline_parallel consecutive runs that minimises the largest stage's
// forward FLOPs per token (this cost model's per-block FLOPs, the LM head on the last stage).
std::vector<int> pipeline_layers(const config::Config& cfg);
// The first block of each stage and one past the last: stage s holds [bounds[s], bounds[s + 1]).
std::vector<int> stage_bounds(const std::vector<int>& layers_per_stage);
// The 1F1B schedule's idle fraction of a step: (pp - 1) / (micro_batches + pp - 1).
double pipeline_bubble(int pp, int micro_batches);

// What fits in `capacity_bytes` per rank: the largest micro-batch (0 if not even one sequence), and
// the smallest expert_parallel and zero settings that fit at micro-batch 1 (0 if none).
struct FitAdvice {
  int largest_micro_batch = 0;
  int smallest_expert_parallel = 0;  // with the configured zero
  int zero_needed = -1;               // 0 or 1 at the configured ep; -1 if neither fits
};
FitAdvice advise_fit(const config::Config& cfg, int world_size, double capacity_bytes);

// Memory of one device of `gpu` (h100, h200, h800, a100, b200: the total nvidia-smi reports for the
// SXM boards; cpu: this machine's physical memory). Throws UsageError naming the known names.
double device_memory_bytes(const std::string& gpu);

// The fraction of a GPU's memory a plan may fill: the rest is for the CUDA context, NCCL's buffers and
// the caching allocator's fragmentation.
constexpr double kUsableFraction = 0.92;

}  // namespace moetrain::cost
