// transformers 5's own checkpoint layout: a MoE layer's routed experts as two stacked tensors
// (mlp.experts.gate_up_proj (E, 2F, D), mlp.experts.down_proj (E, D, F); Mixtral's block_sparse_moe
// renamed mlp), which save_pretrained(save_original_format=False) writes. For each family, the tiny
// model of scripts/hf_reference.py saved that way by transformers imports to the very weights of its
// per-expert folder (so to transformers' logits), also one expert-parallel rank's share of one pipeline
// stage; and `convert --expert-layout packed` writes that layout, which transformers loads with the same
// logits and which re-imports bit for bit.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "ckpt/safetensors.h"
#include "hf/hf.h"
#include "train/generate.h"

using namespace moetrain;
using Catch::Matchers::Contains;

namespace {

const std::string kSource = MOETRAIN_SOURCE_DIR;
const std::string kBinary = MOETRAIN_BINARY;

void reference(const std::string& args) {
  const auto r = testing::run_command("OMP_NUM_THREADS=1 " + kSource + "/third_party/venv/bin/python " + kSource +
                                      "/scripts/hf_reference.py " + args);
  CATCH_INFO(r.output);
  CATCH_REQUIRE(r.exit_code == 0);
}

double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  CATCH_REQUIRE(a.sizes() == b.sizes());
  return (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
}

void check_same_weights(model::TransformerImpl& got, model::TransformerImpl& want, const std::string& what) {
  auto theirs = want.named_parameters();
  for (const auto& p : got.named_parameters()) {
    CATCH_INFO(what << ": " << p.key());
    CATCH_REQUIRE(theirs.contains(p.key()));
    CATCH_CHECK(torch::equal(p.value(), theirs[p.key()]));
  }
}

}  // namespace

CATCH_TEST_CASE("hf: stacked experts (transformers 5's layout) import and export, every family", "[hf]") {
  for (const std::string family : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v2", "glm4_moe"}) {
    CATCH_INFO(family);
    testing::TempDir dir("expert-layout-" + family);
    reference("make " + family + " " + dir.str("per-expert"));
    reference("repack " + dir.str("per-expert") + " " + dir.str("packed"));
    const auto names = hf::read_weight_map(dir.str("packed"));
    CATCH_REQUIRE(names.count("model.layers.1.mlp.experts.gate_up_proj"));
    for (const auto& [name, file] : names) CATCH_CHECK(name.find("experts.0.") == std::string::npos);

    auto per_expert = hf::load(dir.str("per-expert"));
    auto packed = hf::load(dir.str("packed"));
    check_same_weights(*packed.model, *per_expert.model, "the whole model");
    const std::string ref = dir.str("per-expert/reference.safetensors");
    const auto tokens = ckpt::SafetensorsFile(ref).load("tokens");
    {
      torch::NoGradGuard no_grad;
      CATCH_CHECK(max_abs_diff(packed.model->forward(tokens).logits_BSV, ckpt::SafetensorsFile(ref).load("logits")) < 1e-4);
    }

    // The second of two expert-parallel ranks on the second of two pipeline stages reads only its share.
    const auto& m = packed.hf.model;
    model::Transformer share(m, moe::ExpertShard{2, 1}, model::LayerRange{1, -1});
    hf::load_weights(dir.str("packed"), packed.hf.family, *share);
    auto whole = per_expert.model->named_parameters();
    const int64_t half = m.moe.n_experts / 2;
    for (const auto& p : share->named_parameters()) {
      CATCH_INFO(p.key());
      CATCH_REQUIRE(whole.contains(p.key()));
      const auto want = p.key().find(".moe.experts.") != std::string::npos ? whole[p.key()].slice(0, half) : whole[p.key()];
      CATCH_CHECK(torch::equal(p.value(), want));
    }

    // Export in that layout: transformers reads it with the same logits; we read it back bit for bit.
    const auto r = testing::run_command(kBinary + " convert --from hf:" + dir.str("per-expert") + " --to hf:" +
                                        dir.str("exported") + " --expert-layout packed");
    CATCH_INFO(r.output);
    CATCH_REQUIRE(r.exit_code == 0);
    const auto exported = hf::read_weight_map(dir.str("exported"));
    CATCH_CHECK(exported.count("model.layers.1.mlp.experts.down_proj"));
    for (const auto& [name, file] : exported) {
      CATCH_CHECK(name.find("experts.0.") == std::string::npos);
      CATCH_CHECK(name.find("block_sparse_moe") == std::string::npos);
    }
    reference("logits " + dir.str("exported") + " " + ref + " " + dir.str("logits.safetensors"));
    CATCH_CHECK(max_abs_diff(ckpt::SafetensorsFile(dir.str("logits.safetensors")).load("logits"),
                             ckpt::SafetensorsFile(ref).load("logits")) < 1e-4);
    auto again = hf::load(dir.str("exported"));
    check_same_weights(*again.model, *per_expert.model, "re-imported");
  }
  const auto bad = testing::run_command(kBinary + " convert --from hf:nowhere --to hf:x --expert-layout fused");
  CATCH_CHECK(bad.exit_code != 0);
  CATCH_CHECK_THAT(bad.output, Contains("--expert-layout must be per-expert or packed"));
}
