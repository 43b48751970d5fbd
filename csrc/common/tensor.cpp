// The compute-dtype cast with its copies of the parameters (see tensor.h).
#include "common/tensor.h"

#include <atomic>
#include <map>
#include <mutex>

namespace moetrain {

namespace {

std::atomic<bool> g_cached_casts{true};

// The cast's autograd node for a cached copy: forward hands out the copy made from the parameter,
// backward gives the parameter the gradient in its own dtype, exactly as Tensor::to's backward does.
struct CachedCast : public torch::autograd::Function<CachedCast> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& param,
                               const torch::Tensor& copy) {
    ctx->saved_data["dtype"] = int64_t(param.scalar_type());
    return copy;  // an input returned unchanged: autograd hands out a view of it with this node attached
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto dtype = static_cast<torch::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grads[0].defined() ? grads[0].to(dtype) : torch::Tensor(), torch::Tensor()};
  }
};

// One copy per (parameter, dtype), valid while the parameter is alive and unchanged: the same
// tensor object (weak reference), the same storage and the same version (every in-place write,
// an optimizer step, a checkpoint load or an all-gather of ZeRO's shards, bumps it).
using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Copy {
  WeakImpl owner;
  int64_t version;
  const void* data;
  torch::Tensor tensor;
};

std::mutex g_mutex;  // forward runs on the caller's thread, a recomputed block on autograd's
std::map<std::pair<const c10::TensorImpl*, int>, Copy> g_copies;

torch::Tensor compute_copy(const torch::Tensor& param, torch::ScalarType dtype) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto key = std::make_pair(param.unsafeGetTensorImpl(), int(dtype));
  auto it = g_copies.find(key);
  if (it != g_copies.end()) {
    const auto& c = it->second;
    const auto alive = c.owner.lock();
    if (alive.get() == param.unsafeGetTensorImpl() && c.version == int64_t(param._version()) &&
        c.data == param.data_ptr())
      return c.tensor;
  }
  // A miss: the parameter is new or has changed since. Copies of freed tensors go at the same time.
  for (auto e = g_copies.begin(); e != g_copies.end();) e = e->second.owner.expired() ? g_copies.erase(e) : std::next(e);
  torch::Tensor copy;
  {
    torch::NoGradGuard no_grad;
    copy = param.detach().to(dtype);
  }
  g_copies.insert_or_assign(key, Copy{WeakImpl(param.getIntrusivePtr()), int64_t(param._version()), param.data_ptr(), copy});
  return copy;
}

}  // namespace

torch::Tensor cast(const torch::Tensor& t, std::optional<torch::ScalarType> dtype) {
  if (!dtype || t.scalar_type() == *dtype) return t;
  if (!g_cached_casts.load() || !t.is_leaf() || !t.requires_grad()) return t.to(*dtype);
  auto copy = compute_copy(t, *dtype);
  if (!torch::GradMode::is_enabled()) return copy;
  return CachedCast::apply(t, copy);
}

void set_cached_casts(bool on) {
  g_cached_casts.store(on);
  if (on) return;
  std::lock_guard<std::mutex> lock(g_mutex);
  g_copies.clear();
}

bool cached_casts() { return g_cached_casts.load(); }

void forget_cached_casts(const torch::Tensor& param) {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto e = g_copies.begin(); e != g_copies.end();)
    e = e->first.first == param.unsafeGetTensorImpl() ? g_copies.erase(e) : std::next(e);
}

}  // namespace moetrain
