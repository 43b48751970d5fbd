// `moetrain eval`: mean next-token loss and perplexity of a checkpoint (ours or hf:DIR) over a whole
// token shard, in windows of --seq-len tokens, so that a checkpoint can be compared before and after
// fine-tuning. With a loss mask beside the shard (val.mask.bin, see data/shard.h) only learned tokens
// count: the response loss of prompt/response data.
#include <cmath>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "common/errors.h"
#include "common/files.h"
#include "common/log.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "train/generate.h"

namespace moetrain::cli {

int run_eval(const std::vector<std::string>& argv) {
  const Command command{
      "eval",
      "Mean next-token loss (nats per token) and perplexity of a checkpoint over a token shard.",
      {{"checkpoint", "DIR", "run folder, ckpt/ folder, step folder, or hf:DIR (a Hugging Face folder)"},
       {"data", "SHARDS", "a folder holding val.bin (moetrain prepare-data), or a .bin shard; a loss mask beside it (val.mask.bin) restricts the loss to learned tokens"},
       {"seq-len", "N", "tokens per window (default: the checkpoint's data.seq_len)"},
       {"batch-size", "B", "windows per forward pass (default 8)"},
       {"json", "", "print one JSON object instead of a line"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  std::string shard_path = args.require("data");
  if (files::is_directory(shard_path)) shard_path = files::join(shard_path, "val.bin");
  const data::Shard shard(shard_path);
  if (shard.has_mask() && shard.learned_tokens() == 0)  // before loading a model: there would be no loss
    throw DataError(shard.mask_path() + " marks no token of " + shard_path + " as learned: no loss to measure");
  auto loaded = train::load_for_inference(args.require("checkpoint"));
  const auto& model_cfg = loaded.cfg.model;
  const int seq_len = args.get_int("seq-len", loaded.cfg.data.seq_len);
  const int batch_size = args.get_int("batch-size", 8);
  if (seq_len < 1 || seq_len > model_cfg.max_seq_len)
    throw UsageError("--seq-len " + std::to_string(seq_len) + " must be in [1, " + std::to_string(model_cfg.max_seq_len) +
                     "] (the model's context)");
  if (batch_size < 1) throw UsageError("--batch-size must be >= 1");
  data::require_vocabulary(shard, model_cfg.vocab_size);  // the checkpoint's model.vocab_size
  if (shard.size() < 2) throw DataError(shard_path + " has fewer than 2 tokens: nothing to predict");

  // Windows [s*L, s*L + L + 1) cover every next-token prediction once; the last may be shorter.
  torch::NoGradGuard no_grad;
  const auto device = loaded.model->embed.device();
  const uint64_t predictions = shard.size() - 1;
  const uint64_t n_windows = (predictions + seq_len - 1) / seq_len;
  double total = 0;
  uint64_t learned = 0;  // predictions that count: all of them without a mask
  for (uint64_t w = 0; w < n_windows;) {
    const uint64_t begin = w * uint64_t(seq_len);
    const int64_t len = int64_t(std::min<uint64_t>(seq_len, predictions - begin));
    // Full windows go in batches; a short last window goes alone.
    const uint64_t n = len == seq_len ? std::min<uint64_t>(batch_size, predictions / seq_len - w) : 1;
    auto window = torch::empty({int64_t(n), len + 1}, torch::kLong);
    for (uint64_t b = 0; b < n; ++b) shard.read(begin + b * seq_len, uint64_t(len) + 1, window[int64_t(b)].data_ptr<int64_t>());
    auto inputs = window.narrow(1, 0, len), targets = window.narrow(1, 1, len).clone();
    if (shard.has_mask()) {
      auto learned_NL = torch::empty({int64_t(n), len}, torch::kUInt8);
      for (uint64_t b = 0; b < n; ++b)
        shard.read_mask(begin + b * seq_len + 1, uint64_t(len), learned_NL[int64_t(b)].data_ptr<uint8_t>());
      targets.masked_fill_(learned_NL.eq(0), data::kIgnoreTarget);
    }
    learned += uint64_t(targets.ne(data::kIgnoreTarget).sum().item<int64_t>());
    total += loaded.model->forward_loss(inputs.to(device), targets.to(device), data::kIgnoreTarget, /*sum=*/true)
                 .loss.item<double>();
    w += n;
  }
  if (learned == 0) throw DataError(shard.mask_path() + " marks no token of " + shard_path + " as learned: no loss");
  const double loss = total / double(learned);
  if (args.has("json")) {
    nlohmann::json j = {{"loss", loss}, {"perplexity", std::exp(loss)}, {"tokens", learned},
                        {"seq_len", seq_len}, {"data", shard_path}};
    j["mask"] = shard.has_mask() ? nlohmann::json(shard.mask_path()) : nlohmann::json(nullptr);
    std::printf("%s\n", j.dump().c_str());
  } else {
    const std::string counted = shard.has_mask() ? " learned (masked by " + shard.mask_path() + ")" : "";
    std::printf("loss %s | perplexity %s | %llu%s predicted tokens in windows of %d | %s\n",
                format_double(loss, 5).c_str(), format_double(std::exp(loss), 5).c_str(),
                static_cast<unsigned long long>(learned), counted.c_str(), seq_len, shard_path.c_str());
  }
  return 0;
}

}  // namespace moetrain::cli
