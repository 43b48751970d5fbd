// Sharded, atomic checkpoint save; verification; load at any expert-parallel layout.
#include "ckpt/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <set>
#include <memory>
#include <nlohmann/json.hpp>

#include "ckpt/safetensors.h"
#include "ckpt/sha256.h"
#include "common/errors.h"
#include "common/fault.h"
#include "common/files.h"
#include "common/log.h"
#include "common/tensor.h"
#include "config/config.h"

using json = nlohmann::json;

namespace moetrain::ckpt {

namespace {

constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimFile = "optim.safetensors";
constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kExpertsPrefix = "experts-";
constexpr const char* kOptimExpertsPrefix = "optim-experts-";
// Pipeline stage s > 0 of pp files its replicated weights and moments apart (stage 0 keeps the names
// above), and every stage's expert files carry the stage: "model-stage-00001-of-00004.safetensors",
// "experts-stage00001-00000-of-00002.safetensors".
constexpr const char* kModelStagePrefix = "model-stage-";
constexpr const char* kOptimStagePrefix = "optim-stage-";
constexpr int kFormatVersion = 2;


std::string numbered(const std::string& prefix, int64_t i, int64_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%05lld-of-%05lld.safetensors", static_cast<long long>(i), static_cast<long long>(n));
  return prefix + buf;
}
std::string stage_file(const char* whole, const char* stage_prefix, int stage, int pp) {
  return stage == 0 ? std::string(whole) : numbered(stage_prefix, stage, pp);
}
std::string expert_file(const char* prefix, int stage, int pp, int ep_rank, int ep) {
  if (pp == 1) return numbered(prefix, ep_rank, ep);
  char buf[32];
  std::snprintf(buf, sizeof buf, "stage%05d-", stage);
  return numbered(prefix + std::string(buf), ep_rank, ep);
}
std::string rng_file(int rank) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "rng-%05d.safetensors", rank);
  return buf;
}
std::string expert_key(const std::string& name, int64_t global_id, const std::string& suffix = "") {
  return name + "[" + std::to_string(global_id) + "]" + suffix;
}

void check_like(const std::string& file, const std::string& name, const TensorInfo& info, at::IntArrayRef shape,
                torch::ScalarType dtype) {
  if (info.shape != shape.vec())
    throw CheckpointError(file + ": tensor '" + name + "' has shape " + shape_text(info.shape) +
                          " in the checkpoint but " + shape_text(shape) + " in the model");
  if (info.dtype != dtype)
    throw CheckpointError(file + ": tensor '" + name + "' has dtype " + std::string(c10::toString(info.dtype)) +
                          " in the checkpoint but " + std::string(c10::toString(dtype)) + " in the model");
}

// Reads `name` from `file` and checks it against the tensor it will be copied into. `rows`, when
// given, takes the slice [offset, offset + target rows) of dim 0 of a stacked expert tensor (format 1).
torch::Tensor read_matching(const SafetensorsFile& file, const std::string& name, const torch::Tensor& target,
                            std::optional<std::pair<int64_t, int64_t>> rows = std::nullopt) {
  auto expected = target.sizes().vec();
  if (rows) expected[0] = rows->second;
  if (!file.contains(name))
    throw CheckpointError(file.path() + ": tensor '" + name + "' is missing (the model expects shape " +
                          shape_text(expected) + ")");
  check_like(file.path(), name, file.info(name), expected, target.scalar_type());
  auto value = file.load(name);
  return rows ? value.narrow(0, rows->first, target.size(0)) : value;
}

// The per-expert tensors of a format-2 checkpoint, found by name across its expert files.
class ExpertFiles {
 public:
  ExpertFiles(const std::string& step_dir, const Manifest& manifest, const std::string& prefix) {
    for (const auto& f : manifest.files) {
      if (f.name.rfind(prefix, 0) != 0) continue;
      files_.push_back(std::make_unique<SafetensorsFile>(files::join(step_dir, f.name)));
      for (const auto& info : files_.back()->tensors()) where_[info.name] = files_.back().get();
    }
  }
  // Copies experts [offset, offset + target.size(0)) of `name` into the stacked `target`.
  void load_into(const std::string& name, const std::string& suffix, torch::Tensor& target, int64_t offset,
                 int64_t total_hint) const {
    for (int64_t e = 0; e < target.size(0); ++e) {
      const std::string key = expert_key(name, offset + e, suffix);
      auto it = where_.find(key);
      if (it == where_.end())
        throw CheckpointError("checkpoint has no tensor '" + key + "' (the model expects routed expert " +
                              std::to_string(offset + e) + " of " + std::to_string(total_hint) + ", shape " +
                              shape_text(target[e].sizes()) + ")");
      check_like(it->second->path(), key, it->second->info(key), target[e].sizes(), target.scalar_type());
      target[e].copy_(it->second->load(key));
    }
  }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

std::string listed_path(const std::string& step_dir, const Manifest& manifest, const std::string& name);

// The replicated tensors of a checkpoint, found by name across its whole file (stage 0, or the only
// one) and the other pipeline stages' files.
class WholeFiles {
 public:
  WholeFiles(const std::string& step_dir, const Manifest& manifest, const char* whole, const char* stage_prefix) {
    // The whole (stage 0) file first: it names the errors and holds the step count.
    const std::string path = listed_path(step_dir, manifest, whole);
    files_.push_back(std::make_unique<SafetensorsFile>(path));
    for (const auto& f : manifest.files)
      if (f.name.rfind(stage_prefix, 0) == 0) files_.push_back(std::make_unique<SafetensorsFile>(files::join(step_dir, f.name)));
    for (const auto& file : files_)
      for (const auto& info : file->tensors())
        if (!where_.emplace(info.name, file.get()).second)
          throw CheckpointError(file->path() + ": tensor '" + info.name + "' is also in " + where_[info.name]->path());
  }
  const std::map<std::string, const SafetensorsFile*>& tensors() const { return where_; }
  const SafetensorsFile& holding(const std::string& name) const {
    auto it = where_.find(name);
    return it == where_.end() ? *files_.front() : *it->second;
  }
  const SafetensorsFile& first() const { return *files_.front(); }

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const SafetensorsFile*> where_;
};

uint64_t free_bytes(const std::string& dir) {
  struct statvfs st {};
  if (statvfs(dir.c_str(), &st) != 0) return UINT64_MAX;  // unknown: let the write itself report
  return uint64_t(st.f_bavail) * uint64_t(st.f_frsize);
}

struct PendingFile {
  std::string name;
  TensorMap tensors;
  std::map<std::string, std::string> metadata;
};

int64_t total_experts(const model::TransformerImpl& model) { return model.config().moe.n_experts; }

}  // namespace

// A save in three phases. plan() (collective) decides what this rank writes, checks the disk and
// makes the temporary folder; write() writes and fsyncs this rank's files (local: it may run on a
// background thread); commit() (collective) gathers the file entries, and rank 0 writes the manifest,
// renames the folder into place and moves `latest`.
struct SaveJob {
  const dist::Layout* layout = nullptr;
  dist::Communicator* world = nullptr;
  int rank = 0, world_size = 1, ep = 1, pp = 1;
  int64_t routed_experts = 0;
  Progress progress;
  std::string config_yaml;
  std::string ckpt_root, name, final_dir, tmp_dir;
  std::vector<PendingFile> files;
  std::string entries;  // JSON array of this rank's {name, size, sha256}, filled by write()
  uint64_t bytes = 0;
  std::optional<LoraBase> lora_base;  // rank 0 of a LoRA run: the manifest's "lora"
  config::LoraConfig lora;
  std::string optimizer;  // optim.name of the state written; empty for weights only

  void barrier() const {
    if (world) world->barrier();
  }
};

namespace {

SaveJob plan(const std::string& out_dir, const model::TransformerImpl& model, const optim::OptimizerState* optimizer,
             const std::string& config_yaml, const Progress& progress, const dist::Layout* layout, bool snapshot) {
  SaveJob job;
  job.layout = layout;
  job.world = layout ? layout->world.get() : nullptr;
  job.rank = job.world ? job.world->rank() : 0;
  job.world_size = job.world ? job.world->world_size() : 1;
  job.ep = layout ? layout->ep_size() : 1;
  job.pp = layout ? layout->pp_size() : 1;
  job.routed_experts = total_experts(model);
  job.progress = progress;
  job.config_yaml = config_yaml;
  const int rank = job.rank, ep_rank = layout ? layout->ep_rank() : 0, stage = layout ? layout->pp_rank() : 0;
  const bool first_replica = !layout || layout->edp->rank() == 0;  // writes this ep rank's experts
  const bool stage_writer = !layout || layout->dp_rank() == 0;     // writes this stage's replicated tensors
  std::set<std::string> duplicates;  // a tied embedding's second copy: the first stage writes it
  for (const auto& p : model.roled_parameters())
    if (p.duplicate) duplicates.insert(p.name);
  const int64_t offset = model.expert_offset();
  // An asynchronous save keeps CPU copies, so training may change the originals meanwhile.
  auto keep = [&](const torch::Tensor& t) {
    return snapshot ? t.detach().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true) : t.detach();
  };

  PendingFile main{stage_file(kModelFile, kModelStagePrefix, stage, job.pp), {}, {{"format", "moetrain"}}};
  PendingFile experts{expert_file(kExpertsPrefix, stage, job.pp, ep_rank, job.ep), {}, {{"format", "moetrain"}}};
  PendingFile optim{stage_file(kOptimFile, kOptimStagePrefix, stage, job.pp), {}, {{"format", "moetrain"}}};
  PendingFile optim_experts{expert_file(kOptimExpertsPrefix, stage, job.pp, ep_rank, job.ep), {}, {{"format", "moetrain"}}};
  const auto experts_by_name = expert_names(model);
  auto add = [&](PendingFile& whole, PendingFile& per_expert, const std::string& name, const std::string& suffix,
                 const torch::Tensor& t) {
    const bool expert = experts_by_name.count(name) > 0;
    if (!(expert ? first_replica : stage_writer && !duplicates.count(name))) return;  // another rank writes it
    if (!t.defined())
      throw CheckpointError("internal: rank " + std::to_string(rank) + " writes '" + name + suffix + "' but holds none of it");
    if (c10::isReducedFloatingType(t.scalar_type()))  // a weight held in bf16 whose fp32 master is missing
      throw CheckpointError("internal: '" + name + suffix + "' would be written in " +
                            std::string(c10::toString(t.scalar_type())) + ", not fp32");
    auto kept = keep(t);
    if (!expert) {
      whole.tensors.emplace_back(name + suffix, kept);
      return;
    }
    for (int64_t e = 0; e < t.size(0); ++e) per_expert.tensors.emplace_back(expert_key(name, offset + e, suffix), kept[e]);
  };
  // Weights are written in fp32: the optimizer's master copy where it keeps one apart (ZeRO-1 with the
  // parameter held in bf16; defined on the rank that writes it), else the parameter.
  std::map<std::string, torch::Tensor> masters;
  if (optimizer)
    for (const auto& s : optimizer->states)
      if (s.master.defined()) masters[s.name] = s.master;
  // A LoRA run writes its adapters only: the frozen base is model.init_from's (or the seed's), named by
  // the manifest.
  if (model.lora_enabled()) {
    job.lora = model.lora_config();
    if (rank == 0) job.lora_base = lora_base_of(model);
  }
  for (const auto& p : model.named_parameters()) {
    if (model.lora_enabled() && !p.value().requires_grad()) continue;
    const auto master = masters.find(p.key());
    add(main, experts, p.key(), "", master != masters.end() ? master->second : p.value());
  }
  if (stage_writer)
    for (const auto& b : model.named_buffers()) main.tensors.emplace_back(b.key(), keep(b.value()));
  if (stage_writer) job.files.push_back(std::move(main));
  if (!experts.tensors.empty()) job.files.push_back(std::move(experts));
  if (optimizer) {
    job.optimizer = optimizer->optimizer;
    for (const auto& s : optimizer->states) {
      if (s.muon) {
        add(optim, optim_experts, s.name, ".momentum", s.momentum);
        continue;
      }
      add(optim, optim_experts, s.name, ".exp_avg", s.exp_avg);
      add(optim, optim_experts, s.name, ".exp_avg_sq", s.exp_avg_sq);
    }
    optim.metadata["step_count"] = std::to_string(optimizer->step_count);
    if (stage_writer) job.files.push_back(std::move(optim));
    if (!optim_experts.tensors.empty()) job.files.push_back(std::move(optim_experts));
    PendingFile rng{rng_file(rank), {}, {{"format", "moetrain"}}};
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    rng.tensors.emplace_back("rng.cpu", generator.get_state());
    job.files.push_back(std::move(rng));
  }

  // Room on the disk, checked by every rank before anyone writes.
  job.ckpt_root = files::join(out_dir, "ckpt");
  job.name = step_dir_name(progress.step);
  job.final_dir = files::join(job.ckpt_root, job.name);
  job.tmp_dir = files::join(job.ckpt_root, ".tmp-" + job.name);
  files::make_directories(job.ckpt_root);
  uint64_t need = 1 << 20;  // headers and the manifest
  for (const auto& f : job.files)
    for (const auto& [n, t] : f.tensors) need += uint64_t(t.nbytes());
  job.bytes = need;
  const uint64_t have = free_bytes(job.ckpt_root);
  const bool short_here = have < need;
  const bool short_anywhere = job.world ? dist::all_sum(*job.world, short_here ? 1.0 : 0.0) > 0 : short_here;
  if (short_anywhere)
    throw CheckpointError(short_here ? "not enough free space in '" + job.ckpt_root + "' for the checkpoint of step " +
                                           std::to_string(progress.step) + ": this rank writes " + std::to_string(need) +
                                           " bytes, " + std::to_string(have) + " are free"
                                     : "another rank lacks the free space to write the checkpoint of step " +
                                           std::to_string(progress.step) + " under '" + job.ckpt_root + "'");
  if (rank == 0) {
    files::remove_tree(job.tmp_dir);  // left by a crash during an earlier save of this step
    files::make_directories(job.tmp_dir);
  }
  job.barrier();
  return job;
}

void write(SaveJob& job) {
  json entries = json::array();
  for (const auto& f : job.files) {
    const std::string path = files::join(job.tmp_dir, f.name);
    save_safetensors(path, f.tensors, f.metadata);  // written and fsynced
    entries.push_back({{"name", f.name}, {"size", *files::file_size(path)}, {"sha256", sha256_file(path)}});
  }
  job.entries = entries.dump();
  job.files.clear();  // the copies are on disk now
}

std::string commit(SaveJob& job) {
  const auto all_entries = job.world ? dist::all_gather_strings(*job.world, job.entries) : std::vector<std::string>{job.entries};
  fault_point("shards_written", job.progress.step, job.rank);  // the crash and signal tests
  if (job.rank == 0) {
    const auto& progress = job.progress;
    json manifest;
    manifest["format"] = "moetrain-checkpoint";
    manifest["format_version"] = kFormatVersion;
    manifest["step"] = progress.step;
    manifest["tokens"] = progress.tokens;
    manifest["elapsed_s"] = progress.elapsed_s;
    manifest["gpu_hours"] = progress.gpu_hours;
    manifest["cost_usd"] = progress.cost_usd;
    manifest["layout"] = {{"world_size", job.world_size}, {"expert_parallel", job.ep}, {"pipeline_parallel", job.pp},
                          {"routed_experts", job.routed_experts}};
    // The sampler is a pure function of (seed, step, micro-batch, rank): the step is the data cursor.
    manifest["data_cursor"] = {{"step", progress.step}, {"tokens", progress.tokens}};
    manifest["config"] = job.config_yaml;
    if (!job.optimizer.empty()) manifest["optimizer"] = job.optimizer;
    if (job.lora_base)
      manifest["lora"] = {{"rank", job.lora.rank},
                          {"alpha", job.lora.alpha},
                          {"targets", job.lora.targets},
                          {"base", {{"init_from", job.lora_base->init_from}, {"fingerprint", job.lora_base->fingerprint}}}};
    manifest["files"] = json::array();
    for (const auto& text : all_entries)
      for (const auto& e : json::parse(text)) manifest["files"].push_back(e);
    files::write_file_synced(files::join(job.tmp_dir, kManifestFile), manifest.dump(2) + "\n");
    files::fsync_path(job.tmp_dir, true);
    if (files::exists(job.final_dir)) files::remove_tree(job.final_dir);
    files::rename_path(job.tmp_dir, job.final_dir);
    files::fsync_path(job.ckpt_root, true);
    fault_point("renamed", progress.step, job.rank);
    files::write_file_atomic(files::join(job.ckpt_root, "latest"), job.name + "\n");
  }
  job.barrier();  // every rank returns once the checkpoint is committed
  return job.final_dir;
}

std::string save(const std::string& out_dir, const model::TransformerImpl& model, const optim::OptimizerState* optimizer,
                 const std::string& config_yaml, const Progress& progress, const dist::Layout* layout) {
  SaveJob job = plan(out_dir, model, optimizer, config_yaml, progress, layout, /*snapshot=*/false);
  write(job);
  return commit(job);
}

}  // namespace

std::set<std::string> expert_names(const model::TransformerImpl& model) {
  std::set<std::string> names;
  for (const auto& p : model.roled_parameters())
    if (p.role == model::ParamRole::expert) names.insert(p.name);
  return names;
}

LoraBase lora_base_of(const model::TransformerImpl& model) {
  const std::string& init_from = model.config().init_from;
  if (init_from.empty()) return {"", "seed " + std::to_string(model.lora_seed())};
  // ckpt:DIR, one of our runs (an SFT run before `moetrain rl`): its manifest holds every file's sha256.
  const bool ours = init_from.rfind("ckpt:", 0) == 0;
  std::string dir = init_from.rfind("hf:", 0) == 0 ? init_from.substr(3) : init_from;
  if (ours) {
    const auto step_dir = find_checkpoint(init_from.substr(5));
    if (!step_dir) throw CheckpointError("model.init_from = " + init_from + " holds no checkpoint");
    dir = *step_dir;
  }
  const std::string index_path = files::join(dir, "model.safetensors.index.json");
  Sha256 digest;
  std::set<std::string> weight_files;
  if (ours) {
    weight_files.insert("manifest.json");
  } else if (files::exists(index_path)) {
    const std::string index = files::read_file(index_path);
    digest.update(index.data(), index.size());
    try {
      for (const auto& entry : json::parse(index).at("weight_map").items()) weight_files.insert(entry.value().get<std::string>());
    } catch (const json::exception& e) {
      throw CheckpointError(index_path + ": not a safetensors index (" + e.what() + ")");
    }
  } else {
    weight_files.insert("model.safetensors");
  }
  constexpr uint64_t kSample = uint64_t(1) << 20;
  std::vector<char> buffer(kSample);
  for (const auto& name : weight_files) {
    const std::string path = files::join(dir, name);
    const int fd = files::open_regular<CheckpointError>(path);
    const uint64_t size = files::file_size(path).value_or(0);
    const std::string head = name + "\n" + std::to_string(size) + "\n";
    digest.update(head.data(), head.size());
    for (const uint64_t at : {uint64_t(0), size > kSample ? size - kSample : uint64_t(0)}) {
      const uint64_t n = std::min(kSample, size);
      uint64_t done = 0;
      while (done < n) {
        const ssize_t got = ::pread(fd, buffer.data() + done, n - done, off_t(at + done));
        if (got <= 0) {
          ::close(fd);
          throw CheckpointError("cannot read '" + path + "' to fingerprint the LoRA base");
        }
        done += uint64_t(got);
      }
      digest.update(buffer.data(), n);
    }
    ::close(fd);
  }
  return {init_from, "sha256:" + digest.hex_digest()};
}

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string save_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                            const optim::OptimizerState& optimizer, const std::string& config_yaml, const Progress& progress,
                            const dist::Layout* layout) {
  return save(out_dir, model, &optimizer, config_yaml, progress, layout);
}

std::string save_weights_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                                    const std::string& config_yaml, const Progress& progress) {
  return save(out_dir, model, nullptr, config_yaml, progress, nullptr);
}

namespace {

// The step of a folder named step_XXXXXXXX, or nullopt for any other name.
std::optional<int64_t> step_of_folder(const std::string& dir) {
  std::string name = dir;
  while (name.size() > 1 && name.back() == '/') name.pop_back();
  name = name.substr(name.rfind('/') == std::string::npos ? 0 : name.rfind('/') + 1);
  if (name.size() <= 5 || name.rfind("step_", 0) != 0 || name.size() > 5 + 18) return std::nullopt;
  for (size_t i = 5; i < name.size(); ++i)
    if (name[i] < '0' || name[i] > '9') return std::nullopt;
  return std::stoll(name.substr(5));
}

// Step folders under `root`, newest first.
std::vector<std::string> step_folders_newest_first(const std::string& root) {
  std::vector<std::string> dirs;
  if (!files::is_directory(root)) return dirs;
  for (const auto& name : files::list_directory(root))
    if (step_of_folder(name) && files::is_directory(files::join(root, name))) dirs.push_back(files::join(root, name));
  std::sort(dirs.begin(), dirs.end(), [](const std::string& a, const std::string& b) {
    return *step_of_folder(a) > *step_of_folder(b);
  });
  return dirs;
}

// Why `step_dir` cannot be loaded, or "" when its manifest reads and every file verifies.
std::string why_unloadable(const std::string& step_dir, const std::string& verify) {
  try {
    const auto problems = verify_files(step_dir, read_manifest(step_dir), verify);
    return problems.empty() ? "" : problems.front();
  } catch (const Error& e) {
    return e.what();
  }
}

}  // namespace

std::optional<std::string> newest_verified_checkpoint(const std::string& root, const std::string& verify,
                                                      const std::string& except) {
  for (const auto& dir : step_folders_newest_first(root))
    if (dir != except && why_unloadable(dir, verify).empty()) return dir;
  return std::nullopt;
}

std::optional<std::string> find_checkpoint(const std::string& path, const std::string& verify) {
  if (files::exists(files::join(path, kManifestFile))) return path;
  for (const std::string& root : {path, files::join(path, "ckpt")}) {
    const auto steps = step_folders_newest_first(root);
    const std::string latest = files::join(root, "latest");
    const bool has_latest = files::exists(latest);
    if (!has_latest && steps.empty()) continue;
    // `latest` names the newest complete checkpoint; when it is missing or does not name one, the
    // newest step folder that verifies stands in (said aloud), and with none the answer is an error,
    // never "no checkpoint": training from step 0 on top of them would bury the run.
    std::string trouble;
    if (!has_latest) {
      trouble = "'" + latest + "' is missing";
    } else {
      std::string name;
      try {
        name = files::read_file(latest, 4096);
      } catch (const Error& e) {
        trouble = std::string("'") + latest + "' is unreadable (" + e.what() + ")";
      }
      while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
      if (trouble.empty()) {
        if (!step_of_folder(name) || name.find('/') != std::string::npos)
          trouble = "'" + latest + "' does not name a step folder";
        else if (!files::exists(files::join(files::join(root, name), kManifestFile)))
          trouble = "'" + latest + "' names '" + name + "', which has no " + kManifestFile;
        else
          return files::join(root, name);
      }
    }
    if (steps.empty()) throw CheckpointError(trouble + ", and '" + root + "' holds no step folder");
    if (auto dir = newest_verified_checkpoint(root, verify)) {
      log_line("note: " + trouble + "; using the newest checkpoint that verifies (" + verify + "): " + *dir);
      return dir;
    }
    throw CheckpointError(trouble + " and none of the " + std::to_string(steps.size()) + " step folders in '" + root +
                          "' verifies (newest: " + why_unloadable(steps.front(), verify) + ")");
  }
  if (!files::exists(path)) throw CheckpointError("no such checkpoint or run folder: '" + path + "'");
  return std::nullopt;
}

namespace {

// Manifest fields are data from disk: each is checked for type and range, and a violation names the
// manifest and the field.
struct ManifestReader {
  const std::string& path;
  const json& j;

  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    throw CheckpointError(path + ": field '" + field + "' " + what);
  }
  const json& at(const json& obj, const std::string& key, const std::string& field) const {
    if (!obj.is_object() || !obj.contains(key)) bad(field, "is missing");
    return obj[key];
  }
  // json's get<int64_t>() of 1e100 is undefined behaviour: only JSON integers in range pass.
  int64_t integer(const json& v, const std::string& field, int64_t lo, int64_t hi) const {
    const bool ok = v.is_number_integer() && !(v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)) &&
                    v.get<int64_t>() >= lo && v.get<int64_t>() <= hi;
    if (!ok)
      bad(field, "= " + (v.is_primitive() ? v.dump().substr(0, 40) : std::string(v.type_name())) +
                     " is not an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return v.get<int64_t>();
  }
  double non_negative(const json& v, const std::string& field) const {
    if (!v.is_number()) bad(field, "must be a number, got " + v.dump().substr(0, 40));
    const double x = v.get<double>();
    if (!std::isfinite(x) || x < 0) bad(field, "must be a finite number >= 0");
    return x;
  }
  std::string text(const json& v, const std::string& field) const {
    if (!v.is_string()) bad(field, "must be a string");
    return v.get<std::string>();
  }
};

bool is_plain_file_name(const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name.size() > 255) return false;
  for (char c : name)
    if (c == '/' || c == '\\' || c == '\0' || (unsigned char)(c) < 0x20) return false;
  return true;
}

bool is_sha256_hex(const std::string& s) {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

}  // namespace

Manifest read_manifest(const std::string& step_dir) {
  const std::string manifest_path = files::join(step_dir, kManifestFile);
  if (!files::exists(manifest_path)) throw CheckpointError("'" + manifest_path + "' is missing: not a checkpoint folder");
  json j;
  try {
    j = json::parse(files::read_file(manifest_path));
  } catch (const json::exception& e) {
    throw CheckpointError(manifest_path + ": not valid JSON (" + e.what() + ")");
  }
  const ManifestReader r{manifest_path, j};
  if (!j.is_object()) throw CheckpointError(manifest_path + ": not a moetrain checkpoint manifest (not a JSON object)");
  Manifest m;
  if (r.text(r.at(j, "format", "format"), "format") != "moetrain-checkpoint")
    throw CheckpointError(manifest_path + ": not a moetrain checkpoint manifest");
  m.format_version = int(r.integer(r.at(j, "format_version", "format_version"), "format_version", 1, kFormatVersion));
  m.progress.step = r.integer(r.at(j, "step", "step"), "step", 0, INT64_MAX);
  if (const auto folder_step = step_of_folder(step_dir); folder_step && *folder_step != m.progress.step)
    r.bad("step", "= " + std::to_string(m.progress.step) + " but the folder is for step " + std::to_string(*folder_step));
  m.progress.tokens = r.integer(r.at(j, "tokens", "tokens"), "tokens", 0, INT64_MAX);
  m.progress.elapsed_s = r.non_negative(r.at(j, "elapsed_s", "elapsed_s"), "elapsed_s");
  if (j.contains("gpu_hours")) m.progress.gpu_hours = r.non_negative(j["gpu_hours"], "gpu_hours");
  if (j.contains("cost_usd")) m.progress.cost_usd = r.non_negative(j["cost_usd"], "cost_usd");
  if (j.contains("layout")) {
    const json& layout = j["layout"];
    m.world_size = int(r.integer(r.at(layout, "world_size", "layout.world_size"), "layout.world_size", 1, 1 << 20));
    m.expert_parallel = int(r.integer(r.at(layout, "expert_parallel", "layout.expert_parallel"),
                                      "layout.expert_parallel", 1, m.world_size));
    if (layout.contains("pipeline_parallel"))
      m.pipeline_parallel = int(r.integer(layout["pipeline_parallel"], "layout.pipeline_parallel", 1, m.world_size));
    if (m.world_size % (m.expert_parallel * m.pipeline_parallel) != 0)
      r.bad("layout.expert_parallel", "= " + std::to_string(m.expert_parallel) + " times layout.pipeline_parallel = " +
                                          std::to_string(m.pipeline_parallel) + " does not divide layout.world_size = " +
                                          std::to_string(m.world_size));
  }
  if (j.contains("lora")) {
    const json& base = r.at(j["lora"], "base", "lora.base");
    m.lora_base = LoraBase{r.text(r.at(base, "init_from", "lora.base.init_from"), "lora.base.init_from"),
                           r.text(r.at(base, "fingerprint", "lora.base.fingerprint"), "lora.base.fingerprint")};
  }
  if (j.contains("optimizer")) {  // absent before optim.name: AdamW
    m.optimizer = r.text(j["optimizer"], "optimizer");
    if (m.optimizer != "adamw" && m.optimizer != "muon") r.bad("optimizer", "= '" + m.optimizer.substr(0, 40) + "' is not adamw or muon");
  }
  m.config_yaml = r.text(r.at(j, "config", "config"), "config");
  try {  // resume, inspect and generate build from it: a damaged config is a damaged checkpoint
    (void)config::parse_config(m.config_yaml, manifest_path + " (field 'config')");
  } catch (const ConfigError& e) {
    r.bad("config", std::string("is not a valid moetrain config: ") + e.what());
  }
  const json& listed = r.at(j, "files", "files");
  if (!listed.is_array()) r.bad("files", "must be an array");
  std::set<std::string> seen;
  for (size_t i = 0; i < listed.size(); ++i) {
    const std::string field = "files[" + std::to_string(i) + "]";
    FileEntry f;
    f.name = r.text(r.at(listed[i], "name", field + ".name"), field + ".name");
    if (!is_plain_file_name(f.name) || f.name == kManifestFile)
      r.bad(field + ".name", "= '" + f.name.substr(0, 80) + "' is not a plain file name inside the checkpoint folder");
    if (!seen.insert(f.name).second) r.bad(field + ".name", "lists '" + f.name + "' twice");
    f.size = uint64_t(r.integer(r.at(listed[i], "size", field + ".size"), field + ".size", 0, INT64_MAX));
    f.sha256 = r.text(r.at(listed[i], "sha256", field + ".sha256"), field + ".sha256");
    if (!is_sha256_hex(f.sha256)) r.bad(field + ".sha256", "is not 64 lowercase hex digits");
    m.files.push_back(std::move(f));
  }
  return m;
}

std::vector<std::string> verify_files(const std::string& step_dir, const Manifest& m, const std::string& verify) {
  std::vector<std::string> problems;
  if (m.files.empty()) problems.push_back("'" + files::join(step_dir, kManifestFile) + "' lists no files");
  std::set<std::string> listed;
  for (const auto& f : m.files) {
    listed.insert(f.name);
    const std::string path = files::join(step_dir, f.name);
    const auto size = files::file_size(path);
    if (!size) {
      const std::string kind = files::kind(path);
      problems.push_back("checkpoint file '" + path + "' is " + (kind == "missing" ? kind : kind + ", not a regular file"));
    } else if (*size != f.size) {
      problems.push_back("checkpoint file '" + path + "' has " + std::to_string(*size) + " bytes, the manifest says " +
                         std::to_string(f.size) + " (truncated or replaced)");
    } else if (verify == "full" && sha256_file(path) != f.sha256) {
      problems.push_back("checkpoint file '" + path + "' fails its sha256 check (altered or corrupted)");
    } else {
      try {
        SafetensorsFile readable(path);  // header and offsets parse: the tensors can be read
      } catch (const Error& e) {
        problems.push_back("checkpoint file '" + path + "' is unreadable: " + e.what());
      }
    }
  }
  // Whatever else is in the folder was not written by this checkpoint: it must not be loaded as if it were.
  for (const auto& name : files::list_directory(step_dir))
    if (name != kManifestFile && !listed.contains(name))
      problems.push_back("'" + files::join(step_dir, name) + "' is in the checkpoint folder but not in its manifest");
  return problems;
}

Manifest open_checkpoint(const std::string& step_dir, const std::string& verify) {
  Manifest m = read_manifest(step_dir);
  const auto problems = verify_files(step_dir, m, verify);
  if (!problems.empty()) throw CheckpointError(problems.front());
  return m;
}

// The path of `name` in `step_dir`, which its manifest must list: a file the manifest does not cover
// was not verified and is never loaded.
namespace {
std::string listed_path(const std::string& step_dir, const Manifest& manifest, const std::string& name) {
  for (const auto& f : manifest.files)
    if (f.name == name) return files::join(step_dir, name);
  throw CheckpointError("'" + files::join(step_dir, name) + "' is not listed in " + files::join(step_dir, kManifestFile) +
                        ": the checkpoint is incomplete or was altered");
}
}  // namespace

void load_model(const std::string& step_dir, model::TransformerImpl& model) {
  torch::NoGradGuard no_grad;
  const Manifest manifest = read_manifest(step_dir);
  const WholeFiles whole(step_dir, manifest, kModelFile, kModelStagePrefix);
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  if (model.lora_enabled()) {  // the adapters (and buffers); the frozen base came from model.init_from
    if (!manifest.lora_base)
      throw CheckpointError(step_dir + " holds a whole model, not LoRA adapters, but train.lora.rank = " +
                            std::to_string(model.lora_config().rank) + ": resume it without train.lora, or start the "
                            "LoRA run from it as its base");
    const LoraBase here = lora_base_of(model);
    if (*manifest.lora_base != here) {
      auto text = [](const LoraBase& b) {
        return (b.init_from.empty() ? std::string("the seeded init") : b.init_from) + " (" + b.fingerprint + ")";
      };
      throw CheckpointError("the LoRA checkpoint " + step_dir + " was trained on base " + text(*manifest.lora_base) +
                            ", not on this run's base " + text(here));
    }
    torch::OrderedDict<std::string, torch::Tensor> adapters;
    for (const auto& p : params)
      if (p.value().requires_grad()) adapters.insert(p.key(), p.value());
    params = std::move(adapters);
  } else if (manifest.lora_base) {
    throw CheckpointError(step_dir + " holds LoRA adapters (trained on " +
                          (manifest.lora_base->init_from.empty() ? std::string("the seeded init") : manifest.lora_base->init_from) +
                          "), not a whole model: set train.lora as that run did, or merge them first (moetrain convert "
                          "--merge-lora)");
  }
  // MTP modules are optional both ways: those the checkpoint lacks keep their seeded init, and those
  // the model lacks (model.mtp_depth lowered) are left out; each case says so once.
  std::set<int> dropped_mtp, fresh_mtp;
  for (const auto& [name, file] : whole.tensors())
    if (!params.contains(name) && !buffers.contains(name) && !model.held_by_another_stage(name)) {
      if (const int k = model::mtp_module_of(name); k >= 0) {
        dropped_mtp.insert(k);
        continue;
      }
      throw CheckpointError(file->path() + ": tensor '" + name + "' has no parameter or buffer in this model");
    }
  for (const int k : dropped_mtp)
    log_line("[ckpt] " + step_dir + ": MTP module mtp." + std::to_string(k) + " is not in this model (model.mtp_depth = " +
             std::to_string(model.config().mtp_depth) + "): not loaded");
  const int64_t offset = model.expert_offset(), E = total_experts(model);
  std::optional<ExpertFiles> experts;
  if (manifest.format_version >= 2) experts.emplace(step_dir, manifest, kExpertsPrefix);
  const auto experts_by_name = expert_names(model);
  for (auto& p : params) {
    if (const int k = model::mtp_module_of(p.key());
        k >= 0 && !whole.tensors().count("mtp." + std::to_string(k) + ".eh_proj")) {
      if (fresh_mtp.insert(k).second)
        log_line("[ckpt] " + step_dir + " has no MTP module mtp." + std::to_string(k) + ": it keeps its seeded init");
      continue;
    }
    const auto& file = whole.holding(p.key());
    if (!experts_by_name.count(p.key()))
      p.value().copy_(read_matching(file, p.key(), p.value()));
    else if (experts)
      experts->load_into(p.key(), "", p.value(), offset, E);
    else  // format 1: stacked over every expert in model.safetensors
      p.value().copy_(read_matching(file, p.key(), p.value(), std::make_pair(offset, E)));
  }
  for (auto& b : buffers) b.value().copy_(read_matching(whole.holding(b.key()), b.key(), b.value()));
}

void load_optimizer(const std::string& step_dir, optim::OptimizerState& optimizer, const model::TransformerImpl& model, int rank) {
  torch::NoGradGuard no_grad;
  if (!files::exists(files::join(step_dir, kOptimFile))) return;  // weights only (moetrain convert)
  const Manifest manifest = read_manifest(step_dir);
  if (manifest.optimizer != optimizer.optimizer)
    throw CheckpointError(step_dir + " holds the state of optim.name = " + manifest.optimizer + ", this run has optim.name = " +
                          optimizer.optimizer + ": resume with optim.name: " + manifest.optimizer + ", or start a new run");
  const WholeFiles whole(step_dir, manifest, kOptimFile, kOptimStagePrefix);
  const SafetensorsFile& file = whole.first();  // stage 0's: the step count
  const int64_t offset = model.expert_offset(), E = total_experts(model);
  std::optional<ExpertFiles> experts;
  if (manifest.format_version >= 2) experts.emplace(step_dir, manifest, kOptimExpertsPrefix);
  const auto experts_by_name = expert_names(model);
  for (auto& s : optimizer.states) {
    // An MTP module the checkpoint lacks (see load_model) starts with fresh moments.
    if (const int k = model::mtp_module_of(s.name);
        k >= 0 && !whole.tensors().count("mtp." + std::to_string(k) + (optimizer.optimizer == "muon" ? ".eh_proj.momentum" : ".eh_proj.exp_avg")))
      continue;
    using Moment = std::pair<const char*, torch::Tensor*>;
    const auto moments = s.muon ? std::vector<Moment>{{".momentum", &s.momentum}}
                                : std::vector<Moment>{{".exp_avg", &s.exp_avg}, {".exp_avg_sq", &s.exp_avg_sq}};
    for (auto [suffix, moment] : moments) {
      const auto& holding = whole.holding(s.name + suffix);
      if (!experts_by_name.count(s.name))
        moment->copy_(read_matching(holding, s.name + suffix, *moment));
      else if (experts)
        experts->load_into(s.name, suffix, *moment, offset, E);
      else
        moment->copy_(read_matching(holding, s.name + suffix, *moment, std::make_pair(offset, E)));
    }
  }
  const auto& meta = file.metadata();
  auto it = meta.find("step_count");
  if (it == meta.end()) throw CheckpointError(file.path() + ": metadata 'step_count' is missing");
  int64_t step_count = -1;
  const auto [end, ec] = std::from_chars(it->second.data(), it->second.data() + it->second.size(), step_count);
  if (ec != std::errc() || end != it->second.data() + it->second.size() || step_count < 0)
    throw CheckpointError(file.path() + ": metadata 'step_count' = '" + it->second.substr(0, 40) +
                          "' is not a non-negative integer");
  optimizer.step_count = step_count;

  // This rank's generator: its own file, or (a larger world than the one that saved) rank r % world's.
  torch::Tensor state;
  if (manifest.format_version >= 2) {
    const std::string name = rng_file(rank % std::max(1, manifest.world_size));
    if (files::exists(files::join(step_dir, name))) state = SafetensorsFile(listed_path(step_dir, manifest, name)).load("rng.cpu");
  } else if (file.contains("rng.cpu")) {
    state = file.load("rng.cpu");
  }
  if (state.defined()) {
    at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle to the global generator
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(state);
  }
}

void apply_retention(const std::string& out_dir, int keep_last, int keep_every) {
  if (keep_last <= 0) return;
  const std::string root = files::join(out_dir, "ckpt");
  const auto latest = find_checkpoint(root);
  std::vector<std::string> steps;  // names sort by step: zero-padded
  for (const auto& name : files::list_directory(root))
    if (name.rfind("step_", 0) == 0 && files::is_directory(files::join(root, name))) steps.push_back(name);
  const int64_t excess = int64_t(steps.size()) - keep_last;
  for (int64_t i = 0; i < excess; ++i) {
    const std::string dir = files::join(root, steps[size_t(i)]);
    if (latest && *latest == dir) continue;
    const int64_t step = std::stoll(steps[size_t(i)].substr(5));
    if (keep_every > 0 && step % keep_every == 0) continue;  // a milestone
    files::remove_tree(dir);
  }
}

// ---- asynchronous saves ----------------------------------------------------------------------------

AsyncSaver::AsyncSaver() = default;

AsyncSaver::~AsyncSaver() {
  if (thread_.joinable()) thread_.join();  // an abandoned save stays a temporary folder
}

void AsyncSaver::start(const std::string& out_dir, const model::TransformerImpl& model, const optim::OptimizerState& optimizer,
                       const std::string& config_yaml, const Progress& progress, const dist::Layout* layout) {
  if (job_) throw CheckpointError("internal: a checkpoint save is already in flight (finish() it first)");
  job_ = std::make_unique<SaveJob>(plan(out_dir, model, &optimizer, config_yaml, progress, layout, /*snapshot=*/true));
  bytes_in_flight_ = job_->bytes;
  done_ = false;
  error_ = nullptr;
  thread_ = std::thread([this] {
    try {
      write(*job_);
    } catch (...) {
      error_ = std::current_exception();
    }
    done_ = true;
  });
}

std::optional<std::string> AsyncSaver::poll(bool wait) {
  if (!job_) return std::nullopt;
  if (wait && thread_.joinable()) thread_.join();
  // Every rank agrees: commit when all have written, fail everywhere when any failed.
  const bool failed_here = done_ && error_;
  const double status = (done_ ? 0.0 : 1.0) + (failed_here ? 1e6 : 0.0);
  const double total = job_->world ? dist::all_sum(*job_->world, status) : status;
  if (total >= 1e6) {
    if (thread_.joinable()) thread_.join();
    auto error = error_;
    job_.reset();
    bytes_in_flight_ = 0;
    if (error) std::rethrow_exception(error);
    throw CheckpointError("another rank failed to write its part of the checkpoint");
  }
  if (total > 0) return std::nullopt;  // still writing somewhere
  if (thread_.joinable()) thread_.join();
  auto dir = commit(*job_);
  job_.reset();
  bytes_in_flight_ = 0;
  return dir;
}

}  // namespace moetrain::ckpt
