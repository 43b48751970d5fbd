// optim.name muon in `plan` and `cost`: the hidden matrices' count and their Newton-Schulz FLOPs from the
// config against the model's own parameters, and the optimizer state against what optim::Muon holds.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "cost/flops.h"
#include "cost/memory.h"
#include "cost/plan.h"
#include "model/transformer.h"
#include "optim/muon.h"

using namespace moetrain;

namespace {

// The model's hidden matrices, each logical matrix (and each expert) apart: elements and FLOPs.
std::pair<double, double> counted_from_model(const config::ModelConfig& m) {
  model::Transformer model(m);
  double params = 0, flops = 0;
  for (const auto& p : model->roled_parameters()) {
    if (!p.hidden_matrix) continue;
    params += double(p.tensor.numel());
    const double batch = p.tensor.dim() == 3 ? double(p.tensor.size(0)) : 1.0;
    const double rows = double(p.tensor.size(-2));
    std::vector<double> cols;
    if (p.column_widths.empty()) cols.push_back(double(p.tensor.size(-1)));
    for (const int64_t w : p.column_widths) cols.push_back(double(w * p.column_heads));
    for (const double c : cols) {
      const double small = std::min(rows, c), large = std::max(rows, c);
      flops += batch * 5 * (2 * small * small * large + 2 * small * small * small + 2 * small * small * large);
    }
  }
  return {params, flops};
}

}  // namespace

CATCH_TEST_CASE("muon_cost counts the hidden matrices and their Newton-Schulz FLOPs as the model holds them",
                "[cost][optim]") {
  for (const bool mla : {false, true})
    for (const int mtp : {0, 1}) {
      auto m = testing::tiny_model_config();
      if (mla) m = testing::with_mla(m, 8, 8, 4, 2, 4);
      m.mtp_depth = mtp;
      CATCH_INFO((mla ? "MLA" : "GQA") << ", mtp_depth " << mtp);
      const auto [params, flops] = counted_from_model(m);
      const auto c = cost::muon_cost(m);
      CATCH_CHECK(c.replicated_params + c.expert_params == params);
      CATCH_CHECK(c.replicated_flops + c.expert_flops == Approx(flops).epsilon(1e-12));
      const double moe_blocks = m.n_layers - m.dense_layers + mtp;  // an MTP module's block is a MoE block here
      CATCH_CHECK(c.expert_params == moe_blocks * m.moe.n_experts * 3 * m.d_model * m.moe.expert_hidden);
    }
}

CATCH_TEST_CASE("plan and the memory floor count one momentum per matrix element under Muon, as optim::Muon holds",
                "[cost][optim]") {
  config::Config cfg;
  cfg.model = testing::tiny_model_config();
  cfg.data.seq_len = 16;
  cfg.train.micro_batch_size = 2;
  const auto adamw = cost::plan_memory(cfg, 1);
  cfg.optim.name = "muon";
  const auto muon = cost::plan_memory(cfg, 1);
  double state_bytes = 0;
  {
    model::Transformer model(cfg.model);
    optim::Muon optimizer(model->roled_parameters(), cfg.optim, model::is_no_decay, false);
    for (const auto& s : optimizer.states())
      for (const auto& t : {s.exp_avg, s.exp_avg_sq, s.momentum})
        if (t.defined()) state_bytes += double(t.nbytes());
  }
  CATCH_CHECK(muon.optimizer == state_bytes);
  CATCH_CHECK(muon.optimizer < adamw.optimizer);
  CATCH_CHECK(adamw.optimizer - muon.optimizer == 4 * counted_from_model(cfg.model).first);
  CATCH_CHECK(cost::estimate_memory(cfg.model, 1, 1, 0, /*muon=*/true).optimizer_bytes == state_bytes);

  // Expert parallel: a rank holds its share of the experts' momenta.
  cfg.parallel.expert_parallel = 2;
  const auto c = cost::muon_cost(cfg.model);
  CATCH_CHECK(cost::plan_memory(cfg, 2).optimizer ==
              Approx(8 * cost::plan_memory(cfg, 2).params_per_rank - 4 * (c.replicated_params + c.expert_params / 2)));
  // ZeRO-1 at world 4: each matrix's momentum lives on one of its replicas (4 for replicated matrices,
  // 2 for an ep rank's experts), so a rank holds about 1/replicas of them.
  cfg.parallel.zero = 1;
  cfg.optim.name = "adamw";
  const double adamw_zero1 = cost::plan_memory(cfg, 4).optimizer;
  cfg.optim.name = "muon";
  CATCH_CHECK(cost::plan_memory(cfg, 4).optimizer ==
              Approx(adamw_zero1 - 4 * (c.replicated_params / 4 + c.expert_params / 2 / 2)));
}
