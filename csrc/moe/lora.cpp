// LoRA adapters: registration and the adapter term at dense and grouped (expert) matmul sites.
#include "moe/lora.h"

#include "common/tensor.h"

namespace moetrain::moe {

LoraAdapter add_lora(torch::nn::Module& owner, const std::string& weight_name, const torch::Tensor& weight,
                     const config::LoraConfig& cfg) {
  TORCH_CHECK(weight.defined() && (weight.dim() == 2 || weight.dim() == 3), "[model] LoRA on '", weight_name,
              "': expected a defined 2-D or stacked 3-D weight");
  TORCH_CHECK(cfg.rank > 0, "[model] LoRA on '", weight_name, "' with rank ", cfg.rank);
  const auto options = weight.options().dtype(torch::kFloat);
  const int64_t r = cfg.rank, in = weight.size(-2), out = weight.size(-1);
  LoraAdapter lora;
  if (weight.dim() == 2) {
    lora.a = owner.register_parameter(weight_name + "_lora_a", torch::zeros({in, r}, options));
    lora.b = owner.register_parameter(weight_name + "_lora_b", torch::zeros({r, out}, options));
  } else {
    const int64_t E = weight.size(0);
    lora.a = owner.register_parameter(weight_name + "_lora_a", torch::zeros({E, in, r}, options));
    lora.b = owner.register_parameter(weight_name + "_lora_b", torch::zeros({E, r, out}, options));
  }
  lora.scale = cfg.alpha / double(cfg.rank);
  lora.dropout = cfg.dropout;
  return lora;
}

bool is_lora_name(const std::string& name) {
  auto ends = [&](const std::string& suffix) {
    return name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends("_lora_a") || ends("_lora_b");
}

torch::Tensor lora_input(const torch::Tensor& x, const LoraAdapter& lora) {
  if (lora.dropout <= 0 || !torch::GradMode::is_enabled()) return x;
  return torch::dropout(x, lora.dropout, /*train=*/true);
}

torch::Tensor lora_term(const torch::Tensor& x, const LoraAdapter& lora, std::optional<torch::ScalarType> compute_dtype) {
  auto down = torch::matmul(lora_input(x, lora), cast(lora.a, compute_dtype)) * lora.scale;
  return torch::matmul(down, cast(lora.b, compute_dtype));
}

torch::Tensor lora_matmul(const torch::Tensor& x, const torch::Tensor& w, const LoraAdapter& lora,
                          std::optional<torch::ScalarType> compute_dtype) {
  auto y = torch::matmul(x, cast(w, compute_dtype));
  if (!lora.defined()) return y;
  return y + lora_term(x, lora, compute_dtype);
}

torch::Tensor lora_grouped_term(const torch::Tensor& x_RD, const torch::Tensor& offsets_E, const LoraAdapter& lora,
                                torch::ScalarType dtype) {
  // _grouped_mm wants 16-byte strides: a rank that does not give them is padded with zero columns of A
  // and zero rows of B, which add exact zeros.
  const int64_t r = lora.a.size(2), per_16 = 16 / int64_t(c10::elementSize(dtype));
  const int64_t pad = (per_16 - r % per_16) % per_16;
  auto a = cast(lora.a, dtype), b = cast(lora.b, dtype);
  if (pad > 0) {
    a = torch::constant_pad_nd(a, {0, pad});
    b = torch::constant_pad_nd(b, {0, 0, 0, pad});
  }
  auto down = at::_grouped_mm(lora_input(x_RD, lora).contiguous(), a, offsets_E) * lora.scale;
  return at::_grouped_mm(down.contiguous(), b, offsets_E);
}

}  // namespace moetrain::moe
