// Checkpoint loading for inference and autoregressive sampling: by default on the model's KV cache
// (model::KVCache), or recomputing the whole context for every token (the reference).
#include "train/generate.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>

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

namespace {

void check_options(const GenerateOptions& options) {
  if (!std::isfinite(options.temperature) || options.temperature < 0)
    throw UsageError("temperature " + std::to_string(options.temperature) + " must be a finite number >= 0 (0 = greedy)");
  if (!(options.top_p > 0 && options.top_p <= 1))  // NaN fails too
    throw UsageError("top-p " + std::to_string(options.top_p) + " must be in (0, 1] (1 = every token)");
  if (options.top_k < 0) throw UsageError("top-k " + std::to_string(options.top_k) + " must be >= 0 (0 = every token)");
  if (options.max_new_tokens < 0) throw UsageError("max-new-tokens must be >= 0");
}

void check_prompt(const std::vector<int64_t>& prompt, int64_t vocab_size, const std::string& which) {
  if (prompt.empty()) throw UsageError(which + " is empty: give at least one token");
  for (auto id : prompt)
    if (id < 0 || id >= vocab_size)
      throw UsageError(which + " token " + std::to_string(id) + " is outside the vocabulary [0, " +
                       std::to_string(vocab_size) + ")");
}

bool is_stop(const GenerateOptions& options, int64_t id) {
  return std::find(options.stop_ids.begin(), options.stop_ids.end(), id) != options.stop_ids.end();
}

// Appends up to n tokens to `tokens`, each from a forward over the last max_seq_len tokens (the
// recompute path); steps are numbered from first_step for on_logits.
void recompute(const model::TransformerImpl& model, std::vector<int64_t>& tokens, int n, const GenerateOptions& options,
               at::Generator& gen, int first_step) {
  const auto& cfg = model.config();
  const auto device = model.embed.device();
  for (int i = 0; i < n; ++i) {
    const size_t context = std::min<size_t>(tokens.size(), size_t(cfg.max_seq_len));
    std::vector<int64_t> window(tokens.end() - int64_t(context), tokens.end());
    auto input = torch::tensor(window, torch::kLong).view({1, int64_t(context)}).to(device);
    auto logits_V = model.forward(input).logits_BSV[0][int64_t(context) - 1];
    if (options.on_logits) options.on_logits(first_step + i, logits_V.unsqueeze(0));
    const int64_t next = sample_token(logits_V, options, gen);
    tokens.push_back(next);
    if (is_stop(options, next)) return;
  }
}

}  // namespace

int64_t sample_token(const torch::Tensor& logits, const GenerateOptions& options, at::Generator& gen) {
  auto logits_V = logits.to(torch::kCPU).to(torch::kDouble);
  if (options.temperature <= 0) return logits_V.argmax().item<int64_t>();
  const double minus_inf = -std::numeric_limits<double>::infinity();
  auto scaled = logits_V / options.temperature;
  if (options.top_k > 0 && options.top_k < scaled.size(0)) {
    auto kth = std::get<0>(torch::topk(scaled, options.top_k)).min();
    scaled = scaled.masked_fill(scaled < kth, minus_inf);
  }
  if (options.top_p < 1) {
    // Keep a token while the tokens more likely than it hold less than top_p (the most likely always).
    auto [sorted, order] = torch::sort(torch::softmax(scaled, 0), /*stable=*/true, /*dim=*/0, /*descending=*/true);
    auto drop_sorted = (sorted.cumsum(0) - sorted) >= options.top_p;
    auto drop = torch::zeros_like(drop_sorted).scatter(0, order, drop_sorted);
    scaled = scaled.masked_fill(drop, minus_inf);
  }
  return torch::multinomial(torch::softmax(scaled, 0), 1, /*replacement=*/false, gen).item<int64_t>();
}

std::vector<int64_t> generate(const model::TransformerImpl& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& options) {
  check_prompt(prompt, model.config().vocab_size, "the prompt");
  return generate_batch(model, {prompt}, options)[0];
}

std::vector<std::vector<int64_t>> generate_batch(const model::TransformerImpl& model,
                                                 const std::vector<std::vector<int64_t>>& prompts,
                                                 const GenerateOptions& options) {
  torch::NoGradGuard no_grad;
  check_options(options);
  const auto& cfg = model.config();
  if (prompts.empty()) throw UsageError("no prompts to continue");
  int64_t longest = 0;
  for (size_t b = 0; b < prompts.size(); ++b) {
    check_prompt(prompts[b], cfg.vocab_size, "prompt " + std::to_string(b + 1));
    longest = std::max<int64_t>(longest, int64_t(prompts[b].size()));
  }
  auto gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  std::vector<std::vector<int64_t>> tokens = prompts;
  // Steps whose whole context fits in max_seq_len positions run on the cache; any later ones recompute
  // a sliding window, as the recompute path does.
  const int cached_steps =
      options.use_cache ? int(std::clamp<int64_t>(cfg.max_seq_len - longest + 1, 0, options.max_new_tokens)) : 0;
  std::vector<bool> done(prompts.size(), false);
  if (cached_steps > 0) {
    const int64_t B = int64_t(prompts.size());
    std::vector<int64_t> starts(B), padded(B * longest, 0);
    for (int64_t b = 0; b < B; ++b) {
      starts[b] = longest - int64_t(prompts[b].size());
      std::copy(prompts[b].begin(), prompts[b].end(), padded.begin() + b * longest + starts[b]);
    }
    auto cache = model.new_cache(B, longest + cached_steps - 1, starts);
    auto logits_BV = model.decode(torch::tensor(padded, torch::kLong).view({B, longest}), cache);
    for (int step = 0; step < cached_steps; ++step) {
      if (step > 0) {
        std::vector<int64_t> last(B);
        for (int64_t b = 0; b < B; ++b) last[b] = tokens[b].back();
        logits_BV = model.decode(torch::tensor(last, torch::kLong).view({B, 1}), cache);
      }
      if (options.on_logits) options.on_logits(step, logits_BV);
      const auto host_BV = logits_BV.to(torch::kCPU);
      bool all_done = true;
      for (int64_t b = 0; b < B; ++b) {
        if (done[b]) continue;
        const int64_t next = sample_token(host_BV[b], options, gen);
        tokens[b].push_back(next);
        done[b] = is_stop(options, next);
        all_done = all_done && done[b];
      }
      if (all_done && !options.lockstep) break;
    }
  }
  for (size_t b = 0; b < prompts.size(); ++b)
    if (!done[b]) recompute(model, tokens[b], options.max_new_tokens - cached_steps, options, gen, cached_steps);
  return tokens;
}

}  // namespace moetrain::train
