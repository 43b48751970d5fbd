// `moetrain convert`: our checkpoints <-> Hugging Face folders. hf:DIR names a Hugging Face folder on
// either side; the other side is one of our run folders (a weights-only checkpoint at step 0 is written).
#include <cstdio>

#include "ckpt/checkpoint.h"
#include "cli/args.h"
#include "common/errors.h"
#include "common/log.h"
#include "config/config.h"
#include "hf/hf.h"
#include "train/generate.h"

namespace moetrain::cli {

int run_convert(const std::vector<std::string>& argv) {
  const Command command{
      "convert",
      "Convert a checkpoint: --from hf:DIR --to OUT writes one of our run folders (loadable by generate, eval "
      "and train --resume); --from CKPT --to hf:DIR writes config.json, safetensors shards and their index.",
      {{"from", "SRC", "our run/ckpt/step folder, or hf:DIR"},
       {"to", "DST", "a run folder to create, or hf:DIR"},
       {"family", "NAME", "export family: mixtral, qwen2_moe, qwen3_moe, olmoe (default: from the model's features)"},
       {"shard-size", "BYTES", "largest exported shard in bytes (default 2000000000)"}}};
  Args args(command, argv);
  if (args.help()) {
    std::fputs(usage(command).c_str(), stdout);
    return 0;
  }
  const std::string from = args.require("from"), to = args.require("to");
  const uint64_t shard_bytes = args.get_u64("shard-size", 2'000'000'000ull);
  if (shard_bytes == 0) throw UsageError("--shard-size must be positive");
  if (args.has("family") && !hf::is_hf_path(to)) throw UsageError("--family applies to an export (--to hf:DIR)");

  auto loaded = train::load_for_inference(from, "full");
  loaded.model->to(torch::kCPU);
  if (hf::is_hf_path(to)) {
    const auto family = args.has("family") ? hf::family_from_name(args.get("family")) : hf::infer_family(loaded.cfg.model);
    hf::export_model(*loaded.model, family, hf::hf_dir(to), shard_bytes);
    log_line("wrote " + hf::family_name(family) + " folder " + hf::hf_dir(to));
  } else {
    config::Config cfg = loaded.cfg;
    cfg.run.out_dir = to;
    cfg.model.init_from.clear();  // the weights are in the checkpoint now
    ckpt::Progress progress;
    if (!hf::is_hf_path(from)) progress = loaded.manifest.progress;
    const auto dir = ckpt::save_weights_checkpoint(to, *loaded.model, config::to_yaml(cfg), progress);
    log_line("wrote checkpoint " + dir);
  }
  return 0;
}

}  // namespace moetrain::cli
