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

// Rows, each copy's row index and each copy's weight to the experts' owners as one grouped all_to_all
// (one completion to wait for), and backward the two gradients back the same way. Rows move by
// (send_rows, recv_rows) splits, indices and weights by the copies' (send_copies, recv_copies).
struct DispatchRows : public torch::autograd::Function<DispatchRows> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& rows,
                                                const torch::Tensor& index, const torch::Tensor& weights,
                                                Communicator* group, const std::vector<int64_t>& send_rows,
                                                const std::vector<int64_t>& recv_rows,
                                                const std::vector<int64_t>& send_copies,
                                                const std::vector<int64_t>& recv_copies) {
    ctx->saved_data["group"] = int64_t(reinterpret_cast<intptr_t>(group));
    ctx->saved_data["send_rows"] = send_rows;
    ctx->saved_data["recv_rows"] = recv_rows;
    ctx->saved_data["send_copies"] = send_copies;
    ctx->saved_data["recv_copies"] = recv_copies;
    auto out = group->all_to_all_group({{rows.contiguous(), send_rows, recv_rows},
                                        {index.contiguous(), send_copies, recv_copies},
                                        {weights.contiguous(), send_copies, recv_copies}});
    ctx->mark_non_differentiable({out[1]});
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* group = reinterpret_cast<Communicator*>(intptr_t(ctx->saved_data["group"].toInt()));
    const auto rows_back = ctx->saved_data["recv_rows"].toIntVector(), rows_to = ctx->saved_data["send_rows"].toIntVector();
    const auto copies_back = ctx->saved_data["recv_copies"].toIntVector(),
               copies_to = ctx->saved_data["send_copies"].toIntVector();
    // Undefined gradients arrive as zeros (materialized): every rank posts both parts, as NCCL needs.
    auto back = group->all_to_all_group({{grads[0].contiguous(), rows_back, rows_to},
                                         {grads[2].contiguous(), copies_back, copies_to}});
    return {back[0], torch::Tensor(), back[1], torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(),
            torch::Tensor()};
  }
};

int64_t total(const std::vector<int64_t>& v) {
  int64_t sum = 0;
  for (const auto n : v) sum += n;
  return sum;
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
                                  const moe::DispatchHandle& copies, const torch::Tensor& copy_weights_R,
                                  std::optional<torch::ScalarType> compute_dtype) const {
  // Rank p owns experts [p * EL, (p + 1) * EL). A token crosses to each rank once, whatever number of
  // that rank's experts it chose (U rows: one per (token, rank)); its copies (R: one per (token, expert))
  // travel as an index into those rows and a routing weight. The expert's rank sums a row's weighted
  // outputs, so one row per (token, rank) comes back too. P ranks, EL local experts.
  //
  // Everything is computed on the device except what NCCL needs on the host as splits: the per-rank
  // sizes, read once (both directions, one copy) after the size exchange. Backward reads nothing.
  Communicator& ep = *layout_->ep;
  const int64_t P = layout_->ep_size(), EL = n_experts_ / P, T = copies.num_tokens, R = copies.order_R.size(0);
  const int64_t slots_per_row = std::min(copies.top_k, EL);  // copies a row can carry
  const auto dev = x_TD.device();
  const auto on_device = torch::TensorOptions().dtype(torch::kInt64).device(dev);

  // 1. Which (rank, token) pairs send a row: a mask over P x T and its running count give each pair its
  // row among the sent rows, ordered by rank, then token. With a capacity the dropped copies (after the
  // kept ones in the handle) mark nothing: a copy is kept when its place is below sum(counts).
  const auto dest_R = torch::floor_divide(copies.expert_ids_R, EL);
  const auto pair_R = dest_R * T + copies.token_ids_R;
  auto marks_R = torch::ones({R}, on_device);
  if (!copies.all_kept) marks_R = (torch::arange(R, on_device) < copies.counts_E.sum()).to(torch::kInt64);
  const auto present_PT = torch::zeros({P * T}, on_device).scatter_add_(0, pair_R, marks_R) > 0;
  const auto rows_per_dest_P = present_PT.view({P, T}).sum(1);
  const auto row_of_pair = torch::cumsum(present_PT.to(torch::kInt64), 0) - 1;
  const auto first_row_P = torch::cumsum(rows_per_dest_P, 0) - rows_per_dest_P;
  // Each copy names its row within the block sent to its rank.
  const auto row_in_block_R = row_of_pair.index_select(0, pair_R) - first_row_P.index_select(0, dest_R);

  // 2. Sizes: to each rank, [rows, copies per local expert]; recv_PC[src] = what rank src sends here.
  // The one host read: both tables in one copy.
  const auto send_PC = torch::cat({rows_per_dest_P.unsqueeze(1), copies.counts_E.view({P, EL})}, 1);
  const std::vector<int64_t> one_each(size_t(P), 1);
  const auto recv_PC = ep.all_to_all(send_PC, one_each, one_each);
  const auto sizes = host_read(torch::stack({send_PC, recv_PC}), "moe.splits").contiguous();
  const auto size_of = sizes.accessor<int64_t, 3>();  // [send or receive][rank][rows, copies per expert]
  const auto ranks = static_cast<size_t>(P), local_experts = static_cast<size_t>(EL);
  std::vector<int64_t> send_rows(ranks), recv_rows(ranks), send_copies(ranks, 0), recv_copies(ranks, 0),
      local_counts(local_experts, 0);
  for (int64_t p = 0; p < P; ++p) {
    send_rows[size_t(p)] = size_of[0][p][0];
    recv_rows[size_t(p)] = size_of[1][p][0];
    for (int64_t e = 0; e < EL; ++e) {
      send_copies[size_t(p)] += size_of[0][p][1 + e];
      recv_copies[size_t(p)] += size_of[1][p][1 + e];
      local_counts[size_t(e)] += size_of[1][p][1 + e];
    }
  }
  const int64_t U = total(send_rows), kept = total(send_copies);
  const int64_t received_rows = total(recv_rows), received_copies = total(recv_copies);

  // 3. Rows, then each copy's row and weight, to the experts' owners, as one grouped operation. Rows
  // travel in the compute dtype both ways (the experts' output is in it), so a rank that receives none
  // and passes them straight back posts exactly the dtype its peers post, as NCCL requires. The
  // weights keep the router's dtype. nonzero_static lists the present pairs in order without a sync.
  const auto pair_U = at::nonzero_static(present_PT, U, -1).view({U});
  const auto dest_U = torch::floor_divide(pair_U, std::max<int64_t>(T, 1)), token_U = pair_U - dest_U * T;
  const auto rows_UD = moe::gather_rows(x_TD, token_U, token_U * P + dest_U, P);
  auto received = DispatchRows::apply(cast(rows_UD, compute_dtype), row_in_block_R.narrow(0, 0, kept),
                                      copy_weights_R.narrow(0, 0, kept), &ep, send_rows, recv_rows, send_copies,
                                      recv_copies);
  const auto& received_UD = received[0];
  const auto& received_row_C = received[1];
  const auto& received_weight_C = received[2];

  // 4. Regroup the copies by local expert (source ranks in order within each), run the experts, weight
  // and sum each row's copies. The copies arrive in blocks (source, expert); a stable sort of each
  // copy's key expert * P + source regroups them, on the device from the received sizes there.
  const auto recv_rows_P = recv_PC.select(1, 0);
  const auto recv_copies_PE = recv_PC.narrow(1, 1, EL);
  const auto copy_source_C =
      torch::repeat_interleave(torch::arange(P, on_device), recv_copies_PE.sum(1), 0, received_copies);
  const auto first_received_P = torch::cumsum(recv_rows_P, 0) - recv_rows_P;
  const auto row_C = received_row_C + first_received_P.index_select(0, copy_source_C);
  const auto block_key = torch::arange(EL, on_device).repeat({P}) * P + torch::arange(P, on_device).repeat_interleave(EL);
  const auto copy_key = torch::repeat_interleave(block_key, recv_copies_PE.reshape(-1), 0, received_copies);
  const auto perm_C = std::get<1>(torch::sort(copy_key, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  const auto sorted_row_C = row_C.index_select(0, perm_C);
  // A copy's slot in its row: its place among the row's copies (for the sums free of atomic adds).
  const auto by_row_C = std::get<1>(torch::sort(sorted_row_C, /*stable=*/true, 0, false));
  const auto copies_per_row = torch::zeros({received_rows}, on_device).scatter_add_(0, sorted_row_C, torch::ones_like(sorted_row_C));
  const auto first_copy_of_row = torch::cumsum(copies_per_row, 0) - copies_per_row;
  const auto place_C = torch::empty_like(sorted_row_C).index_copy_(
      0, by_row_C, torch::arange(received_copies, on_device) - first_copy_of_row.index_select(0, sorted_row_C.index_select(0, by_row_C)));
  const auto slot_C = sorted_row_C * slots_per_row + place_C;
  const auto local_counts_E = recv_copies_PE.sum(0);
  auto rows_CD = moe::gather_rows(received_UD, sorted_row_C, slot_C, slots_per_row);
  // A rank that receives no rows still passes them through the graph: every all-to-all must run its
  // backward on every rank, or the ranks' collectives would fall out of step; and its experts still
  // get a (zero) gradient, as every rank's do (see ExpertsImpl::forward_sliced).
  auto y_CD = experts.forward(rows_CD, local_counts_E, compute_dtype, &local_counts);
  if (received_copies == 0) y_CD = rows_CD + y_CD;
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
  // The ranks that run this layer are the stage's data-parallel ranks; their summed counts serve the
  // switch loss only, so without it nothing is summed (the logged aux_loss is then this rank's).
  if (layout->dp_size() > 1 && layer.config().aux_loss_coef != 0) {
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
