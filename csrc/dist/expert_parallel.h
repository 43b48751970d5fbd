// Expert parallelism applied to a built model: the dispatcher that moves each MoE layer's rows to the
// ranks holding their experts and back, and parallelize(), which applies a whole layout (expert and
// data parallel) to a model built for its expert shard. The model itself is single-device math with
// two seams, moe::ExpertDispatcher and RouterImpl::set_global_counts; everything about ranks is here.
#pragma once
#include <torch/torch.h>

#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "model/transformer.h"
#include "moe/moe.h"

namespace moetrain::dist {

// Moves rows between the ranks of `group` (all_to_all with row splits) as an autograd operation:
// backward sends the gradients back the reverse way.
torch::Tensor all_to_all_rows(const torch::Tensor& rows, Communicator& group, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows);

// The tokens of one MoE layer across its ep group of P ranks, rank p holding experts
// [p * E / P, (p + 1) * E / P): sizes exchange, one row per (token, rank) to the experts' owners with
// each copy's row index and routing weight, the experts, the weighted sum of a token's local experts,
// one row per (token, rank) back. Rows cross in the compute dtype both ways, and a rank that receives
// none still posts every collective its peers post (NCCL hangs otherwise).
class ExpertParallel : public moe::ExpertDispatcher {
 public:
  ExpertParallel(std::shared_ptr<const Layout> layout, int n_experts);
  torch::Tensor run(const moe::ExpertsImpl& experts, const torch::Tensor& x_TD, const moe::DispatchHandle& handle,
                    const torch::Tensor& weights_R, std::optional<torch::ScalarType> compute_dtype) const override;

 private:
  std::shared_ptr<const Layout> layout_;
  int n_experts_;
};

// The expert shard this rank builds its model for: its place in its ep group.
moe::ExpertShard expert_shard(const Layout& layout);
// Applies the layout to a layer or a model built for expert_shard(*layout): the expert-parallel
// dispatcher where the ep group has more than one rank, and the router's global counts (summed over
// the stage's data-parallel ranks) where there are several. A no-op at world 1.
void parallelize(moe::MoEImpl& layer, const std::shared_ptr<const Layout>& layout);
void parallelize(model::TransformerImpl& model, const std::shared_ptr<const Layout>& layout);

}  // namespace moetrain::dist
