// The MoE layer: local dispatch/combine, stacked SwiGLU experts and the layer that ties them together.
// Legend: T tokens, D model dim, E routed experts, K experts per token, F hidden, R = T*K rows.
#include "moe/moe.h"

#include <cmath>

#include "common/host_sync.h"

namespace moetrain::moe {

namespace {
// Under LibTorch's deterministic mode (run.deterministic) dispatch and combine never add two values
// into one place with atomics, so CUDA runs repeat bit for bit. Each element has a slot of its own in
// an (n_rows * slots_per_row, D) buffer (for dispatch, the flat copy index t*K + k); a row's slots are
// then summed in slot order.

// x_ND[row_I], whose backward writes each element's gradient into its own slot and sums a row's
// slots, where index_select's backward would index_add them onto one row (sum_rows without row_I
// always takes the slots).
struct GatherRows : torch::autograd::Function<GatherRows> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_ND,
                               const torch::Tensor& row_I, const torch::Tensor& slot_I, int64_t slots_per_row) {
    ctx->save_for_backward({slot_I});
    ctx->saved_data["N"] = x_ND.size(0);
    ctx->saved_data["S"] = slots_per_row;
    return x_ND.index_select(0, row_I);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto slot_I = ctx->get_saved_variables()[0];
    const int64_t N = ctx->saved_data["N"].toInt(), S = ctx->saved_data["S"].toInt();
    return {sum_rows(grads[0], torch::Tensor(), slot_I, N, S), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};
}  // namespace

torch::Tensor gather_rows(const torch::Tensor& x_ND, const torch::Tensor& row_I, const torch::Tensor& slot_I,
                          int64_t slots_per_row) {
  if (at::globalContext().deterministicAlgorithms()) return GatherRows::apply(x_ND, row_I, slot_I, slots_per_row);
  return x_ND.index_select(0, row_I);
}

torch::Tensor sum_rows(const torch::Tensor& v_ID, const torch::Tensor& row_I, const torch::Tensor& slot_I, int64_t n_rows,
                       int64_t slots_per_row) {
  if (at::globalContext().deterministicAlgorithms() || !row_I.defined()) {
    auto slots = torch::zeros({n_rows * slots_per_row, v_ID.size(1)}, v_ID.options()).index_copy(0, slot_I, v_ID);
    return slots.view({n_rows, slots_per_row, v_ID.size(1)}).sum(1);
  }
  return torch::zeros({n_rows, v_ID.size(1)}, v_ID.options()).index_add(0, row_I, v_ID);
}

namespace {
// gpt-oss's constants: the sigmoid's slope and the clamp (its reference torch/model.py).
constexpr double kClampedAlpha = 1.702, kClampedLimit = 7.0;

torch::Tensor product_of(const torch::Tensor& gate, const torch::Tensor& up, bool clamped) {
  if (!clamped) return torch::silu(gate) * up;
  const auto g = gate.clamp_max(kClampedLimit);
  return g * torch::sigmoid(kClampedAlpha * g) * (up.clamp(-kClampedLimit, kClampedLimit) + 1);
}

struct RecomputedGatedProduct : torch::autograd::Function<RecomputedGatedProduct> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& gate, const torch::Tensor& up,
                               bool clamped) {
    ctx->save_for_backward({gate, up});
    ctx->saved_data["clamped"] = clamped;
    return product_of(gate, up, clamped);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto gate = saved[0].detach().requires_grad_(true), up = saved[1].detach().requires_grad_(true);
    torch::AutoGradMode enable(true);
    auto out = product_of(gate, up, ctx->saved_data["clamped"].toBool());
    auto g = torch::autograd::grad({out}, {gate, up}, {grads[0]});
    return {g[0], g[1], torch::Tensor()};
  }
};
}  // namespace

torch::Tensor gated_product(const torch::Tensor& gate, const torch::Tensor& up, bool recompute, bool clamped) {
  if (recompute && torch::GradMode::is_enabled() && (gate.requires_grad() || up.requires_grad()))
    return RecomputedGatedProduct::apply(gate, up, clamped);
  return product_of(gate, up, clamped);
}

SwiGLUImpl::SwiGLUImpl(int d_model, int hidden) {
  w1 = register_parameter("w1", torch::empty({d_model, hidden}));
  w3 = register_parameter("w3", torch::empty({d_model, hidden}));
  w2 = register_parameter("w2", torch::empty({hidden, d_model}));
}

void SwiGLUImpl::add_lora(const config::LoraConfig& cfg) {
  w1_lora = moe::add_lora(*this, "w1", w1, cfg);
  w3_lora = moe::add_lora(*this, "w3", w3, cfg);
  w2_lora = moe::add_lora(*this, "w2", w2, cfg);
}

torch::Tensor SwiGLUImpl::forward(const torch::Tensor& x_TD, std::optional<torch::ScalarType> compute_dtype) const {
  auto x = cast(x_TD, compute_dtype);
  auto h = gated_product(lora_matmul(x, w1, w1_lora, compute_dtype), lora_matmul(x, w3, w3_lora, compute_dtype),
                         recompute_elementwise);
  return lora_matmul(h, w2, w2_lora, compute_dtype);
}

int64_t expert_capacity(double capacity_factor, int64_t num_tokens, int top_k, int n_experts) {
  return int64_t(std::ceil(capacity_factor * double(num_tokens) * top_k / n_experts));
}

DispatchHandle DispatchHandle::kept(int64_t n) const {
  DispatchHandle h = *this;
  h.token_ids_R = token_ids_R.narrow(0, 0, n);
  h.order_R = order_R.narrow(0, 0, n);
  h.expert_ids_R = expert_ids_R.narrow(0, 0, n);
  h.all_kept = true;
  return h;
}

Dispatched sort_copies(const RoutingPlan& plan, int64_t num_tokens, std::optional<int64_t> capacity) {
  const int64_t K = plan.topk_ids_TK.size(1);
  TORCH_CHECK(plan.topk_ids_TK.size(0) == num_tokens, "[moe] dispatch: plan has ", plan.topk_ids_TK.size(0),
              " tokens, input has ", num_tokens);
  auto flat_ids_R = plan.topk_ids_TK.reshape(-1);
  const auto stable = std::optional<bool>(true);
  Dispatched d;
  torch::Tensor order_R, counts_E = plan.stats.tokens_per_expert_E;
  if (!capacity) {
    order_R = std::get<1>(torch::sort(flat_ids_R, stable, /*dim=*/0, /*descending=*/false));
    d.dropped = torch::zeros({}, flat_ids_R.options());
  } else {
    // Within each expert, copies in order of falling weight (ties: earlier copies first); the first
    // `capacity` of each expert are kept. A stable sort on "dropped" then puts the kept copies first,
    // in that order, with no data-dependent size (masked_select would read one on the host).
    auto by_weight = std::get<1>(torch::sort(plan.topk_weights_TK.reshape(-1).detach(), stable, 0, /*descending=*/true));
    auto by_expert = std::get<1>(torch::sort(flat_ids_R.index_select(0, by_weight), stable, 0, false));
    auto ranked_R = by_weight.index_select(0, by_expert);
    auto expert_of_R = flat_ids_R.index_select(0, ranked_R);
    auto group_start_E = torch::cumsum(counts_E, 0) - counts_E;
    auto position_R = torch::arange(ranked_R.size(0), ranked_R.options()) - group_start_E.index_select(0, expert_of_R);
    auto kept_first = std::get<1>(torch::sort((position_R >= *capacity).to(torch::kInt), stable, 0, false));
    order_R = ranked_R.index_select(0, kept_first);
    counts_E = counts_E.clamp_max(*capacity);
    d.dropped = (flat_ids_R.numel() - counts_E.sum()).reshape({});
    d.handle.all_kept = false;
  }
  d.handle.token_ids_R = torch::floor_divide(order_R, K);
  d.handle.order_R = order_R;
  d.handle.expert_ids_R = flat_ids_R.index_select(0, order_R);
  d.handle.counts_E = counts_E;
  d.handle.num_tokens = num_tokens;
  d.handle.top_k = K;
  return d;
}

namespace {
// The handle of the kept copies, and the counts on the host where reading them was needed for that.
DispatchHandle kept_copies(const DispatchHandle& handle, std::optional<std::vector<int64_t>>& counts_on_host) {
  if (handle.all_kept) return handle;
  const auto counts = host_read(handle.counts_E, "moe.counts");
  counts_on_host.emplace(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + counts.numel());
  int64_t kept = 0;
  for (const auto n : *counts_on_host) kept += n;
  return handle.kept(kept);
}
}  // namespace

Dispatched dispatch(const torch::Tensor& x_TD, const RoutingPlan& plan, std::optional<int64_t> capacity) {
  Dispatched d = sort_copies(plan, x_TD.size(0), capacity);
  std::optional<std::vector<int64_t>> counts;
  d.handle = kept_copies(d.handle, counts);
  d.rows_RD = gather_rows(x_TD, d.handle.token_ids_R, d.handle.order_R, d.handle.top_k);
  return d;
}

torch::Tensor copy_weights(const DispatchHandle& handle, const RoutingPlan& plan) {
  return plan.topk_weights_TK.reshape(-1).index_select(0, handle.order_R);
}

torch::Tensor combine(const torch::Tensor& y_RD, const DispatchHandle& handle, const RoutingPlan& plan) {
  auto weighted_RD = y_RD * copy_weights(handle, plan).to(y_RD.scalar_type()).unsqueeze(1);
  return sum_rows(weighted_RD, handle.token_ids_R, handle.order_R, handle.num_tokens, handle.top_k);
}

ExpertsImpl::ExpertsImpl(int n_experts, int d_model, int hidden, std::string impl, const std::string& activation,
                         bool bias)
    : clamped_activation(activation == "swiglu_clamped"), impl_(std::move(impl)) {
  TORCH_CHECK(activation == "swiglu" || activation == "swiglu_clamped", "[moe] model.moe.activation = ", activation,
              " must be swiglu or swiglu_clamped");
  w1 = register_parameter("w1", torch::empty({n_experts, d_model, hidden}));
  w3 = register_parameter("w3", torch::empty({n_experts, d_model, hidden}));
  w2 = register_parameter("w2", torch::empty({n_experts, hidden, d_model}));
  if (bias) {
    b1 = register_parameter("b1", torch::empty({n_experts, hidden}));
    b3 = register_parameter("b3", torch::empty({n_experts, hidden}));
    b2 = register_parameter("b2", torch::empty({n_experts, d_model}));
  }
}

void ExpertsImpl::add_lora(const config::LoraConfig& cfg) {
  w1_lora = moe::add_lora(*this, "w1", w1, cfg);
  w3_lora = moe::add_lora(*this, "w3", w3, cfg);
  w2_lora = moe::add_lora(*this, "w2", w2, cfg);
}

torch::Tensor ExpertsImpl::forward_sliced(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                                          std::optional<torch::ScalarType> compute_dtype,
                                          const std::vector<int64_t>* counts_on_host) const {
  // One host read of the counts per layer, then a matmul per non-empty expert. split() and unbind()
  // give per-expert views whose backward is a single cat/stack; indexing w1[e] or narrow() per
  // expert would allocate a full-size zero gradient for every expert in backward.
  const int64_t E = w1.size(0);
  std::vector<int64_t> sizes;
  if (counts_on_host) {
    sizes = *counts_on_host;
  } else {
    const auto counts = host_read(counts_E, "experts.counts");
    sizes.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + E);
  }
  auto xs = cast(rows_RD, compute_dtype).split_with_sizes(sizes, 0);
  auto w1s = cast(w1, compute_dtype).unbind(0), w3s = cast(w3, compute_dtype).unbind(0);
  auto w2s = cast(w2, compute_dtype).unbind(0);
  // The adapters' per-expert views, taken the same way; x_e A_e * scale B_e is added to each product.
  struct Views {
    std::vector<torch::Tensor> a, b;
  };
  auto views = [&](const LoraAdapter& lora) {
    return lora.defined() ? Views{cast(lora.a, compute_dtype).unbind(0), cast(lora.b, compute_dtype).unbind(0)} : Views{};
  };
  const Views l1 = views(w1_lora), l3 = views(w3_lora), l2 = views(w2_lora);
  std::vector<torch::Tensor> b1s, b3s, b2s;  // the biases' per-expert rows, taken the same way
  if (b1.defined()) {
    b1s = cast(b1, compute_dtype).unbind(0);
    b3s = cast(b3, compute_dtype).unbind(0);
    b2s = cast(b2, compute_dtype).unbind(0);
  }
  auto biased = [&](torch::Tensor y, const std::vector<torch::Tensor>& bias, int64_t e) {
    return bias.empty() ? y : y + bias[size_t(e)];
  };
  auto product = [&](const torch::Tensor& x, const torch::Tensor& w, const LoraAdapter& lora, const Views& v, int64_t e) {
    auto y = x.mm(w);
    if (!lora.defined()) return y;
    return y + (lora_input(x, lora).mm(v.a[size_t(e)]) * lora.scale).mm(v.b[size_t(e)]);
  };
  std::vector<torch::Tensor> outputs;
  for (int64_t e = 0; e < E; ++e) {
    if (sizes[e] == 0) continue;
    auto h = gated_product(biased(product(xs[e], w1s[e], w1_lora, l1, e), b1s, e),
                           biased(product(xs[e], w3s[e], w3_lora, l3, e), b3s, e), recompute_elementwise,
                           clamped_activation);
    outputs.push_back(biased(product(h, w2s[e], w2_lora, l2, e), b2s, e));
  }
  if (outputs.empty()) {
    // No rows at all: an empty result that still depends on the weights, so that they get a (zero)
    // gradient as on a rank whose experts saw tokens. Every rank's backward then reaches the same
    // parameters, which the gradient buckets reduced during backward rely on (dist::GradientReducer).
    auto touched = w1.sum() + w3.sum() + w2.sum();
    if (b1.defined()) touched = touched + b1.sum() + b3.sum() + b2.sum();
    for (const auto* lora : {&w1_lora, &w3_lora, &w2_lora})
      if (lora->defined()) touched = touched + lora->a.sum() + lora->b.sum();
    const auto touch = touched.mul(0).to(w2s[0].scalar_type());
    return torch::zeros({0, w2.size(2)}, rows_RD.options().dtype(w2s[0].scalar_type())) + touch;
  }
  return torch::cat(outputs, 0);
}

bool ExpertsImpl::grouped_supported(const torch::Tensor& rows_RD, std::optional<torch::ScalarType> compute_dtype) const {
  const auto dtype = compute_dtype.value_or(w1.scalar_type());
  const int64_t item = c10::elementSize(dtype);
  const bool aligned = (w1.size(1) * item) % 16 == 0 && (w1.size(2) * item) % 16 == 0;
  if (rows_RD.is_cuda()) return aligned && dtype == torch::kBFloat16;
  return aligned && (dtype == torch::kFloat || dtype == torch::kBFloat16);
}

std::string ExpertsImpl::resolved_impl(const torch::Tensor& rows_RD, std::optional<torch::ScalarType> compute_dtype) const {
  if (impl_ != "auto") return impl_;
  return rows_RD.is_cuda() && grouped_supported(rows_RD, compute_dtype) ? "grouped_mm" : "sliced";
}

torch::Tensor ExpertsImpl::forward_grouped(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                                           std::optional<torch::ScalarType> compute_dtype) const {
  // _grouped_mm's backward rejects zero rows in total; the sliced path handles them.
  if (rows_RD.size(0) == 0) {  // every count is zero: nothing to read
    const std::vector<int64_t> none(size_t(w1.size(0)), 0);
    return forward_sliced(rows_RD, counts_E, compute_dtype, &none);
  }
  const auto dtype = compute_dtype.value_or(w1.scalar_type());
  auto offsets_E = torch::cumsum(counts_E, 0).to(torch::kInt);  // group ends, on the rows' device
  auto x = rows_RD.to(dtype).contiguous();
  auto gate = at::_grouped_mm(x, cast(w1, dtype), offsets_E);
  auto up = at::_grouped_mm(x, cast(w3, dtype), offsets_E);
  if (w1_lora.defined()) gate = gate + lora_grouped_term(x, offsets_E, w1_lora, dtype);
  if (w3_lora.defined()) up = up + lora_grouped_term(x, offsets_E, w3_lora, dtype);
  torch::Tensor expert_of_R;  // (R,) each row's expert, for the biases; sized by R, so no host read
  if (b1.defined()) {
    const int64_t E = w1.size(0);
    expert_of_R = torch::repeat_interleave(torch::arange(E, counts_E.options()), counts_E, 0, x.size(0));
    gate = gate + cast(b1, dtype).index_select(0, expert_of_R);
    up = up + cast(b3, dtype).index_select(0, expert_of_R);
  }
  auto h = gated_product(gate, up, recompute_elementwise, clamped_activation).contiguous();
  auto y = at::_grouped_mm(h, cast(w2, dtype), offsets_E);
  if (w2_lora.defined()) y = y + lora_grouped_term(h, offsets_E, w2_lora, dtype);
  if (b2.defined()) y = y + cast(b2, dtype).index_select(0, expert_of_R);
  return y;
}

torch::Tensor ExpertsImpl::forward(const torch::Tensor& rows_RD, const torch::Tensor& counts_E,
                                   std::optional<torch::ScalarType> compute_dtype,
                                   const std::vector<int64_t>* counts_on_host) const {
  TORCH_CHECK(rows_RD.dim() == 2 && rows_RD.size(1) == w1.size(1), "[moe] experts expect (R, ", w1.size(1),
              ") rows, got ", rows_RD.sizes());
  TORCH_CHECK(counts_E.dim() == 1 && counts_E.size(0) == w1.size(0), "[moe] experts expect (", w1.size(0),
              ",) counts, got ", counts_E.sizes());
  if (resolved_impl(rows_RD, compute_dtype) == "grouped_mm") {
    TORCH_CHECK(grouped_supported(rows_RD, compute_dtype), "[moe] model.moe.experts_impl = grouped_mm needs ",
                "16-byte aligned rows (d_model and expert_hidden times the element size) and, on CUDA, bf16");
    return forward_grouped(rows_RD, counts_E, compute_dtype);
  }
  return forward_sliced(rows_RD, counts_E, compute_dtype, counts_on_host);
}

MoEImpl::MoEImpl(const config::MoEConfig& cfg, int d_model, ExpertShard shard) : cfg_(cfg), shard_(shard) {
  TORCH_CHECK(shard_.ranks >= 1 && shard_.rank >= 0 && shard_.rank < shard_.ranks, "[moe] expert shard ", shard_.rank,
              " of ", shard_.ranks, " is not a shard");
  TORCH_CHECK(cfg.n_experts % shard_.ranks == 0, "[moe] model.moe.n_experts = ", cfg.n_experts,
              " is not divisible by parallel.expert_parallel = ", shard_.ranks);
  router = register_module("router", Router(cfg, d_model));
  experts = register_module(
      "experts", Experts(cfg.n_experts / shard_.ranks, d_model, cfg.expert_hidden, cfg.experts_impl, cfg.activation,
                         cfg.expert_bias));
  if (cfg.n_shared_experts > 0)
    shared = register_module("shared", SwiGLU(d_model, cfg.n_shared_experts * config::shared_hidden(cfg)));
}

MoEOutput MoEImpl::forward(const torch::Tensor& x_TD, int64_t seq_len,
                           std::optional<torch::ScalarType> compute_dtype) const {
  RoutingPlan plan = router->route(x_TD, seq_len);                                            // 1. route
  std::optional<int64_t> capacity;
  if (cfg_.capacity_factor)
    capacity = expert_capacity(*cfg_.capacity_factor, x_TD.size(0), cfg_.top_k, cfg_.n_experts);
  TORCH_CHECK(dispatcher_ || shard_.ranks == 1, "[moe] this layer holds experts of shard ", shard_.rank, " of ",
              shard_.ranks, " but no expert-parallel dispatcher was installed (dist::parallelize)");
  Dispatched dispatched = sort_copies(plan, x_TD.size(0), capacity);                         // 2. dispatch
  torch::Tensor out_TD;
  if (dispatcher_) {  // 2-4 across the ranks: rows out, experts, weighted sums back
    out_TD = dispatcher_->run(*experts, x_TD, dispatched.handle, copy_weights(dispatched.handle, plan), compute_dtype);
  } else {
    std::optional<std::vector<int64_t>> counts;  // read here only with a capacity
    const DispatchHandle handle = kept_copies(dispatched.handle, counts);
    dispatched.rows_RD = gather_rows(x_TD, handle.token_ids_R, handle.order_R, cfg_.top_k);
    auto y_RD = experts->forward(dispatched.rows_RD, handle.counts_E, compute_dtype,          // 3. experts
                                 counts ? &*counts : nullptr);
    out_TD = combine(y_RD, handle, plan);                                                       // 4. combine
  }
  if (shared) out_TD = out_TD + shared->forward(x_TD, compute_dtype);                         // 5. shared experts

  MoEOutput out;
  out.out_TD = out_TD;
  out.stats = plan.stats;
  out.stats.dropped = dispatched.dropped;
  out.balance_loss = cfg_.aux_loss_coef * plan.stats.aux_loss + cfg_.seq_aux_loss_coef * plan.stats.seq_aux_loss +
                     cfg_.z_loss_coef * plan.stats.z_loss;
  return out;
}

}  // namespace moetrain::moe
