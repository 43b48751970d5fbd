// GRPO (`moetrain rl`, DeepSeekMath / DeepSeek-R1): for each prompt a group of sampled completions
// (the KV-cache sampler of generate.h), verifiable rewards, advantages normalised within the group and a
// clipped surrogate against the log-probs taken at rollout time; optionally a k3 KL to the initial model,
// GSPO's sequence-level ratio, DAPO's clip-higher and routing replay for MoE layers.
// Legend: P prompts, G completions per prompt, B = P * G rows, N = L - 1 predicted positions of a row of L tokens.
#pragma once
#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

#include "config/config.h"
#include "data/prompts.h"
#include "model/transformer.h"
#include "train/trainer.h"

namespace moetrain::train::rl {

// A prompt, its answer and the tokens its rollouts start from; rl.prompts is a .jsonl or a set that
// `moetrain prepare-data --rl` or scripts/prepare_data.py --rl wrote (data/prompts.h).
using Prompt = data::RLPrompt;
using PromptSet = data::PromptSet;

// The text of a completion's tokens for the rewards: the tokens decoded through the set's table. A
// subword set's final stop token (its EOS, an end of turn) is not text and is left out; a byte set's
// stop character (rl.stop) is kept, as in every completion of a byte set.
std::string completion_text(const PromptSet& set, const std::vector<int64_t>& completion);

// Advantages (P, G) of rewards (P, G): group_norm (r - mean) / (std + 1e-4) with the population std,
// mean_only r - mean (Dr. GRPO). A group of equal rewards gets zeros.
torch::Tensor group_advantages(const torch::Tensor& rewards_PG, const std::string& mode);

// k3 estimate of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0).
torch::Tensor k3_kl(const torch::Tensor& logp, const torch::Tensor& ref_logp);

struct SurrogateInputs {
  torch::Tensor logp_BN;      // policy log-probs of the tokens (autograd to the weights)
  torch::Tensor old_logp_BN;  // the same at rollout time (no gradient)
  torch::Tensor ref_logp_BN;  // the reference's; undefined without rl.kl_coef
  torch::Tensor advantage_B;  // one per row
  torch::Tensor mask_BN;      // 1 on response tokens, 0 elsewhere (fp32)
  // What the sums are divided by: the response tokens (token aggregation) or rows (sequence) of the
  // whole batch over every rank, divided by the ranks (their gradient average divides by them again).
  // 0 = this batch's own count.
  double denominator = 0;
};
struct SurrogateTerms {
  torch::Tensor loss;           // () to minimise: -(clipped surrogate) + kl_coef * k3
  torch::Tensor clip_fraction;  // () response tokens (token ratio) or rows (sequence ratio) where the clip was active
  torch::Tensor kl;             // () mean k3 over response tokens (0 without a reference)
};
SurrogateTerms grpo_loss(const SurrogateInputs& in, const config::RLConfig& rl);

// The answer exact_answer compares: the text of the last <tag>...</tag> (answer_from tag), of the last
// \boxed{...} (braces nested; boxed) or the completion less a final stop character (whole), trimmed;
// nullopt when there is none.
std::optional<std::string> extract_answer(const std::string& completion, const config::RLConfig& rl);
// DeepSeek-R1's template: <think>...</think> then <answer>...</answer>, whitespace around and between
// (and a final stop character) allowed, nothing else.
bool follows_r1_template(const std::string& completion, const std::string& stop = "");
// The built-in reward of one completion: exact_answer (1 or 0) plus format_reward when it follows the template.
double builtin_reward(const std::string& completion, const std::string& answer, const config::RLConfig& rl);
// rl.reward_command: one JSON line {prompt, completion, answer} per completion on the command's stdin,
// one number per line back. A timeout, a non-zero exit, a missing or bad number is an Error naming the command.
struct Scored {
  std::string prompt, completion, answer;
};
std::vector<double> command_rewards(const std::string& command, double timeout_s, const std::vector<Scored>& items);

// The log-probability of each next token, log softmax(logits / temperature) at tokens[:, 1:]: (B, N),
// with entropy_BN the entropy of each of those distributions (no gradient) and with balance_loss the
// MoE layers' weighted balancing losses of the forward.
torch::Tensor token_logprobs(const model::TransformerImpl& model, const torch::Tensor& tokens_BL, double temperature,
                             torch::Tensor* entropy_BN = nullptr, torch::Tensor* balance_loss = nullptr);

// rl.routing_replay: hooks every MoE router of `model` (RouterImpl::set_replay) for its lifetime. During
// the rollout it records each token's experts; finish_recording lays them out as the update's batch
// (row b's token j at [b, j]); in an update's forward it compares (and with replay, forces) the experts
// of every recorded token. Outside those phases the routers choose as usual.
class RoutingReplay {
 public:
  explicit RoutingReplay(model::TransformerImpl& model);
  ~RoutingReplay();
  RoutingReplay(const RoutingReplay&) = delete;
  RoutingReplay& operator=(const RoutingReplay&) = delete;
  bool empty() const { return routers_.empty(); }  // a model without MoE layers
  // A rollout batch may be sampled in several generate_batch calls: each is recorded between
  // start_recording and finish_recording, its rows following the previous call's; lay_out then makes
  // the update's batch of all of them. begin_rollout forgets the previous batch.
  void begin_rollout();
  void start_recording();
  // The call's rows were left-padded to prompt_width (row b's tokens from slot starts_B[b]) and are
  // lengths_B[b] tokens long.
  void finish_recording(const std::vector<int64_t>& starts_B, const std::vector<int64_t>& lengths_B, int64_t prompt_width);
  // The update's batch: every recorded row, right-padded to batch_width.
  void lay_out(int64_t batch_width);
  // The update's forwards route the recorded rows [first, first + n) (a pass of rl.micro_batch_rows);
  // n < 0: every row. begin_update selects every row.
  void select_rows(int64_t first, int64_t n);
  void begin_update(bool replay);
  void end_update();
  // The fraction of the recorded tokens' expert choices that the update's forwards used and the rollout did
  // not (0 under replay); router_mismatch: the same for the routers' own choices. nullopt: none compared.
  std::optional<double> take_mismatch(double* router_mismatch = nullptr);
  const torch::Tensor& recorded(size_t moe_layer) const { return recorded_.at(moe_layer); }  // (B, L, K), -1 = none

 private:
  enum class Mode { off, record, compare, replay };
  torch::Tensor on_route(size_t layer, const torch::Tensor& ids_TK);
  std::vector<moe::RouterImpl*> routers_;
  std::vector<std::vector<torch::Tensor>> calls_;  // per MoE layer: the rollout's router calls in order
  std::vector<std::vector<torch::Tensor>> pieces_;  // per MoE layer: each call's (rows, length, K)
  std::vector<torch::Tensor> recorded_;           // per MoE layer: (B, L, K) int64
  Mode mode_ = Mode::off;
  int64_t row_first_ = 0, row_count_ = -1;  // select_rows
  double mismatched_ = 0, router_mismatched_ = 0, compared_ = 0;
};

struct RLResult {
  int64_t first_step = 0, last_step = 0;  // rollout batches
  std::vector<double> reward_means;       // of each rollout batch this process ran
  std::optional<double> first_eval_accuracy, last_eval_accuracy;  // held-out (rl.eval_prompts), greedy
  bool interrupted = false;
  std::string last_checkpoint;
};
// The whole run: set-up, resume, rollouts, updates, metrics.jsonl, checkpoints at rollout-batch
// boundaries, SIGTERM. train.steps counts rollout batches.
RLResult run(const config::Config& cfg, const TrainOptions& options);

}  // namespace moetrain::train::rl
