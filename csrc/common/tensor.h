// Two tensor helpers every layer uses: the compute-dtype cast and a shape as messages print it.
#pragma once
#include <torch/torch.h>

#include <optional>
#include <sstream>
#include <string>

namespace moetrain {

// `t` in `dtype`; unchanged when it is already in it or when `dtype` is empty (fp32 compute).
// A parameter (a leaf that requires grad: the fp32 master weights under run.dtype bf16) is cast once
// and its copy kept and handed out to every use until the parameter changes (a new version: the
// optimizer step, a checkpoint load, ZeRO's all-gather), instead of a new copy per use and per
// micro-batch. Under autograd the copy comes through a node whose backward returns the gradient in
// the parameter's dtype, as Tensor::to's does, so values and gradients are those of a plain cast.
torch::Tensor cast(const torch::Tensor& t, std::optional<torch::ScalarType> dtype);
// Turns the kept copies on (the default) or off (every cast a new copy; for comparisons).
void set_cached_casts(bool on);
bool cached_casts();
// Drops `param`'s kept copies: it is now held in the compute dtype itself (ZeRO-1's sharded masters).
void forget_cached_casts(const torch::Tensor& param);

// "[2, 3]".
inline std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream s;
  s << shape;
  return s.str();
}

}  // namespace moetrain
