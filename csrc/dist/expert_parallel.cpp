// Expert parallelism around the model (see expert_parallel.h).
#include "dist/expert_parallel.h"

#include <algorithm>

#include "common/host_sync.h"

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

torch::Tensor ExpertParallel::run(const moe::ExpertsImpl& experts, const torch::Tensor& x_TD,
                                  const moe::DispatchHandle& handle, const torch::Tensor& weights_R,
                                  std::optional<torch::ScalarType> compute_dtype) const {
  // Rank p owns experts [p * EL, (p + 1) * EL). A token crosses to each rank once, whatever number of
  // that rank's experts it chose (U rows: one per (token, rank)); its copies (R: one per (token, expert))
  // travel as an index into those rows and a routing weight. The expert's rank sums a row's weighted
  // outputs, so one row per (token, rank) comes back too. P ranks, EL local experts.
  Communicator& ep = *layout_->ep;
  const int64_t P = layout_->ep_size(), EL = n_experts_ / P, T = handle.num_tokens, R = handle.order_R.size(0);
  const int64_t slots_per_row = std::min(handle.top_k, EL);  // copies a row can carry
  const auto dev = x_TD.device();
  const auto on_device = torch::TensorOptions().dtype(torch::kInt64).device(dev);
  const auto counts_cpu = host_read(handle.counts_E, "moe.counts");

  // 1. The rows this rank sends: the distinct (rank, token) pairs of its copies, ordered by rank, then token.
  const auto expert_R = torch::repeat_interleave(torch::arange(n_experts_, on_device), handle.counts_E, 0, R);
  const auto dest_R = torch::floor_divide(expert_R, EL);
  const int64_t key_base = std::max<int64_t>(T, 1);  // key = rank * T + token
  count_host_sync("moe.unique");  // its output size is data-dependent: CUDA reads it on the host
  const auto unique = at::_unique(dest_R * key_base + handle.token_ids_R, /*sorted=*/true, /*return_inverse=*/true);
  const auto& pair_U = std::get<0>(unique);
  const auto& row_of_copy_R = std::get<1>(unique);  // the copy's row among all sent rows
  const int64_t U = pair_U.size(0);
  const auto dest_U = torch::floor_divide(pair_U, key_base), token_U = pair_U - dest_U * key_base;
  auto rows_per_dest = torch::zeros({P}, on_device).scatter_add_(0, dest_U, torch::ones_like(dest_U));
  const auto first_row_P = torch::cumsum(rows_per_dest, 0) - rows_per_dest;
  // Each copy names its row within the block sent to its rank.
  const auto row_in_block_R = row_of_copy_R - first_row_P.index_select(0, dest_R);

  // 2. Sizes: to each rank, [rows, copies per local expert]; meta_PC[src] = what rank src sends here.
  auto send_meta_PC = torch::cat({host_read(rows_per_dest, "moe.rows_per_rank").unsqueeze(1), counts_cpu.view({P, EL})}, 1);
  const std::vector<int64_t> one_each(size_t(P), 1);
  count_host_sync("moe.upload");  // pageable host memory to the device: the host waits for the copy
  auto recv_meta_PC = host_read(ep.all_to_all(send_meta_PC.to(dev), one_each, one_each), "moe.received_sizes");
  const auto send_rows_P = send_meta_PC.select(1, 0).contiguous();
  const std::vector<int64_t> send_rows(send_rows_P.data_ptr<int64_t>(), send_rows_P.data_ptr<int64_t>() + P);
  const auto recv_rows_P = recv_meta_PC.select(1, 0).contiguous();
  const std::vector<int64_t> recv_rows(recv_rows_P.data_ptr<int64_t>(), recv_rows_P.data_ptr<int64_t>() + P);
  const auto recv_copies_PE = recv_meta_PC.narrow(1, 1, EL).contiguous();
  const auto send_copies = group_sums(counts_cpu, P), recv_copies = group_sums(recv_copies_PE, P);
  int64_t received_rows = 0, received_copies = 0;
  for (int64_t p = 0; p < P; ++p) received_rows += recv_rows[p], received_copies += recv_copies[p];

  // 3. Rows, then each copy's row and weight, to the experts' owners. Rows travel in the compute dtype
  // both ways (the experts' output is in it), so a rank that receives none and passes them straight
  // back posts exactly the dtype its peers post, as NCCL requires. The weights keep the router's dtype.
  const auto rows_UD = moe::gather_rows(x_TD, token_U, token_U * P + dest_U, P);
  auto received_UD = all_to_all_rows(cast(rows_UD, compute_dtype), ep, send_rows, recv_rows);
  auto received_row_C = ep.all_to_all(row_in_block_R, send_copies, recv_copies).to(dev);
  auto received_weight_C = all_to_all_rows(weights_R, ep, send_copies, recv_copies);

  // 4. Regroup the copies by local expert (source ranks in order within each), run the experts, weight
  // and sum each row's copies. The copies arrive in blocks (source, expert); a stable sort of each
  // copy's key expert * P + source regroups them, on the device (sizes are known on the host).
  for (int upload = 0; upload < 3; ++upload) count_host_sync("moe.upload");  // three below, as above
  const auto copy_source_C = torch::repeat_interleave(torch::arange(P, on_device), torch::tensor(recv_copies).to(dev), 0,
                                                      received_copies);
  const auto first_received_P = (torch::cumsum(recv_rows_P, 0) - recv_rows_P).to(dev);
  const auto row_C = received_row_C + first_received_P.index_select(0, copy_source_C);
  const auto block_key = torch::arange(EL, on_device).repeat({P}) * P + torch::arange(P, on_device).repeat_interleave(EL);
  const auto copy_key = torch::repeat_interleave(block_key, recv_copies_PE.reshape(-1).to(dev), 0, received_copies);
  const auto perm_C = std::get<1>(torch::sort(copy_key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const auto sorted_row_C = row_C.index_select(0, perm_C);
  // A copy's slot in its row: its place among the row's copies (for the sums free of atomic adds).
  const auto by_row_C = std::get<1>(torch::sort(sorted_row_C, /*stable=*/true, 0, false));
  const auto copies_per_row = torch::zeros({received_rows}, on_device).scatter_add_(0, sorted_row_C, torch::ones_like(sorted_row_C));
  const auto first_copy_of_row = torch::cumsum(copies_per_row, 0) - copies_per_row;
  const auto place_C = torch::empty_like(sorted_row_C).index_copy_(
      0, by_row_C, torch::arange(received_copies, on_device) - first_copy_of_row.index_select(0, sorted_row_C.index_select(0, by_row_C)));
  const auto slot_C = sorted_row_C * slots_per_row + place_C;
  const auto local_counts_E = recv_copies_PE.sum(0).to(dev);
  auto rows_CD = moe::gather_rows(received_UD, sorted_row_C, slot_C, slots_per_row);
  // A rank that receives no rows still passes them through the graph: every all-to-all must run its
  // backward on every rank, or the ranks' collectives would fall out of step; and its experts still
  // get a (zero) gradient, as every rank's do (see ExpertsImpl::forward_sliced).
  auto y_CD = received_copies == 0 ? rows_CD + experts.forward(rows_CD, local_counts_E, compute_dtype)
                                   : experts.forward(rows_CD, local_counts_E, compute_dtype);
  auto weighted_CD = y_CD * received_weight_C.index_select(0, perm_C).to(y_CD.scalar_type()).unsqueeze(1);
  auto combined_UD = moe::sum_rows(weighted_CD, sorted_row_C, slot_C, received_rows, slots_per_row);

  // 5. One row per (token, rank) back to the ranks the rows came from, in their order; each token sums
  // its ranks' rows.
  auto returned_UD = all_to_all_rows(combined_UD, ep, recv_rows, send_rows);
  TORCH_CHECK(returned_UD.size(0) == U, "[dist] expert parallel: ", returned_UD.size(0), " rows came back for ", U, " sent");
  return moe::sum_rows(returned_UD, token_U, token_U * P + dest_U, T, P);
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
