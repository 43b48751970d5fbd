// `moetrain eval`: mean next-token loss and perplexity of a checkpoint (ours or hf:DIR) over a whole
// token shard (or every shard of a folder's val split, or several such sources), in windows of --seq-len
// tokens (or with --packing documents, each document whole, as data.packing: documents trains them),
// so that a checkpoint can be compared before and after fine-tuning. With a loss mask beside the shard
// (val.mask.bin, see data/shard.h) only learned tokens
// count: the response loss of prompt/response data. With --mtp, each multi-token-prediction depth's
// loss too, per token as the main loss, over the predictions that fall inside each window.
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/args.h"
#include "common/errors.h"
#include "common/files.h"
#include "common/log.h"
#include "data/dataset.h"
#include "data/sampler.h"
#include "data/shard.h"
#include "train/generate.h"

namespace moetrain::cli {

namespace {

struct Measured {
  double loss_sum = 0;
  uint64_t learned = 0;  // predictions that count: all of them without a mask
  // With --mtp, per depth k (1 first): depth k predicts token i+k+1 at the window's positions i < L - k.
  std::vector<double> mtp_loss_sum;
  std::vector<uint64_t> mtp_learned;

  void add(const Measured& other) {
    loss_sum += other.loss_sum;
    learned += other.learned;
    mtp_loss_sum.resize(other.mtp_loss_sum.size());
    mtp_learned.resize(other.mtp_learned.size());
    for (size_t d = 0; d < other.mtp_loss_sum.size(); ++d)
      mtp_loss_sum[d] += other.mtp_loss_sum[d], mtp_learned[d] += other.mtp_learned[d];
  }
};

// Windows [s*L, s*L + L + 1) of each shard cover every next-token prediction in it once (none crosses
// into the next shard); the last window of a shard may be shorter.
Measured measure(const train::LoadedModel& loaded, const data::Dataset& split, int seq_len, int batch_size, bool mtp) {
  torch::NoGradGuard no_grad;
  const auto device = loaded.model->embed.device();
  const int depths = mtp ? loaded.cfg.model.mtp_depth : 0;
  Measured m;
  m.mtp_loss_sum.assign(size_t(depths), 0.0);
  m.mtp_learned.assign(size_t(depths), 0);
  for (size_t i = 0; i < split.n_shards(); ++i) {
    const auto shard_ptr = split.shard(i);
    const data::Shard& shard = *shard_ptr;
    if (shard.size() < 2) continue;
    const uint64_t predictions = shard.size() - 1;
    const uint64_t n_windows = (predictions + seq_len - 1) / seq_len;
    for (uint64_t w = 0; w < n_windows;) {
      const uint64_t begin = w * uint64_t(seq_len);
      const int64_t len = int64_t(std::min<uint64_t>(seq_len, predictions - begin));
      // Full windows go in batches; a short last window goes alone.
      const uint64_t n = len == seq_len ? std::min<uint64_t>(batch_size, predictions / seq_len - w) : 1;
      auto window = torch::empty({int64_t(n), len + 1}, torch::kLong);
      for (uint64_t b = 0; b < n; ++b)
        shard.read(begin + b * seq_len, uint64_t(len) + 1, window[int64_t(b)].data_ptr<int64_t>());
      auto inputs = window.narrow(1, 0, len), targets = window.narrow(1, 1, len).clone();
      if (shard.has_mask()) {
        auto learned_NL = torch::empty({int64_t(n), len}, torch::kUInt8);
        for (uint64_t b = 0; b < n; ++b)
          shard.read_mask(begin + b * seq_len + 1, uint64_t(len), learned_NL[int64_t(b)].data_ptr<uint8_t>());
        targets.masked_fill_(learned_NL.eq(0), data::kIgnoreTarget);
      }
      m.learned += uint64_t(targets.ne(data::kIgnoreTarget).sum().item<int64_t>());
      // The MTP depths need a window longer than the deepest one; a shorter last window counts for the
      // main loss only.
      const bool with_mtp = depths > 0 && len > depths;
      const auto out = loaded.model->forward_loss(inputs.to(device), targets.to(device), data::kIgnoreTarget, /*sum=*/true,
                                                  with_mtp);
      m.loss_sum += out.loss.item<double>();  // the main next-token loss
      for (int d = 0; with_mtp && d < depths; ++d) {
        m.mtp_loss_sum[size_t(d)] += out.mtp_losses[size_t(d)].item<double>();
        m.mtp_learned[size_t(d)] +=
            uint64_t(targets.narrow(1, d + 1, len - d - 1).ne(data::kIgnoreTarget).sum().item<int64_t>());
      }
      w += n;
    }
  }
  return m;
}

// --packing documents: every packed sequence of the split once (each document whole, its own positions),
// as training with data.packing: documents reads them; depth k's predictions stay inside documents.
Measured measure_packed(const train::LoadedModel& loaded, const data::Dataset& split, int seq_len, int batch_size,
                        bool mtp) {
  torch::NoGradGuard no_grad;
  const auto device = loaded.model->embed.device();
  const int depths = mtp ? loaded.cfg.model.mtp_depth : 0;
  const data::Packing& plan = split.packing(seq_len, /*truncate=*/true);
  log_line("[eval] " + split.name() + ": " + plan.describe());
  Measured m;
  m.mtp_loss_sum.assign(size_t(depths), 0.0);
  m.mtp_learned.assign(size_t(depths), 0);
  for (uint64_t first = 0; first < plan.size(); first += uint64_t(batch_size)) {
    const auto batch = data::packed_batch(split, plan, first, std::min<uint64_t>(batch_size, plan.size() - first));
    m.learned += uint64_t(batch.targets.ne(data::kIgnoreTarget).sum().item<int64_t>());
    const bool with_mtp = depths > 0 && seq_len > depths;
    const auto out = loaded.model->forward_loss(batch.inputs.to(device), batch.targets.to(device), data::kIgnoreTarget,
                                                /*sum=*/true, with_mtp, batch.positions);
    m.loss_sum += out.loss.item<double>();
    for (int d = 0; with_mtp && d < depths; ++d) {
      const int64_t k = d + 1, n = seq_len - k;
      const auto same_document = batch.positions.narrow(1, k, n) == batch.positions.narrow(1, 0, n) + k;
      m.mtp_loss_sum[size_t(d)] += out.mtp_losses[size_t(d)].item<double>();
      m.mtp_learned[size_t(d)] +=
          uint64_t((batch.targets.narrow(1, k, n).ne(data::kIgnoreTarget) & same_document).sum().item<int64_t>());
    }
  }
  return m;
}

}  // namespace

int run_eval(const std::vector<std::string>& argv) {
  const Command command{
      "eval",
      "Mean next-token loss (nats per token) and perplexity of a checkpoint over token shards (and with --mtp each "
      "multi-token-prediction depth's loss).",
      {{"checkpoint", "DIR", "run folder, ckpt/ folder, step folder, or hf:DIR (a Hugging Face folder)"},
       {"data", "SHARDS", "a folder holding val.bin or val-*.bin (any format `moetrain inspect-data` reads), or one .bin "
                          "shard; a loss mask beside a shard (val.mask.bin) restricts the loss to learned tokens. "
                          "Repeat it to measure several sources: each is reported, then all of them per token",
        true},
       {"seq-len", "N", "tokens per window (default: the checkpoint's data.seq_len)"},
       {"batch-size", "B", "windows per forward pass (default 8)"},
       {"packing", "MODE", "stream (default): windows of the token stream; documents: each document whole, packed "
                           "into sequences of --seq-len as data.packing: documents trains them (a longer one cut)"},
       {"mtp", "", "also each multi-token-prediction depth's loss (model.mtp_depth > 0): depth k's cross-entropy of "
                   "token i+k+1, per token, over the predictions inside each window"},
       {"json", "", "print one JSON object instead of a line"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  args.require("data");
  // Each source: its shards, opened (and checked) before a model is loaded.
  std::vector<std::unique_ptr<data::Shard>> single_files;
  std::vector<std::pair<std::string, data::Dataset>> sources;
  for (const auto& given : args.all("data")) {
    if (files::is_directory(given)) {
      sources.emplace_back(given, data::Dataset::open(given, "val"));
    } else {
      single_files.push_back(std::make_unique<data::Shard>(given));
      sources.emplace_back(given, data::Dataset::borrow(*single_files.back()));
    }
    const data::Dataset& split = sources.back().second;
    if (split.n_shards() == 1) {
      const auto shard = split.shard(0);
      if (shard->has_mask() && shard->learned_tokens() == 0)  // before loading a model: there would be no loss
        throw DataError(shard->mask_path() + " marks no token of " + shard->path() + " as learned: no loss to measure");
    }
  }
  auto loaded = train::load_for_inference(args.require("checkpoint"));
  const auto& model_cfg = loaded.cfg.model;
  const bool mtp = args.has("mtp");
  if (mtp && loaded.model->mtp_modules.empty())
    throw UsageError("--mtp: the checkpoint's model has no multi-token-prediction modules (model.mtp_depth = " +
                     std::to_string(model_cfg.mtp_depth) + "); train with model.mtp_depth > 0");
  const int seq_len = args.get_int("seq-len", loaded.cfg.data.seq_len);
  const int batch_size = args.get_int("batch-size", 8);
  if (seq_len < 1 || seq_len > model_cfg.max_seq_len)
    throw UsageError("--seq-len " + std::to_string(seq_len) + " must be in [1, " + std::to_string(model_cfg.max_seq_len) +
                     "] (the model's context)");
  if (batch_size < 1) throw UsageError("--batch-size must be >= 1");
  const std::string packing = args.get("packing", "stream");
  if (packing != "stream" && packing != "documents")
    throw UsageError("--packing " + packing + " must be stream or documents");
  for (auto& [given, split] : sources) {
    if (split.n_shards() == 1) data::require_vocabulary(*split.shard(0), model_cfg.vocab_size);  // the checkpoint's
    else split = data::Dataset::open(given, "val", {64, uint64_t(model_cfg.vocab_size)});  // reads check the bound
    if (split.size() < 2) throw DataError(split.name() + " has fewer than 2 tokens: nothing to predict");
  }

  Measured all;
  std::vector<Measured> per_source;
  for (const auto& [given, split] : sources) {
    per_source.push_back(packing == "documents" ? measure_packed(loaded, split, seq_len, batch_size, mtp)
                                                : measure(loaded, split, seq_len, batch_size, mtp));
    if (per_source.back().learned == 0)
      throw DataError("the loss masks of " + split.name() + " mark no token as learned: no loss");
    all.add(per_source.back());
  }
  const double loss = all.loss_sum / double(all.learned);
  // Each depth's loss per token (null where no window held a learned target for it).
  auto mtp_losses = [](const Measured& m) {
    std::vector<std::optional<double>> out;
    for (size_t d = 0; d < m.mtp_loss_sum.size(); ++d)
      out.push_back(m.mtp_learned[d] > 0 ? std::optional(m.mtp_loss_sum[d] / double(m.mtp_learned[d])) : std::nullopt);
    return out;
  };
  auto mtp_json = [&](const Measured& m) {
    auto j = nlohmann::json::array();
    for (const auto& l : mtp_losses(m)) j.push_back(l ? nlohmann::json(*l) : nlohmann::json(nullptr));
    return j;
  };
  auto mtp_text = [&](const Measured& m) {
    std::string text;
    const auto losses = mtp_losses(m);
    for (size_t d = 0; d < losses.size(); ++d)
      text += " | mtp " + std::to_string(d + 1) + " loss " + (losses[d] ? format_double(*losses[d], 5) : std::string("-"));
    return text;
  };
  auto mask_of = [](const data::Dataset& split) {
    const auto shard = split.n_shards() == 1 ? split.shard(0) : nullptr;
    return shard && shard->has_mask() ? shard->mask_path() : std::string();
  };
  if (args.has("json")) {
    nlohmann::json j = {{"loss", loss}, {"perplexity", std::exp(loss)}, {"tokens", all.learned}, {"seq_len", seq_len},
                        {"packing", packing}};
    if (mtp) {
      j["mtp_loss"] = mtp_json(all);  // depth 1 first
      j["mtp_tokens"] = all.mtp_learned;
    }
    if (sources.size() == 1) {
      j["data"] = sources[0].second.name();
      const std::string mask = mask_of(sources[0].second);
      j["mask"] = mask.empty() ? nlohmann::json(nullptr) : nlohmann::json(mask);
    } else {
      j["sources"] = nlohmann::json::array();
      for (size_t i = 0; i < sources.size(); ++i) {
        const double l = per_source[i].loss_sum / double(per_source[i].learned);
        j["sources"].push_back({{"data", sources[i].second.name()}, {"loss", l}, {"perplexity", std::exp(l)},
                                {"tokens", per_source[i].learned}});
        if (mtp) j["sources"].back()["mtp_loss"] = mtp_json(per_source[i]);
      }
    }
    std::printf("%s\n", j.dump().c_str());
    return 0;
  }
  for (size_t i = 0; i < sources.size(); ++i) {
    const double l = per_source[i].loss_sum / double(per_source[i].learned);
    const std::string mask = mask_of(sources[i].second);
    const std::string counted = mask.empty() ? "" : " learned (masked by " + mask + ")";
    std::printf("loss %s | perplexity %s | %llu%s predicted tokens in %s of %d%s | %s\n",
                format_double(l, 5).c_str(), format_double(std::exp(l), 5).c_str(),
                static_cast<unsigned long long>(per_source[i].learned), counted.c_str(),
                packing == "documents" ? "whole documents packed into sequences" : "windows", seq_len,
                mtp ? mtp_text(per_source[i]).c_str() : "", sources[i].second.name().c_str());
  }
  if (sources.size() > 1)
    std::printf("loss %s | perplexity %s | %llu predicted tokens%s | all %zu sources, per token\n",
                format_double(loss, 5).c_str(), format_double(std::exp(loss), 5).c_str(),
                static_cast<unsigned long long>(all.learned), mtp ? mtp_text(all).c_str() : "", sources.size());
  return 0;
}

}  // namespace moetrain::cli
