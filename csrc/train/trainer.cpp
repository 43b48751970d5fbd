// The Trainer: one function that reads top to bottom. The step is in step.cpp, evaluation in
// evaluate.cpp; everything after the "bookkeeping" marker is timing, logging, evaluation and
// checkpoint decisions.
#include "train/trainer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <ctime>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "ckpt/checkpoint.h"
#include "common/errors.h"
#include "common/fault.h"
#include "common/files.h"
#include "common/host_sync.h"
#include "common/log.h"
#include "cost/flops.h"
#include "cost/hardware.h"
#include "cost/memory.h"
#include "data/sampler.h"
#include "dist/communicator.h"
#include "dist/data_parallel.h"
#include "dist/expert_parallel.h"
#include "dist/pipeline.h"
#include "train/step.h"
#include "train/tensorboard.h"
#include "optim/adamw.h"

using json = nlohmann::json;

namespace moetrain::train {
namespace {

std::atomic<int> g_stop_signal{0};
std::atomic<int64_t> g_first_signal_ns{0};

// One preemption often arrives twice: Ctrl-C reaches the launcher and every rank of its process group,
// and the launcher passes it on too; a scheduler may signal both the job step and each task. A repeat
// within kRepeatWindowNs is that same preemption and is ignored; a signal after it ends the process at
// once (the user insists). Only async-signal-safe calls here.
constexpr int64_t kRepeatWindowNs = 2'000'000'000;

void on_stop_signal(int sig) {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  const int64_t now_ns = int64_t(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
  if (g_stop_signal == 0) {
    g_first_signal_ns = now_ns;
    g_stop_signal = sig;
    return;
  }
  if (now_ns - g_first_signal_ns < kRepeatWindowNs) return;
  std::signal(sig, SIG_DFL);
  std::raise(sig);
}

struct SignalScope {
  SignalScope() {
    g_stop_signal = 0;
    prev_term_ = std::signal(SIGTERM, on_stop_signal);
    prev_int_ = std::signal(SIGINT, on_stop_signal);
    // A reader of our output that went away (a log filter stopped with the job) must not kill the
    // run before it saves: a failed write of a log line is harmless.
    prev_pipe_ = std::signal(SIGPIPE, SIG_IGN);
  }
  ~SignalScope() {
    std::signal(SIGTERM, prev_term_);
    std::signal(SIGINT, prev_int_);
    std::signal(SIGPIPE, prev_pipe_);
  }
  void (*prev_term_)(int);
  void (*prev_int_)(int);
  void (*prev_pipe_)(int);
};

}  // namespace

// Keeps the metrics of steps <= last_step (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const std::string& path, int64_t last_step) {
  if (!files::exists(path)) return;
  if (!files::file_size(path))  // not a regular file: a FIFO would block the stream below
    throw Error("[train] '" + path + "' is " + files::kind(path) + ", not a regular file: not a run's metrics");
  std::ifstream in(path);  // streamed: a long run's metrics may be larger than files::read_file allows
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("step") && j["step"].is_number_integer() && j["step"].get<int64_t>() <= last_step)
      kept += line + "\n";
  }
  files::write_file_atomic(path, kept);
}

namespace {

std::string progress_line(int64_t step, int64_t total, double loss, double lr, double grad_norm, double tok_s,
                          double eta_s) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "step %*lld/%lld | loss %.4f | lr %.2e | grad_norm %.3f | %s tok/s | ETA %s",
                int(std::to_string(total).size()), static_cast<long long>(step), static_cast<long long>(total), loss,
                lr, grad_norm, format_count(tok_s).c_str(), format_duration(eta_s).c_str());
  return buf;
}

// Names the settings that differ from the checkpoint's: a resume continues bit for bit only when
// nothing but the run length and bookkeeping keys changed.
void log_config_changes(const std::string& saved_yaml, const std::string& step_dir, const config::Config& cfg) {
  std::vector<std::pair<std::string, std::string>> saved;
  try {
    saved = config::flatten(config::parse_config(saved_yaml, step_dir + "/manifest.json"));
  } catch (const ConfigError& e) {
    log_line(std::string("note: the checkpoint's config no longer parses (") + e.what() + ")");
    return;
  }
  const auto now = config::flatten(cfg);
  std::string changes;
  for (size_t i = 0; i < now.size() && i < saved.size(); ++i)
    if (now[i].first == saved[i].first && now[i].second != saved[i].second)
      changes += (changes.empty() ? "" : ", ") + now[i].first + " " + saved[i].second + " -> " + now[i].second;
  if (!changes.empty()) log_line("note: settings changed since the checkpoint: " + changes);
}

// What of a run `out_dir` already holds (checkpoints, metrics), or "" for nothing.
std::string run_contents(const std::string& out_dir) {
  std::vector<std::string> found;
  const std::string ckpt_root = files::join(out_dir, "ckpt");
  if (files::is_directory(ckpt_root)) {
    int steps = 0;
    for (const auto& name : files::list_directory(ckpt_root))
      if (name.rfind("step_", 0) == 0) ++steps;
    if (steps > 0) found.push_back(std::to_string(steps) + " checkpoint(s) in ckpt/");
    else if (files::exists(files::join(ckpt_root, "latest"))) found.push_back("ckpt/latest");
  }
  if (files::exists(files::join(out_dir, "metrics.jsonl"))) found.push_back("metrics.jsonl");
  std::string text;
  for (const auto& f : found) text += (text.empty() ? "" : ", ") + f;
  return text;
}

// The run folder's files that moetrain writes (config.yaml, metrics.jsonl) but that are someone else's
// here: the reason to refuse the folder, or "". Other files in it are left alone.
std::string foreign_files(const std::string& out_dir) {
  const std::string config_path = files::join(out_dir, "config.yaml");
  if (files::exists(config_path)) {
    std::string why;
    try {
      (void)config::parse_config(files::read_file(config_path), config_path);
    } catch (const Error& e) {
      why = e.what();
    }
    if (!why.empty())
      return "run.out_dir '" + out_dir + "' holds a config.yaml that is not a moetrain run's config (" + why +
             "): a run writes its resolved config there, so move that file away or choose another run.out_dir";
  }
  const std::string metrics_path = files::join(out_dir, "metrics.jsonl");
  if (files::exists(metrics_path) && !files::file_size(metrics_path))
    return "run.out_dir '" + out_dir + "' holds a metrics.jsonl that is " + files::kind(metrics_path) +
           ", not a run's metrics file";
  return "";
}

}  // namespace

// A fresh run never writes over an earlier one: it refuses, or (--overwrite) moves that run aside to
// <out_dir>.replaced-N first. Rank 0 decides and every rank gets the same answer.
void claim_run_folder(const std::string& out_dir, const TrainOptions& options, dist::Communicator& world) {
  if (!options.resume.empty() && options.overwrite)
    throw UsageError("--overwrite starts a fresh run; it cannot be combined with --resume");
  std::string refusal;
  if (world.rank() == 0) refusal = foreign_files(out_dir);
  if (world.rank() == 0 && refusal.empty() && options.resume.empty()) {
    const std::string held = run_contents(out_dir);
    if (!held.empty() && !options.overwrite) {
      refusal = "run.out_dir '" + out_dir + "' already holds a run (" + held +
                "): continue it with --resume auto, or choose a new run.out_dir (--overwrite moves the old run aside)";
    } else if (!held.empty()) {
      std::string dir = out_dir;
      while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
      std::string aside;
      for (int n = 1; aside.empty() || files::exists(aside); ++n) aside = dir + ".replaced-" + std::to_string(n);
      files::rename_path(dir, aside);
      log_line("--overwrite: moved the earlier run (" + held + ") aside to " + aside);
    }
  }
  if (dist::all_sum(world, refusal.empty() ? 0.0 : 1.0) > 0)
    throw Error("[train] " + (refusal.empty() ? "rank 0 refused run.out_dir '" + out_dir + "' (its message says why)" : refusal));
}

std::string last_good_checkpoint(const std::string& out_dir, const config::Config& cfg) {
  std::optional<std::string> dir;
  try {
    dir = ckpt::newest_verified_checkpoint(files::join(out_dir, "ckpt"), cfg.checkpoint.verify);
  } catch (const Error&) {
  }
  const std::string remedies =
      "a lower optim.lr (now " + format_double(cfg.optim.lr) + ")" +
      (cfg.optim.warmup_steps < 1000 ? ", a longer optim.warmup_steps (now " + std::to_string(cfg.optim.warmup_steps) + ")" : "") +
      (cfg.optim.grad_clip > 0 ? ", a lower optim.grad_clip (now " + format_double(cfg.optim.grad_clip) + ")"
                               : " or gradient clipping (optim.grad_clip is 0, off)") +
      ", or check the data of this step";
  if (!dir) return "this run has no checkpoint that verifies: start again with " + remedies;
  return "last good checkpoint: " + *dir + ", written before the trouble began; continue from it with --resume " + *dir +
         " and " + remedies;
}

namespace {

// True on every rank when every rank's weights and AdamW moments are finite.
bool all_finite(const dist::DataParallel& parallel, const dist::Optimizer& optimizer) {
  std::vector<torch::Tensor> state = parallel.params();
  for (const auto& t : optimizer.state_tensors()) state.push_back(t);
  return !parallel.any(!std::isfinite(dist::max_abs(state)));
}

// "6,5,5"
std::string stage_list(const std::vector<int>& layers) {
  std::string out;
  for (int n : layers) {
    if (!out.empty()) out += ",";
    out += std::to_string(n);
  }
  return out;
}

}  // namespace

ckpt::Progress resume_run(const TrainOptions& options, const config::Config& cfg, model::TransformerImpl& model,
                          dist::Optimizer& optimizer, int rank) {
  ckpt::Progress progress;
  const std::string& out_dir = cfg.run.out_dir;
  if (!options.resume.empty()) {
    const bool automatic = options.resume == "auto";
    const std::string where = automatic ? cfg.run.out_dir : options.resume;
    const bool fresh_run = automatic && !files::exists(where);
    auto step_dir = fresh_run ? std::nullopt : ckpt::find_checkpoint(where, cfg.checkpoint.verify);
    if (!step_dir && !automatic)
      throw CheckpointError("'" + options.resume + "' holds no checkpoint to resume from");
    if (step_dir) {
      ckpt::Manifest manifest;
      try {
        manifest = ckpt::open_checkpoint(*step_dir, cfg.checkpoint.verify);
      } catch (const CheckpointError& e) {
        // Name the checkpoint that would load, so that the way on is one command.
        const auto older = ckpt::newest_verified_checkpoint(files::parent(*step_dir), cfg.checkpoint.verify, *step_dir);
        throw Error(std::string(e.what()) + (older ? "; the newest checkpoint that verifies is " + *older +
                                                         " (--resume " + *older + " continues from it)"
                                                   : "; no other checkpoint of this run verifies"));
      }
      ckpt::load_model(*step_dir, model);
      optimizer.load_state([&](optim::OptimizerState& state) { ckpt::load_optimizer(*step_dir, state, model, rank); });
      progress = manifest.progress;
      log_line("resumed from " + *step_dir + " at step " + std::to_string(progress.step));
      log_config_changes(manifest.config_yaml, *step_dir, cfg);
    } else {
      log_line("no checkpoint in " + files::join(out_dir, "ckpt") + " yet: starting from step 0");
    }
  }
  return progress;
}

StopSignals::StopSignals() : scope_(std::make_shared<SignalScope>()) {}
int stop_signal() { return g_stop_signal; }

TrainResult train(const config::Config& given, const TrainOptions& options) {
  // ---- set-up ------------------------------------------------------------------------------------
  // From the first instant: a preemption during set-up is acted on after the first step (every rank
  // votes on it there), never by the default action that would leave the other ranks waiting.
  SignalScope signals;
  const Process process(given);
  const auto& layout = process.layout;
  const auto& comm = layout->world;
  const config::Config& cfg = process.cfg;
  const torch::Device device = process.device;
  const auto compute_dtype = process.compute_dtype;
  const std::string& out_dir = cfg.run.out_dir;
  const std::string config_yaml = config::to_yaml(cfg);

  // data.dir or the blend of data.sources; bad data fails now, not at the first eval.
  const data::Blend blend = data::open_blend(cfg.data, cfg.model.vocab_size);
  for (const auto& source : blend.sources()) {
    const auto val_shard = source.val && source.val->n_shards() == 1 ? source.val->shard(0) : nullptr;
    if (val_shard && val_shard->learned_tokens() == 0)
      log_line("warning: " + val_shard->mask_path() + " marks no token of " + val_shard->path() +
               " as learned: validation measures nothing, so no val_loss is reported");
  }
  data::Sampler sampler(blend, {cfg.run.seed, cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.grad_accum,
                                layout->dp_rank(), layout->dp_size()});
  // A source whose share is too small to be drawn even once in the run is a blend that does not do
  // what its weights seem to say.
  for (size_t i = 0; blend.size() > 1 && i < blend.size(); ++i) {
    const double expected = blend.share(i) * double(cfg.train.steps) * double(sampler.sequences_per_step());
    if (expected < 1)
      log_line("warning: data.sources[" + std::to_string(i) + "] ('" + blend.source(i).name + "') has a share of " +
               format_double(blend.share(i), 3) + " of the blend: about " + format_double(expected, 3) + " of the run's " +
               std::to_string(int64_t(cfg.train.steps) * int64_t(sampler.sequences_per_step())) +
               " sequences, so it may get none (data.sources weights)");
  }
  const bool per_source = !cfg.data.sources.empty();  // tokens/<name> and val_loss/<name> in metrics.jsonl
  std::vector<uint64_t> sequences_by_source(blend.size(), 0);  // drawn so far (all ranks)

  Trainable trainable(process);
  auto& model = trainable.model;
  auto& optimizer = *trainable.optimizer;
  auto& parallel = trainable.parallel;

  claim_run_folder(out_dir, options, *comm);
  TrainResult result;
  ckpt::Progress progress = resume_run(options, cfg, *model, optimizer, comm->rank());
  result.first_step = progress.step;
  if (per_source)  // a pure function of the step, so a resumed run counts from step 0 again
    sequences_by_source = blend.count_sources(cfg.run.seed, 0, uint64_t(progress.step) * sampler.sequences_per_step());

  if (comm->rank() == 0) {
    files::make_directories(out_dir);
    files::write_file_atomic(files::join(out_dir, "config.yaml"), config_yaml);
    log_table("moetrain: resolved config (" + files::join(out_dir, "config.yaml") + ")", config::flatten(cfg));
    // A pipeline stage holds part of the model: the whole model's counts come from its config.
    const auto counts = layout->pp_size() == 1 ? model->param_counts() : [&] {
      const auto c = cost::param_counts(cfg.model);
      return model::ParamCounts{c.total, c.active};
    }();
    log_line("parameters: " + format_count(double(counts.total)) + " total, " + format_count(double(counts.active)) +
             " active per token | device " + device.str() + " | compute " + (compute_dtype ? "bf16" : "fp32") +
             " | threads " + std::to_string(at::get_num_threads()));
    if (comm->world_size() > 1)
      log_line("parallel: world " + std::to_string(comm->world_size()) + " (" + comm->backend() + "), expert parallel " +
               std::to_string(layout->ep_size()) + ": " + std::to_string(model->local_experts()) + " of " +
               std::to_string(cfg.model.moe.n_experts) + " routed experts per rank, " +
               std::to_string(layout->edp->world_size()) + " replica(s) of each" +
               (layout->pp_size() > 1 ? "; pipeline " + std::to_string(layout->pp_size()) + " stages of " +
                                            std::to_string(layout->dp_size()) + " data-parallel rank(s), blocks per stage " +
                                            stage_list(cost::pipeline_layers(cfg))
                                      : ""));
    truncate_metrics(files::join(out_dir, "metrics.jsonl"), progress.step);
  }
  std::ofstream metrics;
  if (comm->rank() == 0) metrics.open(files::join(out_dir, "metrics.jsonl"), std::ios::app);
  // logging.tensorboard: the same records as scalars, in a new event file per process start.
  std::unique_ptr<TensorBoardWriter> tensorboard;
  if (cfg.logging.tensorboard && comm->rank() == 0)
    tensorboard = std::make_unique<TensorBoardWriter>(files::join(out_dir, "tb"));

  // The cost meter: causal training FLOPs per token (csrc/cost, as `moetrain cost` counts them) over
  // the peak of cost.gpu, summed over the ranks.
  const double flops_per_token = cost::training_flops_per_token(cfg.model, cfg.data.seq_len).total_causal;
  const cost::Hardware hardware = cost::lookup_hardware(cfg.cost.gpu);
  const double peak_flops = hardware.bf16_tflops * 1e12 * comm->world_size();
  log_line("cost meter: " + format_count(flops_per_token) + " FLOP per token (training, causal) | peak " +
           format_double(hardware.bf16_tflops, 4) + " TFLOP/s per device (" + hardware.name + ") | $" +
           format_double(cfg.cost.price_per_gpu_hour, 4) + " per device-hour");
  auto gpu_hours_at = [&](double elapsed_s) { return elapsed_s * comm->world_size() / 3600.0; };

  const int64_t total_steps = cfg.train.steps;
  const int64_t decay_steps = cfg.optim.decay_steps > 0 ? cfg.optim.decay_steps : total_steps;
  const int64_t tokens_per_step =
      int64_t(cfg.train.micro_batch_size) * cfg.data.seq_len * cfg.train.grad_accum * layout->dp_size();
  ckpt::AsyncSaver saver;
  const double run_start = now_s();
  double step_time_ema = 0;
  int64_t window_tokens = 0;
  double tokens_time = 0;
  int64_t skipped_in_a_row = 0;
  bool warned_mfu = false;
  bool warned_unmeasured = false;
  const double elapsed_before = progress.elapsed_s;

  const int64_t first_step = progress.step;
  for (int64_t step = progress.step; step < total_steps; ++step) {
    const double step_start = now_s();
    // ---- the step ----------------------------------------------------------------------------------
    fault_point("step", step + 1, comm->rank());  // the signal tests: a preemption in the middle of a step
    const double lr = optim::learning_rate(cfg.optim, step, decay_steps);
    auto outcome = train_step(*model, optimizer, parallel, cfg, step, lr, device,
                              [&](int micro) { return sampler.batch(step, micro); },
                              [] { return g_stop_signal != 0; });
    const double grad_norm = outcome.grad_norm;
    const MoETelemetry& moe_telemetry = outcome.telemetry;
    if (step == first_step && layout->dp_size() > 1) {  // this run's first step: what the overlap did
      const auto [during, buckets] = optimizer.overlapped_buckets();
      log_line("[dist] gradient reduction: " + std::to_string(buckets) + " buckets per step (parallel.grad_bucket_mb = " +
               format_double(cfg.parallel.grad_bucket_mb) + "), " + std::to_string(during) +
               " launched during backward (parallel.overlap_grad_reduce = " +
               (cfg.parallel.overlap_grad_reduce ? "true" : "false") + ")");
      if (const auto masters = optimizer.sharding_summary(); !masters.empty()) log_line(masters);
    }
    // ---- bookkeeping -------------------------------------------------------------------------------
    const double loss = outcome.loss;
    progress.step = step + 1;
    progress.tokens += tokens_per_step;
    if (per_source) {
      const auto drawn = blend.count_sources(cfg.run.seed, uint64_t(step) * sampler.sequences_per_step(),
                                             sampler.sequences_per_step());
      for (size_t i = 0; i < drawn.size(); ++i) sequences_by_source[i] += drawn[i];
    }
    result.losses.push_back(loss);
    const double step_end = now_s();
    const double step_s = step_end - step_start;
    step_time_ema = step_time_ema == 0 ? step_s : 0.9 * step_time_ema + 0.1 * step_s;
    window_tokens += tokens_per_step;
    tokens_time += step_s;
    progress.elapsed_s = elapsed_before + (step_end - run_start);

    // A non-finite step changed nothing (train_step skipped its update); train.nonfinite says whether
    // the run goes on. A run that stops never saves: the last checkpoint is the last good state.
    skipped_in_a_row = outcome.applied ? 0 : skipped_in_a_row + 1;
    if (!outcome.applied) {
      ++result.skipped_steps;
      const std::string what = "step " + std::to_string(progress.step) + ": " + outcome.nonfinite;
      if (cfg.train.nonfinite == "stop" || skipped_in_a_row > cfg.train.max_skipped_steps) {
        if (saver.in_flight())
          if (auto dir = saver.poll(/*wait=*/true)) result.last_checkpoint = *dir;  // taken before this step
        throw Error("[train] " + what + "; the update was not applied and nothing was saved" +
                    (cfg.train.nonfinite == "stop" ? std::string(" (train.nonfinite = stop)")
                                                   : " (" + std::to_string(skipped_in_a_row) +
                                                         " steps in a row, more than train.max_skipped_steps = " +
                                                         std::to_string(cfg.train.max_skipped_steps) + ")") +
                    "; " + last_good_checkpoint(out_dir, cfg));
      }
      log_line("warning: " + what + ": update skipped (" + std::to_string(skipped_in_a_row) + " in a row, at most " +
               std::to_string(cfg.train.max_skipped_steps) + ")");
    }

    const bool last = progress.step == total_steps;
    const bool stop = outcome.stop;  // voted in the step, with its health
    fault_point("voted", progress.step, comm->rank());  // a signal just after the vote is the next step's
    const bool do_log = last || stop || !outcome.applied || progress.step % cfg.train.log_every == 0;
    const bool do_eval = !stop && (last || (cfg.train.eval_every > 0 && progress.step % cfg.train.eval_every == 0));
    // No checkpoint at a skipped step or while a streak of them is open: the last one written stays the
    // last good state, and retention (which keeps the newest) never removes it.
    const bool in_streak = skipped_in_a_row > 0;
    const bool do_save =
        !in_streak && (last || stop || (cfg.checkpoint.every > 0 && progress.step % cfg.checkpoint.every == 0));

    double val_loss = -1;
    Validation validation;
    bool stopped_in_eval = false;
    if (do_eval) {
      // A stop signal ends the evaluation between batches: the grace after SIGTERM is one batch, not all.
      const auto val = evaluate(*model, blend, cfg.train.eval_batches, cfg.train.micro_batch_size,
                                cfg.data.seq_len, device, layout.get(), [&] {
                                  fault_point("eval", progress.step, comm->rank());
                                  const bool any = parallel.any(g_stop_signal != 0);
                                  fault_point("eval_voted", progress.step, comm->rank());
                                  return any;
                                });
      stopped_in_eval = !val;
      if (val && val->measured) result.final_val_loss = val_loss = val->loss, validation = *val;
      if (val && !val->measured && !warned_unmeasured) {  // once: the masks learn nothing the batches hold
        log_line("warning: step " + std::to_string(progress.step) + ": the " + std::to_string(cfg.train.eval_batches) +
                 " evaluation batches hold no learned target (the val loss masks mark none): no val_loss is reported");
        warned_unmeasured = true;
      }
    }
    if (do_log && comm->rank() == 0) {
      const double tok_s = double(window_tokens) / std::max(1e-9, tokens_time);  // step time only, no eval
      json rec;
      rec["step"] = progress.step;
      rec["loss"] = loss;
      if (!outcome.mtp_losses.empty()) rec["mtp_loss"] = outcome.mtp_losses;
      rec["lr"] = lr;
      rec["grad_norm"] = grad_norm;
      rec["tokens"] = progress.tokens;
      rec["tokens_per_s"] = tok_s;
      rec["elapsed_s"] = progress.elapsed_s;
      rec["mfu"] = tok_s * flops_per_token / peak_flops;
      rec["gpu_hours"] = gpu_hours_at(progress.elapsed_s);
      rec["cost_usd"] = gpu_hours_at(progress.elapsed_s) * cfg.cost.price_per_gpu_hour;
      if (val_loss >= 0) rec["val_loss"] = val_loss;
      for (size_t i = 0; per_source && i < blend.size(); ++i)
        rec["tokens/" + blend.source(i).name] = sequences_by_source[i] * uint64_t(cfg.data.seq_len);
      for (const auto& [name, source_loss] : validation.by_source)
        if (per_source) rec["val_loss/" + name] = source_loss;
      if (!outcome.applied) {
        rec["skipped"] = true;
        rec["nonfinite"] = outcome.nonfinite;
      }
      if (outcome.qk_clip.defined()) {  // optim.qk_clip_tau: the logged step's largest logit, its clipped heads
        const auto qk = host_read(outcome.qk_clip.to(torch::kDouble), "step.qk_clip");
        rec["qk_max_logit"] = qk[0].item<double>();
        rec["qk_clipped_heads"] = int64_t(qk[1].item<double>());
      }
      moe_telemetry.write(rec);
      metrics << rec.dump() << "\n" << std::flush;
      if (tensorboard) tensorboard->scalars(progress.step, tensorboard_scalars(rec));
      std::string line = progress_line(progress.step, total_steps, loss, lr, grad_norm, tok_s,
                                        step_time_ema * double(total_steps - progress.step));
      const double mfu = rec["mfu"].get<double>();
      line += " | mfu " + format_double(100 * mfu, 3) + "%" + (mfu > 1 ? " (!)" : "") + " | $" +
              format_double(rec["cost_usd"].get<double>(), 3);
      if (mfu > 1 && !warned_mfu) {  // once per run: the peak is wrong, not the run
        log_line(cost::mfu_warning(mfu, hardware));
        warned_mfu = true;
      }
      if (rec.contains("load_max_over_mean"))
        line += " | load max/mean " + format_double(rec["load_max_over_mean"].get<double>(), 3);
      if (rec.contains("qk_max_logit"))
        line += " | qk max " + format_double(rec["qk_max_logit"].get<double>(), 4) + " clipped " +
                std::to_string(rec["qk_clipped_heads"].get<int64_t>());
      if (val_loss >= 0) line += " | val_loss " + format_double(val_loss, 4);
      log_line(line);
      window_tokens = 0;
      tokens_time = 0;
    } else if (val_loss >= 0) {
      log_line("step " + std::to_string(progress.step) + " | val_loss " + format_double(val_loss, 4));
    }
    // Checkpoints: every rank writes what it owns, rank 0 commits. With checkpoint.async the files
    // are written in the background and committed at a later step; the last save is synchronous.
    auto committed = [&](const std::string& dir) {
      result.last_checkpoint = dir;
      if (comm->rank() == 0) ckpt::apply_retention(cfg.run.out_dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every);
    };
    const bool stopping = stop || stopped_in_eval;
    const bool saving = do_save || (stopped_in_eval && !in_streak);
    if (saver.in_flight())
      if (auto dir = saver.poll(/*wait=*/saving)) committed(*dir);
    if (saving && !all_finite(parallel, optimizer))  // never reached by a skipped step; a last guard
      throw Error("[train] step " + std::to_string(progress.step) +
                  ": the weights or AdamW moments hold non-finite values; nothing was saved; " +
                  last_good_checkpoint(out_dir, cfg));
    if (stopping) fault_point("stopping", progress.step, comm->rank());  // the tests: a slow stop
    if (saving) {
      progress.gpu_hours = gpu_hours_at(progress.elapsed_s);
      progress.cost_usd = progress.gpu_hours * cfg.cost.price_per_gpu_hour;
      if (cfg.checkpoint.async && !last && !stopping)
        saver.start(cfg.run.out_dir, *model, optimizer.checkpoint_state(), config_yaml, progress, layout.get());
      else
        committed(ckpt::save_checkpoint(cfg.run.out_dir, *model, optimizer.checkpoint_state(), config_yaml, progress,
                                        layout.get()));
    }
    if (in_streak && (last || stopping))
      log_line("warning: step " + std::to_string(progress.step) + " ends a streak of " + std::to_string(skipped_in_a_row) +
               " skipped step(s): no checkpoint is written for it; " + last_good_checkpoint(out_dir, cfg));
    if (stopping) {
      const std::string why = g_stop_signal == SIGTERM ? "SIGTERM" : g_stop_signal == SIGINT ? "SIGINT" : "a stop signal on another rank";
      log_line("received " + why + ": " + (saving ? "saved " + result.last_checkpoint : std::string("nothing saved")) +
               ", exiting");
      result.interrupted = true;
      break;
    }
  }
  result.last_step = progress.step;
  const double ran_s = now_s() - run_start;
  const int64_t ran_steps = progress.step - result.first_step;
  result.tokens_per_s = ran_s > 0 ? double(ran_steps * tokens_per_step) / ran_s : 0;
  result.tokens = progress.tokens;
  result.elapsed_s = progress.elapsed_s;
  result.gpu_hours = gpu_hours_at(progress.elapsed_s);
  result.cost_usd = result.gpu_hours * cfg.cost.price_per_gpu_hour;
  result.mean_mfu = result.tokens_per_s * flops_per_token / peak_flops;
  return result;
}

}  // namespace moetrain::train
