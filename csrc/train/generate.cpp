// Checkpoint loading for inference and autoregressive sampling (full recompute per token: the
// models this targets are small; a KV cache arrives with the GPU work).
#include "train/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "common/errors.h"
#include "common/tensor.h"
#include "cost/memory.h"
#include "hf/hf.h"
#include "train/trainer.h"

namespace moetrain::train {

LoadedModel load_for_inference(const std::string& path, const std::string& verify) {
  if (hf::is_hf_path(path)) {  // a Hugging Face folder: its config.json, its weights, fp32 on the CPU
    LoadedModel loaded;
    loaded.step_dir = hf::hf_dir(path);
    auto hf_model = hf::load(loaded.step_dir);
    hf::apply_architecture(hf_model.hf.model, loaded.cfg.model);
    loaded.cfg.model.mtp_depth = hf_model.hf.model.mtp_depth;  // the modules the folder held, so convert keeps them
    loaded.cfg.data.seq_len = std::min(loaded.cfg.data.seq_len, loaded.cfg.model.max_seq_len);
    config::validate(loaded.cfg);
    configure_threads(loaded.cfg.run);
    loaded.model = hf_model.model;
    return loaded;
  }
  auto step_dir = ckpt::find_checkpoint(path);
  if (!step_dir) throw CheckpointError("'" + path + "' holds no checkpoint yet");
  LoadedModel loaded;
  loaded.step_dir = *step_dir;
  loaded.manifest = ckpt::open_checkpoint(*step_dir, verify);
  loaded.cfg = config::parse_config(loaded.manifest.config_yaml, *step_dir + "/manifest.json");
  cost::require_memory(loaded.cfg, /*expert_parallel=*/1, /*training=*/false);  // before allocating the weights
  configure_threads(loaded.cfg.run);
  configure_determinism(loaded.cfg.run);
  set_cached_casts(loaded.cfg.run.keep_compute_copies);
  loaded.model = model::Transformer(loaded.cfg.model);
  if (loaded.manifest.lora_base) {  // LoRA adapters: on their base, built as the run built it
    loaded.model->init_weights(loaded.cfg.run.seed);
    if (!loaded.cfg.model.init_from.empty()) hf::load_init_from(*loaded.model, loaded.cfg.model.init_from);
    loaded.model->add_lora(loaded.cfg.train.lora, loaded.cfg.run.seed);
  }
  ckpt::load_model(*step_dir, *loaded.model);
  loaded.model->set_loss_chunk(loaded.cfg.train.loss_chunk_tokens);
  loaded.model->place(resolve_device(loaded.cfg.run), resolve_compute_dtype(loaded.cfg.run));
  return loaded;
}

void require_finite_weights(const model::TransformerImpl& model, const std::string& source) {
  torch::NoGradGuard no_grad;
  auto check = [&](const std::string& name, const torch::Tensor& t) {
    if (!t.is_floating_point()) return;
    const int64_t bad = torch::isfinite(t).logical_not().sum().item<int64_t>();
    if (bad == 0) return;
    const int64_t nan = torch::isnan(t).sum().item<int64_t>();
    throw CheckpointError(source + " holds non-finite weights: tensor '" + name + "' has " + std::to_string(nan) +
                          " NaN and " + std::to_string(bad - nan) + " inf of " + std::to_string(t.numel()) +
                          " values; nothing can be sampled from it (use an earlier checkpoint)");
  };
  for (const auto& p : model.named_parameters()) check(p.key(), p.value());
  for (const auto& b : model.named_buffers()) check(b.key(), b.value());
}

std::vector<int64_t> generate(const model::TransformerImpl& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& options) {
  torch::NoGradGuard no_grad;
  const auto& cfg = model.config();
  if (prompt.empty()) throw UsageError("the prompt is empty: give at least one token");
  if (!std::isfinite(options.temperature) || options.temperature < 0)
    throw UsageError("temperature " + std::to_string(options.temperature) + " must be a finite number >= 0 (0 = greedy)");
  for (auto id : prompt)
    if (id < 0 || id >= cfg.vocab_size)
      throw UsageError("prompt token " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(cfg.vocab_size) + ")");
  const auto device = model.embed.device();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  std::vector<int64_t> tokens = prompt;
  for (int i = 0; i < options.max_new_tokens; ++i) {
    const size_t context = std::min<size_t>(tokens.size(), size_t(cfg.max_seq_len));
    std::vector<int64_t> window(tokens.end() - int64_t(context), tokens.end());
    auto input = torch::tensor(window, torch::kLong).view({1, int64_t(context)}).to(device);
    auto logits_V = model.forward(input).logits_BSV[0][int64_t(context) - 1].to(torch::kCPU).to(torch::kDouble);
    int64_t next;
    if (options.temperature <= 0) {
      next = logits_V.argmax().item<int64_t>();
    } else {
      auto scaled = logits_V / options.temperature;
      if (options.top_k > 0 && options.top_k < scaled.size(0)) {
        auto kth = std::get<0>(torch::topk(scaled, options.top_k)).min();
        scaled = scaled.masked_fill(scaled < kth, -std::numeric_limits<double>::infinity());
      }
      next = torch::multinomial(torch::softmax(scaled, 0), 1, /*replacement=*/false, gen).item<int64_t>();
    }
    tokens.push_back(next);
  }
  return tokens;
}

}  // namespace moetrain::train
