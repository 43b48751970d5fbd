// The MoE transformer, its seeded name-keyed initialization and its parameter counts.
#include "model/transformer.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <set>

#include "common/errors.h"

namespace moetrain::model {

namespace {

// MLA rotates only its qk_rope_head_dim dimensions; GQA the whole head or its first model.rotary_dim.
Rope make_rope(const config::ModelConfig& cfg, torch::Device device) {
  return Rope::make(cfg.max_seq_len, config::rotary_dim(cfg), cfg.rope_theta, device, cfg.yarn);
}
}  // namespace

BlockImpl::BlockImpl(const config::ModelConfig& cfg, bool is_moe, moe::ExpertShard shard, int layer) {
  attn_norm = register_module("attn_norm", RMSNorm(cfg.d_model, cfg.norm_eps));
  if (cfg.attention == "mla")
    mla = register_module("attn", MLAttention(cfg));
  else
    attn = register_module("attn", Attention(cfg, config::attention_window(cfg, layer)));
  ffn_norm = register_module("ffn_norm", RMSNorm(cfg.d_model, cfg.norm_eps));
  if (is_moe && cfg.moe.shared_gate && cfg.moe.n_shared_experts > 0) {
    auto routed_only = cfg.moe;
    routed_only.n_shared_experts = 0;
    moe = register_module("moe", moe::MoE(routed_only, cfg.d_model, shard));
    gated_shared = moe->register_module(
        "shared", moe::SwiGLU(cfg.d_model, cfg.moe.n_shared_experts * config::shared_hidden(cfg.moe)));
    shared_gate = moe->register_parameter("shared_gate", torch::empty({cfg.d_model}));
  } else if (is_moe) {
    moe = register_module("moe", moe::MoE(cfg.moe, cfg.d_model, shard));
  } else
    mlp = register_module("mlp", moe::SwiGLU(cfg.d_model, cfg.dense_hidden));
}

BlockOutput BlockImpl::forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                               const TokenLayout& layout) const {
  auto normed = attn_norm->forward(x_BSD);
  auto a = attn ? attn->forward(normed, rope, compute_dtype, layout) : mla->forward(normed, rope, compute_dtype, layout);
  return feed_forward(x_BSD + a.to(x_BSD.scalar_type()), compute_dtype);
}

torch::Tensor BlockImpl::decode(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                                const DecodeStep& step, LayerCache& cache) const {
  auto normed = attn_norm->forward(x_BSD);
  auto a = attn ? attn->decode(normed, rope, compute_dtype, step, cache)
                : mla->decode(normed, rope, compute_dtype, step, cache);
  return feed_forward(x_BSD + a.to(x_BSD.scalar_type()), compute_dtype).x_BSD;
}

BlockOutput BlockImpl::feed_forward(const torch::Tensor& x, ComputeDtype compute_dtype) const {
  auto h = ffn_norm->forward(x);
  if (!moe) return {x + mlp->forward(h, compute_dtype).to(x.scalar_type()), std::nullopt};
  const auto B = h.size(0), S = h.size(1), D = h.size(2);
  auto out = moe->forward(h.reshape({B * S, D}), S, compute_dtype);
  auto y_TD = out.out_TD;
  if (gated_shared) {
    auto h_TD = cast(h.reshape({B * S, D}), compute_dtype);
    auto gate_T1 = torch::sigmoid(torch::matmul(h_TD, cast(shared_gate, compute_dtype)).unsqueeze(1));
    y_TD = y_TD + gate_T1 * gated_shared->forward(h_TD, compute_dtype);
  }
  auto y = y_TD.view({B, S, D}).to(x.scalar_type());
  return {x + y, std::move(out)};
}

MTPModuleImpl::MTPModuleImpl(const config::ModelConfig& cfg, moe::ExpertShard shard, int depth) {
  enorm = register_module("enorm", RMSNorm(cfg.d_model, cfg.norm_eps));
  hnorm = register_module("hnorm", RMSNorm(cfg.d_model, cfg.norm_eps));
  eh_proj = register_parameter("eh_proj", torch::empty({2 * int64_t(cfg.d_model), cfg.d_model}));
  block = register_module("block", Block(cfg, /*is_moe=*/cfg.n_layers > cfg.dense_layers, shard, cfg.n_layers + depth - 1));
  norm = register_module("norm", RMSNorm(cfg.d_model, cfg.norm_eps));
}

TransformerImpl::TransformerImpl(const config::ModelConfig& cfg, moe::ExpertShard shard, LayerRange range)
    : cfg_(cfg), ep_size_(shard.ranks), range_(range) {
  if (range_.end < 0) range_.end = cfg.n_layers;
  if (range_.first < 0 || range_.first >= range_.end || range_.end > cfg.n_layers)
    throw ConfigError("pipeline stage of blocks [" + std::to_string(range_.first) + ", " + std::to_string(range_.end) +
                      ") is not a non-empty range of model.n_layers = " + std::to_string(cfg.n_layers));
  if (shard.ranks < 1 || shard.rank < 0 || shard.rank >= shard.ranks || cfg.moe.n_experts % shard.ranks != 0)
    throw ConfigError("expert shard " + std::to_string(shard.rank) + " of " + std::to_string(shard.ranks) +
                      " does not split model.moe.n_experts = " + std::to_string(cfg.moe.n_experts));
  expert_offset_ = int64_t(shard.rank) * (cfg.moe.n_experts / shard.ranks);
  if (cfg.mtp_depth < 0) throw ConfigError("model.mtp_depth = " + std::to_string(cfg.mtp_depth) + " must be >= 0");
  // The last stage looks tokens up for its MTP modules: without a tied head, its copy of the embedding
  // is tied across the stages like a tied head (roled_parameters).
  if (first_stage() || (last_stage() && (cfg.tie_embeddings || cfg.mtp_depth > 0)))
    embed = register_parameter("embed", torch::empty({cfg.vocab_size, cfg.d_model}));
  layers = register_module("layers", std::make_shared<torch::nn::Module>());
  for (int i = range_.first; i < range_.end; ++i) {
    blocks.push_back(Block(cfg, /*is_moe=*/i >= cfg.dense_layers, shard, i));
    layers->register_module(std::to_string(i), blocks.back());
  }
  if (last_stage()) {
    final_norm = register_module("final_norm", RMSNorm(cfg.d_model, cfg.norm_eps));
    if (!cfg.tie_embeddings) lm_head = register_parameter("lm_head", torch::empty({cfg.vocab_size, cfg.d_model}));
    if (cfg.mtp_depth > 0) {
      mtp = register_module("mtp", std::make_shared<torch::nn::Module>());
      for (int k = 0; k < cfg.mtp_depth; ++k) {
        mtp_modules.push_back(MTPModule(cfg, shard, k + 1));
        mtp->register_module(std::to_string(k), mtp_modules.back());
      }
    }
  }
  rope_ = make_rope(cfg, torch::kCPU);
}

namespace {

// The block's parameters that take gradients (a LoRA run's base is frozen).
std::vector<torch::Tensor> trainable(const BlockImpl& block) {
  std::vector<torch::Tensor> out;
  for (const auto& p : block.parameters())
    if (p.requires_grad()) out.push_back(p);
  return out;
}

// A compute dtype as an autograd context stores it (an int64; -1 for fp32) and back.
int64_t dtype_code(ComputeDtype dtype) { return dtype ? int64_t(*dtype) : int64_t(-1); }
ComputeDtype dtype_of(int64_t code) { return code < 0 ? ComputeDtype{} : ComputeDtype{torch::ScalarType(code)}; }

// train.activation_checkpointing: full. The block's forward runs without keeping its activations;
// backward runs it again from its saved input and takes the gradients of that recomputation. The
// same ops on the same values give the same routing and, with a capacity, the same drops; under
// expert parallelism every rank recomputes the same blocks in the same order, so the recomputation
// posts the same collectives on every rank. Outputs: the block's output, its MoE balance loss, and the
// router's statistics (not differentiable). Packed documents' positions and mask are kept with the
// input (the layout the forward was given is gone by backward).
struct CheckpointedBlock : torch::autograd::Function<CheckpointedBlock> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x_BSD,
                                                at::TensorList params, const BlockImpl* block, const Rope* rope,
                                                int64_t compute_dtype, const TokenLayout& layout) {
    ctx->save_for_backward({x_BSD});
    ctx->saved_data["block"] = int64_t(reinterpret_cast<intptr_t>(block));
    ctx->saved_data["rope"] = int64_t(reinterpret_cast<intptr_t>(rope));
    ctx->saved_data["dtype"] = compute_dtype;
    ctx->saved_data["params"] = int64_t(params.size());
    if (layout.is_packed()) {
      ctx->saved_data["positions"] = layout.positions_BS;
      if (layout.mask_B1SS.defined()) ctx->saved_data["mask"] = layout.mask_B1SS;
      if (layout.cu_seqlens.defined()) ctx->saved_data["cu_seqlens"] = layout.cu_seqlens;
      ctx->saved_data["max_length"] = layout.max_length;
    }
    torch::NoGradGuard no_grad;
    auto out = block->forward(x_BSD, *rope, dtype_of(compute_dtype), layout);
    if (!out.moe) {
      auto none = torch::zeros({}, x_BSD.options().dtype(torch::kFloat));
      ctx->mark_non_differentiable({none});
      return {out.x_BSD, none};
    }
    const auto& st = out.moe->stats;
    torch::autograd::variable_list stats = {st.aux_loss.detach().clone(), st.seq_aux_loss.detach().clone(),
                                            st.z_loss.detach().clone(),   st.entropy.detach().clone(),
                                            st.tokens_per_expert_E.clone(), st.dropped.clone()};
    ctx->mark_non_differentiable(stats);
    torch::autograd::variable_list result = {out.x_BSD, out.moe->balance_loss};
    result.insert(result.end(), stats.begin(), stats.end());
    return result;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto* block = reinterpret_cast<const BlockImpl*>(intptr_t(ctx->saved_data["block"].toInt()));
    const auto* rope = reinterpret_cast<const Rope*>(intptr_t(ctx->saved_data["rope"].toInt()));
    const int64_t n_params = ctx->saved_data["params"].toInt();
    auto x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    const auto params = trainable(*block);
    TokenLayout layout;
    if (ctx->saved_data.count("positions")) {
      layout.positions_BS = ctx->saved_data["positions"].toTensor();
      if (ctx->saved_data.count("mask")) layout.mask_B1SS = ctx->saved_data["mask"].toTensor();
      if (ctx->saved_data.count("cu_seqlens")) layout.cu_seqlens = ctx->saved_data["cu_seqlens"].toTensor();
      layout.max_length = ctx->saved_data["max_length"].toInt();
    }
    torch::AutoGradMode enable(true);
    auto out = block->forward(x, *rope, dtype_of(ctx->saved_data["dtype"].toInt()), layout);
    torch::autograd::variable_list outputs = {out.x_BSD}, upstream = {grads[0]};
    if (out.moe && grads[1].defined()) outputs.push_back(out.moe->balance_loss), upstream.push_back(grads[1]);
    torch::autograd::variable_list inputs = {x};
    inputs.insert(inputs.end(), params.begin(), params.end());
    auto got = torch::autograd::grad(outputs, inputs, upstream, /*retain_graph=*/false, /*create_graph=*/false,
                                     /*allow_unused=*/true);
    TORCH_CHECK(int64_t(got.size()) == 1 + n_params, "[model] activation checkpointing: the block's parameters changed");
    got.resize(got.size() + 4);  // the block, rope, dtype and layout arguments take no gradient
    return got;
  }
};

}  // namespace

BlockOutput TransformerImpl::checkpointed(const BlockImpl& block, const torch::Tensor& x_BSD, const Rope& rope,
                                          ComputeDtype compute_dtype, const TokenLayout& layout) const {
  const auto params = trainable(block);
  const auto r = CheckpointedBlock::apply(x_BSD, at::TensorList(params), &block, &rope,
                                          dtype_code(compute_dtype), layout);
  BlockOutput out{r[0], std::nullopt};
  if (block.moe) {
    moe::MoEOutput m;
    m.balance_loss = r[1];
    m.stats.aux_loss = r[2];
    m.stats.seq_aux_loss = r[3];
    m.stats.z_loss = r[4];
    m.stats.entropy = r[5];
    m.stats.tokens_per_expert_E = r[6];
    m.stats.dropped = r[7];
    out.moe = std::move(m);
  }
  return out;
}

ForwardOutput TransformerImpl::forward(const torch::Tensor& tokens_BS, const torch::Tensor& positions_BS) const {
  ForwardOutput out = forward_hidden(tokens_BS, positions_BS);
  auto head = lm_head.defined() ? lm_head : embed;
  auto logits = torch::matmul(cast(out.hidden_BSD, compute_dtype_), cast(head, compute_dtype_).t());
  out.logits_BSV = logits.to(torch::promote_types(logits.scalar_type(), torch::kFloat));
  out.hidden_BSD = torch::Tensor();
  return out;
}

ForwardOutput TransformerImpl::forward_hidden(const torch::Tensor& tokens_BS, const torch::Tensor& positions_BS) const {
  TORCH_CHECK(first_stage() && last_stage(), "[model] forward of the whole model on pipeline stage of blocks [",
              range_.first, ", ", range_.end, "): use forward_stage");
  ForwardOutput out;
  out.hidden_BSD = final_norm->forward(run_blocks(embed_tokens(tokens_BS), layout_of(positions_BS, tokens_BS.device()), out));
  return out;
}

KVCache TransformerImpl::new_cache(int64_t batch, int64_t capacity, const std::vector<int64_t>& start_B) const {
  TORCH_CHECK(first_stage() && last_stage(), "[model] decoding needs the whole model, not pipeline stage of blocks [",
              range_.first, ", ", range_.end, ")");
  if (capacity < 1 || capacity > cfg_.max_seq_len)
    throw Error("[model] a KV cache of " + std::to_string(capacity) + " positions: it must hold 1 to model.max_seq_len = " +
                     std::to_string(cfg_.max_seq_len) + " positions (prompt plus new tokens)");
  if (!start_B.empty() && int64_t(start_B.size()) != batch)
    throw Error("[model] a KV cache of " + std::to_string(batch) + " rows given " + std::to_string(start_B.size()) +
                     " padding lengths");
  KVCache cache;
  cache.layers.resize(blocks.size());
  cache.capacity = capacity;
  auto starts = start_B.empty() ? torch::zeros({batch}, torch::kLong) : torch::tensor(start_B, torch::kLong);
  cache.start_B = starts.to(embed.device());
  return cache;
}

torch::Tensor TransformerImpl::decode(const torch::Tensor& tokens_BS, KVCache& cache) const {
  const int64_t B = tokens_BS.size(0), S = tokens_BS.size(1), L = cache.length + S;
  TORCH_CHECK(cache.start_B.defined() && cache.start_B.size(0) == B, "[model] decode: ", B,
              " rows of tokens for a cache of ", cache.start_B.defined() ? cache.start_B.size(0) : 0, " rows");
  if (L > cache.capacity)
    throw Error("[model] the KV cache holds " + std::to_string(cache.capacity) + " positions; " + std::to_string(L) +
                     " were asked for");
  const auto device = embed.device();
  DecodeStep step;
  step.start = cache.length;
  step.capacity = cache.capacity;
  // Slot i of row b holds position i - start_b; new token i attends to slots j <= i of its own tokens,
  // a padding slot to itself alone.
  const auto opts = torch::TensorOptions().dtype(torch::kLong).device(device);
  const auto slot_S = torch::arange(cache.length, L, opts), slot_L = torch::arange(L, opts);
  const auto start_B11 = cache.start_B.view({B, 1, 1});
  step.positions_BS = (slot_S.unsqueeze(0) - cache.start_B.unsqueeze(1)).clamp_min(0);
  const auto i_11S1 = slot_S.view({1, 1, S, 1}), j_111L = slot_L.view({1, 1, 1, L});
  step.mask_B1SL = ((j_111L <= i_11S1) & (j_111L >= start_B11.unsqueeze(3))) | (j_111L == i_11S1);
  auto x = embed_tokens(tokens_BS.to(device));
  for (size_t i = 0; i < blocks.size(); ++i) x = blocks[i]->decode(x, rope_, compute_dtype_, step, cache.layers[i]);
  cache.length = L;
  auto hidden_BD = final_norm->forward(x.select(1, S - 1));
  const auto& head = lm_head.defined() ? lm_head : embed;
  auto logits = torch::matmul(cast(hidden_BD, compute_dtype_), cast(head, compute_dtype_).t());
  return logits.to(torch::promote_types(logits.scalar_type(), torch::kFloat));
}

TokenLayout TransformerImpl::layout_of(const torch::Tensor& positions_BS, torch::Device device) const {
  const bool half = compute_dtype_ && (*compute_dtype_ == torch::kBFloat16 || *compute_dtype_ == torch::kHalf);
  return TokenLayout::packed(positions_BS, device, /*varlen=*/half);
}

torch::Tensor TransformerImpl::embed_tokens(const torch::Tensor& tokens_BS) const {
  TORCH_CHECK(tokens_BS.dim() == 2 && tokens_BS.scalar_type() == torch::kLong,
              "[model] tokens must be (B, S) int64, got ", tokens_BS.sizes(), " ", tokens_BS.scalar_type());
  return embed.index_select(0, tokens_BS.reshape(-1)).view({tokens_BS.size(0), tokens_BS.size(1), cfg_.d_model});
}

torch::Tensor TransformerImpl::run_blocks(torch::Tensor x, const TokenLayout& layout, ForwardOutput& out) const {
  out.balance_loss = torch::zeros({}, x.options().dtype(torch::promote_types(x.scalar_type(), torch::kFloat)));
  const bool recompute = activation_checkpointing_ && torch::GradMode::is_enabled();
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& layer = *blocks[i];
    auto block = recompute ? checkpointed(layer, x, rope_, compute_dtype_, layout)
                           : layer.forward(x, rope_, compute_dtype_, layout);
    x = block.x_BSD;
    add_moe(block, range_.first + int(i), out);
  }
  return x;
}

void TransformerImpl::add_moe(const BlockOutput& block, int layer, ForwardOutput& out) const {
  if (!block.moe) return;
  out.balance_loss = out.balance_loss + block.moe->balance_loss;
  out.moe_stats.push_back(block.moe->stats);
  out.moe_layers.push_back(layer);
}

namespace {

// The LM head and the loss over one chunk of rows, exactly as forward() and token_cross_entropy
// compute them for those rows: the summed loss of the chunk's kept targets.
torch::Tensor chunk_loss_sum(const torch::Tensor& hidden_cD, const torch::Tensor& head_VD, const torch::Tensor& targets_c,
                            int64_t ignore_index, ComputeDtype compute_dtype) {
  auto logits = torch::matmul(cast(hidden_cD, compute_dtype), cast(head_VD, compute_dtype).t());
  logits = logits.to(torch::promote_types(logits.scalar_type(), torch::kFloat));
  return token_cross_entropy(logits, targets_c, ignore_index, /*sum=*/true);
}

// sum over chunks of head_loss_sum, whose backward recomputes each chunk's logits (one chunk's at a
// time) and takes that chunk's gradients by autograd, so they are the unchunked graph's, chunk by chunk.
struct ChunkedHeadLoss : torch::autograd::Function<ChunkedHeadLoss> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& hidden_ND,
                               const torch::Tensor& head_VD, const torch::Tensor& targets_N, int64_t ignore_index,
                               int64_t chunk, ComputeDtype compute_dtype) {
    ctx->save_for_backward({hidden_ND, head_VD, targets_N});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["chunk"] = chunk;
    ctx->saved_data["dtype"] = dtype_code(compute_dtype);
    torch::NoGradGuard no_grad;
    auto total = torch::zeros({}, hidden_ND.options().dtype(torch::kFloat));
    for (int64_t start = 0; start < hidden_ND.size(0); start += chunk) {
      const int64_t n = std::min(chunk, hidden_ND.size(0) - start);
      total += chunk_loss_sum(hidden_ND.narrow(0, start, n), head_VD, targets_N.narrow(0, start, n), ignore_index,
                             compute_dtype);
    }
    return total;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& hidden_ND = saved[0];
    const auto& targets_N = saved[2];
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt(), chunk = ctx->saved_data["chunk"].toInt();
    const ComputeDtype compute_dtype = dtype_of(ctx->saved_data["dtype"].toInt());
    const bool head_grad = ctx->needs_input_grad(1);  // not for a LoRA run's frozen head
    auto head_VD = saved[1].detach().requires_grad_(head_grad);
    auto grad_hidden = torch::empty_like(hidden_ND);
    torch::Tensor grad_head;
    torch::AutoGradMode enable(true);
    for (int64_t start = 0; start < hidden_ND.size(0); start += chunk) {
      const int64_t n = std::min(chunk, hidden_ND.size(0) - start);
      auto hidden_cD = hidden_ND.narrow(0, start, n).detach().requires_grad_(true);
      auto loss = chunk_loss_sum(hidden_cD, head_VD, targets_N.narrow(0, start, n), ignore_index, compute_dtype);
      auto g = head_grad ? torch::autograd::grad({loss}, {hidden_cD, head_VD}, {grads[0]})
                         : torch::autograd::grad({loss}, {hidden_cD}, {grads[0]});
      grad_hidden.narrow(0, start, n).copy_(g[0]);
      if (!head_grad) continue;
      // Summed in fp32 whatever dtype the head is held in: a head kept in bf16 (ZeRO-1's sharded masters)
      // gets each chunk's bf16 gradient added as zero 0's fp32 head does, not rounded to bf16 per chunk.
      auto chunk_grad = g[1].to(torch::promote_types(g[1].scalar_type(), torch::kFloat));
      grad_head = grad_head.defined() ? grad_head + chunk_grad : chunk_grad;
    }
    return {grad_hidden, grad_head, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

ForwardOutput TransformerImpl::forward_loss(const torch::Tensor& tokens_BS, const torch::Tensor& targets_BS,
                                            int64_t ignore_index, bool sum, bool with_mtp,
                                            const torch::Tensor& positions_BS) const {
  TORCH_CHECK(first_stage() && last_stage(), "[model] forward_loss of the whole model on pipeline stage of blocks [",
              range_.first, ", ", range_.end, "): use forward_stage");
  return forward_stage(tokens_BS, targets_BS, ignore_index, sum, with_mtp, /*tokens_BS=*/{}, positions_BS);
}

ForwardOutput TransformerImpl::forward_stage(const torch::Tensor& input, const torch::Tensor& targets_BS,
                                             int64_t ignore_index, bool sum, bool with_mtp,
                                             const torch::Tensor& tokens_BS, const torch::Tensor& positions_BS) const {
  ForwardOutput out;
  const auto layout = layout_of(positions_BS, input.device());
  auto x = run_blocks(first_stage() ? embed_tokens(input) : input, layout, out);
  if (!last_stage()) {
    out.hidden_BSD = x;
    return out;
  }
  head_and_loss(x, targets_BS, ignore_index, sum, out);
  if (with_mtp && !mtp_modules.empty()) {
    const auto& tokens = first_stage() ? input : tokens_BS;
    TORCH_CHECK(tokens.defined(), "[model] the last pipeline stage runs the MTP modules: forward_stage needs tokens_BS");
    mtp_losses(x, tokens, targets_BS, ignore_index, sum, layout, out);
  }
  return out;
}

torch::Tensor TransformerImpl::head_loss_sum(const torch::Tensor& hidden_ND, const torch::Tensor& targets_N,
                                             int64_t ignore_index) const {
  const auto& head = lm_head.defined() ? lm_head : embed;
  if (loss_chunk_ > 0) return ChunkedHeadLoss::apply(hidden_ND, head, targets_N, ignore_index, loss_chunk_, compute_dtype_);
  return chunk_loss_sum(hidden_ND, head, targets_N, ignore_index, compute_dtype_);
}

void TransformerImpl::mtp_losses(const torch::Tensor& x_BSD, const torch::Tensor& tokens_BS,
                                 const torch::Tensor& targets_BS, int64_t ignore_index, bool sum,
                                 const TokenLayout& layout, ForwardOutput& out) const {
  const int64_t S = x_BSD.size(1);
  TORCH_CHECK(tokens_BS.sizes() == targets_BS.reshape(tokens_BS.sizes()).sizes() && tokens_BS.size(1) == S,
              "[model] MTP: tokens ", tokens_BS.sizes(), " and targets must be (B, S) with S = ", S);
  const auto targets = targets_BS.reshape(tokens_BS.sizes());
  const bool recompute = activation_checkpointing_ && torch::GradMode::is_enabled();
  torch::Tensor h = x_BSD, total;
  for (size_t d = 0; d < mtp_modules.size(); ++d) {
    const int64_t k = int64_t(d) + 1, n = S - k;  // depth k predicts token i+k+1 at positions i < S - k
    TORCH_CHECK(n > 0, "[model] MTP depth ", k, " needs sequences longer than ", k, " tokens, got ", S);
    const auto& m = *mtp_modules[d];
    auto emb = embed_tokens(tokens_BS.narrow(1, k, n).contiguous());
    auto joined = torch::cat({m.enorm->forward(emb), m.hnorm->forward(h.narrow(1, 0, n))}, -1);
    auto x = torch::matmul(cast(joined, compute_dtype_), cast(m.eh_proj, compute_dtype_)).to(h.scalar_type());
    // Packed documents: the window's first n tokens keep their documents; token i+k+1 is predicted
    // only where token i+k is in token i's document (positions k apart), so no depth reads across one.
    const auto window = layout.first(n);
    auto block = recompute ? checkpointed(*m.block, x, rope_, compute_dtype_, window)
                           : m.block->forward(x, rope_, compute_dtype_, window);
    add_moe(block, cfg_.n_layers + int(d), out);
    h = block.x_BSD;
    auto targets_Bn = targets.narrow(1, k, n);
    if (layout.is_packed()) {
      const auto& positions = layout.positions_BS;
      const auto same_document = positions.narrow(1, k, n) == positions.narrow(1, 0, n) + k;
      targets_Bn = targets_Bn.masked_fill(same_document.logical_not(), ignore_index);
    }
    const auto targets_N = targets_Bn.reshape(-1);
    auto loss = head_loss_sum(m.norm->forward(h).reshape({-1, cfg_.d_model}), targets_N, ignore_index);
    // A depth whose window holds no learned target adds nothing (not 0/0).
    if (!sum) loss = loss / targets_N.ne(ignore_index).sum().clamp_min(1);
    out.mtp_losses.push_back(loss);
    total = total.defined() ? total + loss : loss;
  }
  out.mtp_loss = total * (cfg_.mtp_loss_weight / double(mtp_modules.size()));
}

void TransformerImpl::head_and_loss(const torch::Tensor& x_BSD, const torch::Tensor& targets_BS, int64_t ignore_index,
                                    bool sum, ForwardOutput& out) const {
  auto hidden = final_norm->forward(x_BSD);
  const auto& head = lm_head.defined() ? lm_head : embed;
  if (loss_chunk_ <= 0) {
    auto logits = torch::matmul(cast(hidden, compute_dtype_), cast(head, compute_dtype_).t());
    out.logits_BSV = logits.to(torch::promote_types(logits.scalar_type(), torch::kFloat));
    out.loss = token_cross_entropy(out.logits_BSV.view({-1, out.logits_BSV.size(-1)}), targets_BS.reshape(-1),
                                   ignore_index, sum);
    return;
  }
  out.loss = chunked_loss(hidden.reshape({-1, cfg_.d_model}), targets_BS.reshape(-1), ignore_index, loss_chunk_, sum);
}

bool TransformerImpl::held_by_another_stage(const std::string& name) const {
  if (first_stage() && last_stage()) return false;
  const std::string prefix = "layers.";
  if (name.rfind(prefix, 0) == 0) {
    const auto dot = name.find('.', prefix.size());
    int index = -1;
    const char* begin = name.data() + prefix.size();
    const char* end = name.data() + (dot == std::string::npos ? name.size() : dot);
    const auto [ptr, ec] = std::from_chars(begin, end, index);
    if (ec != std::errc() || ptr != end) return false;
    return index < range_.first || index >= range_.end;
  }
  if (name == "embed") return !embed.defined();
  if (name == "lm_head") return !last_stage() && !cfg_.tie_embeddings;
  if (name.rfind("final_norm.", 0) == 0 || name.rfind("mtp.", 0) == 0) return !last_stage();
  return false;
}

torch::Tensor TransformerImpl::chunked_loss(const torch::Tensor& hidden_ND, const torch::Tensor& targets_N,
                                            int64_t ignore_index, int64_t chunk, bool sum) const {
  TORCH_CHECK(chunk > 0, "[model] chunked_loss needs a positive chunk, got ", chunk);
  const auto& head = lm_head.defined() ? lm_head : embed;
  auto total = ChunkedHeadLoss::apply(hidden_ND, head, targets_N, ignore_index, chunk, compute_dtype_);
  return sum ? total : total / targets_N.ne(ignore_index).sum();
}

namespace {
uint64_t fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}
uint64_t splitmix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
torch::Tensor seeded_normal(at::IntArrayRef shape, double std, uint64_t seed, const std::string& key) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(splitmix(seed ^ fnv1a(key)));
  return torch::empty(shape, torch::kFloat).normal_(0.0, std, gen);
}
torch::Tensor seeded_uniform(at::IntArrayRef shape, double bound, uint64_t seed, const std::string& key) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(splitmix(seed ^ fnv1a(key)));
  return torch::empty(shape, torch::kFloat).uniform_(-bound, bound, gen);
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

void TransformerImpl::set_activation_checkpointing(const std::string& mode) {
  TORCH_CHECK(mode == "none" || mode == "full" || mode == "selective", "[model] activation checkpointing '", mode,
              "' is not none, full or selective");
  activation_checkpointing_ = mode == "full";
  const bool selective = mode == "selective";
  for (const auto& module : modules(/*include_self=*/false)) {
    if (auto* norm = module->as<RMSNormImpl>()) norm->recompute = selective;
    if (auto* mlp = module->as<moe::SwiGLUImpl>()) mlp->recompute_elementwise = selective;
    if (auto* experts = module->as<moe::ExpertsImpl>()) experts->recompute_elementwise = selective;
  }
}

int mtp_module_of(const std::string& name) {
  const std::string prefix = "mtp.";
  if (name.rfind(prefix, 0) != 0) return -1;
  int k = -1;
  const char* begin = name.data() + prefix.size();
  const auto [ptr, ec] = std::from_chars(begin, name.data() + name.size(), k);
  return ec == std::errc() && ptr != begin && *ptr == '.' ? k : -1;
}

namespace {
// A routed expert's gate/up/down bias (model.moe.expert_bias), stacked (E, F) or (E, D).
bool is_expert_bias(const std::string& name) {
  return ends_with(name, "experts.b1") || ends_with(name, "experts.b3") || ends_with(name, "experts.b2");
}
}  // namespace

bool is_no_decay(const std::string& name) {
  return name.find("norm") != std::string::npos || ends_with(name, "bias") || is_expert_bias(name) ||
         ends_with(name, ".sinks") || name == "embed";
}

void TransformerImpl::init_weights(uint64_t seed) {
  torch::NoGradGuard no_grad;
  // Output projections of residual branches are scaled down by sqrt(2 * n_layers) (GPT-2).
  const double out_std = cfg_.init_std / std::sqrt(2.0 * cfg_.n_layers);
  for (auto& p : roled_parameters()) {
    const std::string& name = p.name;
    auto& w = p.tensor;
    if (moe::is_lora_name(name)) continue;  // init_lora below
    torch::Tensor value;
    if (name.find("norm") != std::string::npos) {
      value = torch::ones(w.sizes(), torch::kFloat);
    } else if (ends_with(name, "_bias") || ends_with(name, "router.bias") || is_expert_bias(name)) {
      // attention, router-logit and expert biases start at zero: the model starts as it would without them
      value = torch::zeros(w.sizes(), torch::kFloat);
    } else if (ends_with(name, ".attn.sinks")) {
      // Zero: each head starts with one unit of sink mass, the same for every head (HF draws them from
      // normal(init_std), a perturbation of that size); the heads already differ through their projections.
      value = torch::zeros(w.sizes(), torch::kFloat);
    } else {
      const bool is_out = ends_with(name, ".wo") || ends_with(name, ".w2");
      const double std = is_out ? out_std : cfg_.init_std;
      if (p.role == ParamRole::expert) {  // one draw per global expert id
        std::vector<torch::Tensor> slices;
        for (int64_t e = 0; e < w.size(0); ++e)
          slices.push_back(
              seeded_normal(w.sizes().slice(1), std, seed, name + "[" + std::to_string(expert_offset_ + e) + "]"));
        value = torch::stack(slices);
      } else {
        value = seeded_normal(w.sizes(), std, seed, name);
      }
    }
    w.copy_(value);
  }
  if (lora_enabled()) init_lora(seed);
}

void TransformerImpl::add_lora(const config::LoraConfig& cfg, uint64_t seed) {
  TORCH_CHECK(!lora_enabled(), "[model] add_lora: the model has adapters already");
  if (cfg.rank <= 0) return;
  auto has = [&](const char* target) { return std::find(cfg.targets.begin(), cfg.targets.end(), target) != cfg.targets.end(); };
  std::vector<BlockImpl*> all;
  for (auto& block : blocks) all.push_back(block.get());
  for (auto& m : mtp_modules) all.push_back(m->block.get());
  for (auto* block : all) {
    if (block->attn) block->attn->add_lora(cfg);
    if (block->mla) block->mla->add_lora(cfg);
    if (block->mlp && has("dense_mlp")) block->mlp->add_lora(cfg);
    if (block->moe && has("experts")) block->moe->experts->add_lora(cfg);
    if (block->moe && block->moe->shared && has("shared_experts")) block->moe->shared->add_lora(cfg);
    if (block->gated_shared && has("shared_experts")) block->gated_shared->add_lora(cfg);
  }
  lora_ = cfg;
  lora_seed_ = seed;
  int64_t adapters = 0;
  for (auto& p : named_parameters()) {
    const bool adapter = moe::is_lora_name(p.key());
    adapters += adapter;
    p.value().requires_grad_(adapter);
  }
  if (adapters == 0) {
    std::string list;
    for (const auto& t : cfg.targets) list += (list.empty() ? "" : ", ") + t;
    throw ConfigError("train.lora.targets [" + list + "] match no weight of this model" +
                      (first_stage() && last_stage() ? std::string() : " stage") +
                      " (attention " + cfg_.attention + ", " + std::to_string(cfg_.dense_layers) + " dense and " +
                      std::to_string(cfg_.n_layers - cfg_.dense_layers) + " MoE blocks)");
  }
  init_lora(seed);
}

void TransformerImpl::init_lora(uint64_t seed) {
  torch::NoGradGuard no_grad;
  for (auto& p : roled_parameters()) {
    if (!moe::is_lora_name(p.name)) continue;
    auto& w = p.tensor;
    if (ends_with(p.name, "_lora_b")) {  // zero: the adapted model starts as its base
      w.zero_();
      continue;
    }
    const bool expert = p.role == ParamRole::expert;
    const double bound = 1.0 / std::sqrt(double(w.size(expert ? 1 : 0)));
    torch::Tensor value;
    if (expert) {  // one draw per global expert id, as init_weights
      std::vector<torch::Tensor> slices;
      for (int64_t e = 0; e < w.size(0); ++e)
        slices.push_back(
            seeded_uniform(w.sizes().slice(1), bound, seed, p.name + "[" + std::to_string(expert_offset_ + e) + "]"));
      value = torch::stack(slices);
    } else {
      value = seeded_uniform(w.sizes(), bound, seed, p.name);
    }
    w.copy_(value);
  }
}

void TransformerImpl::update_router_bias(const std::vector<torch::Tensor>& load_LE) {
  size_t i = 0;
  std::vector<BlockImpl*> all;
  for (auto& block : blocks) all.push_back(block.get());
  for (auto& m : mtp_modules) all.push_back(m->block.get());  // after the blocks, as ForwardOutput lists them
  for (auto* block : all) {
    if (!block->moe) continue;
    TORCH_CHECK(i < load_LE.size(), "[model] update_router_bias: ", load_LE.size(), " loads for more MoE layers");
    block->moe->router->update_bias(load_LE[i++]);
  }
}

void TransformerImpl::place(torch::Device device, ComputeDtype compute_dtype) {
  to(device);
  // A LoRA run's frozen matmul weights are held in the compute dtype: no fp32 copy of the base exists.
  if (lora_enabled() && compute_dtype) {
    torch::NoGradGuard no_grad;
    for (auto& p : roled_parameters())
      if (!p.tensor.requires_grad() && p.compute_dtype_only) p.tensor.set_data(p.tensor.to(*compute_dtype));
  }
  rope_ = make_rope(cfg_, device).cached_in(compute_dtype.value_or(torch::kFloat));
  compute_dtype_ = compute_dtype;
}

ParamCounts TransformerImpl::param_counts() const {
  ParamCounts c;
  for (const auto& p : roled_parameters()) {
    const int64_t n = p.tensor.numel();
    if (p.role == ParamRole::expert) {  // this rank holds 1/ep of them
      c.total += n * ep_size_;
      c.active += n * ep_size_ / cfg_.moe.n_experts * cfg_.moe.top_k;
    } else {
      c.total += n;
      c.active += n;
    }
  }
  return c;
}

int64_t TransformerImpl::local_experts() const { return cfg_.moe.n_experts / ep_size_; }

std::vector<RoledParam> TransformerImpl::roled_parameters() const {
  std::set<const c10::TensorImpl*> experts;
  for (const auto& block : blocks)
    if (block->moe)
      for (const auto& p : block->moe->experts->parameters()) experts.insert(p.unsafeGetTensorImpl());
  for (const auto& m : mtp_modules)
    if (m->block->moe)
      for (const auto& p : m->block->moe->experts->parameters()) experts.insert(p.unsafeGetTensorImpl());
  // Two stages hold the embedding when the head is tied to it or the last stage runs MTP modules.
  const bool tied = (cfg_.tie_embeddings || cfg_.mtp_depth > 0) && !(first_stage() && last_stage());
  // Read in fp32 wherever they are used: the norms' and routers' weights, and the embedding.
  std::set<const c10::TensorImpl*> fp32_uses;
  for (const auto& m : modules(/*include_self=*/false))
    if (dynamic_cast<const RMSNormImpl*>(m.get()) || dynamic_cast<const moe::RouterImpl*>(m.get()))
      for (const auto& p : m->parameters(/*recurse=*/false)) fp32_uses.insert(p.unsafeGetTensorImpl());
  if (embed.defined()) fp32_uses.insert(embed.unsafeGetTensorImpl());
  for (const auto& m : modules(/*include_self=*/false))  // the sinks join an fp32 log-sum-exp
    if (const auto* a = dynamic_cast<const AttentionImpl*>(m.get()); a && a->sinks.defined())
      fp32_uses.insert(a->sinks.unsafeGetTensorImpl());
  // MLA's kv projections each hold two logical matrices, orthogonalised apart under Muon (as q, k and v
  // are with GQA): wkv_a the kv latent and the shared RoPE key, wkv_b each head's key and value.
  std::map<const c10::TensorImpl*, std::pair<int64_t, std::vector<int64_t>>> column_parts;
  auto add_mla = [&](const Block& block) {
    if (!block->mla) return;
    const auto& a = cfg_.mla;
    column_parts[block->mla->wkv_a.unsafeGetTensorImpl()] = {1, {a.kv_lora_rank, a.qk_rope_head_dim}};
    column_parts[block->mla->wkv_b.unsafeGetTensorImpl()] = {cfg_.n_heads, {a.qk_nope_head_dim, a.v_head_dim}};
  };
  for (const auto& block : blocks) add_mla(block);
  for (const auto& m : mtp_modules) add_mla(m->block);
  std::vector<RoledParam> out;
  for (const auto& p : named_parameters()) {
    RoledParam r{p.key(), p.value(), experts.count(p.value().unsafeGetTensorImpl()) ? ParamRole::expert : ParamRole::replicated};
    r.compute_dtype_only = !fp32_uses.count(p.value().unsafeGetTensorImpl());
    // The embedding, norms and routers are read in fp32; the head and the adapters are not hidden matrices.
    r.hidden_matrix = p.value().dim() == (r.role == ParamRole::expert ? 3 : 2) && r.compute_dtype_only &&
                      p.key() != "lm_head" && !moe::is_lora_name(p.key());
    if (const auto parts = column_parts.find(p.value().unsafeGetTensorImpl()); parts != column_parts.end()) {
      r.column_heads = parts->second.first;
      r.column_widths = parts->second.second;
    }
    if (tied && p.value().unsafeGetTensorImpl() == embed.unsafeGetTensorImpl()) {
      r.tied_across_stages = true;
      r.duplicate = !first_stage();
    }
    out.push_back(std::move(r));
  }
  return out;
}

void merge_lora(const TransformerImpl& adapted, TransformerImpl& merged) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(adapted.lora_enabled() && !merged.lora_enabled(), "[model] merge_lora: from a model with adapters into one without");
  const double scale = adapted.lora_config().alpha / double(adapted.lora_config().rank);
  auto source = adapted.named_parameters();
  for (auto& p : merged.named_parameters()) {
    TORCH_CHECK(source.contains(p.key()), "[model] merge_lora: the adapted model has no '", p.key(), "'");
    auto value = source[p.key()].to(torch::kFloat);
    if (source.contains(p.key() + "_lora_a")) {
      const auto a = source[p.key() + "_lora_a"].to(torch::kFloat), b = source[p.key() + "_lora_b"].to(torch::kFloat);
      value = value + scale * torch::matmul(a, b);  // batched over experts for (E, in, r) x (E, r, out)
    }
    p.value().copy_(value);
  }
  auto buffers = adapted.named_buffers();
  for (auto& b : merged.named_buffers()) b.value().copy_(buffers[b.key()]);
}

std::vector<RoledParam> TransformerImpl::trainable_parameters() const {
  std::vector<RoledParam> out;
  for (auto& p : roled_parameters())
    if (p.tensor.requires_grad()) out.push_back(std::move(p));
  return out;
}

torch::Tensor token_cross_entropy(const torch::Tensor& logits_NV, const torch::Tensor& targets_N, int64_t ignore_index,
                                  bool sum) {
  if (!at::globalContext().deterministicAlgorithms())
    return torch::cross_entropy_loss(logits_NV, targets_N, /*weight=*/{}, sum ? at::Reduction::Sum : at::Reduction::Mean,
                                     ignore_index);
  const auto kept_N = targets_N.ne(ignore_index);
  const auto logp_NV = torch::log_softmax(logits_NV, /*dim=*/-1);
  const auto picked_N = logp_NV.gather(1, targets_N.masked_fill(kept_N.logical_not(), 0).unsqueeze(1)).squeeze(1);
  const auto total = -picked_N.masked_fill(kept_N.logical_not(), 0).sum();
  return sum ? total : total / kept_N.sum();
}

}  // namespace moetrain::model
