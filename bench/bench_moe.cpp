// build/moetrain_bench_moe: times forward+backward of one routed MoE layer (softmax router, dropless,
// no shared experts) per experts implementation, against the per-expert loop a Python framework would
// write. Each variant's output and input gradient are checked against that loop before it is timed.
// A developer's tool (scripts/bench_moe.sh runs it), kept out of the moetrain binary users run.
// Legend: T tokens, D model dim, E routed experts, K experts per token, F expert hidden.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>

#include "ckpt/safetensors.h"
#include "cli/args.h"
#include "common/errors.h"
#include "common/log.h"
#include "config/config.h"
#include "moe/moe.h"

namespace moetrain::cli {

namespace {

using json = nlohmann::ordered_json;

constexpr double kTolerance = 1e-4;  // max abs difference from the naive loop, fp32, output and input gradient

struct BenchOptions {
  int64_t tokens = 4096;
  int d_model = 256;
  int n_experts = 8;
  int top_k = 2;
  int expert_hidden = 384;
  int threads = 2;
  int iters = 10;
  int warmup = 2;
  uint64_t seed = 0;
  bool normalize_topk = true;
};

// The reference: the loop over experts a Python framework writes, on its own copy of the weights.
struct NaiveMoE {
  torch::Tensor router_weight;  // (E, D)
  torch::Tensor w1;             // (E, D, F)
  torch::Tensor w3;             // (E, D, F)
  torch::Tensor w2;             // (E, F, D)
  int top_k = 0;
  bool normalize_topk = true;

  std::vector<torch::Tensor> parameters() const { return {router_weight, w1, w3, w2}; }

  torch::Tensor forward(const torch::Tensor& x_TD) const {
    auto probs_TE = torch::softmax(torch::mm(x_TD, router_weight.t()), 1);
    auto [weights_TK, ids_TK] = probs_TE.topk(top_k, 1);
    if (normalize_topk) weights_TK = weights_TK / weights_TK.sum(1, true);
    auto out_TD = torch::zeros_like(x_TD);
    for (int64_t e = 0; e < w1.size(0); ++e) {
      auto where = torch::where(ids_TK == e);  // (token, slot) of every copy routed to e
      const auto& token_idx = where[0];
      const auto& slot_idx = where[1];
      if (token_idx.numel() == 0) continue;
      auto rows = x_TD.index_select(0, token_idx);
      auto h = torch::silu(rows.mm(w1[e])) * rows.mm(w3[e]);
      auto weight = weights_TK.index({token_idx, slot_idx}).unsqueeze(1);
      out_TD.index_add_(0, token_idx, h.mm(w2[e]) * weight);
    }
    return out_TD;
  }
};

// The third CPU candidate: every expert's rows padded to the largest count, one bmm per projection.
struct PaddedBmmMoE {
  NaiveMoE weights;  // the same weights and routing as the naive loop

  torch::Tensor forward(const torch::Tensor& x_TD) const {
    const int64_t T = x_TD.size(0), K = weights.top_k, E = weights.w1.size(0), D = x_TD.size(1);
    auto probs_TE = torch::softmax(torch::mm(x_TD, weights.router_weight.t()), 1);
    auto [weights_TK, ids_TK] = probs_TE.topk(K, 1);
    if (weights.normalize_topk) weights_TK = weights_TK / weights_TK.sum(1, true);
    auto flat_ids_R = ids_TK.reshape(-1);
    auto order_R = std::get<1>(torch::sort(flat_ids_R, std::optional<bool>(true), 0, false));
    auto expert_R = flat_ids_R.index_select(0, order_R);
    auto counts_E = torch::bincount(flat_ids_R, {}, E);
    const int64_t capacity = counts_E.max().item<int64_t>();
    auto start_E = torch::cumsum(counts_E, 0) - counts_E;
    auto slot_R = expert_R * capacity + (torch::arange(T * K) - start_E.index_select(0, expert_R));
    auto token_R = torch::floor_divide(order_R, K);
    auto padded_ECD = torch::zeros({E * capacity, D}, x_TD.options())
                          .index_copy(0, slot_R, x_TD.index_select(0, token_R)).view({E, capacity, D});
    auto h = torch::silu(torch::bmm(padded_ECD, weights.w1)) * torch::bmm(padded_ECD, weights.w3);
    auto y_RD = torch::bmm(h, weights.w2).view({E * capacity, D}).index_select(0, slot_R);
    auto w_R = weights_TK.reshape(-1).index_select(0, order_R).unsqueeze(1);
    return torch::zeros_like(x_TD).index_add(0, token_R, y_RD * w_R);
  }
};

using Forward = std::function<torch::Tensor(const torch::Tensor&)>;

struct Result {
  std::string name;
  std::string note;  // what "auto" resolved to, or why a variant was skipped
  bool skipped = false;
  std::vector<double> times_ms;
  double median_ms = 0, tokens_per_s = 0, out_diff = 0, grad_x_diff = 0;
};

// Gradients set to none, as zero_grad() does by default in PyTorch.
void clear_grads(const std::vector<torch::Tensor>& params, const torch::Tensor& x) {
  for (const auto& p : params) p.mutable_grad().reset();
  x.mutable_grad().reset();
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

// A variant under test: its forward, the parameters whose gradients it produces, and its result.
struct Variant {
  Forward forward;
  std::vector<torch::Tensor> params;
  Result result;
};

// forward + out.backward(g) with gradients cleared first; returns the output.
torch::Tensor step(const Variant& v, const torch::Tensor& x_TD, const torch::Tensor& g_TD) {
  clear_grads(v.params, x_TD);
  auto out_TD = v.forward(x_TD);
  out_TD.backward(g_TD);
  return out_TD.detach();
}

// Each variant checked against the reference once, then warm-up and timed iterations round-robin over
// the variants, so that a change in machine load mid-run (a shared machine) affects them all alike.
void run_variants(std::vector<Variant>& variants, const torch::Tensor& x_TD, const torch::Tensor& g_TD,
                  const torch::Tensor& ref_out_TD, const torch::Tensor& ref_grad_x_TD, const BenchOptions& opt) {
  for (auto& v : variants) {
    if (v.result.skipped) continue;
    v.result.out_diff = max_abs_diff(step(v, x_TD, g_TD), ref_out_TD);
    v.result.grad_x_diff = max_abs_diff(x_TD.grad(), ref_grad_x_TD);
  }
  for (int i = 0; i < opt.warmup + opt.iters; ++i)
    for (auto& v : variants) {
      if (v.result.skipped) continue;
      const double start = now_ms();
      step(v, x_TD, g_TD);
      if (i >= opt.warmup) v.result.times_ms.push_back(now_ms() - start);
    }
  for (auto& v : variants) {
    if (v.result.skipped) continue;
    v.result.median_ms = median(v.result.times_ms);
    v.result.tokens_per_s = double(opt.tokens) / (v.result.median_ms / 1000.0);
  }
}

std::string pad(const std::string& s, size_t width, bool right) {
  if (s.size() >= width) return s;
  return right ? std::string(width - s.size(), ' ') + s : s + std::string(width - s.size(), ' ');
}

std::string sci(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2e", v);
  return buf;
}

void print_table(const std::vector<Result>& results) {
  const std::vector<std::string> header = {"variant", "ms/iter", "tokens/s", "max|out-naive|", "max|dx-naive|", "note"};
  std::vector<std::vector<std::string>> rows = {header};
  for (const auto& r : results) {
    if (r.skipped) {
      rows.push_back({r.name, "-", "-", "-", "-", r.note});
      continue;
    }
    rows.push_back({r.name, format_double(r.median_ms, 4), format_count(r.tokens_per_s), sci(r.out_diff),
                    sci(r.grad_x_diff), r.note});
  }
  std::vector<size_t> width(header.size(), 0);
  for (const auto& row : rows)
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) line += (c ? "  " : "") + pad(row[c], width[c], c > 0 && c < 5);
    while (!line.empty() && line.back() == ' ') line.pop_back();
    log_line(line);
  }
}

bool parse_bool(const std::string& option, const std::string& text) {
  if (text == "1" || text == "true") return true;
  if (text == "0" || text == "false") return false;
  throw UsageError("--" + option + " expects 0 or 1, got '" + text + "'");
}

}  // namespace

int run_bench_moe(const std::vector<std::string>& argv) {
  const Command command{
      "",
      "Time forward+backward of one MoE layer (softmax router, dropless, no shared experts) for each experts\n"
      "implementation and for a naive per-expert loop; outputs are checked against the loop. CPU, fp32.",
      {{"tokens", "N", "tokens per call (default 4096)"},
       {"d-model", "D", "model width (default 256)"},
       {"experts", "E", "routed experts (default 8)"},
       {"top-k", "K", "experts per token (default 2)"},
       {"hidden", "F", "hidden size of each expert (default 384)"},
       {"threads", "N", "CPU intra-op threads (default 2)"},
       {"iters", "N", "timed iterations; the median is reported (default 10)"},
       {"warmup", "N", "untimed iterations first (default 2)"},
       {"seed", "S", "seed of the weights, input and upstream gradient (default 0)"},
       {"normalize-topk", "0|1", "renormalize the k chosen weights to sum to 1 (default 1)"},
       {"save-weights", "FILE", "write router/expert weights, x, g, out and grad_x as safetensors"},
       {"json", "", "print one JSON object instead of the tables"}},
      "moetrain_bench_moe"};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  BenchOptions opt;
  opt.tokens = args.get_int("tokens", int(opt.tokens));
  opt.d_model = args.get_int("d-model", opt.d_model);
  opt.n_experts = args.get_int("experts", opt.n_experts);
  opt.top_k = args.get_int("top-k", opt.top_k);
  opt.expert_hidden = args.get_int("hidden", opt.expert_hidden);
  opt.threads = args.get_int("threads", opt.threads);
  opt.iters = args.get_int("iters", opt.iters);
  opt.warmup = args.get_int("warmup", opt.warmup);
  opt.seed = args.get_u64("seed", opt.seed);
  if (args.has("normalize-topk")) opt.normalize_topk = parse_bool("normalize-topk", args.get("normalize-topk"));
  const std::initializer_list<std::pair<const char*, int>> positive = {
      {"tokens", int(opt.tokens)}, {"d-model", opt.d_model}, {"experts", opt.n_experts},
      {"hidden", opt.expert_hidden}, {"threads", opt.threads}, {"iters", opt.iters}};
  for (const auto& [name, value] : positive)
    if (value < 1) throw UsageError("--" + std::string(name) + " must be >= 1, got " + std::to_string(value));
  if (opt.warmup < 0) throw UsageError("--warmup must be >= 0, got " + std::to_string(opt.warmup));
  if (opt.top_k < 1 || opt.top_k > opt.n_experts)
    throw UsageError("--top-k (" + std::to_string(opt.top_k) + ") must be in [1, --experts (" +
                     std::to_string(opt.n_experts) + ")]");
  const bool as_json = args.has("json");
  torch::set_num_threads(opt.threads);

  config::MoEConfig cfg;
  cfg.n_experts = opt.n_experts;
  cfg.top_k = opt.top_k;
  cfg.expert_hidden = opt.expert_hidden;
  cfg.n_shared_experts = 0;
  cfg.capacity_factor.reset();
  cfg.router.score_func = "softmax";
  cfg.router.normalize_topk = opt.normalize_topk;

  // Weights scaled so that router logits and expert activations are O(1) and the checks mean something.
  torch::manual_seed(opt.seed);
  const int64_t T = opt.tokens, D = opt.d_model, E = opt.n_experts, F = opt.expert_hidden;
  auto router_weight_ED = torch::randn({E, D}) / std::sqrt(double(D));
  auto w1_EDF = torch::randn({E, D, F}) / std::sqrt(double(D));
  auto w3_EDF = torch::randn({E, D, F}) / std::sqrt(double(D));
  auto w2_EFD = torch::randn({E, F, D}) / std::sqrt(double(F));
  auto x_TD = torch::randn({T, D}).set_requires_grad(true);
  auto g_TD = torch::randn({T, D});

  auto make_layer = [&](const std::string& impl) {
    config::MoEConfig c = cfg;
    c.experts_impl = impl;
    moe::MoE layer(c, opt.d_model);
    torch::NoGradGuard no_grad;
    layer->router->weight.copy_(router_weight_ED);
    layer->experts->w1.copy_(w1_EDF);
    layer->experts->w3.copy_(w3_EDF);
    layer->experts->w2.copy_(w2_EFD);
    return layer;
  };
  auto leaf = [](const torch::Tensor& t) { return t.clone().set_requires_grad(true); };
  NaiveMoE naive{leaf(router_weight_ED), leaf(w1_EDF), leaf(w3_EDF), leaf(w2_EFD), opt.top_k, opt.normalize_topk};

  // The reference output and input gradient.
  clear_grads(naive.parameters(), x_TD);
  auto ref_out_TD = naive.forward(x_TD);
  ref_out_TD.backward(g_TD);
  ref_out_TD = ref_out_TD.detach();
  auto ref_grad_x_TD = x_TD.grad().clone();

  std::vector<Variant> variants;
  for (const std::string impl : {"auto", "grouped_mm", "sliced"}) {
    auto layer = make_layer(impl);
    Variant v;
    v.result.name = impl == "auto" ? "moetrain (auto)" : "moetrain " + impl;
    const bool grouped_ok = layer->experts->grouped_supported(x_TD, std::nullopt);
    if (impl == "auto") v.result.note = "-> " + layer->experts->resolved_impl(x_TD, std::nullopt);
    if (impl == "grouped_mm" && !grouped_ok) {
      v.result.skipped = true;
      v.result.note = "skipped: _grouped_mm needs 16-byte aligned d_model and hidden";
    }
    // The closure holds the layer (a shared module holder) for as long as the variant lives.
    v.forward = [layer, T](const torch::Tensor& x) { return layer->forward(x, T, std::nullopt).out_TD; };
    v.params = layer->parameters();
    variants.push_back(std::move(v));
  }
  PaddedBmmMoE padded{{leaf(router_weight_ED), leaf(w1_EDF), leaf(w3_EDF), leaf(w2_EFD), opt.top_k, opt.normalize_topk}};
  Forward padded_forward = [&padded](const torch::Tensor& x) { return padded.forward(x); };
  variants.push_back({padded_forward, padded.weights.parameters(), {"padded bmm"}});
  Forward naive_forward = [&naive](const torch::Tensor& x) { return naive.forward(x); };
  variants.push_back({naive_forward, naive.parameters(), {"naive loop"}});
  run_variants(variants, x_TD, g_TD, ref_out_TD, ref_grad_x_TD, opt);

  std::vector<Result> results;
  for (const auto& v : variants) results.push_back(v.result);
  torch::Tensor saved_out_TD, saved_grad_x_TD;  // moetrain (auto), for --save-weights
  if (args.has("save-weights")) {
    saved_out_TD = step(variants[0], x_TD, g_TD);
    saved_grad_x_TD = x_TD.grad().clone();
  }

  const std::vector<std::pair<std::string, std::string>> settings = {
      {"tokens", std::to_string(T)},
      {"d_model", std::to_string(D)},
      {"n_experts", std::to_string(E)},
      {"top_k", std::to_string(opt.top_k)},
      {"expert_hidden", std::to_string(F)},
      {"normalize_topk", opt.normalize_topk ? "1" : "0"},
      {"threads", std::to_string(opt.threads)},
      {"iters", std::to_string(opt.iters)},
      {"warmup", std::to_string(opt.warmup)},
      {"seed", std::to_string(opt.seed)},
      {"torch", TORCH_VERSION}};

  if (args.has("save-weights")) {
    std::map<std::string, std::string> metadata(settings.begin(), settings.end());
    ckpt::save_safetensors(args.get("save-weights"),
                           {{"router.weight", router_weight_ED},
                            {"experts.w1", w1_EDF},
                            {"experts.w3", w3_EDF},
                            {"experts.w2", w2_EFD},
                            {"x", x_TD.detach()},
                            {"g", g_TD},
                            {"out", saved_out_TD},
                            {"grad_x", saved_grad_x_TD}},
                           metadata);
  }

  if (as_json) {
    json j;
    j["config"] = {{"tokens", T},          {"d_model", D},
                   {"n_experts", E},       {"top_k", opt.top_k},
                   {"expert_hidden", F},   {"normalize_topk", opt.normalize_topk},
                   {"threads", opt.threads}, {"iters", opt.iters},
                   {"warmup", opt.warmup}, {"seed", opt.seed},
                   {"torch", TORCH_VERSION}};
    if (args.has("save-weights")) j["weights"] = args.get("save-weights");
    j["variants"] = json::array();
    for (const auto& r : results) {
      json v;
      v["name"] = r.name;
      if (r.skipped) {
        v["skipped"] = r.note;
      } else {
        v["ms"] = r.median_ms;
        v["tokens_per_s"] = r.tokens_per_s;
        v["max_abs_diff_out"] = r.out_diff;
        v["max_abs_diff_grad_x"] = r.grad_x_diff;
        v["times_ms"] = r.times_ms;
        if (!r.note.empty()) v["note"] = r.note;
      }
      j["variants"].push_back(v);
    }
    std::puts(j.dump().c_str());
    std::fflush(stdout);
  } else {
    log_table("moetrain_bench_moe", settings);
    log_line("forward + backward, median of " + std::to_string(opt.iters) + " after " + std::to_string(opt.warmup) +
             " warm-up; diffs are max abs against the naive loop");
    print_table(results);
    if (args.has("save-weights")) log_line("weights, x, g, out and grad_x saved to " + args.get("save-weights"));
  }
  for (const auto& r : results)
    if (!r.skipped && std::max(r.out_diff, r.grad_x_diff) >= kTolerance)
      throw Error("[bench] " + r.name + " differs from the naive loop by " + sci(std::max(r.out_diff, r.grad_x_diff)) +
                  " (tolerance " + sci(kTolerance) + ")");
  return 0;
}

}  // namespace moetrain::cli

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  return moetrain::cli::run_reporting_errors("moetrain_bench_moe", [&] { return moetrain::cli::run_bench_moe(args); });
}
