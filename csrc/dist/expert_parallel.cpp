// Expert parallelism around the model (see expert_parallel.h).
#include "dist/expert_parallel.h"

namespace moetrain::dist {

namespace {

// Autograd wrapper of Communicator::all_to_all: forward moves rows by (send, recv) splits, backward
// moves their gradients by (recv, send).
struct AllToAllRows : public torch::autograd::Function<AllToAllRows> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& rows, Communicator* group,
                               const std::vector<int64_t>& send_rows, const std::vector<int64_t>& recv_rows) {
    ctx->saved_data["group"] = int64_t(reinterpret_cast<intptr_t>(group));
    ctx->saved_data["send"] = send_rows;
    ctx->saved_data["recv"] = recv_rows;
    return group->all_to_all(rows, send_rows, recv_rows);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* group = reinterpret_cast<Communicator*>(intptr_t(ctx->saved_data["group"].toInt()));
    const auto send = ctx->saved_data["send"].toIntVector(), recv = ctx->saved_data["recv"].toIntVector();
    auto grad = grads[0].defined() ? grads[0].contiguous() : torch::Tensor();
    return {group->all_to_all(grad, recv, send), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

std::vector<int64_t> group_sums(const torch::Tensor& counts_cpu, int64_t groups) {
  auto sums = counts_cpu.view({groups, -1}).sum(1);
  return std::vector<int64_t>(sums.data_ptr<int64_t>(), sums.data_ptr<int64_t>() + groups);
}

}  // namespace

torch::Tensor all_to_all_rows(const torch::Tensor& rows, Communicator& group, const std::vector<int64_t>& send_rows,
                              const std::vector<int64_t>& recv_rows) {
  return AllToAllRows::apply(rows, &group, send_rows, recv_rows);
}

ExpertParallel::ExpertParallel(std::shared_ptr<const Layout> layout, int n_experts)
    : layout_(std::move(layout)), n_experts_(n_experts) {
  TORCH_CHECK(n_experts_ % layout_->ep_size() == 0, "[dist] model.moe.n_experts = ", n_experts_,
              " is not divisible by parallel.expert_parallel = ", layout_->ep_size());
}

torch::Tensor ExpertParallel::run(const moe::ExpertsImpl& experts, const torch::Tensor& rows_RD,
                                  const torch::Tensor& counts_E, std::optional<torch::ScalarType> compute_dtype) const {
  // Rows arrive sorted by global expert, and rank p owns experts [p * EL, (p + 1) * EL): the rows for
  // each rank are already contiguous. P ranks, EL local experts.
  Communicator& ep = *layout_->ep;
  const int64_t P = layout_->ep_size(), EL = n_experts_ / P;
  // 1. Counts: recv_counts_PE[src][e] = rows rank src sends to local expert e.
  const std::vector<int64_t> count_split(size_t(P), EL);
  auto recv_counts_PE = ep.all_to_all(counts_E, count_split, count_split).to(torch::kCPU).view({P, EL});
  const auto send_rows = group_sums(counts_E.to(torch::kCPU), P);
  const auto recv_rows = group_sums(recv_counts_PE, P);
  // 2. Rows to the experts' owners; they arrive grouped by source rank, then by local expert. They
  // travel in the compute dtype both ways (the experts' output is in it), so a rank that receives no
  // rows and passes them straight back posts exactly the dtype its peers post, as NCCL requires.
  auto received_RD = all_to_all_rows(cast(rows_RD, compute_dtype), ep, send_rows, recv_rows);
  // 3. Regroup by local expert (source ranks in order within each), run the experts, undo the regrouping.
  // The rows arrive in blocks (source, expert); a stable sort of each row's key expert * P + source
  // regroups them by expert with the sources in order, on the device (the output size is known on
  // the host, so nothing waits for the device).
  int64_t offset = 0;
  for (int64_t n : recv_rows) offset += n;
  const auto on_device = torch::TensorOptions().dtype(torch::kInt64).device(rows_RD.device());
  const auto block_key = torch::arange(EL, on_device).repeat({P}) * P + torch::arange(P, on_device).repeat_interleave(EL);
  const auto row_key = torch::repeat_interleave(block_key, recv_counts_PE.reshape(-1).to(rows_RD.device()), 0, offset);
  auto perm_R = std::get<1>(torch::sort(row_key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  auto local_counts_E = recv_counts_PE.sum(0).to(rows_RD.device());
  // A rank that receives no rows still passes them through the graph: both all-to-alls must run
  // their backward on every rank, or the ranks' collectives would fall out of step; and its experts
  // still get a (zero) gradient, as every rank's do (see ExpertsImpl::forward_sliced).
  auto y_sorted = offset == 0 ? received_RD + experts.forward(received_RD, local_counts_E, compute_dtype)
                              : experts.forward(received_RD.index_select(0, perm_R), local_counts_E, compute_dtype);
  auto y_received = torch::empty_like(y_sorted).index_copy(0, perm_R, y_sorted);
  // 4. Results back to the ranks the rows came from, in their dispatch order.
  return all_to_all_rows(y_received, ep, recv_rows, send_rows);
}

moe::ExpertShard expert_shard(const Layout& layout) { return {layout.ep_size(), layout.ep_rank()}; }

void parallelize(moe::MoEImpl& layer, const std::shared_ptr<const Layout>& layout) {
  const auto want = expert_shard(*layout);
  TORCH_CHECK(layer.shard().ranks == want.ranks && layer.shard().rank == want.rank, "[dist] the MoE layer holds expert shard ",
              layer.shard().rank, " of ", layer.shard().ranks, " but this rank's layout is shard ", want.rank, " of ",
              want.ranks);
  if (layout->ep_size() > 1) layer.set_dispatcher(std::make_shared<ExpertParallel>(layout, layer.config().n_experts));
  if (layout->dp_size() > 1) {  // the ranks that run this layer: the stage's data-parallel ranks
    layer.router->set_global_counts([layout](torch::Tensor& counts_E) {
      layout->dp->all_reduce_sum(counts_E);
      return int64_t(layout->dp->world_size());
    });
  }
}

void parallelize(model::TransformerImpl& model, const std::shared_ptr<const Layout>& layout) {
  for (auto& block : model.blocks)
    if (block->moe) parallelize(*block->moe, layout);
  for (auto& mtp : model.mtp_modules)  // the MTP modules' blocks (the last stage's)
    if (mtp->block->moe) parallelize(*mtp->block->moe, layout);
}

}  // namespace moetrain::dist
