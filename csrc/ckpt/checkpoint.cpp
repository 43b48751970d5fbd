// Atomic checkpoint save, verification and load.
#include "ckpt/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <cstdio>
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

std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream s;
  s << shape;
  return s.str();
}

// Reads `name` from `file` and checks it against the tensor it will be copied into; with a shard, an
// expert tensor is checked whole and this rank's experts returned.
torch::Tensor read_matching(const SafetensorsFile& file, const std::string& name, const torch::Tensor& target,
                            const ExpertShard* shard = nullptr) {
  const bool sharded = shard && is_expert_tensor(name);
  auto expected = target.sizes().vec();
  if (sharded) expected[0] = shard->total;
  if (!file.contains(name))
    throw CheckpointError(file.path() + ": tensor '" + name + "' is missing (the model expects shape " +
                          shape_text(expected) + ")");
  const auto& info = file.info(name);
  if (info.shape != expected)
    throw CheckpointError(file.path() + ": tensor '" + name + "' has shape " + shape_text(info.shape) +
                          " in the checkpoint but " + shape_text(expected) + " in the model");
  if (info.dtype != target.scalar_type())
    throw CheckpointError(file.path() + ": tensor '" + name + "' has dtype " + std::string(c10::toString(info.dtype)) +
                          " in the checkpoint but " + std::string(c10::toString(target.scalar_type())) + " in the model");
  auto value = file.load(name);
  return sharded ? value.narrow(0, shard->offset, shard->local) : value;
}

}  // namespace

bool is_expert_tensor(const std::string& name) { return name.find(".moe.experts.") != std::string::npos; }

std::string step_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

namespace {

// optimizer == nullptr writes weights only (moetrain convert).
std::string save(const std::string& out_dir, const model::TransformerImpl& model, const optim::AdamW* optimizer,
                 const std::string& config_yaml, const Progress& progress, const ExpertShard* shard, bool write) {
  auto whole = [&](const std::string& name, const torch::Tensor& t) {
    return shard && is_expert_tensor(name) ? shard->gather(t.detach()) : t.detach();
  };
  TensorMap weights;  // parameters, then buffers (the routers' balancing biases)
  for (const auto& p : model.named_parameters()) weights.emplace_back(p.key(), whole(p.key(), p.value()));
  for (const auto& b : model.named_buffers()) weights.emplace_back(b.key(), b.value().detach());
  TensorMap optim_state;
  if (optimizer)
    for (const auto& s : optimizer->states()) {
      optim_state.emplace_back(s.name + ".exp_avg", whole(s.name, s.exp_avg));
      optim_state.emplace_back(s.name + ".exp_avg_sq", whole(s.name, s.exp_avg_sq));
    }
  if (!write) return "";

  const std::string ckpt_root = files::join(out_dir, "ckpt");
  const std::string name = step_dir_name(progress.step);
  const std::string final_dir = files::join(ckpt_root, name);
  const std::string tmp_dir = files::join(ckpt_root, ".tmp-" + name);
  files::make_directories(ckpt_root);
  files::remove_tree(tmp_dir);  // left by a crash during an earlier save of this step
  files::make_directories(tmp_dir);

  save_safetensors(files::join(tmp_dir, kModelFile), weights, {{"format", "moetrain"}});
  if (optimizer) {
    {
      at::Generator generator = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(generator.mutex());
      optim_state.emplace_back("rng.cpu", generator.get_state());
    }
    save_safetensors(files::join(tmp_dir, kOptimFile), optim_state,
                     {{"format", "moetrain"}, {"step_count", std::to_string(optimizer->step_count())}});
  }

  json manifest;
  manifest["format"] = "moetrain-checkpoint";
  manifest["format_version"] = 1;
  manifest["step"] = progress.step;
  manifest["tokens"] = progress.tokens;
  manifest["elapsed_s"] = progress.elapsed_s;
  manifest["config"] = config_yaml;
  manifest["files"] = json::array();
  for (const char* file : {kModelFile, kOptimFile}) {
    if (!optimizer && file == std::string(kOptimFile)) continue;
    const std::string path = files::join(tmp_dir, file);
    manifest["files"].push_back({{"name", file}, {"size", *files::file_size(path)}, {"sha256", sha256_file(path)}});
  }
  files::write_file_synced(files::join(tmp_dir, kManifestFile), manifest.dump(2) + "\n");
  files::fsync_path(tmp_dir, true);

  // Commit: the folder moves into place, then `latest` moves to it. Either rename is atomic.
  if (files::exists(final_dir)) files::remove_tree(final_dir);
  files::rename_path(tmp_dir, final_dir);
  files::fsync_path(ckpt_root, true);
  files::write_file_atomic(files::join(ckpt_root, "latest"), name + "\n");
  return final_dir;
}

}  // namespace

std::string save_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                            const optim::AdamW& optimizer, const std::string& config_yaml, const Progress& progress,
                            const ExpertShard* shard, bool write) {
  return save(out_dir, model, &optimizer, config_yaml, progress, shard, write);
}

std::string save_weights_checkpoint(const std::string& out_dir, const model::TransformerImpl& model,
                                    const std::string& config_yaml, const Progress& progress) {
  return save(out_dir, model, nullptr, config_yaml, progress, nullptr, true);
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

Manifest open_checkpoint(const std::string& step_dir, const std::string& verify) {
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
    if (m.format_version != 1)
      throw CheckpointError(manifest_path + ": format_version " + std::to_string(m.format_version) +
                            " is not supported (this build reads 1)");
    m.progress.step = j.at("step").get<int64_t>();
    m.progress.tokens = j.at("tokens").get<int64_t>();
    m.progress.elapsed_s = j.at("elapsed_s").get<double>();
    m.config_yaml = j.at("config").get<std::string>();
    for (const auto& f : j.at("files"))
      m.files.push_back({f.at("name").get<std::string>(), f.at("size").get<uint64_t>(), f.at("sha256").get<std::string>()});
  } catch (const json::exception& e) {
    throw CheckpointError(manifest_path + ": malformed manifest (" + e.what() + ")");
  }
  for (const auto& f : m.files) {
    const std::string path = files::join(step_dir, f.name);
    const auto size = files::file_size(path);
    if (!size) throw CheckpointError("checkpoint file '" + path + "' is missing");
    if (*size != f.size)
      throw CheckpointError("checkpoint file '" + path + "' has " + std::to_string(*size) +
                            " bytes, the manifest says " + std::to_string(f.size) + " (truncated or replaced)");
    if (verify == "full" && sha256_file(path) != f.sha256)
      throw CheckpointError("checkpoint file '" + path + "' fails its sha256 check (altered or corrupted)");
  }
  return m;
}

void load_model(const std::string& step_dir, model::TransformerImpl& model, const ExpertShard* shard) {
  torch::NoGradGuard no_grad;
  SafetensorsFile file(files::join(step_dir, kModelFile));
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  for (const auto& info : file.tensors())
    if (!params.contains(info.name) && !buffers.contains(info.name))
      throw CheckpointError(file.path() + ": tensor '" + info.name + "' has no parameter or buffer in this model");
  for (auto& p : params) p.value().copy_(read_matching(file, p.key(), p.value(), shard));
  for (auto& b : buffers) b.value().copy_(read_matching(file, b.key(), b.value()));
}

void load_optimizer(const std::string& step_dir, optim::AdamW& optimizer, const ExpertShard* shard) {
  torch::NoGradGuard no_grad;
  if (!files::exists(files::join(step_dir, kOptimFile))) return;  // weights only (moetrain convert)
  SafetensorsFile file(files::join(step_dir, kOptimFile));
  for (auto& s : optimizer.states()) {
    const ExpertShard* sh = shard && is_expert_tensor(s.name) ? shard : nullptr;
    s.exp_avg.copy_(read_matching(file, s.name + ".exp_avg", s.exp_avg, sh));
    s.exp_avg_sq.copy_(read_matching(file, s.name + ".exp_avg_sq", s.exp_avg_sq, sh));
  }
  const auto& meta = file.metadata();
  auto it = meta.find("step_count");
  if (it == meta.end()) throw CheckpointError(file.path() + ": metadata 'step_count' is missing");
  optimizer.set_step_count(std::stoll(it->second));
  if (file.contains("rng.cpu")) {
    at::Generator generator = at::detail::getDefaultCPUGenerator();  // a handle to the global generator
    std::lock_guard<std::mutex> lock(generator.mutex());
    generator.set_state(file.load("rng.cpu"));
  }
}

void apply_retention(const std::string& out_dir, int keep_last) {
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
    files::remove_tree(dir);
  }
}

}  // namespace moetrain::ckpt
