// The optimizer step (see step.h) and the process settings every command that runs a model applies.
#include "train/step.h"

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <thread>

#include "common/errors.h"
#include "common/host_sync.h"
#include "common/log.h"
#include "optim/qk_clip.h"

using json = nlohmann::json;

namespace moetrain::train {

double now_s() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}

void require_same_config(dist::Communicator& world, const config::Config& cfg) {
  if (world.world_size() == 1) return;
  std::string mine;  // "key=value" lines, rank-local keys left out
  for (const auto& [key, value] : config::flatten(cfg))
    if (key != "run.threads") mine += key + "=" + value + "\n";
  const auto all = dist::all_gather_strings(world, mine);
  const auto lines = [](const std::string& text) {
    std::vector<std::string> out;
    for (size_t at = 0, nl; at < text.size(); at = nl + 1) out.push_back(text.substr(at, (nl = text.find('\n', at)) - at));
    return out;
  };
  const auto first = lines(all[0]);
  for (size_t r = 1; r < all.size(); ++r) {
    if (all[r] == all[0]) continue;
    const auto other = lines(all[r]);
    for (size_t i = 0; i < std::max(first.size(), other.size()); ++i) {
      const std::string a = i < first.size() ? first[i] : "(none)", b = i < other.size() ? other[i] : "(none)";
      if (a == b) continue;
      const auto eq = a.find('=');
      throw ConfigError("the ranks were started with different configs: rank " + std::to_string(r) + " has " + b +
                        ", rank 0 has " + a.substr(eq == std::string::npos ? 0 : eq + 1) +
                        " (" + a.substr(0, eq) + "); every rank of a job must run the same config and --set options");
    }
  }
}

void require_equal_replicas(const dist::Layout& layout, const std::vector<model::RoledParam>& params) {
  // Per role, the sum and the sum of squares of every element in fp64, written exactly (%a): equal
  // weights give equal text, and a replica that differs in any weight almost surely does not.
  const auto fingerprint = [&](model::ParamRole role) {
    double sum = 0, squares = 0;
    for (const auto& p : params) {
      if (p.role != role) continue;
      const auto t = p.tensor.detach().to(torch::kDouble);
      sum += t.sum().item<double>();
      squares += t.square().sum().item<double>();
    }
    char text[80];
    std::snprintf(text, sizeof text, "%a %a", sum, squares);
    return std::string(text);
  };
  const auto check = [&](dist::Communicator& group, model::ParamRole role, const std::string& what) {
    if (group.world_size() == 1) return;
    const auto all = dist::all_gather_strings(group, fingerprint(role));
    for (size_t r = 1; r < all.size(); ++r)
      if (all[r] != all[0])
        throw DistError("the " + what + " weights differ between replicas at start (rank " + std::to_string(group.world_rank_of(int(r))) +
                        " and rank " + std::to_string(group.world_rank_of(0)) + " of " + group.name() +
                        "): every replica must load the same model.init_from and run.seed");
  };
  check(layout.dp ? *layout.dp : *layout.world, model::ParamRole::replicated, "replicated");
  check(*layout.edp, model::ParamRole::expert, "routed experts'");
}

void MoETelemetry::add(const model::ForwardOutput& out) {
  if (load_LE.empty()) {
    layers = out.moe_layers;
    for (const auto& st : out.moe_stats) {
      load_LE.push_back(torch::zeros_like(st.tokens_per_expert_E));
      dropped_L.push_back(torch::zeros_like(st.dropped));
      for (auto* v : {&aux_L, &seq_aux_L, &z_L, &entropy_L}) v->push_back(torch::zeros_like(st.aux_loss).detach());
    }
  }
  for (size_t l = 0; l < out.moe_stats.size(); ++l) {
    const auto& st = out.moe_stats[l];
    load_LE[l] += st.tokens_per_expert_E;
    dropped_L[l] += st.dropped;
    aux_L[l] += st.aux_loss.detach();
    seq_aux_L[l] += st.seq_aux_loss.detach();
    z_L[l] += st.z_loss.detach();
    entropy_L[l] += st.entropy.detach();
  }
  ++micro_batches;
}

void MoETelemetry::write(json& rec) const {
  if (load_LE.empty()) {  // a dense model
    rec["aux_loss"] = 0.0;
    return;
  }
  json per_layer = json::array();
  double aux_sum = 0, worst = 0, dropped = 0, routed = 0;
  for (size_t l = 0; l < load_LE.size(); ++l) {
    auto load = load_LE[l].to(torch::kCPU);
    std::vector<int64_t> counts(load.data_ptr<int64_t>(), load.data_ptr<int64_t>() + load.numel());
    const double total = double(load.sum().item<int64_t>());
    const double max_over_mean = total > 0 ? double(load.max().item<int64_t>()) * double(counts.size()) / total : 0;
    const double layer_dropped = double(dropped_L[l].item<int64_t>());
    const double n = micro_batches;
    json j;
    j["layer"] = layers[l];
    j["tokens_per_expert"] = counts;
    j["max_over_mean"] = max_over_mean;
    j["drop_fraction"] = total > 0 ? layer_dropped / total : 0.0;
    j["aux_loss"] = aux_L[l].item<double>() / n;
    j["seq_aux_loss"] = seq_aux_L[l].item<double>() / n;
    j["z_loss"] = z_L[l].item<double>() / n;
    j["entropy"] = entropy_L[l].item<double>() / n;
    aux_sum += j["aux_loss"].get<double>();
    worst = std::max(worst, max_over_mean);
    dropped += layer_dropped;
    routed += total;
    per_layer.push_back(j);
  }
  rec["aux_loss"] = aux_sum / double(load_LE.size());
  rec["load_max_over_mean"] = worst;
  rec["drop_fraction"] = routed > 0 ? dropped / routed : 0.0;
  rec["moe"] = per_layer;
}

bool test_fault(const char* kind, int64_t step, int rank) {
  const char* v = std::getenv("MOETRAIN_TEST_NONFINITE");
  if (!v) return false;
  std::string spec(v);
  const auto colon = spec.find(':');
  if (colon != std::string::npos && std::to_string(rank) != spec.substr(colon + 1)) return false;
  spec = spec.substr(0, colon);
  const auto at = spec.find('@');
  if (at == std::string::npos || spec.substr(0, at) != kind) return false;
  std::istringstream steps(spec.substr(at + 1));
  for (std::string s; std::getline(steps, s, ',');)
    if (s == std::to_string(step)) return true;
  return false;
}

namespace {

// "nan", "inf" or "-inf" without the sign bit noise of printf ("-nan").
std::string number_text(double x) { return std::isnan(x) ? "nan" : format_double(x); }

}  // namespace

namespace {

// Forward and backward of the step's micro-batches through this rank's pipeline stage, in the 1F1B
// order; the last stage's share of the step's cross-entropy (share_of, see train_step) summed into
// loss_sum. Each stage's backward starts from its output's gradient and its own balance loss, so the
// gradients are those of one process's cross-entropy over the step's learned targets plus its
// (balance + MTP loss) / grad_accum.
void pipeline_micro_batches(model::TransformerImpl& model, const dist::DataParallel& parallel, const config::Config& cfg,
                            torch::Device device, const std::function<data::Batch(int micro)>& batch_of,
                            const std::vector<torch::Tensor>& share_of, torch::Tensor& loss_sum,
                            torch::Tensor& mtp_sum, MoETelemetry& telemetry, dist::Optimizer& optimizer) {
  const int n = cfg.train.grad_accum;
  const dist::Layout& layout = parallel.layout();
  dist::PipelineSchedule schedule(parallel.shared_layout(), {cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.d_model},
                                  torch::TensorOptions().dtype(torch::kFloat).device(device));
  schedule.train(n, [&](int micro, const torch::Tensor& input) {
    auto batch = batch_of(micro);  // a pure function of the step: every stage draws the same batch
    const auto tokens = upload(batch.inputs, device);  // the last stage's MTP modules look them up too
    auto out = model.forward_stage(layout.first_stage() ? tokens : input, upload(batch.targets, device), data::kIgnoreTarget,
                                   /*sum=*/false, /*with_mtp=*/true, tokens, batch.positions);
    out.logits_BSV = torch::Tensor();
    telemetry.add(out);
    if (!layout.last_stage()) return dist::StageForward{out.hidden_BSD, out.balance_loss / n};
    // A micro-batch without a learned target (its mean 0/0) has no share (undefined).
    const auto& share = share_of[size_t(micro)];
    const auto ce = share.defined() ? out.loss * share.to(out.loss.scalar_type()) : torch::zeros_like(out.loss);
    loss_sum += ce.detach().to(torch::kDouble);
    auto rest = out.balance_loss;
    if (out.mtp_loss.defined()) {
      rest = rest + out.mtp_loss;
      mtp_sum += torch::stack(out.mtp_losses).detach().to(mtp_sum.device(), torch::kDouble);
    }
    return dist::StageForward{torch::Tensor(), ce + rest / n};
  }, [&](int micro) {
    if (micro == n - 1) optimizer.before_last_backward();
  });
}

}  // namespace

void MoETelemetry::gather_stages(const dist::Layout& layout, const config::ModelConfig& m) {
  if (layout.pp_size() == 1 || m.n_layers == m.dense_layers) return;
  // The MTP modules' MoE blocks follow as layers n_layers, n_layers + 1, ... (the last stage's).
  const int64_t L = m.n_layers - m.dense_layers + m.mtp_depth, E = m.moe.n_experts;
  auto device = torch::Device(layout.pp->backend() == "nccl" ? torch::kCUDA : torch::kCPU);
  // One row per MoE layer of the whole model: [load (E), dropped] in int64 and the four losses in
  // fp64; each stage fills its layers' rows and the sum over the stages fills them all.
  auto counts = torch::zeros({L, E + 1}, torch::TensorOptions().dtype(torch::kLong).device(device));
  auto losses = torch::zeros({L, 4}, torch::TensorOptions().dtype(torch::kDouble).device(device));
  for (size_t i = 0; i < layers.size(); ++i) {
    const int64_t row = layers[i] - m.dense_layers;
    counts[row].narrow(0, 0, E).copy_(load_LE[i]);
    counts[row][E].copy_(dropped_L[i]);
    losses[row].copy_(torch::stack({aux_L[i], seq_aux_L[i], z_L[i], entropy_L[i]}).to(torch::kDouble));
  }
  layout.pp->all_reduce_sum(counts);
  layout.pp->all_reduce_sum(losses);
  layers.clear();
  for (auto* v : {&load_LE, &dropped_L, &aux_L, &seq_aux_L, &z_L, &entropy_L}) v->clear();
  for (int64_t row = 0; row < L; ++row) {
    layers.push_back(int(row) + m.dense_layers);
    load_LE.push_back(counts[row].narrow(0, 0, E));
    dropped_L.push_back(counts[row][E]);
    aux_L.push_back(losses[row][0].to(torch::kFloat));
    seq_aux_L.push_back(losses[row][1].to(torch::kFloat));
    z_L.push_back(losses[row][2].to(torch::kFloat));
    entropy_L.push_back(losses[row][3].to(torch::kFloat));
  }
}

namespace {

// MuonClip's QK-clip after the update (optim/qk_clip.h). Each head's maximum is taken over the step's
// micro-batches and this stage's data-parallel ranks (every one holds the attention whole) by an
// all-gather and a max: the Communicator has no max reduction, and this is one float per head. Every
// replica then rescales the same weights by the same factors and stays bit-identical; each pipeline
// stage clips its own layers. Returns [largest logit, heads clipped] of the whole model.
torch::Tensor clip_attention(model::TransformerImpl& model, const dist::Layout& layout, double tau) {
  auto maxima = optim::take_max_logits(model);
  dist::Communicator& replicas = layout.dp ? *layout.dp : *layout.world;
  if (maxima.defined() && replicas.world_size() > 1)
    maxima = std::get<0>(replicas.all_gather(maxima).view({replicas.world_size(), -1}).max(0));
  auto stats = maxima.defined()
                   ? optim::qk_clip(model, maxima, tau)
                   : torch::tensor({-std::numeric_limits<float>::infinity(), 0.0f});
  if (layout.pp_size() > 1) {  // the stages' pairs: the largest logit, the clipped heads summed
    const auto all = layout.pp->all_gather(stats).view({layout.pp_size(), 2});
    stats = torch::stack({all.select(1, 0).max(), all.select(1, 1).sum()});
  }
  return stats;
}

}  // namespace

torch::Tensor upload(const torch::Tensor& host, torch::Device device) {
  if (!device.is_cuda()) return host.to(device);
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

StepOutcome train_step(model::TransformerImpl& model, dist::Optimizer& optimizer, dist::DataParallel& parallel,
                       const config::Config& cfg, int64_t step, double lr, torch::Device device,
                       const std::function<data::Batch(int micro)>& batch_of, const std::function<bool()>& stop_requested) {
  StepOutcome outcome;
  optimizer.zero_grad();
  const double qk_tau = cfg.optim.qk_clip_tau;
  if (qk_tau > 0) {  // MuonClip: the attention layers track this step's logits (a skipped step's are dropped)
    optim::track_max_logits(model, true);
    optim::take_max_logits(model);
  }
  const auto fp64 = torch::TensorOptions().dtype(torch::kDouble).device(device);
  const int depth = cfg.model.mtp_depth;
  // The cross-entropy and each MTP depth's, summed over the micro-batches on the device (the last
  // stage's; zeros elsewhere): the host reads them once, with the step's health.
  auto loss_sum = torch::zeros({}, fp64);
  auto mtp_sum = torch::zeros({depth}, fp64);
  // The gradient fault: a hook makes one element of this rank's first gradient NaN before autograd
  // accumulates it, so that the reduction (during backward or after) meets it as this rank's own.
  std::optional<unsigned> fault_hook;
  if (test_fault("grad", step + 1, parallel.rank()))
    fault_hook = parallel.params().front().register_hook([](const torch::Tensor& g) {
      auto bad = g.clone();
      bad.view(-1)[0] = std::nan("");
      return bad;
    });
  // The step's loss is the mean over every learned target of the step, on every micro-batch and
  // data-parallel rank: micro-batch m's mean weighs (its targets x dp) / (the step's targets), and the
  // ranks' gradient average takes the dp back out. Packed documents and loss masks give micro-batches
  // different counts, and a mean of their means would weigh a target by the company it keeps (and
  // differ between layouts). The counts are the host's (the batches are drawn there); their sum over
  // the ranks is one collective on the device, never read back.
  std::vector<data::Batch> batches;
  std::vector<double> learned;
  double local = 0;
  for (int micro = 0; micro < cfg.train.grad_accum; ++micro) {
    batches.push_back(batch_of(micro));
    learned.push_back(double(batches.back().targets.ne(data::kIgnoreTarget).sum().item<int64_t>()));
    local += learned.back();
  }
  auto targets = torch::full({}, local, fp64);
  if (parallel.world_size() > 1) parallel.world().all_reduce_sum(targets);  // every stage holds its dp rank's batch
  targets = targets / double(parallel.layout().pp_size());
  std::vector<torch::Tensor> share_of;
  for (double n : learned) share_of.push_back(n > 0 ? n * double(parallel.dp_size()) / targets : torch::Tensor());
  const auto drawn = [&](int micro) { return batches.at(size_t(micro)); };
  if (parallel.layout().pp_size() > 1) {
    pipeline_micro_batches(model, parallel, cfg, device, drawn, share_of, loss_sum, mtp_sum, outcome.telemetry,
                           optimizer);
  } else {
    for (int micro = 0; micro < cfg.train.grad_accum; ++micro) {
      const auto& batch = batches[size_t(micro)];
      auto out = model.forward_loss(upload(batch.inputs, device), upload(batch.targets, device), data::kIgnoreTarget,
                                    /*sum=*/false, /*with_mtp=*/true, batch.positions);
      out.logits_BSV = torch::Tensor();  // backward needs the log-probabilities, not the logits: free them
      // A micro-batch without a learned target (its mean 0/0) has no share (undefined).
      const auto& share = share_of[size_t(micro)];
      const auto ce = share.defined() ? out.loss * share.to(out.loss.scalar_type()) : torch::zeros_like(out.loss);
      auto rest = out.balance_loss;
      if (out.mtp_loss.defined()) {
        rest = rest + out.mtp_loss;
        mtp_sum += torch::stack(out.mtp_losses).detach().to(torch::kDouble);
      }
      if (micro == cfg.train.grad_accum - 1) optimizer.before_last_backward();
      (ce + rest / cfg.train.grad_accum).backward();
      loss_sum += ce.detach().to(torch::kDouble);
      outcome.telemetry.add(out);
    }
  }
  if (fault_hook) parallel.params().front().remove_hook(*fault_hook);
  if (test_fault("loss", step + 1, parallel.rank())) loss_sum.fill_(std::nan(""));
  const auto grad_max_abs = optimizer.reduce_gradients();

  // The step's health, its gradient norm, the stop vote and the MTP losses: one row per rank of
  // [loss, largest |gradient| before averaging, part of the squared norm, stop flag], then the MTP
  // sums, filled on the device, summed over the world in one collective and read in one copy. A
  // non-finite value stays in the slot of the rank that produced it, so every rank takes the same
  // decision and an error can name the rank.
  const int W = parallel.world_size(), r = parallel.rank();
  constexpr int kColumns = 4;
  auto slots = torch::zeros({W * kColumns + depth}, fp64);
  const bool stop_here = stop_requested && stop_requested();
  slots.narrow(0, r * kColumns, kColumns)
      .copy_(torch::stack({loss_sum, grad_max_abs.to(fp64).reshape({}),
                           optimizer.norm_part().to(fp64).reshape({}),
                           torch::full({}, stop_here ? 1.0 : 0.0, fp64)}));
  if (depth > 0) slots.narrow(0, W * kColumns, depth).copy_(mtp_sum);
  if (W > 1) parallel.world().all_reduce_sum(slots);
  const auto host = host_read(slots, "step.health").contiguous();
  const double* h = host.data_ptr<double>();

  if (depth > 0)  // the mean over micro-batches and the last stage's data-parallel ranks, on every rank
    for (int d = 0; d < depth; ++d)
      outcome.mtp_losses.push_back(h[W * kColumns + d] / double(cfg.train.grad_accum * parallel.dp_size()));
  std::string bad_loss, bad_grad;
  double loss_total = 0, squares = 0;
  for (int q = 0; q < W; ++q) {
    const double loss = h[q * kColumns], largest = h[q * kColumns + 1];
    loss_total += loss;
    squares += h[q * kColumns + 2];
    outcome.stop = outcome.stop || h[q * kColumns + 3] != 0;
    if (!std::isfinite(loss)) bad_loss += (bad_loss.empty() ? "" : ", ") + std::to_string(q);
    if (!std::isfinite(largest)) bad_grad += (bad_grad.empty() ? "" : ", ") + std::to_string(q);
  }
  outcome.grad_norm = std::sqrt(squares);
  // Only the last pipeline stage computes the loss (the others report 0): the mean over its dp ranks.
  outcome.loss = loss_total / double(parallel.dp_size());
  if (!bad_loss.empty() || !bad_grad.empty() || !std::isfinite(outcome.grad_norm)) {
    outcome.applied = false;
    if (!bad_loss.empty()) outcome.nonfinite = "loss " + number_text(outcome.loss) + " on rank " + bad_loss;
    if (!bad_grad.empty())
      outcome.nonfinite += (outcome.nonfinite.empty() ? "" : ", ") + std::string("non-finite gradients on rank ") + bad_grad;
    outcome.nonfinite += (outcome.nonfinite.empty() ? "" : ", ") + std::string("grad norm ") + number_text(outcome.grad_norm);
    optimizer.zero_grad();
    parallel.sum_load(outcome.telemetry.load_LE, outcome.telemetry.dropped_L);
    outcome.telemetry.gather_stages(parallel.layout(), cfg.model);
    return outcome;
  }
  const double max_norm = cfg.optim.grad_clip;
  if (max_norm > 0 && outcome.grad_norm > max_norm) optimizer.scale_gradients(max_norm / (outcome.grad_norm + 1e-6));
  optimizer.step(lr);
  if (qk_tau > 0) outcome.qk_clip = clip_attention(model, parallel.layout(), qk_tau);
  parallel.sum_load(outcome.telemetry.load_LE, outcome.telemetry.dropped_L);
  model.update_router_bias(outcome.telemetry.load_LE);  // this stage's layers
  outcome.telemetry.gather_stages(parallel.layout(), cfg.model);
  return outcome;
}

torch::Device resolve_device(const config::RunConfig& run) { return dist::claim_device(run.device); }

model::ComputeDtype resolve_compute_dtype(const config::RunConfig& run) {
  if (run.dtype == "bf16") return torch::kBFloat16;
  return std::nullopt;
}

int threads_for(int run_threads, const char* omp_num_threads, unsigned cores, int local_ranks) {
  if (run_threads > 0) return run_threads;
  if (omp_num_threads) {
    char* end = nullptr;
    const long n = std::strtol(omp_num_threads, &end, 10);
    if (end != omp_num_threads && *end == '\0' && n > 0 && n <= 1 << 16) return int(n);
  }
  return std::max(1, int(std::max(1u, cores)) / std::max(1, local_ranks));
}

void configure_threads(const config::RunConfig& run) {
  at::set_num_threads(threads_for(run.threads, std::getenv("OMP_NUM_THREADS"), std::thread::hardware_concurrency(),
                                  dist::read_launch_env().local_world_size));
}

void configure_determinism(const config::RunConfig& run) {
  auto& context = at::globalContext();
  const bool on = run.deterministic;
  if (on) ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
  context.setDeterministicAlgorithms(on, /*warn_only=*/false);
  context.setDeterministicCuDNN(on);
  context.setBenchmarkCuDNN(false);
  // Flash and memory-efficient attention accumulate their backward with atomics (or may; LibTorch's
  // list does not promise otherwise): the math backend is plain matmuls and a softmax.
  context.setSDPUseFlash(!on);
  context.setSDPUseMemEfficient(!on);
  context.setSDPUseCuDNN(!on);
  context.setSDPUseMath(true);
}

}  // namespace moetrain::train
