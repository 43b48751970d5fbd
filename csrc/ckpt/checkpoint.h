// Checkpoints: <out_dir>/ckpt/step_XXXXXXXX/{model,optim}.safetensors + manifest.json, written into a
// temporary folder, fsynced, renamed into place; <out_dir>/ckpt/latest names the newest complete
// one and is replaced last, so a crash at any instant leaves the previous checkpoint loadable.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "optim/adamw.h"

namespace moetrain::ckpt {

struct Progress {
  int64_t step = 0;      // optimizer steps completed
  int64_t tokens = 0;    // training tokens consumed
  double elapsed_s = 0;  // training wall time so far
};

struct FileEntry {
  std::string name;
  uint64_t size = 0;
  std::string sha256;
};

struct Manifest {
  int format_version = 1;
  Progress progress;
  std::string config_yaml;  // the resolved config of the run that wrote it
  std::vector<FileEntry> files;
};

// Expert parallelism: this rank holds routed experts [offset, offset + local) of `total`, stacked on
// dim 0 of every tensor whose name contains ".moe.experts." (weights and their moments). Checkpoints
// always hold whole tensors, so any layout loads any checkpoint.
struct ExpertShard {
  int64_t offset = 0, local = 0, total = 0;
  std::function<torch::Tensor(const torch::Tensor&)> gather;  // collective: the whole tensor, in expert order
};
bool is_expert_tensor(const std::string& name);

// Writes a checkpoint for `progress.step`; returns its folder. With a shard every rank must call it
// (the gather is collective) and only the one with `write` set writes; the others return "". Throws CheckpointError on any I/O error,
// leaving earlier checkpoints and `latest` untouched.
std::string save_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                            const optim::AdamW& optimizer, const std::string& config_yaml, const Progress& progress,
                            const ExpertShard* shard = nullptr, bool write = true);

// The same without optimizer state (moetrain convert): a resume from it starts AdamW fresh.
std::string save_weights_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                                    const std::string& config_yaml, const Progress& progress);

// A user's path to a checkpoint: a run folder, its ckpt/ folder, or a step folder. Returns the step
// folder, or nullopt if the path holds no checkpoint yet (no `latest`).
std::optional<std::string> find_checkpoint(const std::string& path);

// Reads manifest.json and checks every listed file: sizes always, sha256 when verify == "full".
// A missing, truncated or altered file throws CheckpointError naming it.
Manifest open_checkpoint(const std::string& step_dir, const std::string& verify = "full");

// Loads weights into `model`, requiring exactly its parameter names, shapes and dtypes.
// With a shard, expert tensors are read whole and this rank's experts copied in.
void load_model(const std::string& step_dir, model::TransformerImpl& model, const ExpertShard* shard = nullptr);
// Loads moments, step count and the CPU RNG state into `optimizer` built over the same parameters.
// A weights-only checkpoint (no optim.safetensors; open_checkpoint has checked the manifest's files)
// leaves the optimizer as it is.
void load_optimizer(const std::string& step_dir, optim::AdamW& optimizer, const ExpertShard* shard = nullptr);

// Deletes step folders beyond the newest keep_last (0 keeps all); never the one `latest` names.
void apply_retention(const std::string& out_dir, int keep_last);

std::string step_dir_name(int64_t step);  // step_00000500

}  // namespace moetrain::ckpt
