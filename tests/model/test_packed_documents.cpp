// Packed documents (data.packing: documents): a packed batch's loss and every gradient equal those of
// its documents run one by one, each as its own sequence from position 0. GQA and MLA (whose decoupled
// RoPE key restarts too), YaRN, MTP, the chunked loss and full activation checkpointing.
// Tolerance: 1e-5 of the largest value compared, fp32. The packed and the one-by-one runs add the same
// per-token terms in different orders and shapes (SDPA over a masked 16-token row against 5-token
// rows), which moves the last bits of fp32 sums; any mixing across documents would move them by the
// size of an attention weight, far above it.
#include <catch2/catch.hpp>

#include "../test_util.h"
#include "data/sampler.h"
#include "model/transformer.h"

using namespace moetrain;

namespace {

constexpr int64_t kIgnore = data::kIgnoreTarget;

struct Document {
  torch::Tensor tokens;   // (L,)
  torch::Tensor targets;  // (L,): the next token, kIgnore at the last and where "not learned"
};

// Rows of S tokens, each holding the listed documents back to back, then padding (token 0, position 0).
struct Packed {
  torch::Tensor tokens, targets, positions;  // (B, S)
};
Packed pack(const std::vector<std::vector<const Document*>>& rows, int64_t S) {
  const int64_t B = int64_t(rows.size());
  Packed p{torch::zeros({B, S}, torch::kLong), torch::full({B, S}, kIgnore, torch::kLong), torch::zeros({B, S}, torch::kLong)};
  for (int64_t b = 0; b < B; ++b) {
    int64_t at = 0;
    for (const Document* d : rows[size_t(b)]) {
      const int64_t L = d->tokens.size(0);
      p.tokens[b].narrow(0, at, L).copy_(d->tokens);
      p.targets[b].narrow(0, at, L).copy_(d->targets);
      p.positions[b].narrow(0, at, L).copy_(torch::arange(L, torch::kLong));
      at += L;
    }
  }
  return p;
}

std::vector<Document> make_documents(const std::vector<int64_t>& lengths, int64_t vocab, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<Document> docs;
  for (size_t i = 0; i < lengths.size(); ++i) {
    const int64_t L = lengths[i];
    auto tokens = torch::randint(1, vocab, {L}, gen, torch::kLong);
    auto targets = torch::full({L}, kIgnore, torch::kLong);
    if (L > 1) targets.narrow(0, 0, L - 1).copy_(tokens.narrow(0, 1, L - 1));
    if (i == 1 && L > 2) targets[0] = kIgnore;  // a loss mask inside a document
    docs.push_back({tokens, targets});
  }
  return docs;
}

// The objective both sides compute: summed next-token loss plus each MTP depth's summed loss.
torch::Tensor objective(const model::ForwardOutput& out) {
  auto total = out.loss;
  for (const auto& depth : out.mtp_losses) total = total + depth;
  return total;
}

struct Result {
  double value = 0;
  std::vector<torch::Tensor> grads;
};

Result run(model::TransformerImpl& model, const std::function<torch::Tensor()>& forward) {
  model.zero_grad();
  auto loss = forward();
  loss.backward();
  Result r{loss.item<double>(), {}};
  for (const auto& p : model.parameters()) r.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  return r;
}

void check_packed_equals_one_by_one(const config::ModelConfig& cfg, const std::string& checkpointing = "none",
                                    int64_t loss_chunk = 0) {
  model::Transformer model(cfg);
  model->init_weights(7);
  model->set_activation_checkpointing(checkpointing);
  model->set_loss_chunk(loss_chunk);
  const auto docs = make_documents({5, 3, 7, 9, 4, 1, 2}, cfg.vocab_size, 11);
  const int64_t S = 16;
  const auto packed = pack({{&docs[0], &docs[1], &docs[2]}, {&docs[3], &docs[4], &docs[5], &docs[6]}}, S);
  const bool mtp = cfg.mtp_depth > 0;

  const Result together = run(*model, [&] {
    return objective(model->forward_loss(packed.tokens, packed.targets, kIgnore, /*sum=*/true, mtp, packed.positions));
  });
  const Result alone = run(*model, [&] {
    torch::Tensor total = torch::zeros({});
    for (const auto& d : docs) {
      if (d.tokens.size(0) <= cfg.mtp_depth) {  // too short for an MTP depth: its next-token loss only
        total = total + model->forward_loss(d.tokens.unsqueeze(0), d.targets.unsqueeze(0), kIgnore, true, false).loss;
        continue;
      }
      total = total + objective(model->forward_loss(d.tokens.unsqueeze(0), d.targets.unsqueeze(0), kIgnore, true, mtp));
    }
    return total;
  });
  CATCH_CHECK(std::abs(together.value - alone.value) <= 1e-5 * std::abs(alone.value));
  const auto names = model->named_parameters();
  for (size_t i = 0; i < together.grads.size(); ++i) {
    const double scale = std::max(1e-3, alone.grads[i].abs().max().item<double>());
    const double diff = (together.grads[i] - alone.grads[i]).abs().max().item<double>();
    CATCH_INFO(names[i].key() << ": max difference " << diff << " of largest " << scale);
    CATCH_CHECK(diff <= 1e-5 * scale);
  }
  // Without the positions the documents see each other, and some gradient moves by far more than
  // the tolerance: the comparison can tell.
  const Result stream = run(*model, [&] {
    return objective(model->forward_loss(packed.tokens, packed.targets, kIgnore, true, mtp));
  });
  double worst = 0;
  for (size_t i = 0; i < stream.grads.size(); ++i)
    worst = std::max(worst, (stream.grads[i] - alone.grads[i]).abs().max().item<double>() /
                                std::max(1e-3, alone.grads[i].abs().max().item<double>()));
  CATCH_CHECK(worst > 1e-2);
}

config::ModelConfig gqa_config() {
  auto m = testing::tiny_model_config();
  m.max_seq_len = 16;
  m.moe.aux_loss_coef = 0;  // a balance loss over the whole batch is not a sum over documents
  return m;
}

config::ModelConfig mla_config() {
  auto m = testing::with_mla(gqa_config(), 8, 12, 8, 4, 6);
  m.yarn.factor = 4;
  m.yarn.original_max_seq_len = 8;
  m.yarn.mscale = 1;
  m.yarn.mscale_all_dim = 1;
  return m;
}

}  // namespace

CATCH_TEST_CASE("Packed documents equal the documents run one by one: GQA, loss and every gradient",
                "[model][packing]") {
  check_packed_equals_one_by_one(gqa_config());
}

CATCH_TEST_CASE("Packed documents equal the documents run one by one: MLA with YaRN", "[model][packing]") {
  check_packed_equals_one_by_one(mla_config());
}

CATCH_TEST_CASE("Packed documents equal the documents run one by one: MTP, chunked loss, checkpointing",
                "[model][packing]") {
  auto m = gqa_config();
  m.mtp_depth = 2;
  m.tie_embeddings = false;
  CATCH_SECTION("MTP depth 2") { check_packed_equals_one_by_one(m); }
  CATCH_SECTION("chunked loss of 5 tokens") { check_packed_equals_one_by_one(m, "none", 5); }
  CATCH_SECTION("full activation checkpointing") { check_packed_equals_one_by_one(m, "full"); }
  CATCH_SECTION("MLA, selective checkpointing") { check_packed_equals_one_by_one(mla_config(), "selective", 3); }
}

CATCH_TEST_CASE("TokenLayout: a token attends to the earlier tokens of its own document only", "[model][packing]") {
  const auto positions = torch::tensor({0, 1, 2, 0, 1, 0, 0}, torch::kLong).unsqueeze(0);
  const auto layout = model::TokenLayout::packed(positions);
  const auto mask = layout.mask_B1SS[0][0];
  const std::vector<std::vector<int>> expected = {{1, 0, 0, 0, 0, 0, 0}, {1, 1, 0, 0, 0, 0, 0}, {1, 1, 1, 0, 0, 0, 0},
                                                  {0, 0, 0, 1, 0, 0, 0}, {0, 0, 0, 1, 1, 0, 0}, {0, 0, 0, 0, 0, 1, 0},
                                                  {0, 0, 0, 0, 0, 0, 1}};
  for (int i = 0; i < 7; ++i)
    for (int j = 0; j < 7; ++j) {
      CATCH_INFO(i << ", " << j);
      CATCH_CHECK(mask[i][j].item<bool>() == bool(expected[size_t(i)][size_t(j)]));
    }
  const auto first = layout.first(4);
  CATCH_CHECK(first.mask_B1SS.sizes() == torch::IntArrayRef({1, 1, 4, 4}));
  CATCH_CHECK(first.positions_BS.sizes() == torch::IntArrayRef({1, 4}));
}
