// GRPO: the math (advantages, the clipped surrogate, k3), the rewards (answer extraction, R1 format,
// an external command), routing replay, and the run loop of `moetrain rl`. The rollouts are the
// KV-cache sampler of generate.cpp; set-up, resume, checkpoints and signals are train's (step.h).
#include "train/rl.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ckpt/checkpoint.h"
#include "ckpt/sha256.h"
#include "common/errors.h"
#include "common/fault.h"
#include "common/files.h"
#include "common/log.h"
#include "data/tokenizer.h"
#include "dist/expert_parallel.h"
#include "hf/hf.h"
#include "optim/adamw.h"
#include "train/generate.h"
#include "train/step.h"
#include "train/tensorboard.h"

using json = nlohmann::json;

namespace moetrain::train::rl {

torch::Tensor group_advantages(const torch::Tensor& rewards_PG, const std::string& mode) {
  TORCH_CHECK(rewards_PG.dim() == 2, "[rl] rewards must be (prompts, group), got ", rewards_PG.sizes());
  const auto r = rewards_PG.to(torch::kDouble);
  const auto centered = r - r.mean(1, /*keepdim=*/true);
  if (mode == "mean_only") return centered.to(torch::kFloat);
  const auto std_P1 = centered.pow(2).mean(1, /*keepdim=*/true).sqrt();
  return (centered / (std_P1 + 1e-4)).to(torch::kFloat);
}

torch::Tensor k3_kl(const torch::Tensor& logp, const torch::Tensor& ref_logp) {
  const auto d = ref_logp - logp;
  return torch::exp(d) - d - 1;
}

SurrogateTerms grpo_loss(const SurrogateInputs& in, const config::RLConfig& rl) {
  TORCH_CHECK(in.logp_BN.sizes() == in.old_logp_BN.sizes() && in.logp_BN.sizes() == in.mask_BN.sizes() &&
                  in.advantage_B.dim() == 1 && in.advantage_B.size(0) == in.logp_BN.size(0),
              "[rl] surrogate: logp ", in.logp_BN.sizes(), ", old ", in.old_logp_BN.sizes(), ", mask ",
              in.mask_BN.sizes(), ", advantages ", in.advantage_B.sizes());
  const double low = rl.clip_eps, high = rl.clip_eps_high > 0 ? rl.clip_eps_high : rl.clip_eps;
  const auto mask = in.mask_BN.to(in.logp_BN.scalar_type());
  const auto adv_B = in.advantage_B.to(in.logp_BN.scalar_type());
  const auto lens_B = mask.sum(1).clamp_min(1);
  const auto log_ratio_BN = in.logp_BN - in.old_logp_BN.detach();
  SurrogateTerms out;
  torch::Tensor per_token_BN;  // the loss of each token before aggregation
  if (rl.ratio == "sequence") {  // GSPO: s = exp(mean log ratio over the response), clipped per sequence
    const auto ratio_B = torch::exp((log_ratio_BN * mask).sum(1) / lens_B);
    const auto clipped_B = ratio_B.clamp(1 - low, 1 + high);
    per_token_BN = (-torch::min(ratio_B * adv_B, clipped_B * adv_B)).unsqueeze(1).expand_as(mask);
    const auto active = ((adv_B > 0) & (ratio_B > 1 + high)) | ((adv_B < 0) & (ratio_B < 1 - low));
    const auto rows = (lens_B > 0).to(mask.scalar_type()) * (mask.sum(1) > 0).to(mask.scalar_type());
    out.clip_fraction = (active.to(mask.scalar_type()) * rows).sum().detach() / rows.sum().clamp_min(1);
  } else {
    const auto ratio_BN = torch::exp(log_ratio_BN);
    const auto clipped_BN = ratio_BN.clamp(1 - low, 1 + high);
    const auto adv_B1 = adv_B.unsqueeze(1);
    per_token_BN = -torch::min(ratio_BN * adv_B1, clipped_BN * adv_B1);
    const auto active = ((adv_B1 > 0) & (ratio_BN > 1 + high)) | ((adv_B1 < 0) & (ratio_BN < 1 - low));
    out.clip_fraction = (active.to(mask.scalar_type()) * mask).sum().detach() / mask.sum().clamp_min(1);
  }
  if (in.ref_logp_BN.defined() && rl.kl_coef > 0) {
    const auto kl_BN = k3_kl(in.logp_BN, in.ref_logp_BN.detach());
    per_token_BN = per_token_BN + rl.kl_coef * kl_BN;
    out.kl = (kl_BN * mask).sum().detach() / mask.sum().clamp_min(1);
  } else {
    out.kl = torch::zeros({}, mask.options());
  }
  if (rl.loss_aggregation == "sequence") {
    const double denom = in.denominator > 0 ? in.denominator : double(mask.size(0));
    out.loss = ((per_token_BN * mask).sum(1) / lens_B).sum() / denom;
  } else {
    const auto denom = in.denominator > 0 ? torch::full({}, in.denominator, mask.options()) : mask.sum().clamp_min(1);
    out.loss = (per_token_BN * mask).sum() / denom;
  }
  return out;
}

namespace {

std::string trim(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t\r\n") - first + 1);
}

std::string without_stop(const std::string& text, const std::string& stop) {
  if (!text.empty() && !stop.empty() && stop.find(text.back()) != std::string::npos) return text.substr(0, text.size() - 1);
  return text;
}

size_t count_of(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + what.size())) ++n;
  return n;
}

}  // namespace

std::optional<std::string> extract_answer(const std::string& completion, const config::RLConfig& rl) {
  if (rl.answer_from == "whole") return trim(without_stop(completion, rl.stop));
  if (rl.answer_from == "boxed") {
    const std::string open = "\\boxed{";
    const auto at = completion.rfind(open);
    if (at == std::string::npos) return std::nullopt;
    int depth = 1;
    for (size_t i = at + open.size(); i < completion.size(); ++i) {
      if (completion[i] == '{') ++depth;
      if (completion[i] == '}' && --depth == 0) return trim(completion.substr(at + open.size(), i - at - open.size()));
    }
    return std::nullopt;  // unclosed
  }
  const std::string open = "<" + rl.answer_tag + ">", close = "</" + rl.answer_tag + ">";
  const auto at = completion.rfind(open);
  if (at == std::string::npos) return std::nullopt;
  const auto end = completion.find(close, at + open.size());
  if (end == std::string::npos) return std::nullopt;
  return trim(completion.substr(at + open.size(), end - at - open.size()));
}

bool follows_r1_template(const std::string& completion, const std::string& stop) {
  const std::string text = trim(without_stop(completion, stop));
  for (const char* tag : {"<think>", "</think>", "<answer>", "</answer>"})
    if (count_of(text, tag) != 1) return false;
  const auto think = text.find("<think>"), think_end = text.find("</think>");
  const auto answer = text.find("<answer>"), answer_end = text.find("</answer>");
  if (think != 0 || think_end < think || answer < think_end) return false;
  if (!trim(text.substr(think_end + 8, answer - think_end - 8)).empty()) return false;
  return answer_end > answer && answer_end + 9 == text.size();
}

double builtin_reward(const std::string& completion, const std::string& answer, const config::RLConfig& rl) {
  const auto got = extract_answer(completion, rl);
  double reward = got && *got == trim(answer) ? 1.0 : 0.0;
  if (rl.format_reward > 0 && follows_r1_template(completion, rl.stop)) reward += rl.format_reward;
  return reward;
}

std::vector<double> command_rewards(const std::string& command, double timeout_s, const std::vector<Scored>& items) {
  const std::string who = "[rl] rl.reward_command '" + command + "'";
  std::string input;
  for (const auto& it : items)
    input += json{{"prompt", it.prompt}, {"completion", it.completion}, {"answer", it.answer}}.dump(
                 -1, ' ', false, json::error_handler_t::replace) + "\n";
  int to_child[2], from_child[2];
  if (::pipe(to_child) != 0) throw Error(who + ": pipe failed: " + std::strerror(errno));
  if (::pipe(from_child) != 0) {
    ::close(to_child[0]);
    ::close(to_child[1]);
    throw Error(who + ": pipe failed: " + std::strerror(errno));
  }
  const pid_t pid = ::fork();
  if (pid < 0) throw Error(who + ": fork failed: " + std::strerror(errno));
  if (pid == 0) {  // the child: its own process group, so that a timeout ends the whole pipeline
    ::setpgid(0, 0);
    ::dup2(to_child[0], 0);
    ::dup2(from_child[1], 1);
    ::close(to_child[0]);
    ::close(to_child[1]);
    ::close(from_child[0]);
    ::close(from_child[1]);
    ::execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(to_child[0]);
  ::close(from_child[1]);
  ::fcntl(to_child[1], F_SETFL, O_NONBLOCK);
  ::fcntl(from_child[0], F_SETFL, O_NONBLOCK);
  auto prev_pipe = std::signal(SIGPIPE, SIG_IGN);  // a command that stops reading must not end us
  const double deadline = now_s() + timeout_s;
  size_t written = 0;
  std::string output;
  int write_fd = to_child[1], read_fd = from_child[0];
  if (input.empty()) ::close(write_fd), write_fd = -1;
  int status = 0;
  bool exited = false, timed_out = false;
  while (true) {
    const double left = deadline - now_s();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    if (read_fd < 0 && write_fd < 0) {  // both pipes done: wait for the exit
      const pid_t r = ::waitpid(pid, &status, WNOHANG);
      if (r == pid) {
        exited = true;
        break;
      }
      ::usleep(2000);
      continue;
    }
    pollfd fds[2];
    int n = 0;
    if (write_fd >= 0) fds[n++] = {write_fd, POLLOUT, 0};
    if (read_fd >= 0) fds[n++] = {read_fd, POLLIN, 0};
    if (::poll(fds, nfds_t(n), int(std::min(left * 1000, 100.0)) + 1) < 0 && errno != EINTR) break;
    for (int i = 0; i < n; ++i) {
      if (fds[i].fd == write_fd && (fds[i].revents & (POLLOUT | POLLERR | POLLHUP))) {
        const ssize_t w = ::write(write_fd, input.data() + written, input.size() - written);
        if (w > 0) written += size_t(w);
        if ((w < 0 && errno != EAGAIN) || written == input.size()) ::close(write_fd), write_fd = -1;
      } else if (fds[i].fd == read_fd && (fds[i].revents & (POLLIN | POLLERR | POLLHUP))) {
        char buf[4096];
        const ssize_t r = ::read(read_fd, buf, sizeof buf);
        if (r > 0) output.append(buf, size_t(r));
        if (r == 0 || (r < 0 && errno != EAGAIN)) ::close(read_fd), read_fd = -1;
      }
    }
  }
  if (write_fd >= 0) ::close(write_fd);
  if (read_fd >= 0) ::close(read_fd);
  if (!exited) {
    ::kill(-pid, SIGKILL);
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
  }
  std::signal(SIGPIPE, prev_pipe);
  if (timed_out)
    throw Error(who + " timed out after " + format_double(timeout_s) + " s (rl.reward_timeout_s) scoring " +
                std::to_string(items.size()) + " completions");
  if (!exited) throw Error(who + ": waiting for it failed: " + std::strerror(errno));
  if (WIFSIGNALED(status)) throw Error(who + " was killed by signal " + std::to_string(WTERMSIG(status)));
  if (WEXITSTATUS(status) != 0) throw Error(who + " exited with status " + std::to_string(WEXITSTATUS(status)));
  std::vector<double> rewards;
  std::istringstream lines(output);
  std::string line;
  for (int n = 1; std::getline(lines, line); ++n) {
    const std::string text = trim(line);
    if (text.empty()) continue;
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (end != text.c_str() + text.size() || !std::isfinite(v))
      throw Error(who + ": output line " + std::to_string(n) + " '" + text.substr(0, 40) + "' is not a finite number");
    rewards.push_back(v);
  }
  if (rewards.size() != items.size())
    throw Error(who + " wrote " + std::to_string(rewards.size()) + " numbers for " + std::to_string(items.size()) +
                " completions (one per line expected)");
  return rewards;
}

torch::Tensor token_logprobs(const model::TransformerImpl& model, const torch::Tensor& tokens_BL, double temperature,
                             torch::Tensor* entropy_BN, torch::Tensor* balance_loss) {
  const int64_t L = tokens_BL.size(1);
  auto out = model.forward(tokens_BL);
  if (balance_loss) *balance_loss = out.balance_loss;
  const auto logp_BNV = torch::log_softmax(out.logits_BSV.narrow(1, 0, L - 1) / temperature, -1);
  if (entropy_BN) {
    torch::NoGradGuard no_grad;
    *entropy_BN = -(logp_BNV.exp() * logp_BNV).sum(-1);
  }
  return logp_BNV.gather(2, tokens_BL.narrow(1, 1, L - 1).unsqueeze(2)).squeeze(2);
}

// ---- routing replay ------------------------------------------------------------------------------

RoutingReplay::RoutingReplay(model::TransformerImpl& model) {
  for (auto& block : model.blocks) {
    if (block->moe.is_empty()) continue;
    const size_t layer = routers_.size();
    routers_.push_back(block->moe->router.get());
    block->moe->router->set_replay([this, layer](const torch::Tensor& ids_TK) { return on_route(layer, ids_TK); });
  }
  calls_.resize(routers_.size());
  pieces_.resize(routers_.size());
  recorded_.resize(routers_.size());
}

RoutingReplay::~RoutingReplay() {
  for (auto* router : routers_) router->set_replay(nullptr);
}

void RoutingReplay::start_recording() {
  mode_ = Mode::record;
  for (auto& c : calls_) c.clear();
}

torch::Tensor RoutingReplay::on_route(size_t layer, const torch::Tensor& ids_TK) {
  if (mode_ == Mode::off) return ids_TK;
  if (mode_ == Mode::record) {
    calls_[layer].push_back(ids_TK.clone());
    return ids_TK;
  }
  const auto rec_BLK = row_count_ < 0 || !recorded_[layer].defined() ? recorded_[layer]
                                                                      : recorded_[layer].narrow(0, row_first_, row_count_);
  TORCH_CHECK(rec_BLK.defined() && rec_BLK.size(0) * rec_BLK.size(1) == ids_TK.size(0),
              "[rl] routing replay: the update routes ", ids_TK.size(0), " tokens, the rollout recorded ",
              rec_BLK.defined() ? rec_BLK.size(0) * rec_BLK.size(1) : 0);
  const auto rec_TK = rec_BLK.reshape({-1, ids_TK.size(1)}).to(ids_TK.device());
  const auto valid_T1 = (rec_TK >= 0).all(1, /*keepdim=*/true);
  const auto used_TK = mode_ == Mode::replay ? torch::where(valid_T1, rec_TK, ids_TK) : ids_TK;
  auto differ = [&](const torch::Tensor& ids) {  // copies whose expert the rollout did not choose for that token
    const auto found_TK = (ids.unsqueeze(2) == rec_TK.unsqueeze(1)).any(2);
    return (found_TK.logical_not() & valid_T1).sum().to(torch::kDouble);
  };
  mismatched_ += differ(used_TK).item<double>();
  router_mismatched_ += differ(ids_TK).item<double>();
  compared_ += (valid_T1.sum() * ids_TK.size(1)).item<double>();
  return mode_ == Mode::replay ? used_TK : ids_TK;
}

void RoutingReplay::begin_rollout() {
  for (auto& p : pieces_) p.clear();
}

void RoutingReplay::finish_recording(const std::vector<int64_t>& starts_B, const std::vector<int64_t>& lengths_B,
                                     int64_t prompt_width) {
  mode_ = Mode::off;
  const int64_t B = int64_t(starts_B.size());
  const int64_t width = lengths_B.empty() ? 0 : *std::max_element(lengths_B.begin(), lengths_B.end());
  for (size_t layer = 0; layer < calls_.size(); ++layer) {
    const auto& calls = calls_[layer];
    TORCH_CHECK(!calls.empty(), "[rl] routing replay: MoE layer ", layer, " recorded nothing in the rollout");
    const int64_t K = calls[0].size(1);
    std::vector<torch::Tensor> parts{calls[0].to(torch::kCPU).view({B, prompt_width, K})};  // the prompt pass
    for (size_t s = 1; s < calls.size(); ++s) parts.push_back(calls[s].to(torch::kCPU).view({B, 1, K}));
    const auto slots_BSK = torch::cat(parts, 1);  // one entry per cache slot that went through the model
    auto rec = torch::full({B, width, K}, int64_t(-1), torch::kLong);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = std::min(lengths_B[size_t(b)], slots_BSK.size(1) - starts_B[size_t(b)]);
      if (n > 0) rec[b].narrow(0, 0, n).copy_(slots_BSK[b].narrow(0, starts_B[size_t(b)], n));
    }
    pieces_[layer].push_back(rec);
    calls_[layer].clear();
  }
}

void RoutingReplay::lay_out(int64_t batch_width) {
  for (size_t layer = 0; layer < pieces_.size(); ++layer) {
    std::vector<torch::Tensor> rows;
    for (const auto& piece : pieces_[layer]) {
      TORCH_CHECK(piece.size(1) <= batch_width, "[rl] routing replay: recorded rows of ", piece.size(1),
                  " tokens do not fit the update's ", batch_width);
      rows.push_back(torch::constant_pad_nd(piece, {0, 0, 0, batch_width - piece.size(1)}, -1));
    }
    recorded_[layer] = torch::cat(rows, 0);
  }
}

void RoutingReplay::select_rows(int64_t first, int64_t n) {
  row_first_ = first;
  row_count_ = n;
}

void RoutingReplay::begin_update(bool replay) {
  mode_ = replay ? Mode::replay : Mode::compare;
  select_rows(0, -1);
}

void RoutingReplay::end_update() { mode_ = Mode::off; }

std::optional<double> RoutingReplay::take_mismatch(double* router_mismatch) {
  std::optional<double> out;
  if (compared_ > 0) out = mismatched_ / compared_;
  if (router_mismatch && compared_ > 0) *router_mismatch = router_mismatched_ / compared_;
  mismatched_ = router_mismatched_ = compared_ = 0;
  return out;
}

// ---- the run ---------------------------------------------------------------------------------------

std::string completion_text(const PromptSet& set, const std::vector<int64_t>& completion) {
  const bool stopped = !set.is_bytes() && !completion.empty() &&
                       std::find(set.stop_ids.begin(), set.stop_ids.end(), completion.back()) != set.stop_ids.end();
  if (!stopped) return set.table.decode(completion);
  return set.table.decode({completion.begin(), completion.end() - 1});
}

namespace {

// The prompts of rollout batch `step`: a seeded permutation of all prompts per epoch, read in order, so
// the sampler is a pure function of (seed, step) and a resume continues it exactly.
std::vector<int64_t> batch_prompts(uint64_t seed, int64_t step, int64_t per_step, int64_t n_prompts) {
  std::vector<int64_t> ids;
  int64_t epoch_held = -1;
  torch::Tensor order;
  for (int64_t k = step * per_step; k < (step + 1) * per_step; ++k) {
    const int64_t epoch = k / n_prompts;
    if (epoch != epoch_held) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(seed ^ (0x9e3779b97f4a7c15ull * uint64_t(epoch + 1)));
      order = torch::randperm(n_prompts, gen, torch::kLong);
      epoch_held = epoch;
    }
    ids.push_back(order[k % n_prompts].item<int64_t>());
  }
  return ids;
}

// What ends a completion: a subword set's stop tokens, or the bytes of rl.stop.
std::vector<int64_t> stop_ids(const config::RLConfig& rl, const PromptSet& set) {
  if (!set.is_bytes()) return set.stop_ids;
  std::vector<int64_t> ids;
  for (unsigned char c : rl.stop) ids.push_back(int64_t(c));
  return ids;
}

// Greedy exact-match accuracy over the held-out prompts (the answer as exact_answer extracts it). Every
// rank decodes all of them in lockstep: with several ranks the MoE layers' forwards are collective (the
// expert all-to-all, the routers' global counts), so every rank must run the same ones.
double held_out_accuracy(const model::TransformerImpl& model, const PromptSet& set, const config::RLConfig& rl,
                         const dist::Layout& layout) {
  const auto& prompts = set.prompts;
  GenerateOptions options;
  options.temperature = 0;
  options.max_new_tokens = rl.max_new_tokens;
  options.stop_ids = stop_ids(rl, set);
  options.lockstep = layout.world->world_size() > 1;
  const int64_t n = rl.eval_limit > 0 ? std::min<int64_t>(rl.eval_limit, int64_t(prompts.size())) : int64_t(prompts.size());
  double correct = 0;
  constexpr int64_t kChunk = 64;
  for (int64_t first = 0; first < n; first += kChunk) {
    std::vector<std::vector<int64_t>> batch;
    for (int64_t i = first; i < std::min(n, first + kChunk); ++i) batch.push_back(prompts[size_t(i)].tokens);
    const auto out = generate_batch(model, batch, options);
    for (size_t i = 0; i < out.size(); ++i) {
      const auto& p = prompts[size_t(first) + i];
      const auto got = extract_answer(completion_text(set, {out[i].begin() + int64_t(batch[i].size()), out[i].end()}), rl);
      correct += got && *got == trim(p.answer) ? 1 : 0;
    }
  }
  return correct / double(std::max<int64_t>(1, n));
}

// A prompt set the model can run and decode: the model's vocabulary holds the set's tokens, rl.stop (bytes)
// only for byte sets, every prompt fits with its completion, and the set was tokenized with the
// tokenizer of model.init_from when that is a Hugging Face folder holding one.
void check_prompt_set(const PromptSet& set, const std::string& key, const config::Config& cfg) {
  const std::string path = key == "rl.prompts" ? cfg.rl.prompts : cfg.rl.eval_prompts;
  const auto& init = cfg.model.init_from;
  if (!set.is_bytes() && !init.empty() && init.rfind("ckpt:", 0) != 0) {
    const auto tokenizer_json = files::join(hf::hf_dir(init), "tokenizer.json");
    if (files::exists(tokenizer_json) && ckpt::sha256_file(tokenizer_json) != set.tokenizer_sha256)
      throw ConfigError(key + " (" + path + ") was tokenized with another tokenizer than model.init_from's " +
                        tokenizer_json + ": prepare it with scripts/prepare_data.py --rl --tokenizer " + hf::hf_dir(init));
  }
  if (cfg.model.vocab_size < set.table.size())
    throw ConfigError("model.vocab_size = " + std::to_string(cfg.model.vocab_size) + " is smaller than the " +
                      std::to_string(set.table.size()) + " tokens of " + key + " (" + path + ", tokenizer '" +
                      set.tokenizer + "')");
  if (!set.is_bytes() && !cfg.rl.stop.empty())
    throw ConfigError("rl.stop names bytes, but " + key + " (" + path + ") is tokenized with '" + set.tokenizer +
                      "', whose completions end at the stop tokens its set names (scripts/prepare_data.py --rl "
                      "--stop-token); leave rl.stop empty");
  for (size_t i = 0; i < set.prompts.size(); ++i)
    if (int64_t(set.prompts[i].tokens.size()) + cfg.rl.max_new_tokens > cfg.model.max_seq_len)
      throw ConfigError(key + " prompt " + std::to_string(i + 1) + " has " + std::to_string(set.prompts[i].tokens.size()) +
                        " tokens: with rl.max_new_tokens = " + std::to_string(cfg.rl.max_new_tokens) +
                        " it does not fit model.max_seq_len = " + std::to_string(cfg.model.max_seq_len));
}

// The frozen reference of the k3 penalty: the policy's initial weights (seeded init, then model.init_from),
// placed and sharded as the policy is. Built only when rl.kl_coef > 0.
model::Transformer build_reference(const Process& p) {
  model::Transformer m(p.cfg.model, dist::expert_shard(*p.layout));
  m->init_weights(p.cfg.run.seed);
  if (!p.cfg.model.init_from.empty()) hf::load_init_from(*m, p.cfg.model.init_from);
  m->place(p.device, p.compute_dtype);
  for (auto& param : m->parameters()) param.set_requires_grad(false);
  dist::parallelize(*m, p.layout);
  return m;
}

// Marks the update batch's right padding for every MoE router of `model` while it lives (the update's
// forwards): padding must not count in the balancing losses, where it would pull the router and make
// data-parallel layouts differ (each rank pads its rows to its own longest).
class BalanceMask {
 public:
  BalanceMask(model::TransformerImpl& model, const torch::Tensor& counted_BL) {
    for (auto& block : model.blocks)
      if (!block->moe.is_empty()) routers_.push_back(block->moe->router.get());
    for (auto* router : routers_) router->set_balance_mask(counted_BL.reshape(-1));
  }
  ~BalanceMask() {
    for (auto* router : routers_) router->set_balance_mask({});
  }
  BalanceMask(const BalanceMask&) = delete;
  BalanceMask& operator=(const BalanceMask&) = delete;

 private:
  std::vector<moe::RouterImpl*> routers_;
};

}  // namespace

RLResult run(const config::Config& given, const TrainOptions& options) {
  // ---- set-up ------------------------------------------------------------------------------------
  StopSignals signals;
  const Process process(given);
  const auto& layout = process.layout;
  const auto& comm = layout->world;
  const config::Config& cfg = process.cfg;
  const config::RLConfig& rl = cfg.rl;
  const torch::Device device = process.device;
  const std::string& out_dir = cfg.run.out_dir;
  const std::string config_yaml = config::to_yaml(cfg);
  if (rl.prompts.empty())
    throw ConfigError("rl.prompts is empty: moetrain rl needs a .jsonl file of prompts and answers, or a set moetrain prepare-data --rl wrote");
  if (layout->pp_size() > 1) throw ConfigError("parallel.pipeline_parallel must be 1 for moetrain rl (pipelined rollouts are not built)");
  if (rl.prompts_per_step % layout->dp_size() != 0)
    throw ConfigError("rl.prompts_per_step = " + std::to_string(rl.prompts_per_step) +
                      " must be a multiple of the data-parallel ranks (" + std::to_string(layout->dp_size()) + ")");
  const PromptSet train_set = data::load_prompts(rl.prompts);
  check_prompt_set(train_set, "rl.prompts", cfg);
  PromptSet eval_set;
  if (!rl.eval_prompts.empty()) {
    eval_set = data::load_prompts(rl.eval_prompts);
    check_prompt_set(eval_set, "rl.eval_prompts", cfg);
    if (eval_set.table_sha256 != train_set.table_sha256)
      throw ConfigError("rl.eval_prompts (" + rl.eval_prompts + ", tokenizer '" + eval_set.tokenizer +
                        "') and rl.prompts (" + rl.prompts + ", tokenizer '" + train_set.tokenizer +
                        "') decode their tokens differently: prepare both with the same tokenizer");
  }
  const auto& prompts = train_set.prompts;
  const auto& eval_prompts = eval_set.prompts;

  Trainable trainable(process);
  auto& model = trainable.model;
  auto& optimizer = *trainable.optimizer;
  auto& parallel = trainable.parallel;
  model::Transformer reference{nullptr};
  if (rl.kl_coef > 0) reference = build_reference(process);
  RoutingReplay routing(*model);

  claim_run_folder(out_dir, options, *comm);
  ckpt::Progress progress = resume_run(options, cfg, *model, optimizer, comm->rank());
  RLResult result;
  result.first_step = progress.step;
  if (comm->rank() == 0) {
    files::make_directories(out_dir);
    files::write_file_atomic(files::join(out_dir, "config.yaml"), config_yaml);
    log_table("moetrain rl: resolved config (" + files::join(out_dir, "config.yaml") + ")", config::flatten(cfg));
    const auto counts = model->param_counts();
    log_line("parameters: " + format_count(double(counts.total)) + " total, " + format_count(double(counts.active)) +
             " active per token | device " + device.str() + " | " + std::to_string(prompts.size()) + " prompts, " +
             std::to_string(rl.prompts_per_step) + " x " + std::to_string(rl.group_size) + " completions per rollout batch" +
             (reference ? " | KL reference loaded" : ""));
    truncate_metrics(files::join(out_dir, "metrics.jsonl"), progress.step);
  }
  std::ofstream metrics;
  if (comm->rank() == 0) metrics.open(files::join(out_dir, "metrics.jsonl"), std::ios::app);
  // logging.tensorboard: the same records as scalars, in a new event file per process start.
  std::unique_ptr<TensorBoardWriter> tensorboard;
  if (cfg.logging.tensorboard && comm->rank() == 0)
    tensorboard = std::make_unique<TensorBoardWriter>(files::join(out_dir, "tb"));
  int64_t skipped_in_a_row = 0;  // non-finite updates since the last applied one (train.max_skipped_steps)

  const int64_t total_steps = cfg.train.steps;
  const int64_t updates = rl.updates_per_batch;
  const int64_t decay_steps = (cfg.optim.decay_steps > 0 ? cfg.optim.decay_steps : total_steps) * updates;
  const int64_t per_rank = rl.prompts_per_step / layout->dp_size();
  const int64_t G = rl.group_size;
  const bool moe = !routing.empty();
  const auto fp64 = torch::TensorOptions().dtype(torch::kDouble).device(device);
  const double elapsed_before = progress.elapsed_s;
  const double run_start = now_s();
  if (!eval_prompts.empty() && progress.step == 0) {
    result.first_eval_accuracy = held_out_accuracy(*model, eval_set, rl, *layout);
    log_line("held-out accuracy before RL: " + format_double(100 * *result.first_eval_accuracy, 4) + "% of " +
             std::to_string(rl.eval_limit > 0 ? std::min<size_t>(size_t(rl.eval_limit), eval_prompts.size()) : eval_prompts.size()) +
             " prompts (greedy)");
  }

  for (int64_t step = progress.step; step < total_steps; ++step) {
    // ---- rollout: G completions of each of this rank's prompts ---------------------------------------
    const double rollout_start = now_s();
    fault_point("step", step + 1, comm->rank());  // the signal tests: a preemption during a rollout batch
    const auto ids = batch_prompts(cfg.run.seed, step, rl.prompts_per_step, int64_t(prompts.size()));
    std::vector<std::vector<int64_t>> rows;
    std::vector<const Prompt*> row_prompt;
    for (int64_t i = 0; i < per_rank; ++i) {
      const Prompt& p = prompts[size_t(ids[size_t(layout->dp_rank() * per_rank + i)])];
      for (int64_t g = 0; g < G; ++g) {
        rows.push_back(p.tokens);
        row_prompt.push_back(&p);
      }
    }
    const int64_t B = int64_t(rows.size());
    // One generate_batch call per group, seeded by the prompt's place in the run (not by the rank): the
    // same rollouts at any data-parallel layout.
    GenerateOptions sampling;
    sampling.max_new_tokens = rl.max_new_tokens;
    sampling.temperature = rl.temperature;
    sampling.stop_ids = stop_ids(rl, train_set);
    sampling.lockstep = comm->world_size() > 1;  // collective MoE forwards: the same decode steps on every rank
    if (moe) routing.begin_rollout();
    std::vector<std::vector<int64_t>> sequences;
    for (int64_t i = 0; i < per_rank; ++i) {
      const uint64_t slot = uint64_t(step * rl.prompts_per_step + layout->dp_rank() * per_rank + i);
      sampling.seed = cfg.run.seed ^ (0xbf58476d1ce4e5b9ull * (slot + 1));
      const std::vector<std::vector<int64_t>> group(rows.begin() + i * G, rows.begin() + (i + 1) * G);
      if (moe) routing.start_recording();
      auto out = generate_batch(*model, group, sampling);
      if (moe) {
        const int64_t prompt_len = int64_t(group[0].size());  // one prompt: no left padding
        std::vector<int64_t> group_lengths;
        for (const auto& seq : out) group_lengths.push_back(int64_t(seq.size()));
        routing.finish_recording(std::vector<int64_t>(size_t(G), 0), group_lengths, prompt_len);
      }
      for (auto& seq : out) sequences.push_back(std::move(seq));
    }

    // Rewards, then advantages within each group (a group lives on one rank).
    std::vector<std::string> completions(static_cast<size_t>(B));
    int64_t width = 0;
    for (int64_t b = 0; b < B; ++b) {
      const auto& seq = sequences[size_t(b)];
      completions[size_t(b)] = completion_text(train_set, {seq.begin() + int64_t(rows[size_t(b)].size()), seq.end()});
      width = std::max<int64_t>(width, int64_t(seq.size()));
    }
    if (moe) routing.lay_out(width);
    std::vector<double> rewards(static_cast<size_t>(B));
    double correct = 0;
    if (rl.reward == "command") {
      std::vector<Scored> items;
      for (int64_t b = 0; b < B; ++b)
        items.push_back({row_prompt[size_t(b)]->prompt, completions[size_t(b)], row_prompt[size_t(b)]->answer});
      rewards = command_rewards(rl.reward_command, rl.reward_timeout_s, items);
    }
    for (int64_t b = 0; b < B; ++b) {
      const auto& answer = row_prompt[size_t(b)]->answer;
      if (rl.reward != "command") rewards[size_t(b)] = builtin_reward(completions[size_t(b)], answer, rl);
      const auto got = extract_answer(completions[size_t(b)], rl);
      correct += got && *got == trim(answer) ? 1 : 0;
    }
    const auto rewards_PG = torch::tensor(rewards, torch::kDouble).view({per_rank, G});
    const auto advantages_PG = group_advantages(rewards_PG, rl.advantage);
    const double zero_groups = (advantages_PG.abs().amax(1) == 0).sum().item<double>();

    // The batch for the updates: right-padded rows, a mask on the response tokens.
    auto tokens_BL = torch::zeros({B, width}, torch::kLong);
    auto counted_BL = torch::zeros({B, width}, torch::kBool);  // false on the right padding
    auto mask_BN = torch::zeros({B, width - 1}, torch::kFloat);
    double response_tokens = 0;
    for (int64_t b = 0; b < B; ++b) {
      const auto& seq = sequences[size_t(b)];
      tokens_BL[b].narrow(0, 0, int64_t(seq.size())).copy_(torch::tensor(seq, torch::kLong));
      counted_BL[b].narrow(0, 0, int64_t(seq.size())).fill_(true);
      const int64_t first = int64_t(rows[size_t(b)].size()) - 1, n = int64_t(seq.size()) - int64_t(rows[size_t(b)].size());
      if (n > 0) mask_BN[b].narrow(0, first, n).fill_(1);
      response_tokens += double(n);
    }
    tokens_BL = upload(tokens_BL, device);
    counted_BL = upload(counted_BL, device);
    mask_BN = upload(mask_BN, device);
    const auto advantage_B = upload(advantages_PG.reshape({B}), device);
    // The passes over the batch: rl.micro_batch_rows rows at a time. B is the same on every rank, so every
    // rank runs the same number of (collective, under expert parallelism) MoE forwards.
    std::vector<std::pair<int64_t, int64_t>> passes;  // (first row, rows)
    const int64_t pass_rows = rl.micro_batch_rows > 0 ? std::min<int64_t>(rl.micro_batch_rows, B) : B;
    for (int64_t first = 0; first < B; first += pass_rows) passes.push_back({first, std::min(pass_rows, B - first)});
    // Old-policy log-probs, taken before any update (through the recorded experts under replay), and the reference's.
    torch::Tensor old_logp_BN, ref_logp_BN;
    {
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> old_parts, ref_parts;
      if (moe) routing.begin_update(rl.routing_replay);
      for (const auto& [first, n] : passes) {
        const BalanceMask balance_mask(*model, counted_BL.narrow(0, first, n));
        if (moe) routing.select_rows(first, n);
        old_parts.push_back(token_logprobs(*model, tokens_BL.narrow(0, first, n), rl.temperature));
        if (reference) ref_parts.push_back(token_logprobs(*reference, tokens_BL.narrow(0, first, n), rl.temperature));
      }
      if (moe) routing.end_update(), (void)routing.take_mismatch();
      old_logp_BN = torch::cat(old_parts, 0);
      if (reference) ref_logp_BN = torch::cat(ref_parts, 0);
    }
    // The loss divides by the batch's response tokens (or rows) over every rank, so that the ranks'
    // gradient average is one process's gradient, whatever the passes.
    const double global_tokens = layout->dp_size() > 1 ? dist::all_sum(*comm, response_tokens) : response_tokens;
    const double denominator =
        (rl.loss_aggregation == "token" ? global_tokens : double(B * layout->dp_size())) / double(layout->dp_size());
    const double rollout_s = now_s() - rollout_start;

    // ---- updates: updates_per_batch optimizer steps over the rollout batch --------------------------
    const double update_start = now_s();
    double loss_sum = 0, grad_norm = 0, kl_sum = 0, clip_sum = 0, entropy_sum = 0, lr = 0;
    std::optional<double> mismatch;
    double router_mismatch = 0;
    int64_t skipped = 0;
    for (int64_t u = 0; u < updates; ++u) {
      lr = optim::learning_rate(cfg.optim, step * updates + u, decay_steps);
      optimizer.zero_grad();
      // Each pass: forward, surrogate, backward; the gradients accumulate. The routing stays in update
      // mode through the backward, so that a recomputed block (activation checkpointing) routes as its
      // forward did. The balancing losses are each pass's, weighted by its share of the rows.
      if (moe) routing.begin_update(rl.routing_replay);
      auto stats = torch::zeros({4}, fp64);  // loss, kl and clip fraction (times the tokens), entropy sum
      for (size_t k = 0; k < passes.size(); ++k) {
        const auto [first, n] = passes[k];
        const BalanceMask balance_mask(*model, counted_BL.narrow(0, first, n));
        if (moe) routing.select_rows(first, n);
        torch::Tensor entropy_BN, balance;
        const auto logp_BN = token_logprobs(*model, tokens_BL.narrow(0, first, n), rl.temperature, &entropy_BN, &balance);
        const auto pass_mask_BN = mask_BN.narrow(0, first, n);
        const auto terms = grpo_loss({logp_BN, old_logp_BN.narrow(0, first, n),
                                      reference ? ref_logp_BN.narrow(0, first, n) : torch::Tensor(),
                                      advantage_B.narrow(0, first, n), pass_mask_BN, denominator},
                                     rl);
        auto loss = terms.loss + balance * (double(n) / double(B));
        if (test_fault("loss", step + 1, comm->rank())) loss = loss * std::nan("");  // the divergence tests
        if (k + 1 == passes.size()) optimizer.before_last_backward();
        loss.backward();
        const auto tokens = pass_mask_BN.sum();
        stats += torch::stack({terms.loss.detach(), terms.kl * tokens, terms.clip_fraction * tokens,
                               (entropy_BN * pass_mask_BN).sum()})
                     .to(torch::kDouble);
      }
      if (moe) routing.end_update();
      if (moe && u == 0) mismatch = routing.take_mismatch(&router_mismatch);
      (void)optimizer.reduce_gradients();
      // One read per update: the loss and the statistics with the gradient norm's parts, summed over the world.
      auto slots = torch::cat({stats.narrow(0, 0, 1), optimizer.norm_part().to(fp64).reshape({1}), stats.narrow(0, 1, 3)});
      if (comm->world_size() > 1) comm->all_reduce_sum(slots);
      const auto host = slots.to(torch::kCPU);
      const double* h = host.data_ptr<double>();
      const double norm = std::sqrt(h[1]);
      // A non-finite update changes nothing; train.nonfinite says whether the run goes on, as in train.
      // The values are summed over the world, so every rank decides the same. A run that stops does not
      // save: the last checkpoint is the last good state.
      if (!std::isfinite(h[0]) || !std::isfinite(norm)) {
        ++skipped;
        ++skipped_in_a_row;
        optimizer.zero_grad();
        auto text = [](double x) { return std::isnan(x) ? std::string("nan") : format_double(x); };  // not "-nan"
        const std::string what = "rollout batch " + std::to_string(step + 1) + " update " + std::to_string(u + 1) +
                                 ": loss " + text(h[0]) + ", grad norm " + text(norm);
        if (cfg.train.nonfinite == "stop" || skipped_in_a_row > cfg.train.max_skipped_steps)
          throw Error("[rl] " + what + "; the update was not applied and nothing was saved" +
                      (cfg.train.nonfinite == "stop" ? std::string(" (train.nonfinite = stop)")
                                                     : " (" + std::to_string(skipped_in_a_row) +
                                                           " updates in a row, more than train.max_skipped_steps = " +
                                                           std::to_string(cfg.train.max_skipped_steps) + ")") +
                      "; " + last_good_checkpoint(out_dir, cfg));
        log_line("warning: " + what + ": update skipped (" + std::to_string(skipped_in_a_row) + " in a row, at most " +
                 std::to_string(cfg.train.max_skipped_steps) + ")");
        continue;
      }
      skipped_in_a_row = 0;
      if (cfg.optim.grad_clip > 0 && norm > cfg.optim.grad_clip) optimizer.scale_gradients(cfg.optim.grad_clip / (norm + 1e-6));
      optimizer.step(lr);
      loss_sum += h[0] / double(layout->dp_size());
      grad_norm = norm;
      kl_sum += h[2] / std::max(1.0, global_tokens);
      clip_sum += h[3] / std::max(1.0, global_tokens);
      if (u == 0) entropy_sum = h[4] / std::max(1.0, global_tokens);
    }
    const double update_s = now_s() - update_start;

    // ---- bookkeeping -------------------------------------------------------------------------------
    double sums[] = {rewards_PG.sum().item<double>(), rewards_PG.pow(2).sum().item<double>(), correct, double(B),
                     zero_groups, double(per_rank), mismatch.value_or(0), router_mismatch, mismatch ? 1.0 : 0.0};
    constexpr int kSums = int(sizeof sums / sizeof sums[0]);
    if (comm->world_size() > 1) {
      auto t = torch::from_blob(sums, {kSums}, torch::kDouble).to(device);
      comm->all_reduce_sum(t);
      t = t.to(torch::kCPU);
      for (int i = 0; i < kSums; ++i) sums[i] = t[i].item<double>();
    }
    const double n_rows = sums[3], reward_mean = sums[0] / n_rows;
    const double reward_std = std::sqrt(std::max(0.0, sums[1] / n_rows - reward_mean * reward_mean));
    const double applied = double(std::max<int64_t>(1, updates - skipped));
    progress.step = step + 1;
    progress.tokens += int64_t(global_tokens);
    progress.elapsed_s = elapsed_before + (now_s() - run_start);
    result.reward_means.push_back(reward_mean);
    const bool last = progress.step == total_steps;
    const bool stop = parallel.any(stop_signal() != 0);
    std::optional<double> eval_accuracy;
    if (!eval_prompts.empty() && !stop && (last || (cfg.train.eval_every > 0 && progress.step % cfg.train.eval_every == 0))) {
      eval_accuracy = held_out_accuracy(*model, eval_set, rl, *layout);
      result.last_eval_accuracy = eval_accuracy;
    }
    if (comm->rank() == 0) {
      json rec;
      rec["step"] = progress.step;
      rec["reward_mean"] = reward_mean;
      rec["reward_std"] = reward_std;
      rec["accuracy"] = sums[2] / n_rows;
      rec["response_length"] = global_tokens / n_rows;
      rec["zero_advantage_fraction"] = sums[4] / std::max(1.0, sums[5]);
      rec["loss"] = loss_sum / applied;
      rec["kl"] = kl_sum / applied;
      rec["clip_fraction"] = clip_sum / applied;
      rec["entropy"] = entropy_sum;
      rec["grad_norm"] = grad_norm;
      rec["lr"] = lr;
      rec["rollout_s"] = rollout_s;
      rec["update_s"] = update_s;
      rec["tokens"] = progress.tokens;
      rec["elapsed_s"] = progress.elapsed_s;
      if (sums[8] > 0) {
        rec["routing_mismatch"] = sums[6] / sums[8];
        rec["routing_mismatch_router"] = sums[7] / sums[8];
      }
      if (skipped > 0) rec["skipped_updates"] = skipped;
      if (eval_accuracy) rec["eval_accuracy"] = *eval_accuracy;
      if (step == result.first_step && result.first_eval_accuracy) rec["eval_accuracy_start"] = *result.first_eval_accuracy;
      metrics << rec.dump() << "\n" << std::flush;
      if (tensorboard) tensorboard->scalars(progress.step, tensorboard_scalars(rec));
      if (last || stop || progress.step % cfg.train.log_every == 0 || eval_accuracy) {
        char buf[320];
        std::snprintf(buf, sizeof buf,
                      "step %lld/%lld | reward %.3f +- %.3f | acc %.3f | len %.1f | kl %.4f | clip %.3f | entropy %.3f | "
                      "zero-adv %.2f | rollout %.1fs update %.1fs",
                      static_cast<long long>(progress.step), static_cast<long long>(total_steps), reward_mean, reward_std,
                      sums[2] / n_rows, global_tokens / n_rows, kl_sum / applied, clip_sum / applied, entropy_sum,
                      sums[4] / std::max(1.0, sums[5]), rollout_s, update_s);
        std::string line = buf;
        if (sums[8] > 0) line += " | routing mismatch " + format_double(sums[6] / sums[8], 3);
        if (eval_accuracy) line += " | held-out acc " + format_double(*eval_accuracy, 4);
        log_line(line);
      }
    }
    // Checkpoints at rollout-batch boundaries: the sampler and the rollout seeds are functions of the step.
    // None while a streak of skipped updates is open, as in train: the last one written stays the last
    // good state, and retention (which keeps the newest) never removes it.
    const bool in_streak = skipped_in_a_row > 0;
    const bool save = !in_streak && (last || stop || (cfg.checkpoint.every > 0 && progress.step % cfg.checkpoint.every == 0));
    if (save) {
      result.last_checkpoint =
          ckpt::save_checkpoint(out_dir, *model, optimizer.checkpoint_state(), config_yaml, progress, layout.get());
      if (comm->rank() == 0) ckpt::apply_retention(out_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every);
    }
    if (in_streak && (last || stop))
      log_line("warning: rollout batch " + std::to_string(progress.step) + " ends a streak of " +
               std::to_string(skipped_in_a_row) + " skipped update(s): no checkpoint is written for it; " +
               last_good_checkpoint(out_dir, cfg));
    if (stop) {
      const int sig = stop_signal();
      log_line(std::string("received ") + (sig == SIGTERM ? "SIGTERM" : sig == SIGINT ? "SIGINT" : "a stop signal on another rank") +
               ": " + (save ? "saved " + result.last_checkpoint : std::string("nothing saved")) + ", exiting");
      result.interrupted = true;
      break;
    }
  }
  result.last_step = progress.step;
  return result;
}

}  // namespace moetrain::train::rl
