// Sampling from a trained model: load a checkpoint for inference, then autoregressive decoding with
// temperature and top-k (temperature 0 is greedy and deterministic).
#pragma once
#include <cstdint>
#include <functional>
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
  double top_p = 1.0;        // nucleus: the fewest most likely tokens whose probability reaches top_p; 1 = all
  uint64_t seed = 0;
  // Decode with a KV cache (the prompt once, then one position per token); false recomputes the whole
  // context for every token (the reference the cache is tested against).
  bool use_cache = true;
  std::vector<int64_t> stop_ids;  // a row ends after sampling one of these (EOS, --stop); kept in its output
  // Decode all max_new_tokens steps even after every row has stopped (expert parallelism: the ranks of
  // a group must run the same forward passes); the stopped rows still end at their stop id.
  bool lockstep = false;
  // Called with each step's logits (B, V) fp32, before sampling (tests compare the two paths by it).
  std::function<void(int step, const torch::Tensor& logits_BV)> on_logits;
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

// Returns the prompt followed by up to max_new_tokens sampled tokens (fewer after a stop id). With the
// cache, the context is held for up to model.max_seq_len positions; past them each further token
// recomputes the last max_seq_len tokens, as the recompute path does throughout.
std::vector<int64_t> generate(const model::TransformerImpl& model, const std::vector<int64_t>& prompt,
                              const GenerateOptions& options);

// The same for several prompts of any lengths at once: left-padded into one batch (each row attending
// to its own tokens at its own positions, so greedy rows equal their unbatched runs), one generator
// drawing for the rows in order. Without the cache, each prompt runs alone.
std::vector<std::vector<int64_t>> generate_batch(const model::TransformerImpl& model,
                                                 const std::vector<std::vector<int64_t>>& prompts,
                                                 const GenerateOptions& options);

// The next token from fp32/fp64 logits (V): argmax at temperature 0, else a draw from the softmax of
// logits / temperature restricted to the top_k most likely and to the top_p nucleus.
int64_t sample_token(const torch::Tensor& logits_V, const GenerateOptions& options, at::Generator& gen);

}  // namespace moetrain::train
