// Two tensor helpers every layer uses: the compute-dtype cast and a shape as messages print it.
#pragma once
#include <torch/torch.h>

#include <optional>
#include <sstream>
#include <string>

namespace moetrain {

// `t` in `dtype`; unchanged when it is already in it or when `dtype` is empty (fp32 compute).
inline torch::Tensor cast(const torch::Tensor& t, std::optional<torch::ScalarType> dtype) {
  return dtype && t.scalar_type() != *dtype ? t.to(*dtype) : t;
}

// "[2, 3]".
inline std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream s;
  s << shape;
  return s.str();
}

}  // namespace moetrain
