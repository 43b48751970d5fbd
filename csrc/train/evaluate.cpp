// Validation: the mean next-token loss over the fixed validation batches (see trainer.h).
#include "common/errors.h"
#include "data/sampler.h"
#include "train/trainer.h"

namespace moetrain::train {

std::optional<double> evaluate(const model::TransformerImpl& model, const data::Shard& shard, int n_batches,
                               int batch_size, int seq_len, torch::Device device, dist::Communicator* world,
                               const std::function<bool()>& stop) {
  torch::NoGradGuard no_grad;
  const int W = world ? world->world_size() : 1, r = world ? world->rank() : 0;
  double loss_sum = 0, learned = 0;  // over every learned target of every batch and rank
  for (int i = 0; i < n_batches; ++i) {
    if (stop && stop()) return std::nullopt;  // a preemption does not wait for the rest of the batches
    // Evaluation batch i holds batch_size * W sequences whatever the layout; rank r takes its share.
    auto batch = data::eval_batch(shard, i, n_batches, batch_size * W, seq_len);
    auto inputs = batch.inputs.narrow(0, int64_t(r) * batch_size, batch_size);
    auto targets = batch.targets.narrow(0, int64_t(r) * batch_size, batch_size).reshape(-1);
    loss_sum += model.forward_loss(inputs.to(device), targets.to(device), data::kIgnoreTarget, /*sum=*/true)
                    .loss.item<double>();
    learned += double(targets.ne(data::kIgnoreTarget).sum().item<int64_t>());
  }
  if (world) loss_sum = dist::all_sum(*world, loss_sum), learned = dist::all_sum(*world, learned);
  if (learned == 0)
    throw DataError("validation: the " + std::to_string(n_batches) + " evaluation batches of " + shard.path() +
                    " hold no learned target (its loss mask marks none): no validation loss");
  return loss_sum / learned;
}

double evaluate(const model::TransformerImpl& model, const data::Shard& shard, int n_batches, int batch_size,
                int seq_len, torch::Device device, dist::Communicator* world) {
  return *evaluate(model, shard, n_batches, batch_size, seq_len, device, world, nullptr);
}

}  // namespace moetrain::train
