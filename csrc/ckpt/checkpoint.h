// Checkpoints: <out_dir>/ckpt/step_XXXXXXXX/ holds
//   model.safetensors                     replicated weights and buffers (rank 0)
//   optim.safetensors                     their AdamW moments (optim.name muon: a hidden matrix's
//                                         momentum instead) and the step count (rank 0)
//   experts-PPPPP-of-NNNNN.safetensors    routed experts of ep rank P, one tensor per GLOBAL expert id,
//   optim-experts-PPPPP-of-NNNNN...       named "<param>[<id>]" (and their moments); written by the first
//                                         replica of each ep rank
//   rng-RRRRR.safetensors                 each rank's CPU generator state
//   model-stage-SSSSS-of-PPPPP...         with a pipeline: stage S > 0's replicated weights (stage 0's
//   optim-stage-SSSSS-of-PPPPP...         are in model.safetensors), its moments; the expert files
//                                         become experts-stageSSSSS-PPPPP-of-NNNNN (written by each
//                                         stage's first data-parallel rank and first expert replicas)
//   manifest.json                         every file with size and sha256, the layout, progress, cost,
//                                         data cursor and resolved config
// Every rank writes its files into ckpt/.tmp-step_XXXXXXXX and fsyncs them; after a barrier rank 0
// writes the manifest, renames the folder into place and replaces ckpt/latest atomically. A crash of
// any rank at any instant leaves `latest` naming a complete checkpoint. Any layout loads any
// checkpoint: experts are found by global id. Format 1 (one file, stacked experts) still loads.
#pragma once
#include <atomic>
#include <cstdint>
#include <exception>
#include <memory>
#include <thread>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "dist/communicator.h"
#include "model/transformer.h"
#include "optim/adamw.h"

namespace moetrain::ckpt {

struct Progress {
  int64_t step = 0;      // optimizer steps completed
  int64_t tokens = 0;    // training tokens consumed
  double elapsed_s = 0;  // training wall time so far
  double gpu_hours = 0;  // device-hours so far (elapsed x world size)
  double cost_usd = 0;   // at cost.price_per_gpu_hour
};

struct FileEntry {
  std::string name;
  uint64_t size = 0;
  std::string sha256;
};

// What a LoRA checkpoint's adapters were trained on (manifest.json's "lora").
struct LoraBase {
  std::string init_from;    // model.init_from; "" = the seeded initialization
  std::string fingerprint;  // lora_base_of's: a sha256 of the base's weight files, or "seed <run.seed>"
  bool operator==(const LoraBase&) const = default;
};

struct Manifest {
  int format_version = 2;
  Progress progress;
  std::string config_yaml;  // the resolved config of the run that wrote it
  std::vector<FileEntry> files;
  int world_size = 1;       // the layout that wrote it
  int expert_parallel = 1;
  int pipeline_parallel = 1;
  std::optional<LoraBase> lora_base;  // a LoRA run's checkpoint (adapters only)
  std::string optimizer = "adamw";    // optim.name of its optimizer state ("optimizer"; absent: adamw)
};

// The base of a model with LoRA adapters. For model.init_from = hf:DIR, the fingerprint is a sha256 over
// its model.safetensors.index.json (when it has one) and, for each weight file in name order, its name,
// size, first MiB (the safetensors header and the first weights) and last MiB: two fine-tunes of one
// architecture share their index but not their weights, and nothing is read whole. Without init_from
// the base is init_weights(run.seed): "seed <seed>".
LoraBase lora_base_of(const model::TransformerImpl& model);

// The model's routed experts' stacked weights (model::ParamRole::expert): filed by global expert id.
std::set<std::string> expert_names(const model::TransformerImpl& model);

// Writes a checkpoint for `progress.step` and returns its folder. Collective when `layout` is given
// (every rank calls it); each rank writes what it owns. Throws CheckpointError on any I/O error or
// when the disk lacks room (checked before anything is written), leaving earlier checkpoints and
// `latest` untouched.
std::string save_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                            const optim::OptimizerState& optimizer, const std::string& config_yaml, const Progress& progress,
                            const dist::Layout* layout = nullptr);
// The same without optimizer state (moetrain convert): a resume from it starts AdamW fresh.
std::string save_weights_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                                    const std::string& config_yaml, const Progress& progress);

struct SaveJob;

// checkpoint.async: start() snapshots this rank's share to CPU memory and writes it on a background
// thread while training goes on; poll() (collective, every rank at the same step) commits it once
// every rank has written. One save is in flight at a time, so the extra memory is at most one CPU
// copy of this rank's weights and AdamW moments (3x its parameter bytes in fp32). The commit is the
// same atomic rename as a synchronous save: until then `latest` names the previous checkpoint.
class AsyncSaver {
 public:
  AsyncSaver();
  ~AsyncSaver();
  void start(const std::string& out_dir, const model::TransformerImpl& model, const optim::OptimizerState& optimizer,
             const std::string& config_yaml, const Progress& progress, const dist::Layout* layout = nullptr);
  // Commits the save in flight if every rank has written it (or, with wait, once they have); returns
  // the committed folder, or nullopt if nothing was committed. A write error on any rank throws on all.
  std::optional<std::string> poll(bool wait);
  bool in_flight() const { return job_ != nullptr; }
  uint64_t bytes_in_flight() const { return bytes_in_flight_; }

 private:
  std::unique_ptr<SaveJob> job_;
  std::thread thread_;
  std::atomic<bool> done_{false};
  std::exception_ptr error_;
  uint64_t bytes_in_flight_ = 0;
};

// A user's path to a checkpoint: a run folder, its ckpt/ folder, or a step folder. Returns the step
// folder `latest` names, or nullopt if the path holds no checkpoint yet. With `latest` missing or not
// naming a checkpoint, the newest step folder whose files verify (at `verify`) stands in, with a note
// on the log; if none verifies, CheckpointError: step folders are never taken for "no checkpoint".
std::optional<std::string> find_checkpoint(const std::string& path, const std::string& verify = "size");
// The newest step folder under `root` (a ckpt/ folder) other than `except` whose manifest reads and
// whose files verify: the last good checkpoint to name in an error.
std::optional<std::string> newest_verified_checkpoint(const std::string& root, const std::string& verify = "size",
                                                      const std::string& except = "");
// Reads manifest.json and checks every listed file: sizes always, sha256 when verify == "full".
// A missing, truncated, altered or unreadable file, a file the manifest does not list, or a manifest
// listing no files throws CheckpointError naming it.
Manifest open_checkpoint(const std::string& step_dir, const std::string& verify = "full");
// The same checks without throwing: one line per problem (moetrain inspect).
std::vector<std::string> verify_files(const std::string& step_dir, const Manifest& manifest, const std::string& verify);
// Reads and validates the manifest only (no file checks): every field's type and range, plain file
// names inside the folder, the step against the folder's name, a sane layout.
Manifest read_manifest(const std::string& step_dir);

// Loads the weights this rank holds (its experts by global id, model.expert_offset() onwards; its
// pipeline stage's blocks and ends, from whichever stage's file holds them), requiring exactly the
// model's names, shapes and dtypes; a mismatch names the tensor and both shapes. A model with LoRA
// adapters loads its adapters and buffers only (its base comes from model.init_from), from a LoRA
// checkpoint taken on the same base (lora_base_of): another base is a one-line error naming both.
void load_model(const std::string& step_dir, model::TransformerImpl& model);
// Loads moments, step count and this rank's CPU RNG state into `optimizer` over the same parameters.
// A weights-only checkpoint leaves the optimizer as it is.
void load_optimizer(const std::string& step_dir, optim::OptimizerState& optimizer, const model::TransformerImpl& model,
                    int rank = 0);

// Deletes step folders beyond the newest keep_last (0 keeps all), except milestones (step a multiple
// of keep_every > 0) and never the one `latest` names. Leftover temporary folders of older steps go too.
void apply_retention(const std::string& out_dir, int keep_last, int keep_every = 0);

std::string step_dir_name(int64_t step);  // step_00000500

}  // namespace moetrain::ckpt
