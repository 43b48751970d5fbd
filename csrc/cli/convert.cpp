// Checkpoint tools. `moetrain inspect`: a checkpoint's manifest, tensors and checksums.
// `moetrain convert`: our checkpoints <-> Hugging Face folders. hf:DIR names a Hugging Face folder on
// either side; the other side is one of our run folders (a weights-only checkpoint at step 0 is written).
// It writes only into a new or empty folder unless --force, and never into a run's checkpoints.
#include <cstdio>
#include <map>

#include "ckpt/safetensors.h"
#include "common/files.h"

#include "ckpt/checkpoint.h"
#include "cli/args.h"
#include "common/errors.h"
#include "common/log.h"
#include "config/config.h"
#include "cost/flops.h"
#include "cost/memory.h"
#include "hf/hf.h"
#include "train/generate.h"

namespace moetrain::cli {

namespace {

// Up to three of a folder's entries, and how many more: what a refusal shows of it.
std::string some_of(const std::vector<std::string>& names) {
  std::string text;
  for (size_t i = 0; i < names.size() && i < 3; ++i) text += (i ? ", " : "") + names[i];
  if (names.size() > 3) text += " and " + std::to_string(names.size() - 3) + " more";
  return text;
}

// The entries of `dir`, or none where it does not exist yet; a file where a folder goes is refused.
std::vector<std::string> entries_of_target(const std::string& dir, const std::string& shown) {
  if (!files::exists(dir)) return {};
  if (!files::is_directory(dir)) throw Error("[convert] --to " + shown + " is a file, not a folder");
  return files::list_directory(dir);
}

// Checked before anything is loaded. A folder that holds files is the user's: --force lets an export
// replace its config.json and weights (a tokenizer beside them stays), and a run be written into a
// folder that has no checkpoints. A run's checkpoints are never written into, even with --force: the
// weights-only checkpoint would become its `latest`, and --resume would no longer continue that run.
void check_target(const std::string& to, bool force) {
  const bool peft_target = hf::is_peft_path(to);
  const bool hf_target = hf::is_hf_path(to) || peft_target;
  const std::string dir = peft_target ? hf::peft_dir(to) : hf::hf_dir(to);
  const auto names = entries_of_target(dir, to);
  if (names.empty()) return;
  if (!hf_target) {
    const std::string ckpt_root = files::join(dir, "ckpt");
    const auto held = files::is_directory(ckpt_root) ? files::list_directory(ckpt_root) : std::vector<std::string>{};
    if (!held.empty())
      throw Error("[convert] --to " + to + " holds a run's checkpoints (ckpt/: " + some_of(held) +
                  "): convert never writes into them, even with --force (that run would no longer resume where "
                  "it was); choose a new folder");
  }
  if (force) return;
  throw Error("[convert] --to " + to + " is not empty (it holds " + some_of(names) +
              "): convert writes only into a new or empty folder; choose another, or pass --force to " +
              (peft_target ? "replace its adapter_config.json and adapter_model.safetensors (other files stay)"
               : hf_target ? "replace its config.json and model*.safetensors (other files stay)"
                           : "write the checkpoint into it"));
}

}  // namespace

int run_convert(const std::vector<std::string>& argv) {
  const Command command{
      "convert",
      "Convert a checkpoint: --from hf:DIR --to OUT writes one of our run folders (loadable by generate, eval "
      "and train --resume); --from CKPT --to hf:DIR writes config.json, safetensors shards and their index; "
      "--from LORA-CKPT --to peft:DIR writes its adapters as a PEFT folder for the base's transformers model.",
      {{"from", "SRC", "our run/ckpt/step folder, or hf:DIR"},
       {"to", "DST", "a run folder to create, hf:DIR, or peft:DIR (a LoRA checkpoint's adapters)"},
       {"family", "NAME", "export family: " + hf::family_names() + " (default: from the model's features)"},
       {"shard-size", "BYTES", "largest exported shard in bytes (default 2000000000)"},
       {"expert-layout", "LAYOUT",
        "how an export stores routed experts: per-expert (default; the families' published checkpoints) or packed "
        "(transformers 5's stacked mlp.experts.gate_up_proj and down_proj)"},
       {"merge-lora", "",
        "a LoRA checkpoint (train.lora): write its base with the adapters folded in, W + (alpha / rank) A B, as "
        "plain weights (needs the base, model.init_from, where the run read it)"},
       {"force", "",
        "write into a folder that is not empty: an export replaces config.json and the weights, other files "
        "stay; a run folder gets the checkpoint (never one that holds checkpoints)"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  const std::string from = args.require("from"), to = args.require("to");
  const uint64_t shard_bytes = args.get_u64("shard-size", 2'000'000'000ull);
  if (shard_bytes == 0) throw UsageError("--shard-size must be positive");
  const bool peft = hf::is_peft_path(to);
  if (args.has("family") && !hf::is_hf_path(to) && !peft)
    throw UsageError("--family applies to an export (--to hf:DIR or peft:DIR)");
  if (args.has("expert-layout") && !hf::is_hf_path(to)) throw UsageError("--expert-layout applies to --to hf:DIR");
  const auto expert_layout = hf::expert_layout_from_name(args.get("expert-layout", "per-expert"));
  if (peft && args.has("merge-lora"))
    throw UsageError("--merge-lora writes whole weights (--to hf:DIR or a run folder); --to peft:DIR writes the adapters");
  if (peft && hf::is_hf_path(from)) throw UsageError("--to peft:DIR exports a LoRA checkpoint's adapters, not a Hugging Face folder");
  check_target(to, args.has("force"));

  auto loaded = train::load_for_inference(from, "full");
  loaded.model->to(torch::kCPU);
  if (peft) {
    if (!loaded.model->lora_enabled())
      throw UsageError("[convert] --to " + to + ": " + from + " holds whole weights, not LoRA adapters (train.lora.rank 0); "
                       "export it with --to hf:DIR");
    const auto family = args.has("family") ? hf::family_from_name(args.get("family")) : hf::infer_family(loaded.cfg.model);
    hf::export_peft(*loaded.model, family, hf::peft_dir(to), loaded.cfg.model.init_from.empty()
                                                                  ? std::string()
                                                                  : hf::hf_dir(loaded.cfg.model.init_from));
    log_line("wrote PEFT adapters for " + hf::family_name(family) + " into " + hf::peft_dir(to));
    return 0;
  }
  if (loaded.model->lora_enabled() && !args.has("merge-lora"))
    throw UsageError("[convert] " + from + " holds LoRA adapters, not whole weights: pass --merge-lora to write its "
                     "base with the adapters merged in, or --to peft:DIR to write the adapters for peft");
  if (args.has("merge-lora")) {
    if (!loaded.model->lora_enabled()) throw UsageError("[convert] --merge-lora: " + from + " holds no LoRA adapters");
    model::Transformer merged(loaded.cfg.model);
    model::merge_lora(*loaded.model, *merged);
    loaded.model = merged;
    log_line("[convert] merged LoRA adapters of rank " + std::to_string(loaded.cfg.train.lora.rank) + " into " +
             (loaded.cfg.model.init_from.empty() ? std::string("the seeded base") : loaded.cfg.model.init_from));
    loaded.cfg.train.lora = config::LoraConfig{};  // the written config trains every weight again
  }
  if (hf::is_hf_path(to)) {
    const auto family = args.has("family") ? hf::family_from_name(args.get("family")) : hf::infer_family(loaded.cfg.model);
    hf::export_model(*loaded.model, family, hf::hf_dir(to), shard_bytes, expert_layout);
    log_line("wrote " + hf::family_name(family) + " folder " + hf::hf_dir(to));
  } else {
    config::Config cfg = loaded.cfg;
    cfg.run.out_dir = to;
    cfg.model.init_from.clear();  // the weights are in the checkpoint now
    ckpt::Progress progress;
    if (!hf::is_hf_path(from)) progress = loaded.manifest.progress;
    // A folder this command made goes again if the save fails; one that was there keeps what it held.
    const bool made = !files::exists(to);
    const bool made_ckpt = !files::exists(files::join(to, "ckpt"));
    std::string dir;
    try {
      dir = ckpt::save_weights_checkpoint(to, *loaded.model, config::to_yaml(cfg), progress);
    } catch (const Error&) {
      try {
        if (made) files::remove_tree(to);
        else if (made_ckpt) files::remove_tree(files::join(to, "ckpt"));
      } catch (const Error&) {
      }
      throw;
    }
    log_line("wrote checkpoint " + dir);
  }
  return 0;
}

int run_inspect(const std::vector<std::string>& argv) {
  const Command command{"inspect",
                        "Print a checkpoint's manifest summary, every tensor with shape and dtype, the parameter "
                        "counts, and verify every file (exit 1 on any mismatch).",
                        {{"checkpoint", "DIR", "a run folder, its ckpt/ folder or a step folder (or the first argument)"},
                         {"verify", "MODE", "full (sizes and sha256, default) or size"},
                         {"quiet", "", "omit the tensor list"}}};
  std::vector<std::string> rest = argv;
  if (!rest.empty() && rest.front().rfind("--", 0) != 0) rest.insert(rest.begin(), "--checkpoint");
  Args args(command, rest);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  const std::string path = args.require("checkpoint");
  const std::string verify = args.get("verify", "full");
  if (verify != "full" && verify != "size") throw UsageError("--verify must be full or size, got '" + verify + "'");
  auto step_dir = ckpt::find_checkpoint(path);
  if (!step_dir) throw CheckpointError("'" + path + "' holds no checkpoint yet");
  const auto m = ckpt::read_manifest(*step_dir);
  std::printf("checkpoint  %s\n", step_dir->c_str());
  std::printf("format      %d\n", m.format_version);
  std::printf("step        %lld\n", static_cast<long long>(m.progress.step));
  std::printf("tokens      %lld\n", static_cast<long long>(m.progress.tokens));
  std::printf("elapsed     %s\n", format_duration(m.progress.elapsed_s).c_str());
  std::printf("cost        %.4g device-hours, $%.4g\n", m.progress.gpu_hours, m.progress.cost_usd);
  std::printf("layout      world %d, expert parallel %d\n", m.world_size, m.expert_parallel);

  // Tensors, by file; weights (not moments, not RNG state) count as parameters.
  int64_t params = 0, expert_params = 0;
  uint64_t bytes = 0;
  std::printf("files       %zu\n", m.files.size());
  for (const auto& f : m.files) {
    bytes += f.size;
    const std::string file = files::join(*step_dir, f.name);
    std::printf("  %-44s %12llu bytes  sha256 %.16s...\n", f.name.c_str(), static_cast<unsigned long long>(f.size),
                f.sha256.c_str());
    if (!files::exists(file)) continue;
    std::unique_ptr<ckpt::SafetensorsFile> st;
    try {
      st = std::make_unique<ckpt::SafetensorsFile>(file);
    } catch (const Error& e) {
      std::printf("    (unreadable: %s)\n", e.what());
      continue;
    }
    const bool expert_file = f.name.rfind("experts-", 0) == 0;  // format 2 files routed experts apart
    const bool weights = f.name == "model.safetensors" || expert_file;
    for (const auto& info : st->tensors()) {
      int64_t n = 1;
      for (auto d : info.shape) n *= d;
      if (weights && info.name.find("expert_bias") == std::string::npos) {
        params += n;
        // Format 1 stacked every expert in model.safetensors, known only by its parameter name.
        if (expert_file || (m.format_version < 2 && info.name.find(".moe.experts.") != std::string::npos))
          expert_params += n;
      }
      if (!args.has("quiet")) {
        std::string shape;
        for (size_t i = 0; i < info.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(info.shape[i]);
        std::printf("    %-52s [%s] %s\n", info.name.c_str(), shape.c_str(), c10::toString(info.dtype));
      }
    }
  }
  std::printf("parameters  %s (%s in routed experts)\n", format_count(double(params)).c_str(),
              format_count(double(expert_params)).c_str());
  std::printf("size        %s bytes\n", format_count(double(bytes)).c_str());
  auto problems = ckpt::verify_files(*step_dir, m, verify);
  for (const auto& p : problems) std::printf("MISMATCH    %s\n", p.c_str());
  std::printf("verify      %s: %s\n", verify.c_str(), problems.empty() ? "every file matches the manifest" : "FAILED");
  if (problems.empty()) {
    // The files are whole; their tensors must also be the ones the manifest's config implies: the
    // model of that config loads them (names, shapes, dtypes), where it fits in this machine's memory.
    const auto cfg = config::parse_config(m.config_yaml, files::join(*step_dir, "manifest.json"));
    const double fp32_bytes = 4.0 * double(cost::param_counts(cfg.model).total);
    if (fp32_bytes > 0.5 * cost::machine_memory_bytes("cpu")) {
      std::printf("tensors     not checked against the config: its model (%s bytes in fp32) is more than half of "
                  "this machine's memory\n", format_count(fp32_bytes).c_str());
    } else {
      try {
        model::Transformer expected(cfg.model);
        if (m.lora_base) expected->add_lora(cfg.train.lora, cfg.run.seed);  // adapters only (and the base's reference)
        ckpt::load_model(*step_dir, *expected);
        std::printf("tensors     every weight has the name, shape and dtype the manifest's config implies\n");
      } catch (const Error& e) {
        problems.push_back(e.what());
        std::printf("MISMATCH    %s\n", e.what());
      }
    }
  }
  return problems.empty() ? 0 : 1;
}

}  // namespace moetrain::cli
