#!/usr/bin/env python3
"""DeepSeek-V3's cost claim beside moetrain's FLOPs model: a markdown report and a PNG chart.

DeepSeek-V3's technical report claims 2.664M H800 GPU-hours for pre-training on 14.8T tokens
(2.788M with context extension and post-training; $5.576M at $2 per GPU-hour). This script asks
`moetrain cost` what that budget implies (throughput per GPU, MFU) and what a range of MFUs would
have cost, and writes OUT_DIR/deepseek-v3-cost.md and OUT_DIR/deepseek-v3-cost.png.
Usage: cost_report.py MOETRAIN_BIN CONFIG OUT_DIR"""
import json
import pathlib
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TOKENS = "14.8e12"
GPUS = "2048"
CLAIM_PRETRAIN_HOURS = 2.664e6
CLAIM_TOTAL_HOURS = 2.788e6
PRICE = 2.0


def cost(binary, config, *extra):
    cmd = [binary, "cost", "--config", config, "--tokens", TOKENS, "--gpu", "h800", "--gpus", GPUS,
           "--price", str(PRICE), "--json", *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    binary, config, out_dir = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    out_dir.mkdir(parents=True, exist_ok=True)
    claim = cost(binary, config, "--gpu-hours", str(CLAIM_PRETRAIN_HOURS))
    mfus = [0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60]
    sweep = [cost(binary, config, "--mfu", str(m)) for m in mfus]

    rows = [
        ("parameters (main model)", f"{claim['params_total'] / 1e9:.1f}B total, {claim['params_active'] / 1e9:.2f}B active"),
        ("training FLOPs per token (causal, seq 4096)", f"{claim['flops_per_token_causal'] / 1e9:.1f} GFLOP"),
        ("... full attention", f"{claim['flops_per_token'] / 1e9:.1f} GFLOP"),
        ("MTP module, apart (causal)", f"{claim['mtp_flops_per_token_causal'] / 1e9:.1f} GFLOP"),
        ("total pre-training FLOPs", f"{claim['total_flops']:.3e}"),
        ("claimed pre-training H800 GPU-hours", f"{CLAIM_PRETRAIN_HOURS / 1e6:.3f}M"),
        ("implied tokens/s per GPU", f"{claim['tokens_per_s_per_gpu']:.0f}"),
        ("implied MFU (dense bf16 peak 989.4 TFLOP/s)", f"{100 * claim['mfu']:.2f}%"),
        ("days on 2048 GPUs", f"{claim['days']:.1f}"),
        ("pre-training cost at $2/GPU-hour", f"${claim['cost_usd'] / 1e6:.3f}M"),
        ("claimed total (with context extension and post-training)",
         f"{CLAIM_TOTAL_HOURS / 1e6:.3f}M GPU-hours, ${CLAIM_TOTAL_HOURS * PRICE / 1e6:.3f}M"),
    ]
    md = ["# DeepSeek-V3's training-cost claim, checked with `moetrain cost`", "",
          f"Config `{config}`, {TOKENS} tokens, H800, {GPUS} GPUs, ${PRICE:g} per GPU-hour.", "",
          "| quantity | value |", "|---|---|"]
    md += [f"| {k} | {v} |" for k, v in rows]
    md += ["", "GPU-hours the same pre-training would take at other MFUs:", "",
           "| MFU | tokens/s per GPU | GPU-hours | days on 2048 GPUs | cost |", "|---|---|---|---|---|"]
    md += [f"| {100 * s['mfu']:.0f}% | {s['tokens_per_s_per_gpu']:.0f} | {s['gpu_hours'] / 1e6:.3f}M | "
           f"{s['days']:.1f} | ${s['cost_usd'] / 1e6:.3f}M |" for s in sweep]
    md += ["", "![claimed vs modelled GPU-hours](deepseek-v3-cost.png)", ""]
    (out_dir / "deepseek-v3-cost.md").write_text("\n".join(md))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([100 * s["mfu"] for s in sweep], [s["gpu_hours"] / 1e6 for s in sweep], "o-",
            label="modelled (moetrain cost)")
    ax.axhline(CLAIM_PRETRAIN_HOURS / 1e6, color="tab:red", ls="--", label="claimed pre-training, 2.664M")
    ax.axvline(100 * claim["mfu"], color="tab:gray", ls=":", label=f"implied MFU {100 * claim['mfu']:.1f}%")
    ax.set_xlabel("MFU (%) against the H800's dense bf16 peak")
    ax.set_ylabel("H800 GPU-hours (millions)")
    ax.set_title("DeepSeek-V3 pre-training, 14.8T tokens")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "deepseek-v3-cost.png", dpi=120)
    print("\n".join(md[:len(rows) + 6]))
    print(f"[cost_report] wrote {out_dir / 'deepseek-v3-cost.md'} and {out_dir / 'deepseek-v3-cost.png'}")


if __name__ == "__main__":
    main()
