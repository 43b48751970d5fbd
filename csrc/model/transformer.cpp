// The MoE transformer, its seeded name-keyed initialization and its parameter counts.
#include "model/transformer.h"

#include <set>

#include "common/errors.h"

namespace moetrain::model {

namespace {
PretrainedLoader pretrained_loader = nullptr;  // installed by csrc/hf (model.init_from)

// MLA rotates only its qk_rope_head_dim dimensions; GQA the whole head.
Rope make_rope(const config::ModelConfig& cfg, torch::Device device) {
  const int dim = cfg.attention == "mla" ? cfg.mla.qk_rope_head_dim : config::head_dim(cfg);
  return Rope::make(cfg.max_seq_len, dim, cfg.rope_theta, device, cfg.yarn);
}
}  // namespace

BlockImpl::BlockImpl(const config::ModelConfig& cfg, bool is_moe, moe::ExpertShard shard) {
  attn_norm = register_module("attn_norm", RMSNorm(cfg.d_model, cfg.norm_eps));
  if (cfg.attention == "mla")
    mla = register_module("attn", MLAttention(cfg));
  else
    attn = register_module("attn", Attention(cfg));
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

BlockOutput BlockImpl::forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype) const {
  auto normed = attn_norm->forward(x_BSD);
  auto a = attn ? attn->forward(normed, rope, compute_dtype) : mla->forward(normed, rope, compute_dtype);
  auto x = x_BSD + a.to(x_BSD.scalar_type());
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

TransformerImpl::TransformerImpl(const config::ModelConfig& cfg, moe::ExpertShard shard)
    : cfg_(cfg), ep_size_(shard.ranks) {
  if (shard.ranks < 1 || shard.rank < 0 || shard.rank >= shard.ranks || cfg.moe.n_experts % shard.ranks != 0)
    throw ConfigError("expert shard " + std::to_string(shard.rank) + " of " + std::to_string(shard.ranks) +
                      " does not split model.moe.n_experts = " + std::to_string(cfg.moe.n_experts));
  expert_offset_ = int64_t(shard.rank) * (cfg.moe.n_experts / shard.ranks);
  // The config key exists so that `moetrain cost` can estimate such models; the modules do not yet.
  if (cfg.mtp_depth > 0)
    throw ConfigError("model.mtp_depth = " + std::to_string(cfg.mtp_depth) +
                      " (multi-token prediction) is not implemented for training yet; configs with it serve `moetrain cost`");
  embed = register_parameter("embed", torch::empty({cfg.vocab_size, cfg.d_model}));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int i = 0; i < cfg.n_layers; ++i) layers->push_back(Block(cfg, /*is_moe=*/i >= cfg.dense_layers, shard));
  final_norm = register_module("final_norm", RMSNorm(cfg.d_model, cfg.norm_eps));
  if (!cfg.tie_embeddings) lm_head = register_parameter("lm_head", torch::empty({cfg.vocab_size, cfg.d_model}));
  rope_ = make_rope(cfg, torch::kCPU);
}

ForwardOutput TransformerImpl::forward(const torch::Tensor& tokens_BS) const {
  TORCH_CHECK(tokens_BS.dim() == 2 && tokens_BS.scalar_type() == torch::kLong,
              "[model] tokens must be (B, S) int64, got ", tokens_BS.sizes(), " ", tokens_BS.scalar_type());
  auto x = embed.index_select(0, tokens_BS.reshape(-1)).view({tokens_BS.size(0), tokens_BS.size(1), cfg_.d_model});
  ForwardOutput out;
  out.balance_loss = torch::zeros({}, x.options().dtype(torch::promote_types(x.scalar_type(), torch::kFloat)));
  for (size_t i = 0; i < layers->size(); ++i) {
    auto block = layers->ptr(i)->as<BlockImpl>()->forward(x, rope_, compute_dtype_);
    x = block.x_BSD;
    if (block.moe) {
      out.balance_loss = out.balance_loss + block.moe->balance_loss;
      out.moe_stats.push_back(block.moe->stats);
      out.moe_layers.push_back(int(i));
    }
  }
  auto head = lm_head.defined() ? lm_head : embed;
  auto logits = torch::matmul(cast(final_norm->forward(x), compute_dtype_), cast(head, compute_dtype_).t());
  out.logits_BSV = logits.to(torch::promote_types(logits.scalar_type(), torch::kFloat));
  return out;
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
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

void set_pretrained_loader(PretrainedLoader loader) { pretrained_loader = loader; }

bool is_no_decay(const std::string& name) {
  return name.find("norm") != std::string::npos || ends_with(name, "bias") || name == "embed";
}

void TransformerImpl::init_weights(uint64_t seed) {
  torch::NoGradGuard no_grad;
  // Output projections of residual branches are scaled down by sqrt(2 * n_layers) (GPT-2).
  const double out_std = cfg_.init_std / std::sqrt(2.0 * cfg_.n_layers);
  for (auto& p : named_parameters()) {
    const std::string& name = p.key();
    auto& w = p.value();
    torch::Tensor value;
    if (name.find("norm") != std::string::npos) {
      value = torch::ones(w.sizes(), torch::kFloat);
    } else if (ends_with(name, "_bias")) {  // attention biases start at zero
      value = torch::zeros(w.sizes(), torch::kFloat);
    } else {
      const bool is_out = ends_with(name, ".wo") || ends_with(name, ".w2");
      const double std = is_out ? out_std : cfg_.init_std;
      if (name.find(".moe.experts.") != std::string::npos) {  // one draw per global expert id
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
  if (!cfg_.init_from.empty()) {
    if (!pretrained_loader)
      throw ConfigError("model.init_from = \"" + cfg_.init_from + "\" needs the Hugging Face reader, which this program did not install");
    pretrained_loader(*this, cfg_.init_from);
  }
}

void TransformerImpl::update_router_bias(const std::vector<torch::Tensor>& load_LE) {
  size_t i = 0;
  for (const auto& layer : *layers) {
    auto* block = layer->as<BlockImpl>();
    if (!block->moe) continue;
    TORCH_CHECK(i < load_LE.size(), "[model] update_router_bias: ", load_LE.size(), " loads for more MoE layers");
    block->moe->router->update_bias(load_LE[i++]);
  }
}

void TransformerImpl::place(torch::Device device, ComputeDtype compute_dtype) {
  to(device);
  rope_ = make_rope(cfg_, device);
  compute_dtype_ = compute_dtype;
}

ParamCounts TransformerImpl::param_counts() const {
  ParamCounts c;
  for (const auto& p : named_parameters()) {
    const int64_t n = p.value().numel();
    if (p.key().find(".moe.experts.") != std::string::npos) {  // this rank holds 1/ep of them
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
  for (const auto& module : *layers) {
    const auto* block = module->as<BlockImpl>();
    if (block && block->moe)
      for (const auto& p : block->moe->experts->parameters()) experts.insert(p.unsafeGetTensorImpl());
  }
  std::vector<RoledParam> out;
  for (const auto& p : named_parameters())
    out.push_back({p.key(), p.value(), experts.count(p.value().unsafeGetTensorImpl()) ? ParamRole::expert : ParamRole::replicated});
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
