// Sampling from a trained model: load a checkpoint for inference, then autoregressive decoding with
// temperature and top-k (temperature 0 is greedy and deterministic).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "ckpt/checkpoint.h"
#include "config/config.h"
#include "model/transformer.h"

namespace moetrain::train {

struct GenerateOptions {
  int max_new_tokens = 200;
  double temperature = 0.8;  // 0 = greedy
  int top_k = 0;             // 0 = all tokens
  uint64_t seed = 0;
};

struct LoadedModel {
  config::Config cfg;        // the config the checkpoint was trained with
  std::string step_dir;
  ckpt::Manifest manifest;
  model::Transformer model{nullptr};
};

// `path`: a run folder, its ckpt/ folder or a step folder (verifies the files before loading), or
// hf:DIR, a Hugging Face folder (step_dir is then DIR and the manifest empty).
LoadedModel load_for_inference(const std::string& path, const std::string& verify = "full");

// Throws CheckpointError naming the first parameter or buffer holding NaN or inf, and `source` (the
// checkpoint), before a sampler meets them as an unexplained "probability tensor contains inf, nan".
void require_finite_weights(const model::TransformerImpl& model, const std::string& source);

// Returns the prompt followed by up to max_new_tokens sampled tokens.
std::vector<int64_t> generate(const model::TransformerImpl& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& options);

}  // namespace moetrain::train
