// RMSNorm, RoPE (with YaRN), grouped-query and multi-head latent causal attention through
// scaled_dot_product_attention.
#include "model/layers.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>

namespace moetrain::model {

RMSNormImpl::RMSNormImpl(int dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

namespace {
// LibTorch's rms_norm: one fused kernel on CUDA. A narrower x (bf16) is normalized and scaled in fp32
// and rounded once, as the weight is fp32: on the CPU the same ops as x * rsqrt(mean(x^2) + eps) * w
// written out, bit for bit (tests/model/test_fused_kernels.cpp).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const auto wide = torch::promote_types(x.scalar_type(), torch::kFloat);  // fp32, or fp64 in gradient checks
  auto normed = at::rms_norm(x.to(wide), {x.size(-1)}, weight.to(wide), eps);
  return normed.to(x.scalar_type());
}

struct RecomputedNorm : torch::autograd::Function<RecomputedNorm> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               double eps) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["eps"] = eps;
    return rms_norm(x, weight, eps);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto x = saved[0].detach().requires_grad_(true), weight = saved[1].detach().requires_grad_(true);
    torch::AutoGradMode enable(true);
    auto out = rms_norm(x, weight, ctx->saved_data["eps"].toDouble());
    auto got = torch::autograd::grad({out}, {x, weight}, {grads[0]});
    return {got[0], got[1], torch::Tensor()};
  }
};
}  // namespace

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) const {
  if (recompute && torch::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad()))
    return RecomputedNorm::apply(x, weight, eps_);
  return rms_norm(x, weight, eps_);
}

double yarn_mscale(double factor, double mscale) { return factor <= 1 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0; }

Rope Rope::make(int max_seq_len, int head_dim, double theta, torch::Device device, const config::YarnConfig& yarn) {
  auto inv_freq = torch::pow(theta, -torch::arange(0, head_dim, 2, torch::kDouble) / double(head_dim));
  double cos_sin_scale = 1.0;
  if (yarn.factor > 1) {
    // Frequencies with many rotations over the original context keep their value, those with few
    // are divided by the factor, with a linear ramp between (YaRN, arXiv:2309.00071).
    const double original = yarn.original_max_seq_len > 0 ? yarn.original_max_seq_len : max_seq_len;
    auto dim_of = [&](double rotations) {
      return head_dim * std::log(original / (rotations * 2 * std::numbers::pi)) / (2 * std::log(theta));
    };
    // DeepSeek-V3 rounds the ramp's ends to whole dimensions; gpt-oss (truncate false) does not.
    const double fast = dim_of(yarn.beta_fast), slow = dim_of(yarn.beta_slow);
    const double low = std::max(yarn.truncate ? std::floor(fast) : fast, 0.0);
    double high = std::min(yarn.truncate ? std::ceil(slow) : slow, double(head_dim - 1));
    if (low == high) high += 0.001;
    auto ramp = ((torch::arange(head_dim / 2, torch::kDouble) - low) / (high - low)).clamp(0, 1);
    auto keep = 1 - ramp;  // 1: the original frequency, 0: interpolated
    inv_freq = inv_freq / yarn.factor * (1 - keep) + inv_freq * keep;
    cos_sin_scale = yarn.mscale > 0 && yarn.mscale_all_dim > 0
                        ? yarn_mscale(yarn.factor, yarn.mscale) / yarn_mscale(yarn.factor, yarn.mscale_all_dim)
                        : yarn_mscale(yarn.factor, 1.0);
  }
  auto angles = torch::outer(torch::arange(max_seq_len, torch::kDouble), inv_freq);  // (S, Hd/2)
  auto full = torch::cat({angles, angles}, 1);                                       // (S, Hd)
  Rope rope{(full.cos() * cos_sin_scale).to(torch::kFloat).to(device),
            (full.sin() * cos_sin_scale).to(torch::kFloat).to(device)};
  return rope.cached_in(torch::kFloat);
}

Rope Rope::cached_in(torch::ScalarType dtype) const {
  Rope rope{cos_SHd, sin_SHd};
  const int64_t half = sin_SHd.size(1) / 2;
  rope.cos_cached = cos_SHd.to(dtype);
  // rotate-half's sign on the first half: x * cos + (-x2, x1) * sin == x * cos + (x2, x1) * signed_sin
  rope.signed_sin_cached = torch::cat({-sin_SHd.narrow(1, 0, half), sin_SHd.narrow(1, half, half)}, 1).to(dtype);
  return rope;
}

namespace {
// Partial RoPE: the first `rotated` dims of each head turn, the rest are passed through.
template <class Rotate>
torch::Tensor rotate_leading(const torch::Tensor& x, int64_t rotated, Rotate rotate) {
  return torch::cat({rotate(x.narrow(3, 0, rotated)), x.narrow(3, rotated, x.size(3) - rotated)}, 3);
}
}  // namespace

torch::Tensor Rope::apply(const torch::Tensor& x, int64_t offset) const {
  if (x.size(3) != cos_SHd.size(1))
    return rotate_leading(x, cos_SHd.size(1), [&](const torch::Tensor& part) { return apply(part, offset); });
  const int64_t S = x.size(2), half = x.size(3) / 2;
  TORCH_CHECK(offset + S <= cos_SHd.size(0), "[model] sequence of ", offset + S,
              " positions exceeds model.max_seq_len = ", cos_SHd.size(0));
  // The tables of x's dtype, cast once when the model was placed (another dtype, fp64 in gradient
  // checks, is cast here).
  const bool cached = cos_cached.defined() && cos_cached.scalar_type() == x.scalar_type();
  auto cos = (cached ? cos_cached : cos_SHd.to(x.scalar_type())).narrow(0, offset, S);
  auto sin = (cached ? signed_sin_cached : cached_in(x.scalar_type()).signed_sin_cached).narrow(0, offset, S);
  // (x2, x1): the two halves swapped by one flip of a (2, Hd/2) view, where a cat of -x2 and x1 takes two kernels.
  auto swapped = x.unflatten(3, {2, half}).flip(3).flatten(3);
  return x * cos + swapped * sin;
}

torch::Tensor Rope::apply(const torch::Tensor& x, const TokenLayout& layout) const {
  if (!layout.is_packed()) return apply(x);
  if (x.size(3) != cos_SHd.size(1))
    return rotate_leading(x, cos_SHd.size(1), [&](const torch::Tensor& part) { return apply(part, layout); });
  const int64_t B = x.size(0), S = x.size(2), Hd = x.size(3), half = Hd / 2;
  const auto& positions = layout.positions_BS;
  TORCH_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == S, "[model] positions ",
              positions.sizes(), " do not match the batch's (", B, ", ", S, ")");
  const bool cached = cos_cached.defined() && cos_cached.scalar_type() == x.scalar_type();
  const auto cos_table = cached ? cos_cached : cos_SHd.to(x.scalar_type());
  const auto sin_table = cached ? signed_sin_cached : cached_in(x.scalar_type()).signed_sin_cached;
  // Each token's row of the tables: (B, 1, S, Hd), broadcast over the heads.
  const auto flat = positions.reshape(-1);
  auto cos = cos_table.index_select(0, flat).view({B, 1, S, Hd});
  auto sin = sin_table.index_select(0, flat).view({B, 1, S, Hd});
  auto swapped = x.unflatten(3, {2, half}).flip(3).flatten(3);
  return x * cos + swapped * sin;
}

namespace {

// The block-diagonal causal mask of packed positions: token i's document starts at i - position_i,
// and i attends to j <= i with the same start.
torch::Tensor document_mask(const torch::Tensor& positions_BS) {
  const int64_t S = positions_BS.size(1);
  const auto start_BS = torch::arange(S, positions_BS.options()).unsqueeze(0) - positions_BS;
  const auto same_BSS = start_BS.unsqueeze(2) == start_BS.unsqueeze(1);
  const auto causal_SS = torch::ones({S, S}, positions_BS.options().dtype(torch::kBool)).tril();
  return (same_BSS & causal_SS).unsqueeze(1);
}

// Attention sinks through a kernel that returns the log-sum-exp of each query's logits, lse = log sum_j
// exp(s_ij). With a sink logit t per head the softmax is p_ij = exp(s_ij) / (exp(t) + exp(lse)), so the
// output is the kernel's times exp(lse) / (exp(lse) + exp(t)) = exp(lse - lse'), lse' = logaddexp(lse, t):
// exact, the sink being one more key whose value is zero. Backward is the kernel's own given lse' and the
// sinked output y: it rebuilds p_ij = exp(s_ij - lse') and D_i = dy_i . y_i, which are the sinked softmax's
// probabilities and its row term, so dq, dk, dv are the sinked attention's; the sink itself gets
// -sum_i exp(t - lse'_i) (dy_i . y_i). lse'_BHS and y: as the kernel lays them out.
torch::Tensor sink_scale(const torch::Tensor& out, const torch::Tensor& lse, const torch::Tensor& lse_sinked) {
  return out * (lse - lse_sinked).exp().to(out.scalar_type()).unsqueeze(-1);
}
// d loss / d sink, summed over every query of each head: row_dot = dy . y and lse_sinked laid out alike,
// `head_dim` their heads' dimension.
torch::Tensor sink_grad(const torch::Tensor& row_dot, const torch::Tensor& lse_sinked, const torch::Tensor& sinks,
                        int64_t head_dim) {
  std::vector<int64_t> shape(lse_sinked.dim(), 1), others;
  shape[head_dim] = sinks.size(0);
  for (int64_t d = 0; d < lse_sinked.dim(); ++d)
    if (d != head_dim) others.push_back(d);
  const auto weight = (sinks.to(lse_sinked.scalar_type()).view(shape) - lse_sinked).exp();
  return -(weight * row_dot.to(lse_sinked.scalar_type())).sum(others).to(sinks.scalar_type());
}

// Flash attention over variable-length sequences laid end to end: q (T, H, D), k and v (T, G, D) with
// T = B * S, each document causal within itself (cu_seqlens), optionally within a window of the last
// `window` keys (flash's window_size_left = window - 1) and with sinks (H) (sink_scale). Backward is the
// kernel's own, from the output and the log-sum-exp it saved.
struct VarlenFlash : torch::autograd::Function<VarlenFlash> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& cu_seqlens, int64_t max_length,
                               double scale, int64_t window, const torch::Tensor& sinks) {
    const std::optional<int64_t> left = window > 0 ? std::optional<int64_t>(window - 1) : std::nullopt;
    const std::optional<int64_t> right = window > 0 ? std::optional<int64_t>(0) : std::nullopt;
    auto [out, logsumexp, rng_state, unused, debug] =
        at::_flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, /*dropout_p=*/0.0,
                                     /*is_causal=*/true, /*return_debug_mask=*/false, scale, left, right);
    if (sinks.defined()) {
      // The variable-length kernel's lse is (H, T); the output (T, H, D).
      TORCH_CHECK(logsumexp.dim() == 2 && logsumexp.size(0) == q.size(1) && logsumexp.size(1) == q.size(0),
                  "[model] attention sinks: flash's log-sum-exp is ", logsumexp.sizes(), ", not (H, T)");
      const auto lse_TH = logsumexp.t();
      const auto sinked_TH = torch::logaddexp(lse_TH, sinks.to(lse_TH.scalar_type()).unsqueeze(0));
      out = sink_scale(out, lse_TH, sinked_TH);
      logsumexp = sinked_TH.t().contiguous();
    }
    ctx->save_for_backward({q, k, v, out, logsumexp, cu_seqlens, rng_state, unused, sinks});
    ctx->saved_data["max_length"] = max_length;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const int64_t max_length = ctx->saved_data["max_length"].toInt(), window = ctx->saved_data["window"].toInt();
    const std::optional<int64_t> left = window > 0 ? std::optional<int64_t>(window - 1) : std::nullopt;
    const std::optional<int64_t> right = window > 0 ? std::optional<int64_t>(0) : std::nullopt;
    const auto dy = grads[0].contiguous();
    auto [dq, dk, dv] = at::_flash_attention_backward(dy, s[0], s[1], s[2], s[3], s[4], s[5], s[5], max_length,
                                                      max_length, /*dropout_p=*/0.0, /*is_causal=*/true, s[6], s[7],
                                                      ctx->saved_data["scale"].toDouble(), left, right);
    torch::Tensor dsinks;
    if (s[8].defined()) dsinks = sink_grad((dy.to(torch::kFloat) * s[3].to(torch::kFloat)).sum(-1).t(), s[4], s[8], 0);
    return {dq, dk, dv, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), dsinks};
  }
};

// The CPU's flash kernel (what SDPA runs there) under an additive mask, with sinks as VarlenFlash has
// them: q, k, v (B, H, S|L, D) with as many key heads as query heads, mask (B|1, 1, S, L) in q's dtype.
struct SinkFlashCpu : torch::autograd::Function<SinkFlashCpu> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& mask, const torch::Tensor& sinks,
                               double scale) {
    auto [out, lse_BHS] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, /*dropout_p=*/0.0,
                                                                          /*is_causal=*/false, mask, scale);
    const auto sinked_BHS = torch::logaddexp(lse_BHS, sinks.to(lse_BHS.scalar_type()).view({1, -1, 1}));
    auto y = sink_scale(out, lse_BHS, sinked_BHS);
    ctx->save_for_backward({q, k, v, y, sinked_BHS, mask, sinks});
    ctx->saved_data["scale"] = scale;
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const auto dy = grads[0].contiguous();
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        dy, s[0], s[1], s[2], s[3], s[4], /*dropout_p=*/0.0, /*is_causal=*/false, s[5], ctx->saved_data["scale"].toDouble());
    const auto wide = s[4].scalar_type();
    auto dsinks = sink_grad((dy.to(wide) * s[3].to(wide)).sum(-1), s[4], s[6], 1);
    return {dq, dk, dv, torch::Tensor(), dsinks, torch::Tensor()};
  }
};

// Sinks as the softmax of the logits with the sink's column appended, in fp32 with the logits
// materialized: where neither flash kernel takes the call (CUDA in fp32, deterministic mode).
torch::Tensor sink_attention_math(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& mask_B1SL, const torch::Tensor& sinks, double scale) {
  const auto wide = torch::promote_types(q.scalar_type(), torch::kFloat);
  auto logits = torch::matmul(q.to(wide), k.to(wide).transpose(-2, -1)) * scale;  // (B, H, S, L)
  logits = logits.masked_fill(mask_B1SL.logical_not(), -std::numeric_limits<double>::infinity());
  const auto sink_BHS1 = sinks.to(wide).view({1, -1, 1, 1}).expand({logits.size(0), -1, logits.size(2), 1});
  auto p = torch::softmax(torch::cat({logits, sink_BHS1}, -1), -1).narrow(-1, 0, logits.size(-1));
  return torch::matmul(p, v.to(wide)).to(q.scalar_type());
}

// Band of a causal mask: query slot i keeps key slots j > i - window (i, j: indices, rows_S1 and cols_1L).
torch::Tensor within_window(const torch::Tensor& rows, const torch::Tensor& cols, int64_t window) {
  return cols.unsqueeze(0) > rows.unsqueeze(1) - window;
}

}  // namespace

bool varlen_flash_applies(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  const auto dtype = q.scalar_type();
  const int64_t D = q.size(-1);
  return q.is_cuda() && (dtype == torch::kBFloat16 || dtype == torch::kHalf) && k.scalar_type() == dtype &&
         v.scalar_type() == dtype && k.size(-1) == D && v.size(-1) == D && D % 8 == 0 && D <= 256 &&
         q.size(1) % k.size(1) == 0 && at::globalContext().userEnabledFlashSDP();
}

TokenLayout TokenLayout::packed(const torch::Tensor& positions_BS, torch::Device device, bool varlen) {
  if (!positions_BS.defined()) return {};
  TORCH_CHECK(positions_BS.dim() == 2 && positions_BS.scalar_type() == torch::kLong, "[model] positions must be (B, S) "
              "int64, got ", positions_BS.sizes(), " ", positions_BS.scalar_type());
  TokenLayout layout;
  const bool from_host = positions_BS.device().is_cpu() && device.is_cuda();
  layout.positions_BS = from_host ? positions_BS.pin_memory().to(device, /*non_blocking=*/true) : positions_BS.to(device);
  if (!(varlen && device.is_cuda() && positions_BS.device().is_cpu())) {
    layout.mask_B1SS = document_mask(layout.positions_BS);
    return layout;
  }
  // Each document's start among the flattened tokens (a position 0 starts one; padding is one token
  // each), the end, and the longest, read on the host where the batch was drawn.
  const auto flat = positions_BS.contiguous().view(-1);
  const int64_t* p = flat.data_ptr<int64_t>();
  std::vector<int32_t> starts;
  int64_t longest = 0;
  for (int64_t i = 0; i < flat.numel(); ++i) {
    if (p[i] == 0) starts.push_back(int32_t(i));
    longest = std::max(longest, p[i] + 1);
  }
  starts.push_back(int32_t(flat.numel()));
  layout.cu_seqlens = torch::tensor(starts, torch::kInt).pin_memory().to(device, /*non_blocking=*/true);
  layout.max_length = longest;
  return layout;
}

TokenLayout TokenLayout::first(int64_t n) const {
  if (!is_packed()) return {};
  TokenLayout window;
  window.positions_BS = positions_BS.narrow(1, 0, n);
  window.mask_B1SS = mask().narrow(2, 0, n).narrow(3, 0, n);
  return window;
}

torch::Tensor TokenLayout::mask() const { return mask_B1SS.defined() ? mask_B1SS : document_mask(positions_BS); }

torch::Tensor attend_masked(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                            const torch::Tensor& mask_B1SL, std::optional<double> scale, const torch::Tensor& sinks) {
  const bool gqa = k.size(1) != q.size(1);
  if (!sinks.defined())  // SDPA's memory-efficient kernel on CUDA (flash takes no mask), its CPU kernel here
    return at::scaled_dot_product_attention(q, k, v, mask_B1SL, /*dropout_p=*/0.0, /*is_causal=*/false, scale, gqa);
  TORCH_CHECK(sinks.dim() == 1 && sinks.size(0) == q.size(1), "[model] attention sinks ", sinks.sizes(), " for ",
              q.size(1), " query heads");
  // Consecutive query heads share a key head; the sinked kernels take as many key heads as query heads
  // (autograd sums the repeats' gradients back).
  const int64_t repeats = q.size(1) / k.size(1);
  const auto keys = gqa ? k.repeat_interleave(repeats, 1) : k, values = gqa ? v.repeat_interleave(repeats, 1) : v;
  const double s = scale.value_or(1.0 / std::sqrt(double(q.size(-1))));
  if (q.is_cpu()) {
    auto additive = torch::zeros(mask_B1SL.sizes(), q.options()).masked_fill(
        mask_B1SL.logical_not(), -std::numeric_limits<double>::infinity());
    return SinkFlashCpu::apply(q, keys, values, additive, sinks, s);
  }
  return sink_attention_math(q, keys, values, mask_B1SL, sinks, s);
}

torch::Tensor TokenLayout::attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  std::optional<double> scale, bool enable_gqa, int64_t window,
                                  const torch::Tensor& sinks) const {
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3);
  // A window as long as the sequence (or a document of it) is full attention: the same kernels run.
  if (window >= S) window = 0;
  if (!is_packed() && window == 0 && !sinks.defined())  // is_causal lets CUDA take flash attention
    return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true, scale,
                                            enable_gqa);
  if ((cu_seqlens.defined() || !is_packed()) && varlen_flash_applies(q, k, v)) {
    // (B, n, S, D) -> (B * S, n, D): the documents (or the rows) end to end, as the kernel reads them.
    auto flat = [&](const torch::Tensor& x) { return x.transpose(1, 2).reshape({B * S, x.size(1), D}).contiguous(); };
    const double s = scale.value_or(1.0 / std::sqrt(double(D)));
    const auto rows = is_packed() ? cu_seqlens
                                  : torch::arange(0, B * S + 1, S, q.options().dtype(torch::kInt));
    auto y = VarlenFlash::apply(flat(q), flat(k), flat(v), rows, is_packed() ? max_length : S, s, window, sinks);
    return y.view({B, S, H, D}).transpose(1, 2);
  }
  auto allowed = is_packed() ? mask() : torch::ones({S, S}, q.options().dtype(torch::kBool)).tril().view({1, 1, S, S});
  if (window > 0) {
    // Within a document, indices differ as positions do: the band on indices is the band on positions.
    const auto index = torch::arange(S, q.options().dtype(torch::kLong));
    allowed = allowed & within_window(index, index, window);
  }
  return attend_masked(q, k, v, allowed, scale, sinks);
}

torch::Tensor max_logits(const torch::Tensor& q, const torch::Tensor& k, double scale, const TokenLayout& layout,
                         int64_t window) {
  torch::NoGradGuard no_grad;
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "[model] max_logits: q (B, H, S, D) and k (B, G, S, D) with H a multiple of G, got ", q.sizes(), " and ",
              k.sizes());
  const int64_t B = q.size(0), H = q.size(1), S = q.size(2), D = q.size(3), G = k.size(1);
  const auto q_BGRSD = q.detach().to(torch::kFloat).reshape({B, G, H / G, S, D});
  const auto kT_BG1DS = k.detach().to(torch::kFloat).unsqueeze(2).transpose(-2, -1);
  const auto columns = torch::arange(S, torch::TensorOptions().dtype(torch::kLong).device(q.device()));
  // A packed token's document starts at (its index - its position): two tokens share one exactly when
  // these agree (document_mask's rule).
  const auto start_BS = layout.is_packed() ? columns.unsqueeze(0) - layout.positions_BS : torch::Tensor();
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / std::max<int64_t>(1, B * H * S));
  auto out = torch::full({G, H / G}, -std::numeric_limits<float>::infinity(), q_BGRSD.options());
  for (int64_t row = 0; row < S; row += chunk) {
    const int64_t n = std::min(chunk, S - row);
    auto logits = torch::matmul(q_BGRSD.narrow(3, row, n), kT_BG1DS).mul_(scale);  // (B, G, R, n, S)
    auto allowed = columns.unsqueeze(0) <= columns.narrow(0, row, n).unsqueeze(1);  // (n, S) causal
    if (window > 0) allowed = allowed & within_window(columns.narrow(0, row, n), columns, window);
    if (start_BS.defined())
      allowed = (allowed.unsqueeze(0) & (start_BS.narrow(1, row, n).unsqueeze(2) == start_BS.unsqueeze(1)))
                    .view({B, 1, 1, n, S});
    logits.masked_fill_(allowed.logical_not(), -std::numeric_limits<float>::infinity());
    out = torch::maximum(out, logits.amax({0, 3, 4}));
  }
  return out.reshape({H});
}

namespace {
// optim.qk_clip_tau: folds this forward's maxima into the layer's, in training forwards only.
void track(bool on, torch::Tensor& max_logit_H, const torch::Tensor& q, const torch::Tensor& k, double scale,
           const TokenLayout& layout, int64_t window = 0) {
  if (!on || !torch::GradMode::is_enabled()) return;
  const auto m = max_logits(q, k, scale, layout, window);
  max_logit_H = max_logit_H.defined() ? torch::maximum(max_logit_H, m) : m;
}
}  // namespace

AttentionImpl::AttentionImpl(const config::ModelConfig& cfg, int window)
    : n_heads_(cfg.n_heads), n_kv_heads_(cfg.n_kv_heads), head_dim_(config::head_dim(cfg)), window_(window),
      qk_norm_(cfg.qk_norm) {
  wq = register_parameter("wq", torch::empty({cfg.d_model, n_heads_ * head_dim_}));
  wk = register_parameter("wk", torch::empty({cfg.d_model, n_kv_heads_ * head_dim_}));
  wv = register_parameter("wv", torch::empty({cfg.d_model, n_kv_heads_ * head_dim_}));
  wo = register_parameter("wo", torch::empty({n_heads_ * head_dim_, cfg.d_model}));
  if (cfg.attn_bias != "none") {
    q_bias = register_parameter("q_bias", torch::zeros({n_heads_ * head_dim_}));
    k_bias = register_parameter("k_bias", torch::zeros({n_kv_heads_ * head_dim_}));
    v_bias = register_parameter("v_bias", torch::zeros({n_kv_heads_ * head_dim_}));
  }
  if (cfg.attn_bias == "all") o_bias = register_parameter("o_bias", torch::zeros({cfg.d_model}));
  if (cfg.attention_sinks) sinks = register_parameter("sinks", torch::zeros({n_heads_}));
  if (qk_norm_ == "head") {
    q_norm = register_module("q_norm", RMSNorm(head_dim_, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(head_dim_, cfg.norm_eps));
  } else if (qk_norm_ == "full") {
    q_norm = register_module("q_norm", RMSNorm(n_heads_ * head_dim_, cfg.norm_eps));
    k_norm = register_module("k_norm", RMSNorm(n_kv_heads_ * head_dim_, cfg.norm_eps));
  }
}

namespace {
bool targets(const config::LoraConfig& cfg, const std::string& target) {
  return std::find(cfg.targets.begin(), cfg.targets.end(), target) != cfg.targets.end();
}
}  // namespace

void AttentionImpl::add_lora(const config::LoraConfig& cfg) {
  if (targets(cfg, "q")) wq_lora = moe::add_lora(*this, "wq", wq, cfg);
  if (targets(cfg, "k") || targets(cfg, "kv")) wk_lora = moe::add_lora(*this, "wk", wk, cfg);
  if (targets(cfg, "v") || targets(cfg, "kv")) wv_lora = moe::add_lora(*this, "wv", wv, cfg);
  if (targets(cfg, "o")) wo_lora = moe::add_lora(*this, "wo", wo, cfg);
}

torch::Tensor AttentionImpl::heads(const torch::Tensor& x, const torch::Tensor& w, const moe::LoraAdapter& lora,
                                   const torch::Tensor& bias, int n, const RMSNorm& norm,
                                   ComputeDtype compute_dtype) const {
  auto y = moe::lora_matmul(x, w, lora, compute_dtype);
  if (bias.defined()) y = y + cast(bias, compute_dtype);
  if (norm && qk_norm_ == "full") y = norm->forward(y);
  y = y.view({x.size(0), x.size(1), n, head_dim_});
  if (norm && qk_norm_ == "head") y = norm->forward(y);
  return y.transpose(1, 2);
}

torch::Tensor AttentionImpl::output(const torch::Tensor& y, ComputeDtype compute_dtype) const {
  auto out = moe::lora_matmul(y, wo, wo_lora, compute_dtype);
  return o_bias.defined() ? out + cast(o_bias, compute_dtype) : out;
}

namespace {
// Writes the S new entries new_BnSX (slots along dim `dim` of the cache) at slot `start` of `cache`,
// allocating it first with `capacity` slots, and returns the filled slots [0, start + S).
torch::Tensor append(torch::Tensor& cache, const torch::Tensor& new_entries, int64_t dim, int64_t start,
                     int64_t capacity) {
  const int64_t S = new_entries.size(dim);
  if (!cache.defined()) {
    auto shape = new_entries.sizes().vec();
    shape[dim] = capacity;
    cache = torch::zeros(shape, new_entries.options());
  }
  TORCH_CHECK(start + S <= cache.size(dim), "[model] KV cache of ", cache.size(dim), " slots cannot take tokens ",
              start, "..", start + S - 1);
  cache.narrow(dim, start, S).copy_(new_entries);
  return cache.narrow(dim, 0, start + S);
}
}  // namespace

torch::Tensor AttentionImpl::decode(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                                    const DecodeStep& step, LayerCache& cache) const {
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1);
  auto x = cast(x_BSD, compute_dtype);
  TokenLayout layout;  // positions only: RoPE reads them, attention takes the step's mask
  layout.positions_BS = step.positions_BS;
  auto q = rope.apply(heads(x, wq, wq_lora, q_bias, n_heads_, q_norm, compute_dtype), layout);
  auto k = rope.apply(heads(x, wk, wk_lora, k_bias, n_kv_heads_, k_norm, compute_dtype), layout);
  auto v = heads(x, wv, wv_lora, v_bias, n_kv_heads_, RMSNorm(nullptr), compute_dtype);
  auto keys = append(cache.k_BGCHd, k, 2, step.start, step.capacity);
  auto values = append(cache.v_BGCHd, v, 2, step.start, step.capacity);
  // A sliding layer keeps slots j > i - window of new token i (slot i): a row's slots hold consecutive
  // positions, so the band on slots is the band on positions; padding stays masked, or attends to itself.
  auto mask = step.mask_B1SL;
  const int64_t L = keys.size(2);
  if (window_ > 0 && window_ < L) {
    const auto opts = torch::TensorOptions().dtype(torch::kLong).device(mask.device());
    mask = mask & within_window(torch::arange(step.start, step.start + S, opts), torch::arange(L, opts), window_);
  }
  auto y = attend_masked(q, keys, values, mask, /*scale=*/std::nullopt, sinks);
  y = y.transpose(1, 2).reshape({B, S, n_heads_ * head_dim_});
  return output(y, compute_dtype);
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                                     const TokenLayout& layout) const {
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1);
  auto x = cast(x_BSD, compute_dtype);
  auto q = rope.apply(heads(x, wq, wq_lora, q_bias, n_heads_, q_norm, compute_dtype), layout);
  auto k = rope.apply(heads(x, wk, wk_lora, k_bias, n_kv_heads_, k_norm, compute_dtype), layout);
  auto v = heads(x, wv, wv_lora, v_bias, n_kv_heads_, RMSNorm(nullptr), compute_dtype);
  track(track_max_logits, max_logit_H, q, k, 1.0 / std::sqrt(double(head_dim_)), layout, window_);
  // Each key/value head serves n_heads / n_kv_heads consecutive query heads: SDPA's enable_gqa reads
  // them in place (flash attention on CUDA and on the CPU) instead of a repeated copy of K and V.
  auto y = layout.attend(q, k, v, /*scale=*/std::nullopt, /*enable_gqa=*/n_kv_heads_ != n_heads_, window_, sinks);
  y = y.transpose(1, 2).reshape({B, S, n_heads_ * head_dim_});
  return output(y, compute_dtype);
}

namespace {
// The latent norms of MLA use DeepSeek's fixed epsilon, not model.norm_eps (as the reference code does).
constexpr double kLatentNormEps = 1e-6;
}  // namespace

MLAttentionImpl::MLAttentionImpl(const config::ModelConfig& cfg)
    : n_heads_(cfg.n_heads),
      nope_dim_(cfg.mla.qk_nope_head_dim),
      rope_dim_(cfg.mla.qk_rope_head_dim),
      v_dim_(cfg.mla.v_head_dim),
      kv_rank_(cfg.mla.kv_lora_rank) {
  const int D = cfg.d_model, H = n_heads_, qk_dim = nope_dim_ + rope_dim_;
  if (cfg.mla.q_lora_rank > 0) {
    wq_a = register_parameter("wq_a", torch::empty({D, cfg.mla.q_lora_rank}));
    q_a_norm = register_module("q_a_norm", RMSNorm(cfg.mla.q_lora_rank, kLatentNormEps));
    wq_b = register_parameter("wq_b", torch::empty({cfg.mla.q_lora_rank, H * qk_dim}));
  } else {
    wq = register_parameter("wq", torch::empty({D, H * qk_dim}));
  }
  wkv_a = register_parameter("wkv_a", torch::empty({D, kv_rank_ + rope_dim_}));
  kv_a_norm = register_module("kv_a_norm", RMSNorm(kv_rank_, kLatentNormEps));
  wkv_b = register_parameter("wkv_b", torch::empty({kv_rank_, H * (nope_dim_ + v_dim_)}));
  wo = register_parameter("wo", torch::empty({H * v_dim_, D}));
  const double m = cfg.yarn.mscale_all_dim > 0 ? yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim) : 1.0;
  softmax_scale_ = m * m / std::sqrt(double(qk_dim));
}

void MLAttentionImpl::add_lora(const config::LoraConfig& cfg) {
  if (targets(cfg, "q")) {
    if (wq.defined()) wq_lora = moe::add_lora(*this, "wq", wq, cfg);
    if (wq_a.defined()) wq_a_lora = moe::add_lora(*this, "wq_a", wq_a, cfg);
    if (wq_b.defined()) wq_b_lora = moe::add_lora(*this, "wq_b", wq_b, cfg);
  }
  if (targets(cfg, "kv")) {
    wkv_a_lora = moe::add_lora(*this, "wkv_a", wkv_a, cfg);
    wkv_b_lora = moe::add_lora(*this, "wkv_b", wkv_b, cfg);
  }
  if (targets(cfg, "o")) wo_lora = moe::add_lora(*this, "wo", wo, cfg);
}

torch::Tensor MLAttentionImpl::forward(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                                       const TokenLayout& layout) const {
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1), H = n_heads_;
  auto x = cast(x_BSD, compute_dtype);
  auto mm = [&](const torch::Tensor& a, const torch::Tensor& w, const moe::LoraAdapter& lora) {
    return moe::lora_matmul(a, w, lora, compute_dtype);
  };
  auto q = wq.defined() ? mm(x, wq, wq_lora) : mm(q_a_norm->forward(mm(x, wq_a, wq_a_lora)), wq_b, wq_b_lora);
  q = q.view({B, S, H, nope_dim_ + rope_dim_}).transpose(1, 2);  // (B, H, S, N+P)
  auto q_pe = rope.apply(q.narrow(3, nope_dim_, rope_dim_), layout);
  auto kv_a = mm(x, wkv_a, wkv_a_lora);                                                 // (B, S, Rkv+P)
  auto k_pe = rope.apply(kv_a.narrow(2, kv_rank_, rope_dim_).unsqueeze(1), layout);    // (B, 1, S, P)
  auto kv = mm(kv_a_norm->forward(kv_a.narrow(2, 0, kv_rank_)), wkv_b, wkv_b_lora);    // (B, S, H*(N+Vd))
  kv = kv.view({B, S, H, nope_dim_ + v_dim_}).transpose(1, 2);                         // (B, H, S, N+Vd)
  auto query = torch::cat({q.narrow(3, 0, nope_dim_), q_pe}, 3);
  auto key = torch::cat({kv.narrow(3, 0, nope_dim_), k_pe.expand({B, H, S, rope_dim_})}, 3);
  auto value = kv.narrow(3, nope_dim_, v_dim_);
  track(track_max_logits, max_logit_H, query, key, softmax_scale_, layout);
  // Flash attention wants one head dim for q, k and v: the value is padded with zeros to the query's
  // (DeepSeek-V3: 128 to 192), which adds zero columns to the output, sliced off again.
  const int64_t qk_dim = nope_dim_ + rope_dim_;
  if (v_dim_ < qk_dim) value = torch::constant_pad_nd(value, {0, qk_dim - v_dim_});
  auto y = layout.attend(query, key, value, softmax_scale_);
  if (v_dim_ < qk_dim) y = y.narrow(3, 0, v_dim_);
  y = y.transpose(1, 2).reshape({B, S, H * v_dim_});
  return mm(y, wo, wo_lora);
}

torch::Tensor MLAttentionImpl::decode(const torch::Tensor& x_BSD, const Rope& rope, ComputeDtype compute_dtype,
                                      const DecodeStep& step, LayerCache& cache) const {
  const int64_t B = x_BSD.size(0), S = x_BSD.size(1), H = n_heads_, L = step.start + S;
  auto x = cast(x_BSD, compute_dtype);
  auto mm = [&](const torch::Tensor& a, const torch::Tensor& w, const moe::LoraAdapter& lora) {
    return moe::lora_matmul(a, w, lora, compute_dtype);
  };
  TokenLayout layout;  // positions only: RoPE reads them, attention takes the step's mask
  layout.positions_BS = step.positions_BS;
  auto q = wq.defined() ? mm(x, wq, wq_lora) : mm(q_a_norm->forward(mm(x, wq_a, wq_a_lora)), wq_b, wq_b_lora);
  q = q.view({B, S, H, nope_dim_ + rope_dim_}).transpose(1, 2);  // (B, H, S, N+P)
  auto q_pe = rope.apply(q.narrow(3, nope_dim_, rope_dim_), layout);
  auto kv_a = mm(x, wkv_a, wkv_a_lora);                                                     // (B, S, Rkv+P)
  auto k_pe = rope.apply(kv_a.narrow(2, kv_rank_, rope_dim_).unsqueeze(1), layout).squeeze(1);  // (B, S, P)
  auto latent = kv_a_norm->forward(kv_a.narrow(2, 0, kv_rank_));                           // (B, S, Rkv)
  auto latent_BLR = append(cache.latent_BCR, latent, 1, step.start, step.capacity);
  auto k_pe_BLP = append(cache.k_pe_BCP, k_pe, 1, step.start, step.capacity);
  if (S == 1) {
    // One new token a row (a decode step): wkv_b absorbed, as DeepSeek's inference does. With wkv_b's
    // per-head key part W_UK (Rkv, H, N) and value part W_UV (Rkv, H, Vd), a key's no-RoPE part is
    // latent W_UK, so q_nope . k_nope = (W_UK q_nope) . latent, and the output is (P latent) W_UV: the
    // attention reads the cached latents as they are, at H (Rkv + P) per cached token instead of
    // expanding every one of them to H (N + Vd) each step. The scores and softmax are fp32.
    auto w = cast(wkv_b, compute_dtype);
    if (wkv_b_lora.defined())  // the adapter merged: W + scale A B (no dropout while decoding)
      w = w + cast(wkv_b_lora.a.matmul(wkv_b_lora.b) * wkv_b_lora.scale, compute_dtype);
    w = w.view({kv_rank_, H, nope_dim_ + v_dim_});
    const auto q_latent = torch::einsum("bhsn,rhn->bhsr", {q.narrow(3, 0, nope_dim_), w.narrow(2, 0, nope_dim_)});
    auto scores = torch::matmul(q_latent, latent_BLR.unsqueeze(1).transpose(2, 3)).to(torch::kFloat) +
                  torch::matmul(q_pe, k_pe_BLP.unsqueeze(1).transpose(2, 3)).to(torch::kFloat);  // (B, H, 1, L)
    scores = (scores * softmax_scale_).masked_fill(step.mask_B1SL.logical_not(), -std::numeric_limits<float>::infinity());
    const auto probs = torch::softmax(scores, -1).to(latent_BLR.scalar_type());
    const auto out_latent = torch::matmul(probs, latent_BLR.unsqueeze(1));                  // (B, H, 1, Rkv)
    auto y = torch::einsum("bhsr,rhv->bhsv", {out_latent, w.narrow(2, nope_dim_, v_dim_)});  // (B, H, 1, Vd)
    y = y.transpose(1, 2).reshape({B, S, H * v_dim_});
    return mm(y, wo, wo_lora);
  }
  // A prefill (several new tokens a row): every cached latent expanded to its keys' no-RoPE part and its values (B, H, L, N+Vd).
  auto kv = mm(latent_BLR, wkv_b, wkv_b_lora).view({B, L, H, nope_dim_ + v_dim_}).transpose(1, 2);
  auto query = torch::cat({q.narrow(3, 0, nope_dim_), q_pe}, 3);
  auto key = torch::cat({kv.narrow(3, 0, nope_dim_), k_pe_BLP.unsqueeze(1).expand({B, H, L, rope_dim_})}, 3);
  auto value = kv.narrow(3, nope_dim_, v_dim_);
  const int64_t qk_dim = nope_dim_ + rope_dim_;  // one head dim for SDPA's kernels, as forward() pads
  if (v_dim_ < qk_dim) value = torch::constant_pad_nd(value, {0, qk_dim - v_dim_});
  auto y = at::scaled_dot_product_attention(query, key, value, step.mask_B1SL, /*dropout_p=*/0.0,
                                            /*is_causal=*/false, softmax_scale_);
  if (v_dim_ < qk_dim) y = y.narrow(3, 0, v_dim_);
  y = y.transpose(1, 2).reshape({B, S, H * v_dim_});
  return mm(y, wo, wo_lora);
}

}  // namespace moetrain::model
