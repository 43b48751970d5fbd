// Validation: the mean next-token loss over the fixed validation batches of each source (see trainer.h);
// the main model's only (MTP modules are a training objective).
#include "common/errors.h"
#include "data/sampler.h"
#include "dist/pipeline.h"
#include "train/trainer.h"

namespace moetrain::train {

std::optional<Validation> evaluate(const model::TransformerImpl& model, const data::Blend& blend, int n_batches,
                                   int batch_size, int seq_len, torch::Device device, const dist::Layout* layout,
                                   const std::function<bool()>& stop) {
  torch::NoGradGuard no_grad;
  const int W = layout ? layout->dp_size() : 1, r = layout ? layout->dp_rank() : 0;
  // With a pipeline each batch flows through the stages; the last computes the loss, and counts the targets.
  const bool pipeline = layout && layout->pp_size() > 1, last = !layout || layout->last_stage();
  std::optional<dist::PipelineSchedule> stages;
  if (pipeline)
    stages.emplace(std::shared_ptr<const dist::Layout>(layout, [](const dist::Layout*) {}),
                   std::vector<int64_t>{batch_size, seq_len, model.config().d_model},
                   torch::TensorOptions().dtype(torch::kFloat).device(device));
  dist::Communicator* world = layout && layout->world->world_size() > 1 ? layout->world.get() : nullptr;
  Validation result;
  double loss_sum = 0, learned = 0;  // over every learned target of every source, batch and rank
  for (const auto& source : blend.sources()) {
    if (!source.val) continue;
    double source_loss = 0, source_learned = 0;
    for (int i = 0; i < n_batches; ++i) {
      if (stop && stop()) return std::nullopt;  // a preemption does not wait for the rest of the batches
      // Evaluation batch i holds batch_size * W sequences whatever the layout; rank r takes its share.
      auto batch = data::eval_batch(*source.val, i, n_batches, batch_size * W, seq_len, blend.packing());
      auto inputs = batch.inputs.narrow(0, int64_t(r) * batch_size, batch_size).to(device);
      torch::Tensor positions;  // packed documents only; the model copies them (see forward_loss)
      if (batch.positions.defined()) positions = batch.positions.narrow(0, int64_t(r) * batch_size, batch_size);
      auto targets = batch.targets.narrow(0, int64_t(r) * batch_size, batch_size).reshape(-1).to(device);
      if (last) source_learned += double(targets.ne(data::kIgnoreTarget).sum().item<int64_t>());
      if (!pipeline) {
        source_loss += model.forward_loss(inputs, targets, data::kIgnoreTarget, /*sum=*/true, /*with_mtp=*/false, positions)
                           .loss.item<double>();
        continue;
      }
      stages->forward_only(1, [&](int, const torch::Tensor& input) {
        auto out = model.forward_stage(model.first_stage() ? inputs : input, targets, data::kIgnoreTarget, /*sum=*/true,
                                       /*with_mtp=*/false, /*tokens_BS=*/{}, positions);
        if (!model.last_stage()) return dist::StageForward{out.hidden_BSD, {}};
        source_loss += out.loss.item<double>();
        return dist::StageForward{};
      });
    }
    if (world) source_loss = dist::all_sum(*world, source_loss), source_learned = dist::all_sum(*world, source_learned);
    if (source_learned > 0) result.by_source.emplace_back(source.name, source_loss / source_learned);
    loss_sum += source_loss;
    learned += source_learned;
  }
  result.measured = learned > 0;
  result.loss = result.measured ? loss_sum / learned : 0.0;
  return result;
}

std::optional<double> evaluate(const model::TransformerImpl& model, const data::Shard& shard, int n_batches,
                               int batch_size, int seq_len, torch::Device device, const dist::Layout* layout,
                               const std::function<bool()>& stop) {
  const data::Blend one({data::BlendSource{shard.path(), 1.0, data::Dataset::borrow(shard), data::Dataset::borrow(shard)}});
  const auto validation = evaluate(model, one, n_batches, batch_size, seq_len, device, layout, stop);
  if (!validation) return std::nullopt;
  if (!validation->measured)
    throw DataError("validation: the " + std::to_string(n_batches) + " evaluation batches of " + shard.path() +
                    " hold no learned target (its loss mask marks none): no validation loss");
  return validation->loss;
}

double evaluate(const model::TransformerImpl& model, const data::Shard& shard, int n_batches, int batch_size,
                int seq_len, torch::Device device, const dist::Layout* layout) {
  return *evaluate(model, shard, n_batches, batch_size, seq_len, device, layout, nullptr);
}

}  // namespace moetrain::train
