// Low-rank adapters (LoRA, Hu et al. 2021) on a frozen weight: y = x W + dropout(x) A B * (alpha / rank).
// Our weights are stored (in, out), so A is (in, r) and B (r, out); a routed expert's adapters are
// stacked like its weights, A (E, in, r) and B (E, r, out), and run through the experts' own path.
// The adapter math lives here, called at each matmul site of the layers that hold an adapted weight.
#pragma once
#include <torch/torch.h>

#include <optional>
#include <string>

#include "config/config.h"

namespace moetrain::moe {

struct LoraAdapter {
  torch::Tensor a;      // (in, r), or (E, in, r) for stacked experts; fp32, trained
  torch::Tensor b;      // (r, out), or (E, r, out); fp32, starts at zero
  double scale = 0;     // alpha / rank
  double dropout = 0;   // on the adapter's input while gradients are recorded
  bool defined() const { return a.defined(); }
};

// Registers `<weight_name>_lora_a` and `<weight_name>_lora_b` on `owner`, shaped for `weight` (2-D, or
// 3-D stacked experts), on its device, zero-filled: TransformerImpl::init_lora seeds A.
LoraAdapter add_lora(torch::nn::Module& owner, const std::string& weight_name, const torch::Tensor& weight,
                     const config::LoraConfig& cfg);

// Whether a parameter name is an adapter's (".._lora_a" or ".._lora_b").
bool is_lora_name(const std::string& name);

// x w in the compute dtype, plus the adapter's term when it is defined: the dense weights' matmul site.
torch::Tensor lora_matmul(const torch::Tensor& x, const torch::Tensor& w, const LoraAdapter& lora,
                          std::optional<torch::ScalarType> compute_dtype);

// The adapter's term dropout(x) A B * scale for rows x already in the compute dtype (dense adapter).
torch::Tensor lora_term(const torch::Tensor& x, const LoraAdapter& lora, std::optional<torch::ScalarType> compute_dtype);

// The stacked adapter's term for rows grouped by expert (offsets_E: int32 group ends, as _grouped_mm
// takes them): two grouped GEMMs, through the rank (zero-padded to _grouped_mm's 16-byte strides).
torch::Tensor lora_grouped_term(const torch::Tensor& x_RD, const torch::Tensor& offsets_E, const LoraAdapter& lora,
                                torch::ScalarType dtype);

// dropout(x) when the adapter has dropout and gradients are recorded (training); x otherwise.
torch::Tensor lora_input(const torch::Tensor& x, const LoraAdapter& lora);

}  // namespace moetrain::moe
