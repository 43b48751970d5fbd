// Sharded, atomic checkpoint save; verification; load at any expert-parallel layout.
#include "ckpt/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <sys/statvfs.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "ckpt/safetensors.h"
#include "ckpt/sha256.h"
#include "common/errors.h"
#include "common/files.h"

using json = nlohmann::json;

namespace moetrain::ckpt {

namespace {

constexpr const char* kModelFile = "model.safetensors";
constexpr const char* kOptimFile = "optim.safetensors";
constexpr const char* kManifestFile = "manifest.json";
constexpr const char* kExpertsPrefix = "experts-";
constexpr const char* kOptimExpertsPrefix = "optim-experts-";
constexpr int kFormatVersion = 2;

std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream s;
  s << shape;
  return s.str();
}

std::string numbered(const std::string& prefix, int64_t i, int64_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%05lld-of-%05lld.safetensors", static_cast<long long>(i), static_cast<long long>(n));
  return prefix + buf;
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

uint64_t free_bytes(const std::string& dir) {
  struct statvfs st {};
  if (statvfs(dir.c_str(), &st) != 0) return UINT64_MAX;  // unknown: let the write itself report
  return uint64_t(st.f_bavail) * uint64_t(st.f_frsize);
}

// Fault injection for the crash tests: MOETRAIN_TEST_CRASH_AT=<point>[@<step>] kills the process
// (SIGKILL, as a power cut would) at that point of a save: "shards_written" (every file of the
// temporary folder on disk, no manifest yet) or "renamed" (the folder in place, `latest` not moved).
void crash_point(const char* point, int64_t step) {
  const char* v = std::getenv("MOETRAIN_TEST_CRASH_AT");
  if (!v) return;
  const std::string spec(v);
  const auto at = spec.find('@');
  if (spec.substr(0, at) != point) return;
  if (at != std::string::npos && std::stoll(spec.substr(at + 1)) != step) return;
  std::raise(SIGKILL);
}

struct PendingFile {
  std::string name;
  TensorMap tensors;
  std::map<std::string, std::string> metadata;
};

int64_t total_experts(const model::TransformerImpl& model) { return model.config().moe.n_experts; }

std::string save(const std::string& out_dir, const model::TransformerImpl& model, const optim::AdamW* optimizer,
                 const std::string& config_yaml, const Progress& progress, const dist::Layout* layout) {
  dist::Communicator* world = layout ? layout->world.get() : nullptr;
  const int rank = world ? world->rank() : 0, W = world ? world->world_size() : 1;
  const int ep = layout ? layout->ep_size() : 1, ep_rank = layout ? layout->ep_rank() : 0;
  const bool first_replica = !layout || layout->edp->rank() == 0;  // writes this ep rank's experts
  const int64_t offset = model.expert_offset();
  auto barrier = [&] {
    if (world) world->barrier();
  };

  // ---- what this rank writes ---------------------------------------------------------------------
  PendingFile main{kModelFile, {}, {{"format", "moetrain"}}}, experts{numbered(kExpertsPrefix, ep_rank, ep), {}, {{"format", "moetrain"}}};
  PendingFile optim{kOptimFile, {}, {{"format", "moetrain"}}}, optim_experts{numbered(kOptimExpertsPrefix, ep_rank, ep), {}, {{"format", "moetrain"}}};
  auto add = [&](PendingFile& whole, PendingFile& per_expert, const std::string& name, const std::string& suffix,
                 const torch::Tensor& t) {
    if (is_expert_tensor(name)) {
      if (first_replica)
        for (int64_t e = 0; e < t.size(0); ++e) per_expert.tensors.emplace_back(expert_key(name, offset + e, suffix), t[e]);
    } else if (rank == 0) {
      whole.tensors.emplace_back(name + suffix, t);
    }
  };
  for (const auto& p : model.named_parameters()) add(main, experts, p.key(), "", p.value().detach());
  if (rank == 0)
    for (const auto& b : model.named_buffers()) main.tensors.emplace_back(b.key(), b.value().detach());
  std::vector<PendingFile*> mine;
  if (rank == 0) mine.push_back(&main);
  if (!experts.tensors.empty()) mine.push_back(&experts);
  PendingFile rng{rng_file(rank), {}, {{"format", "moetrain"}}};
  if (optimizer) {
    for (const auto& s : optimizer->states()) {
      add(optim, optim_experts, s.name, ".exp_avg", s.exp_avg);
      add(optim, optim_experts, s.name, ".exp_avg_sq", s.exp_avg_sq);
    }
    optim.metadata["step_count"] = std::to_string(optimizer->step_count());
    if (rank == 0) mine.push_back(&optim);
    if (!optim_experts.tensors.empty()) mine.push_back(&optim_experts);
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(generator.mutex());
    rng.tensors.emplace_back("rng.cpu", generator.get_state());
    mine.push_back(&rng);
  }

  // ---- room on the disk, checked by every rank before anyone writes -------------------------------
  const std::string ckpt_root = files::join(out_dir, "ckpt");
  const std::string name = step_dir_name(progress.step);
  const std::string final_dir = files::join(ckpt_root, name);
  const std::string tmp_dir = files::join(ckpt_root, ".tmp-" + name);
  files::make_directories(ckpt_root);
  uint64_t need = 1 << 20;  // headers and the manifest
  for (const auto* f : mine)
    for (const auto& [n, t] : f->tensors) need += uint64_t(t.nbytes());
  const uint64_t have = free_bytes(ckpt_root);
  const bool short_here = have < need;
  const bool short_anywhere = world ? dist::all_sum(*world, short_here ? 1.0 : 0.0) > 0 : short_here;
  if (short_anywhere)
    throw CheckpointError(short_here ? "not enough free space in '" + ckpt_root + "' for the checkpoint of step " +
                                           std::to_string(progress.step) + ": this rank writes " + std::to_string(need) +
                                           " bytes, " + std::to_string(have) + " are free"
                                     : "another rank lacks the free space to write the checkpoint of step " +
                                           std::to_string(progress.step) + " under '" + ckpt_root + "'");

  // ---- shards into the temporary folder, fsynced --------------------------------------------------
  if (rank == 0) {
    files::remove_tree(tmp_dir);  // left by a crash during an earlier save of this step
    files::make_directories(tmp_dir);
  }
  barrier();
  json entries = json::array();
  for (const auto* f : mine) {
    const std::string path = files::join(tmp_dir, f->name);
    save_safetensors(path, f->tensors, f->metadata);  // written and fsynced
    entries.push_back({{"name", f->name}, {"size", *files::file_size(path)}, {"sha256", sha256_file(path)}});
  }
  const auto all_entries = world ? dist::all_gather_strings(*world, entries.dump()) : std::vector<std::string>{entries.dump()};
  crash_point("shards_written", progress.step);

  // ---- commit: rank 0 writes the manifest, renames the folder, then moves `latest` ----------------
  if (rank == 0) {
    json manifest;
    manifest["format"] = "moetrain-checkpoint";
    manifest["format_version"] = kFormatVersion;
    manifest["step"] = progress.step;
    manifest["tokens"] = progress.tokens;
    manifest["elapsed_s"] = progress.elapsed_s;
    manifest["gpu_hours"] = progress.gpu_hours;
    manifest["cost_usd"] = progress.cost_usd;
    manifest["layout"] = {{"world_size", W}, {"expert_parallel", ep}, {"routed_experts", total_experts(model)}};
    // The sampler is a pure function of (seed, step, micro-batch, rank): the step is the data cursor.
    manifest["data_cursor"] = {{"step", progress.step}, {"tokens", progress.tokens}};
    manifest["config"] = config_yaml;
    manifest["files"] = json::array();
    for (const auto& text : all_entries)
      for (const auto& e : json::parse(text)) manifest["files"].push_back(e);
    files::write_file_synced(files::join(tmp_dir, kManifestFile), manifest.dump(2) + "\n");
    files::fsync_path(tmp_dir, true);
    if (files::exists(final_dir)) files::remove_tree(final_dir);
    files::rename_path(tmp_dir, final_dir);
    files::fsync_path(ckpt_root, true);
    crash_point("renamed", progress.step);
    files::write_file_atomic(files::join(ckpt_root, "latest"), name + "\n");
  }
  barrier();  // every rank returns once the checkpoint is committed
  return final_dir;
}

}  // namespace

bool is_expert_tensor(const std::string& name) { return name.find(".moe.experts.") != std::string::npos; }

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

std::string save_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                            const optim::AdamW& optimizer, const std::string& config_yaml, const Progress& progress,
                            const dist::Layout* layout) {
  return save(out_dir, model, &optimizer, config_yaml, progress, layout);
}

std::string save_weights_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                                    const std::string& config_yaml, const Progress& progress) {
  return save(out_dir, model, nullptr, config_yaml, progress, nullptr);
}

std::optional<std::string> find_checkpoint(const std::string& path) {
  if (files::exists(files::join(path, kManifestFile))) return path;
  for (const std::string& root : {path, files::join(path, "ckpt")}) {
    const std::string latest = files::join(root, "latest");
    if (!files::exists(latest)) continue;
    std::string name = files::read_file(latest);
    while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
    if (name.empty() || name.find('/') != std::string::npos)
      throw CheckpointError("'" + latest + "' does not name a checkpoint folder");
    const std::string dir = files::join(root, name);
    if (!files::exists(files::join(dir, kManifestFile)))
      throw CheckpointError("'" + latest + "' names '" + name + "', which has no " + kManifestFile);
    return dir;
  }
  if (!files::exists(path)) throw CheckpointError("no such checkpoint or run folder: '" + path + "'");
  return std::nullopt;
}

Manifest read_manifest(const std::string& step_dir) {
  const std::string manifest_path = files::join(step_dir, kManifestFile);
  if (!files::exists(manifest_path)) throw CheckpointError("'" + manifest_path + "' is missing: not a checkpoint folder");
  json j;
  try {
    j = json::parse(files::read_file(manifest_path));
  } catch (const json::exception& e) {
    throw CheckpointError(manifest_path + ": not valid JSON (" + e.what() + ")");
  }
  Manifest m;
  try {
    if (j.at("format").get<std::string>() != "moetrain-checkpoint")
      throw CheckpointError(manifest_path + ": not a moetrain checkpoint manifest");
    m.format_version = j.at("format_version").get<int>();
    if (m.format_version < 1 || m.format_version > kFormatVersion)
      throw CheckpointError(manifest_path + ": format_version " + std::to_string(m.format_version) +
                            " is not supported (this build reads 1 and 2)");
    m.progress.step = j.at("step").get<int64_t>();
    m.progress.tokens = j.at("tokens").get<int64_t>();
    m.progress.elapsed_s = j.at("elapsed_s").get<double>();
    m.progress.gpu_hours = j.value("gpu_hours", 0.0);
    m.progress.cost_usd = j.value("cost_usd", 0.0);
    if (j.contains("layout")) {
      m.world_size = j["layout"].at("world_size").get<int>();
      m.expert_parallel = j["layout"].at("expert_parallel").get<int>();
    }
    m.config_yaml = j.at("config").get<std::string>();
    for (const auto& f : j.at("files"))
      m.files.push_back({f.at("name").get<std::string>(), f.at("size").get<uint64_t>(), f.at("sha256").get<std::string>()});
  } catch (const json::exception& e) {
    throw CheckpointError(manifest_path + ": malformed manifest (" + e.what() + ")");
  }
  return m;
}

std::vector<std::string> verify_files(const std::string& step_dir, const Manifest& m, const std::string& verify) {
  std::vector<std::string> problems;
  for (const auto& f : m.files) {
    const std::string path = files::join(step_dir, f.name);
    const auto size = files::file_size(path);
    if (!size) {
      problems.push_back("checkpoint file '" + path + "' is missing");
    } else if (*size != f.size) {
      problems.push_back("checkpoint file '" + path + "' has " + std::to_string(*size) + " bytes, the manifest says " +
                         std::to_string(f.size) + " (truncated or replaced)");
    } else if (verify == "full" && sha256_file(path) != f.sha256) {
      problems.push_back("checkpoint file '" + path + "' fails its sha256 check (altered or corrupted)");
    }
  }
  return problems;
}

Manifest open_checkpoint(const std::string& step_dir, const std::string& verify) {
  Manifest m = read_manifest(step_dir);
  const auto problems = verify_files(step_dir, m, verify);
  if (!problems.empty()) throw CheckpointError(problems.front());
  return m;
}

void load_model(const std::string& step_dir, model::TransformerImpl& model) {
  torch::NoGradGuard no_grad;
  const Manifest manifest = read_manifest(step_dir);
  SafetensorsFile file(files::join(step_dir, kModelFile));
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  for (const auto& info : file.tensors())
    if (!params.contains(info.name) && !buffers.contains(info.name))
      throw CheckpointError(file.path() + ": tensor '" + info.name + "' has no parameter or buffer in this model");
  const int64_t offset = model.expert_offset(), E = total_experts(model);
  std::optional<ExpertFiles> experts;
  if (manifest.format_version >= 2) experts.emplace(step_dir, manifest, kExpertsPrefix);
  for (auto& p : params) {
    if (!is_expert_tensor(p.key()))
      p.value().copy_(read_matching(file, p.key(), p.value()));
    else if (experts)
      experts->load_into(p.key(), "", p.value(), offset, E);
    else  // format 1: stacked over every expert in model.safetensors
      p.value().copy_(read_matching(file, p.key(), p.value(), std::make_pair(offset, E)));
  }
  for (auto& b : buffers) b.value().copy_(read_matching(file, b.key(), b.value()));
}

void load_optimizer(const std::string& step_dir, optim::AdamW& optimizer, const model::TransformerImpl& model, int rank) {
  torch::NoGradGuard no_grad;
  if (!files::exists(files::join(step_dir, kOptimFile))) return;  // weights only (moetrain convert)
  const Manifest manifest = read_manifest(step_dir);
  SafetensorsFile file(files::join(step_dir, kOptimFile));
  const int64_t offset = model.expert_offset(), E = total_experts(model);
  std::optional<ExpertFiles> experts;
  if (manifest.format_version >= 2) experts.emplace(step_dir, manifest, kOptimExpertsPrefix);
  for (auto& s : optimizer.states()) {
    for (auto [suffix, moment] : {std::pair<const char*, torch::Tensor*>{".exp_avg", &s.exp_avg}, {".exp_avg_sq", &s.exp_avg_sq}}) {
      if (!is_expert_tensor(s.name))
        moment->copy_(read_matching(file, s.name + suffix, *moment));
      else if (experts)
        experts->load_into(s.name, suffix, *moment, offset, E);
      else
        moment->copy_(read_matching(file, s.name + suffix, *moment, std::make_pair(offset, E)));
    }
  }
  const auto& meta = file.metadata();
  auto it = meta.find("step_count");
  if (it == meta.end()) throw CheckpointError(file.path() + ": metadata 'step_count' is missing");
  optimizer.set_step_count(std::stoll(it->second));

  // This rank's generator: its own file, or (a larger world than the one that saved) rank r % world's.
  torch::Tensor state;
  if (manifest.format_version >= 2) {
    const std::string path = files::join(step_dir, rng_file(rank % std::max(1, manifest.world_size)));
    if (files::exists(path)) state = SafetensorsFile(path).load("rng.cpu");
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

}  // namespace moetrain::ckpt
